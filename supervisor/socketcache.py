"""``[daemon] socket`` of a config file, for the clients, remembered across runs (issue 14).

``hostvisor status -c CONFIG`` must read the config to find the control socket, and
importing :mod:`tomllib` (with ``typing``, ``string``, ``datetime``) costs about as much
as starting the interpreter. Reading the file is cheap; parsing it is not. So
:func:`configured_socket` reads the config on every run and parses it with tomllib only
when its bytes differ from the ones it parsed last time: each answer is remembered in
``$XDG_CACHE_HOME/hostvisor/sockets.json`` (``~/.cache``; ``~/Library/Caches`` on
macOS) together with the exact bytes it came from, keyed by the config's absolute path.
The answer is a function of those bytes alone (``~`` and ``$VARS`` are expanded at each
use), so a hit is the parse's own answer whatever the file's timestamps, clocks or
file system say. A config over :data:`MAX_CONFIG` bytes is parsed on every run.

The cache is an optimisation only: a missing, unreadable, corrupt, oversized,
non-regular or unwritable cache file means a parse, never an error and never a different
answer. A cache folder or file that is not the user's own (``geteuid()``) or that others
may write is neither read nor written, so another user cannot steer a client (root's,
say, with ``XDG_CACHE_HOME`` in a shared folder) to a socket of their choosing; the file
is written ``0600`` through a new temporary file (``O_EXCL|O_NOFOLLOW``) renamed over.
Only ``os``, ``json`` and ``sys`` are needed on a hit (the status fast path has them).
Concurrent clients writing at once may lose each other's entries (the next run parses).
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["MAX_CONFIG", "cache_file", "configured_socket"]

#: A config bigger than this (bytes) is parsed on every run, never remembered.
MAX_CONFIG = 16 * 1024
#: Configs remembered at most (the oldest entry goes first).
MAX_ENTRIES = 16
#: A cache file bigger than this (bytes) is ignored and replaced.
MAX_BYTES = 1024 * 1024
_S_IFMT, _S_IFREG, _S_IFDIR = 0o170000, 0o100000, 0o040000


def cache_file() -> str | None:
    """``$XDG_CACHE_HOME/hostvisor/sockets.json`` (``~/.cache``, macOS ``~/Library/Caches``),
    or None when no home is known."""
    env = os.environ
    base = env.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        if not home or home.startswith("~"):
            return None
        base = os.path.join(home, "Library/Caches" if sys.platform == "darwin" else ".cache")
    return os.path.join(base, "hostvisor", "sockets.json")


def _private(st: os.stat_result, kind: int) -> bool:
    """The user's own ``kind`` of file (regular, folder), which nobody else may write."""
    return st.st_mode & _S_IFMT == kind and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _read(path: str, limit: int | None = None, *, private: bool = False) -> bytes | None:
    """The regular file at ``path`` (up to ``limit + 1`` bytes when given); None if it is
    not one (a FIFO or a device never blocks: ``O_NONBLOCK``), or not private when asked."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | (os.O_NOFOLLOW if private else 0))
    try:
        st = os.fstat(fd)
        if not (_private(st, _S_IFREG) if private else st.st_mode & _S_IFMT == _S_IFREG):
            return None
        chunks, left = [], sys.maxsize if limit is None else limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _load(path: str | None) -> dict[str, object]:
    if path is None:
        return {}
    try:
        if not _private(os.lstat(os.path.dirname(path)), _S_IFDIR):
            return {}
        data = _read(path, MAX_BYTES, private=True)
        entries = json.loads(data) if data is not None and len(data) <= MAX_BYTES else None
    except Exception:  # missing, hostile (nested too deeply, not UTF-8...): a parse
        return {}
    return entries if isinstance(entries, dict) else {}


def _store(path: str | None, entries: dict[str, object]) -> None:
    """Write ``entries`` atomically into a private folder; any failure is ignored."""
    if path is None:
        return
    while len(entries) > MAX_ENTRIES:
        del entries[next(iter(entries))]
    folder = os.path.dirname(path)
    temporary = f"{path}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not _private(os.lstat(folder), _S_IFDIR):
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with open(os.open(temporary, flags, 0o600), "w", encoding="utf-8") as file:
            json.dump(entries, file)
        os.replace(temporary, path)
    except Exception:  # full disk, read-only, not ours...: the next run parses again
        try:  # noqa: SIM105 (contextlib is one more import)
            os.unlink(temporary)
        except OSError:
            pass


def _parse(data: bytes) -> object:
    """The raw ``[daemon] socket`` value of a config's bytes, or None."""
    import tomllib

    try:
        daemon = tomllib.loads(data.decode()).get("daemon", {})
    except Exception:  # invalid, not UTF-8, nested too deeply...: not the client's job
        return None
    return daemon.get("socket") if isinstance(daemon, dict) else None


def configured_socket(config: str) -> str | None:
    """``[daemon] socket`` of the config file at ``config`` (an absolute path), with ``~``
    and ``$VARS`` expanded and made absolute against the config's folder, as
    :mod:`supervisor.config` does; None if unset, not a string, or the file is missing,
    unreadable, invalid or not a regular file (a client falls back to the default socket
    then). Never raises and never blocks on a FIFO.

    ``supervisor.cli`` and the status fast path (:mod:`supervisor.cli_status`) both call it.
    """
    try:
        data = _read(config)
    except (OSError, ValueError):
        return None
    if data is None:
        return None
    text = data.decode("latin-1")  # any bytes, exactly, as a JSON string
    where = cache_file() if len(data) <= MAX_CONFIG else None
    entries = _load(where)
    hit = entries.get(config)
    if isinstance(hit, dict) and hit.get("config") == text:
        raw = hit.get("socket")
    else:
        raw = _parse(data)
        if where is not None:
            entries.pop(config, None)
            entries[config] = {"config": text, "socket": raw if isinstance(raw, str) else None}
            _store(where, entries)
    if not isinstance(raw, str) or not raw or "\0" in raw:
        return None
    value = os.path.expandvars(os.path.expanduser(raw))
    return os.path.abspath(os.path.join(os.path.dirname(config), value))
