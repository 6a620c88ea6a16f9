"""Issue 9 item 10: which run an engine event belongs to, decided without the engine's clock.

The driver used to drop every event stamped before the last one it applied, and to end a
handle on any ``die`` stamped after the run's ``StartedAt``. A clock stepped back an hour then
hid every ``die`` for an hour, and a stale ``die`` of an earlier run, stamped late by a clock
that later went back, ended a fresh handle. Stepping the host's clock is not possible in CI,
so the clock cases feed the driver's event function real events captured from the engine
(``docker events --format '{{json .}}'``) with their times shifted; the replay case is real:
the event stream reconnects with a ``since`` that makes the engine replay the old ``die``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import anyio
import pytest

from supervisor import events as ev
from supervisor.drivers.docker import DockerDriver
from tests.docker_engine import DockerEngine
from tests.test_docker_driver import cli, names, next_event, open_driver, run_container, unit

__all__ = ["names"]  # the fixture, used by name

pytestmark = pytest.mark.docker

HOUR_NS = 3600 * 10**9


def captured(engine: DockerEngine, name: str, action: str) -> list[dict[str, Any]]:
    """The engine's own ``action`` events of container ``name`` so far, as the API sends them."""
    out = engine.docker(
        "events", "--since", "1", "--until", f"{time.time():.9f}",
        "--filter", f"container={name}", "--filter", f"event={action}",
        "--format", "{{json .}}",
    ).stdout  # fmt: skip
    found = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert found, f"the engine reported no {action} of {name}"
    return found


def stamped(event: dict[str, Any], time_ns: int) -> dict[str, Any]:
    """``event`` as an engine whose clock read ``time_ns`` would have sent it."""
    return {**event, "time": time_ns // 10**9, "timeNano": time_ns}


class TestEngineClock:
    async def test_a_die_after_the_clock_stepped_back_an_hour_ends_the_handle(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """The engine's clock was an hour ahead when it sent an event, then stepped back:
        the real `die` that follows (stamped an hour "earlier") ends the handle at once."""
        name = names()
        run_container(engine, name)
        async with open_driver(engine, ping_interval=600) as rig:
            handle = await rig.start(unit(engine, name))
            start = captured(engine, name, "start")[-1]
            rig.driver._apply_event(stamped(start, int(start["timeNano"]) + HOUR_NS))
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                status = await handle.wait()
            assert status.code == 137 and handle.state == "exited"

    async def test_a_stale_die_stamped_after_the_fresh_start_leaves_the_run_alone(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """The `die` of the previous run, stamped after the fresh run's StartedAt (a clock
        that was ahead, then corrected), does not end the fresh handle; the real die does."""
        name = names()
        run_container(engine, name)
        engine.docker("kill", name)
        old_die = captured(engine, name, "die")[-1]
        async with open_driver(engine, ping_interval=600) as rig:
            handle = await rig.start(unit(engine, name))
            rig.driver._apply_event(stamped(old_die, handle.started_ns + 10**9))
            assert not handle.ended
            with anyio.fail_after(10):
                await rig.driver.wait_idle()  # the confirming inspect was applied
            assert not handle.ended and handle.state == "running"
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 137


class TestReplay:
    async def test_a_die_replayed_on_reconnect_does_not_end_the_fresh_run(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """A container dies and is started again; the event stream reconnects (a frozen
        engine) with a `since` before that die, so the engine replays it: the fresh run's
        handle lives on, and still ends on its own real die."""
        name = names()
        run_container(engine, name)
        fast = open_driver(engine, call_timeout=1.0, ping_interval=0.3)
        async with fast as rig, rig.bus.subscribe() as events:
            seen: list[tuple[str, str]] = []
            apply = rig.driver._apply_event

            def spy(item: object) -> None:
                if isinstance(item, dict):
                    seen.append((str(item.get("Action")), str(item.get("id"))))
                apply(item)

            rig.driver._apply_event = spy  # type: ignore[method-assign]
            first = await rig.start(unit(engine, name))
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                assert (await first.wait()).code == 137
            fresh = await rig.start(unit(engine, name))
            assert fresh.started_at != first.started_at
            die_ns = int(captured(engine, name, "die")[-1]["timeNano"])
            rig.driver._last_ns = die_ns - 1  # the reconnect asks the engine from before it
            seen.clear()
            assert engine.pid is not None
            os.kill(engine.pid, signal.SIGSTOP)
            try:
                with anyio.fail_after(10):
                    await next_event(events, ev.DOCKER_DISCONNECTED)
            finally:
                os.kill(engine.pid, signal.SIGCONT)
            with anyio.fail_after(15):
                await next_event(events, ev.DOCKER_RECONNECTED)
                while ("die", fresh.container_id) not in seen:
                    await anyio.sleep(0.05)  # the replay arrives on the engine's schedule
                await rig.driver.wait_idle()
            assert not fresh.ended and fresh.state == "running"
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                assert (await fresh.wait()).code == 137


class TestMalformedEvents:
    async def test_events_that_cannot_be_read_are_skipped_and_counted(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """Non-objects, missing ids, wrong types and a 5,000-digit exit code are skipped (the
        driver goes on and still sees the real die) instead of crashing the event loop."""
        name = names()
        run_container(engine, name)
        async with open_driver(engine, ping_interval=600) as rig:
            handle = await rig.start(unit(engine, name))
            cid = handle.container_id
            junk: list[object] = [
                None, [], "die", 7, {"Action": "die"}, {"Actor": "x", "Action": "die"},
                {"Action": 5, "Actor": {"ID": cid}}, {"Action": "die", "Actor": {"ID": 12}},
                {"Action": "die", "Actor": {"ID": cid, "Attributes": "x"}, "timeNano": "soon"},
                {"Action": "die", "Actor": {"ID": cid, "Attributes": {"exitCode": "9" * 5000}}},
                {"Action": "die", "id": cid, "time": [1], "timeNano": {"a": 1}},
            ]  # fmt: skip
            for item in junk:
                rig.driver._apply_event(item)
            assert rig.driver.malformed_events == 8
            with anyio.fail_after(10):
                await rig.driver.wait_idle()
            assert not handle.ended  # the die-shaped ones only asked for an inspect
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 137


def test_reconnect_delay_never_overflows() -> None:
    """The reconnect delay stays capped after any number of attempts (2.0 ** 1100 used to
    overflow a float after ~85 minutes of outage at 5 s a try, and crash the driver)."""
    driver = DockerDriver(bus=ev.EventBus(), reconnect_initial=0.25, reconnect_max=5.0)
    assert [driver._delay(n) for n in (0, 1, 2)] == [0.25, 0.5, 1.0]
    assert driver._delay(1100) == driver._delay(10**6) == 5.0
