"""The daemon's own log: JSON lines in ``<state>/logs/hostvisor.log``, human lines on stderr.

Every event of the bus is written as one JSON object per line (the event's
fields of contract section 6 plus ``level``); messages of the daemon itself
(``listening on ...``) as ``{"time", "level", "message"}``. The same lines go to
stderr in a human form, which journald and launchd capture.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from supervisor.events import Event
from supervisor.logfiles import LogHub, RotatingLog

__all__ = ["LEVELS", "DaemonLog", "LibraryLogHandler"]

#: Numeric ranks of the ``log_level`` values (and of event severities).
LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}


class DaemonLog:
    """Writes daemon lines to a rotating JSON log, stderr, and live followers.

    Args:
        log: the rotating ``hostvisor.log`` file, or None (stderr only).
        level: the lowest level written (``debug`` ... ``error``).
        hub: followers of ``hostvisor logs -f`` (key ``None``).
        stream: where human lines go (stderr).
    """

    def __init__(
        self,
        log: RotatingLog | None,
        *,
        level: str = "info",
        hub: LogHub | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self._log = log
        self.level = LEVELS.get(level.lower(), 20)
        self._hub = hub
        self._stream = stream if stream is not None else sys.stderr

    def __repr__(self) -> str:
        return f"<DaemonLog level={self.level}>"

    def event(self, event: Event) -> None:
        """Write one bus event."""
        record = {**event.as_json(), "level": event.severity.lower()}
        service = f"{event.service}: " if event.service else ""
        self._emit(record, f"{event.event} {service}{event.message}")

    def write(self, level: str, message: str, **fields: Any) -> None:
        """Write a daemon message (not an event)."""
        time = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        self._emit({"time": time, "level": level, "message": message, **fields}, message)

    def _emit(self, record: dict[str, Any], human: str) -> None:
        level = str(record.get("level", "info"))
        if LEVELS.get(level, 20) < self.level:
            return
        line = json.dumps(record, separators=(",", ":"), default=str)
        if self._log is not None:
            try:
                self._log.write(line.encode() + b"\n")
            except OSError as exc:  # a full disk must not take the daemon down
                print(f"hostvisor: cannot write daemon log: {exc}", file=self._stream)
        if self._hub is not None and self._hub.has_subscribers(None):
            self._hub.publish(None, [line])
        stamp = str(record.get("time", ""))[11:23]
        with contextlib.suppress(OSError, ValueError):  # stderr closed: keep going
            human = human.replace("\n", " | ")  # one event, one line (journald, launchd)
            print(f"{stamp} {level.upper():<5} {human}", file=self._stream, flush=True)

    def close(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()


class LibraryLogHandler(logging.Handler):
    """Routes Python ``logging`` of the libraries we use (asyncio, OpenTelemetry's SDK) into
    the daemon log, at most one line per distinct message per ``every`` seconds.

    A collector that is down makes the OpenTelemetry SDK log every failed export;
    those drops are already counted in ``hostvisor.telemetry.dropped``, so one line a
    minute is enough. asyncio's "Exception in callback Future.set_result ... invalid
    state", from a cancelled socket wait in anyio (agronholm/anyio#1267), is dropped:
    it is harmless and says nothing a user could act on.
    """

    def __init__(self, log: DaemonLog, *, every: float = 60.0) -> None:
        super().__init__(level=logging.WARNING)
        self._log = log
        self._every = every
        self._last: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "asyncio" and type(exc).__name__ == "InvalidStateError":
            return
        message = record.getMessage().splitlines()[0][:300]
        now = time.monotonic()
        if now - self._last.get(message, -self._every) < self._every:
            return
        self._last[message] = now
        level = "error" if record.levelno >= logging.ERROR else "warning"
        self._log.write(level, f"{record.name}: {message}", logger=record.name)
