"""Reading config.toml, unit and env files: bytes from disk to TOML tables and variables.

The file-reading half of :mod:`supervisor.config` (split for size, STYLE rule
12). :func:`read_file` reads one file without ever hanging on a FIFO;
:func:`read_toml` and :func:`read_env_files` turn whatever is wrong with a
file (missing, unsafe, unreadable, not UTF-8, not TOML) into ``file: key:
message`` issues; :func:`read_env_file` and :func:`parse_env_file` read one
env file.

Conventions:

- Config, unit and env files are regular files of at most
  :data:`~supervisor.config_values.MAX_FILE_SIZE` bytes (1 MiB; links followed),
  not group/world-writable, owned by the daemon's user or root.
- Env files follow docker's ``--env-file`` and python-dotenv: ``KEY=VALUE``,
  ``#`` comments, optional ``export``, ``"..."`` with escapes, ``'...'`` literal.
  python-dotenv's own parser is not used (see :mod:`supervisor.config_values`).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from supervisor.config_values import _NUL, MAX_FILE_SIZE, TableReader
from supervisor.errors import ConfigError, ConfigIssue

__all__ = ["parse_env_file", "read_env_file", "read_env_files", "read_file", "read_toml"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---------------------------------------------------------------------------- files


def read_file(path: Path, *, limit: int = MAX_FILE_SIZE) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most ``limit`` bytes, and its ``fstat`` (links followed).

    Opened with ``O_NONBLOCK``, so that a FIFO in place of a file cannot hang the loader.

    Raises:
        OSError: it cannot be opened or read (``ENOENT``, ``EACCES``,
            ``ELOOP`` ...), it is not a regular file (``EINVAL``, with a
            ``strerror`` naming what it is), or it is larger than ``limit``
            (``EFBIG``). ``strerror`` is always set.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except ValueError:  # a NUL in the path: the OS could not even be asked
        raise OSError(errno.EINVAL, "the path contains a NUL character") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
            raise OSError(errno.EINVAL, f"not a regular file ({kind})")
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return b"".join(chunks), info
    finally:
        os.close(fd)


def read_env_file(path: Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines (the docker/systemd/dotenv env-file convention).

    :func:`read_file` then :func:`parse_env_file`.

    Raises:
        OSError: the file cannot be read (see :func:`read_file`).
        ConfigError: see :func:`parse_env_file`.
    """
    return parse_env_file(read_file(path)[0], path)


