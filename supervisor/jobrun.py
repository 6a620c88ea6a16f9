"""The pieces of one job run (:mod:`supervisor.job`): the run in progress, the record of
the last run (the ``last_run`` status field), and the run's own "changed" signal."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio

from supervisor.events import rfc3339
from supervisor.service import Broadcast, ServiceSupervisor
from supervisor.states import ExitStatus

__all__ = ["LastRun", "Outcome", "Relay", "Run", "wall_now"]

Outcome = str  # "running" | "succeeded" | "failed" | "timed_out" | "stopped"


def wall_now() -> datetime:
    """The wall clock, as an aware UTC datetime (the default clock of a job)."""
    return datetime.now(UTC)


class Relay(Broadcast):
    """A run's own "changed" signal that also fires the daemon's: the job waits on one
    run without being woken by every other service's changes."""

    def __init__(self, parent: Broadcast) -> None:
        super().__init__()
        self._parent = parent

    def fire(self) -> None:
        super().fire()
        self._parent.fire()


@dataclass(slots=True, kw_only=True)
class LastRun:
    """The most recent run of a job (the ``last_run`` status field).

    Attributes:
        number: the run's number (from 1, kept across daemon restarts).
        trigger: ``"schedule"``, ``"catch_up"`` or ``"start"``.
        started: epoch seconds.
        duration: seconds, ``None`` while it runs.
        exit: how its last attempt ended, if a process ran.
        outcome: ``running``, ``succeeded``, ``failed``, ``timed_out`` or ``stopped``.
    """

    number: int
    trigger: str
    started: float
    duration: float | None = None
    exit: ExitStatus | None = None
    outcome: Outcome = "running"

    def as_json(self) -> dict[str, Any]:
        """``{"run", "trigger", "started", "duration_seconds", "exit", "outcome"}``."""
        return {
            "run": self.number,
            "trigger": self.trigger,
            "started": rfc3339(datetime.fromtimestamp(self.started, UTC)),
            "duration_seconds": round(self.duration, 3) if self.duration is not None else None,
            "exit": self.exit.as_json() if self.exit is not None else None,
            "outcome": self.outcome,
        }


@dataclass(slots=True, kw_only=True, eq=False)
class Run:
    """One run in progress: its supervisor and what the job must know about it."""

    number: int
    trigger: str
    sup: ServiceSupervisor
    record: LastRun
    started: float = field(default_factory=anyio.current_time)
    timed_out: bool = False
    stopped: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    #: Its retries (``restart = "on-failure"``, ``give_up_after = 0``) were ended by the
    #: next trigger: a failed run.
    gave_up: bool = False
    #: Commands (their numbers) that wait for this run to end.
    waiters: list[int] = field(default_factory=list)
