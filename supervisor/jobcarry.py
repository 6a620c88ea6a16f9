"""A job's runs in progress, carried across ``hostvisor reexec``: to the state file's
:class:`~supervisor.statefile.ServiceRecord` (its ``runs``) and back.

Each run's supervisor is carried like a service's (:mod:`supervisor.carryover`): the
process keeps running, its pipes are drained on from the partial line, its exit status
stays exact. Its ``run_timeout`` goes on from the time it had already run. The job's
history (last trigger, run count, last run) is in ``<state>/jobs.json``
(:mod:`supervisor.jobledger`), written before the exec.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import anyio

from supervisor.carryover import restore, snapshot, wall_offset
from supervisor.statefile import RunRecord, ServiceRecord
from supervisor.states import ServiceState

if TYPE_CHECKING:
    from supervisor.drivers.process import ProcessDriver
    from supervisor.job import JobSupervisor

__all__ = ["resume_job", "snapshot_job"]

#: A one-shot's states between runs, carried as they were.
_RESTING = ("exited", "fatal", "stopped")


def snapshot_job(job: JobSupervisor, *, logs_dropped_bytes: int = 0) -> ServiceRecord:
    """The record of ``job`` now: its state, suspension and every run with an instance."""
    now = anyio.current_time()
    rec = ServiceRecord(
        kind=job.spec.kind,
        digest=job.spec_digest,
        state=str(job.state),
        health=str(job.health),
        message=job.message,
        want_up=job._want_up,
        restarts=job._restarts_done,
        last_exit=job.last_exit.as_json() if job.last_exit is not None else None,
        logs_dropped_bytes=logs_dropped_bytes,
        job=True,
        suspended=job.suspended,
    )
    for run in job.runs:
        sup = snapshot(run.sup)
        if sup.instance is None:
            # Between retries, or in its random delay, or not spawned yet: no process to
            # carry. The run is dropped; the next trigger starts a new one.
            continue
        rec.runs.append(
            RunRecord(
                number=run.number,
                trigger=run.trigger,
                started=run.record.started,
                elapsed=max(0.0, now - run.started),
                timed_out=run.timed_out,
                stopped=run.stopped,
                sup=sup,
            )
        )
    return rec


def resume_job(job: JobSupervisor, rec: ServiceRecord, driver: ProcessDriver) -> None:
    """After ``reexec``: put ``rec`` back into ``job`` (a new supervisor, before its
    ``run``) and resume each recorded run's process, which is still our child.

    A job whose unit changed meanwhile keeps its runs to their end (a run is not
    restarted); the next ones use the new unit.
    """
    job.resumed = True
    job.suspended = rec.suspended
    if rec.state in _RESTING:  # a one-shot between runs
        job._rest = ServiceState(rec.state)
    job._want_up = rec.want_up
    job._restarts_done = rec.restarts
    job.message = rec.message
    offset = wall_offset()
    for item in rec.runs:
        inst = item.sup.instance
        assert inst is not None  # statefile refuses a run without one
        run = job.adopt_run(item.number, item.trigger, started=item.started)
        run.started = anyio.current_time() - item.elapsed
        run.timed_out, run.stopped = item.timed_out, item.stopped
        restore(run.sup, item.sup, with_instance=True)
        started = inst.started_wall - offset
        handle = driver.resume(
            job.name, pid=inst.pid, started_at=started, create_time=inst.create_time,
            own_child=True,
        )  # fmt: skip
        handle.run = str(item.number)
        pending = [p.encode("latin-1") for p in inst.pending]
        attach = partial(driver.attach, handle, run.sup.spec, fds=list(inst.fds), pending=pending)
        run.sup.resume_instance(handle, started_at=started, attach=attach)
