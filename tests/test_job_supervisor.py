"""JobSupervisor in-process, over the real ProcessDriver: what needs an injected clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import anyio

from supervisor import events as ev
from supervisor.drivers.process import ProcessDriver
from supervisor.events import EventBus
from supervisor.job import JobSupervisor
from supervisor.service import Broadcast
from supervisor.spec import BackoffSpec, ScheduleSpec
from supervisor.states import Restart
from tests.support import make_spec


async def test_a_bug_in_the_schedule_loop_backs_off_and_the_schedule_goes_on(
    tmp_path: Path,
) -> None:
    """The wall clock raising (a bug stand-in) is reported as a supervisor crash with its
    error.type, the loop starts again after a backoff delay, and the job keeps running."""
    calls = {"n": 0}

    def clock() -> datetime:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("clock broke")
        return datetime.now(UTC)

    crashes: list[str] = []
    spec = make_spec(
        tmp_path, "tick", ["true"], restart=Restart.NO,
        schedule=ScheduleSpec(every=1.0, every_text="1s"),
        backoff=BackoffSpec(initial=0.05, max=0.1, jitter=0),
    )  # fmt: skip
    bus = EventBus()
    driver = ProcessDriver(state_dir=tmp_path / "state")
    job = JobSupervisor(
        spec, driver=driver, bus=bus, peers=lambda _: None, changed=Broadcast(),
        run_command=driver.run_command, rng=random.Random(0),
        on_crash=lambda name, text, exc: crashes.append(text), clock=clock,
    )  # fmt: skip
    async with bus.subscribe(buffer=1000) as events, anyio.create_task_group() as tg:
        await tg.start(job.run)
        seen: list[str] = []
        with anyio.fail_after(15):
            async for event in events:
                seen.append(event.event)
                if event.event == ev.JOB_SUCCEEDED:
                    break
        gen = job.command_stop()
        with anyio.fail_after(10):
            await job.wait_settled(gen, frozenset())
        tg.cancel_scope.cancel()
    backoff = seen.index(ev.SERVICE_BACKOFF)
    assert backoff < seen.index(ev.JOB_TRIGGERED)
    assert crashes and "clock broke" in crashes[0]
    assert job.state.value == "stopped" and job.suspended
