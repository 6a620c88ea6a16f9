"""Item 1, the probe side: extreme durations and counts never crash a probe, its
deadline arithmetic or the threshold counting (config validation bounds them too)."""

from __future__ import annotations

import math
import random
import socket
from pathlib import Path

import anyio
import pytest

from supervisor.drivers.process import ProcessDriver
from supervisor.events import EventBus
from supervisor.health import (
    MAX_WAIT,
    HealthCounter,
    ProbeResult,
    bounded_seconds,
    next_probe_at,
    open_probe,
)
from supervisor.service import Broadcast, ServiceSupervisor
from supervisor.spec import HealthCheckSpec
from supervisor.states import Health, ServiceState
from tests.support import free_port, make_spec, program

EXTREMES = [1e308, math.inf, math.nan, -1.0, 0.0, 5e-324, 1e-300]


class TestDeadlines:
    @pytest.mark.parametrize("interval", EXTREMES)
    @pytest.mark.parametrize("now", [0.0, 12345.678, 1e9])
    def test_next_probe_at_is_finite_and_not_early(self, now: float, interval: float) -> None:
        """Whatever the interval, the next probe time is finite, not before
        now + (bounded) interval, and at most 50 ms after it (0.1.0's formula
        raised OverflowError for interval = 1e308)."""
        due = next_probe_at(now, interval)
        expected = now + bounded_seconds(interval)
        assert math.isfinite(due)
        assert expected <= due <= expected + 0.05 + 1e-9

    def test_next_probe_at_keeps_the_coalescing_grid(self) -> None:
        """A 10 s interval lands on the 50 ms grid, as the scheduler always did."""
        due = next_probe_at(100.01, 10.0)
        assert due == pytest.approx(110.05) and due >= 110.01

    @pytest.mark.parametrize(
        ("value", "bounded"),
        [(1e308, MAX_WAIT), (math.inf, MAX_WAIT), (math.nan, MAX_WAIT), (-3.0, 0.0), (2.5, 2.5)],
    )
    def test_bounded_seconds(self, value: float, bounded: float) -> None:
        """Clamped to [0, MAX_WAIT]; NaN is the longest wait, never a zero-delay spin."""
        assert bounded_seconds(value) == bounded

    @pytest.mark.parametrize("timeout", [1e308, math.inf, math.nan])
    async def test_probe_with_an_extreme_timeout_still_answers(self, timeout: float) -> None:
        """A tcp probe by host name with timeout = nan/inf/1e308 answers for the
        listener (0.1.0: "ValueError: deadline must not be NaN", counted as a failure)."""
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            spec = HealthCheckSpec(tcp=f"localhost:{server.getsockname()[1]}", timeout=timeout)
            async with open_probe(spec, service="x", workdir=Path("."), env={}) as probe:
                with anyio.fail_after(10):
                    result = await probe()
        assert result.ok is True, result.detail


class TestCounterBounds:
    def test_counts_saturate_at_their_thresholds(self) -> None:
        """A million successes leave successes at success_threshold; failures likewise."""
        spec = HealthCheckSpec(tcp="x:1", success_threshold=2, failure_threshold=3)
        counter = HealthCounter(spec, started_at=0)
        for t in range(1_000_000):
            counter.record(ProbeResult(True), now=t)
        assert (counter.health, counter.successes) == (Health.HEALTHY, 2)
        for t in range(10):
            counter.record(ProbeResult(False), now=2e6 + t)
        assert (counter.health, counter.failures) == (Health.UNHEALTHY, 3)

    @pytest.mark.parametrize("start_period", [1e308, math.inf, math.nan])
    def test_extreme_start_period(self, start_period: float) -> None:
        """An endless start period: failures never count, successes still do."""
        spec = HealthCheckSpec(tcp="x:1", failure_threshold=1, start_period=start_period)
        counter = HealthCounter(spec, started_at=1e6)
        assert counter.record(ProbeResult(False), now=1e7) is Health.UNKNOWN
        assert counter.record(ProbeResult(True), now=1e7) is Health.HEALTHY

    def test_huge_thresholds(self) -> None:
        """Thresholds far beyond any run: no overflow, just never reached."""
        spec = HealthCheckSpec(tcp="x:1", failure_threshold=10**18, success_threshold=10**18)
        counter = HealthCounter(spec, started_at=0)
        for t in range(1000):
            assert counter.record(ProbeResult(t % 2 == 0), now=t) is Health.UNKNOWN


async def test_scheduler_survives_interval_1e308(tmp_path: Path) -> None:
    """[health] interval = 1e308: the service becomes healthy and stays RUNNING once
    the scheduler has computed the next probe after a success (0.1.0: OverflowError
    "cannot convert float infinity to integer", the supervisor crashed)."""
    port = free_port()
    spec = make_spec(
        tmp_path,
        "web",
        program("svc_serve", "--port", port),
        health=HealthCheckSpec(tcp=f"127.0.0.1:{port}", interval=1e308, timeout=2),
    )
    driver = ProcessDriver(state_dir=tmp_path / "state")
    successes = 0
    second_success = anyio.Event()

    def on_probe(service: str, seconds: float, ok: bool) -> None:
        nonlocal successes
        successes += ok
        if successes >= 2:  # the next probe is now computed on the slow, coalesced path
            second_success.set()

    sup = ServiceSupervisor(
        spec,
        driver=driver,
        bus=EventBus(),
        peers=lambda name: None,
        changed=Broadcast(),
        run_command=driver.run_command,
        rng=random.Random(0),
        on_probe=on_probe,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run)
            with anyio.fail_after(20):
                await second_success.wait()
            await anyio.wait_all_tasks_blocked()
            state, health = sup.state, sup.health
            with anyio.move_on_after(15, shield=True):
                await sup.wait_settled(sup.command_stop(), frozenset({ServiceState.STOPPED}))
            tg.cancel_scope.cancel()
    finally:
        driver.close()
    assert (state, health) == (ServiceState.RUNNING, Health.HEALTHY)
