"""The daemon's own log: JSON lines in ``<state>/logs/hostvisor.log``, human lines on stderr.

Every event of the bus is written as one JSON object per line (the event's
fields of contract section 6 plus ``level``); messages of the daemon itself
(``listening on ...``) as ``{"time", "level", "message"}``. The same lines go to
stderr in a human form, which journald and launchd capture.

Never in the way, never fatal:

- stderr is written by a thread of its own through a queue of
  :data:`STDERR_BUFFER` bytes. A reader that stops reading (``hostvisor run |
  less``, Ctrl-S on a terminal, a stalled journald) blocks that thread only;
  lines that do not fit are dropped and counted, and when the reader resumes
  one line says ``N log lines dropped: stderr was not being read``. The
  descriptor's flags are left alone (``O_NONBLOCK`` on a shared terminal or
  pipe would make the shell and every other writer of it fail with EAGAIN).
- ``hostvisor.log`` is written on the event loop's thread only. Library log
  records from other threads (OpenTelemetry's exporters) are queued and written
  by :meth:`DaemonLog.run` on the loop. A write that fails (disk full, the folder
  removed...) drops that line, counted in :attr:`DaemonLog.drops`; the file is
  reopened and its folder recreated by :class:`~supervisor.logfiles.RotatingLog`.
  Nothing raises out of the log.
- Messages, fields, tracebacks and library records pass through the redactor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import anyio
import anyio.abc

from supervisor.events import Event
from supervisor.logfile import RotatingLog
from supervisor.logfiles import LogDrops
from supervisor.loghub import LogHub

__all__ = ["LEVELS", "STDERR_BUFFER", "DaemonLog", "LibraryLogHandler"]

#: Numeric ranks of the ``log_level`` values (and of event severities).
LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}
#: Bytes of human lines held for a stderr that is not being read.
STDERR_BUFFER = 64 << 10
#: Records from other threads held for the loop before new ones are dropped.
_INBOX_MAX = 1000
#: Characters of a traceback kept in a record (its end).
_TRACEBACK_MAX = 16 << 10


class _Stderr:
    """Human lines to ``stream`` from a thread of their own (see the module docstring)."""

    def __init__(self, stream: TextIO, limit: int = STDERR_BUFFER) -> None:
        self._stream = stream
        try:
            self._fd = stream.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = -1  # a StringIO...: written with write()
        self._limit = limit
        self._lines: deque[str] = deque()
        self._bytes = 0
        self._unreported = 0
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def put(self, line: str) -> None:
        """Queue one line (with its newline); never blocks."""
        with self._cond:
            if self._bytes + len(line) > self._limit:
                self._unreported += 1
                self.dropped += 1
                return
            self._report_drops()
            self._lines.append(line)
            self._bytes += len(line)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hostvisor-stderr", daemon=True
                )
                self._thread.start()

    def _report_drops(self) -> None:
        if self._unreported:
            count, self._unreported = self._unreported, 0
            self._lines.append(f"{count} log lines dropped: stderr was not being read\n")

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._lines:
                    self._report_drops()  # the reader took everything: it is back
                while not self._lines:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                self._busy = True
                text = "".join(self._lines)
                self._lines.clear()
                self._bytes = 0
            self._out(text)

    def _out(self, text: str) -> None:
        try:
            if self._fd < 0:
                self._stream.write(text)
                self._stream.flush()
                return
            view = memoryview(text.encode("utf-8", "replace"))
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except BlockingIOError:  # someone else made it non-blocking
                    select.select([], [self._fd], [])
        except (OSError, ValueError):  # stderr closed: keep going
            pass

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until every queued line is written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._thread is not None and (self._lines or self._busy):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)


class DaemonLog:
    """Writes daemon lines to a rotating JSON log, stderr, and live followers.

    Args:
        log: the rotating ``hostvisor.log`` file, or None (stderr only).
        level: the lowest level written (``debug`` ... ``error``).
        hub: followers of ``hostvisor logs -f`` (key ``None``).
        stream: where human lines go (stderr).
        redactor: applied to messages, fields and tracebacks (the bus's
            :class:`~supervisor.events.Redactor`; events arrive redacted already).
        drops: counts lines ``hostvisor.log`` lost (a new one when not given);
            its ``on_report`` may publish ``hostvisor.logs.dropped``.

    Built on the event loop's thread: that thread writes the file. :meth:`write`
    may be called from any thread; :meth:`event` on the loop only.
    """

    def __init__(
        self,
        log: RotatingLog | None,
        *,
        level: str = "info",
        hub: LogHub | None = None,
        stream: TextIO | None = None,
        redactor: Callable[[str], str] | None = None,
        drops: LogDrops | None = None,
    ) -> None:
        self._log = log
        self.level = LEVELS.get(level.lower(), 20)
        self._hub = hub
        self._human = _Stderr(stream if stream is not None else sys.stderr)
        self._redact = redactor
        self.drops = drops if drops is not None else LogDrops()
        self._marker_due = False
        self._owner = threading.get_ident()
        self._inbox: deque[tuple[str, str, dict[str, Any]]] = deque()
        self._inbox_dropped = 0
        self._wakeup = -1
        self._wakeup_lock = threading.Lock()
        self.failures = 0

    def __repr__(self) -> str:
        return f"<DaemonLog level={self.level} dropped={self.drops.lines}>"

    @property
    def stderr_dropped(self) -> int:
        """Human lines dropped because stderr was not being read."""
        return self._human.dropped

    def event(self, event: Event) -> None:
        """Write one bus event (on the event loop)."""
        record = {**event.as_json(), "level": event.severity.lower()}
        service = f"{event.service}: " if event.service else ""
        self._emit(record, f"{event.event} {service}{event.message}")

    def write(self, level: str, message: str, **fields: Any) -> None:
        """Write a daemon message (not an event); from any thread, never raises."""
        if LEVELS.get(level, 20) < self.level:
            return
        if threading.get_ident() != self._owner:
            self._hand_over(level, message, fields)
            return
        self._flush_inbox()
        self._message(level, message, fields)

    def write_exception(self, message: str, exc: BaseException, **fields: Any) -> None:
        """Write ``message: Type: text`` at level error, with the traceback (redacted) in
        ``exception.stacktrace`` (OpenTelemetry's attribute names)."""
        text = "".join(traceback.format_exception(exc))[-_TRACEBACK_MAX:]
        fields = {
            "exception.type": type(exc).__qualname__,
            "exception.stacktrace": text,
            **fields,
        }
        self.write("error", f"{message}: {type(exc).__name__}: {exc}", **fields)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the records other threads hand over, on this (the loop's) thread, until
        cancelled. Without it they wait for the next :meth:`write` on the loop."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._owner = threading.get_ident()
        with self._wakeup_lock:
            self._wakeup = write_fd
        task_status.started()
        try:
            while True:
                self._flush_inbox()
                await anyio.wait_readable(read_fd)
                with contextlib.suppress(OSError):
                    os.read(read_fd, 4096)
        finally:
            with self._wakeup_lock:
                self._wakeup = -1
                os.close(write_fd)
            os.close(read_fd)
            self._flush_inbox()

    def close(self) -> None:
        """Write what other threads handed over, close the file, and give stderr up to
        one second to take the last lines."""
        self._flush_inbox()
        if self._log is not None:
            self._log.close()
        self._human.flush(1.0)

    # ------------------------------------------------------------ inside

    def _hand_over(self, level: str, message: str, fields: dict[str, Any]) -> None:
        if len(self._inbox) >= _INBOX_MAX:
            self._inbox_dropped += 1
            return
        self._inbox.append((level, message, fields))
        with self._wakeup_lock, contextlib.suppress(OSError):  # full: a wake-up is pending
            if self._wakeup >= 0:
                os.write(self._wakeup, b"\0")

    def _flush_inbox(self) -> None:
        while self._inbox:
            self._message(*self._inbox.popleft())
        if self._inbox_dropped:
            count, self._inbox_dropped = self._inbox_dropped, 0
            self._message("warning", f"{count} library log records dropped (queue full)", {})

    def _message(self, level: str, message: str, fields: dict[str, Any]) -> None:
        try:
            if self._redact is not None:
                message = self._redact(message)
                fields = {
                    k: self._redact(v) if isinstance(v, str) else v for k, v in fields.items()
                }
            now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            self._emit({"time": now, "level": level, "message": message, **fields}, message)
        except Exception:  # a field that cannot be redacted...: never out of the log
            self.failures += 1

    def _emit(self, record: dict[str, Any], human: str) -> None:
        try:
            level = str(record.get("level", "info"))
            if LEVELS.get(level, 20) < self.level:
                return
            line = json.dumps(record, separators=(",", ":"), default=str)
            stamp = str(record.get("time", ""))[11:23]
            if self._log is not None:
                self._write_file(line, stamp)
            if self._hub is not None and self._hub.has_subscribers(None):
                self._hub.publish(None, [line])
            human = human.replace("\n", " | ")  # one event, one line (journald, launchd)
            self._human.put(f"{stamp} {level.upper():<5} {human}\n")
        except Exception:  # a full disk, a bug in a field: the daemon goes on
            self.failures += 1

    def _write_file(self, line: str, stamp: str) -> None:
        assert self._log is not None
        marker = self.drops.marker() if self._marker_due else b""
        outcome = self._log.append(line.encode("utf-8", "replace") + b"\n", marker)
        if outcome.marked:
            self.drops.marked()
        if outcome.error:
            path = self._log.path
            if not self.drops.failing:
                self._human.put(
                    f"{stamp} ERROR cannot write the daemon log {path} ({outcome.message}): "
                    "dropping its lines until writes succeed\n"
                )
            self.drops.dropped(
                path, outcome.dropped_bytes, outcome.dropped_lines, outcome.error, outcome.message
            )
            self._marker_due = True
        elif self._marker_due:
            self._marker_due = False
            self.drops.resumed(self._log.path)


class LibraryLogHandler(logging.Handler):
    """Routes Python ``logging`` of the libraries we use (asyncio, OpenTelemetry's SDK) into
    the daemon log, at most one line per message template (``record.msg``) and logger
    per ``every`` seconds.

    A collector that is down makes the OpenTelemetry SDK log every failed export,
    each with its own text (``... retrying in 1.2s``); those drops are already
    counted in ``hostvisor.telemetry.dropped``, so one line a minute per template
    is enough. A record's traceback goes into ``exception.stacktrace``; the
    daemon log redacts both. asyncio's "Exception in callback Future.set_result
    ... invalid state", from a cancelled socket wait in anyio (agronholm/anyio#1267),
    is dropped: it is harmless and says nothing a user could act on. Records from
    other threads are handed to the loop by :meth:`DaemonLog.write`.
    """

    def __init__(self, log: DaemonLog, *, every: float = 60.0) -> None:
        super().__init__(level=logging.WARNING)
        self._log = log
        self._every = every
        self._last: dict[tuple[str, str], float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit(record)
        except Exception:  # never back into the library that logged
            return

    def _emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "asyncio" and type(exc).__name__ == "InvalidStateError":
            return
        key = (record.name, str(record.msg)[:300])
        now = time.monotonic()
        if now - self._last.get(key, -self._every) < self._every:
            return
        if len(self._last) >= 1000:  # many templates: forget the old ones
            self._last = {k: t for k, t in self._last.items() if now - t < self._every}
        self._last[key] = now
        message = (record.getMessage().splitlines() or [""])[0][:300]
        fields: dict[str, Any] = {"logger": record.name}
        if exc is not None:
            fields["exception.type"] = type(exc).__qualname__
            fields["exception.stacktrace"] = "".join(traceback.format_exception(exc))[
                -_TRACEBACK_MAX:
            ]
        level = "error" if record.levelno >= logging.ERROR else "warning"
        self._log.write(level, f"{record.name}: {message}", **fields)
