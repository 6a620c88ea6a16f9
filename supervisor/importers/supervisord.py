"""``hostvisor import supervisord``: the ``[program:x]`` sections of a supervisord.conf
(supervisord's docs, "[program:x] Section Values"; its parser, supervisor/options.py).

The file is read as supervisord reads it: an INI file (:mod:`configparser`, raw, ``;``
and ``#`` start a comment at a line's start or after a blank), each value expanded with
``%(name)s`` (``here`` = the file's folder, ``program_name``, ``group_name``,
``process_num``, ``numprocs``, ``host_node_name``, ``ENV_X`` from the environment of
this import and from the program's ``environment``; ``%%`` is ``%``).

Each program is a service, or ``numprocs`` services named by ``process_name``. Its
``command`` is split with :func:`shlex.split`, as supervisord does, and never run by a
shell. Where supervisord's default differs from hostvisor's, the unit says so:
``autorestart`` defaults to ``unexpected`` (``restart = "on-failure"``) and
``startretries`` to 3, that is ``give_up_after = 4`` (supervisord gives up after
``startretries`` retries of a failed start, the first start not counted).

``priority`` (lower starts first, stops last) becomes ``depends_on``: each program that
starts at daemon start depends on (``started``) those of the next lower priority, so
hostvisor spawns them in that order and stops them in the reverse.

Sections other than programs are reported as not mapped, with what to do instead.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.importers import (
    Converted,
    FileResult,
    ImportContext,
    ImportFailed,
    Source,
    unit_name,
)
from supervisor.importers.supervisord_ini import duplicates, environment, parse

__all__ = ["convert"]

_TRUE = ("yes", "true", "on", "1")
_FALSE = ("no", "false", "off", "0")
_RESTART = {"true": "always", "false": "no", "unexpected": "on-failure"}
_DEFAULT_PRIORITY = 999
_MAX_PROCS = 1000  # numprocs: units from one [program:x]
_ENV_REF = re.compile(r"%\(ENV_([A-Za-z_][A-Za-z0-9_]*)\)")
_SIZE = re.compile(r"^\s*(\d+)\s*(kb|mb|gb)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": "B", "kb": "KiB", "mb": "MiB", "gb": "GiB"}

_NOT_MAPPED = {
    "user": "hostvisor runs every unit as its own user; run a hostvisor as that user for it",
    "umask": "hostvisor sets no umask: a unit inherits the daemon's",
    "stdout_logfile": "hostvisor writes stdout and stderr to logs/<unit>.log",
    "stderr_logfile": "hostvisor writes stdout and stderr to logs/<unit>.log, one file",
    "stderr_logfile_maxbytes": "one log for both streams: its size is [logs] max_size",
    "stderr_logfile_backups": "one log for both streams: its backups are [logs] backups",
    **{
        f"{stream}_capture_maxbytes": "hostvisor has no capture mode (event listeners' "
        "PROCESS_COMMUNICATION)"
        for stream in ("stdout", "stderr")
    },
    **{
        f"{stream}_events_enabled": "hostvisor emits no per-line events; output is in "
        "logs/<unit>.log"
        for stream in ("stdout", "stderr")
    },
    **{
        f"{stream}_syslog": "hostvisor does not write to syslog; run hostvisor under "
        "systemd for the journal"
        for stream in ("stdout", "stderr")
    },
    "serverurl": "children reach hostvisor through its control socket ([daemon] socket)",
}
_SECTIONS = {
    "supervisord": "the daemon's own settings; hostvisor's are config.toml [daemon] (its "
    "environment= is applied to every program)",
    "unix_http_server": "hostvisor's control socket is config.toml [daemon] socket",
    "inet_http_server": "hostvisor listens on no TCP port: its control socket is a Unix "
    "socket ([daemon] socket)",
    "supervisorctl": "the hostvisor CLI finds the socket from config.toml",
    "include": "pass the included files to the same import: hostvisor import supervisord "
    "supervisord.conf conf.d/*.conf",
    "group": "hostvisor has no groups: name the units together (hostvisor start a b); "
    "the group's programs are imported",
    "eventlistener": "hostvisor has no event listeners: its events are on the control "
    "socket (hostvisor events) and OpenTelemetry; [on_failure] runs a command on a failure",
    "fcgi-program": "hostvisor opens no sockets for FastCGI programs: run the program "
    "with its own listener (e.g. spawn-fcgi) as a [program:x]",
    "rpcinterface": "hostvisor has no XML-RPC interface: its control socket speaks "
    "JSON-RPC (contract section 7)",
    "ctlplugin": "hostvisor has no supervisorctl plugins",
}


def convert(source: Source, ctx: ImportContext) -> FileResult:
    """Every ``[program:x]`` of the supervisord.conf ``source`` (module docstring).

    Raises:
        ImportFailed: not an INI file (the line), a value supervisord would refuse too
            (section and key), or no ``[program:x]`` section.
    """
    result = FileResult()
    files = _import_files(source, ctx)
    this = next(f for f in files if f.this)
    groups: dict[str, tuple[str, int]] = {}
    base_env: dict[str, str] = {}
    for file in files:
        groups.update(_groups(file.parser))
        base_env.update(_daemon_env(file.parser, result if file.this else FileResult(), ctx))
    everything: list[tuple[Converted, tuple[int, int], bool]] = []
    mine: set[int] = set()
    given: set[int] = set()  # id() of the units whose program sets priority=
    for file in files:
        try:
            programs = _programs(
                file, groups, base_env, ctx, result if file.this else None, given=given
            )
        except ImportFailed:
            if file.this:
                raise
            continue  # reported when that file is converted
        everything += programs
        if file.this:
            mine.update(id(unit) for unit, _, _ in programs)
    if not mine:
        return _no_program(this, files, result)
    values = [v for s in this.parser.sections() for _, v in this.parser.items(s)]
    if this.here is None and any("%(here)s" in v for v in values):
        result.notes.append("%(here)s was read from standard input: expanded to '.'")
    if base_env and not this.parser.has_section("supervisord"):
        result.notes.append(
            "[supervisord] environment= of the same import applied to every program"
        )
    _unique_names([unit for unit, _, _ in everything])
    _order(everything, result, given)
    result.unmapped += duplicates(source.text)
    result.units = [unit for unit, _, _ in everything if id(unit) in mine]
    result.notes.append(
        "supervisord retries a failed start after 1 s, 2 s, 3 s ... and restarts a program "
        "that exits after RUNNING at once; hostvisor waits [backoff] (1 s doubling to 30 s) "
        "before each restart"
    )
    return result


@dataclass(slots=True)
class _File:
    """One supervisord file of this import, parsed."""

    label: str
    parser: Any
    here: str | None
    this: bool


def _import_files(source: Source, ctx: ImportContext) -> list[_File]:
    """Every file of this import (in order; priority, groups and the [supervisord]
    environment span the files, as supervisord's [include] joins them), parsed; the
    others' read or parse errors are left to their own conversion."""
    from supervisor.importers import read_source

    def folder(path: Path) -> str | None:
        return None if str(path) == "-" else os.path.dirname(os.path.abspath(path))

    files = [_File(source.label, parse(source.text, source.label), folder(source.path), True)]
    mine = os.path.abspath(source.path)
    for path in ctx.paths:
        if str(path) == "-" or os.path.abspath(path) == mine:
            continue
        try:
            parser = parse(read_source(path).text, str(path))
        except ImportFailed:
            continue
        files.append(_File(str(path), parser, folder(path), False))
    return files


def _programs(
    file: _File,
    groups: dict[str, tuple[str, int]],
    base_env: dict[str, str],
    ctx: ImportContext,
    result: FileResult | None,
    *,
    given: set[int],
) -> list[tuple[Converted, tuple[int, int], bool]]:
    """``(unit, (group priority, priority), autostart)`` of each program process of
    ``file``; the sections that are not programs go to ``result`` (this file only)."""
    out = []
    for section in file.parser.sections():
        kind, _, name = section.partition(":")
        if kind == "program" and name:
            group = groups.get(name, (name, -1))
            out += _Program(file.parser, section, group, file.here, ctx).units(base_env, given)
        elif result is None or kind == "supervisord":
            continue
        elif kind in _SECTIONS:
            result.unmapped.append((f"[{section}]", _SECTIONS[kind]))
        else:
            result.unmapped.append((f"[{section}]", "not known to hostvisor import"))
    return out


def _no_program(this: _File, files: list[_File], result: FileResult) -> FileResult:
    """A file without programs: fine when it is the main file whose [include]d files are
    imported with it; else ImportFailed."""
    if this.parser.has_option("include", "files"):
        others = [
            f
            for f in files
            if not f.this and any(s.startswith("program:") for s in f.parser.sections())
        ]
        pattern = this.parser.get("include", "files")
        if others:
            result.notes.append(
                f"no [program:x] of its own: its programs are in the included files ({pattern}), "
                f"imported with it: {', '.join(f.label for f in others)}"
            )
            return result
        raise ImportFailed(
            f"no [program:x] section found; its [include] files = {pattern}: import those "
            "with it (hostvisor import supervisord supervisord.conf conf.d/*.conf)"
        )
    raise ImportFailed("no [program:x] section found")


def _groups(parser: Any) -> dict[str, tuple[str, int]]:
    """program name -> its ``[group:x]`` and the group's priority (``%(group_name)s``;
    supervisord starts groups in their priority order, then a group's programs in theirs)."""
    groups: dict[str, tuple[str, int]] = {}
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if kind == "group" and name and parser.has_option(section, "programs"):
            try:
                priority = int(parser.get(section, "priority", fallback=str(_DEFAULT_PRIORITY)))
            except ValueError:
                raise ImportFailed(f"[{section}] priority: not an integer") from None
            for program in parser.get(section, "programs").split(","):
                if program.strip():
                    groups[program.strip()] = (name, priority)
    return groups


def _daemon_env(parser: Any, result: FileResult, ctx: ImportContext) -> dict[str, str]:
    if not parser.has_section("supervisord"):
        return {}
    env: dict[str, str] = {}
    others = []
    for key, value in parser.items("supervisord"):
        if key == "environment":
            expansions = {f"ENV_{k}": v for k, v in ctx.environ.items()}
            env = environment(_expand(value, expansions, "[supervisord] environment"))
        else:
            others.append(f"{key}={value}")
    if others:
        result.unmapped.append((f"[supervisord] {', '.join(others)}", _SECTIONS["supervisord"]))
    return env


def _expand(value: str, expansions: dict[str, Any], where: str) -> str:
    """``value % expansions`` as supervisord's ``expand``; ImportFailed naming ``where``."""
    try:
        return value % expansions
    except KeyError as exc:
        raise ImportFailed(
            f"{where}: {value!r} names %({exc.args[0]})s, which supervisord cannot expand either"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ImportFailed(
            f"{where}: {value!r} is badly formatted ({exc}); write %% for a literal %"
        ) from None


class _Program:
    """One ``[program:x]``: its values, read and expanded per process."""

    def __init__(
        self, parser: Any, section: str, group: tuple[str, int], here: str | None,
        ctx: ImportContext,
    ) -> None:  # fmt: skip
        self.name = name = section.partition(":")[2]
        self.group_priority = group[1]
        self.raw: dict[str, str] = dict(parser.items(section))
        self.ctx = ctx
        import platform

        self.common: dict[str, Any] = {
            "here": here or ".",
            "program_name": name,
            "group_name": group[0],
            "host_node_name": platform.node(),
        }
        self.where = f"[{section}]"

    def get(self, key: str, default: str, expansions: dict[str, Any]) -> str:
        value = self.raw.get(key)
        if value is None:
            return default
        return _expand(value, expansions, f"{self.where} {key}")

    def integer(self, key: str, default: int, expansions: dict[str, Any]) -> int:
        text = self.get(key, str(default), expansions).strip()
        try:
            return int(text)
        except ValueError:
            raise ImportFailed(f"{self.where} {key}={text}: not an integer") from None

    def boolean(self, key: str, default: bool, expansions: dict[str, Any]) -> bool:
        text = self.get(key, "true" if default else "false", expansions).strip().lower()
        if text not in _TRUE + _FALSE:
            raise ImportFailed(f"{self.where} {key}={text}: not a boolean (true/false)")
        return text in _TRUE

    def units(
        self, base_env: dict[str, str], given: set[int]
    ) -> list[tuple[Converted, tuple[int, int], bool]]:
        """``(unit, (group priority, priority), autostart)`` for each process (``given``:
        the id() of each unit whose program sets priority=, added to)."""
        plain = dict(self.common)
        numprocs = self.integer("numprocs", 1, plain)
        start = self.integer("numprocs_start", 0, plain)
        if numprocs < 1:
            raise ImportFailed(f"{self.where} numprocs={numprocs}: must be at least 1")
        if numprocs > _MAX_PROCS:
            raise ImportFailed(f"{self.where} numprocs={numprocs}: more than {_MAX_PROCS} units")
        process_name = self.raw.get("process_name", "%(program_name)s")
        if numprocs > 1 and "%(process_num)" not in process_name:
            raise ImportFailed(
                f"{self.where}: numprocs={numprocs} needs %(process_num) in "
                "process_name (supervisord refuses it too)"
            )
        out = []
        for num in range(start, start + numprocs):
            expansions = {**self.common, "process_num": num, "numprocs": numprocs}
            expansions.update({f"ENV_{k}": v for k, v in self.ctx.environ.items()})
            out.append(self._one(num, expansions, base_env, process_name))
            if "priority" in self.raw:
                given.add(id(out[-1][0]))
        return out

    def _one(
        self, num: int, expansions: dict[str, Any], base_env: dict[str, str], process_name: str
    ) -> tuple[Converted, tuple[int, int], bool]:
        numprocs = expansions["numprocs"]
        own_env = environment(self.get("environment", "", expansions))
        expansions.update({f"ENV_{k}": v for k, v in own_env.items()})
        proc = _expand(process_name, expansions, f"{self.where} process_name")
        original = f"program:{self.name}" if proc == self.name else proc
        unit = Converted(original=original, name=unit_name(proc), table={})
        table = unit.table
        table["description"] = f"{self.name}{f' process {num}' * (numprocs > 1)} (supervisord)"
        command = self.get("command", "", expansions)
        if not command.strip():
            raise ImportFailed(f"{self.where}: no command (supervisord refuses this too)")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ImportFailed(f"{self.where} command={command!r}: {exc}") from None
        if not argv:
            raise ImportFailed(f"{self.where}: the command is empty")
        table["command"] = argv
        unit.map("command=", "command (split like shlex, no shell, as supervisord does)")
        if numprocs > 1:
            unit.map(
                f"numprocs={numprocs}, process_name={process_name}",
                f"one unit per process ({proc})",
            )
        else:
            for key in ("numprocs", "process_name"):
                if key in self.raw:
                    unit.map(f"{key}={self.raw[key]}", f"the unit name ({proc}, one process)")
        if "numprocs_start" in self.raw:
            unit.map(f"numprocs_start={self.raw['numprocs_start']}", f"%(process_num)s = {num}")
        if "directory" in self.raw:
            table["workdir"] = self.get("directory", "", expansions)
            unit.map("directory=", "workdir")
        env = {**base_env, **own_env}
        if env:
            table["env"] = env
            unit.map("environment=" if own_env else "[supervisord] environment=", "env")
        used = {m.group(1) for v in self.raw.values() for m in _ENV_REF.finditer(v)}
        from_shell = sorted(used - set(own_env))
        if from_shell:
            unit.notes.append(
                "expanded from this import's environment (supervisord reads its own at "
                f"start): {', '.join('ENV_' + n for n in from_shell)}"
            )
        if "%(host_node_name)s" in "".join(self.raw.values()):
            unit.notes.append(
                f"%(host_node_name)s expanded to this host's name, {expansions['host_node_name']}"
            )
        autostart = self.boolean("autostart", True, expansions)
        if "autostart" in self.raw:
            table["autostart"] = autostart
            unit.map("autostart=", "autostart")
        self._restart(unit, expansions)
        self._timing(unit, expansions)
        self._logs(unit, expansions)
        for key, value in self.raw.items():
            if key in _NOT_MAPPED:
                unit.skip(f"{key}={value}", _NOT_MAPPED[key])
            elif key not in _KNOWN:
                unit.skip(f"{key}={value}", "not known to hostvisor import")
        priority = self.integer("priority", _DEFAULT_PRIORITY, expansions)
        group = priority if self.group_priority < 0 else self.group_priority
        return unit, (group, priority), autostart

    def _restart(self, unit: Converted, expansions: dict[str, Any]) -> None:
        text = self.get("autorestart", "unexpected", expansions).strip().lower()
        policy = "true" if text in _TRUE else "false" if text in _FALSE else text
        if policy not in _RESTART:
            raise ImportFailed(
                f"{self.where} autorestart={text}: expected true, false or unexpected"
            )
        unit.table["restart"] = _RESTART[policy]
        given = f"autorestart={text}" if "autorestart" in self.raw else "(default: unexpected)"
        unit.map(given, "restart")
        if policy == "false":
            unit.notes.append(
                'restart = "no" makes a one-shot in hostvisor: it runs once per daemon start '
                "(and on hostvisor start) and is exited after; start_seconds and retries of a "
                "failed start do not apply"
            )
        codes = self.get("exitcodes", "0", expansions)
        if "exitcodes" in self.raw:
            try:
                wanted = {int(c) for c in codes.split(",") if c.strip()}
            except ValueError:
                raise ImportFailed(
                    f"{self.where} exitcodes={codes}: not a list of integers"
                ) from None
            if wanted == {0}:
                unit.map(f"exitcodes={codes}", 'restart = "on-failure" (exit 0 is expected)')
            elif policy == "unexpected":
                unit.skip(
                    f"exitcodes={codes}",
                    'hostvisor\'s "on-failure" takes exit 0 alone '
                    "as expected: other codes are restarted, and so is 0 if not listed",
                )
            else:
                unit.skip(f"exitcodes={codes}", "matters only with autorestart=unexpected")

    def _timing(self, unit: Converted, expansions: dict[str, Any]) -> None:
        table = unit.table
        if "startsecs" in self.raw:
            table["start_seconds"] = f"{self.integer('startsecs', 1, expansions)}s"
            unit.map("startsecs=", "start_seconds")
        retries = self.integer("startretries", 3, expansions)
        if retries < 0:
            raise ImportFailed(f"{self.where} startretries={retries}: must be >= 0")
        table["give_up_after"] = retries + 1
        given = (
            f"startretries={retries}" if "startretries" in self.raw else "(startretries default: 3)"
        )
        unit.map(given, f"give_up_after = {retries + 1} (the first start and {retries} retries)")
        if "stopsignal" in self.raw:
            table["stop_signal"] = _signal(self.get("stopsignal", "TERM", expansions), self.where)
            unit.map("stopsignal=", "stop_signal")
        if "stopwaitsecs" in self.raw:
            table["stop_timeout"] = f"{self.integer('stopwaitsecs', 10, expansions)}s"
            unit.map("stopwaitsecs=", "stop_timeout")
        for key in ("stopasgroup", "killasgroup"):
            if key not in self.raw:
                continue
            if self.boolean(key, False, expansions):
                unit.map(f"{key}=true", "(hostvisor always signals the whole process group)")
            else:
                unit.skip(
                    f"{key}=false",
                    "hostvisor signals the whole process group, not the main process alone",
                )

    def _logs(self, unit: Converted, expansions: dict[str, Any]) -> None:
        if "redirect_stderr" in self.raw:
            if self.boolean("redirect_stderr", False, expansions):
                unit.map("redirect_stderr=true", "(hostvisor logs both streams in one file)")
            else:
                unit.skip(
                    "redirect_stderr=false",
                    "hostvisor writes stdout and stderr to one log, logs/<unit>.log",
                )
        logs: dict[str, Any] = {}
        if "stdout_logfile_maxbytes" in self.raw:
            text = self.get("stdout_logfile_maxbytes", "50MB", expansions)
            match = _SIZE.match(text)
            if match is None:
                raise ImportFailed(f"{self.where} stdout_logfile_maxbytes={text}: not a size")
            number, suffix = int(match.group(1)), (match.group(2) or "").lower()
            if number == 0:
                why = "0 (never rotate) has no counterpart: hostvisor always rotates"
                unit.skip(f"stdout_logfile_maxbytes={text}", why)
            else:
                logs["max_size"] = f"{number}{_SIZE_UNITS[suffix]}"
                unit.map(
                    f"stdout_logfile_maxbytes={text}", "logs.max_size (KB, MB: 1024 as supervisord)"
                )
        if "stdout_logfile_backups" in self.raw:
            logs["backups"] = self.integer("stdout_logfile_backups", 10, expansions)
            unit.map("stdout_logfile_backups=", "logs.backups")
        if logs:
            unit.table["logs"] = logs


_KNOWN = frozenset({
    "command", "directory", "environment", "autostart", "autorestart", "exitcodes",
    "startsecs", "startretries", "stopsignal", "stopwaitsecs", "stopasgroup", "killasgroup",
    "redirect_stderr", "stdout_logfile_maxbytes", "stdout_logfile_backups", "process_name",
    "numprocs", "numprocs_start", "priority", *_NOT_MAPPED,
})  # fmt: skip


def _signal(text: str, where: str) -> str:
    """supervisord's ``signal_number``: a name with or without SIG, or a number."""
    name = text.strip().upper()
    if name.isdigit():
        try:
            return signal.Signals(int(name)).name
        except ValueError:
            raise ImportFailed(f"{where} stopsignal={text}: not a signal number") from None
    name = name if name.startswith("SIG") else f"SIG{name}"
    if not isinstance(getattr(signal, name, None), signal.Signals):
        raise ImportFailed(f"{where} stopsignal={text}: not a signal name")
    return name


def _order(
    programs: list[tuple[Converted, tuple[int, int], bool]], result: FileResult, explicit: set[int]
) -> None:
    """``priority`` -> ``depends_on``: each autostart program depends on (started) the
    autostart programs of the next lower priority (a ``[group:x]``'s priority first);
    ``explicit``: the id() of the units whose program sets priority= (reported even at 999)."""
    levels = sorted({level for _, level, autostart in programs if autostart})
    by_level: dict[tuple[int, int], list[Converted]] = {}
    for unit, level, autostart in programs:
        if autostart:
            by_level.setdefault(level, []).append(unit)
    ordered = False
    for unit, level, autostart in programs:
        given = f"priority={level[1]}" + (f" (group {level[0]})" if level[0] != level[1] else "")
        if len(levels) < 2:
            if level != (_DEFAULT_PRIORITY, _DEFAULT_PRIORITY) or id(unit) in explicit:
                unit.map(given, "(no other priority in this import: no order to keep)")
        elif not autostart:
            if level == (_DEFAULT_PRIORITY, _DEFAULT_PRIORITY) and id(unit) not in explicit:
                continue
            unit.skip(
                given,
                "orders the start at daemon start, which an autostart=false program has no part in",
            )
        elif levels.index(level) == 0:
            unit.map(given, "(the lowest: its dependents wait for it)")
        else:
            lower = levels[levels.index(level) - 1]
            unit.table["depends_on"] = {dep.name: "started" for dep in by_level[lower]}
            unit.map(given, f"depends_on (the programs of priority {lower[1]})")
            ordered = True
    if ordered:
        result.notes.append(
            "priority became depends_on (started): hostvisor spawns the programs in priority "
            "order and stops them in the reverse, as supervisord does; lost: supervisord "
            "starts a program even when one of lower priority never comes up (FATAL), "
            "hostvisor keeps it waiting for it"
        )


def _unique_names(units: list[Converted]) -> None:
    """``-2``, ``-3`` over the files of the import, in their order (as cli_import would
    name them), before ``depends_on`` names them."""
    taken: set[str] = set()
    for unit in units:
        name, n = unit.name, 2
        while name in taken:
            name, n = f"{unit.name[:59]}-{n}", n + 1
        taken.add(name)
        unit.name = name
