"""``hostvisor import KIND FILE... [-o DIR] [--dry-run] [--force]`` (contract section 7).

Reads each FILE with the kind's converter (:mod:`supervisor.importers`), names the units
(a name taken twice in one import gets ``-2``, ``-3``), checks every unit with the config
loader in a staging folder beside the units already there, and only then writes
``DIR/<name>.toml`` (atomically, mode 0644). A unit whose file exists is not replaced
without ``--force``; a unit the loader rejects is not written (its errors are printed):
``hostvisor check`` passes on what an import writes.

Output: per source file, each unit with its source name, where it goes, every setting
mapped and every setting not mapped with the reason (stdout); errors on stderr, one line
each, ``FILE: message``. ``--dry-run`` writes nothing and prints each unit file instead.

Exit codes: 0 every file was imported (settings not mapped are reported, not failures);
1 a file could not be read or parsed, or one of its units could not be written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from supervisor.errors import ConfigError
from supervisor.importers import (
    Converted,
    FileResult,
    ImportContext,
    ImportFailed,
    kind_module,
    read_source,
)
from supervisor.paths import resolve_config_path

__all__ = ["import_verb"]

EXIT_OK = 0
EXIT_FAILED = 1
#: Rounds of "drop the units the loader rejects, check again" (a rejected unit can make a
#: unit depending on it fail in turn).
_MAX_ROUNDS = 20


@dataclass(slots=True, eq=False)
class _Planned:
    """A converted unit on its way to ``path``; ``problems`` non-empty = not written."""

    unit: Converted
    path: Path
    text: str = ""
    problems: list[str] = field(default_factory=list)


def import_verb(
    args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run one import (module docstring); returns the exit code."""
    config_path = resolve_config_path(getattr(args, "config", None))
    if args.output:
        folder = Path(os.path.abspath(os.path.expanduser(args.output)))
    else:
        try:
            from supervisor.config import units_dir

            folder = units_dir(config_path)
        except ConfigError as exc:
            for issue in exc.issues:
                print(issue, file=err)
            print("hostvisor: import: cannot tell the units folder; pass -o DIR", file=err)
            return EXIT_FAILED
    module: Any = kind_module(args.kind)
    paths = tuple(Path(p) for p in args.files)
    ctx = ImportContext(paths=paths)
    failed = False
    results: list[tuple[str, FileResult]] = []
    for index, path in enumerate(paths):
        label = "<stdin>" if str(path) == "-" else str(path)
        try:
            if str(path) == "-" and Path("-") in paths[:index]:
                raise ImportFailed("standard input (-) is given more than once")
            binary = bool(getattr(module, "BINARY", False))
            result = module.convert(read_source(path, binary=binary), ctx)
        except ImportFailed as exc:
            print(f"{label}: {exc}", file=err)
            failed = True
            continue
        except RecursionError:
            print(f"{label}: nested too deeply to read", file=err)
            failed = True
            continue
        except (OverflowError, MemoryError) as exc:
            print(f"{label}: a value too large to read ({type(exc).__name__})", file=err)
            failed = True
            continue
        except Exception as exc:  # a converter bug must not lose the other files
            what = f"{type(exc).__name__}: {exc}"[:300]
            print(f"{label}: internal error ({what}); please report this bug", file=err)
            failed = True
            continue
        results.append((label, result))
    planned = _plan(results, folder, force=args.force)
    _check(planned, config_path, folder)
    if not args.dry_run:
        _write(planned, folder, force=args.force)
    for label, result in results:
        _report(label, result, planned, out, dry_run=args.dry_run)
    for plan in planned:
        for problem in plan.problems:
            print(f"{plan.path}: {problem}", file=err)
    return EXIT_FAILED if failed or any(p.problems for p in planned) else EXIT_OK


