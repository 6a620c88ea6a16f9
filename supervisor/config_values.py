"""Every value parser of the config files: durations, sizes, signals, argv, typed keys, tables.

(Named ``durations.py`` until issue 14: it always held every value parser.)

Each converter takes a value as :mod:`tomllib` produced it and returns what
the specs hold (float seconds, int bytes, int signal number, argv tuple), or
raises :class:`ValueError` whose message says what is expected; the loader in
:mod:`supervisor.config` turns that message into a ``file: key: message`` issue.
:class:`TableReader` applies converters to the keys of one table and records
every problem in an :class:`IssueSink`. Reading the files themselves (env files
too) is :mod:`supervisor.configfiles`.

Conventions:

- Durations follow Go's ``time.ParseDuration`` and systemd's time spans:
  ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"``, ``"1.5s"`` and sums
  like ``"1m30s"``; a bare number is seconds.
- Sizes use IEC binary prefixes for ``KiB``/``MiB``/``GiB``/``TiB`` (1024) and
  SI decimal prefixes for ``KB``/``MB``/``GB``/``TB`` (1000), as systemd and
  Docker do; a bare integer is bytes.
- Signals are named as ``kill -l`` does, with or without ``SIG``, or by number.

Bounds (issue 9: what ``check`` accepts must run): durations <= 365 days (far
inside what float seconds on anyio's clock can add), sizes <= 1 TiB, counts <=
1,000,000; never inf or NaN; no NUL in a string (no path, argument or env value
can hold one); files read are regular files of at most 1 MiB.

Env files (:func:`supervisor.configfiles.parse_env_file`) keep their own
parser rather than python-dotenv's ``parse_stream`` (issue 14), because
dotenv's semantics differ from the contract's in ways a user would see:
dotenv logs a warning for a malformed line and skips it, where hostvisor
refuses the file with ``file: line N: message`` and keeps the running
services on the old values; a bare ``KEY`` line is a variable with no value
(None) for dotenv and an error here; a quoted value may run over several lines
in dotenv, so one missing quote swallows the rest of the file silently; and
``dotenv_values`` expands ``${VAR}`` unless told not to, where the contract
expands nothing. Keeping the 40-line parser also keeps a dependency and its
import out of the daemon.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import signal
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from supervisor.errors import ConfigIssue
from supervisor.states import DependencyCondition

__all__ = [
    "MAX_COUNT", "MAX_DURATION", "MAX_FILE_SIZE", "MAX_ISSUES", "MAX_SIZE", "MORE_ISSUES",
    "IssueSink", "Key", "TableReader", "argv", "boolean", "choice", "depends_on",
    "describe_value", "env_table", "host_port", "http_method", "http_url", "integer", "list_of",
    "nonempty", "number", "parse_duration", "parse_signal", "parse_size",
    "positive_duration", "string",
]  # fmt: skip

T = TypeVar("T")
D = TypeVar("D")
#: A dotted key as a tuple: ``("health", "interval")``.
Key = tuple[str, ...]
#: The longest duration any key accepts: 365 days, in seconds.
MAX_DURATION = 365 * 86400.0
#: The largest size any key accepts: 1 TiB, in bytes.
MAX_SIZE = 1024**4
#: The largest count any key accepts (thresholds, give_up_after).
MAX_COUNT = 1_000_000
#: The largest config.toml, unit or env file read, in bytes (1 MiB).
MAX_FILE_SIZE = 1024**2
#: Issues kept by one load; then one "more issues" line (a reload's answer stays small).
MAX_ISSUES = 100
MORE_ISSUES = ConfigIssue("...", "", f"more issues not shown (the first {MAX_ISSUES} are)")
_NUL = "must not contain a NUL character (\\u0000); remove it"
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)\s*")
_DURATION_HINT = 'expected a duration like "30s", "250ms", "5m", "1h" or a number of seconds'

_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]+)\s*")
_SIGNAL_HINT = 'expected a signal name like "SIGTERM" or a number'
_SIZE_HINT = 'expected a size like "10MiB", "500KB", "512B" or a number of bytes'


def parse_duration(value: object) -> float:
    """Parse a duration into seconds.

    Args:
        value: a string with units (``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``,
            ``"1d"``, ``"1m30s"``) or an int/float number of seconds.

    Returns:
        Seconds, a finite float in ``[0, MAX_DURATION]`` (365 days).

    Raises:
        ValueError: not a duration, negative, over 365 days, or not finite;
            the message says what is expected.
    """
    if isinstance(value, bool):
        raise ValueError(f"{_DURATION_HINT}, got {describe_value(value)}")
    if isinstance(value, int) and value > MAX_DURATION:  # float() of a huge int overflows
        seconds = math.inf
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_from_text(value)
    else:
        raise ValueError(f"{_DURATION_HINT}, got {describe_value(value)}")
    if math.isnan(seconds) or (seconds == math.inf and isinstance(value, float)):
        raise ValueError(f"{_DURATION_HINT}, got {describe_value(value)}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {describe_value(value)}")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most 365d (a year), got {describe_value(value)}")
    return seconds


def _duration_from_text(text: str) -> float:
    stripped = text.strip()
    if stripped.startswith("-") and _DURATION_PART.fullmatch(stripped[1:]):
        raise ValueError(f"must not be negative, got {describe_value(text)}")
    position, total = 0, 0.0
    while position < len(stripped):
        match = _DURATION_PART.match(stripped, position)
        if match is None or match.end() == position:
            raise ValueError(f"{_DURATION_HINT}, got {describe_value(text)}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not stripped:
        raise ValueError(f"{_DURATION_HINT}, got {describe_value(text)}")
    return total


def parse_size(value: object) -> int:
    """Parse a size into bytes.

    Args:
        value: a string with a unit (``"512B"``, ``"500KB"`` = 500,000,
            ``"10MiB"`` = 10 * 1024**2, ``"1.5GiB"``; units are
            case-insensitive) or an int number of bytes.

    Returns:
        Bytes, an int in ``[0, MAX_SIZE]`` (1 TiB; fractions are rounded to
        the nearest byte).

    Raises:
        ValueError: not a size, negative, or over 1 TiB.
    """
    if isinstance(value, bool):
        raise ValueError(f"{_SIZE_HINT}, got {describe_value(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {describe_value(value)}")
        size: float = value
    elif not isinstance(value, str):
        raise ValueError(f"{_SIZE_HINT}, got {describe_value(value)}")
    elif value.strip().startswith("-"):
        raise ValueError(f"must not be negative, got {describe_value(value)}")
    elif (match := _SIZE.fullmatch(value)) is None or match[2].lower() not in _SIZE_UNITS:
        raise ValueError(f"{_SIZE_HINT}, got {describe_value(value)}")
    else:
        size = min(float(match[1]) * _SIZE_UNITS[match[2].lower()], MAX_SIZE + 1)
    if size > MAX_SIZE:
        raise ValueError(f'must be at most 1 TiB ("1TiB"), got {describe_value(value)}')
    return round(size)


def parse_signal(value: object) -> int:
    """Parse a signal name or number.

    Args:
        value: ``"SIGTERM"``, ``"TERM"``, ``"sigint"``, or a number such as 15.

    Returns:
        The signal number, valid on this platform.

    Raises:
        ValueError: not a signal this platform knows.
    """
    if isinstance(value, bool):
        raise ValueError(f"{_SIGNAL_HINT}, got {describe_value(value)}")
    if isinstance(value, int):
        try:
            return int(signal.Signals(value))
        except ValueError:
            raise ValueError(f"unknown signal number {describe_value(value)}") from None
    if not isinstance(value, str):
        raise ValueError(f"{_SIGNAL_HINT}, got {describe_value(value)}")
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {describe_value(value)} ({_SIGNAL_HINT})") from None


def describe_value(value: object) -> str:
    """A value as TOML would show it, for messages: ``"30 sec"``, ``1``, ``true``, ``a list``.

    Strings and numbers longer than 60 characters are cut with ``...``.
    """
    if isinstance(value, str):
        text = json.dumps(value[:61], ensure_ascii=False)
        return text if len(value) <= 60 else f'{text[:-2]}..."'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) >= 10**60:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value}"


# ---------------------------------------------------------------------------- typed keys


def string(value: object) -> str:
    """A TOML string without NUL characters (no path, argument or env value can hold one)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe_value(value)}")
    if "\0" in value:
        raise ValueError(_NUL)
    return value


