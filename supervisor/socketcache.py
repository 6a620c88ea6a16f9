"""``[daemon] socket`` of a config file, for the clients, remembered across runs (issue 14).

``hostvisor status -c CONFIG`` must read the config to find the control socket, and
importing :mod:`tomllib` (with ``typing``, ``string``, ``datetime``) costs about as much
as starting the interpreter. :func:`configured_socket` parses with tomllib the first
time and remembers the raw value in ``$XDG_CACHE_HOME/hostvisor/sockets.json``
(``~/.cache``; ``~/Library/Caches`` on macOS), keyed by the config's absolute path and
validated by its ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``: any write,
rename over or ``touch`` of the config changes that tuple, and the file is parsed again.

Timestamps are coarse (the kernel stamps files with a clock that ticks every few
milliseconds), so a second write in the same tick and of the same size would leave the
tuple unchanged. As git does for its index ("racy git", ``Documentation/technical/
racy-git.txt``), an answer is remembered only when the config's ctime is more than
:data:`RACY_NS` older than the moment it was read: a file written in the last two
seconds is parsed on every run until it settles.

The cache is an optimisation only: a missing, unreadable, corrupt, oversized or
unwritable cache file means a parse, never an error and never a different answer. Only
``os``, ``json`` and ``sys`` are needed on a hit (the status fast path has them already).
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["RACY_NS", "cache_file", "configured_socket"]

#: A config changed less than this long (nanoseconds) before it was read is not remembered.
RACY_NS = 2_000_000_000
#: Configs remembered at most (the oldest entry goes first).
MAX_ENTRIES = 32
#: A cache file bigger than this (bytes) is ignored and replaced.
MAX_BYTES = 64 * 1024


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


def _load(path: str | None) -> dict[str, object]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
        entries = json.loads(data) if len(data) <= MAX_BYTES else None
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _store(path: str | None, entries: dict[str, object]) -> None:
    """Write ``entries`` atomically (a temporary file renamed over); any failure is ignored."""
    if path is None:
        return
    while len(entries) > MAX_ENTRIES:
        del entries[next(iter(entries))]
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(entries, file)
        os.replace(temporary, path)
    except (OSError, ValueError):
        try:  # noqa: SIM105 (contextlib is one more import)
            os.unlink(temporary)
        except OSError:
            pass


def _key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _parse(config: str) -> tuple[object, list[int] | None]:
    """(the raw ``[daemon] socket`` value or None, the stat key it belongs to or None when
    the file changed while it was read). Raises OSError if it cannot be read."""
    with open(config, "rb") as file:
        before = _key(os.fstat(file.fileno()))
        data = file.read()
        after = _key(os.fstat(file.fileno()))
    import tomllib

    try:
        daemon = tomllib.loads(data.decode()).get("daemon", {})
        raw = daemon.get("socket") if isinstance(daemon, dict) else None
    except Exception:  # invalid, not UTF-8, nested too deeply...: not the client's job
        raw = None
    return raw, before if before == after else None


def configured_socket(config: str) -> str | None:
    """``[daemon] socket`` of the config file at ``config`` (an absolute path), with ``~``
    and ``$VARS`` expanded and made absolute against the config's folder, as
    :mod:`supervisor.config` does; None if unset, not a string, or the file is missing,
    unreadable, invalid or not a regular file (a client falls back to the default socket
    then).

    ``supervisor.cli`` and the status fast path (:mod:`supervisor.cli_status`) both call it.
    """
    try:
        st = os.stat(config)
    except (OSError, ValueError):
        return None
    if st.st_mode & 0o170000 != 0o100000:  # not a regular file: a FIFO would block the read
        return None
    key = _key(st)
    where = cache_file()
    entries = _load(where)
    hit = entries.get(config)
    if isinstance(hit, dict) and hit.get("stat") == key:
        raw = hit.get("socket")
    else:
        try:
            raw, key_read = _parse(config)
        except (OSError, ValueError):
            return None
        import time

        if key_read is not None and time.time_ns() - max(key_read[3:]) > RACY_NS:
            entries.pop(config, None)
            entries[config] = {"stat": key_read, "socket": raw if isinstance(raw, str) else None}
            _store(where, entries)
    if not isinstance(raw, str) or not raw or "\0" in raw:
        return None
    text = os.path.expandvars(os.path.expanduser(raw))
    return os.path.abspath(os.path.join(os.path.dirname(config), text))
