"""One supervisor per service: a task that reconciles desired and actual state.

Commands (``start``, ``stop``, ``restart``) only change the desired state and
wake the task; the task alone moves the state machine of
:mod:`supervisor.states`, so commands for one service are serialised by
construction. A start attempt is: wait for dependencies, preflight, reclaim the
port, spawn; then supervise the instance (readiness by ``start_seconds`` or the
first passing probe, health checks, post_start hook, backoff reset) until it
exits, fails its health checks, or a command interrupts it. A crash and a
health-check restart go through the same backoff path.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from supervisor import events as ev
from supervisor.backoff import Backoff
from supervisor.drivers.base import Driver, Handle
from supervisor.errors import DockerUnavailable, DriverError, SpawnError
from supervisor.events import EventBus
from supervisor.health import CommandRunner
from supervisor.instance import watch
from supervisor.lazyevent import Broadcast, LazyEvent
from supervisor.prestart import daemon_trouble, prepare
from supervisor.spec import ServiceSpec
from supervisor.statefile import spec_digest

if TYPE_CHECKING:
    from supervisor.supervising import Supervisor

from supervisor.states import (
    Decision,
    ExitStatus,
    Health,
    ServiceState,
    after_exit,
    check_transition,
)

__all__ = ["Broadcast", "ServiceSupervisor", "exception_leaves"]

S = ServiceState
#: States in which a supervisor waits for a command rather than acting.
RESTING = frozenset({S.STOPPED, S.EXITED, S.FATAL})


class ServiceSupervisor:
    """Keeps one service in its desired state.

    Args:
        spec: the service.
        driver: starts instances (processes or containers).
        bus: where events go.
        peers: name -> supervisor, for ``depends_on``.
        changed: fired on every state or health change of any service.
        run_command: runs preflight, exec probes and command hooks.
        rng: randomness for backoff jitter.
        on_probe: called with (service, seconds, ok) after each health probe.
        on_crash: called with (service, message, exception) when a bug in this
            supervisor was caught (see :meth:`run`).
        on_fatal: called with (spec, last exit status or None, message) when the service
            goes FATAL (runs its ``[on_failure]`` hook).
    """

    # Slots, not a __dict__: past 30 attributes an instance's dict no longer shares its keys
    # with the others' (about 1.3 KiB more per service).
    __slots__ = (
        "_attach", "_attempts", "_digest", "_forced", "_gen", "_health_restart", "_interrupted",
        "_kick", "_known", "_not_counted", "_on_crash", "_on_fatal", "_on_probe", "_peers",
        "_reached_running", "_restart_requested", "_restart_resumed", "_resume", "_run_command",
        "_scope", "_seen_gen", "_stop_error", "_task_group", "_wake", "_want_up", "adopted",
        "backoff", "bus", "changed", "count_all_failures", "driver", "failed_starts", "handle",
        "health", "health_counter", "health_seed", "instance_started_at", "last_exit", "message",
        "restarts", "resuming_container", "retry_at", "spec", "state",
    )  # fmt: skip

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        driver: Driver,
        bus: EventBus,
        peers: Callable[[str], Supervisor | None],
        changed: Broadcast,
        run_command: CommandRunner | None = None,
        rng: random.Random | None = None,
        on_probe: Callable[[str, float, bool], None] | None = None,
        on_crash: Callable[[str, str, BaseException], None] | None = None,
        on_fatal: Callable[[ServiceSpec, ExitStatus | None, str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.driver = driver
        self.bus = bus
        self._peers = peers
        self.changed = changed
        self._run_command = run_command
        self._on_probe = on_probe
        self._on_crash = on_crash
        self._on_fatal = on_fatal
        #: A job's run (:mod:`supervisor.job`): every failed attempt counts towards
        #: ``give_up_after``, not only those that never reached RUNNING.
        self.count_all_failures = False
        self.backoff = Backoff(spec.backoff, rng=rng)
        self.state = S.STOPPED
        self.health = self._no_instance_health()
        self.message = ""
        self.handle: Handle | None = None
        self.restarts = 0
        self.last_exit: ExitStatus | None = None
        self.instance_started_at: float | None = None
        self.retry_at: float | None = None
        self.failed_starts = 0
        self._want_up = spec.autostart
        self._kick = False
        self._restart_requested = False
        self._health_restart, self._forced = False, ""  # a forced restart, and its reason
        self._attempts = 0
        self._gen = 0
        self._seen_gen = 0
        self._scope: anyio.CancelScope | None = None
        self._interrupted = False
        self._reached_running = False
        self._task_group: TaskGroup | None = None
        self._stop_error = ""
        self._not_counted = False
        self._wake = LazyEvent()
        self._known: list[tuple[int, float]] = []
        #: True while the instance is one taken over after a daemon crash (status field
        #: ``adopted``), until its next start.
        self.adopted = False
        #: The running instance's probe counters (set by the health loop).
        self.health_counter: Any = None
        #: Probe counters to go on from: (successes, failures) of the previous daemon.
        self.health_seed: tuple[int, int] | None = None
        self._resume: Handle | None = None
        self._attach: Callable[..., object] | None = None
        self._restart_resumed = False
        #: The next start is the re-adoption of a container after a re-exec: not a restart.
        self.resuming_container = False
        self._digest: str | None = None

    def __repr__(self) -> str:
        extra = ""
        if self.state is S.BACKOFF and self.retry_at is not None:
            left = max(0.0, self.retry_at - anyio.current_time())
            extra = f" (attempt {self.backoff.attempt}, retry in {left:.1f}s)"
        return f"<ServiceSupervisor {self.spec.name}: {self.state}{extra}>"

    @property
    def name(self) -> str:
        return self.spec.name

    def live_handles(self) -> list[Handle]:
        """The instance, if one runs (a job's supervisor may have several)."""
        return [self.handle] if self.handle is not None else []

    @property
    def spec_digest(self) -> str:
        """:func:`~supervisor.statefile.spec_digest` of the spec, which never changes for a
        supervisor (a reload builds a new one): computed once, not at every state write."""
        if self._digest is None:
            self._digest = spec_digest(self.spec)
        return self._digest

    def _no_instance_health(self) -> Health:
        """Health while no instance runs: ``none`` without a probe, else ``unknown``."""
        return Health.NONE if self.spec.health is None else Health.UNKNOWN

    # ---------------------------------------------------------------- commands

    def command_start(self) -> int:
        """Want it up; from EXITED, FATAL or BACKOFF start now. Returns the command number."""
        self._gen += 1
        self._want_up = True
        if self.state in (S.EXITED, S.FATAL, S.STOPPED, S.BACKOFF):
            self._kick = True
            self._interrupt()
        else:
            self._seen_gen = self._gen
        return self._gen

    def command_stop(self) -> int:
        """Want it down: stop the instance (gracefully) or cancel a pending start."""
        self._gen += 1
        self._want_up = False
        self._restart_requested = False
        if self.state is S.STOPPED:
            self._seen_gen = self._gen
        else:
            self._interrupt()  # EXITED and FATAL move to STOPPED too: the target of a stop
        return self._gen

    def command_restart(self) -> int:
        """Stop the instance if any, then start a fresh one at once (backoff reset)."""
        self._gen += 1
        self._want_up = True
        self._kick = True
        self._restart_requested = True
        self._interrupt()
        return self._gen

    def restart_for(self, message: str) -> bool:
        """Restart the live instance through the failure path (policy, backoff, give_up_after)
        as failing health checks do; ``message`` says why. False (nothing done) if none is live."""
        if self.handle is None or self._scope is None:
            return False
        self._health_restart, self._forced = True, message
        self._scope.cancel()
        return True

    def _interrupt(self) -> None:
        self._interrupted = True
        self._wake.set()
        if self._scope is not None:
            self._scope.cancel()

    async def wait_settled(self, gen: int, targets: frozenset[ServiceState]) -> None:
        """Return once command ``gen`` was acted on and the state is one of ``targets``
        or a resting state (EXITED, FATAL, STOPPED) that the command did not ask for."""
        while not (self._seen_gen >= gen and (self.state in targets or self.state in RESTING)):
            await self.changed.wait()

    def resume_instance(
        self,
        handle: Handle,
        *,
        started_at: float,
        attach: Callable[..., object] | None = None,
        restart: bool = False,
    ) -> None:
        """Take over ``handle``, an instance that already runs (re-exec or adoption), before
        :meth:`run`: the loop supervises it as its own, with no spawn.

        Args:
            started_at: its spawn time on our monotonic clock (for its uptime).
            attach: starts its log drains, called as ``attach(task_group=...)`` with the
                supervisor's task group.
            restart: its unit changed meanwhile: restart it once, gracefully.
        """
        self._resume = handle
        self._attach = attach
        self._restart_resumed = restart
        self.handle = handle
        self.instance_started_at = started_at

    # ---------------------------------------------------------------- status

    def status_entry(self) -> dict[str, Any]:
        """This service's entry of the status document (contract section 5)."""
        handle = self.handle
        uptime = None
        if handle is not None and self.instance_started_at is not None:
            uptime = round(anyio.current_time() - self.instance_started_at, 3)
        return {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "state": str(self.state),
            "health": str(self.health),
            "pid": handle.pid if handle is not None else None,
            "container_id": handle.container_id if handle is not None else None,
            "restarts": self.restarts,
            "uptime_seconds": uptime,
            "last_exit": self.last_exit.as_json() if self.last_exit else None,
            "message": self.bus.redactor(self.message),
            "port": self.spec.port.number if self.spec.port else None,
            "adopted": self.adopted,
        }

    def _set_state(self, target: ServiceState, message: str | None = None) -> None:
        if target is not self.state:
            check_transition(self.spec.name, self.state, target)
            self.state = target
        if message is not None:
            self.message = message
        self.changed.fire()

    def _set_message(self, message: str) -> None:
        if message != self.message:
            self.message = message
            self.changed.fire()

    def _publish(self, name: str, message: str = "", **attributes: Any) -> None:
        self.bus.publish(name, service=self.spec.name, message=message, attributes=attributes)

    # ---------------------------------------------------------------- main loop

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Reconcile until cancelled; call :meth:`command_stop` first for a graceful end.

        A bug in this supervisor (any ``Exception`` escaping the reconcile loop) does not
        end it: the instance is stopped (shielded, bounded), the traceback goes to
        ``on_crash``, and the loop starts again after a backoff delay, as a crashed
        instance would; commands keep being answered meanwhile.
        """
        task_status.started()
        while True:
            try:
                await self._reconcile()
            except Exception as exc:
                await self._recover(exc)

    async def _reconcile(self) -> None:
        # The task group opened here owns the instances' helper tasks (log drains).
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            while True:
                self._wake = LazyEvent()
                self._interrupted = False
                if self._resume is not None:
                    handle, self._resume = self._resume, None
                    attach, self._attach = self._attach, None
                    if attach is not None:
                        attach(task_group=tg)
                    await self._live(handle, resumed=True)
                    continue
                if not self._want_up:
                    if self.state in (S.BACKOFF, S.STARTING, S.EXITED, S.FATAL):
                        self._enter_stopped("stopped by request")
                    self._settle()
                    await self._wake.wait()
                    continue
                if self.state in (S.EXITED, S.FATAL) and not self._kick:
                    self._settle()
                    await self._wake.wait()
                    continue
                if self.state is S.BACKOFF and self.retry_at is not None and not self._kick:
                    # Any command ends the wait early: it sets _kick or clears _want_up.
                    with anyio.move_on_after(max(0.0, self.retry_at - anyio.current_time())):
                        await self._wake.wait()
                    self.retry_at = None
                    continue
                if self._kick:
                    self._kick = False
                    self.failed_starts = 0
                    if self._restart_requested or self.state in RESTING or self.state is S.BACKOFF:
                        self.backoff.reset()
                    self._restart_requested = False
                await self._attempt()

    async def _recover(self, exc: Exception) -> None:
        """After a bug: stop the instance we lost track of, tell, and back off."""
        cause = next(exception_leaves(exc), exc)
        text = f"internal error in the supervisor: {type(cause).__name__}: {cause}"
        if self._on_crash is not None:
            self._on_crash(self.spec.name, text, exc)
        handle, self.handle = self.handle, None
        if handle is not None and self.spec.kind == "process":
            # A container is left to the engine: the next attempt adopts it.
            with contextlib.suppress(Exception):
                await self._stop_handle(handle)
        self._scope = None
        self.instance_started_at = None
        self.health = self._no_instance_health()
        self._interrupted = self._health_restart = False
        delay = self.backoff.next_delay()
        self.retry_at = anyio.current_time() + delay
        # Outside the transition table on purpose: the state we were in is unknown.
        self.state, self.message = S.BACKOFF, f"{text}; supervisor restarts in {delay:.1f}s"
        attrs = {"error.type": type(cause).__name__, "hostvisor.backoff.delay_s": round(delay, 6)}
        self._publish(ev.SERVICE_BACKOFF, self.message, **attrs)
        self.changed.fire()

    def _settle(self) -> None:
        """Mark every command so far as acted on, and tell the waiters."""
        self._seen_gen = self._gen
        self.changed.fire()

    def _enter_stopped(self, message: str) -> None:
        self._set_state(S.STOPPED, message)
        self.retry_at = None
        self._publish(ev.SERVICE_STOPPED, message)

    def _open_scope(self) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        self._scope = scope
        if self._interrupted:
            scope.cancel()
        return scope

    async def _attempt(self) -> None:
        """One start attempt and the life of the instance it starts."""
        if self._attempts and not self.resuming_container:
            self.restarts += 1
        self.resuming_container = False
        self._attempts += 1
        self.adopted = False
        self.health_seed = None
        self.health = self._no_instance_health()
        self._seen_gen = self._gen
        self._set_state(S.STARTING, "")
        self._publish(ev.SERVICE_STARTING, "starting", **{"hostvisor.restart.count": self.restarts})
        handle: Handle | None = None
        failure: str | None = None
        with self._open_scope():
            failure = await prepare(self)
            if failure is None:
                handle, failure = await self._spawn()
        self._scope = None
        if handle is not None:
            await self._live(handle)
        elif self._interrupted:
            self._after_interrupt()
        else:
            # An unreachable Docker engine, or the daemon out of descriptors or memory, is not
            # the service's failure: retry through backoff, not counted towards give_up_after.
            counted, self._not_counted = not self._not_counted, False
            self._after_failure(None, failed_start=counted, message=failure or "start failed")

    async def _spawn(self) -> tuple[Handle | None, str | None]:
        self._set_message("")
        assert self._task_group is not None
        # A process spawn is shielded (it takes a millisecond, and a command arriving mid-spawn
        # must not lose track of a child; the next scope sees the interrupt). A container start
        # is not: it may run recreate_command for minutes, and the driver stops it if cancelled.
        shield = self.spec.kind == "process"
        try:
            with anyio.CancelScope(shield=shield):
                handle = await self.driver.start(self.spec, task_group=self._task_group)
        except DockerUnavailable as exc:
            self._not_counted = True
            return None, str(exc)
        except (SpawnError, DriverError, OSError) as exc:
            self._not_counted = daemon_trouble(exc)
            return None, str(exc)
        return handle, None

    # ---------------------------------------------------------------- instance life

    async def _live(self, handle: Handle, *, resumed: bool = False) -> None:
        """Supervise one instance until it exits, fails its checks, or a command stops it.

        ``resumed``: an instance taken over from the previous daemon; its state, uptime
        and counters were restored (:mod:`supervisor.carryover`). One that was being
        stopped is stopped now."""
        self.handle = handle
        if not resumed or self.instance_started_at is None:
            self.instance_started_at = anyio.current_time()
            self._reached_running = False
        self._health_restart, self._forced = False, ""
        if resumed and (self.state is S.STOPPING or self._restart_resumed):
            if self._restart_resumed:
                self._restart_resumed = False
                self._kick = self._restart_requested = True
                self.message = "the unit changed while no daemon ran: restarting"
            self._interrupted = True

        status = await watch(self, handle)  # in self._scope (commands cancel it)
        if status is None:
            # Interrupted by a command or a forced restart: stop it ourselves, shielded, bounded.
            self._set_state(S.STOPPING)
            status = await self._stop_handle(handle)
            self._record_exit(handle, status)
        else:
            # The main process exited on its own: that is the instance's exit, published
            # at once; then what is left of it (group members, marked escapees) is stopped
            # with the unit's stop signal and stop_timeout before the policy applies.
            self._record_exit(handle, status)
            self._set_state(S.STOPPING, f"{self._exit_message(status)}; stopping what is left")
            await self._stop_handle(handle)
        self.handle = None
        self.instance_started_at = None
        self.health = self._no_instance_health()
        if self._health_restart:
            # The crash path (policy, backoff, give_up_after); the exit status is ours: a failure.
            self._after_failure(
                None,
                failed_start=not self._reached_running,
                message=self._forced or "restarted: health checks failed",
            )
        elif self._interrupted:
            self._after_interrupt()
        else:
            self._after_failure(
                status, failed_start=not self._reached_running, message=self._exit_message(status)
            )

    async def _stop_handle(self, handle: Handle) -> ExitStatus | None:
        """Stop an instance, each try shielded and bounded (``stop_timeout`` + 5 s, or + 15 s
        for a container).

        A container whose engine is unreachable cannot be stopped now: the service stays
        STOPPING (with a message) and the stop is tried again when the engine is back,
        so a container never keeps running while its unit says it is stopped.
        """
        while True:
            unreachable: DockerUnavailable | None = None
            # Containers: past the driver's own bound on an engine call (10 s by default).
            slack = 5 if self.spec.kind == "process" else 15
            with anyio.move_on_after(self.spec.stop.timeout + slack, shield=True):
                try:
                    return await handle.stop(self.spec.stop)
                except DockerUnavailable as exc:
                    unreachable = exc
                except (DriverError, OSError) as exc:  # e.g. the engine refused
                    self._stop_error = f"stop failed: {exc}"
                    return None
            if unreachable is None:
                return None  # the bound passed
            self._set_message(f"stop pending: {unreachable}; will stop it when the engine is back")
            await self._until_engine_back()

    async def _until_engine_back(self) -> None:
        """Wait until the driver reports its engine reachable again (re-checked at least every
        5 s, in case it has not noticed the outage yet)."""
        if self.driver.connected:
            with anyio.move_on_after(5):
                await self.changed.wait()
        while not self.driver.connected:
            await self.changed.wait()

    def _exit_message(self, status: ExitStatus | None) -> str:
        return f"exited: {status.describe()}" if status else "exited"

    def _record_exit(self, handle: Handle, status: ExitStatus | None) -> None:
        if status is None:
            return
        self.last_exit = status
        attrs: dict[str, Any] = {"process.pid": handle.pid}
        if status.code is not None:
            attrs["process.exit.code"] = status.code
        if status.signal is not None:
            attrs["hostvisor.exit.signal"] = status.signal
        if handle.container_id:
            attrs["container.id"] = handle.container_id
        self._publish(ev.SERVICE_EXITED, status.describe(), **attrs)

    # ---------------------------------------------------------------- after an instance

    def _after_interrupt(self) -> None:
        """A command interrupted the start or the instance."""
        if self._want_up:
            self._kick = True  # restart: straight to a new attempt, no backoff
            return
        stop_error, self._stop_error = self._stop_error, ""
        self._enter_stopped(stop_error or "stopped by request")

    def _after_failure(
        self, status: ExitStatus | None, *, failed_start: bool, message: str
    ) -> None:
        if self.count_all_failures:
            failed_start = True
        if failed_start:
            self.failed_starts += 1
        decision = after_exit(
            policy=self.spec.restart,
            status=status,
            failed_start=failed_start,
            failed_starts_in_a_row=self.failed_starts,
            give_up_after=self.spec.give_up_after,
        )
        if decision is Decision.EXITED:
            self._set_state(S.EXITED, message)
            return
        if decision is Decision.FATAL:
            text = f"gave up after {self.failed_starts} failed starts: {message}"
            self._set_state(S.FATAL, text)
            self._publish(ev.SERVICE_FATAL, text, **{"hostvisor.restart.count": self.restarts})
            if self._on_fatal is not None:
                self._on_fatal(self.spec, status, text)
            return
        delay = self.backoff.next_delay()
        self.retry_at = anyio.current_time() + delay
        self._set_state(S.BACKOFF, f"{message}; retry in {delay:.1f}s")
        attempt = self.backoff.attempt
        attrs = {"hostvisor.backoff.delay_s": round(delay, 6), "hostvisor.backoff.attempt": attempt}
        text = f"{message}; retry in {delay:.3f}s (attempt {attempt})"
        self._publish(ev.SERVICE_BACKOFF, text, **attrs)


def exception_leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``'s (nested) exception groups, in order; ``exc`` itself
    when it is not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from exception_leaves(inner)
    else:
        yield exc
