"""At daemon start: take over what the previous daemon left, before any service starts.

Two cases, told apart by the state file's ``reexec`` record (see
:mod:`supervisor.statefile`):

- **after ``hostvisor reexec``** (same pid): every recorded process is still our
  child and its pipes are open in this process: each is resumed as it was (state,
  health counters, restarts, backoff, uptime), its drain goes on from the partial
  line the old code held, and its exit status stays exact;
- **after a crash** (a new pid): the processes that carry our marker are found in
  ``/proc`` and :func:`supervisor.adoption.plan` says which to adopt; an adopted one
  is watched through a pidfd (its exit is seen at once, its status is unknown), its
  pipes come back from the fd keeper (:mod:`supervisor.fdstore`), its probe is
  re-checked, and it reports ``"adopted": true`` until its next start. The others
  are stopped before any service starts, so no two instances of one service run.

A unit that changed meanwhile is restarted once, gracefully, as a reload would;
one that is gone has its process stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from supervisor import __version__
from supervisor import events as ev
from supervisor.adoption import Candidate, plan, scan
from supervisor.carryover import restore, snapshot, wall_offset
from supervisor.fdlimits import relocate
from supervisor.fdstore import split_key
from supervisor.reaper import open_pidfd, signal_verified, wait_gone
from supervisor.service import ServiceSupervisor
from supervisor.spec import StopSpec
from supervisor.statefile import (
    WRITE_EVERY,
    StateFile,
    StateFileError,
    read_state,
    state_path,
    write_state,
)
from supervisor.states import Health, ServiceState

if TYPE_CHECKING:
    from supervisor.daemon import Daemon
    from supervisor.supervising import Supervisor

__all__ = ["answer_reexec", "keep_state_file", "take_over"]

S = ServiceState
#: Seconds between two snapshots of every service by the state-file writer (between them
#: it snapshots only the services that may have changed: :class:`_Records`).
FULL_EVERY = 5.0
#: Seconds a pipe left by a process that ended while no daemon ran is read, at most.
LEFTOVER_DRAIN = 2.0


async def take_over(daemon: Daemon, supervisors: Iterable[Supervisor], tg: TaskGroup) -> None:
    """Restore and resume (re-exec) or adopt (crash) before the supervisors run."""
    sups = {sup.name: sup for sup in supervisors}
    if daemon.resumed is not None:
        await daemon.keeper_ready.wait()
        _resume_all(daemon, daemon.resumed, sups, tg)
        return
    try:
        state = read_state(state_path(daemon.state_dir))
    except StateFileError as exc:
        daemon.log_line("error", f"{exc}; processes with our marker follow [daemon] orphans")
        state = None
    found: list[Candidate] = []

    async def scan_proc() -> None:
        found.extend(await anyio.to_thread.run_sync(scan, daemon.process_driver.scope))

    # The /proc scan (~15 ms, more on a busy host) runs while the fd keeper starts.
    async with anyio.create_task_group() as both:
        both.start_soon(scan_proc)
        await daemon.keeper_ready.wait()
        kept = _take_kept(daemon)
    skip = {daemon.fdstore.pid} if daemon.fdstore is not None and daemon.fdstore.pid else set()
    candidates = [cand for cand in found if cand.pid not in skip]
    # A job's run left by a crashed daemon is stopped, not adopted: its outcome cannot be
    # known, and catch_up decides whether the job runs again.
    units = {n: "job" if s.is_job else s.kind for n, s in daemon.loaded.services.items()}
    decided = plan(candidates, state=state, units=units, policy=daemon.loaded.daemon.orphans)
    for line in decided.ignored:
        daemon.log_line("warning", line)
    await _stop_all(daemon, decided.stop)
    records = state.services if state is not None else {}
    for name, sup in sups.items():
        rec = records.get(name)
        cand = decided.adopt.get(name)
        if not isinstance(sup, ServiceSupervisor):
            continue  # a job: its history is in jobs.json
        if cand is not None and _adopt(daemon, sup, cand, kept, rec):
            continue
        if rec is not None:
            restore(sup, rec, with_instance=False)
            if sup.spec.kind == "container":
                sup.resuming_container = True
    for group, fds in kept.items():  # pipes of processes that ended meanwhile
        tg.start_soon(_drain_leftover, daemon, group, fds)


def _take_kept(daemon: Daemon) -> dict[str, list[int]]:
    """The pipes the fd keeper held, by group (``service/pid``), each group's fds in
    order (stdout, stderr), moved above the children's descriptor limit."""
    if daemon.fdstore is None:
        return {}
    try:
        taken = daemon.fdstore.take()
    except (TimeoutError, OSError, ValueError) as exc:
        daemon.log_line("warning", f"the fd keeper did not hand the pipes back: {exc}")
        return {}
    kept: dict[str, list[int]] = {}
    for key in sorted(taken, key=split_key):
        kept.setdefault(split_key(key)[0], []).append(relocate(taken[key]))
    return kept


