"""Draining child output into size-rotated log files without ever blocking the child.

Each service's stdout and stderr are two separate non-blocking pipes, drained
by two tasks into one :class:`RotatingLog` (``<state>/logs/<service>.log``).
A drain writes only whole lines (up to the last newline it has seen), each
batch in one ``write``/``writev`` on an ``O_APPEND`` descriptor, and keeps the
partial line that follows for the next read. So lines from the two streams are
never torn or interleaved mid-line, none is duplicated or lost, and the drain
reads as fast as the child writes: the child never waits on the daemon. A line
longer than :data:`PENDING_CAP` without a newline is written out in pieces, so
memory stays bounded (at most ``PENDING_CAP + READ_SIZE`` per stream).

Rotation follows logrotate's numbering: ``x.log`` becomes ``x.log.1``,
``x.log.1`` becomes ``x.log.2``..., the oldest is dropped; it happens inside the
drain, before the write that would push the file over ``max_size``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from supervisor.errors import DriverError

__all__ = [
    "CAPTURE_LIMIT",
    "PENDING_CAP",
    "READ_SIZE",
    "DrainStats",
    "LogHub",
    "RotatingLog",
    "capture",
    "drain",
    "drain_all",
    "open_pipe",
    "pipe_budget",
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
    return fd


def _write_all(fd: int, data: Buffer) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class RotatingLog:
    """An append-only log file rotated at ``max_size`` bytes, keeping ``backups`` old files.

    Args:
        path: the log file; a symbolic link, FIFO or hard-linked file there is refused.
        max_size: bytes; a write that would push the file over it first rotates.
            A single line longer than ``max_size`` is still written whole.
        backups: old files kept as ``path.1`` (newest) .. ``path.N``;
            0 truncates the file instead.

    Raises:
        DriverError: the file cannot be opened, or is a link or not a regular file.
    """

    def __init__(self, path: Path, *, max_size: int, backups: int) -> None:
        self.path = path
        self.max_size = max(1, max_size)
        self.backups = max(0, backups)
        self._fd = _open_append(path)
        self._size = os.fstat(self._fd).st_size
        self.rotations = 0

    def __repr__(self) -> str:
        return f"<RotatingLog {self.path} {self._size}/{self.max_size} bytes>"

    @property
    def size(self) -> int:
        """Bytes in the current file."""
        return self._size

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd < 0

    def write(self, data: Buffer) -> None:
        """Append ``data`` (whole lines), rotating first if it would exceed ``max_size``.

        Raises:
            OSError: the write or the rotation failed (disk full...).
            DriverError: the file to write to cannot be reopened after a rotation.
        """
        if self._fd < 0:
            self._fd = _open_append(self.path)
            self._size = os.fstat(self._fd).st_size
        if self._size + len(data) <= self.max_size:
            _write_all(self._fd, data)
            self._size += len(data)
        else:
            self._write_rotating(bytes(data))

    def writev(self, parts: Sequence[Buffer]) -> None:
        """Append the concatenation of ``parts`` (whole lines) in one system call when it fits."""
        total = sum(len(p) for p in parts)
        if self._fd >= 0 and self._size + total <= self.max_size:
            done = os.writev(self._fd, parts)
            self._size += done
            if done < total:
                rest = memoryview(b"".join(parts))[done:]
                _write_all(self._fd, rest)
                self._size += len(rest)
        else:
            self.write(b"".join(parts))

    def write_line(self, line: str) -> None:
        """Append one line of text (UTF-8); a newline is added."""
        self.write((line + "\n").encode("utf-8", "replace"))

    def _write_rotating(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            room = self.max_size - self._size
            if end - pos <= room:
                cut = end
            else:
                cut = data.rfind(b"\n", pos, pos + max(room, 0)) + 1
                if cut <= pos:  # not even one whole line fits
                    if self._size > 0:
                        self.rotate()
                        continue
                    # An empty file and a line longer than max_size: write that line whole.
                    cut = data.find(b"\n", pos) + 1 or end
            _write_all(self._fd, memoryview(data)[pos:cut])
            self._size += cut - pos
            pos = cut
            if pos < end:
                self.rotate()

    def rotate(self) -> None:
        """Shift ``path`` to ``path.1`` (``path.N`` dropped) and start an empty file.

        Raises:
            OSError, DriverError: a rename failed, or the new file cannot be opened.
        """
        self.rotations += 1
        if self.backups == 0:
            os.ftruncate(self._fd, 0)
            self._size = 0
            return
        os.close(self._fd)
        self._fd = -1
        base = str(self.path)
        for index in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{base}.{index}", f"{base}.{index + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(base, f"{base}.1")
        self._fd = _open_append(self.path)
        self._size = 0

    def close(self) -> None:
        """Close the file; idempotent. A later write reopens it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(slots=True)
class DrainStats:
    """What a drain did.

    Attributes:
        bytes_read: bytes read from the pipe.
        max_pending: the largest partial line held between two reads, bytes
            (never more than the drain's ``pending_cap``).
        write_errors, bytes_dropped: failed writes to the log and their size.
    """

    bytes_read: int = 0
    max_pending: int = 0
    write_errors: int = 0
    bytes_dropped: int = 0


