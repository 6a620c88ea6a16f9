"""The life of one instance of a service, once it is spawned: readiness (``start_seconds``
or the first passing probe), the health checks (Kubernetes' probe terms: thresholds,
a start period of ``failure_threshold * interval``), the ``post_start`` hook once RUNNING,
and the backoff reset after ``reset_after`` seconds of health.

Each function takes the :class:`~supervisor.service.ServiceSupervisor` whose instance it
watches and moves its state only through its ``_set_state``/``_set_message``/``_publish``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from supervisor import events as ev
from supervisor.drivers.base import Handle
from supervisor.health import (
    HealthCounter,
    Probe,
    bounded_seconds,
    http_status,
    next_probe_at,
    open_probe,
    tls_context,
)
from supervisor.prestart import run_in_unit
from supervisor.states import ExitStatus, Health, ServiceState

if TYPE_CHECKING:
    from supervisor.service import ServiceSupervisor

__all__ = ["Life", "watch"]

S = ServiceState


class Life:
    """The life of one instance, run by the supervisor's own task (no task of its own
    unless a health check or a post_start hook runs beside it): it waits for the main
    process's exit, with the readiness and backoff-reset timers as deadlines of that wait.

    Attributes:
        tg: the task group of the probe loop and the post_start hook (``None`` without
            either).
        promote_at: when ``start_seconds`` have passed (no health check; ``inf`` once done).
        reset_at: when the backoff resets after ``reset_after`` seconds running (``inf``
            until RUNNING, and once done).
    """

    __slots__ = ("handle", "promote_at", "reset_at", "scope", "sup", "tg")

    def __init__(self, sup: ServiceSupervisor, handle: Handle) -> None:
        self.sup, self.handle = sup, handle
        self.tg: TaskGroup | None = None
        self.scope: anyio.CancelScope | None = None
        now = anyio.current_time()
        self.promote_at = self.reset_at = math.inf
        if sup.state is S.RUNNING:
            # Resumed already RUNNING (re-exec, adoption): not promoted again, its post_start
            # ran under the previous daemon; only the backoff reset is rescheduled.
            self.reset_at = now + sup.spec.backoff.reset_after
        elif sup.spec.health is None:
            self.promote_at = now + sup.spec.start_seconds

    def reset_later(self) -> None:
        """Reset the backoff ``reset_after`` seconds from now, if still RUNNING and healthy."""
        self.reset_at = anyio.current_time() + self.sup.spec.backoff.reset_after
        if self.scope is not None:
            self.scope.deadline = min(self.promote_at, self.reset_at)

    async def wait_exit(self) -> ExitStatus | None:
        """The main process's exit status, or ``None`` once a command or a forced restart
        cancelled the supervisor's scope (whose deadline is the next timer's meanwhile)."""
        sup = self.sup
        while True:
            status: ExitStatus | None = None
            try:
                with sup._open_scope() as scope:
                    self.scope = scope
                    scope.deadline = min(self.promote_at, self.reset_at)
                    status = await self.handle.wait()
            finally:  # also when the probe loop cancels the task group (a health restart)
                self.scope = sup._scope = None
            if status is not None or sup._interrupted or sup._health_restart:
                return status
            now = anyio.current_time()  # a timer is due
            if self.promote_at <= now:
                self.promote_at = math.inf
                promote(sup, self.handle, self)
            if self.reset_at <= now:
                self.reset_at = math.inf
                if sup.state is S.RUNNING and sup.health is not Health.UNHEALTHY:
                    sup.backoff.reset()
                    sup.changed.fire()  # the state file's record of this service moved


async def watch(sup: ServiceSupervisor, handle: Handle) -> ExitStatus | None:
    """Supervise one instance until its main process exits (its status) or its health
    checks fail (``None``, with ``sup._health_restart`` set): promote it to RUNNING
    (after start_seconds, or the first healthy probe), keep checking its health, run
    post_start once and reset the backoff after reset_after. A command (or a forced
    restart) cancels the wait through the supervisor's scope: ``None`` too."""
    life = Life(sup, handle)
    if sup.spec.health is None and sup.spec.post_start is None:
        return await life.wait_exit()
    status: ExitStatus | None = None
    async with anyio.create_task_group() as tg:
        life.tg = tg
        if sup.spec.health is not None:
            tg.start_soon(health_loop, sup, handle, life)
        status = await life.wait_exit()
        tg.cancel_scope.cancel()
    return status


def promote(sup: ServiceSupervisor, handle: Handle, life: Life) -> None:
    if sup.state is not S.STARTING:
        return
    if not sup.count_all_failures:  # a job's run: every failed attempt counts
        sup.failed_starts = 0
    sup._reached_running = True
    remember(sup, handle)
    sup._set_state(S.RUNNING, "")
    sup._publish(ev.SERVICE_RUNNING, f"running (pid {handle.pid})", **{"process.pid": handle.pid})
    if sup.spec.post_start is not None:
        assert life.tg is not None
        life.tg.start_soon(post_start, sup)
    life.reset_later()


async def health_loop(sup: ServiceSupervisor, handle: Handle, life: Life) -> None:
    spec = sup.spec.health
    assert spec is not None
    docker_status = getattr(handle, "health_status", None)
    async with open_probe(
        spec,
        service=sup.spec.name,
        workdir=sup.spec.workdir,
        env=sup.spec.env,
        run_command=sup._run_command,
        docker_status=docker_status,
    ) as probe:
        await probe_forever(sup, probe, handle, life)


