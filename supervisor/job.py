"""One supervisor per job: a scheduled unit (``schedule``/``every``) or a one-shot
(``restart = "no"`` without a schedule).

A job's instances are *runs* that end. Each run is a
:class:`~supervisor.service.ServiceSupervisor` of its own over the unit's spec (with
``start_seconds = 0`` and ``HOSTVISOR_RUN=<number>`` in its environment), so a run gets
the services' whole start path: dependencies, preflight, spawn, logs, the sweep of what
is left after the main process exits, and, under ``restart = "on-failure"``, retries
through backoff bounded by ``give_up_after`` (0 = until the next trigger). The job
above the runs decides when a run starts (the :class:`~supervisor.schedule.Timetable`,
read against the wall clock at least every ``SLICE`` seconds), what a trigger does while
a run is still going (``concurrency``: Kubernetes CronJob's ``concurrencyPolicy``),
enforces ``run_timeout`` (the run's unit stop signal, then ``stop_timeout``, then SIGKILL;
Kubernetes' ``activeDeadlineSeconds``) and reports each outcome as a
``hostvisor.job.*`` event.

States (contract section 5): during a run, the run's state (``starting``, ``running``,
``backoff``, ``stopping``); between runs a scheduled job is ``waiting``; a one-shot that
ran is ``exited`` (its ``last_exit`` says how) or ``fatal`` (its retries gave up); a
job stopped with ``hostvisor stop`` is ``stopped``, and a scheduled one is *suspended*
(no trigger fires) until the next ``hostvisor start`` (Kubernetes' ``suspend``).
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.abc import TaskGroup

from supervisor import events as ev
from supervisor.backoff import Backoff
from supervisor.drivers.base import Driver, Handle
from supervisor.drivers.process_handle import RUN_MARKER
from supervisor.events import EventBus, rfc3339
from supervisor.health import CommandRunner
from supervisor.jobrun import LastRun, Relay, Run, wall_now
from supervisor.service import Broadcast, ServiceSupervisor
from supervisor.spec import ServiceSpec
from supervisor.statefile import spec_digest
from supervisor.states import ExitStatus, Health, Restart, ServiceState

__all__ = ["JobSupervisor", "LastRun", "Run"]  # the last two from supervisor.jobrun

S = ServiceState
#: States in which a run's supervisor has nothing left to do.
_OVER = frozenset({S.STOPPED, S.EXITED, S.FATAL})


class JobSupervisor:
    """Runs one job (module docstring); the daemon drives it like a
    :class:`~supervisor.service.ServiceSupervisor` (same commands, status entry, ``run``).

    Args:
        spec: the job's unit (``spec.is_job``).
        driver, bus, peers, changed, run_command, rng, on_probe, on_crash: as for
            :class:`~supervisor.service.ServiceSupervisor` (given to each run).
        on_failure: called with (spec, exit status or None, message) when a run fails or
            times out (runs the ``[on_failure]`` hook).
        ledger: keeps the last trigger, run count and last run across daemon restarts
            (:class:`supervisor.jobledger.JobLedger`); ``None``: nothing is kept.
        clock: the wall clock (aware datetimes); injected by tests.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        driver: Driver,
        bus: EventBus,
        peers: Callable[[str], Any],
        changed: Broadcast,
        run_command: CommandRunner | None = None,
        rng: random.Random | None = None,
        on_probe: Callable[[str, float, bool], None] | None = None,
        on_crash: Callable[[str, str, BaseException], None] | None = None,
        on_failure: Callable[[ServiceSpec, ExitStatus | None, str], None] | None = None,
        ledger: Any = None,
        clock: Callable[[], datetime] = wall_now,
    ) -> None:
        self.spec = spec
        self.driver = driver
        self.bus = bus
        self.changed = changed
        self._sup_args: dict[str, Any] = {
            "driver": driver, "bus": bus, "peers": peers, "run_command": run_command,
            "rng": rng, "on_probe": on_probe, "on_crash": on_crash,
        }  # fmt: skip
        self._rng = rng or random.Random()
        self._on_failure = on_failure
        self._ledger = ledger
        self._clock = clock
        self.health = Health.NONE
        self.adopted = False
        self.message = ""
        self.runs: list[Run] = []
        self.last_run: LastRun | None = None
        self.last_exit: ExitStatus | None = None
        self.last_trigger: datetime | None = None
        self.run_count = 0
        self._restarts_done = 0
        self._want_up = spec.autostart
        #: A scheduled job stopped by a command: no trigger fires until the next start.
        self.suspended = not spec.autostart
        self._rest = S.STOPPED  # a one-shot's state between runs
        self._gen = 0
        self._settled: dict[int, anyio.Event] = {}
        #: Commands (stop) settled once no run is left.
        self._when_idle: list[int] = []
        self._tg: TaskGroup | None = None
        self._queued: list[tuple[str, datetime | None, int | None]] = []
        self._carried: list[Run] = []
        self._crash_backoff = Backoff(spec.backoff, rng=rng)
        self._wake = anyio.Event()
        self._fresh_timetable = True
        self.timetable: Any = None
        #: Carried over a re-exec: a one-shot does not run again at the start.
        self.resumed = False
        if ledger is not None:
            ledger.restore(self)

    def __repr__(self) -> str:
        return f"<JobSupervisor {self.spec.name}: {self.state}, {len(self.runs)} running>"

    @property
    def name(self) -> str:
        return self.spec.name

    @functools.cached_property
    def spec_digest(self) -> str:
        """:func:`~supervisor.statefile.spec_digest` of the spec (computed once)."""
        return spec_digest(self.spec)

    # ---------------------------------------------------------------- views

    @property
    def state(self) -> ServiceState:
        """The newest run's state; between runs ``waiting``, ``exited``, ``fatal`` or
        ``stopped`` (module docstring)."""
        if self.runs:
            state = self.runs[-1].sup.state
            return S.STARTING if state is S.STOPPED else state
        if self.spec.schedule is None:
            return self._rest
        return S.STOPPED if self.suspended else S.WAITING

    @property
    def handle(self) -> Handle | None:
        """The newest run's instance, if one runs."""
        for run in reversed(self.runs):
            if run.sup.handle is not None:
                return run.sup.handle
        return None

    def live_handles(self) -> list[Handle]:
        """Every run's instance (``concurrency = "allow"`` may run several)."""
        return [run.sup.handle for run in self.runs if run.sup.handle is not None]

    @property
    def restarts(self) -> int:
        """Retries within runs (``restart = "on-failure"``), over all runs."""
        return self._restarts_done + sum(run.sup.restarts for run in self.runs)

    @property
    def completed(self) -> bool:
        """The last run succeeded and none runs now (``depends_on = "completed"``)."""
        return not self.runs and self.last_run is not None and self.last_run.outcome == "succeeded"

    @property
    def failed_run(self) -> str | None:
        """Why the last run failed, if it did and none runs now."""
        last = self.last_run
        if self.runs or last is None or last.outcome not in ("failed", "timed_out"):
            return None
        return self.message or last.outcome

    @property
    def next_run(self) -> datetime | None:
        """The next trigger time, for a scheduled job that is not suspended."""
        if self.spec.schedule is None or self.suspended or self.timetable is None:
            return None
        moment: datetime | None = self.timetable.next_run
        return moment

    def status_entry(self) -> dict[str, Any]:
        """The status entry of contract section 5, with the job fields ``schedule`` (the
        cron expression, ``"every 10m"``, or ``null`` for a one-shot), ``next_run``
        (RFC 3339 or ``null``), ``last_run`` (:meth:`LastRun.as_json` or ``null``) and
        ``suspended``."""
        run = self.runs[-1] if self.runs else None
        handle = self.handle
        message = run.sup.message if run is not None else self.message
        uptime = None
        if run is not None and handle is not None and run.sup.instance_started_at is not None:
            uptime = round(anyio.current_time() - run.sup.instance_started_at, 3)
        upcoming = self.next_run
        schedule = self.spec.schedule
        return {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "state": str(self.state),
            "health": str(self.health),
            "pid": handle.pid if handle is not None else None,
            "container_id": None,
            "restarts": self.restarts,
            "uptime_seconds": uptime,
            "last_exit": self.last_exit.as_json() if self.last_exit else None,
            "message": self.bus.redactor(message),
            "port": None,
            "adopted": False,
            "schedule": schedule.describe() if schedule is not None else None,
            "next_run": rfc3339(upcoming) if upcoming is not None else None,
            "last_run": self.last_run.as_json() if self.last_run is not None else None,
            "suspended": self.suspended and schedule is not None,
        }

    # ---------------------------------------------------------------- commands

    def _command(self) -> tuple[int, anyio.Event]:
        self._gen += 1
        settled = self._settled[self._gen] = anyio.Event()
        return self._gen, settled

    def command_start(self) -> int:
        """Run now (subject to ``concurrency``) and end a suspension; the command settles
        when that run ends (or, skipped under ``forbid``, when the running one ends)."""
        return self._run_now("start")

    def _run_now(self, trigger: str) -> int:
        gen, _ = self._command()
        self._unsuspend()
        self._request(trigger, None, gen)
        self._poke()  # the schedule loop sleeps while suspended: wake it
        return gen

    def _unsuspend(self) -> None:
        self._want_up = True
        if self.suspended:
            self.suspended = False
            self._fresh_timetable = True

    def command_resume(self) -> int:
        """``hostvisor start --all``: end a suspension, and run a one-shot that has not run
        in this daemon's life; a scheduled job waits for its next trigger (settled at once)."""
        if self.spec.schedule is None and self.state is S.STOPPED and not self.runs:
            return self._run_now("start")
        gen, _ = self._command()
        self._unsuspend()
        self._poke()
        self._settle([gen])
        return gen

    def command_stop(self) -> int:
        """Stop every run in progress and suspend the schedule until the next start; the
        command settles once no run is left."""
        gen, _ = self._command()
        self._want_up = False
        self.suspended = self.spec.schedule is not None
        self._queued.clear()
        for run in self.runs:
            run.stopped = True
            run.sup.command_stop()
            run.sup.changed.fire()  # a run still in its random delay ends it now
        if self.runs:
            self._when_idle.append(gen)  # settled by _release once the last one ended
        else:
            if self.spec.schedule is None and self._rest is not S.STOPPED:
                self._rest = S.STOPPED
                self._publish(ev.SERVICE_STOPPED, "stopped by request")
            self._settle([gen])
        self._poke()
        return gen

    def command_restart(self) -> int:
        """Stop the runs in progress and start a new one at once."""
        return self._run_now("restart")

    async def wait_settled(self, gen: int, targets: frozenset[ServiceState]) -> None:
        """Return once command ``gen`` has had its effect (module docstring of the
        commands); ``targets`` is the daemon's wish, which a job's run decides."""
        settled = self._settled.get(gen)
        if settled is not None:
            await settled.wait()

    def _settle(self, gens: list[int]) -> None:
        for gen in gens:
            settled = self._settled.pop(gen, None)
            if settled is not None:
                settled.set()

    def _poke(self) -> None:
        self._wake.set()
        self.changed.fire()

    def _publish(self, name: str, message: str = "", **attributes: Any) -> None:
        self.bus.publish(name, service=self.spec.name, message=message, attributes=attributes)

    # ---------------------------------------------------------------- main loop

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Trigger runs until cancelled (call :meth:`command_stop` first to end the runs
        gracefully). A one-shot with ``autostart`` runs once at the start."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.spec.schedule is None and self._want_up and not self.resumed:
                self._request("start", None, None)
            for run in self._carried:
                tg.start_soon(self._carry_on, run)
            self._carried = []
            queued, self._queued = self._queued, []
            for item in queued:
                self._request(*item)
            task_status.started()
            if self.spec.schedule is None:
                await anyio.sleep_forever()
            while True:
                try:
                    await self._schedule_loop()
                except Exception as exc:  # the last line of defence: runs go on
                    delay = self._crash_backoff.next_delay()
                    self.message = f"internal error in the schedule: {exc!r}; again in {delay:.1f}s"
                    on_crash = self._sup_args.get("on_crash")
                    if on_crash is not None:
                        on_crash(self.spec.name, self.message, exc)
                    self._publish(
                        ev.SERVICE_BACKOFF, self.message,
                        **{"error.type": type(exc).__name__, "hostvisor.backoff.delay_s": delay},
                    )  # fmt: skip
                    self._fresh_timetable = True
                    await anyio.sleep(delay)

    async def _schedule_loop(self) -> None:
        from supervisor.schedule import Calendar, Timetable

        assert self.spec.schedule is not None
        calendar = Calendar(self.spec.schedule)
        first = True
        while True:
            self._wake = anyio.Event()
            if self.suspended:
                await self._wake.wait()
                continue
            now = self._clock()
            if self._fresh_timetable:
                # At start, from the last trigger (catch_up); after a suspension, from now.
                last = self.last_trigger if first else None
                catch_up = self.spec.schedule.catch_up if first else "none"
                self.timetable = Timetable(calendar, catch_up=catch_up, last_trigger=last, now=now)
                self._fresh_timetable, first = False, False
                self.changed.fire()
            tick = self.timetable.poll(now)
            if self.timetable.last_trigger != self.last_trigger:
                self.last_trigger = self.timetable.last_trigger
                if self._ledger is not None:
                    self._ledger.record(self)
            if tick.fire is not None:
                self._request(tick.reason, tick.fire, None)
                self.changed.fire()
            elif tick.reason == "missed" and tick.due is not None:
                about = "about " if tick.estimated else ""
                self._publish(
                    ev.JOB_SKIPPED,
                    f"{about}{tick.missed} trigger(s) missed, the latest {tick.late:.0f}s ago, "
                    'while the daemon was down or the machine slept (catch_up = "none")',
                    **{
                        "hostvisor.job.skip_reason": "missed",
                        "hostvisor.job.scheduled_time": rfc3339(tick.due),
                    },
                )
                self.changed.fire()
            with anyio.move_on_after(tick.sleep):
                await self._wake.wait()

    # ---------------------------------------------------------------- triggers

    def _request(self, trigger: str, scheduled: datetime | None, gen: int | None) -> None:
        """A trigger (schedule, catch-up) or a command (start, restart): apply
        ``concurrency`` and start a run, or skip."""
        if self._tg is None:
            self._queued.append((trigger, scheduled, gen))
            return
        waiters = [gen] if gen is not None else []
        policy = self.spec.schedule.concurrency if self.spec.schedule is not None else "forbid"
        if self.spec.give_up_after == 0 and trigger != "start":
            for run in self.runs:  # retrying "until the next trigger": that was it
                if run.sup.state is S.BACKOFF:
                    run.gave_up = True
                    run.sup.command_stop()
        active = [run for run in self.runs if not run.stopped and not run.gave_up]
        if trigger == "restart":
            policy = "replace"
        if active and policy == "forbid":
            number = active[-1].number
            self._publish(
                ev.JOB_SKIPPED,
                f'run {number} is still going (concurrency = "forbid")',
                **{"hostvisor.job.skip_reason": "running", "hostvisor.job.run": number},
            )
            active[-1].waiters.extend(waiters)
            return
        replaced = active if policy == "replace" else []
        for run in replaced:
            run.stopped = True
            run.sup.command_stop()
        delay = 0.0
        if self.spec.schedule is not None and trigger == "schedule":
            delay = self._rng.uniform(0.0, self.spec.schedule.random_delay)
        run = self._new_run("start" if trigger == "restart" else trigger, waiters)
        self._tg.start_soon(self._one_run, run, scheduled, replaced, delay)

    def adopt_run(self, number: int, trigger: str, *, started: float) -> Run:
        """A run the previous code started (``reexec``, :mod:`supervisor.jobcarry`): it is
        watched to its end from :meth:`run`, with no trigger and no header."""
        run = self._new_run(trigger, [], number=number)
        # Numbers only go on: the history on disk may predate this run's number.
        self.run_count = max(self.run_count, number)
        run.record.started = started
        self.last_run = run.record
        self._carried.append(run)
        return run

    def _new_run(self, trigger: str, waiters: list[int], *, number: int = 0) -> Run:
        if not number:
            self.run_count += 1
            number = self.run_count
        env = {**self.spec.env, RUN_MARKER: str(number)}
        policy = Restart.ON_FAILURE if self.spec.restart is Restart.ON_FAILURE else Restart.NO
        run_spec = replace(
            self.spec, env=env, restart=policy, autostart=True, start_seconds=0.0,
            schedule=None, on_failure=None, run_timeout=None,
        )  # fmt: skip
        sup = ServiceSupervisor(run_spec, changed=Relay(self.changed), **self._sup_args)
        sup.count_all_failures = True
        record = LastRun(number=number, trigger=trigger, started=time.time())
        run = Run(number=number, trigger=trigger, sup=sup, record=record, waiters=waiters)
        self.runs.append(run)
        return run

    async def _one_run(
        self, run: Run, scheduled: datetime | None, replaced: list[Run], delay: float
    ) -> None:
        try:
            for old in replaced:
                await old.done.wait()
            if delay > 0:
                with anyio.move_on_after(delay):
                    while not run.stopped:
                        await run.sup.changed.wait()
            if not run.stopped:
                # Cancelled (a re-exec, the daemon's last stand): the run is left as it
                # is, for the next code to resume or the caller to kill; no outcome.
                await self._execute(run, scheduled)
            self._finish(run)
        except Exception as exc:
            await self._run_crashed(run, exc)

    async def _run_crashed(self, run: Run, exc: Exception) -> None:
        """A bug while running ``run``: its instance is stopped (shielded, bounded), the
        traceback goes to ``on_crash``, the run counts as failed; the schedule goes on."""
        on_crash = self._sup_args.get("on_crash")
        if on_crash is not None:
            on_crash(self.spec.name, f"internal error in run {run.number}: {exc!r}", exc)
        handle = run.sup.handle
        if handle is not None:
            with anyio.move_on_after(self.spec.stop.timeout + 5, shield=True):
                await handle.stop(self.spec.stop)
            run.sup.handle = None
        with contextlib.suppress(Exception):
            self._finish(run)
        self._release(run)

    async def _execute(self, run: Run, scheduled: datetime | None) -> None:
        attrs: dict[str, Any] = {
            "hostvisor.job.run": run.number,
            "hostvisor.job.trigger": run.trigger,
        }
        if scheduled is not None:
            attrs["hostvisor.job.scheduled_time"] = rfc3339(scheduled)
        run.record.started = time.time()
        run.started = anyio.current_time()
        self.last_run = run.record
        if self._ledger is not None:
            # On disk at once: after a reexec or a crash its number is never given again,
            # and a run the daemon died in is a failed last run, not a forgotten one.
            self._ledger.record(self)
        self._publish(ev.JOB_TRIGGERED, f"run {run.number} ({run.trigger})", **attrs)
        note = getattr(self.driver, "log_note", None)
        if note is not None:
            when = rfc3339(datetime.fromtimestamp(run.record.started, UTC))
            await note(self.spec, f"--- hostvisor: {self.spec.name} run {run.number} "
                       f"({run.trigger}) started {when} ---")  # fmt: skip
        await self._watch(run)

    async def _carry_on(self, run: Run) -> None:
        await self._watch(run)
        self._finish(run)

    async def _watch(self, run: Run) -> None:
        """Run ``run``'s supervisor until the run is over (``run_timeout`` counted from
        ``run.started``)."""
        sup = run.sup
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            if self.spec.run_timeout is not None:
                left = self.spec.run_timeout - (anyio.current_time() - run.started)
                tg.start_soon(self._deadline, run, max(0.0, left))
            while not (sup.state in _OVER and sup._attempts > 0) and not (
                run.stopped and sup.state is S.STOPPED
            ):
                await sup.changed.wait()
            tg.cancel_scope.cancel()

    async def _deadline(self, run: Run, seconds: float) -> None:
        await anyio.sleep(seconds)
        run.timed_out = True
        run.sup.command_stop()

    def _release(self, run: Run) -> None:
        """``run`` is over: forget it, settle the commands that waited for it (and, with no
        run left, those that waited for every run), tell the waiters."""
        if run in self.runs:
            self.runs.remove(run)
        waiters = run.waiters
        if not self.runs:
            waiters, self._when_idle = waiters + self._when_idle, []
        run.done.set()
        self._settle(waiters)
        self.changed.fire()

    def _finish(self, run: Run) -> None:
        sup = run.sup
        record = run.record
        if run in self.runs:
            self.runs.remove(run)
        self._restarts_done += sup.restarts
        started = run.started
        record.duration = max(0.0, anyio.current_time() - started)
        record.exit = sup.last_exit
        if sup.last_exit is not None:
            self.last_exit = sup.last_exit
        attrs: dict[str, Any] = {
            "hostvisor.job.run": run.number,
            "hostvisor.job.duration_s": round(record.duration, 6),
        }
        took = f"after {record.duration:.3f}s"
        if sup._attempts == 0 and run.stopped:
            # Stopped during its random delay: it never ran, the last run stays the last.
            self._release(run)
            return
        if run.timed_out:
            record.outcome = "timed_out"
            assert self.spec.run_timeout is not None
            attrs["hostvisor.job.run_timeout_s"] = self.spec.run_timeout
            self.message = f"run {run.number} timed out after {self.spec.run_timeout:g}s"
            self._publish(ev.JOB_TIMED_OUT, self.message, **attrs)
        elif run.stopped:
            record.outcome = "stopped"
            self.message = f"run {run.number} stopped"
        elif sup.state is S.EXITED and sup.last_exit is not None and sup.last_exit.success:
            record.outcome = "succeeded"
            self.message = ""
            attrs["process.exit.code"] = 0
            self._publish(ev.JOB_SUCCEEDED, f"run {run.number} succeeded {took}", **attrs)
        else:
            record.outcome = "failed"
            status = sup.last_exit
            why = status.describe() if status is not None else (sup.message or "did not start")
            if status is not None and status.code is not None:
                attrs["process.exit.code"] = status.code
            if status is not None and status.signal is not None:
                attrs["hostvisor.exit.signal"] = status.signal
            self.message = f"run {run.number} failed: {why}"
            self._publish(ev.JOB_FAILED, f"{self.message} {took}", **attrs)
        if self.last_run is None or self.last_run.number <= run.number:
            self.last_run = record
        if self.spec.schedule is None and not self.runs:
            stopped = record.outcome == "stopped"
            self._rest = S.STOPPED if stopped else S.FATAL if sup.state is S.FATAL else S.EXITED
        if record.outcome in ("failed", "timed_out") and self._on_failure is not None:
            self._on_failure(self.spec, sup.last_exit, self.message)
        if self._ledger is not None:
            self._ledger.record(self)
        self._release(run)
