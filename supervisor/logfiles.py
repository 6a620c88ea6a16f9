"""Draining child output into size-rotated log files without ever blocking the child.

Each service's stdout and stderr are two separate non-blocking pipes, drained
by two tasks into one :class:`RotatingLog` (``<state>/logs/<service>.log``).
A drain hands only whole lines (up to the last newline it has seen) to the
log's writer and keeps the partial line that follows for the next read, so
lines of the two streams are never torn or interleaved mid-line. A line longer
than :data:`PENDING_CAP` without a newline is handed on in pieces, so memory
stays bounded (at most ``PENDING_CAP + READ_SIZE`` per stream).

The event loop never waits for the disk: the writes happen in worker threads
(at most :data:`WRITE_THREADS` for all logs), fed through a queue of
:data:`WRITE_BACKLOG` bytes per log; a full queue makes the drains wait for the
disk as a synchronous write would. A disk that is full (ENOSPC), over a file
size limit (EFBIG, after one rotation), failing (EIO) or hung (no write done
for :data:`WRITE_STALL` seconds) costs whole lines, never a stalled child: they are counted in a
:class:`LogDrops`, which reports each episode (when dropping starts, and when
writes succeed again) and leaves a marker line in the file where lines are
missing. A write cut short by a full disk is truncated back to its last whole
line (or, failing that, ended with a newline before the marker).

The files themselves (rotation, reopening, one open file per path) are
:mod:`supervisor.logfile`; live followers are :mod:`supervisor.loghub`. Their
public names are re-exported here, so ``from supervisor.logfiles import
RotatingLog`` keeps working.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel

from supervisor.logfile import (
    CHECK_EVERY,
    RotatingLog,
    WriteOutcome,
    _File,  # noqa: F401  (bench/bench_drain_stall.py patches it)
    reopen_all,
)
from supervisor.loghub import FOLLOW_BUFFER, FOLLOW_LINE_MAX, LogFollower, LogHub
from supervisor.logwriter import WRITE_BACKLOG, WRITE_STALL, WRITE_THREADS, LogWriter

__all__ = [
    "CAPTURE_LIMIT",
    "CHECK_EVERY",
    "FOLLOW_BUFFER",
    "FOLLOW_LINE_MAX",
    "PENDING_CAP",
    "READ_SIZE",
    "WRITE_BACKLOG",
    "WRITE_STALL",
    "WRITE_THREADS",
    "DrainStats",
    "DropReport",
    "Handover",
    "LogDrops",
    "LogFollower",
    "LogHub",
    "RotatingLog",
    "WriteOutcome",
    "capture",
    "drain",
    "drain_all",
    "open_pipe",
    "pipe_budget",
    "reopen_all",
    "tail",
]

#: Bytes asked for per ``read`` of a pipe (the size the driver gives the pipes).
READ_SIZE = 1 << 20
#: A partial line longer than this (bytes) is written out as is.
PENDING_CAP = 64 << 10
#: Bytes of stdout and of stderr that :func:`capture` keeps (the last ones).
CAPTURE_LIMIT = 64 << 10
#: Bytes :func:`tail` reads from one file at most.
_TAIL_MAX_BYTES = 16 << 20
_TAIL_BLOCK = 64 << 10


@dataclass(frozen=True, slots=True, kw_only=True)
class DropReport:
    """One report of an episode of dropped log lines (``hostvisor.logs.dropped``).

    An episode starts with the first dropped line and ends with the first
    successful write after it: it is reported twice, with ``resumed`` false
    when dropping starts and true when writes succeed again. ``bytes`` and
    ``lines`` count what was dropped since the previous report, so the reports
    of a log add up to its total.

    Attributes:
        path: the log file.
        bytes, lines: dropped since the previous report.
        total_bytes: bytes dropped from this log since its :class:`LogDrops` was made.
        error: the errno name (``ENOSPC``, ``EFBIG``, ``EIO``...), ``backlog``
            (the disk is too slow: :data:`WRITE_BACKLOG` bytes were waiting) or
            ``refused`` (the path became unusable, e.g. a symbolic link).
        message: the reason in words.
        resumed: false when dropping starts, true when writes succeed again.
    """

    path: Path
    bytes: int
    lines: int
    total_bytes: int
    error: str
    message: str
    resumed: bool

    def describe(self) -> str:
        """The event's message: ``cannot write x.log (No space left on device): ...``."""
        what = f"{self.lines} lines ({self.bytes} bytes)"
        if self.resumed:
            return f"writes to {self.path.name} resumed; {what} more were dropped"
        return f"cannot write {self.path.name} ({self.message}): dropping lines, {what} so far"

    def attributes(self) -> dict[str, str | int | bool]:
        """The event's attributes (``hostvisor.logs.dropped_bytes`` ... ``error.type``)."""
        return {
            "hostvisor.logs.dropped_bytes": self.bytes,
            "hostvisor.logs.dropped_lines": self.lines,
            "hostvisor.logs.total_dropped_bytes": self.total_bytes,
            "hostvisor.logs.resumed": self.resumed,
            "error.type": self.error,
            "file.path": str(self.path),
        }