def _emit(
    log: RotatingLog,
    parts: Sequence[Buffer],
    stats: DrainStats,
    hub: LogHub | None,
    key: str | None,
) -> None:
    try:
        log.writev(parts)
    except (OSError, DriverError):
        # Never stop reading: a child blocked on a full pipe is worse than a lost log line.
        stats.write_errors += 1
        stats.bytes_dropped += sum(len(p) for p in parts)
    if hub is not None and hub.has_subscribers(key):
        text = b"".join(parts).decode("utf-8", "replace")
        hub.publish(key, text.removesuffix("\n").split("\n"))


async def drain(
    fd: int,
    log: RotatingLog,
    *,
    hub: LogHub | None = None,
    key: str | None = None,
    stats: DrainStats | None = None,
    pending_cap: int = PENDING_CAP,
) -> DrainStats:
    """Copy the non-blocking pipe ``fd`` into ``log`` line by line until EOF; close ``fd``.

    Args:
        fd: the read end of a pipe, in non-blocking mode; owned (closed) by the drain.
        log: the file to append to (not closed here: both streams share it).
        hub: live followers; lines are split and published only while
            ``hub.has_subscribers(key)``.
        key: the service name (``None`` for the daemon log).
        stats: filled in as the drain goes (pass one to watch a running drain).
        pending_cap: bytes of a partial line held before it is written out as is.

    Returns:
        ``stats``. At EOF a last partial line is written with a newline added.
        Write errors are counted in ``stats``, never raised: the pipe is always read.
    """
    stats = stats if stats is not None else DrainStats()
    pending = b""
    try:
        while True:
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
                    _emit(log, (pending,), stats, hub, key)
                    pending = b""
            else:
                if cut == len(chunk):
                    parts: tuple[Buffer, ...] = (pending, chunk) if pending else (chunk,)
                else:
                    parts = (pending, memoryview(chunk)[:cut]) if pending else (chunk[:cut],)
                _emit(log, parts, stats, hub, key)
                pending = chunk[cut:]
            stats.max_pending = max(stats.max_pending, len(pending))
            # Let other tasks run between chunks even when the pipe is never empty.
            await anyio.lowlevel.checkpoint()
        if pending:
            _emit(log, (pending, b"\n"), stats, hub, key)
    finally:
        os.close(fd)
    return stats


async def drain_all(
    fds: Sequence[int],
    log: RotatingLog,
    *,
    hub: LogHub | None = None,
    key: str | None = None,
    stats: Sequence[DrainStats] = (),
) -> None:
    """Drain every pipe in ``fds`` into ``log`` concurrently; close ``log`` when all hit EOF
    (or when cancelled)."""
    try:
        async with anyio.create_task_group() as tg:
            for index, fd in enumerate(fds):
                tg.start_soon(
                    _drain_task, fd, log, hub, key, stats[index] if index < len(stats) else None
                )
    finally:
        log.close()


async def _drain_task(
    fd: int, log: RotatingLog, hub: LogHub | None, key: str | None, stats: DrainStats | None
) -> None:
    await drain(fd, log, hub=hub, key=key, stats=stats)


class LogHub:
    """Live followers of service logs (key: the service name) and the daemon log (key ``None``).

    A publisher never blocks: a follower whose buffer is full loses lines
    (counted in :attr:`dropped`).
    """

    def __init__(self) -> None:
        self._subscribers: dict[str | None, set[MemoryObjectSendStream[str]]] = {}
        self.dropped = 0

    def __repr__(self) -> str:
        count = sum(len(s) for s in self._subscribers.values())
        return f"<LogHub subscribers={count} dropped={self.dropped}>"

    def has_subscribers(self, key: str | None) -> bool:
        """True if anyone follows ``key`` (cheap; drains check it for every chunk)."""
        return bool(self._subscribers.get(key))

    def publish(self, key: str | None, lines: Sequence[str]) -> None:
        """Hand ``lines`` (without newlines) to every follower of ``key``; never blocks."""
        streams = self._subscribers.get(key)
        if not streams:
            return
        for stream in tuple(streams):
            for line in lines:
                try:
                    stream.send_nowait(line)
                except anyio.WouldBlock:
                    self.dropped += 1
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    streams.discard(stream)
                    break

    @asynccontextmanager
    async def subscribe(
        self, key: str | None, *, buffer: int = 4096
    ) -> AsyncIterator[ObjectReceiveStream[str]]:
        """Receive every line published for ``key`` while the context is open.

        Args:
            key: a service name, or ``None`` for the daemon log.
            buffer: lines held for a slow reader before new ones are dropped.
        """
        send, receive = anyio.create_memory_object_stream[str](buffer)
        self._subscribers.setdefault(key, set()).add(send)
        try:
            async with receive:
                yield receive
        finally:
            streams = self._subscribers.get(key)
            if streams is not None:
                streams.discard(send)
                if not streams:
                    del self._subscribers[key]
            send.close()


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