def _adopt(
    daemon: Daemon,
    sup: ServiceSupervisor,
    cand: Candidate,
    kept: dict[str, list[int]],
    rec: Any,
) -> bool:
    driver = daemon.process_driver
    try:
        pidfd = open_pidfd(cand.pid)
    except ProcessLookupError:
        return False
    if not cand.proc.is_running():  # its pid was reused since the scan: not ours
        if pidfd is not None:
            os.close(pidfd)
        return False
    fds = kept.pop(f"{cand.service}/{cand.pid}", [])
    started = cand.create_time - wall_offset()
    handle = driver.resume(
        sup.name, pid=cand.pid, started_at=started, create_time=cand.create_time,
        own_child=False, pidfd=pidfd,
    )  # fmt: skip
    if rec is not None:
        restore(sup, rec, with_instance=True)
    sup.state = S.RUNNING
    sup.health = Health.UNKNOWN if sup.spec.health is not None else Health.NONE
    sup.health_seed = None  # the probe is re-checked before anything counts
    sup.adopted = True
    sup._reached_running = True
    sup._want_up = True if rec is None else rec.want_up
    changed = rec is not None and rec.digest != sup.spec_digest
    sup.message = "" if fds else "adopted; its output was lost with the previous daemon"

    attach = partial(driver.attach, handle, sup.spec, fds=fds)
    sup.resume_instance(handle, started_at=started, attach=attach, restart=changed)
    sup._publish(
        ev.SERVICE_ADOPTED,
        f"adopted pid {cand.pid} left running by the previous daemon",
        **{"process.pid": cand.pid},
    )
    return True


def _resume_all(
    daemon: Daemon, state: StateFile, sups: Mapping[str, Supervisor], tg: TaskGroup
) -> None:
    """After ``reexec``: every recorded instance is our child, with its pipes open here."""
    driver = daemon.process_driver
    offset = wall_offset()
    for name, rec in state.services.items():
        sup = sups.get(name)
        inst = rec.instance
        if sup is None or sup.spec.kind != rec.kind or rec.job != sup.spec.is_job:
            # The unit is gone (or became another kind): stop what it left.
            for left in rec.instances():
                _stop_gone(daemon, name, left.pid, left.fds, tg)
            continue
        if not isinstance(sup, ServiceSupervisor):
            from supervisor.jobcarry import resume_job

            resume_job(sup, rec, driver)  # type: ignore[arg-type]
            continue
        if sup.spec.kind == "container":
            restore(sup, rec, with_instance=False)
            sup.resuming_container = True
            continue
        restore(sup, rec, with_instance=inst is not None)
        if inst is None:
            continue
        started = inst.started_wall - offset
        handle = driver.resume(
            name, pid=inst.pid, started_at=started, create_time=inst.create_time,
            own_child=True,
        )  # fmt: skip
        handle.adopted = rec.adopted
        pending = [p.encode("latin-1") for p in inst.pending]
        attach = partial(driver.attach, handle, sup.spec, fds=list(inst.fds), pending=pending)
        sup.resume_instance(
            handle, started_at=started, attach=attach, restart=rec.digest != sup.spec_digest
        )


def _stop_gone(daemon: Daemon, name: str, pid: int, fds: list[int], tg: TaskGroup) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    handle = daemon.process_driver.resume(
        name, pid=pid, started_at=anyio.current_time(), create_time=None, own_child=True
    )
    daemon.log_line("info", f"{name}: its unit is gone: stopping pid {pid}")
    tg.start_soon(handle.stop, StopSpec())


async def _stop_all(daemon: Daemon, candidates: list[Candidate]) -> None:
    """Stop candidates that are not adopted (their unit's stop signal and timeout, then
    SIGKILL); return once they are gone (bounded)."""
    if not candidates:
        return
    timeout = 10.0
    for cand in candidates:
        spec = daemon.loaded.services.get(cand.service)
        stop = spec.stop if spec is not None else StopSpec()
        timeout = max(timeout, stop.timeout)
        daemon.log_line(
            "warning", f"{cand.service}: stopping pid {cand.pid}, left by a previous daemon"
        )
        signal_verified(cand.proc, stop.signal)
    procs = [c.proc for c in candidates]
    for proc in await wait_gone(procs, timeout):
        signal_verified(proc, signal.SIGKILL)
    await wait_gone(procs, 5.0)


