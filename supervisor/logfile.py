"""Size-rotated, append-only log files: one open file per path, reopened when moved.

Rotation follows logrotate's numbering: ``x.log`` becomes ``x.log.1``,
``x.log.1`` becomes ``x.log.2``..., the oldest is dropped; it happens before
the write that would push the file over ``max_size``. A file moved or removed
under us (logrotate without ``copytruncate``, ``rm``, ``rm -rf logs/``) is
noticed within :data:`CHECK_EVERY` seconds of writing and reopened (missing
folders are recreated, mode 0700); :func:`reopen_all` reopens every open log at
once (SIGUSR1, logrotate's ``postrotate``).

A write cut short by a full disk is truncated back to its last whole line (or,
failing that, ended with a newline before the next marker line);
:meth:`RotatingLog.append` reports what was dropped as a :class:`WriteOutcome`
instead of raising.

One path, one file: every :class:`RotatingLog` of a path shares one open file
(its size, rotation and lock), so two instances of a service whose drains
overlap still append whole lines to one file and rotate it once.

Used from worker threads (see :mod:`supervisor.logfiles`, which drains child
output into these files); this module imports no async library.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import DriverError
from supervisor.fdlimits import relocate

__all__ = [
    "CHECK_EVERY",
    "RotatingLog",
    "WriteOutcome",
    "reopen_all",
]

#: Seconds between two checks that a log's path still names its open file.
CHECK_EVERY = 1.0

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
        try:
            os.mkdir(each, 0o700)
        except FileExistsError:
            if not each.is_dir():  # a file where the folder should be: say so
                raise DriverError(
                    f"cannot create the log folder {each}: a file is in the way (remove it)"
                ) from None


def count_lines(data: bytes) -> int:
    """Lines in ``data``, a last line without a newline counting as one."""
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
        try:
            self.open()
        except (DriverError, OSError):
            # The path cannot be opened now (its folder became a file...): never go on
            # writing into the file that left the path. The writes fail (lines dropped,
            # counted, one report per episode) and every next write tries the path again.
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            raise

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
            # The file's real size, not self.size: someone may have truncated it since our
            # last check (copytruncate), and ftruncate beyond its end would fill it with NULs.
            real = os.fstat(self.fd).st_size
            os.ftruncate(self.fd, max(0, real - torn))
            self.size = max(0, real - torn)
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
                return WriteOutcome(len(lost), count_lines(lost), name, why, marked)
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


@functools.lru_cache(maxsize=64)
def _real_folder(folder: str) -> str:
    # realpath costs an lstat per path component; a log folder's real path does not
    # change under a running daemon often enough to pay that at every spawn.
    return os.path.realpath(folder)


def _acquire(path: Path, max_size: int, backups: int) -> _File:
    key = os.path.join(_real_folder(str(path.parent)), path.name)
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
            return WriteOutcome(len(data), count_lines(data), "refused", str(exc))
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