class LogDrops:
    """Counts the lines lost from one log (one per service, kept across its instances).

    Used on the event loop only. ``on_report`` is called at the start and at the
    end of each episode (see :class:`DropReport`); an exception it raises is ignored.

    Attributes:
        bytes, lines: dropped so far (cumulative; ``status --json``'s ``logs_dropped_bytes``).
        episodes: episodes so far.
    """

    def __init__(self, on_report: Callable[[DropReport], None] | None = None) -> None:
        self.on_report = on_report
        self.bytes = self.lines = self.episodes = 0
        self._failing: tuple[str, str] | None = None
        self._unmarked = [0, 0]
        self._unreported = [0, 0]

    def __repr__(self) -> str:
        state = f"failing ({self._failing[0]})" if self._failing else "ok"
        return f"<LogDrops {state}: {self.lines} lines, {self.bytes} bytes dropped>"

    @property
    def failing(self) -> bool:
        """True from the first dropped line until writes succeed again."""
        return self._failing is not None

    def dropped(self, path: Path, nbytes: int, nlines: int, error: str, message: str) -> None:
        """Count ``nbytes`` in ``nlines`` lost; the first of an episode is reported."""
        self.bytes += nbytes
        self.lines += nlines
        self._unmarked[0] += nbytes
        self._unmarked[1] += nlines
        if self._failing is None:
            self._failing = (error, message)
            self.episodes += 1
            self._report(path, nbytes, nlines, resumed=False)
        else:
            self._unreported[0] += nbytes
            self._unreported[1] += nlines

    def marker(self) -> bytes:
        """The line left in the file where lines are missing: those dropped since the
        last marker (call :meth:`marked` once it is written)."""
        why = self._failing[1] if self._failing else "unknown"
        size, lines = self._unmarked
        return f"[hostvisor: {lines} lines ({size} bytes) dropped: {why}]\n".encode()

    def marked(self) -> None:
        """The :meth:`marker` line is in the file."""
        self._unmarked = [0, 0]

    def resumed(self, path: Path) -> None:
        """Writes succeed again: end the episode (reported)."""
        if self._failing is not None:
            self._report(path, *self._unreported, resumed=True)
            self._failing = None
            self._unreported = [0, 0]

    def _report(self, path: Path, nbytes: int, nlines: int, *, resumed: bool) -> None:
        if self.on_report is None or self._failing is None:
            return
        report = DropReport(
            path=path,
            bytes=nbytes,
            lines=nlines,
            total_bytes=self.bytes,
            error=self._failing[0],
            message=self._failing[1],
            resumed=resumed,
        )
        with contextlib.suppress(Exception):  # a reporting bug must not stop the drain
            self.on_report(report)


@dataclass(slots=True)
class DrainStats:
    """What a drain did.

    Attributes:
        bytes_read: bytes read from the pipe.
        max_pending: the largest partial line held between two reads, bytes
            (never more than the drain's ``pending_cap``).
    """

    bytes_read: int = 0
    max_pending: int = 0


@dataclass(slots=True)
class Handover:
    """Drains that stop to hand their pipes to the next daemon (``hostvisor reexec``).

    Set :attr:`requested`, then cancel the drains: a drain cancelled with it set leaves
    its pipe open and puts the partial line it held (bytes read after the last
    newline) in :attr:`pending`, keyed by the pipe's fd; what it had handed to the
    writer is still written. The next daemon starts a drain on the same fd with that
    partial line (``drain_all(..., pending=...)``), so no byte is lost or doubled.
    A pipe whose drain reached EOF and closed it is in :attr:`closed`: never handed over
    (its number may name another descriptor by then).
    """

    requested: bool = False
    pending: dict[int, bytes] = field(default_factory=dict)
    closed: set[int] = field(default_factory=set)


