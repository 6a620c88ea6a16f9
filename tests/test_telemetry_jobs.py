"""Job metrics (issue 11): run duration, runs by outcome, skipped triggers.

Job events are published on a real :class:`EventBus`, reach :class:`Telemetry`
through its subscription (the path every daemon event takes), and are exported
to real OTLP receivers (``tests/otlp_receivers.py``), gRPC and HTTP/protobuf.
The metric export interval is a minute, so the one export the test reads is
the final one that leaving :func:`open_telemetry` forces: every value in it is
the whole of what the events fed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from supervisor.events import EventBus
from supervisor.spec import TelemetrySpec
from supervisor.telemetry import (
    JOB_RUN_DURATION,
    JOB_RUNS,
    JOB_SKIPS,
    Telemetry,
    open_telemetry,
)
from tests.otlp_receivers import GrpcReceiver, HttpReceiver, Receiver

#: No periodic metric export during a test: only the final one, on leaving.
ONE_EXPORT = {"OTEL_BLRP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "60000"}
SERVICE, OUTCOME = "hostvisor.service.name", "hostvisor.job.outcome"
REASON, DURATION = "hostvisor.job.skip_reason", "hostvisor.job.duration_s"


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    cls = GrpcReceiver if request.param == "grpc" else HttpReceiver
    with cls() as r:
        yield r


@asynccontextmanager
async def exporting(receiver: Receiver, bus: EventBus) -> AsyncIterator[Telemetry]:
    """Telemetry on ``bus`` to ``receiver``; on leaving, waits for the final metric export."""
    spec = TelemetrySpec(
        enabled=True,
        endpoint=receiver.endpoint,
        protocol=receiver.protocol,  # type: ignore[arg-type]
        export_timeout=5.0,
    )
    async with open_telemetry(
        spec, bus=bus, snapshot=dict, version="9.8.7", environ=ONE_EXPORT
    ) as telemetry:
        assert telemetry is not None
        yield telemetry
    await receiver.wait(lambda: len(receiver.metrics) >= 1)


def metric(receiver: Receiver, name: str) -> Any:
    """The ``Metric`` message named ``name`` in the last export that has it."""
    found = [
        m
        for request in list(receiver.metrics)
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
    ]
    assert found, f"{name} not exported; got {sorted(receiver.metric_names())}"
    return found[-1]


def by_attributes(points: list[tuple[dict[str, Any], Any]]) -> dict[frozenset[Any], Any]:
    return {frozenset(a.items()): v for a, v in points}


def run(bus: EventBus, outcome: str, job: str, number: int, attrs: dict[str, Any]) -> None:
    """Publish the event that ends run ``number`` of ``job`` as the scheduler would."""
    bus.publish(
        f"hostvisor.job.{outcome}",
        service=job,
        message=f"run {number} {outcome}",
        attributes={"hostvisor.job.run": number, **attrs},
    )


class TestJobRuns:
    async def test_duration_and_runs_by_job_and_outcome(self, receiver: Receiver) -> None:
        """Each ended run adds 1 to hostvisor.job.runs and its duration_s to
        hostvisor.job.run.duration, both keyed by job and outcome; a trigger is not a run."""
        bus = EventBus()
        async with exporting(receiver, bus):
            bus.publish(
                "hostvisor.job.triggered",
                service="backup",
                attributes={"hostvisor.job.run": 1, "hostvisor.job.trigger": "schedule"},
            )
            for number, seconds in ((1, 1.5), (2, 2.25)):
                ok = {DURATION: seconds, "process.exit.code": 0}
                run(bus, "succeeded", "backup", number, ok)
            run(bus, "failed", "backup", 3, {DURATION: 0.5, "process.exit.code": 1})
            timed_out = {DURATION: 300.0, "hostvisor.job.run_timeout_s": 300.0}
            run(bus, "timed_out", "claim-task", 7, timed_out)
        expected_keys = [
            {SERVICE: "backup", OUTCOME: "succeeded"},
            {SERVICE: "backup", OUTCOME: "failed"},
            {SERVICE: "claim-task", OUTCOME: "timed_out"},
        ]
        assert by_attributes(receiver.points(JOB_RUN_DURATION)) == by_attributes(
            list(zip(expected_keys, [(2, 3.75), (1, 0.5), (1, 300.0)], strict=True))
        )
        assert by_attributes(receiver.points(JOB_RUNS)) == by_attributes(
            list(zip(expected_keys, [2, 1, 1], strict=True))
        )

    async def test_instruments_units_descriptions_and_buckets(self, receiver: Receiver) -> None:
        """Duration in s with job-sized buckets (0.1 s .. 1 h); runs in {run}, skips in
        {trigger}; runs and skips are monotonic cumulative sums."""
        bus = EventBus()
        async with exporting(receiver, bus):
            run(bus, "succeeded", "janitor", 1, {DURATION: 42.0})
            bus.publish(
                "hostvisor.job.skipped",
                service="janitor",
                attributes={"hostvisor.job.skip_reason": "running", "hostvisor.job.run": 2},
            )
        duration = metric(receiver, JOB_RUN_DURATION)
        assert (duration.unit, duration.description) == ("s", "Duration of job runs")
        [point] = duration.histogram.data_points
        bounds = list(point.explicit_bounds)
        assert (bounds[0], bounds[-1]) == (0.1, 3600)
        assert bounds == sorted(bounds) and 60 in bounds
        # 42 s falls in the bucket (30, 60]: counts are per bucket, one more than the bounds.
        assert len(point.bucket_counts) == len(bounds) + 1
        assert point.bucket_counts[bounds.index(60)] == 1 and sum(point.bucket_counts) == 1
        runs, skips = metric(receiver, JOB_RUNS), metric(receiver, JOB_SKIPS)
        assert (runs.unit, runs.description) == ("{run}", "Job runs by outcome")
        assert skips.unit == "{trigger}"
        for counter in (runs, skips):
            assert counter.sum.is_monotonic
            assert counter.sum.aggregation_temporality == 2  # CUMULATIVE

    async def test_a_run_without_a_duration_is_counted_not_timed(self, receiver: Receiver) -> None:
        """An ended run whose event has no usable hostvisor.job.duration_s (absent, negative,
        not a number) still counts as a run; the histogram only holds real durations."""
        bus = EventBus()
        async with exporting(receiver, bus):
            run(bus, "failed", "migrate", 1, {"hostvisor.exit.signal": 9})
            run(bus, "failed", "migrate", 2, {DURATION: -1.0})
            run(bus, "failed", "migrate", 3, {DURATION: float("inf")})
            run(bus, "failed", "migrate", 4, {DURATION: True})
            run(bus, "failed", "migrate", 5, {DURATION: 0.75})
        key = {SERVICE: "migrate", OUTCOME: "failed"}
        assert receiver.points(JOB_RUNS) == [(key, 5)]
        assert receiver.points(JOB_RUN_DURATION) == [(key, (1, 0.75))]


class TestSkippedTriggers:
    async def test_skips_by_job_and_reason(self, receiver: Receiver) -> None:
        """hostvisor.job.skipped counts one per skipped trigger, by job and skip_reason;
        a skipped trigger is not a run."""
        bus = EventBus()
        async with exporting(receiver, bus):
            for job, reason, number in (
                ("monitor-prs", "running", 4),
                ("monitor-prs", "running", 5),
                ("monitor-prs", "missed", 6),
                ("claim-task", "suspended", 2),
            ):
                bus.publish(
                    "hostvisor.job.skipped",
                    service=job,
                    message=f"trigger skipped: {reason}",
                    attributes={"hostvisor.job.skip_reason": reason, "hostvisor.job.run": number},
                )
        assert by_attributes(receiver.points(JOB_SKIPS)) == by_attributes(
            [
                ({SERVICE: "monitor-prs", REASON: "running"}, 2),
                ({SERVICE: "monitor-prs", REASON: "missed"}, 1),
                ({SERVICE: "claim-task", REASON: "suspended"}, 1),
            ]
        )
        assert JOB_RUNS not in receiver.metric_names()
        assert JOB_RUN_DURATION not in receiver.metric_names()

    async def test_job_events_are_still_log_records(self, receiver: Receiver) -> None:
        """Counting a job event does not replace its log record: both arrive."""
        bus = EventBus()
        async with exporting(receiver, bus):
            run(bus, "timed_out", "backup", 9, {DURATION: 60.0})
            await receiver.wait(lambda: len(receiver.log_records()) >= 1)
        [record] = receiver.log_records()
        assert record.event_name == "hostvisor.job.timed_out"
        assert record.attributes["hostvisor.job.run"] == 9
        assert receiver.points(JOB_RUNS) == [({SERVICE: "backup", OUTCOME: "timed_out"}, 1)]
