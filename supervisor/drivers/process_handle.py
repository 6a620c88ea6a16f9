"""One running process group of a service: waiting for its main process, signalling its
group, sweeping what is left of it (members, escaped descendants), ending its log drains.

How a reused pid is never signalled:

- the leader is waited on and signalled through a pidfd (``pidfd_open(2)``)
  opened while it was our unreaped child, so it names that process forever;
- its process group is signalled with ``killpg`` only while the leader is
  unreaped (an unreaped leader pins its pid, hence the group number), or right
  after ``killpg(pgid, 0)`` showed the group non-empty, with no ``await`` in
  between: Linux never hands out a number still used as a pgid, and with the
  daemon as subreaper the last member's zombie is reaped by our reaper, in this
  same thread, so the group cannot empty between the check and the signal;
- any other process (an escaped descendant) is signalled through a pidfd after
  checking that its start time still matches (``psutil.Process.is_running``).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.from_thread
import anyio.lowlevel
import psutil

from supervisor.fdlimits import relocate
from supervisor.lazyevent import LazyEvent
from supervisor.logfile import RotatingLog
from supervisor.logfiles import Handover, LogDrops, drain_all
from supervisor.loghub import LogHub
from supervisor.reaper import (
    Reaper,
    WaitThread,
    child_pids,
    find_marked,
    open_pidfd,
    signal_verified,
    wait_gone,
    waitpid_blocking,
)
from supervisor.spec import StopSpec
from supervisor.states import ExitStatus

__all__ = ["DRAIN_GRACE", "MARKER", "RUN_MARKER", "SCOPE", "ProcessHandle"]

#: The variable that marks a process as one of ours; its value is the service name.
MARKER = "HOSTVISOR_SERVICE"
#: The run of a job a process belongs to (its number): the sweep after one run never
#: touches another run's processes (``concurrency = "allow"``).
RUN_MARKER = "HOSTVISOR_RUN"
#: The variable that says which daemon's: its value is the state folder's path (two
#: daemons with their own state folders never adopt or stop each other's processes).
SCOPE = "HOSTVISOR_STATE_DIR"
#: Seconds between re-checks of a group whose leader exited (see _wait_group_gone).
GROUP_RECHECK = 1.0
#: The same for an adopted stranger's group: its members are not ours, so no SIGCHLD
#: tells us they went (its leader's zombie lasts until its new parent reaps it).
STRANGER_RECHECK = 0.1
#: Seconds to wait for SIGKILLed escaped descendants to go.
ESCAPEE_KILL_WAIT = 5.0
#: Walks for escapees after the first ones went (each finds what they forked as they died).
ESCAPEE_ROUNDS = 3
#: (a process we could not recognise may hold the pipes open).
DRAIN_GRACE = 1.0


class ProcessHandle:
    """One running process group; satisfies :class:`~supervisor.drivers.base.Handle`.

    Attributes:
        pid: the leader's pid, which is also the group and session id.
        pgid: the process group id (= ``pid``).
        started_at: ``anyio.current_time()`` just before the spawn (monotonic seconds).
        service: the service name (the ``HOSTVISOR_SERVICE`` marker).
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes] | None,
        *,
        service: str,
        started_at: float,
        reaper: Reaper | None,
        live: set[int],
        pid: int | None = None,
        pidfd: int | None = None,
        own_child: bool = True,
        create_time: float | None = None,
    ) -> None:
        self._popen = popen
        self.pid: int = popen.pid if popen is not None else int(pid or 0)
        self.pgid: int = self.pid
        self.service = service
        self.started_at = started_at
        self._reaper = reaper
        self._live = live
        #: False for a process adopted after a daemon crash: not our child, so its exit
        #: is seen through its pidfd but its exit status cannot be known.
        self.own_child = own_child
        #: True once a resumed or adopted instance (see supervisor.carryover).
        self.adopted = False
        #: ``HOSTVISOR_STATE_DIR`` of the daemon (escapees of a stranger must carry it).
        self.scope = ""
        #: ``HOSTVISOR_RUN`` of a job's run ("" for a service): escapees must carry it.
        self.run = ""
        #: For a stranger: every live process of ours by service, from a shared scan
        #: (:meth:`supervisor.drivers.process.ProcessDriver.marked`).
        self.marked_scan: Callable[[], Awaitable[dict[str, list[psutil.Process]]]] | None = None
        #: The read ends of its stdout and stderr pipes (fd numbers; -1 once closed).
        self.fds: tuple[int, ...] = ()
        #: Asked to hand its pipes over to the next daemon (``hostvisor reexec``).
        self.handover = Handover()
        live.add(self.pid)
        if pidfd is None:
            # Our unreaped child: the pidfd cannot name another process. (An adopted
            # stranger's pidfd is opened, then its start time checked, by the caller.)
            pidfd = open_pidfd(self.pid)
        self._pidfd = relocate(pidfd) if pidfd is not None else None
        self._leader: ExitStatus | None = None
        self._waiter: WaitThread | None = None
        self._stranger_gone: anyio.Event | None = None
        self._group_gone = False
        self._waiting: LazyEvent | None = None  # set when the task waiting for the leader is done
        self._drained = LazyEvent()
        #: When the log drains are cut off (DRAIN_GRACE s after the sweep, see _drain), and
        #: the drains' scope that this deadline is set on.
        self._cut_off_at = math.inf
        self._drain_scope: anyio.CancelScope | None = None
        self._create_time: float | None = create_time

    def __repr__(self) -> str:
        state = self._leader.describe() if self._leader else "running"
        return f"<ProcessHandle {self.service} pid={self.pid}: {state}>"

    @property
    def create_time(self) -> float | None:
        """The leader's start time as psutil reports it (epoch seconds), to recognise
        it later by ``(pid, create_time)``; ``None`` once it has been reaped.

        Read on first access and kept: reading ``/proc/<pid>/stat`` right after
        the spawn would wait for the exec to settle (~0.6 ms on every restart).
        """
        if self._create_time is None and self._leader is None:
            with contextlib.suppress(psutil.Error):
                self._create_time = psutil.Process(self.pid).create_time()
        return self._create_time

    @property
    def container_id(self) -> None:
        """Always ``None``: a process is not a container."""
        return None

    @property
    def status(self) -> ExitStatus | None:
        """The main process's exit status once it has been reaped; else ``None``."""
        return self._leader

    @property
    def leader_exited(self) -> bool:
        """True once the leader has been reaped (members of its group may remain)."""
        return self._leader is not None

    async def wait(self) -> ExitStatus:
        """Wait until the main process (the group leader) has exited; return its status.

        As systemd's main process (``systemd.service(5)``, ``KillMode=control-group``):
        its exit is the instance's exit, even while other members of its group or
        escaped descendants still run; :meth:`stop` then sweeps those. Idempotent and
        safe to call from several tasks; cancelling one waiter leaves the others waiting.
        """
        while self._leader is None:
            waiting = self._waiting
            if waiting is not None:
                # Another task waits for the leader: its result, or its turn if cancelled.
                await waiting.wait()
                continue
            self._waiting = waiting = LazyEvent()
            try:
                self._leader = await self._wait_leader()
            finally:
                self._waiting = None
                waiting.set()
        return self._leader

    @property
    def group_gone(self) -> bool:
        """True once :meth:`wait_group` has seen the leader and its whole group gone."""
        return self._group_gone

    async def wait_group(self) -> ExitStatus:
        """Wait until the leader has exited AND no process of its group remains;
        return the leader's status."""
        status = await self.wait()
        if not self._group_gone:
            await self._wait_group_gone()
            self._group_gone = True
        return status

    async def _wait_leader(self) -> ExitStatus:
        if not self.own_child:
            return await self._wait_stranger()
        if self._pidfd is not None:
            # Readable once the leader has exited: no polling, no thread.
            await anyio.wait_readable(self._pidfd)
            raw = waitpid_blocking(self.pid)
        else:
            # No pidfd (macOS, Linux < 5.3): one thread blocks in waitpid for the
            # leader's whole life. A cancelled wait() leaves it running and the
            # next wait() takes its result (a second waitpid would find nothing).
            if self._waiter is None:
                self._waiter = WaitThread(self.pid)
            raw = await self._waiter.result()
        return self._reaped(raw)

    async def _wait_stranger(self) -> ExitStatus:
        """An adopted process that is not our child: its pidfd says when it exits (no
        polling); its parent (init, or another subreaper) reaps it and keeps the status."""
        if self._pidfd is not None:
            await anyio.wait_readable(self._pidfd)
        else:  # no pidfds: nothing better than psutil's wait in a thread
            if self._stranger_gone is None:
                # One thread for its whole life: a cancelled wait() (the instance's timers
                # cancel it, see supervisor.instance.Life) leaves it running for the next.
                self._stranger_gone = gone = anyio.Event()
                token = anyio.lowlevel.current_token()

                def run() -> None:
                    self._psutil_wait()
                    with contextlib.suppress(Exception):  # the event loop may be gone by now
                        anyio.from_thread.run_sync(gone.set, token=token)

                name = f"hostvisor-wait-{self.pid}"
                threading.Thread(target=run, name=name, daemon=True).start()
            await self._stranger_gone.wait()
        return self._reaped(None, known=False)

    def _psutil_wait(self) -> None:
        with contextlib.suppress(psutil.Error):
            psutil.Process(self.pid).wait()

    def _reaped(self, raw: int | None, *, known: bool = True) -> ExitStatus:
        if not known:
            status = ExitStatus.unknown()
        else:
            # None only if something outside this driver reaped our child.
            status = ExitStatus(code=255) if raw is None else ExitStatus.from_wait_status(raw)
        if self._popen is not None:
            # Keep Popen from ever polling this pid again (its __del__ and
            # subprocess._cleanup would waitpid() a number that may be reused).
            self._popen.returncode = status.code if status.signal is None else -(status.signal or 0)
        if self._reaper is not None:
            self._reaper.untrack(self.pid)
        self._live.discard(self.pid)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return status

    def _group_exists(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed its uid: it still exists
            return True
        return True

    async def _wait_group_gone(self) -> None:
        while True:
            event = self._reaper.reaped_event() if self._reaper is not None else None
            if not self._group_exists():
                return
            # Members outlived the leader. Reparented to the daemon (subreaper), their
            # exit raises SIGCHLD and the reaper wakes us right after reaping them.
            # Members reaped by someone else (no subreaper, or a descendant reaping
            # its own children) tell us nothing: the slow re-check bounds how late
            # we notice that the group is empty.
            with anyio.move_on_after(GROUP_RECHECK if self.own_child else STRANGER_RECHECK):
                if event is not None:
                    await event.wait()
                else:
                    await anyio.sleep_forever()

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to every process of the group, if any remains (see module docs).

        Returns:
            True if the group existed and was signalled.
        """
        # No await between the emptiness check and killpg: see the module docstring. A
        # stranger's leader is not pinned by us: its group is checked like a dead one's.
        if (self._leader is None and self.own_child) or self._group_exists():
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return False
            return True
        return False

    async def send_signal(self, sig: int, *, group: bool = False) -> bool:
        """Send ``sig`` to the main process (``group``: to its whole process group) while it
        runs, never to a reused pid (module docstring); False once it has ended. The group
        is reached while any member remains, even after the main process exited."""
        if group:
            return self.signal_group(sig)
        if self._leader is not None:
            return False
        try:
            if self._pidfd is not None:  # names this very process, even after it exits
                signal.pidfd_send_signal(self._pidfd, sig)
                return True
            if self.own_child:  # unreaped, so its pid cannot be reused
                os.kill(self.pid, sig)
                return True
            proc = psutil.Process(self.pid)  # a stranger without pidfds: check its start
            if self._create_time is not None and proc.create_time() != self._create_time:
                return False
        except (ProcessLookupError, psutil.Error):
            return False
        return signal_verified(proc, sig)

    async def kill(self) -> ExitStatus:
        """SIGKILL the whole group and wait until it is gone."""
        self.signal_group(signal.SIGKILL)
        return await self.wait_group()

    async def stop(self, stop: StopSpec) -> ExitStatus:
        """Stop what is left of the instance: ``stop.signal`` to the group and to escaped
        descendants carrying this service's marker, up to ``stop.timeout`` seconds for
        them to go, then SIGKILL.

        Also the sweep after the leader exited on its own (systemd's
        ``KillMode=control-group``): the remaining members and marked escapees get the
        same treatment; with nothing left it returns at once. The log drains go on until
        EOF, but output still held open by a process we could not recognise is cut off
        :data:`DRAIN_GRACE` seconds after this returns, so no pipe, log descriptor or task
        outlives the instance. Returns the leader's exit status.
        """
        deadline = anyio.current_time() + stop.timeout
        # Then SIGCONT, as systemd does (systemd.kill(5)): a process stopped with SIGSTOP
        # (``hostvisor signal NAME STOP``) could not act on the stop signal until SIGKILL.
        wake = stop.signal not in (signal.SIGKILL, signal.SIGCONT)
        escaped = await self._find_escapees()
        for proc in escaped:
            if signal_verified(proc, stop.signal) and wake:
                signal_verified(proc, signal.SIGCONT)
        signalled = self.signal_group(stop.signal)
        if signalled and wake:
            self.signal_group(signal.SIGCONT)
        if signalled:
            with anyio.move_on_after(stop.timeout):
                await self.wait_group()
            if not self._group_gone:
                self.signal_group(signal.SIGKILL)
        status = await self.wait_group()
        known = {_key(p) for p in escaped}
        if signalled or escaped:
            # Escapees made or reparented to us meanwhile get the same treatment. (With
            # nothing signalled and no await since the first walk, it would find the same.)
            for proc in await self._find_escapees():
                if _key(proc) not in known:
                    if signal_verified(proc, stop.signal) and wake:
                        signal_verified(proc, signal.SIGCONT)
                    escaped.append(proc)
        rounds = 0
        while escaped:
            left = max(0.0, deadline - anyio.current_time())
            remaining = await wait_gone(escaped, left)
            for proc in remaining:
                signal_verified(proc, signal.SIGKILL)
            if remaining:
                await wait_gone(remaining, ESCAPEE_KILL_WAIT)
            # An escapee that forked as it was signalled leaves a child the walks above
            # could not see, reparented to us only when its parent died: walk again until
            # a walk finds nothing new (bounded: a fork bomb is the stop's, not ours).
            rounds += 1
            if rounds > ESCAPEE_ROUNDS:
                break
            escaped = [p for p in await self._find_escapees() if _key(p) not in known]
            for proc in escaped:
                known.add(_key(proc))
                if signal_verified(proc, stop.signal) and wake:
                    signal_verified(proc, signal.SIGCONT)
        self._cut_off(anyio.current_time() + DRAIN_GRACE)  # see _drain
        return status

    async def _find_escapees(self) -> list[psutil.Process]:
        if not self.own_child and self.marked_scan is not None:
            # An adopted stranger's escapees were reparented elsewhere while no daemon ran:
            # one pass over /proc, shared by every stranger stopping at the same moment
            # (a shutdown stops hundreds), instead of a walk of the process table each.
            found = await self.marked_scan()
            return [p for p in found.get(self.service, []) if _pgid(p.pid) != self.pgid]
        roots = self._escape_roots()
        if not roots:
            return []  # the common case: no orphan of ours anywhere, no /proc walk
        # A walk of /proc may take a while on a busy host: never in the event loop.
        also = {SCOPE: self.scope} if self.scope else {}
        if self.run:
            also[RUN_MARKER] = self.run
        return await anyio.to_thread.run_sync(
            lambda: find_marked(roots, MARKER, self.service, skip_pgid=self.pgid, also=also)
        )

    def _escape_roots(self) -> list[int]:
        # Escaped descendants are below the leader while it lives, or were
        # reparented to the daemon (untracked children of ours), or below those.
        # An adopted stranger's were reparented elsewhere while no daemon ran: its
        # stop sweeps from init (the marker and the state folder tell them apart).
        if not self.own_child:
            return [1]
        roots = [self.pid] if self._leader is None else []
        roots.extend(p for p in child_pids() if p not in self._live)
        return roots

    async def drained(self) -> None:
        """Wait until both log drains have hit EOF and the log file is closed."""
        await self._drained.wait()

    async def _drain(
        self,
        fds: Sequence[int],
        log: RotatingLog,
        hub: LogHub | None,
        drops: LogDrops | None,
        release: Callable[[], None],
        *,
        pending: Sequence[bytes] = (),
    ) -> None:
        try:
            # Output still held open DRAIN_GRACE s after the instance was swept belongs to
            # a process we could not recognise: stop reading it (a deadline on the drains'
            # scope, see _cut_off).
            await drain_all(
                fds,
                log,
                hub=hub,
                key=self.service,
                drops=drops,
                pending=pending,
                handover=self.handover,
                on_scope=self._drains_run,
            )
        finally:
            self._drain_scope = None
            if not self.handover.requested:
                self.fds = ()
                release()
            self._drained.set()

    def _drains_run(self, scope: anyio.CancelScope) -> None:
        self._drain_scope = scope
        scope.deadline = self._cut_off_at

    def _cut_off(self, at: float) -> None:
        """End the log drains at ``at`` (monotonic seconds) if they have not hit EOF by then."""
        self._cut_off_at = min(self._cut_off_at, at)
        if self._drain_scope is not None:
            self._drain_scope.deadline = self._cut_off_at


def _key(proc: psutil.Process) -> tuple[int, float]:
    """A process's identity: its pid and start time (psutil caches the latter)."""
    return proc.pid, proc.create_time()


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1
