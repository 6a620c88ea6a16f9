"""``hostvisor import systemd``: ``.service`` units, and a ``.timer`` with its service.

A unit file is read as systemd.syntax(7) says (sections, ``Key=value``, ``#``/``;``
comments, ``\\`` continuations, repeated keys accumulate, an empty value resets), with
its drop-ins ``NAME.service.d/*.conf`` beside it; ``systemctl --user cat NAME`` piped to
``-`` works too (its ``# /path/NAME.service`` line names the unit). Specifiers
(systemd.unit(5)) are resolved from the file name and :class:`ImportContext`.

``ExecStart=`` is split with systemd's quoting (systemd.service(5) "Command lines"); its
prefixes ``-`` ``@`` ``:`` ``+`` ``!`` ``!!`` are mapped where they can be and reported
where not. ``${VAR}`` and ``$VAR`` set by ``Environment=`` are substituted at import; a
variable only an ``EnvironmentFile=`` (or the daemon) can set makes the command
``["/bin/sh", "-c", "exec ..."]``, which expands it at run time. A ``.timer`` and its
service (``Unit=``, else the same name, among the imported files or beside the timer)
become one scheduled unit; the service is then not imported a second time.

systemd's own defaults are written where hostvisor's differ: ``Restart=no``
(``restart = "no"``, a one-shot), ``TimeoutStopSec=90s``, the home folder as the working
directory of a user unit. Every other setting is reported, mapped or not, with a reason.
"""

from __future__ import annotations

import re
from pathlib import Path

from supervisor.importers import (
    Converted,
    FileResult,
    ImportContext,
    ImportFailed,
    Source,
    read_source,
)
from supervisor.importers.systemd_calendar import map_timer
from supervisor.importers.systemd_service import ServiceUnit, is_system_unit
from supervisor.importers.systemd_syntax import (
    Specifiers,
    UnitFile,
    UnitName,
    Unresolved,
    read_unit,
    reason_for,
    split_name,
)

__all__ = ["convert"]


def _identify(source: Source) -> tuple[UnitName, Path | None, Path | None]:
    """The unit's name, the file to read drop-ins beside, and the file for ``%y``; from
    standard input, the ``# /path/NAME.service`` line ``systemctl cat`` starts with."""
    if source.label != "<stdin>":
        return split_name(source.path.name), source.path, source.path
    first = next((line for line in source.text.splitlines() if line.strip()), "")
    match = re.fullmatch(r"#\s*(/\S+\.(service|timer))\s*", first)
    if match is None:
        raise ImportFailed(
            "cannot tell the unit's name from standard input: pass the file, "
            "or pipe `systemctl --user cat NAME` (its first line names it)"
        )
    return split_name(Path(match[1]).name), None, Path(match[1])


def _timer_service(timer: UnitFile, name: UnitName, spec: Specifiers) -> UnitName:
    raw = timer.last("Timer", "Unit")
    try:
        service = split_name(spec.expand(raw)) if raw else name.with_suffix(".service")
    except Unresolved as exc:
        raise ImportFailed(f"Unit={raw}: {exc}") from None
    if service.suffix != ".service":
        raise ImportFailed(f"Unit={raw}: a {service.suffix} unit; import runs .service units")
    return service


def _find(service: UnitName, near: Path | None, ctx: ImportContext) -> Path:
    """The file of ``service``: among the imported files, else beside the timer; an
    instance may come from its template file (``prefix@.service``)."""
    names = [service.full]
    if service.instance:
        names.append(f"{service.prefix}@{service.suffix}")
    for wanted in names:
        for path in ctx.paths:
            if path.name == wanted:
                return path
        if near is not None and (near.parent / wanted).is_file():
            return near.parent / wanted
    where = "among the files" + (f" or in {near.parent}" if near else "")
    raise ImportFailed(f"its service {service.full} is not {where}: pass it too")