def parse_env_file(data: bytes, path: Path) -> dict[str, str]:
    """Parse the ``KEY=VALUE`` lines of an env file's bytes.

    Blank lines and lines starting with ``#`` are skipped; ``export KEY=VALUE``
    is accepted. A value in ``"..."`` understands ``\\\\ \\" \\n \\t \\$``; one
    in ``'...'`` is literal; an unquoted value is stripped and loses a trailing
    `` # comment``. Nothing is expanded. ``path`` is for messages.

    Returns:
        The variables, in file order (a later line wins).

    Raises:
        ConfigError: not UTF-8, or some lines are malformed or hold a NUL
            (one issue per line, keyed ``line N``; values are never echoed).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(str(path), "", f"not UTF-8 text (byte {exc.start})")]
        ) from None
    result: dict[str, str] = {}
    issues: list[ConfigIssue] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            parsed = _parse_env_line(line)
        except ValueError as exc:
            issues.append(ConfigIssue(str(path), f"line {lineno}", str(exc)))
            continue
        if parsed is not None:
            result[parsed[0]] = parsed[1]
    if issues:
        raise ConfigError(issues)
    return result


def _parse_env_line(line: str) -> tuple[str, str] | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if "\0" in stripped:
        raise ValueError(_NUL)
    if stripped.startswith("export ") or stripped.startswith("export\t"):
        stripped = stripped[7:].lstrip()
    key, sep, raw = stripped.partition("=")
    key = key.strip()
    if not sep or not _ENV_NAME.fullmatch(key):
        raise ValueError("expected KEY=VALUE with KEY made of letters, digits and _")
    raw = raw.strip()
    if raw[:1] not in ("'", '"'):
        return key, re.split(r"\s+#", raw, maxsplit=1)[0].rstrip()
    quote, value, index, escapes = raw[0], [], 1, {"n": "\n", "t": "\t"}
    while index < len(raw) and raw[index] != quote:
        char = raw[index]
        if quote == '"' and char == "\\" and index + 1 < len(raw):
            index += 1
            char = escapes.get(raw[index], raw[index])
        value.append(char)
        index += 1
    if index >= len(raw):
        raise ValueError(f"unterminated {quote} quote")
    rest = raw[index + 1 :].strip()
    if rest and not rest.startswith("#"):
        raise ValueError("unexpected text after the closing quote")  # never echo a secret
    return key, "".join(value)


# ---------------------------------------------------------------------------- for config.load


def read_toml(path: Path, issues: list[ConfigIssue], *, missing: str = "") -> dict[str, Any] | None:
    """The parsed file, or ``None`` (with an issue) when missing, unsafe, unreadable or not TOML.

    ``missing`` replaces the message for a file that does not exist.
    """
    try:
        data, info = read_file(path)
    except OSError as exc:
        lost = exc.errno == errno.ENOENT and missing
        issues.append(ConfigIssue(str(path), "", lost or f"cannot read: {exc.strerror or exc}"))
        return None
    if problem := _unsafe(info, path):
        issues.append(ConfigIssue(str(path), "", problem))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.append(ConfigIssue(str(path), "", f"not UTF-8 text (byte {exc.start})"))
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"line (\d+)", str(exc))
        key = f"line {where.group(1)}" if where else ""
        issues.append(ConfigIssue(str(path), key, f"invalid TOML: {exc}"))
    except ValueError as exc:  # Python's limit on int digits (4300), past tomllib's own checks
        issues.append(_huge_integer(text, path, exc))
    except RecursionError:
        deep = "arrays or tables nested too deeply for tomllib; no key needs more than 2 levels"
        issues.append(ConfigIssue(str(path), _deep_line(text), deep))
    return None


def _huge_integer(text: str, path: Path, exc: ValueError) -> ConfigIssue:
    """The issue for an integer of more than 4300 digits: its dotted key if plain, its line."""
    digits = re.search(r"[0-9_]{4301,}", text)
    if digits is None:
        return ConfigIssue(str(path), "", f"invalid TOML: {exc}")
    begin = text.rfind("\n", 0, digits.start()) + 1
    line = text.count("\n", 0, begin) + 1
    name = re.fullmatch(r"[ \t]*([\w.-]+)[ \t]*=[ \t]*[+-]?", text[begin : digits.start()])
    table = re.findall(r"(?m)^[ \t]*\[+[ \t]*([\w.-]+)[ \t]*\]", text[:begin])
    key = ".".join([*table[-1:], name.group(1)]) if name else f"line {line}"
    return ConfigIssue(str(path), key, (
        f"an integer of {len(digits.group())} digits (line {line}); no key takes one that large: "
        "ports are 1-65535, counts at most 1000000, sizes at most 1 TiB"))  # fmt: skip


def _deep_line(text: str) -> str:
    """``line N`` where ``[`` and ``{`` first nest 100 deep (strings are not skipped)."""
    depth = itertools.accumulate(int(c in "[{") - int(c in "]}") for c in text)
    at = next((i for i, d in enumerate(depth) if d > 100), None)
    return "" if at is None else f"line {text.count(chr(10), 0, at) + 1}"


def _unsafe(info: os.stat_result, path: Path) -> str | None:
    """Why the file ``info`` describes must not be trusted (others can write it), or ``None``."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        return f"file is group/world-writable (mode {mode:04o}); run chmod go-w {path}"
    if info.st_uid not in (os.geteuid(), 0):
        return (
            f"file is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}) "
            f"or root; run chown {os.geteuid()} {path}"
        )
    return None


def read_env_files(
    files: Iterable[str],
    unit: TableReader,
    *,
    key: str,
    resolve: Callable[[str], Path],
    issues: list[ConfigIssue],
) -> dict[str, str]:
    """``env_files`` (or ``secret_env_files``, named by ``key``) merged in order.

    A leading ``-`` marks a file that may be missing. ``resolve`` makes a path
    of an entry (``~``, ``$VARS``, relative to the config folder). A problem
    with the key goes to ``unit``; one in a file goes to ``issues``, against
    the file (``supervisor.config.load`` deduplicates them: files are read
    again for each unit, they are small).
    """
    env: dict[str, str] = {}
    for raw in files:
        optional = raw.startswith("-")
        path = resolve(raw[1:] if optional else raw)
        try:
            data, info = read_file(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                if not optional:
                    unit.fail(key, f"env file {path} not found (prefix it with - if optional)")
            else:
                unit.fail(key, f"cannot read env file {path}: {exc.strerror or exc}")
            continue
        if problem := _unsafe(info, path):
            issues.append(ConfigIssue(str(path), "", problem))
            continue
        try:
            env.update(parse_env_file(data, path))
        except ConfigError as exc:
            issues.extend(exc.issues)
    return env
