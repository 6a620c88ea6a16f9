"""``<state>/jobs.json``: what a job must remember across daemon restarts (clean or not).

Per job: the time of the last trigger that fired (``catch_up`` and the ``every``
cadence go on from it, as systemd's ``Persistent=`` keeps a timer's stamp file), the
number of runs so far (run numbers go on), and the last run (the ``last_run`` status
field). One file for every job, rewritten atomically (write, fsync, rename; mode 0600)
at most once a second while something changed, and once more when the daemon stops::

    {"format": 1, "jobs": {"claim-task": {"last_trigger": 1764639000.0, "runs": 42,
     "last_run": {"number": 42, "trigger": "schedule", "started": 1764639000.2,
                  "duration": 1.5, "exit": {"code": 0, "signal": null}, "outcome": "succeeded"}}}}

A missing, unreadable or malformed file (or entry) is an empty history: the daemon says
so in its log once and goes on; nothing in it can stop a job from running.
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from supervisor.statefile import atomic_write, read_regular
from supervisor.states import ExitStatus

if TYPE_CHECKING:
    from supervisor.job import JobSupervisor

__all__ = ["FLUSH_EVERY", "JobLedger", "ledger_path"]

FORMAT = 1
#: Seconds between two writes of the file, at most one write per interval.
FLUSH_EVERY = 1.0
#: The file is read only up to this size (a job's entry is ~300 bytes).
MAX_SIZE = 16 * 1024 * 1024
#: The latest epoch second read back: 9998-12-31, so a datetime (and RFC 3339) of it and
#: of it plus a run's duration or an interval still exists (``datetime`` ends at 9999).
MAX_STAMP = 253370764800.0


_TRIGGERS = ("schedule", "catch_up", "start")
_OUTCOMES = ("succeeded", "failed", "timed_out", "stopped")


def ledger_path(state_dir: Path) -> Path:
    """``<state>/jobs.json``."""
    return state_dir / "jobs.json"


class JobLedger:
    """The jobs' history, loaded once at start and written back in the background.

    Args:
        path: ``<state>/jobs.json``.
        warn: called with one line when the file cannot be read or written.
    """

    def __init__(self, path: Path, *, warn: Any = None) -> None:
        self.path = path
        self._warn = warn
        self._jobs: dict[str, dict[str, Any]] = self._load()
        self._dirty = anyio.Event()
        self._failing = False

    def __repr__(self) -> str:
        return f"<JobLedger {self.path} jobs={len(self._jobs)}>"

    def _say(self, line: str) -> None:
        if self._warn is not None:
            self._warn(line)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = read_regular(self.path, MAX_SIZE)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else exc
            self._say(f"cannot read {self.path}: {why}; job history starts afresh")
            return {}
        if data is None:
            return {}
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            doc = None
        jobs = doc.get("jobs") if isinstance(doc, dict) and doc.get("format") == FORMAT else None
        if not isinstance(jobs, dict):
            self._say(f"{self.path} is not a job history this version reads; it starts afresh")
            return {}
        return {str(k): v for k, v in jobs.items() if isinstance(v, dict)}

    def restore(self, job: JobSupervisor) -> None:
        """Put the recorded history of ``job`` into it (its last trigger, run count and
        last run); a malformed entry is ignored."""
        from supervisor.job import LastRun

        entry = self._jobs.get(job.name)
        if entry is None:
            return
        stamp = _number(entry.get("last_trigger"))
        if stamp is not None:
            job.last_trigger = datetime.fromtimestamp(stamp, UTC)
        runs = _count(entry.get("runs"))
        if runs is not None:
            job.run_count = runs
        last = entry.get("last_run")
        if isinstance(last, dict):
            started = _number(last.get("started"))
            number = _count(last.get("number"))
            if started is not None and number:
                job.run_count = max(job.run_count, number)  # run numbers only go on
                exit_ = _exit(last.get("exit"))
                outcome = last.get("outcome")
                trigger = last.get("trigger")
                job.last_run = LastRun(
                    number=number,
                    trigger=trigger if trigger in _TRIGGERS else "schedule",
                    started=started,
                    duration=_number(last.get("duration")),
                    exit=exit_,
                    outcome=outcome if outcome in _OUTCOMES else "failed",  # "running": died
                )
                job.last_exit = exit_

    def record(self, job: JobSupervisor) -> None:
        """Note ``job``'s history now; written within :data:`FLUSH_EVERY` seconds."""
        last = job.last_run
        self._jobs[job.name] = {
            "last_trigger": job.last_trigger.timestamp() if job.last_trigger else None,
            "runs": job.run_count,
            "last_run": None
            if last is None
            else {
                "number": last.number,
                "trigger": last.trigger,
                "started": last.started,
                "duration": last.duration,
                "exit": last.exit.as_json() if last.exit is not None else None,
                "outcome": last.outcome,
            },
        }
        self._dirty.set()

    def forget(self, names: set[str]) -> None:
        """Keep only the jobs named (a reload removed the others)."""
        for name in set(self._jobs) - names:
            del self._jobs[name]
        self._dirty.set()

    def flush(self) -> None:
        """Write the file now (blocking; the daemon calls it once more as it stops)."""
        doc = {"format": FORMAT, "jobs": self._jobs}
        try:
            atomic_write(self.path, json.dumps(doc, separators=(",", ":")).encode())
        except (OSError, ValueError) as exc:
            if not self._failing:
                self._say(f"cannot write {self.path}: {exc}; retrying")
            self._failing = True
        else:
            if self._failing:
                self._say(f"{self.path} written again")
            self._failing = False

    async def run(self) -> None:
        """Write the file after changes, at most once every :data:`FLUSH_EVERY` seconds,
        until cancelled (then once more, shielded, if anything is unwritten)."""
        try:
            while True:
                await self._dirty.wait()
                self._dirty = anyio.Event()
                await anyio.to_thread.run_sync(self.flush)
                await anyio.sleep(FLUSH_EVERY)
        finally:
            if self._dirty.is_set():
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await anyio.to_thread.run_sync(self.flush)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0 <= number <= MAX_STAMP else None


def _count(value: Any, limit: int = 2**53) -> int | None:
    """``value`` if it is an int (not a bool) in ``[0, limit)``, else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit
    return value if ok else None


def _exit(value: Any) -> ExitStatus | None:
    if not isinstance(value, dict):
        return None
    code, sig = value.get("code"), value.get("signal")
    return ExitStatus(
        code=_count(code, 2**31),
        signal=_count(sig, 2**31),
    )