def _timer(
    source: Source, name: UnitName, path: Path | None, ctx: ImportContext, near: Path | None
) -> FileResult:
    """The scheduled unit of a timer (read at ``path``, drop-ins beside it) and its
    service (among the files, or beside ``near``)."""
    notes: list[str] = []
    timer = read_unit(path, name, source.text, notes)
    if "Timer" not in timer.sections:
        raise ImportFailed("no [Timer] section: not a timer unit")
    spec = Specifiers(name, near, ctx)
    service = _timer_service(timer, name, spec)
    where = _find(service, near, ctx)
    try:
        file = read_unit(where, service, read_source(where).text, notes)
        unit = ServiceUnit(file, service, where, ctx, scheduled=True).build()
    except ImportFailed as exc:
        raise ImportFailed(f"its service {where}: {exc}") from None
    unit.original = f"{name.full} + {service.full}"
    own = timer.last("Timer", "Unit")
    unit.map(f"Unit={own}" if own else f"(its service: {where})", "command")
    _timer_rest(timer, spec, unit, map_timer(timer, spec, unit))
    return FileResult(units=[unit], unmapped=timer.stray + file.stray, notes=notes)


def _timer_rest(timer: UnitFile, spec: Specifiers, unit: Converted, done: set[str]) -> None:
    """Report the timer's keys outside what :func:`map_timer` handled."""
    for section, keys in timer.sections.items():
        for key, entry in keys.items():
            if (section == "Timer" and key in done) or not entry.values:
                continue
            shown = f"timer {key}={entry.values[-1]}"
            if (section, key) == ("Unit", "Description") and "description" not in unit.table:
                try:
                    unit.table["description"] = spec.expand(entry.values[-1])
                    unit.map("timer Description=", "description")
                except Unresolved as exc:
                    unit.skip(shown, str(exc))
            elif (section, key) == ("Unit", "Description"):
                unit.skip(shown, "the service's Description= is used")
            elif section == "Install" and key in ("WantedBy", "RequiredBy"):
                unit.map(shown, "autostart (true, hostvisor's default)")
            else:
                unit.skip(shown, reason_for(key))


def _taken_by(name: UnitName, ctx: ImportContext, notes: list[str]) -> Path | None:
    """The ``.timer`` among the imported files that takes this service, if it imports
    (if it does not, a note says so and the service is imported on its own)."""
    for path in ctx.paths:
        if not path.name.endswith(".timer"):
            continue
        try:
            source = read_source(path)
            timer = UnitFile()
            timer.feed(source.text)
            tname = split_name(path.name)
            if _timer_service(timer, tname, Specifiers(tname, path, ctx)) != name:
                continue
        except ImportFailed:
            continue
        try:
            _timer(source, tname, path, ctx, path)
        except ImportFailed:
            notes.append(f"its timer {path} could not be imported: imported on its own")
            continue
        return path
    return None


def convert(source: Source, ctx: ImportContext) -> FileResult:
    """The unit of one ``.service`` file, or of a ``.timer`` with its service (module
    docstring); a service some imported timer takes gives no unit of its own.

    Raises:
        ImportFailed: another unit type, no [Service] or ExecStart=, an ExecStart= with
            bad quoting or an unresolvable specifier (``%i`` of a template), a timer
            whose service is missing or that never fires.
    """
    name, path, named = _identify(source)
    if name.suffix not in (".service", ".timer"):
        raise ImportFailed(
            f"{name.full} is a {name.suffix} unit: import reads .service and .timer units"
        )
    if name.suffix == ".timer":
        return _timer(source, name, path, ctx, named)
    notes: list[str] = []
    if (timer := _taken_by(name, ctx, notes)) is not None:
        return FileResult(notes=[f"taken with its timer {timer}: one scheduled unit"])
    file = read_unit(path, name, source.text, notes)
    if "Service" not in file.sections:
        raise ImportFailed("no [Service] section: not a service unit")
    instance = file.last("Install", "DefaultInstance") if name.instance == "" else None
    if instance:
        name = UnitName(name.prefix, instance, name.suffix)
        notes.append(f"a template: imported as its DefaultInstance= {name.full}")
    if is_system_unit(named, file):
        notes.append(
            f"a system unit: %h, %u and the folders are resolved for {ctx.user}, "
            "who runs the hostvisor daemon"
        )
    beside = path.with_suffix(".timer") if path is not None else None
    if beside is not None and beside.is_file() and beside not in ctx.paths:
        notes.append(f"{beside} is beside it: import both for one scheduled unit")
    unit = ServiceUnit(file, name, named, ctx, default_instance=bool(instance)).build()
    return FileResult(units=[unit], unmapped=file.stray, notes=notes)
