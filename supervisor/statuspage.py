"""The host's state as a Markdown page: ``hostvisor status --format markdown`` prints it,
and with ``[daemon] status_page = "PATH"`` the daemon keeps that file true.

The page (:func:`render_markdown`) is a heading with the host name, the time (RFC 3339,
local offset) and the daemon's version, a one-line summary, then one table row per
service: service, kind, port, state, health, uptime, restarts, last exit, description.
Every cell is escaped for GitHub-flavoured Markdown (``|``, backticks, backslashes,
brackets, ``*``, ``_``, ``<``/``>``; a line break becomes a space) and stripped of control
characters, so a hostile description can neither break the table nor put a terminal
escape on the screen of whoever ``cat``\\ s the file.

The daemon's page keeper (:func:`keep_page`) rewrites the file atomically (a temporary
file in the same folder, mode 0600, fsync, rename over the page) once at start, after
state or health changes (the daemon's ``changed`` broadcast) at most once every
:data:`WRITE_EVERY` seconds, and once more at shutdown, saying that the daemon stopped.
As for logs (:mod:`supervisor.logfile`), a symbolic link at the path is refused, at
load time (:func:`check_page_path`, a config error) and at every write (``lstat``; the
rename replaces a link planted in between, it never writes through it). A failed write
(a link, a full disk, a removed folder) is one warning in the daemon log per episode,
then retried: at the next change, or after :data:`RETRY_EVERY` seconds. Writes run in a
worker thread of their own, each bounded by :data:`WRITE_TIMEOUT` seconds; a write that
hangs (a dead NFS server) is abandoned and no other starts while it hangs.

Importing this module costs the standard library only (``hostvisor status`` imports it);
the keeper imports ``anyio`` when it runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import socket
import stat
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.cli_jobs import duration_text
from supervisor.signals import signal_name

if TYPE_CHECKING:
    from supervisor.daemon import Daemon
    from supervisor.threads import ThreadPool

__all__ = [
    "COLUMNS",
    "RETRY_EVERY",
    "WRITE_EVERY",
    "WRITE_TIMEOUT",
    "check_page_path",
    "keep_page",
    "render_here",
    "render_markdown",
    "write_page",
]

#: The table's columns, in order.
COLUMNS = (
    "service", "kind", "port", "state", "health", "uptime", "restarts", "last exit",
    "description",
)  # fmt: skip
#: Seconds between two writes of the page, at most one write per interval.
WRITE_EVERY = 1.0
#: Seconds after a failed write before the next try, when nothing changes meanwhile.
RETRY_EVERY = 5.0
#: Seconds one write may take; then the disk counts as hung and the write is abandoned.
WRITE_TIMEOUT = 10.0
#: States and health values shown in bold: they need someone's attention.
_ALARMING = frozenset({"fatal", "backoff", "unhealthy"})
#: Characters with a meaning in Markdown inline text or in a table row.
_SPECIAL = {c: "\\" + c for c in "\\|`*_[]<>"}
#: Bidirectional overrides and isolates (Trojan Source): never shown.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
#: A cell is cut to this many characters (a description is one line of prose).
_MAX_CELL = 300


# --------------------------------------------------------------------------- rendering


def cell(value: object) -> str:
    """``value`` as one Markdown table cell: line breaks and tabs become a space, other
    control characters (ESC and the rest of C0 and C1, DEL) and bidi overrides are
    dropped, Markdown's special characters are backslash-escaped; ``-`` when empty."""
    out = []
    for char in str(value)[:_MAX_CELL]:
        if char in _BREAKS or char == "\t":
            out.append(" ")
        elif char in _BIDI or unicodedata.category(char) == "Cc":
            continue
        else:
            out.append(_SPECIAL.get(char, char))
    return " ".join("".join(out).split()) or "-"  # runs of spaces (a CR LF) become one


def _exit_text(last: object) -> str:
    if not isinstance(last, Mapping):
        return "-"
    if last.get("unknown"):
        return "unknown"
    sig = last.get("signal")
    if isinstance(sig, int) and not isinstance(sig, bool):
        return signal_name(sig)
    code = last.get("code")
    return "-" if code is None else f"code {code}"


