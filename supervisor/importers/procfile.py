"""``hostvisor import procfile``: a Procfile (Heroku, foreman, honcho, overmind).

Each ``name: command`` line (foreman's rule: ``^[A-Za-z0-9_-]+:``) is a service kept up
(``restart = "always"``), run in the Procfile's folder as foreman does, with the folder's
``.env`` as an optional env file when there is one (foreman and honcho read it). Heroku's
``release:`` entry runs once per deploy: it becomes a one-shot (``restart = "no"``). The
command is split into argv; one that needs a shell (``$PORT``, a pipe) runs under
``/bin/sh -c``, and the report says so. Comments (``#``) and blank lines are skipped; any
other line is reported as not mapped.
"""

from __future__ import annotations

import os
import re

from supervisor.importers import (
    Converted,
    FileResult,
    ImportContext,
    ImportFailed,
    Source,
    command_argv,
    unit_name,
)

__all__ = ["convert"]

_ENTRY = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+?)\s*$")
_PORT = re.compile(r"\$\{?PORT\b")


def convert(source: Source, ctx: ImportContext) -> FileResult:
    """Every entry of the Procfile ``source`` (module docstring).

    Raises:
        ImportFailed: no entry, or an entry whose command cannot be split (the line).
    """
    result = FileResult()
    folder = None if source.label == "<stdin>" else os.path.dirname(os.path.abspath(source.path))
    for number, line in enumerate(source.text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENTRY.match(line)
        if match is None:
            result.unmapped.append((f"line {number}", "not a `name: command` entry"))
            continue
        original, text = match.groups()
        try:
            argv, shell = command_argv(text)
        except ImportFailed as exc:
            raise ImportFailed(f"line {number}: {exc}") from None
        unit = Converted(original=original, name=unit_name(original), table={})
        unit.table["description"] = f"{original} (Procfile)"
        unit.table["command"] = argv
        unit.map(f"{original}:", "command")
        if shell:
            unit.notes.append(f"runs through /bin/sh -c: the command {shell}")
        if _PORT.search(text):
            unit.notes.append(
                "the command reads $PORT, which foreman sets and hostvisor does not: "
                "set env.PORT (and port) in the unit"
            )
        if folder is not None:
            unit.table["workdir"] = folder
            unit.map("(the Procfile's folder)", "workdir")
            if os.path.isfile(os.path.join(folder, ".env")):
                unit.table["env_files"] = [f"-{os.path.join(folder, '.env')}"]
                unit.map("(the folder's .env, which foreman reads)", "env_files")
        if original == "release":
            unit.table["restart"] = "no"
            unit.notes.append(
                "release: runs once per deploy on Heroku: here a one-shot, run once when the "
                "daemon starts (`hostvisor start release` runs it again)"
            )
        else:
            unit.table["restart"] = "always"
        result.units.append(unit)
    if not result.units:
        raise ImportFailed("no `name: command` entry found")
    return result
