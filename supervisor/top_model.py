"""What ``hostvisor top`` shows, without the screen: rows, figures, histories, cells.

:class:`Board` holds the latest status entry of every service (contract section 5) and
the resource samples of the ``resources`` control method, and turns them into the
text of each cell. It knows nothing of textual, so it is tested and reused as plain
data. Times: ``now`` is :func:`time.monotonic` seconds (uptime ticks locally from the
moment an entry arrived), ``wall`` is :func:`time.time` (a job's next run).
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.cli_jobs import STYLES, duration_text, is_job, job_cells

__all__ = [
    "COLUMNS",
    "HISTORY",
    "STYLES",
    "Board",
    "Row",
    "human_bytes",
    "percent_text",
    "printable",
]

#: The table's columns, left to right.
COLUMNS = (
    "NAME",
    "KIND",
    "STATE",
    "HEALTH",
    "PID",
    "CPU%",
    "MEM",
    "UPTIME",
    "RESTARTS",
    "LAST-EXIT",
)
#: Terminal escape sequences (ECMA-48): CSI, the string commands (OSC, DCS, SOS, PM, APC)
#: up to their terminator, then any other ESC + one character; 7-bit and 8-bit forms.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c|$)"
    r"|\x1b[ -~]?",
    re.DOTALL,
)
#: Bidirectional overrides and isolates (Trojan Source): never shown.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(line: str) -> str:
    """``line`` (a service's own output) safe to put on a terminal: escape sequences are
    removed (they would clear the screen, move the cursor, retitle the window or set the
    clipboard), tabs expanded, line breaks (CR, VT, FF, U+2028...) become a space, other
    control characters (C0, DEL, C1) and bidi overrides are dropped."""
    out = []
    for char in _ESCAPES.sub("", line).expandtabs(8):
        category = unicodedata.category(char)
        if category in ("Zl", "Zp") or char in "\r\n\v\f\x1c\x1d\x1e\x85":
            out.append(" ")
        elif category != "Cc" and char not in _BIDI:
            out.append(char)
    return "".join(out)


#: Samples kept per service for the sparklines: one a second, the last minute.
HISTORY = 60


def human_bytes(count: int | None) -> str:
    """``512 B``, ``12.3 KiB``, ``1.5 MiB``, ``2.0 GiB`` (IEC binary units); ``-`` for none."""
    if count is None:
        return "-"
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def percent_text(value: float | None) -> str:
    """CPU as psutil counts it (100 = one core): ``0.0``, ``12.5``, ``250.1``; ``-`` for none."""
    return "-" if value is None else f"{value:.1f}"


def _last_exit(last: Any) -> str:
    from supervisor.cli import _last_exit as text  # the status table's formatter

    return text(last)


@dataclass(slots=True)
class Row:
    """One service: its last status entry (received at monotonic ``received``) and figures."""

    entry: dict[str, Any]
    received: float
    cpu: float | None = None
    memory: int | None = None
    cpu_history: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    memory_history: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def name(self) -> str:
        return str(self.entry.get("name", "?"))

    def uptime(self, now: float) -> float | None:
        """Seconds, ticking from the entry's ``uptime_seconds``; None without an instance."""
        base = self.entry.get("uptime_seconds")
        if not isinstance(base, int | float):
            return None
        return float(base) + max(0.0, now - self.received)

    def cells(self, now: float, wall: float) -> list[str]:
        """The text of each of :data:`COLUMNS`."""
        entry = self.entry
        pid, container = entry.get("pid"), entry.get("container_id")
        health = entry.get("health") or "none"
        if is_job(entry):
            upcoming = job_cells(entry, wall)[0]
            last = upcoming if upcoming in ("-", "suspended") else f"next {upcoming}"
        else:
            last = _last_exit(entry.get("last_exit"))
        return [
            self.name,
            str(entry.get("kind", "?")),
            str(entry.get("state", "?")),
            "-" if health == "none" else str(health),
            str(pid) if pid is not None else (str(container)[:12] if container else "-"),
            percent_text(self.cpu),
            human_bytes(self.memory),
            duration_text(self.uptime(now)),
            str(entry.get("restarts", 0)),
            last,
        ]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class Board:
    """Every service's row, in the daemon's order."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def __repr__(self) -> str:
        return f"<Board {len(self.rows)} services>"

    def replace(self, entries: Iterable[Mapping[str, Any]], now: float | None = None) -> None:
        """A full ``status``: exactly these services, in this order (histories kept)."""
        old, self.rows = self.rows, {}
        for entry in entries:
            name = str(entry.get("name", "?"))
            if name in old:
                self.rows[name] = old[name]
            self.update(entry, now)

    def update(self, entry: Mapping[str, Any], now: float | None = None) -> None:
        """One service's new status entry (a new service is added at the end)."""
        now = time.monotonic() if now is None else now
        name = str(entry.get("name", "?"))
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = Row(dict(entry), now)
        row.entry, row.received = dict(entry), now
        if "cpu_percent" in entry:  # status carries the figures too once the daemon samples
            row.cpu = _number(entry.get("cpu_percent"))
            memory = _number(entry.get("memory_bytes"))
            row.memory = None if memory is None else int(memory)

    def remove(self, name: str) -> None:
        self.rows.pop(name, None)

    def sample(self, result: Mapping[str, Any]) -> None:
        """A ``resources`` result ``{"services": {name: {cpu_percent, memory_bytes, ...}}}``."""
        figures = result.get("services")
        if not isinstance(figures, dict):
            return
        for name, row in self.rows.items():
            item = figures.get(name)
            if not isinstance(item, dict):
                continue
            row.cpu = _number(item.get("cpu_percent"))
            memory = _number(item.get("memory_bytes"))
            row.memory = None if memory is None else int(memory)
            row.cpu_history.append(row.cpu or 0.0)
            row.memory_history.append(float(row.memory or 0))

    def visible(self, needle: str) -> list[str]:
        """Names containing ``needle`` (the ``/`` filter), in the daemon's order."""
        return [name for name in self.rows if needle in name]
