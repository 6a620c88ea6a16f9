"""The unit of one systemd ``.service`` file, for ``hostvisor import systemd``.

:class:`ServiceUnit` reads the ``[Unit]``, ``[Service]`` and ``[Install]`` sections
(systemd.service(5), systemd.exec(5), systemd.kill(5), systemd.unit(5)) and builds the
unit's table: ``ExecStart=`` -> ``command``, ``ExecStartPre=`` -> ``[preflight]``,
``ExecStartPost=`` -> ``[post_start]``, ``Environment=`` -> ``env``,
``EnvironmentFile=`` -> ``env_files``, ``WorkingDirectory=`` -> ``workdir``,
``Restart=`` -> ``restart``, ``RestartSec=``/``RestartSteps=``/``RestartMaxDelaySec=``
-> ``[backoff]``, ``TimeoutStopSec=`` -> ``stop_timeout``, ``KillSignal=`` ->
``stop_signal``, ``MemoryMax=`` -> ``max_memory``, ``RuntimeMaxSec=`` -> ``run_timeout``
(jobs), ``After=``/``Requires=``/``Wants=``/``BindsTo=`` -> ``depends_on`` (services
among the imported files). Every other key is reported with the reason it is not mapped.

systemd's defaults are written where hostvisor's differ: ``Restart=no``, 90 s stop and
start timeouts (DefaultTimeoutStopSec=, DefaultTimeoutStartSec=), the home folder (user
units) or ``/`` (system units) as the working directory.
"""

from __future__ import annotations

import math
import re
import signal
from pathlib import Path
from typing import Any

from supervisor.config_values import parse_signal
from supervisor.importers import Converted, ImportContext, ImportFailed, read_source
from supervisor.importers.systemd_calendar import parse_span, span_text
from supervisor.importers.systemd_syntax import (
    Command,
    NoInstance,
    Specifiers,
    UnitFile,
    UnitName,
    Unresolved,
    expand_variables,
    memory_size,
    parse_command,
    reason_for,
    split_name,
    split_words,
)