async def _drain_leftover(daemon: Daemon, group: str, fds: list[int]) -> None:
    """Write what a process that ended while no daemon ran left in its pipes to its log
    (for at most :data:`LEFTOVER_DRAIN` seconds), then let the keeper forget them."""
    from supervisor.logfiles import drain_all

    service = group.split("/", 1)[0]
    spec = daemon.loaded.services.get(service)
    if daemon.fdstore is not None:
        daemon.fdstore.drop([group])
    log = None
    if spec is not None and spec.kind == "process":
        with contextlib.suppress(Exception):
            log = daemon.process_driver._open_log(spec)
    if log is None:
        for fd in fds:
            os.close(fd)
        return
    for fd in fds:
        os.set_blocking(fd, False)
    with anyio.move_on_after(LEFTOVER_DRAIN):
        await drain_all(fds, log, hub=daemon.loghub, key=service, drops=daemon.drops_for(service))


def answer_reexec(daemon: Daemon) -> None:
    """After a re-exec: answer the ``reexec`` request on the connection the old code kept
    open (``{}``: the new code has taken over), then close it."""
    state = daemon.resumed
    if state is None or state.reexec is None or state.reexec.reply_fd < 0:
        return
    import json
    import socket

    record = state.reexec
    daemon.log_line("info", f"re-exec done: hostvisor {__version__} runs, pid unchanged")
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=record.reply_fd)
        with sock:
            sock.settimeout(1.0)
            reply = {"jsonrpc": "2.0", "id": record.reply_id, "result": {}}
            sock.sendall(json.dumps(reply).encode() + b"\n")


async def keep_state_file(daemon: Daemon) -> None:
    """Rewrite the state file after changes (at most every ``WRITE_EVERY`` seconds) until
    the daemon stops: what the next daemon reads after a crash."""
    path = state_path(daemon.state_dir)
    daemon.state_writer_done = done = anyio.Event()
    try:
        with anyio.CancelScope() as daemon.state_writer:
            await _write_forever(daemon, path)
    finally:
        done.set()


async def _write_forever(daemon: Daemon, path: Any) -> None:
    failing = False
    records = _Records()
    encoded: dict[str, Any] = {}  # write_state's cache: name -> (record, its JSON)
    while not daemon.shutting_down:
        # Services only: a crashed daemon's job runs are stopped, not adopted, and a job's
        # history is in jobs.json; so a job's runs (20 a second with 200 jobs every 10 s)
        # cause no write. (A re-exec writes every supervisor, jobs too: reexec.quiesce.)
        changed = records.refresh(daemon)
        if daemon.fdstore is not None:
            daemon.fdstore.flush()  # a keeper that was respawned gets every live pipe again
        if not changed and not failing:
            await daemon.changed.wait()
            await anyio.sleep(WRITE_EVERY)
            continue
        state = StateFile(pid=os.getpid(), services=records.ordered(daemon))
        try:
            await anyio.to_thread.run_sync(write_state, path, state, encoded)
        except OSError as exc:
            if not failing:
                daemon.log_line("warning", f"cannot write {path}: {exc}; retrying")
            failing = True
        else:
            if failing:
                daemon.log_line("info", f"{path} written again")
            failing = False
        await daemon.changed.wait()
        await anyio.sleep(WRITE_EVERY)


class _Records:
    """The state file's service records, kept between writes so that a write snapshots
    only what may have changed (1,000 services, one restarting: ~20 ms -> ~1 ms on the
    event loop every 0.2 s): a supervisor that fired ``changed`` since (its
    :class:`~supervisor.daemon_jobs.ChangeMark`), a new or replaced one, one whose
    record moves without a change of its own (a backoff delay that counts down, probe
    counters, dropped log bytes), and every one each :data:`FULL_EVERY` seconds."""

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[Supervisor, Any]] = {}
        self.full_at = -FULL_EVERY

    def refresh(self, daemon: Daemon) -> bool:
        """Snapshot what may have changed; True if any record differs from the last."""
        marked = daemon.changed_names.copy()
        daemon.changed_names.clear()
        now = anyio.current_time()
        full = now - self.full_at >= FULL_EVERY
        if full:
            self.full_at = now
        changed = False
        current = {n: s for n, s in daemon.supervisors.items() if isinstance(s, ServiceSupervisor)}
        for name in self.by_name.keys() - current.keys():
            del self.by_name[name]
            changed = True
        for name, sup in current.items():
            kept = self.by_name.get(name)
            dropped = daemon.dropped_bytes(name)
            if (
                not full
                and kept is not None
                and kept[0] is sup
                and name not in marked
                and sup.retry_at is None
                and sup.health_counter is None
                and kept[1].logs_dropped_bytes == dropped
            ):
                continue
            rec = snapshot(sup, logs_dropped_bytes=dropped)
            if kept is None or kept[1] != rec:
                changed = True
            self.by_name[name] = (sup, rec)
        return changed

    def ordered(self, daemon: Daemon) -> dict[str, Any]:
        """The records, in the order of ``daemon.supervisors`` (as one snapshot of all)."""
        return {n: self.by_name[n][1] for n in daemon.supervisors if n in self.by_name}
