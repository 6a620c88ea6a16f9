"""The INI syntax of a supervisord.conf, for ``hostvisor import supervisord``.

- :func:`parse`: the file as supervisord reads it (:mod:`configparser`, raw, ``;`` and
  ``#`` inline comments, ``strict=False``: a repeated section or key merges, the last
  value of a key wins, as in supervisor/options.py's ``UnhosedConfigParser``).
- :func:`duplicates`: what that merge drops without a word, for the report: each
  section given twice and each earlier value of a key given again.
- :func:`environment`: an ``environment=`` value's ``KEY=value`` pairs.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from supervisor.importers import ImportFailed

__all__ = ["duplicates", "environment", "parse"]

_SECTION = re.compile(r"\[(?P<name>[^\]]+)\]")
_KEY = re.compile(r"(?P<key>[^=:\s][^=:]*?)\s*[=:]\s*(?P<value>.*)")


def parse(text: str, label: str) -> Any:
    """A ``configparser.RawConfigParser`` of ``text`` (module docstring).

    Raises:
        ImportFailed: not an INI file (the line and configparser's reason).
    """
    import configparser

    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False)
    try:
        parser.read_string(text, source=label)
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        first = str(exc).splitlines()[0]
        raise ImportFailed(f"line {line}: {first}" if line else first) from None
    return parser


def duplicates(text: str) -> list[tuple[str, str]]:
    """``(setting, why)`` for each section header given again and each key's earlier
    value that a later one replaces (keys compared lower-cased, as configparser does).

    Returns:
        Report rows for ``FileResult.unmapped``, in file order.
    """
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    keys: dict[tuple[str, str], tuple[int, str]] = {}
    section: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip()[:1] in (";", "#") or line[:1].isspace():
            continue  # blank, comment or a continuation line
        if match := _SECTION.match(line):
            section = match["name"].strip()
            if section in seen:
                rows.append((
                    f"duplicate [{section}] (line {number}; first on line {seen[section]})",
                    "supervisord merges the two: each key keeps its last value",
                ))  # fmt: skip
            seen.setdefault(section, number)
            continue
        match = _KEY.match(line)
        if match is None or section is None:
            continue  # configparser refuses these; parse() reports it
        key = match["key"].strip().lower()
        value = re.split(r"\s[;#]", match["value"], maxsplit=1)[0].strip()
        if (section, key) in keys:
            first, old = keys[(section, key)]
            rows.append((
                f"[{section}] {key}={old} (line {first})",
                f"{key}= is given again on line {number}: supervisord keeps the last value",
            ))  # fmt: skip
        keys[(section, key)] = (number, value)
    return rows


def environment(text: str) -> dict[str, str]:
    """``KEY="val",KEY2=val2`` as supervisord's ``dict_of_key_value_pairs`` reads it.

    Raises:
        ImportFailed: what supervisord refuses, and a pair it would drop silently.
    """
    lexer = shlex.shlex(text, posix=True)
    lexer.wordchars += "/.+-():"
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise ImportFailed(f"environment {text!r}: {exc}") from None
    env: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        triple = tokens[i : i + 3]
        if len(triple) != 3 or triple[1] != "=":
            raise ImportFailed(
                f"environment {text!r}: unexpected end of KEY=value pairs "
                "(supervisord refuses it too; quote values with spaces or "
                "other characters)"
            )
        env[triple[0]] = triple[2]
        if i + 3 < len(tokens) and tokens[i + 3] != ",":
            raise ImportFailed(
                f"environment {text!r}: {tokens[i + 3]!r} follows {triple[0]}={triple[2]} "
                "where a ',' belongs (supervisord drops it silently): quote the value"
            )
        i += 4
    return env