__all__ = ["ServiceUnit", "is_system_unit"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: systemd's DefaultTimeoutStartSec= and DefaultTimeoutStopSec= (systemd-system.conf(5)).
_DEFAULT_TIMEOUT = 90.0
_MAX_SECONDS = 365 * 86400.0
_DEPENDENCY_KEYS = ("After", "Requires", "Wants", "BindsTo", "Requisite")
#: Restart= values: (hostvisor restart, how it differs).
_RESTARTS = {
    "no": ("no", ""),
    "always": ("always", ""),
    "on-failure": ("on-failure", ""),
    "on-abnormal": ("on-failure", "systemd restarts after a signal, timeout or watchdog but "
                    "not after a non-zero exit; hostvisor restarts after any failure"),
    "on-abort": ("on-failure", "systemd restarts only after an uncaught signal; hostvisor "
                 "restarts after any failure"),
    "on-watchdog": ("on-failure", "systemd restarts only when its watchdog (WatchdogSec=) "
                    "fires; hostvisor has none and restarts after any failure"),
}  # fmt: skip
_TYPES = {
    "forking": "hostvisor supervises the process it starts: a forking daemon's parent exits "
    "at once, and hostvisor sees the service end; run the program in the foreground",
    "notify": "hostvisor gives a child no NOTIFY_SOCKET and waits for no READY=1: the service "
    "is RUNNING after start_seconds (1s); add a [health] probe for readiness",
    "dbus": "hostvisor does not watch D-Bus names: the service is RUNNING after "
    "start_seconds (1s); add a [health] probe for readiness",
}
_TYPES["notify-reload"] = _TYPES["notify"]


def is_system_unit(path: Path | None, unit: UnitFile) -> bool:
    """Whether the unit is one of the system manager's (its folder, or a User=)."""
    where = str(path.absolute()) if path else ""
    return bool(re.search(r"/systemd/system(/|$)", where)) or bool(unit.last("Service", "User"))


class ServiceUnit:
    """Builds the unit of one ``.service`` file (``scheduled``: for its ``.timer``)."""

    def __init__(
        self,
        file: UnitFile,
        name: UnitName,
        path: Path | None,
        ctx: ImportContext,
        *,
        scheduled: bool = False,
        default_instance: bool = False,
    ) -> None:
        self.file, self.name, self.path, self.ctx = file, name, path, ctx
        self.default_instance = default_instance
        self.spec = Specifiers(name, path, ctx)
        self.unit = Converted(original=name.full, name=name.unit, table={})
        self.table = self.unit.table
        self.done: set[tuple[str, str]] = set()
        self.scheduled = scheduled
        self.env: dict[str, str] = {}
        self.restart: str | None = None

    # -- reading

    def raw(self, section: str, key: str) -> list[str]:
        self.done.add((section, key))
        return self.file.all(section, key)

    def expand(self, key: str, raw: str) -> str | None:
        """``raw`` with its specifiers resolved; an unresolvable one is reported (None).

        Raises:
            ImportFailed: the instance of a template file without one: its unit
                would run without the settings made for an instance.
        """
        try:
            return self.spec.expand(raw)
        except NoInstance as exc:
            raise ImportFailed(f"{key}={raw}: {exc}") from None
        except Unresolved as exc:
            self.unit.skip(f"{key}={raw}", str(exc))
            return None

    def values(self, section: str, key: str) -> list[str]:
        """Every value, specifiers resolved; an unresolvable one is reported, left out."""
        found = [self.expand(key, raw) for raw in self.raw(section, key)]
        return [value for value in found if value is not None]

    def value(self, section: str, key: str) -> str | None:
        """A single-valued setting (the last assignment wins, as in systemd)."""
        raw = self.raw(section, key)
        if len(raw) > 1:
            self.unit.notes.append(f"{key}= is set {len(raw)} times: the last one counts")
        return self.expand(key, raw[-1]) if raw else None

    def span(self, key: str, text: str) -> float | None:
        try:
            return parse_span(text)
        except ValueError as exc:
            self.unit.skip(f"{key}={text}", str(exc))
            return None

    # -- building

    def build(self) -> Converted:
        """The unit (module docstring); every key of the file is reported."""
        description = self.value("Unit", "Description")
        if description:
            self.table["description"] = description
            self.unit.map("Description=", "description")
        self._environment()
        self._restart()
        self.table["command"] = self._program(self.raw("Service", "ExecStart"), "ExecStart")
        self._workdir()
        self._preflight()
        self._post_start()
        self._backoff()
        self._stop()
        self._limits()
        self._dependencies()
        if not self.scheduled:
            self._install()
        self._rest()
        return self.unit

    def words(self, key: str, raw: str) -> list[str]:
        """``raw`` split into words, then the specifiers of each word resolved, in
        systemd's order (config_parse_environ()); a word that
        does not resolve is reported and left out, bad quoting reports the whole value.

        Raises:
            ImportFailed: the instance of a template file without one (:meth:`expand`).
        """
        try:
            split = split_words(raw)
        except ValueError as exc:
            self.unit.skip(f"{key}={raw}", f"{exc}; systemd ignores it too")
            return []
        found = [self.expand(key, word) for word in split]
        return [word for word in found if word is not None]

    def _environment(self) -> None:
        for raw in self.raw("Service", "Environment"):
            for word in self.words("Environment", raw):
                name, sep, value = word.partition("=")
                if not sep or not _ENV_NAME.fullmatch(name):
                    self.unit.skip(f"Environment={word}", "not NAME=value; systemd ignores it")
                else:
                    self.env[name] = value
        if self.env:
            self.table["env"] = dict(self.env)
            self.unit.map("Environment=", "env")
        files = []
        for raw in self.values("Service", "EnvironmentFile"):
            path = raw.removeprefix("-")
            if any(c in path for c in "*?["):
                self.unit.skip(
                    f"EnvironmentFile={raw}",
                    "a wildcard: hostvisor reads named files only; list them",
                )
                continue
            files.append(raw)
        if files:
            self.table["env_files"] = files
            self.unit.map("EnvironmentFile=", "env_files")
            if self.env:
                self.unit.notes.append(
                    "an EnvironmentFile= value overrides Environment= under systemd; under "
                    "hostvisor, env wins over env_files"
                )

    def _restart(self) -> None:
        kind = self.value("Service", "Type") or "simple"
        if kind in _TYPES:
            self.unit.skip(f"Type={kind}", _TYPES[kind])
        elif kind not in ("simple", "exec", "idle", "oneshot"):
            self.unit.skip(f"Type={kind}", "not a Type= of systemd.service(5)")
        elif "Type" in self.file.sections.get("Service", {}):
            self.unit.map(f"Type={kind}", "restart (a job)" if kind == "oneshot" else "command")
        self.oneshot = kind == "oneshot"
        raw = self.value("Service", "Restart")
        restart, approximate = _RESTARTS.get(raw or "no", (None, ""))
        if raw is None:
            self.restart = "no"
            if not self.scheduled:
                self.unit.map("Restart= (not set: systemd's default, no)", "restart")
            if not self.scheduled and not self.oneshot:
                self.unit.notes.append(
                    'restart = "no" (systemd\'s default) makes it a one-shot: it runs once '
                    "when the daemon starts, and `hostvisor start` waits for it to end; set "
                    'restart = "on-failure" or "always" to keep it up'
                )
        elif restart is None or (restart == "always" and (self.scheduled or self.oneshot)):
            why = (
                "hostvisor has no restart after a clean exit only"
                if raw == "on-success"
                else "a scheduled or oneshot unit cannot restart always"
                if restart == "always"
                else "not a Restart= value"
            )
            self.restart = "no" if self.scheduled or self.oneshot else None
            default = f'"{self.restart}"' if self.restart else 'hostvisor\'s default "always"'
            self.unit.skip(f"Restart={raw}", f"{why}; restart is {default}")
        else:
            self.restart = restart
            self.unit.map(f"Restart={raw}", "restart")
            if approximate:
                self.unit.notes.append(f"Restart={raw}: {approximate}")
        if self.restart and not (self.scheduled and self.restart == "no" and raw is None):
            self.table["restart"] = self.restart
        self.job = self.scheduled or self.restart == "no"

    def _program(self, raws: list[str], key: str) -> list[str]:
        """The argv of an ``Exec*=`` key's commands (several: one ``/bin/sh -c`` chain).

        Raises:
            ImportFailed: for ExecStart=: none, an unresolvable specifier, bad quoting,
                or several on a unit that is not Type=oneshot.
        """
        main = key == "ExecStart"
        if main and not raws:
            raise ImportFailed("[Service] has no ExecStart=: nothing to run")
        if main and len(raws) > 1 and not self.oneshot:
            raise ImportFailed(
                f"ExecStart= is set {len(raws)} times: only Type=oneshot may "
                "have several (systemd refuses this unit too)"
            )
        commands: list[Command] = []
        for raw in raws:
            try:
                commands.append(parse_command(raw).resolved(self.spec))
            except ValueError as exc:  # Unresolved too
                if main or isinstance(exc, NoInstance):
                    raise ImportFailed(f"ExecStart={raw}: {exc}") from None
                self.unit.skip(f"{key}={raw}", str(exc))
        target = {"ExecStart": "command", "ExecStartPre": "preflight.command"}.get(
            key, "post_start.command"
        )
        return self._chain(commands, key, target) if commands else []

    def _chain(self, commands: list[Command], key: str, target: str) -> list[str]:
        expanded = [(c, *expand_variables(c, self.env)) for c in commands]
        used = sorted({n for e in expanded for n in e[3]})
        later = sorted({n for e in expanded for n in e[4]})
        for command in commands:
            self._prefixes(command, key, target)
        self.unit.map(f"{key}=", target)
        if used:
            self.unit.notes.append(
                f"{key}=: substituted at import from Environment=: "
                + ", ".join(f"${{{n}}}" for n in used)
            )
        if later:
            self.unit.notes.append(
                f"{key}= uses {', '.join('$' + n for n in later)}, which Environment= does not "
                "set (an EnvironmentFile= or the daemon's environment may): it runs through "
                "/bin/sh -c, which expands it when it runs"
            )
        if len(expanded) == 1:
            command, argv, text, _, _ = expanded[0]
            if not command.ignore_failure and not later:
                return argv
            main = key == "ExecStart" and not command.ignore_failure
            return [
                "/bin/sh",
                "-c",
                f"{text} || true" if command.ignore_failure else f"exec {text}" if main else text,
            ]
        self.unit.notes.append(
            f"{key}= has {len(expanded)} commands: one /bin/sh -c runs them "
            "in order and stops at the first failure, as systemd does"
        )
        return [
            "/bin/sh",
            "-c",
            " && ".join(
                f"{{ {e[2]} || true; }}" if e[0].ignore_failure else e[2] for e in expanded
            ),
        ]

    def _prefixes(self, command: Command, key: str, target: str) -> None:
        shown = f"{key}={command.prefixes}{command.words[0]}"
        if command.ignore_failure:
            self.unit.map(f"{key}=- (a failure counts as a success)", f"{target} (|| true)")
        if command.literal:
            self.unit.map(f"{key}=: (no variable substitution)", f"{target} (as written)")
        if command.argv0 is not None:
            self.unit.skip(
                f"{shown} {command.argv0}",
                f"hostvisor cannot set argv[0]: the program sees {command.words[0]!r} instead",
            )
        if any(c in command.prefixes for c in "+!"):
            self.unit.skip(
                shown,
                "systemd runs it with more privileges; hostvisor runs every "
                "command as the daemon's user, with no sandbox to lift",
            )
        if not command.words[0].startswith("/") and key == "ExecStart":
            self.unit.notes.append(
                f"{command.words[0]!r} is looked up in the daemon's PATH "
                "(systemd uses its own fixed PATH)"
            )

    def _workdir(self) -> None:
        raw = self.value("Service", "WorkingDirectory")
        if raw is None:
            system = is_system_unit(self.path, self.file)
            self.table["workdir"] = "/" if system else "~"
            kind = "a system unit: /" if system else "a user unit: the home folder"
            self.unit.map(f"WorkingDirectory= (not set: systemd's default for {kind})", "workdir")
            return
        self.table["workdir"] = raw.removeprefix("-")
        self.unit.map("WorkingDirectory=", "workdir")
        if raw.startswith("-"):
            self.unit.notes.append(
                "WorkingDirectory=-: systemd starts the service in its "
                "default folder when this one is missing; hostvisor "
                "fails the start"
            )
        if "$" in raw:
            self.unit.notes.append("hostvisor expands $VARS in workdir; systemd does not")

    def _timeout(self, key: str) -> tuple[float, str, bool]:
        """TimeoutStartSec=/TimeoutStopSec= (or TimeoutSec=, or systemd's 90 s): seconds,
        capped at hostvisor's 365 days (0 and infinity: no timeout), the setting as
        reported, and whether the file sets it."""
        raw = self.value("Service", key)
        name = key if raw is not None else "TimeoutSec"
        text = raw if raw is not None else self.value("Service", "TimeoutSec")
        seconds = self.span(name, text) if text is not None else None
        if text is None or seconds is None:
            return _DEFAULT_TIMEOUT, f"{key}= (not set: systemd's default, 90s)", False
        setting = f"{name}={text}"
        if seconds == 0 or seconds > _MAX_SECONDS:
            self.unit.notes.append(f"{setting}: no timeout under systemd; hostvisor's is 365d")
            return _MAX_SECONDS, setting, True
        return seconds, setting, True

    def _preflight(self) -> None:
        command = self._program(self.raw("Service", "ExecStartPre"), "ExecStartPre")
        timeout, setting, given = self._timeout("TimeoutStartSec")
        if command:
            self.table["preflight"] = {"command": command, "timeout": span_text(timeout)}
            self.unit.map(setting, "preflight.timeout")
        elif given:
            self.unit.skip(setting, "hostvisor has no start timeout (a Type=simple start ends "
                           "at the spawn); it would bound ExecStartPre=")  # fmt: skip

    def _post_start(self) -> None:
        raws = self.raw("Service", "ExecStartPost")
        if raws and self.job:
            for raw in raws:
                self.unit.skip(
                    f"ExecStartPost={raw}",
                    "a job has no [post_start] (its runs "
                    "end); hostvisor runs post_start on services only",
                )
        elif command := self._program(raws, "ExecStartPost"):
            self.table["post_start"] = {"command": command}
            self.unit.notes.append(
                "[post_start] runs once the service is RUNNING; its "
                "failure is an event, not a failed start as in systemd"
            )

    def _backoff(self) -> None:
        keys = ("RestartSec", "RestartSteps", "RestartMaxDelaySec")
        raw = {key: self.value("Service", key) for key in keys}
        given = {k: v for k, v in raw.items() if v is not None}
        if self.restart == "no" or (self.restart is None and not given):
            for key, value in given.items():
                self.unit.skip(f"{key}={value}", 'nothing restarts (restart is "no")')
            return
        if not given:
            self.unit.notes.append(
                "RestartSec= is not set: systemd restarts after 100ms and gives up after 5 "
                "starts in 10s; hostvisor's [backoff] applies (1s doubling to 30s, for ever)"
            )
            return
        text = raw["RestartSec"]
        initial = self.span("RestartSec", text) if text is not None else 0.1
        if initial is None or initial > _MAX_SECONDS:
            return
        backoff: dict[str, Any] = {
            "initial": span_text(initial),
            "max": span_text(initial),
            "multiplier": 1.0,
        }
        self.unit.map(f"RestartSec={text}" if text else "RestartSec= (100ms)", "backoff.initial")
        steps_text: str | None = raw["RestartSteps"]
        top_text: str | None = raw["RestartMaxDelaySec"]
        steps = int(steps_text) if steps_text and steps_text.isdigit() else 0
        top = self.span("RestartMaxDelaySec", top_text) if top_text else None
        if steps and top is not None and math.isfinite(top) and top > initial > 0:
            multiplier = round((top / initial) ** (1 / steps), 4)
            if multiplier <= 100:
                backoff.update(max=span_text(top), multiplier=multiplier)
                self.unit.map(f"RestartMaxDelaySec={top_text}", "backoff.max")
                self.unit.map(
                    f"RestartSteps={steps_text}", "backoff.multiplier ((max/initial)^(1/steps))"
                )
                steps_text = top_text = None
        for key, left in (("RestartSteps", steps_text), ("RestartMaxDelaySec", top_text)):
            if left is not None:
                self.unit.skip(
                    f"{key}={left}",
                    "grows the delay only with both RestartSteps= "
                    "(> 0) and a finite RestartMaxDelaySec= above RestartSec=",
                )
        if backoff["multiplier"] == 1.0:
            self.unit.notes.append(
                "systemd waits RestartSec= before every restart: multiplier = 1.0, max = initial"
            )
        self.table["backoff"] = backoff

    def _stop(self) -> None:
        timeout, setting, _ = self._timeout("TimeoutStopSec")
        self.table["stop_timeout"] = span_text(timeout)
        self.unit.map(setting, "stop_timeout")
        if (raw := self.value("Service", "KillSignal")) is not None:
            try:
                number = parse_signal(int(raw) if raw.isdigit() else raw)
                self.table["stop_signal"] = signal.Signals(number).name
                self.unit.map(f"KillSignal={raw}", "stop_signal")
            except ValueError:
                self.unit.skip(f"KillSignal={raw}", "not a signal this host knows")
        mode = self.value("Service", "KillMode")
        if mode == "control-group":
            self.unit.map("KillMode=control-group", "stop_signal (to the process group)")
        elif mode is not None:
            self.unit.skip(
                f"KillMode={mode}",
                "hostvisor sends stop_signal, then SIGKILL, to "
                "the whole process group (KillMode=control-group)",
            )

    def _limits(self) -> None:
        for key in ("MemoryMax", "MemoryLimit"):
            raw = self.value("Service", key)
            size = memory_size(raw) if raw is not None else None
            if size is not None:
                self.table["max_memory"] = size
                self.unit.map(f"{key}={raw}", "max_memory")
                self.unit.notes.append(
                    f"{key}=: systemd's kernel limit kills at once; "
                    "hostvisor restarts the service after memory_grace (5s) "
                    "over max_memory"
                )
            elif raw is not None:
                self.unit.skip(
                    f"{key}={raw}",
                    "not a size in bytes (K, M, G, T suffixes); "
                    "hostvisor has no percent or infinity",
                )
        raw = self.value("Service", "RuntimeMaxSec")
        seconds = self.span("RuntimeMaxSec", raw) if raw is not None else None
        if seconds is not None and self.job and 0 < seconds <= _MAX_SECONDS:
            self.table["run_timeout"] = span_text(seconds)
            self.unit.map(f"RuntimeMaxSec={raw}", "run_timeout")
        elif raw is not None:
            self.unit.skip(
                f"RuntimeMaxSec={raw}",
                "run_timeout is for jobs (scheduled units and one-shots), between 0 and 365d",
            )

    def _dependencies(self) -> None:
        others = {p.name: p for p in self.ctx.paths if p.name.endswith(".service")}
        found: dict[str, str] = {}
        for key in _DEPENDENCY_KEYS:
            for value in self.raw("Unit", key):
                # split at whitespace, escapes kept (config_parse_unit_deps()), then resolved
                for word in value.split():
                    if (dep := self.expand(key, word)) is not None:
                        self._dependency(key, dep, others, found)
        if found:
            plain = all(c == "started" for c in found.values())
            self.table["depends_on"] = list(found) if plain else found
            self.unit.notes.append(
                "depends_on waits until each dependency is up (a oneshot: until it completed); "
                "systemd's After= only orders, Wants= does not wait, and Requires=/BindsTo= "
                "also stop this unit with it, which hostvisor does not"
            )

    def _dependency(
        self, key: str, dep: str, others: dict[str, Path], found: dict[str, str]
    ) -> None:
        name = split_name(dep)
        if dep == self.name.full:
            return
        if name.suffix != ".service":
            kind = name.suffix.lstrip(".")
            self.unit.skip(
                f"{key}={dep}",
                f"a {kind} unit: hostvisor has no {kind} units"
                + ("; it starts with the daemon" if kind == "target" else ""),
            )
            return
        if dep not in others:
            self.unit.skip(
                f"{key}={dep}",
                "not among the imported files: import it in the same command to depend on it",
            )
            return
        condition = "started"
        try:
            other = UnitFile()
            other.feed(read_source(others[dep]).text)
            if other.last("Service", "Type") == "oneshot":
                condition = "completed"
        except ImportFailed:
            pass
        found.setdefault(name.unit, condition)
        self.unit.map(f"{key}={dep}", f"depends_on ({name.unit}: {condition})")

    def _install(self) -> None:
        if "Install" not in self.file.sections:
            self.unit.notes.append(
                "no [Install] section: systemd starts it only when another "
                "unit pulls it in; hostvisor starts it with the daemon"
            )
        for key in ("WantedBy", "RequiredBy"):
            for value in self.values("Install", key):
                self.unit.map(f"{key}={value}", "autostart (true, hostvisor's default)")
        for value in self.raw("Install", "DefaultInstance"):
            if self.default_instance:
                self.unit.map(f"DefaultInstance={value}", "the unit name (its instance)")
            else:
                self.unit.skip(f"DefaultInstance={value}", "the instance comes from the name")

    def _rest(self) -> None:
        for section, keys in self.file.sections.items():
            for key, entry in keys.items():
                if (section, key) in self.done:
                    continue
                where = (
                    "" if section in ("Unit", "Service", "Install", "Timer") else f"[{section}] "
                )
                for value in entry.values or [""]:
                    self.unit.skip(f"{where}{key}={value}", reason_for(key))
