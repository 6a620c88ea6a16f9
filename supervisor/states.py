"""Service states, health, restart policies and the decisions made on an exit.

The state vocabulary is supervisord's (``supervisord.org/subprocess.html``,
"Process States"): STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED,
FATAL. Health uses the Kubernetes probe terms. Everything here is pure: no I/O,
no clock.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from supervisor.errors import IllegalTransition

__all__ = [
    "TRANSITIONS",
    "Decision",
    "DependencyCondition",
    "ExitStatus",
    "Health",
    "Restart",
    "ServiceState",
    "after_exit",
    "check_transition",
]


class ServiceState(enum.StrEnum):
    """Where a service is in its life cycle (supervisord's states)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"
    #: A scheduled unit between two runs (systemd's timers show "active (waiting)").
    WAITING = "waiting"


class Health(enum.StrEnum):
    """The result of a service's health probe; ``none`` when it has no probe."""

    NONE = "none"
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Restart(enum.StrEnum):
    """Restart policy, as systemd's ``Restart=`` and Docker's ``--restart``."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NO = "no"


class DependencyCondition(enum.StrEnum):
    """What a dependency must reach before a dependent starts (compose's terms)."""

    STARTED = "started"
    HEALTHY = "healthy"
    #: The dependency is a one-shot that exited 0 (compose's
    #: ``service_completed_successfully``).
    COMPLETED = "completed"


S = ServiceState

#: Legal moves: ``TRANSITIONS[source]`` is the set of allowed targets.
#: RUNNING -> STOPPED is the instance exiting on its own at the moment a stop was asked:
#: there is nothing left to stop. STOPPING -> FATAL is a health-check restart of an
#: instance that never reached RUNNING, counted towards ``give_up_after`` like a crash.
TRANSITIONS: dict[ServiceState, frozenset[ServiceState]] = {
    S.STOPPED: frozenset({S.STARTING, S.STOPPED}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.STOPPING, S.STOPPED, S.EXITED, S.FATAL}),
    S.RUNNING: frozenset({S.STOPPING, S.BACKOFF, S.EXITED, S.STARTING, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FATAL, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.EXITED, S.STARTING, S.FATAL}),
    S.EXITED: frozenset({S.STARTING, S.STOPPED}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
    S.WAITING: frozenset({S.STARTING, S.STOPPED}),
}


def check_transition(service: str, source: ServiceState, target: ServiceState) -> None:
    """Raise :class:`IllegalTransition` unless ``source -> target`` is in the table."""
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(service, source, target)


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process or container ended: exactly one of ``code`` and ``signal`` is set,
    unless the status is not known (:meth:`unknown`: both ``None``).

    ``code`` is the exit status (0-255); ``signal`` the number of the signal that
    killed it. A container's exit code is its ``State.ExitCode`` (137 for a kill).
    A process adopted after a daemon crash is not our child: its parent reaps it and
    its status is lost to us, so it ends with an unknown status, which the restart
    policy treats as a failure.
    """

    code: int | None = None
    signal: int | None = None

    @classmethod
    def unknown(cls) -> ExitStatus:
        """The status of an adopted process that ended: not known (both fields ``None``)."""
        return cls()

    @property
    def known(self) -> bool:
        """False for :meth:`unknown`."""
        return self.code is not None or self.signal is not None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        """Decode a ``waitpid(2)`` status word."""
        import os

        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.waitstatus_to_exitcode(status))

    @property
    def success(self) -> bool:
        """True for exit code 0."""
        return self.code == 0

    def describe(self) -> str:
        """``"exit code 1"``, ``"signal SIGKILL"`` or ``"exit status unknown"``."""
        if not self.known:
            return "exit status unknown (adopted: not our child)"
        if self.signal is not None:
            try:
                return f"signal {signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        return f"exit code {self.code}"

    def as_json(self) -> dict[str, int | bool | None]:
        """The ``last_exit`` object of contract section 5: ``{"code", "signal"}``; an
        unknown status is ``{"code": null, "signal": null, "unknown": true}``."""
        if not self.known:
            return {"code": None, "signal": None, "unknown": True}
        return {"code": self.code, "signal": self.signal}


class Decision(enum.Enum):
    """What to do after a process ended or a start failed."""

    RESTART = "restart"  # go to BACKOFF, then start again
    EXITED = "exited"  # ended, not to be restarted by policy
    FATAL = "fatal"  # gave up


def after_exit(
    *,
    policy: Restart,
    status: ExitStatus | None,
    failed_start: bool,
    failed_starts_in_a_row: int,
    give_up_after: int,
) -> Decision:
    """Decide what follows an exit (or a failed start, where ``status`` may be ``None``).

    Args:
        policy: the unit's ``restart`` policy.
        status: how it ended; ``None`` for a start that failed before a process
            existed (spawn error, failed preflight, blocked port).
        failed_start: True if it never reached RUNNING.
        failed_starts_in_a_row: failed starts so far, this one included.
        give_up_after: the unit's ``give_up_after``; 0 means never give up.

    Returns:
        RESTART, EXITED or FATAL. A clean exit under ``on-failure`` and any exit
        under ``no`` are EXITED; a failed start counts towards ``give_up_after``
        like supervisord's ``startretries``.
    """
    if policy is Restart.NO:
        return Decision.EXITED
    if policy is Restart.ON_FAILURE and status is not None and status.success:
        return Decision.EXITED
    if failed_start and give_up_after > 0 and failed_starts_in_a_row >= give_up_after:
        return Decision.FATAL
    return Decision.RESTART