def _plan(results: list[tuple[str, FileResult]], folder: Path, *, force: bool) -> list[_Planned]:
    import tomli_w

    planned: list[_Planned] = []
    taken: set[str] = set()
    for label, result in results:
        # A unit renamed because an earlier FILE took its name: this file's references to
        # that name mean it. Two units of one file with one name: references mean the first.
        renamed: dict[str, str] = {}
        own: set[str] = set()
        for unit in result.units:
            free = _free_name(unit.name, taken)
            if free != unit.name and unit.name not in own:
                renamed[unit.name] = free
            own.add(unit.name)
            unit.name = free
            taken.add(unit.name)
        for unit in result.units:  # the file's own references follow its renamed units
            _rename_dependencies(unit, renamed)
            plan = _Planned(unit, folder / f"{unit.name}.toml")
            try:
                plan.text = _header(label, unit) + tomli_w.dumps(unit.table)
            except (TypeError, ValueError) as exc:
                plan.problems.append(f"internal error writing TOML ({exc}); please report it")
            if os.path.lexists(plan.path) and not force:
                plan.problems.append("exists; not replaced (pass --force to replace it)")
            planned.append(plan)
    return planned


def _rename_dependencies(unit: Converted, renamed: dict[str, str]) -> None:
    deps = unit.table.get("depends_on")
    if not renamed or not deps:
        return
    if isinstance(deps, dict):
        unit.table["depends_on"] = {renamed.get(k, k): v for k, v in deps.items()}
    elif isinstance(deps, list):
        unit.table["depends_on"] = [renamed.get(k, k) for k in deps]


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3`` ... (cut so that it stays 63 characters)."""
    if name not in taken:
        return name
    n = 2
    while (candidate := f"{name[: 63 - len(str(n)) - 1].rstrip('-')}-{n}") in taken:
        n += 1
    return candidate


def _header(label: str, unit: Converted) -> str:
    lines = [f"# Imported by `hostvisor import` from {label} ({unit.original})."]
    if unit.unmapped:
        lines.append("# Not mapped:")
        lines += [f"#   {setting}: {reason}" for setting, reason in unit.unmapped]
    lines += [f"# Note: {note}" for note in unit.notes]
    return "\n".join(_CONTROL.sub(_escaped, line) for line in lines) + "\n\n"


#: What a TOML comment cannot hold: control characters but tab (TOML 1.0, "Comment").
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def _check(planned: list[_Planned], config_path: Path, folder: Path) -> None:
    """Check the units to write with the loader, beside the units already in ``folder``.

    An issue the units already there do not have is the new units' doing: on a new unit's
    file, that unit gets it as a problem, and so does every new unit depending on it
    (rounds go on until none is rejected); elsewhere (a ``[defaults]`` value that no new
    unit can take is reported once, on config.toml), each new unit is checked alone to
    find which ones bring it.
    """
    from supervisor.config import check_units

    with tempfile.TemporaryDirectory(prefix="hostvisor-import-") as staging:
        stage = Path(staging)
        ours = {p.path.name for p in planned}
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".toml") and entry.name not in ours:
                    with contextlib.suppress(OSError):
                        _stage(stage / entry.name, Path(entry.path).read_bytes())
        baseline: set[str] = set()

        def issues_with(plans: list[_Planned]) -> list[Any]:
            chosen = {id(p) for p in plans}
            for plan in planned:
                target = stage / plan.path.name
                if id(plan) in chosen:
                    _stage(target, plan.text.encode("utf-8"))
                else:
                    target.unlink(missing_ok=True)
            return [i for i in check_units(config_path, stage) if str(i) not in baseline]

        baseline.update(str(i) for i in issues_with([]))
        for _ in range(_MAX_ROUNDS):
            live = [p for p in planned if not p.problems]
            by_file = {str(stage / p.path.name): p for p in live}
            issues = issues_with(live)
            for issue in issues:
                if (hit := by_file.get(issue.file)) is not None:
                    where = f"{issue.key}: " if issue.key else ""
                    hit.problems.append(f"not written: {where}{issue.message}")
            if any(issue.file in by_file for issue in issues):
                _reject_dependents(planned)
                continue
            if issues:  # none on a new unit's file: find the units that bring them
                for plan in live:
                    for issue in issues_with([plan]):
                        plan.problems.append(f"not written: {issue}")
                _reject_dependents(planned)
            return
        for plan in planned:  # never settled: write nothing the check did not pass
            if not plan.problems:
                plan.problems.append("not written: the check did not settle; import fewer files")


def _stage(path: Path, data: bytes) -> None:
    """A staged copy, 0644 whatever the umask (the loader refuses group-writable files)."""
    path.write_bytes(data)
    path.chmod(0o644)


def _dependencies(plan: _Planned) -> list[str]:
    deps = plan.unit.table.get("depends_on") or ()
    return [str(d) for d in deps]


def _reject_dependents(planned: list[_Planned]) -> None:
    """Reject every unit that depends, directly or not, on a rejected new unit."""
    rejected = {p.unit.name for p in planned if p.problems}
    grew = True
    while grew:
        grew = False
        for plan in planned:
            if plan.problems:
                continue
            gone = [d for d in _dependencies(plan) if d in rejected]
            if gone:
                plan.problems.append(f"not written: it depends on {gone[0]}, which is not")
                rejected.add(plan.unit.name)
                grew = True


def _write(planned: list[_Planned], folder: Path, *, force: bool) -> None:
    """Write in two phases: every unit to a temporary file (fsync'd) first, so that a full
    disk leaves nothing half done; then each is renamed into place (linked, without
    ``force``, so that a unit file created meanwhile by another import is never
    replaced). A unit that could not be written takes its dependents with it."""
    todo = [p for p in planned if not p.problems]
    if not todo:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        for plan in todo:
            plan.problems.append(f"cannot create {folder}: {exc.strerror or exc}")
        return
    temps: dict[int, Path] = {}
    try:
        for plan in todo:
            tmp = plan.path.with_name(f".{plan.path.name}.import-{os.getpid()}")
            try:
                _write_temp(tmp, plan.text)
                temps[id(plan)] = tmp
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                plan.problems.append(f"cannot write: {exc.strerror or exc}")
        _reject_dependents(planned)
        for plan in todo:
            staged = temps.get(id(plan))
            if staged is None or plan.problems:
                continue
            try:
                if force:
                    os.replace(staged, plan.path)
                else:
                    _link(staged, plan.path)  # fails if the file appeared meanwhile
            except FileExistsError:
                plan.problems.append("exists; not replaced (pass --force to replace it)")
            except OSError as exc:
                plan.problems.append(f"cannot write: {exc.strerror or exc}")
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()


def _link(staged: Path, path: Path) -> None:
    """``staged`` at ``path`` unless ``path`` exists: a hard link, or where the file system
    has none (vfat, some FUSE mounts) a rename after a last look.

    Raises:
        FileExistsError: ``path`` exists.
        OSError: it cannot be written.
    """
    try:
        os.link(staged, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(staged, path)


def _write_temp(tmp: Path, text: str) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(tmp, 0o644)  # whatever the umask: the loader refuses group-writable files


def _report(
    label: str, result: FileResult, planned: list[_Planned], out: TextIO, *, dry_run: bool
) -> None:
    by_unit = {id(p.unit): p for p in planned}
    count = len(result.units)
    print(f"{label}: {count} unit{'' if count == 1 else 's'}", file=out)
    for setting, reason in result.unmapped:
        print(f"  not mapped  {setting}: {reason}", file=out)
    for note in result.notes:
        print(f"  note        {note}", file=out)
    for unit in result.units:
        plan = by_unit[id(unit)]
        verb = "not written" if plan.problems else "would write" if dry_run else "wrote"
        source = f" (from {unit.original})" if unit.original != unit.name else ""
        print(f"  {unit.name}{source}: {verb} {plan.path}", file=out)
        for i, (setting, key) in enumerate(unit.mapped):
            print(f"    {'mapped' if i == 0 else '':<11} {setting} -> {key}", file=out)
        for i, (setting, reason) in enumerate(unit.unmapped):
            print(f"    {'not mapped' if i == 0 else '':<11} {setting}: {reason}", file=out)
        for note in unit.notes:
            print(f"    {'note':<11} {note}", file=out)
        if dry_run and plan.text:
            print(f"    --- {plan.path}", file=out)
            for line in plan.text.rstrip("\n").splitlines():
                print(f"    {line}", file=out)
