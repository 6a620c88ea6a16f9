"""One supervisor's state, carried from one daemon to the next: to a
:class:`~supervisor.statefile.ServiceRecord` and back.

Clocks: a record holds epoch seconds; a supervisor holds ``anyio.current_time()``
(monotonic) values. :func:`snapshot` and :func:`restore` convert through the
offset between the two clocks at the moment they run, so an instance's uptime
and a pending backoff delay survive a re-exec to within a millisecond.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from supervisor.service import ServiceSupervisor
from supervisor.statefile import InstanceRecord, ServiceRecord
from supervisor.states import ExitStatus, Health, ServiceState

if TYPE_CHECKING:
    from supervisor.supervising import Supervisor

__all__ = ["LIVE", "restore", "snapshot", "wall_offset"]

S = ServiceState
#: States that need an instance: without one, a restored service goes on from backoff.
LIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})


def wall_offset() -> float:
    """``time.time() - anyio.current_time()``: add it to a monotonic time to get epoch seconds."""
    return time.time() - anyio.current_time()


def snapshot(sup: Supervisor, *, logs_dropped_bytes: int = 0) -> ServiceRecord:
    """The record of ``sup`` now; its instance only for a process whose leader has not
    been reaped (a container is found again by name by the next daemon). A job's record
    holds its runs (:func:`supervisor.jobcarry.snapshot_job`)."""
    if not isinstance(sup, ServiceSupervisor):
        from supervisor.job import JobSupervisor
        from supervisor.jobcarry import snapshot_job

        assert isinstance(sup, JobSupervisor)
        return snapshot_job(sup, logs_dropped_bytes=logs_dropped_bytes)
    offset = wall_offset()
    now = anyio.current_time()
    rec = ServiceRecord(
        kind=sup.spec.kind,
        digest=sup.spec_digest,
        state=str(sup.state),
        health=str(sup.health),
        message=sup.message,
        want_up=sup._want_up,
        restarts=sup.restarts,
        attempts=sup._attempts,
        failed_starts=sup.failed_starts,
        backoff_attempt=sup.backoff.attempt,
        retry_in=max(0.0, sup.retry_at - now) if sup.retry_at is not None else None,
        reached_running=sup._reached_running,
        adopted=sup.adopted,
        last_exit=sup.last_exit.as_json() if sup.last_exit is not None else None,
        logs_dropped_bytes=logs_dropped_bytes,
        known=[[float(pid), ct] for pid, ct in sup._known],
    )
    handle = sup.handle
    if (
        sup.spec.kind == "process"
        and handle is not None
        and not getattr(handle, "leader_exited", True)
    ):
        counter = sup.health_counter
        started = sup.instance_started_at if sup.instance_started_at is not None else now
        rec.instance = InstanceRecord(
            pid=int(handle.pid or 0),
            pgid=int(getattr(handle, "pgid", handle.pid) or 0),
            create_time=getattr(handle, "create_time", None),
            started_wall=round(started + offset, 3),  # stable across snapshots: a ms
            fds=_open_fds(handle),
            successes=counter.successes if counter is not None else 0,
            failures=counter.failures if counter is not None else 0,
        )
    return rec


def _open_fds(handle: object) -> list[int]:
    """The instance's pipe read ends still open (a drain closes its pipe at EOF)."""
    handover = getattr(handle, "handover", None)
    closed = handover.closed if handover is not None else set()
    return [fd for fd in getattr(handle, "fds", ()) if fd >= 0 and fd not in closed]


def restore(sup: ServiceSupervisor, rec: ServiceRecord, *, with_instance: bool) -> None:
    """Put ``rec``'s counters and state machine into ``sup`` (a new supervisor, before
    :meth:`~supervisor.service.ServiceSupervisor.run`).

    ``with_instance``: the caller resumes the recorded instance; otherwise a state that
    needs one becomes BACKOFF with no delay (want up) or STOPPED.
    """
    sup._want_up = rec.want_up
    sup.restarts = rec.restarts
    sup._attempts = rec.attempts
    sup.failed_starts = rec.failed_starts
    sup.backoff.attempt = rec.backoff_attempt
    sup._reached_running = rec.reached_running
    sup.adopted = rec.adopted
    sup.message = rec.message
    sup._known = [(int(pid), float(ct)) for pid, ct in rec.known if ct is not None][-8:]
    if rec.last_exit is not None:
        code, sig = rec.last_exit.get("code"), rec.last_exit.get("signal")
        sup.last_exit = ExitStatus(
            code=code if isinstance(code, int) else None,
            signal=sig if isinstance(sig, int) else None,
        )
    try:
        state = ServiceState(rec.state)
    except ValueError:
        state = S.BACKOFF
    if state in LIVE and not with_instance:
        state = S.BACKOFF if rec.want_up else S.STOPPED
        rec.retry_in = 0.0
    sup.state = state
    if with_instance:
        try:
            sup.health = Health(rec.health)
        except ValueError:
            sup.health = Health.UNKNOWN
        inst = rec.instance
        if inst is not None:
            sup.health_seed = (inst.successes, inst.failures)
    if state is S.BACKOFF:  # never longer than the unit's own longest delay
        sup.retry_at = anyio.current_time() + min(rec.retry_in or 0.0, sup.spec.backoff.max)
