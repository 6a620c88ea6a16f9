"""The daemon: builds the supervisors, handles signals, reloads, shuts down in order.

Data flow: ``config.load() -> specs -> Daemon -> one supervisor task per
service -> events on the bus -> daemon log, telemetry, sd_notify, control
subscribers``. The daemon implements :class:`supervisor.control.server.ControlTarget`
so that the control socket can query and command it.

Signals (as supervisord and systemd users expect): SIGTERM and SIGINT start an
ordered shutdown (dependents first, all within ``shutdown_timeout``, then
SIGKILL; exit 0); a second SIGINT forces it at once; SIGHUP reloads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from supervisor import __version__
from supervisor import events as ev
from supervisor.daemon_jobs import JobsMixin
from supervisor.daemon_reload import ReloadMixin
from supervisor.daemon_resources import ResourcesMixin
from supervisor.daemon_takeover import TakeoverMixin
from supervisor.daemonlog import DaemonLog, LibraryLogHandler
from supervisor.drivers.base import Driver
from supervisor.drivers.process import ProcessDriver
from supervisor.errors import (
    ControlError,
    HostvisorError,
    UnknownService,
)
from supervisor.events import EventBus, Redactor
from supervisor.logfile import RotatingLog, reopen_all
from supervisor.logfiles import DropReport, LogDrops
from supervisor.loghub import LogHub
from supervisor.ordering import in_stop_order
from supervisor.paths import log_dir, service_log_path
from supervisor.reaper import Reaper, signal_verified, wait_gone
from supervisor.service import Broadcast, exception_leaves
from supervisor.spec import Loaded, ServiceSpec, StopSpec
from supervisor.statefile import StateFile
from supervisor.states import Health, ServiceState
from supervisor.supervising import Supervisor

__all__ = ["EXIT_SOFTWARE", "Daemon", "user_mistake"]

S = ServiceState
#: Seconds the orphans no unit claims get between SIGTERM and SIGKILL at shutdown.
ORPHAN_STOP = 2.0
#: ``hostvisor run``'s exit code after an internal error (``sysexits.h`` EX_SOFTWARE).
EXIT_SOFTWARE = 70
_DOCKER_DOWN = "docker engine unreachable; keeping the last known state"
Names = Sequence[str] | Literal["all"]


class Daemon(ReloadMixin, TakeoverMixin, JobsMixin, ResourcesMixin):
    """All supervisors of one config, and what they report to.

    Args:
        loaded: the validated configuration.
        state_dir: where logs and the lock live.
        socket_path: the control socket.
        stream: where human log lines go (stderr).
    """

    def __init__(
        self,
        loaded: Loaded,
        *,
        state_dir: Path,
        socket_path: Path,
        lock_fd: int | None = None,
        resumed: StateFile | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.loaded = loaded
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.started_at = time.monotonic()
        self.redactor = Redactor(self._secrets(loaded))
        self.bus = EventBus(redactor=self.redactor)
        self.loghub = LogHub()
        self.changed = Broadcast()
        #: Supervisors that fired ``changed`` since the state file's last snapshot.
        self.changed_names: set[str] = set()
        self.reaper = Reaper()
        #: service name -> lines its drains dropped (full disk...), kept across instances.
        self.log_drops: dict[str, LogDrops] = {}
        self.process_driver = ProcessDriver(
            state_dir=state_dir, reaper=self.reaper, loghub=self.loghub, log_drops=self.drops_for
        )
        self.docker_driver: Any = None
        self.supervisors: dict[str, Supervisor] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._tg: TaskGroup | None = None
        self._reload_lock = anyio.Lock()
        self._rng = random.Random()
        self.log: DaemonLog | None = None
        self.telemetry: Any = None
        self.shutting_down = False
        #: A ``reexec`` is under way: other commands are refused (see TakeoverMixin.reexec).
        self.reexecuting = False
        self._stopping = anyio.Event()
        #: 0 after a clean stop; EXIT_SOFTWARE after an internal error.
        self.exit_code = 0
        # Re-exec and adoption (supervisor.reexec, supervisor.takeover).
        self.lock_fd = lock_fd
        self.resumed = resumed
        self.listen_sock = listener
        self.fdstore: Any = None
        #: Set once the fd keeper is connected (or found unavailable): ``fdstore`` is final.
        self.keeper_ready = anyio.Event()
        self.notifier: Any = None
        self.started_wall = time.time()
        self._done: dict[str, anyio.Event] = {}
        self._log_events: Any = None
        self.state_writer: anyio.CancelScope | None = None
        self.state_writer_done = anyio.Event()
        #: The package's files as they were at start (:mod:`supervisor.upgrade`).
        self.installed: Any = None
        if resumed is not None and resumed.reexec is not None:
            self.started_wall = resumed.reexec.started_wall
            self.started_at = time.monotonic() - max(0.0, time.time() - self.started_wall)
            self.bus.continue_from(resumed.reexec.event_seq)
            for rec in resumed.services.values():  # before the reaper's first pass
                for inst in rec.instances():
                    self.reaper.track(inst.pid)

    def __repr__(self) -> str:
        return f"<Daemon {len(self.supervisors)} services, socket {self.socket_path}>"

    @staticmethod
    def _secrets(loaded: Loaded) -> set[str]:
        return {v for spec in loaded.services.values() for v in spec.secret_values()}

    def drops_for(self, service: str) -> LogDrops:
        """The drop counter of ``service``'s log (created on first use)."""
        drops = self.log_drops.get(service)
        if drops is None:
            drops = LogDrops(on_report=lambda report: self._log_dropped(service, report))
            self.log_drops[service] = drops
        return drops

    def _log_dropped(self, service: str | None, report: DropReport) -> None:
        self.bus.publish(
            ev.LOGS_DROPPED,
            service=service,
            message=report.describe(),
            attributes=report.attributes(),
        )

    # ------------------------------------------------------------ ControlTarget

    def status(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """The status document of contract section 5; raises UnknownService."""
        chosen = self._resolve(names if names else "all")
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "uptime_seconds": round(time.monotonic() - self.started_at, 3),
                "config": str(self.loaded.daemon.config_path),
            },
            "services": [self._entry(name) for name in chosen],
        }

    def _entry(self, name: str) -> dict[str, Any]:
        entry = self.supervisors[name].status_entry()
        drops = self.log_drops.get(name)
        entry["logs_dropped_bytes"] = drops.bytes if drops is not None else 0
        entry["description"] = self.supervisors[name].spec.description
        entry.update(self.resource_fields(name))
        return entry

    def _resolve(self, names: Names) -> list[str]:
        if names == "all":
            return sorted(self.supervisors)
        unknown = [n for n in names if n not in self.supervisors]
        if unknown:
            known = ", ".join(sorted(self.supervisors))
            raise UnknownService(
                f"unknown service: {', '.join(unknown)} (known: {known})",
                data={"unknown": unknown},
            )
        return list(dict.fromkeys(names))

    async def start(
        self, names: Names, *, wait: bool = True, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Want the services up; wait for RUNNING (or a resting state) unless ``wait`` is False."""
        return await self._command(names, "start", frozenset({S.RUNNING}), wait, timeout)

    async def stop(
        self, names: Names, *, wait: bool = True, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Want the services down; wait until STOPPED."""
        return await self._command(names, "stop", frozenset({S.STOPPED}), wait, timeout)

    async def restart(
        self, names: Names, *, wait: bool = True, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Stop (if up) and start the services afresh; wait for RUNNING."""
        return await self._command(names, "restart", frozenset({S.RUNNING}), wait, timeout)

    async def _command(
        self, names: Names, verb: str, targets: frozenset[ServiceState], wait: bool, timeout: float
    ) -> dict[str, Any]:
        # Issued under the reload lock: a command never reaches a supervisor that a reload
        # is replacing; it waits for the reload and goes to the new one.
        self._refuse_when_stopping()  # a re-exec holding the lock would cut this call off
        async with self._reload_lock:
            self._refuse_when_stopping()
            chosen = [self.supervisors[name] for name in self._resolve(names)]
            # `start --all` resumes jobs rather than running each now (command_resume).
            method = "command_resume" if names == "all" and verb == "start" else f"command_{verb}"
            gens = [
                (sup, getattr(sup, method, getattr(sup, f"command_{verb}"))()) for sup in chosen
            ]
        if wait:
            with anyio.move_on_after(timeout):
                async with anyio.create_task_group() as tg:

                    async def until_shutdown() -> None:
                        await self._stopping.wait()  # the answer is due now, not at timeout
                        tg.cancel_scope.cancel()

                    tg.start_soon(until_shutdown)
                    async with anyio.create_task_group() as waits:
                        for sup, gen in gens:
                            waits.start_soon(sup.wait_settled, gen, targets)
                    tg.cancel_scope.cancel()
        return {"services": [self._entry(sup.name) for sup in chosen]}

    async def signal(self, names: Sequence[str], sig: int, *, group: bool) -> dict[str, Any]:
        """Send ``sig`` to each service's main process (or group): :func:`signals.deliver`."""
        from supervisor.signals import deliver

        return await deliver(self, names, sig, group=group)

    def log_path(self, service: str | None) -> Path:
        """``<state>/logs/<service>.log``, or the daemon's log for None; raises UnknownService."""
        if service is None:
            return service_log_path(self.state_dir, "hostvisor")
        self._resolve([service])
        return service_log_path(self.state_dir, service)

    def _refuse_when_stopping(self, *, reexec: bool = True) -> None:
        if self.shutting_down:
            raise ControlError("the daemon is shutting down; commands are refused")
        if reexec and self.reexecuting:
            # Not -32000 (a client would think the daemon is going away): it runs on.
            raise ControlError("a reexec is under way; retry once it is done", code=-32603)

    async def reload(self) -> dict[str, Any]:
        """:meth:`ReloadMixin.reload`, refused at once while a re-exec is under way."""
        self._refuse_when_stopping()  # before the lock, which the re-exec holds
        return await super().reload()

    # ------------------------------------------------------------ supervisors

    def _driver_for(self, spec: ServiceSpec) -> Driver:
        if spec.kind == "process":
            return self.process_driver
        assert self.docker_driver is not None
        driver: Driver = self.docker_driver
        return driver

    async def _ensure_docker(self) -> None:
        if self.docker_driver is not None or self._tg is None:
            return
        from supervisor.drivers.docker import DockerDriver

        self.docker_driver = DockerDriver(bus=self.bus, run_command=self.process_driver.run_command)
        self.docker_driver.on_connection_change = self._docker_connection_changed
        await self._tg.start(self.docker_driver.run)

    def _docker_connection_changed(self, connected: bool) -> None:
        for sup in self.supervisors.values():
            if sup.spec.kind != "container":
                continue
            if not connected:
                sup.health = Health.UNKNOWN if sup.spec.health else Health.NONE
                sup.message = _DOCKER_DOWN
            elif sup.message == _DOCKER_DOWN:
                sup.message = ""
            self.changed_names.add(sup.name)  # its state-file record changed too
        self.changed.fire()

    async def _launch(self, spec: ServiceSpec) -> None:
        assert self._tg is not None
        sup = await self._register(spec)
        await self._tg.start(self._run_supervisor, sup)

    async def _register(self, spec: ServiceSpec) -> Supervisor:
        """Create the supervisor of ``spec`` and make it visible to status, not started yet."""
        if spec.kind == "container":
            await self._ensure_docker()
        sup = self._make_supervisor(spec)
        self.supervisors[spec.name] = sup
        return sup

    async def _run_supervisor(
        self, sup: Supervisor, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        done = self._done[sup.name] = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._scopes[sup.name] = scope
                await sup.run(task_status=task_status)
        finally:
            done.set()

    def _supervisor_crashed(self, service: str, message: str, exc: BaseException) -> None:
        """A bug in one supervisor was caught (it restarts itself): the traceback goes to
        the daemon log (redacted), once per crash."""
        if self.log is not None:
            self.log.write_exception(f"{service}: {message}", exc)

    async def _retire(self, name: str) -> None:
        """Stop a service gracefully and forget its supervisor (reload: removed or changed)."""
        sup = self.supervisors[name]
        gen = sup.command_stop()
        with anyio.move_on_after(sup.spec.stop.timeout + 10):
            await sup.wait_settled(gen, frozenset({S.STOPPED}))
        self._scopes.pop(name).cancel()
        del self.supervisors[name]
        if sup.handle is not None and sup.spec.kind == "process":  # the bound passed: kill
            kill = StopSpec(signal=int(signal.SIGKILL), timeout=2.0)
            with anyio.move_on_after(5, shield=True):
                await sup.handle.stop(kill)

    def _on_probe(self, service: str, seconds: float, ok: bool) -> None:
        if self.telemetry is not None:
            self.telemetry.record_probe(service, seconds, ok)

    def snapshot(self) -> dict[str, tuple[ServiceState, Health]]:
        """name -> (state, health), for metrics and the sd_notify STATUS line."""
        return {name: (sup.state, sup.health) for name, sup in self.supervisors.items()}

    # ------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """Stop every process service, dependents first, within ``shutdown_timeout``; then
        SIGKILL. Container units are left running for the next daemon to adopt."""
        self.shutting_down = True
        self._stopping.set()
        with anyio.move_on_after(self.loaded.daemon.shutdown_timeout):
            async with self._reload_lock:  # let a reload in progress finish first
                pass

        async def stop_one(name: str) -> None:
            sup = self.supervisors[name]
            # Containers outlive hostvisor (issue 5): a daemon stop leaves them to the engine,
            # and the next daemon adopts them. `hostvisor stop NAME` still stops one.
            if sup.spec.kind == "process":
                gen = sup.command_stop()
                await sup.wait_settled(gen, frozenset({S.STOPPED}))

        with anyio.move_on_after(self.loaded.daemon.shutdown_timeout):
            await in_stop_order(list(self.supervisors), self.loaded.services, stop_one)
        await self._force_kill()
        self.flush_jobs()
        self._forget_state()

    async def _force_kill(self) -> None:
        """SIGKILL whatever is still alive (the deadline passed, or a second SIGINT); then
        stop the orphans no unit claims (SIGTERM, 2 s, SIGKILL): no child outlives us."""
        kill = StopSpec(signal=int(signal.SIGKILL), timeout=2.0)
        with anyio.move_on_after(5, shield=True):
            async with anyio.create_task_group() as tg:
                for sup in self.supervisors.values():
                    if sup.spec.kind == "process":
                        for handle in sup.live_handles():
                            tg.start_soon(handle.stop, kill)
        with anyio.move_on_after(ORPHAN_STOP + 3, shield=True):
            spared = {self.fdstore.pid} if self.fdstore is not None else set()
            orphans = [p for p in self.process_driver.orphans() if p.pid not in spared]
            for proc in orphans:
                signal_verified(proc, signal.SIGTERM)
            for proc in await wait_gone(orphans, ORPHAN_STOP):
                signal_verified(proc, signal.SIGKILL)

    # ------------------------------------------------------------ main

    async def main(self) -> None:
        """Run until SIGTERM/SIGINT; returns after an ordered shutdown."""
        from supervisor.notify import Notifier

        spec = self.loaded.daemon
        logs = log_dir(self.state_dir)
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log = DaemonLog(
            RotatingLog(
                service_log_path(self.state_dir, "hostvisor"), max_size=10 << 20, backups=5
            ),
            level=spec.log_level,
            hub=self.loghub,
            redactor=self.redactor,
            drops=LogDrops(on_report=lambda report: self._log_dropped(None, report)),
        )
        library_logs = LibraryLogHandler(self.log)
        for name in ("asyncio", "opentelemetry", "supervisor"):
            logging.getLogger(name).addHandler(library_logs)
            logging.getLogger(name).propagate = False
        from supervisor.upgrade import Installed

        self.installed = Installed.snapshot()
        notifier = self.notifier = Notifier.from_environ()
        try:
            await self._serve(notifier)
        except Exception as exc:
            # The last line of defence: whatever escaped, no child is left unsupervised.
            if user_mistake(exc) is None:
                self._crashed(exc)
            await self._last_stand(notifier)
            raise
        finally:
            if self.log is not None:
                self.log.close()

    async def _serve(self, notifier: Any) -> None:
        from supervisor.telemetry import open_telemetry

        spec = self.loaded.daemon
        # Signals first: a SIGTERM during start-up must still stop the children in order.
        watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with anyio.open_signal_receiver(*watched) as signals:
            # After `hostvisor reexec` they arrive blocked (supervisor.reexec.hold_signals):
            # one sent across the exec is delivered now, to the receiver.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
            async with anyio.create_task_group() as tg:
                self._tg = tg
                assert self.log is not None
                await tg.start(self.log.run)
                await tg.start(self._pump_log)
                # Subreaper on Linux; elsewhere the reaper still reaps our own untracked children.
                self.reaper.enable_subreaper()
                await tg.start(self.reaper.run)
                tg.start_soon(self._open_keeper)  # take_over waits for it
                async with open_telemetry(
                    spec.telemetry, bus=self.bus, snapshot=self.snapshot, version=__version__
                ) as telemetry:
                    self.telemetry = telemetry
                    await self._open_for_business(tg, notifier)
                    await self._signals(signals, notifier)
                    self.telemetry = None
                tg.cancel_scope.cancel()

    def _crashed(self, exc: BaseException) -> None:
        """Say once, in the daemon log (and on stderr through it), what ended the daemon."""
        import traceback

        cause = next(exception_leaves(exc), exc)
        text = f"internal error, stopping every service: {type(cause).__name__}: {cause}"
        self.exit_code = EXIT_SOFTWARE
        try:
            assert self.log is not None
            self.log.write_exception(text, exc)
        except Exception:  # the log itself is what broke: stderr is all that is left
            trace = "".join(traceback.format_exception(exc))
            with contextlib.suppress(Exception):
                os.write(2, f"hostvisor: {text}\n{trace}".encode(errors="replace"))

    async def _last_stand(self, notifier: Any) -> None:
        """Stop every process service (dependents first, within ``shutdown_timeout``, then
        SIGKILL), with a reaper of its own: the main task group is gone."""
        self.shutting_down = True
        with contextlib.suppress(Exception):
            notifier.stopping()

        async def stop_one(name: str) -> None:
            sup = self.supervisors[name]
            if sup.spec.kind == "process":
                with anyio.move_on_after(sup.spec.stop.timeout + 5):
                    async with anyio.create_task_group() as tg:
                        for handle in sup.live_handles():
                            tg.start_soon(handle.stop, sup.spec.stop)

        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                await tg.start(self.reaper.run)
                with anyio.move_on_after(self.loaded.daemon.shutdown_timeout):
                    await in_stop_order(list(self.supervisors), self.loaded.services, stop_one)
                await self._force_kill()
                self._forget_state()
                tg.cancel_scope.cancel()

    async def _open_for_business(self, tg: TaskGroup, notifier: Any) -> None:
        """Listen on the control socket, launch every service, tell systemd we are ready."""
        from supervisor.control.server import serve
        from supervisor.statuspage import keep_page
        from supervisor.takeover import answer_reexec, keep_state_file, take_over

        spec = self.loaded.daemon
        inherited = self.listen_sock

        def listening(sock: socket.socket) -> None:
            self.listen_sock = sock

        await tg.start(
            lambda task_status: serve(
                self,
                self.socket_path,
                allow_uids=spec.allow_uids,
                inherited=inherited,
                on_listening=listening,
                task_status=task_status,
            )
        )
        assert self.log is not None
        self.log.write("info", f"listening on {self.socket_path}")
        supervisors = [await self._register(service) for service in self.loaded.services.values()]
        await take_over(self, supervisors, tg)
        self.bus.publish(
            ev.DAEMON_STARTED,
            message=f"hostvisor {__version__} started, {len(supervisors)} services",
            attributes={"process.pid": os.getpid(), "hostvisor.config": str(spec.config_path)},
        )
        self._launch_all(tg, supervisors)
        answer_reexec(self)
        self.resumed = None
        tg.start_soon(keep_state_file, self)
        tg.start_soon(keep_page, self)  # [daemon] status_page, if set (supervisor.statuspage)
        notifier.ready()
        if notifier.watchdog_interval() is not None:
            tg.start_soon(notifier.run_watchdog)
        tg.start_soon(self._notify_status, notifier)
        tg.start_soon(self.watch_resources)

    async def _signals(self, signals: Any, notifier: Any) -> None:
        """Serve SIGHUP (reload) until SIGTERM/SIGINT, then shut down; a 2nd SIGINT kills."""
        async for signum in signals:
            if signum == signal.SIGHUP:
                assert self._tg is not None
                self._tg.start_soon(self._reload_on_signal, notifier)  # SIGTERM stays heard
                continue
            if signum == signal.SIGUSR1:  # logrotate's postrotate, as nginx does
                count = reopen_all()
                if self.log is not None:
                    self.log.write("info", f"reopened {count} log files (SIGUSR1)")
                continue
            break
        self.bus.publish(ev.DAEMON_STOPPING, message=f"stopping on {signal.Signals(signum).name}")
        notifier.stopping()
        async with anyio.create_task_group() as tg:

            async def forced() -> None:
                async for again in signals:
                    if again == signal.SIGINT:
                        self.bus.publish(ev.DAEMON_STOPPING, message="second SIGINT: killing now")
                        await self._force_kill()
                        tg.cancel_scope.cancel()

            tg.start_soon(forced)
            await self.shutdown()
            tg.cancel_scope.cancel()

    async def _pump_log(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with self.bus.subscribe(buffer=10_000) as events:
            self._log_events = events
            task_status.started()
            try:
                async for event in events:
                    if self.log is not None:
                        self.log.event(event)
            finally:  # a quick shutdown must not lose the last events (stopping, stopped)
                with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                    while self.log is not None:
                        self.log.event(events.receive_nowait())

    async def _notify_status(self, notifier: Any) -> None:
        from supervisor.notify import summary

        while True:
            notifier.status(summary(sup.state for sup in self.supervisors.values()))
            await self.changed.wait()
            await anyio.sleep(0.05)  # coalesce bursts of changes into one STATUS datagram


def user_mistake(exc: BaseException) -> HostvisorError | None:
    """The first user's mistake (a HostvisorError) inside ``exc``'s groups, if any."""
    return next((e for e in exception_leaves(exc) if isinstance(e, HostvisorError)), None)
