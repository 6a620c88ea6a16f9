"""The daemon's side of re-exec and adoption: the hooks :mod:`supervisor.reexec` and
:mod:`supervisor.takeover` use, kept out of :mod:`supervisor.daemon` to keep it small."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from supervisor.drivers.process import ProcessDriver
from supervisor.events import EventBus
from supervisor.logfiles import LogDrops
from supervisor.spec import Loaded, ServiceSpec
from supervisor.statefile import StateFile

if TYPE_CHECKING:
    from supervisor.daemonlog import DaemonLog
    from supervisor.supervising import Supervisor

__all__ = ["TakeoverMixin"]


#: Supervisors launched per pass of the event loop (:meth:`TakeoverMixin._launch_all`).
LAUNCH_BATCH = 10


async def _open_one_by_one(gates: Sequence[anyio.Event]) -> None:
    """Open each gate one pass of the event loop after the previous one."""
    for gate in gates:
        await anyio.lowlevel.checkpoint()
        gate.set()


class TakeoverMixin:
    """Re-exec and adoption hooks of :class:`~supervisor.daemon.Daemon`."""

    loaded: Loaded
    state_dir: Path
    socket_path: Path
    bus: EventBus
    log: DaemonLog | None
    process_driver: ProcessDriver
    supervisors: dict[str, Supervisor]
    log_drops: dict[str, LogDrops]
    shutting_down: bool
    reexecuting: bool
    lock_fd: int | None
    resumed: StateFile | None
    listen_sock: socket.socket | None
    fdstore: Any
    notifier: Any
    started_wall: float
    _tg: TaskGroup | None
    _reload_lock: anyio.Lock
    _scopes: dict[str, anyio.CancelScope]
    _done: dict[str, anyio.Event]
    _log_events: Any
    state_writer: anyio.CancelScope | None
    state_writer_done: anyio.Event
    keeper_ready: anyio.Event

    async def _register(self, spec: ServiceSpec) -> Supervisor:
        raise NotImplementedError

    async def _run_supervisor(
        self, sup: Supervisor, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        raise NotImplementedError

    def _refuse_when_stopping(self, *, reexec: bool = True) -> None:
        raise NotImplementedError

    async def reexec(self, connection: socket.socket, request_id: Any) -> dict[str, Any]:
        """Re-execute in place (:mod:`supervisor.reexec`); returns only on failure.

        Raises:
            ConfigRejected: the installed code rejects the config.
            ControlError: the installed code cannot start, or ``exec`` failed.
        """
        from supervisor.reexec import reexec

        # Refused before the lock: a call queued behind a re-exec would be cut off by the
        # exec (and its client told the daemon died). The flag ends with this process.
        self._refuse_when_stopping()
        self.reexecuting = True
        try:
            async with self._reload_lock:
                self._refuse_when_stopping(reexec=False)
                return await reexec(self, connection, request_id)  # type: ignore[arg-type]
        finally:
            self.reexecuting = False

    def log_line(self, level: str, message: str) -> None:
        """One line in the daemon log (and on stderr)."""
        if self.log is not None:
            self.log.write(level, message)

    def notifier_reloading(self) -> None:
        """``RELOADING=1`` to systemd, if it listens."""
        if self.notifier is not None:
            self.notifier.reloading()

    def dropped_bytes(self, service: str) -> int:
        """Bytes of ``service``'s output lost so far (``logs_dropped_bytes``)."""
        drops = self.log_drops.get(service)
        return drops.bytes if drops is not None else 0

    async def cancel_supervisors(self) -> None:
        """End every supervisor task without stopping its instance (a re-exec); a stop
        under way finishes first, within its stop_timeout."""
        for scope in self._scopes.values():
            scope.cancel()
        bound = max((s.spec.stop.timeout for s in self.supervisors.values()), default=0.0)
        with anyio.move_on_after(bound + 20):
            for done in list(self._done.values()):
                await done.wait()

    def before_exec(self) -> None:
        """Write every event and line still queued for the daemon log and stderr."""
        with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            while self.log is not None and self._log_events is not None:
                self.log.event(self._log_events.receive_nowait())
        if self.log is not None:
            self.log.close()

    async def resume_in_place(self, state: StateFile) -> None:
        """After a failed ``exec``: supervise again what :func:`~supervisor.reexec.quiesce`
        left, from ``state``."""
        from supervisor.takeover import take_over

        assert self._tg is not None
        self.supervisors.clear()
        self._scopes.clear()
        self._done.clear()
        sups = [await self._register(spec) for spec in self.loaded.services.values()]
        self.resumed = state
        try:
            await take_over(self, sups, self._tg)  # type: ignore[arg-type]
        finally:
            self.resumed = None
        self._launch_all(self._tg, sups)

    def _launch_all(self, tg: TaskGroup, supervisors: Sequence[Supervisor]) -> None:
        """Start the supervision task of each of ``supervisors`` in ``tg``.

        ``start_soon``, not one ``await tg.start`` each, so 1,000 spawns do not wait for
        1,000 loop round trips; but :data:`LAUNCH_BATCH` at a time, one batch per pass of
        the event loop, so that between two batches the loop answers the control socket
        and signals (a ``status`` or SIGTERM during the start of 1,000 services waits for
        one batch's spawns, not for all of them). Each spawn still sends its pipes to the
        fd keeper at once: batching those over the pass left every child of a start-up
        to die of EPIPE with a daemon killed -9. Each one's cancel scope and done event
        exist before this returns.
        """
        gates: list[anyio.Event] = []
        for i, sup in enumerate(supervisors):
            if i and i % LAUNCH_BATCH == 0:
                gates.append(anyio.Event())
            scope = self._scopes[sup.name] = anyio.CancelScope()
            done = self._done[sup.name] = anyio.Event()
            tg.start_soon(self._supervise_in, sup, scope, done, gates[-1] if gates else None)
        if gates:
            tg.start_soon(_open_one_by_one, gates)

    async def _supervise_in(
        self,
        sup: Supervisor,
        scope: anyio.CancelScope,
        done: anyio.Event,
        gate: anyio.Event | None = None,
    ) -> None:
        try:
            with scope:
                if gate is not None:
                    await gate.wait()
                await sup.run()
        finally:
            done.set()

    async def _open_keeper(self) -> None:
        """Connect to the fd keeper or start one (a worker thread: ~40 ms for a new
        one), meanwhile the control socket opens and take_over scans ``/proc``."""
        try:
            await anyio.to_thread.run_sync(self._open_fdstore)
        finally:
            self.keeper_ready.set()

    def _forget_state(self) -> None:
        """After a stop: no process of ours runs, so no state file and no fd keeper."""
        from supervisor.statefile import state_path

        with contextlib.suppress(OSError):
            state_path(self.state_dir).unlink(missing_ok=True)
        if self.fdstore is not None:
            self.fdstore.quit()
            self.fdstore = None

    def _open_fdstore(self) -> None:
        """Connect to the fd keeper, or start one (in a worker thread: it may take a
        moment); without one the daemon runs on, and a crash may cost output."""
        from supervisor.fdstore import FdStore, keeper_socket_path

        store = FdStore(keeper_socket_path(self.socket_path, self.state_dir))
        if store.connect_or_spawn():
            self.fdstore = self.process_driver.fdstore = store
        else:
            self.log_line("warning", "no fd keeper: a daemon crash would cost service output")
