"""``hostvisor import KIND FILE...``: other tools' service files to ``units/<name>.toml``.

Each kind is a module of this package with one function::

    def convert(source: Source, ctx: ImportContext) -> FileResult

It parses ``source.text`` (never runs it), and returns the units it describes as plain
TOML tables (the keys of contract section 4), with every setting it mapped and every one
it could not map, with the reason: nothing is dropped silently. A file that cannot be
parsed, or that describes no service, raises :class:`ImportFailed` with a message naming
the line or key. :mod:`supervisor.cli_import` checks each table with the config loader
before it writes anything, so that ``hostvisor check`` passes on what it writes.

The kinds import their parsers (PyYAML, plistlib, configparser) inside ``convert``: the
daemon and ``status`` never load them.
"""

from __future__ import annotations

import getpass
import importlib
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from supervisor.cli_porting import KINDS

__all__ = [
    "KINDS",
    "MAX_COMMAND",
    "MAX_SOURCE_BYTES",
    "Converted",
    "FileResult",
    "ImportContext",
    "ImportFailed",
    "Source",
    "command_argv",
    "kind_module",
    "read_source",
    "unit_name",
]

#: The largest source file read (a ``pm2 jlist`` of a few hundred apps fits).
MAX_SOURCE_BYTES = 8 * 1024**2

#: The longest command line :func:`command_argv` splits (``MAX_ARG_STRLEN``, 128 KiB).
MAX_COMMAND = 128 * 1024
_NOT_NAME = re.compile(r"[^a-z0-9_.-]+")
_RESERVED = frozenset({"hostvisor"})


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class ImportFailed(Exception):
    """The file cannot be read or parsed, or describes no service; the message says where
    (a line number or a key) and what is wrong."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """One ``FILE`` argument: ``path`` as given (``-`` is standard input) and its text."""

    path: Path
    text: str
    #: The file's bytes, for a kind that reads binary files (its module sets ``BINARY = True``).
    data: bytes = b""

    @property
    def label(self) -> str:
        """How reports name the file: the path as given, or ``<stdin>``."""
        return "<stdin>" if str(self.path) == "-" else str(self.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportContext:
    """What a kind may need to resolve a source's references.

    Attributes:
        paths: every ``FILE`` of this import, so that a kind can pair files (a systemd
            ``.timer`` with its ``.service``).
        home: the home folder (systemd's ``%h``), from ``HOME``.
        user: the user name (``%u``).
        environ: the environment of the import (never copied into a unit unless the
            source sets the variable itself).
    """

    paths: tuple[Path, ...] = ()
    home: Path = field(default_factory=lambda: Path(os.path.expanduser("~")))
    user: str = field(default_factory=_user_name)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(slots=True, kw_only=True)
class Converted:
    """One unit a source describes.

    Attributes:
        original: the source's own name for it (a unit file name, a launchd ``Label``, a
            Compose service, a ``[program:x]``), shown beside ``name`` when they differ.
        name: the unit name, already valid (:func:`unit_name`); the CLI adds ``-2``,
            ``-3`` when two units of one import share it.
        table: the unit file's keys (contract section 4), TOML-serialisable.
        mapped: ``(source setting, unit key)`` for each setting carried over, e.g.
            ``("ExecStart=", "command")``.
        unmapped: ``(source setting with its value, reason)`` for each one not carried.
        notes: anything else the user must know (``run through /bin/sh -c: the line uses
            a pipe``).
    """

    original: str
    name: str
    table: dict[str, Any]
    mapped: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def map(self, setting: str, key: str) -> None:
        """Record that ``setting`` became ``key``."""
        self.mapped.append((setting, key))

    def skip(self, setting: str, reason: str) -> None:
        """Record that ``setting`` was not carried over, and why."""
        self.unmapped.append((setting, reason))


@dataclass(slots=True, kw_only=True)
class FileResult:
    """What one source file gave: its units, and what of the file itself (not of one unit)
    was not mapped (a Compose file's top-level ``networks``, a systemd ``.service`` taken
    with its ``.timer``)."""

    units: list[Converted] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class KindModule(Protocol):
    """The one function each ``supervisor.importers.<kind>`` module has."""

    def convert(self, source: Source, ctx: ImportContext) -> FileResult: ...


def kind_module(kind: str) -> ModuleType:
    """``supervisor.importers.<kind>`` for one of :data:`KINDS`.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    return importlib.import_module(f"supervisor.importers.{kind}")