def _row(entry: Mapping[str, Any]) -> str:
    state, health = str(entry.get("state", "?")), str(entry.get("health") or "none")
    uptime, name = entry.get("uptime_seconds"), entry.get("name", "?")
    cells = [
        f"`{name}`" if _plain_name(name) else cell(name),
        cell(entry.get("kind", "?")),
        cell(entry.get("port") if entry.get("port") is not None else "-"),
        _bold(cell(state), state),
        _bold(cell("-" if health == "none" else health), health),
        duration_text(uptime if isinstance(uptime, int | float) else None),
        cell(entry.get("restarts", 0)),
        cell(_exit_text(entry.get("last_exit"))),
        cell(entry.get("description") or ""),
    ]
    return "| " + " | ".join(cells) + " |"


def _plain_name(name: object) -> bool:
    """A service name as the contract allows (no backtick, nothing to escape)."""
    return isinstance(name, str) and bool(name) and all(c.isalnum() or c in "_.-" for c in name)


def _bold(text: str, value: str) -> str:
    return f"**{text}**" if value in _ALARMING else text


def _summary(services: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for entry in services:
        state = str(entry.get("state", "?"))
        counts[state] = counts.get(state, 0) + 1
    unhealthy = sum(1 for e in services if e.get("health") == "unhealthy")
    parts = [f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if unhealthy:
        parts.append(f"{unhealthy} unhealthy")
    noun = "service" if len(services) == 1 else "services"
    return f"{len(services)} {noun}" + (f": {', '.join(parts)}" if parts else "") + "."


def render_markdown(doc: Mapping[str, Any], *, host: str, now: datetime, note: str = "") -> str:
    """The status document (contract section 5) as a Markdown page.

    Args:
        doc: ``{"daemon": {"version", "pid", "uptime_seconds", ...}, "services": [...]}``
            as the ``status`` method answers it; each entry's ``description`` is shown.
        host: the host name for the heading (``socket.gethostname()``).
        now: the time of the page, shown as RFC 3339 with its offset (pass an aware
            local time: ``datetime.now().astimezone()``).
        note: a line of plain text under the summary (the daemon's keeper says that it
            keeps the page), escaped like a cell.

    Returns:
        The page, ending with a newline: a ``#`` heading, the summary, the table.
    """
    daemon = doc.get("daemon")
    daemon = daemon if isinstance(daemon, Mapping) else {}
    services = [e for e in doc.get("services") or [] if isinstance(e, Mapping)]
    stamp = now.isoformat(timespec="seconds")
    version = cell(daemon.get("version", "?"))
    lines = [f"# {cell(host)} · {stamp} · hostvisor {version}", "", _summary(services)]
    if note:
        lines += ["", cell(note)]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [_row(entry) for entry in services]
    return "\n".join(lines) + "\n"


def render_here(doc: Mapping[str, Any]) -> str:
    """:func:`render_markdown` with this host's name and the local time now
    (``hostvisor status --format markdown``: the CLI runs on the daemon's host)."""
    return render_markdown(doc, host=socket.gethostname(), now=datetime.now().astimezone())


# --------------------------------------------------------------------------- the file


def check_page_path(path: Path) -> str | None:
    """Why ``path`` cannot be the status page, or ``None`` when it can: its folder must
    exist, and the path must not be a symbolic link or anything but a regular file (it
    may not exist yet). Checked by the config loader (``[daemon] status_page``)."""
    folder = path.parent
    if not folder.is_dir():
        why = "is not a folder" if os.path.lexists(folder) else "does not exist"
        return f"folder {folder} {why} (create it, or choose another path)"
    return _refusal(path)


def _refusal(path: Path) -> str | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(info.st_mode):
        return (
            f"{path} is a symbolic link; the page is never written through a link "
            "(remove it, or set status_page to the file it points to)"
        )
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file (remove it, or choose another path)"
    return None


class PageRefused(OSError):
    """The page's path is a symbolic link or not a regular file."""


def write_page(path: Path, data: bytes) -> None:
    """Replace the page at ``path`` with ``data``, atomically: a temporary file beside it
    (``.NAME.PID.TID.tmp``, mode 0600, ``O_NOFOLLOW``), written, fsynced, renamed over
    the page. Blocking: run it in a worker thread.

    Raises:
        PageRefused: ``path`` is a symbolic link or not a regular file (nothing written).
        OSError: the folder is missing or not writable, the disk is full...; no
            temporary file is left behind and the old page stays.
    """
    problem = _refusal(path)
    if problem is not None:
        raise PageRefused(problem)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # a leftover of a crashed write may have another mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # a link planted since the check is replaced, not followed
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- the keeper


class _Keeper:
    """The page of one daemon: what it last said about writing it, and whether a write
    is in flight (the lock is taken on the event loop and released by the worker)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.failing: str | None = None  # the path of a failure episode under way
        self.busy = threading.Lock()
        self.host = socket.gethostname()
        self.written: Path | None = None  # the last page written (it says it is kept)

    def path(self) -> Path | None:
        return self.daemon.loaded.daemon.status_page  # read at every write: a reload moves it

    async def page(self, note: str) -> str:
        doc: Any = self.daemon.status(None)
        if inspect.isawaitable(doc):  # a status that samples first may be async
            doc = await doc
        return render_markdown(doc, host=self.host, now=datetime.now().astimezone(), note=note)

    async def write(self, *, note: str) -> None:
        """Render and write the page once (if one is configured); never raises. A page
        that a reload moved or removed is rewritten once to say it is no longer kept."""
        path = self.path()
        if getattr(self.daemon, "reexecuting", False):
            return
        old = self.written
        if old is not None and old != path:  # moved or removed by a reload: say so there
            self.written = None
            now = datetime.now().astimezone().isoformat(timespec="seconds")
            where = f"status_page is now {path}" if path else "status_page was removed"
            await self._write_to(old, f"This page is no longer kept since {now}: {where}.")
        if path is not None and await self._write_to(path, note):
            self.written = path

    async def _write_to(self, path: Path, note: str) -> bool:
        """:meth:`write` at ``path``; True when written."""
        import anyio

        try:
            data = (await self.page(note)).encode("utf-8", "replace")
        except Exception as exc:  # a status entry that cannot be shown must not end us
            self._failed(path, f"cannot render the status page: {type(exc).__name__}: {exc}")
            return False
        if not self.busy.acquire(blocking=False):
            self._failed(path, f"cannot write {path}: an earlier write still hangs")
            return False

        def work() -> None:
            try:
                write_page(path, data)
            finally:
                self.busy.release()

        try:  # shielded: a write under way at shutdown ends before the last one starts
            with anyio.CancelScope(shield=True), anyio.fail_after(WRITE_TIMEOUT):
                await anyio.to_thread.run_sync(
                    work, abandon_on_cancel=True, limiter=_pool().limiter()
                )
        except TimeoutError:
            self._failed(path, f"cannot write {path}: no answer within {WRITE_TIMEOUT:g}s")
        except PageRefused as exc:
            self._failed(path, f"refusing to write the status page: {exc}")
        except OSError as exc:
            self._failed(path, f"cannot write {path}: {exc.strerror or exc}")
        else:
            if self.failing is not None:
                self.daemon.log_line("info", f"status page {path} written again")
            self.failing = None
            return True
        return False

    def _failed(self, path: Path, line: str) -> None:
        if self.failing != str(path):  # one warning per episode (and per path)
            self.daemon.log_line("warning", f"{line}; retrying")
        self.failing = str(path)


async def keep_page(daemon: Daemon) -> None:
    """Keep ``[daemon] status_page`` true until cancelled (the daemon's task group).

    Writes once now, then after each change (``daemon.changed``) at most once every
    :data:`WRITE_EVERY` seconds (retrying a failed write after :data:`RETRY_EVERY`
    seconds), and a last time when cancelled, shielded and bounded, with a note that
    the daemon stopped. The path is read again at every write, so a reload that sets,
    moves or removes ``status_page`` applies at once (a reload fires ``changed``).
    Never raises.
    """
    import anyio

    keeper = _Keeper(daemon)
    dirty = anyio.Event()

    async def watch() -> None:
        nonlocal dirty
        while True:
            await daemon.changed.wait()
            dirty.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await keeper.write(note=_KEPT)
            while True:  # a write, WRITE_EVERY seconds' rest, then the next change
                await anyio.sleep(WRITE_EVERY)
                with anyio.move_on_after(RETRY_EVERY if keeper.failing else float("inf")):
                    await dirty.wait()
                dirty = anyio.Event()
                await keeper.write(note=_KEPT)
    finally:
        with anyio.CancelScope(shield=True):
            stopped = datetime.now().astimezone().isoformat(timespec="seconds")
            await keeper.write(note=f"The daemon stopped at {stopped}; this page is not kept.")


_KEPT = "Kept by the hostvisor daemon after every state change; edits are overwritten."


@functools.cache
def _pool() -> ThreadPool:
    """The keeper's one worker thread (a pool of its own: a hung disk holds no other)."""
    from supervisor.threads import ThreadPool

    return ThreadPool("status_page", 1)