def _emit(writer: LogWriter, data: bytes, hub: LogHub | None, key: str | None) -> None:
    writer.put(data)
    if hub is not None and hub.has_subscribers(key):
        text = data.decode("utf-8", "replace")
        hub.publish(key, text.removesuffix("\n").split("\n"))


async def _read(
    fd: int,
    writer: LogWriter,
    stats: DrainStats,
    *,
    hub: LogHub | None,
    key: str | None,
    pending_cap: int = PENDING_CAP,
    pending: bytes = b"",
    handover: Handover | None = None,
) -> None:
    try:
        while True:
            await writer.room()
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                chunk = None  # wait outside the handler: the exception is not kept meanwhile
            if chunk is None:
                await anyio.wait_readable(fd)
                continue
            if not chunk:
                break
            stats.bytes_read += len(chunk)
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                pending += chunk
                if len(pending) > pending_cap:
                    _emit(writer, pending, hub, key)
                    pending = b""
            else:
                _emit(writer, pending + chunk[:cut] if pending else chunk[:cut], hub, key)
                pending = chunk[cut:]
            stats.max_pending = max(stats.max_pending, len(pending))
            # Let other tasks run between chunks even when the pipe is never empty.
            await anyio.lowlevel.checkpoint()
        if pending:
            _emit(writer, pending + b"\n", hub, key)
    except anyio.get_cancelled_exc_class():
        if handover is not None and handover.requested:
            # Every await above leaves what was read either with the writer or in
            # `pending`: the pipe and the partial line go to the next daemon.
            handover.pending[fd] = pending
            fd = -1
        raise
    finally:
        if fd >= 0:
            os.close(fd)
            if handover is not None:
                handover.closed.add(fd)


async def drain(
    fd: int,
    log: RotatingLog,
    *,
    hub: LogHub | None = None,
    key: str | None = None,
    stats: DrainStats | None = None,
    pending_cap: int = PENDING_CAP,
    drops: LogDrops | None = None,
) -> DrainStats:
    """Copy the non-blocking pipe ``fd`` into ``log`` line by line until EOF; close ``fd``.

    Args:
        fd: the read end of a pipe, in non-blocking mode; owned (closed) by the drain.
        log: the file to append to (not closed here).
        hub: live followers; lines are split and published only while
            ``hub.has_subscribers(key)``.
        key: the service name (``None`` for the daemon log).
        stats: filled in as the drain goes (pass one to watch a running drain).
        pending_cap: bytes of a partial line held before it is written out as is.
        drops: where lost lines are counted (a new one when not given).

    Returns:
        ``stats``, once everything read is written. At EOF a last partial line
        is written with a newline added. Write errors are counted in ``drops``,
        never raised: the pipe is always read.
    """
    stats = stats if stats is not None else DrainStats()
    await drain_all(
        [fd],
        log,
        hub=hub,
        key=key,
        stats=[stats],
        drops=drops,
        pending_cap=pending_cap,
        close_log=False,
    )
    return stats


async def drain_all(
    fds: Sequence[int],
    log: RotatingLog,
    *,
    hub: LogHub | None = None,
    key: str | None = None,
    stats: Sequence[DrainStats] = (),
    drops: LogDrops | None = None,
    pending: Sequence[bytes] = (),
    handover: Handover | None = None,
    pending_cap: int = PENDING_CAP,
    close_log: bool = True,
    on_scope: Callable[[anyio.CancelScope], object] | None = None,
) -> None:
    """Drain every pipe in ``fds`` into ``log`` concurrently (see :func:`drain`); close ``log``
    when all hit EOF and their lines are written (or when cancelled).

    The calling task reads the first pipe, one task each the others; the writer's task runs
    only while there are lines to write (see :class:`~supervisor.logwriter.LogWriter`).

    Args:
        drops: the service's :class:`LogDrops` (keep one per service, across instances,
            for ``logs_dropped_bytes``); a new one when not given.
        pending: per fd, a partial line an earlier drain of it held (see :class:`Handover`).
        handover: lets the drains stop and leave their pipes open (see :class:`Handover`).
        close_log: False to leave ``log`` open (:func:`drain`).
        on_scope: called with the scope of the drains once they run: cancel it, or set its
            deadline, to cut them off (what they read so far is still written).
    """
    writer = LogWriter(log, drops if drops is not None else LogDrops())
    left = len(fds)

    async def read(index: int) -> None:
        nonlocal left
        each = stats[index] if index < len(stats) else DrainStats()
        held = pending[index] if index < len(pending) else b""
        await _read(
            fds[index],
            writer,
            each,
            hub=hub,
            key=key,
            pending_cap=pending_cap,
            pending=held,
            handover=handover,
        )
        left -= 1
        if not left:
            writer.close()  # every pipe hit EOF: write what is queued, then the writer ends

    try:
        async with anyio.create_task_group() as tg:
            writer.task_group = tg
            if on_scope is not None:
                on_scope(tg.cancel_scope)
            for index in range(1, len(fds)):
                tg.start_soon(read, index)
            if fds:
                await read(0)
    finally:
        try:
            await writer.finish()  # a safeguard: a writer whose task never began, if any
        finally:
            if close_log:
                log.close()