def read_source(path: Path, *, binary: bool = False) -> Source:
    """The text of ``path`` (``-``: standard input), UTF-8, at most
    :data:`MAX_SOURCE_BYTES`; with ``binary``, its bytes too (``Source.data``), and text
    decoded with replacement characters rather than refused (a binary plist).

    Raises:
        ImportFailed: missing, not a regular file, too large, unreadable, or (unless
            ``binary``) not UTF-8.
    """
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_SOURCE_BYTES + 1)
        else:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
                raise ImportFailed("is not a regular file")
            with open(path, "rb") as stream:
                data = stream.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise ImportFailed(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise ImportFailed(f"is larger than {MAX_SOURCE_BYTES // 1024**2} MiB")
    if binary:
        return Source(path=path, text=data.decode("utf-8", "replace"), data=data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ImportFailed(f"line {line}: not UTF-8 text") from None
    return Source(path=path, text=text.removeprefix("\ufeff"))


_SHELL_ONLY = {
    "|": "a pipe '|'", "&": "a background '&'", ";": "';'", "<": "a redirection '<'",
    ">": "a redirection '>'", "(": "a subshell '('", ")": "a subshell ')'",
    "$": "an expansion '$'", "`": "a command substitution '`'", "*": "a glob '*'",
    "?": "a glob '?'", "[": "a glob '['", "{": "braces '{'", "}": "braces '}'",
    "~": "a home '~'", "\n": "several lines",
}  # fmt: skip


def command_argv(text: str) -> tuple[list[str], str | None]:
    """A command line of a source file (a Procfile entry, a crontab command) as argv, split
    like a POSIX shell would (:func:`shlex.split`), but never run by a shell unless it needs
    one: then ``["/bin/sh", "-c", text]`` and the reason (``"uses a pipe '|'"``), which the
    caller reports. Shell syntax is looked for outside quotes (``$`` and backquotes inside
    double quotes too), as ``sh(1)`` reads it.

    Raises:
        ImportFailed: unbalanced quotes, an empty command, or one longer than
            :data:`MAX_COMMAND` characters (Linux's limit on one argument,
            ``MAX_ARG_STRLEN``; :func:`shlex.split` takes quadratic time on longer lines).
    """
    if len(text) > MAX_COMMAND:
        raise ImportFailed(f"a command of {len(text):,} characters; at most {MAX_COMMAND:,}")
    quote = ""
    escaped = False
    start_of_word = True
    for i, char in enumerate(text):
        if escaped:
            escaped, start_of_word = False, False
            continue
        if char == "\\" and quote != "'":
            escaped = True
            continue
        if quote:
            if char == quote:
                quote = ""
            elif quote == '"' and char in "$`":
                return ["/bin/sh", "-c", text], f"uses {_SHELL_ONLY[char]}"
            continue
        if char in "'\"":
            quote, start_of_word = char, False
        elif char in "|&" and text[i + 1 : i + 2] == char:
            return ["/bin/sh", "-c", text], f"uses '{char * 2}'"
        elif (char in _SHELL_ONLY and char != "~") or (char in "#~" and start_of_word):
            why = _SHELL_ONLY.get(char, "a comment '#'")
            return ["/bin/sh", "-c", text], f"uses {why}"
        else:
            start_of_word = char in " \t"
    import shlex

    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ImportFailed(f"cannot split the command {text!r}: {exc}") from None
    if not argv:
        raise ImportFailed("empty command")
    if "=" in argv[0] and not argv[0].startswith("="):
        return ["/bin/sh", "-c", text], "starts with a variable assignment"
    return argv, None


def unit_name(original: str) -> str:
    """A valid unit name (``[a-z0-9][a-z0-9_.-]{0,62}``, contract section 4) for a source's
    name: lower case, each run of other characters one ``-``, at most 63 characters;
    ``hostvisor`` (reserved) becomes ``hostvisor-unit``, an empty result ``unit``.

    >>> unit_name("llama-server@coder")
    'llama-server-coder'
    >>> unit_name("My App (prod)")
    'my-app-prod'
    """
    name = _NOT_NAME.sub("-", original.strip().lower())
    name = name.lstrip("-_.").rstrip("-")[:63].rstrip("-")
    if not name:
        return "unit"
    return f"{name}-unit" if name in _RESERVED else name
