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

Rotation follows logrotate's numbering: ``x.log`` becomes ``x.log.1``,
``x.log.1`` becomes ``x.log.2``..., the oldest is dropped; it happens before
the write that would push the file over ``max_size``. A file moved or removed
under us (logrotate without ``copytruncate``, ``rm``, ``rm -rf logs/``) is
noticed within :data:`CHECK_EVERY` seconds of writing and reopened (missing
folders are recreated, mode 0700); :func:`reopen_all` reopens every open log at
once (SIGUSR1, logrotate's ``postrotate``).

One path, one file: every :class:`RotatingLog` of a path shares one open file
(its size, rotation and lock), so two instances of a service whose drains
overlap still append whole lines to one file and rotate it once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import anyio.lowlevel
from anyio.abc import ObjectReceiveStream

from supervisor.errors import DriverError
from supervisor.fdlimits import relocate

__all__ = [
    "CAPTURE_LIMIT",
    "CHECK_EVERY",
    "FOLLOW_BUFFER",
    "PENDING_CAP",
    "READ_SIZE",
    "WRITE_BACKLOG",
    "DrainStats",
    "DropReport",
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
#: Seconds between two checks that a log's path still names its open file.
CHECK_EVERY = 1.0
#: Bytes of lines a drain queues for the writer thread; beyond, whole lines are dropped.
WRITE_BACKLOG = 4 << 20
#: Seconds without a completed write after which a full queue drops lines
#: instead of making the drains (and so the child) wait: a hung disk.
WRITE_STALL = 5.0
#: Worker threads writing log files, for all logs of a daemon together.
WRITE_THREADS = 4
#: Bytes of lines a follower (``logs -f``) holds before it skips ahead.
FOLLOW_BUFFER = 1 << 20
#: Characters of one line a follower receives (the control server's cut too).
FOLLOW_LINE_MAX = 64 << 10
#: Bytes a follower's queue counts per line on top of its characters.
_LINE_OVERHEAD = 64
#: Bytes :func:`tail` reads from one file at most.
_TAIL_MAX_BYTES = 16 << 20
_TAIL_BLOCK = 64 << 10

Buffer = bytes | bytearray | memoryview


def _open_append(path: Path) -> int:
    """Open ``path`` for appending, refusing symbolic links and non-regular files."""
    # O_NONBLOCK: a FIFO planted at the path fails with ENXIO instead of blocking us.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise DriverError(
                f"refusing log file {path}: it is a symbolic link; "
                "logs are never written through a link (remove it)"
            ) from exc
        raise DriverError(f"cannot open log file {path}: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = "it is not a regular file"
    elif info.st_nlink > 1:
        problem = f"it has {info.st_nlink} hard links"
    if problem:
        os.close(fd)
        raise DriverError(f"refusing log file {path}: {problem} (remove it)")
    return relocate(fd)  # long-lived: above the children's descriptor limit


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each mode 0700 (``rm -rf <state>/logs``)."""
    missing: list[Path] = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(each, 0o700)


def _count_lines(data: bytes) -> int:
    return data.count(b"\n") + (0 if not data or data.endswith(b"\n") else 1)


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What :meth:`RotatingLog.append` did.

    Attributes:
        dropped_bytes, dropped_lines: the part not written (whole lines; 0 when all was).
        error: the errno name (``ENOSPC``, ``EFBIG``, ``EIO``...) or ``refused``
            (the path became unusable: a link...); ``""`` on success.
        message: the reason in words, for people.
        marked: the marker line asked for was written.
    """

    dropped_bytes: int = 0
    dropped_lines: int = 0
    error: str = ""
    message: str = ""
    marked: bool = False


_OK = WriteOutcome()
_MARKED = WriteOutcome(marked=True)


class _File:
    """The open file behind every :class:`RotatingLog` of one path; thread-safe."""

    def __init__(self, path: Path, key: str, max_size: int, backups: int) -> None:
        self.path, self.key = path, key
        self.max_size, self.backups = max_size, backups
        self.lock = threading.RLock()
        self.users = 0
        self.fd = -1
        self.ident = (0, 0)
        self.size = 0
        self.rotations = 0
        self.mid_line = False  # the file does not end with a newline
        self.checked = 0.0
        self.reopen_wanted = False
        self.retired = False  # no user is left: close as soon as no write is in flight
        self._kept = 0  # bytes of the current append written and kept

    def open(self) -> None:
        if not self.path.parent.is_dir():
            _make_dirs(self.path.parent)
        fd = _open_append(self.path)
        info = os.fstat(fd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.ident, self.size = fd, (info.st_dev, info.st_ino), info.st_size
        self.checked = time.monotonic()
        self.reopen_wanted = False
        if self.size == 0:
            self.mid_line = False

    def ready(self) -> None:
        """Open, or reopen when asked to or when the path no longer names our file."""
        now = time.monotonic()
        if self.fd >= 0 and not self.reopen_wanted and now - self.checked < CHECK_EVERY:
            return
        self.checked = now
        if self.fd >= 0 and not self.reopen_wanted:
            try:
                info = os.stat(self.path, follow_symlinks=False)
                if (info.st_dev, info.st_ino) == self.ident:
                    self.size = info.st_size  # truncated by someone (copytruncate)?
                    return
            except OSError:
                pass  # removed (or its folder): reopen
        self.open()

    def put(self, data: bytes) -> None:
        """Append whole lines, rotating at ``max_size``; on OSError the file ends at a line end
        when it can, and ``self._kept`` counts what of ``data`` was kept."""
        pos, end, retried = 0, len(data), False
        base = self._kept
        while pos < end:
            room = self.max_size - self.size
            if end - pos <= room:
                cut = end
            else:
                cut = data.rfind(b"\n", pos, pos + max(room, 0)) + 1
                if cut <= pos:  # not even one whole line fits
                    if self.size > 0:
                        self.rotate()
                        continue
                    # An empty file and a line longer than max_size: write that line whole.
                    cut = data.find(b"\n", pos) + 1 or end
            try:
                self._out(memoryview(data)[pos:cut])
            except OSError as exc:
                # A file size limit (RLIMIT_FSIZE): a fresh file may take the rest.
                if exc.errno != errno.EFBIG or retried or self.size == 0:
                    raise
                retried = True
                pos = self._kept - base
                self.rotate()
                continue
            pos = cut
            if pos < end:
                self.rotate()

    def _out(self, data: memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.write(self.fd, data[done:])
        except OSError:
            self.size += done
            self._kept += done
            if done:
                self._cut_torn(bytes(data[:done]))
            raise
        self.size += done
        self._kept += done
        if done:
            self.mid_line = data[done - 1] != 10

    def _cut_torn(self, written: bytes) -> None:
        """Truncate the torn tail of a short write back to its last newline."""
        torn = len(written) - (written.rfind(b"\n") + 1)
        if not torn:
            self.mid_line = False
            return
        try:
            os.ftruncate(self.fd, self.size - torn)
            self.size -= torn
            self._kept -= torn
            self.mid_line = self.mid_line if torn == len(written) else False
        except OSError:
            self.mid_line = True  # the marker line will start with a newline

    def rotate(self) -> None:
        with self.lock:
            self.rotations += 1
            if self.backups == 0:
                os.ftruncate(self.fd, 0)
                self.size, self.mid_line = 0, False
                return
            os.close(self.fd)
            self.fd = -1
            base = str(self.path)
            for index in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{base}.{index}", f"{base}.{index + 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(base, f"{base}.1")
            self.mid_line = False
            self.open()

    def append(self, data: bytes, marker: bytes) -> WriteOutcome:
        with self.lock:
            self._kept, started = 0, False
            try:
                self.ready()
                if marker:
                    self.put(b"\n" + marker if self.mid_line else marker)
                self._kept, started = 0, True
                self.put(data)
                return _MARKED if marker else _OK
            except (OSError, DriverError) as exc:
                lost = data[self._kept :] if started else data
                if isinstance(exc, OSError) and exc.errno is not None:
                    name, why = errno.errorcode.get(exc.errno, "EIO"), exc.strerror or str(exc)
                else:
                    name, why = "refused", str(exc)
                marked = started and bool(marker)
                return WriteOutcome(len(lost), _count_lines(lost), name, why, marked)
            finally:
                self.close_if_retired()

    def close_if_retired(self) -> None:
        if self.retired and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def retire(self) -> None:
        """No user is left: close now, or after the write in flight (a hung disk)."""
        self.retired = True
        if self.lock.acquire(blocking=False):
            try:
                self.close_if_retired()
            finally:
                self.lock.release()

    def request_reopen(self) -> None:
        self.reopen_wanted = True
        if self.fd >= 0 and self.lock.acquire(blocking=False):
            try:
                self.open()
            except (OSError, DriverError):
                self.reopen_wanted = True  # retried at the next write
            finally:
                self.lock.release()


# One registry per process on purpose (STYLE rule 9 yields here): a path is a
# process-wide resource like the descriptor table, and SIGUSR1 must reach every
# open log, whoever opened it. Entries leave when their last RotatingLog closes
# (or is garbage-collected), so closed logs are never kept.
_live: dict[str, _File] = {}
_live_lock = threading.Lock()


def _acquire(path: Path, max_size: int, backups: int) -> _File:
    key = os.path.join(os.path.realpath(path.parent), path.name)
    with _live_lock:
        file = _live.get(key)
        if file is None or file.retired:
            file = _File(path, key, max_size, backups)
            file.open()  # DriverError: nothing registered
            _live[key] = file
        else:
            file.max_size, file.backups = max_size, backups  # the newest settings win
        file.users += 1
        return file


def _release(file: _File) -> None:
    with _live_lock:
        file.users -= 1
        if file.users > 0:
            return
        if _live.get(file.key) is file:
            del _live[file.key]
    file.retire()


def reopen_all() -> int:
    """Reopen every open log file of this process now (SIGUSR1, logrotate's ``postrotate``).

    Each log is closed and its path opened again (created if missing, folders
    0700); a log busy writing reopens before its next write. Never raises: a
    log that cannot be reopened now tries again at its next write.

    Returns:
        The number of open log files.
    """
    with _live_lock:
        files = list(_live.values())
    for file in files:
        file.request_reopen()
    return len(files)


class RotatingLog:
    """An append-only log file rotated at ``max_size`` bytes, keeping ``backups`` old files.

    Every ``RotatingLog`` of one path (in this process) shares one open file:
    opening a second one while the first is open gives a second handle to the
    same file, whose ``max_size`` and ``backups`` then apply to both. The file
    is closed when the last handle is. Thread-safe.

    Args:
        path: the log file; a symbolic link, FIFO or hard-linked file there is refused.
            Missing folders are created (mode 0700).
        max_size: bytes; a write that would push the file over it first rotates.
            A single line longer than ``max_size`` is still written whole.
        backups: old files kept as ``path.1`` (newest) .. ``path.N``;
            0 truncates the file instead.

    Raises:
        DriverError: the file cannot be opened, or is a link or not a regular file.
    """

    def __init__(self, path: Path, *, max_size: int, backups: int) -> None:
        self.path = path
        self._args = (max(1, max_size), max(0, backups))
        self._file = _acquire(path, *self._args)
        self._release = weakref.finalize(self, _release, self._file)

    def __repr__(self) -> str:
        return f"<RotatingLog {self.path} {self.size}/{self.max_size} bytes>"

    @property
    def max_size(self) -> int:
        """Bytes at which the file rotates."""
        return self._file.max_size

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._file.size

    @property
    def rotations(self) -> int:
        """Rotations done since the file was opened."""
        return self._file.rotations

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return not self._release.alive

    def _live_file(self) -> _File:
        if not self._release.alive:  # a write after close reopens
            self._file = _acquire(self.path, *self._args)
            self._release = weakref.finalize(self, _release, self._file)
        return self._file

    def append(self, data: bytes, marker: bytes = b"") -> WriteOutcome:
        """Append ``data`` (whole lines), after ``marker`` (a line) if given; never raises.

        The file is reopened first if its path moved, was removed, or
        :func:`reopen_all` asked. A failed write drops whole lines only.

        Returns:
            What was dropped and why (see :class:`WriteOutcome`).
        """
        try:
            file = self._live_file()
        except DriverError as exc:
            return WriteOutcome(len(data), _count_lines(data), "refused", str(exc))
        return file.append(data, marker)

    def write(self, data: Buffer) -> None:
        """Append ``data`` (whole lines), rotating first if it would exceed ``max_size``.

        Raises:
            OSError: the write or the rotation failed (disk full...).
            DriverError: the file cannot be reopened (a link at its path...).
        """
        file = self._live_file()
        with file.lock:
            try:
                file.ready()
                file.put(bytes(data))
            finally:
                file.close_if_retired()

    def writev(self, parts: Sequence[Buffer]) -> None:
        """Append the concatenation of ``parts`` (whole lines); raises like :meth:`write`."""
        self.write(b"".join(parts))

    def write_line(self, line: str) -> None:
        """Append one line of text (UTF-8); a newline is added."""
        self.write((line + "\n").encode("utf-8", "replace"))

    def rotate(self) -> None:
        """Shift ``path`` to ``path.1`` (``path.N`` dropped) and start an empty file.

        Raises:
            OSError, DriverError: a rename failed, or the new file cannot be opened.
        """
        self._live_file().rotate()

    def reopen(self) -> None:
        """Close and reopen the path now (see :func:`reopen_all`); never raises."""
        self._live_file().request_reopen()

    def close(self) -> None:
        """Release this handle; idempotent. The file closes with its last handle.
        A later write reopens it."""
        self._release()


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


_WRITE_LIMITER: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "hostvisor_log_writers"
)


def _write_limiter() -> anyio.CapacityLimiter:
    """The threads that write logs: their own, so a hung disk never takes the default
    pool (docker calls, /proc scans) with it."""
    try:
        return _WRITE_LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(WRITE_THREADS)
        _WRITE_LIMITER.set(limiter)
        return limiter


class _Writer:
    """Takes whole lines from a log's drains and writes them in a worker thread.

    :meth:`put` never waits. Past ``backlog`` bytes queued, the drains wait in
    :meth:`room` for the disk (the child waits as it would for a synchronous
    write); once no write has completed for :data:`WRITE_STALL` seconds (a hung
    disk) they read on and whole lines are dropped, a gap (``None``) marking
    where. Used on the event loop.
    """

    def __init__(self, log: RotatingLog, drops: LogDrops, backlog: int = WRITE_BACKLOG) -> None:
        self.log, self.drops, self.backlog = log, drops, backlog
        self._items: list[bytes | None] = []
        self._queued = 0
        self._wake = anyio.Event()
        self._taken = anyio.Event()
        self._closing = False
        self._stalled = False
        self._marker_due = False
        self._scope: anyio.CancelScope | None = None
        self._abandoned = False  # closing, a write was left hanging: drop the rest

    async def room(self) -> None:
        """Wait while the queue is full and the disk is still taking writes."""
        while self._queued >= self.backlog and not self._stalled:
            with anyio.move_on_after(WRITE_STALL):
                await self._taken.wait()
                continue
            self._stalled = True

    def put(self, data: bytes) -> None:
        if self._stalled and self._queued + len(data) > self.backlog:
            why = f"the disk took no write for {WRITE_STALL:g} s"
            self.drops.dropped(self.log.path, len(data), _count_lines(data), "backlog", why)
            if not self._items or self._items[-1] is not None:
                self._items.append(None)
            return
        self._items.append(data)
        self._queued += len(data)
        self._wake.set()

    def close(self) -> None:
        """Write what is queued, then let :meth:`run` return; a write that takes longer
        than :data:`WRITE_STALL` seconds from now is abandoned (a hung disk must not
        keep the instance's drain alive) and the rest dropped."""
        self._closing = True
        self._wake.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, anyio.current_time() + WRITE_STALL)

    async def run(self) -> None:
        try:
            while self._items or not self._closing:
                if not self._items:
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                await self._write_queued()
        finally:
            if self._items:  # cancelled: a last, bounded try for what was read
                with anyio.move_on_after(1.0, shield=True):
                    await self._write_queued()

    async def _write_queued(self) -> None:
        items, self._items, self._queued = self._items, [], 0
        self._taken.set()
        self._taken = anyio.Event()
        chunk: list[bytes] = []
        for item in items:
            if item is not None:
                chunk.append(item)
                continue
            if chunk:
                await self._write(b"".join(chunk))
                chunk = []
            self._marker_due = True
        if chunk:
            await self._write(b"".join(chunk))

    async def _write(self, data: bytes) -> None:
        marker = self.drops.marker() if self._marker_due else b""
        why = f"the disk took no write for {WRITE_STALL:g} s"
        outcome = WriteOutcome(len(data), _count_lines(data), "backlog", why)
        if not self._abandoned:
            with anyio.CancelScope() as self._scope:
                if self._closing:
                    self._scope.deadline = anyio.current_time() + WRITE_STALL
                outcome = await anyio.to_thread.run_sync(
                    self.log.append, data, marker, abandon_on_cancel=True, limiter=_write_limiter()
                )
            self._abandoned = self._scope.cancelled_caught
            self._scope = None
        self._stalled = False
        if outcome.marked:
            self.drops.marked()
        if outcome.error:
            path, nbytes, nlines = self.log.path, outcome.dropped_bytes, outcome.dropped_lines
            self.drops.dropped(path, nbytes, nlines, outcome.error, outcome.message)
            self._marker_due = True
        elif self._marker_due:
            self._marker_due = False
            self.drops.resumed(self.log.path)


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


def _emit(writer: _Writer, data: bytes, hub: LogHub | None, key: str | None) -> None:
    writer.put(data)
    if hub is not None and hub.has_subscribers(key):
        text = data.decode("utf-8", "replace")
        hub.publish(key, text.removesuffix("\n").split("\n"))


async def _read(
    fd: int,
    writer: _Writer,
    stats: DrainStats,
    *,
    hub: LogHub | None,
    key: str | None,
    pending_cap: int = PENDING_CAP,
) -> None:
    pending = b""
    try:
        while True:
            await writer.room()
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
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
    finally:
        os.close(fd)


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
    writer = _Writer(log, drops if drops is not None else LogDrops())
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run)
        await _read(fd, writer, stats, hub=hub, key=key, pending_cap=pending_cap)
        writer.close()
    return stats


async def drain_all(
    fds: Sequence[int],
    log: RotatingLog,
    *,
    hub: LogHub | None = None,
    key: str | None = None,
    stats: Sequence[DrainStats] = (),
    drops: LogDrops | None = None,
) -> None:
    """Drain every pipe in ``fds`` into ``log`` concurrently (see :func:`drain`); close ``log``
    when all hit EOF and their lines are written (or when cancelled).

    Args:
        drops: the service's :class:`LogDrops` (keep one per service, across instances,
            for ``logs_dropped_bytes``); a new one when not given.
    """
    writer = _Writer(log, drops if drops is not None else LogDrops())
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            async with anyio.create_task_group() as readers:
                for index, fd in enumerate(fds):
                    each = stats[index] if index < len(stats) else DrainStats()
                    readers.start_soon(partial(_read, fd, writer, each, hub=hub, key=key))
            writer.close()
    finally:
        log.close()


class LogFollower(ObjectReceiveStream[str]):
    """One follower's lines, bounded in bytes: a slow reader skips ahead.

    When a new line would take the queue over ``max_bytes`` (characters plus
    64 per line), the oldest lines are discarded, and the reader's next line
    is ``[hostvisor: N lines skipped, follower too slow]``. Lines are cut at
    :data:`FOLLOW_LINE_MAX` characters.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.skipped = 0
        self._lines: deque[str] = deque()
        self._bytes = 0
        self._unreported = 0
        self._closed = False
        self._wake = anyio.Event()

    def __repr__(self) -> str:
        return f"<LogFollower {len(self._lines)} lines, {self._bytes}/{self.max_bytes} bytes>"

    @property
    def queued_bytes(self) -> int:
        """Bytes held for the reader (characters plus 64 per line); at most ``max_bytes``
        plus one line."""
        return self._bytes

    def offer(self, line: str) -> int:
        """Queue ``line``; never blocks. Returns the number of old lines discarded."""
        line = line[:FOLLOW_LINE_MAX]
        cost = len(line) + _LINE_OVERHEAD
        skipped = 0
        while self._lines and self._bytes + cost > self.max_bytes:
            self._bytes -= len(self._lines.popleft()) + _LINE_OVERHEAD
            skipped += 1
        self._lines.append(line)
        self._bytes += cost
        self._unreported += skipped
        self.skipped += skipped
        self._wake.set()
        return skipped

    def receive_nowait(self) -> str:
        """The next line, or raise ``anyio.WouldBlock`` / ``anyio.EndOfStream``."""
        if self._unreported:
            count, self._unreported = self._unreported, 0
            return f"[hostvisor: {count} lines skipped, follower too slow]"
        if self._lines:
            line = self._lines.popleft()
            self._bytes -= len(line) + _LINE_OVERHEAD
            return line
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> str:
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                await self._wake.wait()
                self._wake = anyio.Event()

    async def aclose(self) -> None:
        self._closed = True
        self._wake.set()


class LogHub:
    """Live followers of service logs (key: the service name) and the daemon log (key ``None``).

    A publisher never blocks; a follower holds at most ``max_bytes`` of lines
    and skips ahead when it falls behind (see :class:`LogFollower`); lines
    skipped by all followers are counted in :attr:`dropped`.
    """

    def __init__(self) -> None:
        self._subscribers: dict[str | None, set[LogFollower]] = {}
        self.dropped = 0

    def __repr__(self) -> str:
        count = sum(len(s) for s in self._subscribers.values())
        return f"<LogHub subscribers={count} dropped={self.dropped}>"

    def has_subscribers(self, key: str | None) -> bool:
        """True if anyone follows ``key`` (cheap; drains check it for every chunk)."""
        return bool(self._subscribers.get(key))

    def publish(self, key: str | None, lines: Sequence[str]) -> None:
        """Hand ``lines`` (without newlines) to every follower of ``key``; never blocks."""
        for follower in tuple(self._subscribers.get(key, ())):
            for line in lines:
                self.dropped += follower.offer(line)

    @asynccontextmanager
    async def subscribe(
        self, key: str | None, *, max_bytes: int = FOLLOW_BUFFER
    ) -> AsyncIterator[LogFollower]:
        """Receive every line published for ``key`` while the context is open.

        Args:
            key: a service name, or ``None`` for the daemon log.
            max_bytes: bytes of lines held for a slow reader before it skips ahead.

        Yields:
            A :class:`LogFollower` (an ``ObjectReceiveStream[str]``: ``async for line in it``).
        """
        follower = LogFollower(max_bytes)
        self._subscribers.setdefault(key, set()).add(follower)
        try:
            yield follower
        finally:
            followers = self._subscribers.get(key)
            if followers is not None:
                followers.discard(follower)
                if not followers:
                    del self._subscribers[key]
            await follower.aclose()


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
