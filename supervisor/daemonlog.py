"""The daemon's own log: JSON lines in ``<state>/logs/hostvisor.log``, human lines on stderr.

Every event of the bus is written as one JSON object per line (the event's
fields of contract section 6 plus ``level``); messages of the daemon itself
(``listening on ...``) as ``{"time", "level", "message"}``. The same lines go to
stderr in a human form, which journald and launchd capture.
"""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from supervisor.events import Event
from supervisor.logfiles import LogHub, RotatingLog

__all__ = ["LEVELS", "DaemonLog"]

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
            print(f"{stamp} {level.upper():<5} {human}", file=self._stream, flush=True)

    def close(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()