def nonempty(value: object) -> str:
    """A string with more than whitespace in it."""
    if not string(value).strip():
        raise ValueError("must not be empty")
    return cast(str, value)


def boolean(value: object) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {describe_value(value)}")
    return value


def integer(low: int, high: int = MAX_COUNT) -> Callable[[object], int]:
    """A converter for an integer in ``[low, high]`` (``high`` defaults to :data:`MAX_COUNT`)."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {describe_value(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {describe_value(value)}")
        return value

    return convert


def number(low: float, high: float) -> Callable[[object], float]:
    """A converter for a finite number in ``[low, high]`` (an int or a float), as a float."""

    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {describe_value(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {describe_value(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {describe_value(value)}")
        return float(value)

    return convert


def positive_duration(value: object) -> float:
    """A duration (:func:`parse_duration`) of more than 0 seconds."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0, got {describe_value(value)}")
    return seconds


def choice(*options: str) -> Callable[[object], str]:
    """A converter for a string that must be one of ``options``."""

    def convert(value: object) -> str:
        if string(value) not in options:
            expected = " | ".join(f'"{o}"' for o in options)
            raise ValueError(f"expected {expected}, got {describe_value(value)}")
        return cast(str, value)

    return convert


def list_of(item: Callable[[object], T], what: str) -> Callable[[object], tuple[T, ...]]:
    """A converter for a list whose items ``item`` converts; ``what`` names them in messages."""

    def convert(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {what}, got {describe_value(value)}")
        try:
            return tuple(item(v) for v in value)
        except ValueError as exc:
            raise ValueError(f"expected a list of {what}: {exc}") from None

    return convert


def argv(value: object) -> tuple[str, ...]:
    """An argv: a string split with :func:`shlex.split` (never run by a shell), or a list.

    The list must hold strings and name a program; later arguments may be empty.
    """
    if isinstance(value, str):
        try:
            argv = tuple(shlex.split(value))
        except ValueError as exc:
            raise ValueError(f"cannot split the command like a shell would: {exc}") from None
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        argv = tuple(value)
    else:
        raise ValueError(f"expected a string or a list of strings, got {describe_value(value)}")
    if not argv or not argv[0]:
        raise ValueError("must name a program (an empty command)")
    if any("\0" in arg for arg in argv):
        raise ValueError(_NUL)
    return argv


def http_url(value: object) -> str:
    """An ``http://`` or ``https://`` URL with a host, and a port in 1-65535 if it has one."""
    text = string(value)
    try:
        parts = urlsplit(text)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        valid = valid and parts.port != 0  # .port raises on "Port out of range"
    except ValueError as exc:  # "Invalid IPv6 URL", "Port could not be cast" ...
        valid, why = False, f" ({exc})"
    else:
        why = ""
    if not valid:
        raise ValueError(f"expected an http:// or https:// URL{why}, got {describe_value(text)}")
    return text


def host_port(value: object) -> str:
    """``host:port`` (``[::1]:6379`` for IPv6) with a port in 1-65535."""
    host, sep, port = string(value).rpartition(":")
    if (
        not sep
        or not host.strip("[]")
        or not re.fullmatch("[0-9]{1,5}", port)
        or not (0 < int(port) < 65536)
    ):
        raise ValueError(f'expected "host:port" with a port 1-65535, got {describe_value(value)}')
    return cast(str, value)


def http_method(value: object) -> str:
    """An HTTP method, uppercased (``"put"`` -> ``"PUT"``)."""
    method = string(value).upper()
    if not re.fullmatch(r"[A-Z]+", method):
        hint = 'expected an HTTP method like "GET" or "PUT"'
        raise ValueError(f"{hint}, got {describe_value(value)}")
    return method


def env_table(value: object) -> dict[str, str]:
    """The ``env`` table: names to strings; numbers are accepted and written as strings."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of NAME = value, got {describe_value(value)}")
    result: dict[str, str] = {}
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            shown = describe_value(name)
            raise ValueError(f'invalid variable name {shown} (not empty, no "=", no NUL)')
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ValueError(f"{name}: expected a string or a number, got {describe_value(item)}")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{name}: expected a finite number, got {describe_value(item)}")
        if isinstance(item, str) and "\0" in item:
            raise ValueError(f"{name}: {_NUL}")  # never echo the value: it may be a secret
        result[name] = str(item)
    return result


def depends_on(value: object) -> dict[str, DependencyCondition]:
    """A list of names (condition ``started``) or a table of name -> ``started``,
    ``healthy`` or ``completed`` (compose's conditions)."""
    if isinstance(value, list):
        names = list_of(nonempty, "service names")(value)
        return dict.fromkeys(names, DependencyCondition.STARTED)
    if isinstance(value, dict):
        condition = choice("started", "healthy", "completed")
        result: dict[str, DependencyCondition] = {}
        for name, item in value.items():
            try:
                result[nonempty(name)] = DependencyCondition(condition(item))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return result
    raise ValueError(
        'expected a list of names or a table like { db = "healthy" }, '
        f"got {describe_value(value)}"
    )


# ---------------------------------------------------------------------------- tables


@dataclass
class IssueSink:
    """Collects the issues of one file into a shared list.

    Attributes:
        issues: the list shared by every file of one load.
        file: the path printed before each issue.
        inherited: keys (as tuples, ``("health", "interval")``) that came from
            config.toml's ``[defaults]``: an issue under one of them is reported
            against ``defaults_file`` as ``defaults.<key>``.
        count: issues added through this sink, kept or not: an issue already
            in ``issues`` is not added again, and past :data:`MAX_ISSUES` only
            :data:`MORE_ISSUES` is.
    """

    issues: list[ConfigIssue]
    file: str
    inherited: set[Key] = field(default_factory=set)
    defaults_file: str = ""
    count: int = 0

    def add(self, key: Key, message: str) -> None:
        """Record ``message`` about ``key`` (``()`` for the whole file)."""
        if any(key[:i] in self.inherited for i in range(1, len(key) + 1)):
            issue = ConfigIssue(self.defaults_file, ".".join(("defaults", *key)), message)
        else:
            issue = ConfigIssue(self.file, ".".join(key), message)
        self.count += 1
        if not self.full and issue not in self.issues:
            self.issues.append(issue if len(self.issues) < MAX_ISSUES else MORE_ISSUES)

    @property
    def full(self) -> bool:
        """Whether no more issues are kept (what they say need not be worked out)."""
        return len(self.issues) > MAX_ISSUES


class TableReader:
    """Typed reads from one TOML table at ``path``; each bad key becomes an issue.

    Unknown keys (not in ``known``) are reported on construction, with a
    did-you-mean from :func:`difflib.get_close_matches`.
    """

    def __init__(self, sink: IssueSink, data: Mapping[str, Any], path: Key, known: Collection[str]):
        self.sink, self.data, self.path = sink, data, path
        for key in data:
            if key not in known:
                sink.add((*path, key), "" if sink.full else _unknown_key(key, known))

    def get(self, key: str, convert: Callable[[Any], T], default: D) -> T | D:
        """The converted value, or ``default`` when absent or invalid (an issue is added)."""
        if key not in self.data:
            return default
        try:
            return convert(self.data[key])
        except ValueError as exc:
            self.sink.add((*self.path, key), str(exc))
            return default

    def sub(self, key: str, known: Collection[str]) -> TableReader | None:
        """The nested table ``key``, or ``None`` when absent or not a table."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, dict):
            self.sink.add((*self.path, key), f"expected a table, got {describe_value(value)}")
            return None
        return TableReader(self.sink, value, (*self.path, key), known)

    def fail(self, key: str, message: str) -> None:
        """Record a problem with ``key`` of this table (``""``: the table itself)."""
        self.sink.add((*self.path, key) if key else self.path, message)


def _unknown_key(key: str, known: Collection[str]) -> str:
    import difflib  # only for a mistake's message

    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f'unknown key (did you mean "{close[0]}"?)'
    return f"unknown key (expected one of: {', '.join(sorted(known))})"
