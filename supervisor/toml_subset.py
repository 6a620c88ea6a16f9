"""A strict reader of the simple TOML that config files hold (issue 14).

``hostvisor status`` reads ``[daemon] socket`` from the config file to find the
daemon; importing tomllib costs ~6 ms of a command whose whole budget is 30 ms.
:func:`simple_toml` reads a subset of TOML with a few regular expressions (``re`` is
loaded by ``json`` anyway) and says None for anything outside it, and the caller
then asks tomllib: so the answer is always tomllib's, errors included
(``tests/test_cli_status.py`` holds it to that on generated documents).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # no runtime import of typing: the status fast path counts milliseconds
    from typing import Any

__all__ = ["simple_toml"]


class _Unsure(Exception):
    """Outside the TOML subset :func:`simple_toml` reads: tomllib decides."""


_TOML: Any = None


def _toml_patterns() -> Any:
    """The subset's tokens, compiled on first use (``re`` is loaded by ``json`` anyway)."""
    global _TOML
    if _TOML is None:
        import re

        _TOML = {
            "ws": re.compile(r"[ \t]*"),
            "key": re.compile(r"[A-Za-z0-9_-]+"),
            "basic": re.compile(r'"[^"\\\x00-\x08\x0a-\x1f\x7f]*"'),
            "literal": re.compile(r"'[^'\x00-\x08\x0a-\x1f\x7f]*'"),
            # Decimal only: no sign "+", no "_", no exponent, no leading zero (tomllib's
            # own errors and the rarer forms are left to it).
            "number": re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?(?![0-9A-Za-z_.:+-])"),
            "word": re.compile(r"(?:true|false)(?![0-9A-Za-z_-])"),
            "end": re.compile(r"[ \t]*(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?"),
        }
    return _TOML


def _toml_value(line: str, pos: int, depth: int = 0) -> tuple[Any, int]:
    """The value at ``line[pos:]`` and the index after it; _Unsure outside the subset."""
    t = _toml_patterns()
    if depth > 16:
        raise _Unsure
    first = line[pos : pos + 1]
    if first in ('"', "'"):
        match = t["basic" if first == '"' else "literal"].match(line, pos)
        if match is None or line.startswith(first * 3, pos):
            raise _Unsure  # escapes, multi-line strings, a quote left open
        return match.group()[1:-1], match.end()
    if first in ("[", "{"):
        close, pos = ("]" if first == "[" else "}"), pos + 1
        items: list[Any] = []
        table: dict[str, Any] = {}
        while True:
            pos = t["ws"].match(line, pos).end()
            if line.startswith(close, pos) and (first == "[" or not table):
                return (items if first == "[" else table), pos + 1
            if first == "[":
                value, pos = _toml_value(line, pos, depth + 1)
                items.append(value)
            else:
                key = t["key"].match(line, pos)
                if key is None or key.group() in table:
                    raise _Unsure
                pos = t["ws"].match(line, key.end()).end()
                if not line.startswith("=", pos):
                    raise _Unsure
                pos = t["ws"].match(line, pos + 1).end()
                table[key.group()], pos = _toml_value(line, pos, depth + 1)
            pos = t["ws"].match(line, pos).end()
            if line.startswith(",", pos):
                pos += 1
                if first == "{":  # a trailing comma is an error in an inline table
                    pos = t["ws"].match(line, pos).end()
                    if line.startswith("}", pos):
                        raise _Unsure
            elif line.startswith(close, pos):
                return (items if first == "[" else table), pos + 1
            else:
                raise _Unsure
    match = t["word"].match(line, pos)
    if match is not None:
        return match.group() == "true", match.end()
    match = t["number"].match(line, pos)
    if match is None:
        raise _Unsure
    text = match.group()
    return (float(text) if match.group(1) else int(text)), match.end()


def simple_toml(data: bytes) -> dict[str, Any] | None:
    """``tomllib.loads(data.decode())`` for the simple TOML config files hold, or None
    when ``data`` uses anything else (tomllib then decides, errors included).

    Understood: ASCII, ``\\n`` line ends, comments, ``[table]`` headers with bare keys
    (each table once), and ``key = value`` lines with a bare key (once per table; none
    named like a table) whose value is a string without escapes, ``true``, ``false``,
    a decimal integer or float, or an array or inline table of those on one line.
    The example ``config.toml`` and the bench's are read in ~0.1 ms.
    """
    if not data.isascii() or b"\r" in data:
        return None
    t = _toml_patterns()
    root: dict[str, Any] = {}
    table = root
    try:
        for line in data.decode("ascii").split("\n"):
            pos = t["ws"].match(line).end()
            if line.startswith("[", pos):
                pos = t["ws"].match(line, pos + 1).end()
                name = t["key"].match(line, pos)
                if name is None or name.group() in root:
                    return None  # [[array]], [a.b], a second [name] or a key named so
                pos = t["ws"].match(line, name.end()).end()
                if not line.startswith("]", pos):
                    return None
                table = root[name.group()] = {}
                pos += 1
            elif (key := t["key"].match(line, pos)) is not None:
                pos = t["ws"].match(line, key.end()).end()
                if not line.startswith("=", pos) or key.group() in table:
                    return None
                pos = t["ws"].match(line, pos + 1).end()
                table[key.group()], pos = _toml_value(line, pos)
            if t["end"].fullmatch(line, pos) is None:
                return None
    except _Unsure:
        return None
    return root