def _tail_file(path: Path, count: int) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        pos = os.fstat(fd).st_size
        blocks: list[bytes] = []
        newlines = read = 0
        # Read backwards until the block holds more than `count` line ends.
        while pos > 0 and newlines <= count and read < _TAIL_MAX_BYTES:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            block = os.pread(fd, step, pos)
            blocks.append(block)
            newlines += block.count(b"\n")
            read += step
    finally:
        os.close(fd)
    data = b"".join(reversed(blocks))
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    if pos > 0 and pieces:
        pieces.pop(0)  # starts mid-line
    return [p.decode("utf-8", "replace") for p in pieces[-count:]]


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (without newlines), oldest first.

    Reads backwards from the end in blocks (at most 16 MiB per file); when the
    current file holds fewer lines, the rest comes from ``path.1``, ``path.2`` ...
    (older rotations), as far as they exist. A missing file gives ``[]``; a
    symbolic link is not followed.
    """
    if lines <= 0:
        return []
    got = _tail_file(path, lines)
    backup = 1
    while len(got) < lines and (older := Path(f"{path}.{backup}")).exists():
        got = _tail_file(older, lines - len(got)) + got
        backup += 1
    return got


def pipe_budget() -> int:
    """Bytes of enlarged pipe buffers one driver may hold.

    An unprivileged user whose pipes hold more than ``pipe-user-pages-soft``
    pages (64 MiB by default) gets 8 KiB pipes from then on, in every program
    (``pipe(7)``): enlarging 400 pipes to 1 MiB would slow down the user's
    whole session. So a quarter of that limit goes to enlarged pipes; the
    rest keep the default 64 KiB (still above 800 MiB/s of captured log).
    Root is not limited.
    """
    if not sys.platform.startswith("linux"):
        return 0
    if os.geteuid() == 0:
        return sys.maxsize
    try:
        soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    except (OSError, ValueError):
        return 16 << 20
    return sys.maxsize if soft == 0 else soft * os.sysconf("SC_PAGE_SIZE") // 4


def open_pipe(size: int) -> tuple[int, int, int]:
    """A pipe (close-on-exec, read end non-blocking) enlarged to ``size`` bytes if allowed.

    Returns:
        ``(read_fd, write_fd, the size set in bytes, or 0 if left at the default)``.
    """
    if sys.platform.startswith("linux"):
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    else:
        read_fd, write_fd = os.pipe()  # Python makes them non-inheritable (PEP 446)
    os.set_blocking(read_fd, False)
    granted = 0
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if size and setsize is not None:
        with contextlib.suppress(OSError):  # EPERM over the user's limits: keep the default
            granted = fcntl.fcntl(read_fd, setsize, size)
    return read_fd, write_fd, granted


async def capture(fd: int, into: bytearray, done: anyio.Event) -> None:
    """Read the non-blocking pipe ``fd`` into ``into`` until EOF, keeping about the
    last :data:`CAPTURE_LIMIT` bytes; close ``fd`` and set ``done``."""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                chunk = None  # wait outside the handler: the exception is not kept meanwhile
            if chunk is None:
                await anyio.wait_readable(fd)
                continue
            if not chunk:
                break
            into += chunk
            if len(into) > 2 * CAPTURE_LIMIT:
                del into[:-CAPTURE_LIMIT]
    finally:
        os.close(fd)
        done.set()
