"""``hostvisor import launchd``: a launchd job's property list (launchd.plist(5)).

The plist (XML, or binary ``bplist00`` when the source's bytes are at hand) is read with
:mod:`plistlib`; its root is one job. The unit's name is the ``Label``'s last
reverse-DNS component (``com.joel.gateway`` -> ``gateway``), the label printed beside.

Mapping (launchd's defaults written where hostvisor's differ):

- ``Program`` / ``ProgramArguments`` -> ``command`` (``Program`` is the executable,
  ``ProgramArguments[0]`` then only argv[0], which hostvisor cannot set);
  ``WorkingDirectory`` -> ``workdir`` (launchd's default: ``/``);
  ``EnvironmentVariables`` -> ``env``; ``ExitTimeOut`` -> ``stop_timeout`` (default 20 s).
- ``KeepAlive`` true -> ``restart = "always"``; false or absent -> ``"no"`` (a one-shot);
  a dict: ``SuccessfulExit`` false or ``Crashed`` true -> ``"on-failure"``, the other
  conditions are not mapped.
- ``RunAtLoad``: launchd starts a job at load when it is true or the job is kept alive
  (``KeepAlive`` true, or a ``SuccessfulExit`` condition, which implies it); otherwise a
  job without a schedule waits to be started: ``autostart = false``.
- ``StartInterval`` -> ``every``; ``StartCalendarInterval`` (a dict or an array of them;
  ``Minute Hour Day Weekday Month``, a missing key is ``*``, Weekday 0 and 7 are Sunday)
  -> ``schedule`` when one cron expression says it, with ``catch_up = "once"`` (launchd
  runs a calendar job missed during sleep once on wake; a missed ``StartInterval`` is lost).
- ``ThrottleInterval`` -> ``[backoff]`` ``initial = max`` = the interval, ``multiplier``
  1 (launchd respawns a job at most once per interval, 10 s by default).
- ``StandardOutPath``/``StandardErrorPath``, ``UserName``, ``Nice``, ``ProcessType``,
  ``WatchPaths``, ``Sockets`` ... are reported, each with the reason it is not mapped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from supervisor.importers import (
    Converted,
    FileResult,
    ImportContext,
    ImportFailed,
    Source,
    unit_name,
)
from supervisor.importers.systemd_calendar import cron_expression, span_text

__all__ = ["BINARY", "convert", "convert_plist"]

#: This kind reads a binary plist's bytes (``Source.data``) when the CLI keeps them.
BINARY = True
#: launchd's default ExitTimeOut (launchd.plist(5)) and ThrottleInterval, seconds.
_EXIT_TIMEOUT = 20
_THROTTLE = 10
_MAX_SECONDS = 365 * 86400
_CALENDAR_KEYS = {"Minute": (0, 0, 59), "Hour": (1, 0, 23), "Day": (2, 1, 31),
                  "Month": (3, 1, 12), "Weekday": (4, 0, 7)}  # fmt: skip
_LOGS = "hostvisor writes stdout and stderr to <state>/logs/<name>.log (rotated)"
_REASONS = {
    "StandardOutPath": _LOGS,
    "StandardErrorPath": _LOGS,
    "StandardInPath": "a hostvisor child's stdin is /dev/null",
    "UserName": "hostvisor runs every unit as the daemon's own user",
    "GroupName": "hostvisor runs every unit as the daemon's own user",
    "InitGroups": "hostvisor runs every unit as the daemon's own user",
    "Umask": "a child gets the daemon's umask",
    "Nice": "hostvisor sets no scheduling priority",
    "ProcessType": "hostvisor sets no scheduling class (macOS's Background/Interactive)",
    "LowPriorityIO": "hostvisor sets no I/O priority",
    "LowPriorityBackgroundIO": "hostvisor sets no I/O priority",
    "LegacyTimers": "hostvisor sets no timer coalescing",
    "SoftResourceLimits": "hostvisor sets no rlimits: a child gets the daemon's",
    "HardResourceLimits": "hostvisor sets no rlimits: a child gets the daemon's",
    "RootDirectory": "hostvisor applies no chroot or sandbox",
    "WatchPaths": "hostvisor starts nothing on a file-system event",
    "QueueDirectories": "hostvisor starts nothing on a file-system event",
    "StartOnMount": "hostvisor starts nothing on a file-system event",
    "Sockets": "hostvisor has no socket activation",
    "MachServices": "hostvisor has no Mach services",
    "inetdCompatibility": "hostvisor has no socket activation",
    "AbandonProcessGroup": "hostvisor always stops the whole process group",
    "EnableTransactions": "hostvisor has no idle exit",
    "EnablePressuredExit": "hostvisor has no idle exit",
    "TimeOut": "hostvisor has no idle timeout",
    "LaunchOnlyOnce": "a hostvisor one-shot runs at every daemon start, not once per boot",
    "EnableGlobbing": "hostvisor never globs arguments; list them",
    "Debug": "hostvisor has no launchd debug mode",
    "WaitForDebugger": "hostvisor has no launchd debug mode",
    "SessionCreate": "hostvisor creates no security session",
    "POSIXSpawnType": "hostvisor sets no spawn policy",
    "MaterializeDatalessFiles": "hostvisor sets no file-provider policy",
    "AssociatedBundleIdentifiers": "for macOS's Login Items settings; not carried over",
    "BundleProgram": "an app bundle's program: name the executable in ProgramArguments",
    "Disabled": "",  # mapped in _autostart
}
_LIMIT_LOAD = "hostvisor loads every unit in its folder, on any host or session"


def _read(source: Source) -> dict[str, Any]:
    import plistlib
    from xml.parsers.expat import ExpatError

    data: bytes = getattr(source, "data", b"") or source.text.encode("utf-8")
    try:
        root = plistlib.loads(data)
    except (plistlib.InvalidFileException, ExpatError, ValueError, TypeError) as exc:
        raise ImportFailed(f"not a property list: {exc}") from None
    except (LookupError, IndexError, AttributeError) as exc:  # plistlib's own slips:
        # an unknown XML encoding, a <key> outside a <dict>
        raise ImportFailed(f"not a property list: {type(exc).__name__}: {exc}") from None
    except RecursionError:  # a binary plist nested past Python's recursion limit
        raise ImportFailed("not a property list import can read: nested too deeply") from None
    if not isinstance(root, dict):
        raise ImportFailed(f"the plist's root is a {type(root).__name__}, not a job's dict")
    return root


def convert(source: Source, ctx: ImportContext) -> FileResult:
    """The job of one launchd plist (module docstring).

    Raises:
        ImportFailed: not a plist, its root is not a dict, or no Program or
            ProgramArguments (the key).
    """
    root = _read(source)
    label = root.get("Label")
    if not isinstance(label, str) or not label.strip():
        if source.label == "<stdin>":
            raise ImportFailed("Label: missing (launchd.plist(5) requires it)")
        label = source.path.name.removesuffix(".plist")
    return convert_plist(root, label, ctx)


def convert_plist(root: dict[str, Any], label: str, ctx: ImportContext) -> FileResult:
    """The unit of a parsed plist ``root`` whose job is ``label``.

    Raises:
        ImportFailed: no Program or ProgramArguments, or one that is not strings.
    """
    job = _Job(root, label)
    job.build()
    return FileResult(units=[job.unit])


class _Job:
    def __init__(self, root: dict[str, Any], label: str) -> None:
        self.root = root
        last = label.rsplit(".", 1)[-1] if "." in label.strip(".") else label
        self.unit = Converted(original=label, name=unit_name(last), table={})
        self.table = self.unit.table
        self.done = {"Label"}
        self.table["description"] = f"{label} (launchd)"
        self.unit.map("Label", "the name, description")

    def get(self, key: str) -> Any:
        self.done.add(key)
        return self.root.get(key)

    def build(self) -> None:
        self._command()
        self._workdir()
        env = self.get("EnvironmentVariables")
        if isinstance(env, dict):
            if env:
                self.table["env"] = {str(k): str(v) for k, v in env.items()}
                self.unit.map("EnvironmentVariables", "env")
        elif env is not None:
            self.unit.skip(f"EnvironmentVariables={_shown(env)}", "not a dict of strings")
        scheduled = self._schedule()
        restart = self._keep_alive(scheduled)
        self._autostart(restart, scheduled)
        self._throttle(restart)
        self._exit_timeout()
        self._rest()

    def _exit_timeout(self) -> None:
        timeout = self.get("ExitTimeOut")
        valid = isinstance(timeout, int) and not isinstance(timeout, bool) and timeout >= 0
        if not valid:
            if timeout is not None:
                self.unit.skip(f"ExitTimeOut={_shown(timeout)}", "not a whole number of seconds")
            self.table["stop_timeout"] = f"{_EXIT_TIMEOUT}s"
            self.unit.map("ExitTimeOut (not set: launchd's 20s)", "stop_timeout")
            return
        if timeout == 0 or timeout > _MAX_SECONDS:
            self.unit.notes.append(
                f"ExitTimeOut={timeout}: no timeout under launchd (0 is "
                "infinity); hostvisor's longest is 365d"
            )
        self.table["stop_timeout"] = _seconds_text(min(timeout or _MAX_SECONDS, _MAX_SECONDS))
        self.unit.map(f"ExitTimeOut={timeout}", "stop_timeout")

    def _command(self) -> None:
        program, arguments = self.get("Program"), self.get("ProgramArguments")
        if arguments is not None and (
            not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments)
        ):
            raise ImportFailed("ProgramArguments: not an array of strings")
        if program is not None and not isinstance(program, str):
            raise ImportFailed("Program: not a string")
        if not program and not arguments:
            raise ImportFailed("no Program or ProgramArguments: nothing to run")
        if program:
            argv = [program, *(arguments or [])[1:]]
            self.unit.map("Program", "command")
            if arguments:
                self.unit.map("ProgramArguments[1:]", "command")
                if arguments[0] != program:
                    self.unit.skip(
                        f"ProgramArguments[0]={arguments[0]}",
                        "argv[0] beside Program; hostvisor cannot set argv[0]",
                    )
        else:
            argv = list(arguments or [])
            self.unit.map("ProgramArguments", "command")
        self.table["command"] = argv
        if not argv[0].startswith("/"):
            self.unit.notes.append(
                f"{argv[0]!r} is looked up in the daemon's PATH (launchd's is "
                "/usr/bin:/bin:/usr/sbin:/sbin) or, with a '/', in workdir"
            )

    def _workdir(self) -> None:
        folder = self.get("WorkingDirectory")
        if isinstance(folder, str) and folder:
            self.table["workdir"] = folder
            self.unit.map("WorkingDirectory", "workdir")
            if "$" in folder or folder.startswith("~"):
                self.unit.notes.append("hostvisor expands ~ and $VARS in workdir; launchd does not")
            return
        self.table["workdir"] = "/"
        self.unit.map("WorkingDirectory (not set: launchd's default, /)", "workdir")

    def _schedule(self) -> str:
        interval, calendar = self.get("StartInterval"), self.get("StartCalendarInterval")
        if calendar is not None:
            try:
                self.table["schedule"] = _cron(calendar)
            except ValueError as exc:
                self.unit.skip(f"StartCalendarInterval={_shown(calendar)}", str(exc))
            else:
                self.table["catch_up"] = "once"
                self.unit.map("StartCalendarInterval", "schedule")
                self.unit.map(
                    "StartCalendarInterval (missed during sleep: once on wake)", "catch_up"
                )
                if interval is not None:
                    self.unit.skip(
                        f"StartInterval={_shown(interval)}",
                        "hostvisor has one trigger per unit: StartCalendarInterval is used",
                    )
                return "schedule"
        if interval is None:
            return ""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            self.unit.skip(
                f"StartInterval={_shown(interval)}", "not a whole number of seconds >= 1"
            )
            return ""
        if interval > _MAX_SECONDS:
            self.unit.skip(
                f"StartInterval={_shown(interval)}",
                "more than 365 days (31536000 s), hostvisor's longest every",
            )
            return ""
        self.table["every"] = _seconds_text(interval)
        self.unit.map("StartInterval", "every")
        self.unit.notes.append(
            "a StartInterval run missed while the Mac slept is lost "
            '(launchd.plist(5)): catch_up stays "none"'
        )
        return "every"

    def _keep_alive(self, scheduled: str) -> str:
        keep, on_demand = self.get("KeepAlive"), self.get("OnDemand")
        restart = "no"
        if keep is not None and on_demand is not None:
            self.unit.skip(f"OnDemand={_shown(on_demand)}", "deprecated; KeepAlive is used")
            on_demand = None
        if keep is None and isinstance(on_demand, bool):
            keep = not on_demand
            self.unit.map(f"OnDemand={on_demand} (deprecated: KeepAlive's opposite)", "restart")
        elif keep is None:
            self.unit.map("KeepAlive (not set: launchd does not restart it)", "restart")
        if isinstance(keep, dict):
            restart = self._conditions(keep)
        elif isinstance(keep, bool):
            restart = "always" if keep else "no"
            if on_demand is None:
                self.unit.map(f"KeepAlive={str(keep).lower()}", "restart")
        elif keep is not None:
            self.unit.skip(f"KeepAlive={_shown(keep)}", "not a boolean or a dict")
        if scheduled and restart == "always":
            self.unit.skip(
                "KeepAlive=true",
                'a scheduled unit cannot restart "always": its runs end; restart = "no"',
            )
            restart = "no"
        self.table["restart"] = restart
        if restart == "no" and not scheduled:
            self.unit.notes.append(
                'restart = "no" makes it a one-shot: it runs once, and `hostvisor start` '
                "waits for it to end"
            )
        return restart

    def _conditions(self, keep: dict[str, Any]) -> str:
        restart = "no"
        for key, value in keep.items():
            shown = f"KeepAlive.{key}={_shown(value)}"
            if key == "SuccessfulExit" and value is False:
                restart = "on-failure"
                self.unit.map(shown, 'restart ("on-failure")')
            elif key == "Crashed" and value is True:
                restart = "on-failure"
                self.unit.map(shown, 'restart ("on-failure")')
                self.unit.notes.append(
                    "KeepAlive.Crashed: launchd restarts after a crash "
                    "(a signal) only; hostvisor after any failure"
                )
            elif key == "SuccessfulExit":
                self.unit.skip(shown, "hostvisor cannot restart after a clean exit only")
            elif key == "NetworkState":
                self.unit.skip(shown, "launchd no longer implements it (launchd.plist(5))")
            else:
                self.unit.skip(
                    shown,
                    "hostvisor keeps nothing alive on a path, another job "
                    "or a condition of this kind",
                )
        return restart

    def _autostart(self, restart: str, scheduled: str) -> None:
        run_at_load, disabled = self.get("RunAtLoad"), self.get("Disabled")
        keep = self.root.get("KeepAlive")
        implied = keep is True or (isinstance(keep, dict) and "SuccessfulExit" in keep)
        if disabled is True:
            self.table["autostart"] = False
            self.unit.map("Disabled=true", "autostart (false)")
            self.unit.notes.append("launchctl's enable/disable overrides are not in the plist")
        if scheduled:
            if run_at_load is True:
                self.unit.skip(
                    "RunAtLoad=true",
                    "a scheduled unit runs at its triggers only; "
                    "`hostvisor start NAME` runs it now",
                )
            return
        if run_at_load is True or implied:
            why = "RunAtLoad=true" if run_at_load is True else "KeepAlive (implies RunAtLoad)"
            self.unit.map(why, "autostart (true)")
        elif disabled is not True:
            self.table["autostart"] = False
            shown = "RunAtLoad=false" if run_at_load is False else "RunAtLoad (not set)"
            self.unit.map(shown, "autostart (false)")
            self.unit.notes.append(
                "launchd starts it only when asked (launchctl kickstart): "
                "autostart = false, `hostvisor start NAME` runs it"
            )

    def _throttle(self, restart: str) -> None:
        value = self.get("ThrottleInterval")
        if restart == "no":
            if value is not None:
                self.unit.skip(f"ThrottleInterval={_shown(value)}", "nothing restarts")
            return
        if value is None:
            self.unit.notes.append(
                f"ThrottleInterval is not set: launchd respawns at most "
                f"every {_THROTTLE}s; hostvisor's [backoff] applies "
                "(1s doubling to 30s)"
            )
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 86400:
            self.unit.skip(f"ThrottleInterval={_shown(value)}", "0 to 86400 whole seconds")
            return
        text = _seconds_text(value)
        self.table["backoff"] = {"initial": text, "max": text, "multiplier": 1.0}
        self.unit.map("ThrottleInterval", "backoff.initial, backoff.max (multiplier 1)")
        self.unit.notes.append(
            "launchd spawns a job at most once per ThrottleInterval (one "
            "that ran longer respawns at once); hostvisor waits that long "
            "before every restart"
        )

    def _rest(self) -> None:
        for key, value in self.root.items():
            if key in self.done or key == "Disabled":
                continue
            reason = _REASONS.get(key) or (
                _LIMIT_LOAD if key.startswith("LimitLoad") else "not known to hostvisor import"
            )
            self.unit.skip(f"{key}={_shown(value)}", reason)


def _shown(value: Any) -> str:
    """A plist value as the report shows it: ``true``, ``Interactive``, ``{...}``."""
    import json

    if isinstance(value, bytes | datetime):
        return f"<{type(value).__name__}>"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _seconds_text(seconds: int) -> str:
    return span_text(float(seconds))


def _cron(calendar: Any) -> str:
    """StartCalendarInterval (a dict or an array of dicts) as one cron expression.

    Raises:
        ValueError: a key or value launchd would not take, or entries no single cron
            expression unites.
    """
    from supervisor.schedule import check_cron

    entries = calendar if isinstance(calendar, list) else [calendar]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError("not a dict or an array of dicts")
    boxes = []
    for entry in entries:
        box: list[frozenset[int | str]] = [frozenset()] * 5 + [frozenset({0})]
        for key, value in entry.items():
            if key not in _CALENDAR_KEYS:
                raise ValueError(f"{key!r} is not Minute, Hour, Day, Weekday or Month")
            index, low, high = _CALENDAR_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{key} {value!r} is not a whole number in {low}..{high}")
            box[index] = frozenset({value % 7 if key == "Weekday" else value})
        boxes.append(tuple(box))
    cron = cron_expression(boxes)
    check_cron(cron)
    return cron