async def probe_forever(sup: ServiceSupervisor, probe: Probe, handle: Handle, life: Life) -> None:
    spec = sup.spec.health
    assert spec is not None
    started = anyio.current_time()
    counter = HealthCounter(spec, started_at=started)
    if sup.health_seed is not None:  # resumed after a re-exec: the counts go on
        counter.successes, counter.failures = sup.health_seed
        if sup.health in (Health.HEALTHY, Health.UNHEALTHY):
            counter.health = sup.health
    sup.health_counter = counter
    last_counted = started
    fast = min(bounded_seconds(spec.interval), 0.25)
    daemon_side = False  # in an episode of probes the daemon could not run (EMFILE...)
    while True:
        result = await probe()
        if not sup.driver.connected:
            # Docker engine unreachable (issue 5): health stays "unknown" as the daemon set
            # it; no result counts, so no flip to healthy and no health restart storm.
            await anyio.sleep(bounded_seconds(spec.interval))
            continue
        now = anyio.current_time()
        if sup._on_probe is not None and result.ok is not None:
            sup._on_probe(sup.spec.name, result.duration, bool(result.ok))
        ever_healthy = counter.health is Health.HEALTHY or counter.successes > 0
        # Until the first success, probe fast but count at most one failure per interval,
        # so a slow starter gets failure_threshold * interval seconds, as with Kubernetes.
        if result.ok is False and not ever_healthy and now - last_counted < spec.interval:
            pass
        else:
            if result.ok is False:
                last_counted = now
            previous = counter.health
            health = counter.record(result, now=now)
            if health is not previous or health is not sup.health:
                health_changed(sup, health, result.detail)
        if counter.health is Health.HEALTHY:
            promote(sup, handle, life)
        elif counter.health is Health.UNHEALTHY:
            sup._publish(
                ev.HEALTH_CHECK_RESTART,
                f"{counter.failures} health checks failed in a row: {result.detail}",
                **{"hostvisor.health.failures": counter.failures},
            )
            sup._health_restart = True
            assert life.tg is not None
            life.tg.cancel_scope.cancel()
            return
        elif result.ok is False or result.daemon_side:
            sup._set_message(f"health: {result.detail}")
        if result.daemon_side is not daemon_side:
            daemon_side = result.daemon_side
            _daemon_side_changed(sup, daemon_side, result.detail)
        if ever_healthy:
            # Round the next probe up to a grid of interval/20 (at most 50 ms), so that
            # many services' probes share one event-loop wakeup (timer coalescing, as
            # systemd's AccuracySec=); the interval stretches by at most that slack.
            await anyio.sleep_until(next_probe_at(now, spec.interval))
        else:
            await anyio.sleep(fast)


def health_changed(sup: ServiceSupervisor, health: Health, detail: str) -> None:
    previous = sup.health
    sup.health = health
    if health is Health.HEALTHY:
        sup.message = ""
    elif health is Health.UNHEALTHY:
        sup.message = f"unhealthy: {detail}"
    sup.changed.fire()
    if health in (Health.HEALTHY, Health.UNHEALTHY):
        sup._publish(
            ev.HEALTH_CHANGED,
            f"{previous} -> {health}: {detail}",
            **{
                "hostvisor.health.previous": str(previous),
                "hostvisor.health.state": str(health),
            },
        )


def remember(sup: ServiceSupervisor, handle: Handle) -> None:
    """Record (pid, start time) of a running instance, for ``reclaim_port = "own"``.

    Read once RUNNING, not at spawn: reading a process's start time while its exec
    settles costs about half a millisecond on the restart path.
    """
    if sup.spec.port is None or handle.pid is None:
        return
    create_time = getattr(handle, "create_time", None)
    if not isinstance(create_time, float):
        return
    sup._known = [*sup._known[-7:], (handle.pid, create_time)]


async def post_start(sup: ServiceSupervisor) -> None:
    """Run the hook once; a failure is a ``post_start.failed`` event whose ``error.type``
    is the HTTP status, ``exit_code``, ``timeout`` or the exception's class (OTel)."""
    spec = sup.spec.post_start
    assert spec is not None
    error: str | None = None
    kind = ""
    try:
        with anyio.fail_after(spec.timeout):
            if spec.http is not None:
                import httpx

                async with httpx.AsyncClient(
                    timeout=spec.timeout, trust_env=False, verify=tls_context()
                ) as client:
                    code = await http_status(
                        client, spec.http, method=spec.method, timeout=spec.timeout
                    )
                if code >= 400:
                    kind = str(code)
                    error = f"{spec.method} {spec.http}: HTTP {code}"
            elif spec.command is not None and sup._run_command is not None:
                result = await run_in_unit(sup, spec.command, spec.timeout)
                if result.timed_out or result.code != 0:
                    kind = "timeout" if result.timed_out else "exit_code"
                    error = f"post_start command failed: exit {result.code}: {result.tail(3)}"
    except TimeoutError:
        kind, error = "timeout", f"post_start timed out after {spec.timeout:g}s"
    except Exception as exc:  # a hook failure is an event, never a crash
        kind, error = type(exc).__name__, f"post_start: {type(exc).__name__}: {exc}"
    if error:
        sup._publish(ev.POST_START_FAILED, error, **{"error.type": kind})


def _daemon_side_changed(sup: ServiceSupervisor, now_failing: bool, detail: str) -> None:
    """Say in the daemon log when probes start or stop being impossible for want of a
    daemon resource (no event of the contract fits: it is not the service's health)."""
    import logging

    log = logging.getLogger("supervisor.health")
    if now_failing:
        log.warning("%s: health probes cannot run: %s", sup.spec.name, detail)
    else:
        log.warning("%s: health probes run again", sup.spec.name)
