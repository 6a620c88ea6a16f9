"""How the CLI shows and judges jobs (issue 11): the NEXT-RUN and LAST-RUN columns of
``hostvisor status``, which entries count as fine for its exit code, and what
``start``/``restart`` of a job report; and the state colours ``status`` and ``top`` share.

A status entry is a job's when it has a ``last_run`` field (contract section 5).
Stdlib only, and only ``time`` at import: ``status`` stays light (issue 14).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # stdlib ``typing`` costs ~2 ms at start-up: annotations only
    from typing import Any

__all__ = [
    "JOB_COLUMNS",
    "STYLES",
    "action_verdict",
    "duration_text",
    "fine",
    "is_job",
    "job_cells",
]

#: Columns added to the status table when any job is listed.
JOB_COLUMNS = ("NEXT-RUN", "LAST-RUN")
#: rich styles of states and health values on a terminal (``status`` and ``top``).
STYLES = {
    "running": "green",
    "healthy": "green",
    "waiting": "cyan",
    "starting": "yellow",
    "stopping": "yellow",
    "backoff": "yellow",
    "unknown": "yellow",
    "fatal": "bold red",
    "unhealthy": "bold red",
    "stopped": "dim",
    "exited": "dim",
}


def is_job(entry: dict[str, Any]) -> bool:
    """Whether ``entry`` is a job's (scheduled unit or one-shot)."""
    return "last_run" in entry


def _outcome(entry: dict[str, Any]) -> str | None:
    last = entry.get("last_run")
    return str(last.get("outcome")) if isinstance(last, dict) else None


def fine(entry: dict[str, Any]) -> bool:
    """Counts as fine for ``status``'s exit code (contract section 7): a service that is
    running; a job that is running, waiting for its next run (unless its last run
    failed), or a one-shot that completed (exited 0)."""
    state = entry.get("state")
    if state == "running":
        return True
    if not is_job(entry):
        return False
    outcome = _outcome(entry)
    if state == "waiting":
        return outcome not in ("failed", "timed_out")
    if state == "exited":
        return outcome == "succeeded"
    return False


def duration_text(seconds: float | None) -> str:
    """``42s``, ``3m12s``, ``2h03m``, ``3d04h``; ``-`` for none (status columns)."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    from datetime import datetime  # only when a job is listed: 1.2 ms

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def job_cells(entry: dict[str, Any], now: float | None = None) -> list[str]:
    """The NEXT-RUN and LAST-RUN cells: ``in 4m12s`` / ``suspended`` / ``-``, and
    ``succeeded 2m03s ago`` / ``failed 10s ago`` / ``running`` / ``-``."""
    if not is_job(entry):
        return ["", ""]
    now = time.time() if now is None else now
    if entry.get("suspended"):
        upcoming = "suspended"
    else:
        moment = _epoch(entry.get("next_run"))
        upcoming = "-" if moment is None else f"in {duration_text(moment - now)}"
    last = entry.get("last_run")
    if not isinstance(last, dict):
        return [upcoming, "-"]
    outcome = str(last.get("outcome", "?"))
    if outcome == "running":
        return [upcoming, f"running (run {last.get('run')})"]
    started = _epoch(last.get("started"))
    duration = last.get("duration_seconds")
    ended = (
        started + duration if started is not None and isinstance(duration, int | float) else None
    )
    return [
        upcoming,
        outcome.replace("_", " ") + (f" {duration_text(now - ended)} ago" if ended else ""),
    ]


def action_verdict(entry: dict[str, Any], verb: str, *, resumed: bool = False) -> tuple[bool, str]:
    """After ``start``/``restart`` waited on a job: whether its run succeeded, and the line
    to print (``migrate: run 3 succeeded`` or why it did not).

    ``resumed``: ``start --all``, which only ends a job's suspension (and runs a one-shot
    that has not run yet): fine unless its last run failed."""
    name = entry.get("name")
    if resumed and verb == "start" and entry.get("state") == "waiting":
        return fine(entry), f"{name}: waiting" + ("" if fine(entry) else " (its last run failed)")
    last = entry.get("last_run")
    outcome = _outcome(entry)
    number = last.get("run") if isinstance(last, dict) else "?"
    if outcome == "succeeded" and entry.get("state") in ("waiting", "exited"):
        return True, f"{name}: run {number} succeeded"
    if outcome in ("running", None) or entry.get("state") in ("starting", "running", "backoff"):
        return False, f"{name}: run {number} has not ended: it is {entry.get('state')}"
    if entry.get("message"):
        return False, f"{name}: {entry['message']}"
    return False, f"{name}: run {number} {outcome}"
