"""OpenTelemetry export of events and metrics, against real OTLP receivers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from supervisor.errors import ConfigError
from supervisor.events import EventBus
from supervisor.spec import TelemetrySpec
from supervisor.states import Health, ServiceState
from supervisor.telemetry import (
    SUBSCRIPTION_BUFFER,
    Snapshot,
    Telemetry,
    open_telemetry,
    resolve_export,
)
from tests.otlp_receivers import BlackHole, GrpcReceiver, HttpReceiver, Receiver, closed_port

PROGRAMS = Path(__file__).parent / "programs"
#: Fast batching so tests see exports within ~0.1 s.
FAST = {"OTEL_BLRP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "100"}
S, H = ServiceState, Health
STATES: dict[str, tuple[ServiceState, Health]] = {
    "api": (S.RUNNING, H.HEALTHY),
    "db": (S.BACKOFF, H.NONE),
}


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    cls = GrpcReceiver if request.param == "grpc" else HttpReceiver
    with cls() as r:
        yield r


@asynccontextmanager
async def telemetry_to(
    endpoint: str,
    protocol: str,
    *,
    bus: EventBus,
    environ: Mapping[str, str] | None = None,
    timeout: float = 2.0,
    snapshot: Snapshot = lambda: STATES,
) -> AsyncIterator[Telemetry]:
    spec = TelemetrySpec(
        enabled=True,
        endpoint=endpoint,
        protocol=protocol,  # type: ignore[arg-type]
        export_timeout=timeout,
    )
    env = {**FAST, **(environ or {})}
    async with open_telemetry(spec, bus=bus, snapshot=snapshot, version="9.8.7", environ=env) as t:
        assert t is not None
        yield t


async def wait_emitted(telemetry: Telemetry, count: int) -> None:
    """Wait until the forwarder has handled ``count`` events (it runs on our loop)."""
    with anyio.fail_after(5):
        while telemetry.emitted + telemetry.dropped < count:
            await anyio.sleep(0)


class TestEvents:
    async def test_events_become_log_records(self, receiver: Receiver) -> None:
        """Each event is one log record: event_name, severity, body, attributes, seq."""
        bus = EventBus()
        async with telemetry_to(receiver.endpoint, receiver.protocol, bus=bus):
            bus.publish("hostvisor.daemon.started", message="hostvisor 9.8.7 started")
            exited = bus.publish(
                "hostvisor.service.exited",
                service="api",
                message="exit code 3",
                attributes={"process.pid": 4242, "process.exit.code": 3, "container.id": None},
            )
            await receiver.wait(lambda: len(receiver.log_records()) >= 2)
        records = {r.event_name: r for r in receiver.log_records()}
        assert set(records) == {"hostvisor.daemon.started", "hostvisor.service.exited"}
        record = records["hostvisor.service.exited"]
        assert (record.severity_text, record.severity_number) == ("WARN", 13)
        assert record.body == "exit code 3"
        assert record.attributes == {
            "hostvisor.service.name": "api",
            "process.pid": 4242,
            "process.exit.code": 3,
            "hostvisor.event.seq": exited.seq,
        }
        assert record.scope == "hostvisor"
        assert records["hostvisor.daemon.started"].severity_number == 9  # INFO

    async def test_resource_defaults(self, receiver: Receiver) -> None:
        """Resource: service.name hostvisor, version, a uuid instance id, host.name."""
        bus = EventBus()
        async with telemetry_to(receiver.endpoint, receiver.protocol, bus=bus):
            bus.publish("hostvisor.daemon.started")
            await receiver.wait(lambda: len(receiver.log_records()) >= 1)
        resource = receiver.log_records()[0].resource
        assert resource["service.name"] == "hostvisor"
        assert resource["service.version"] == "9.8.7"
        assert len(resource["service.instance.id"]) == 36
        assert resource["host.name"] == os.uname().nodename

    async def test_resource_from_environment(self, receiver: Receiver) -> None:
        """OTEL_SERVICE_NAME wins over OTEL_RESOURCE_ATTRIBUTES, which adds attributes."""
        bus = EventBus()
        environ = {
            "OTEL_SERVICE_NAME": "edge-1",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,deployment.environment.name=prod,"
            "team=a%20b",
        }
        async with telemetry_to(receiver.endpoint, receiver.protocol, bus=bus, environ=environ):
            bus.publish("hostvisor.daemon.started")
            await receiver.wait(lambda: len(receiver.log_records()) >= 1)
        resource = receiver.log_records()[0].resource
        assert resource["service.name"] == "edge-1"
        assert resource["deployment.environment.name"] == "prod"
        assert resource["team"] == "a b"

    async def test_events_still_buffered_are_flushed_on_exit(self, receiver: Receiver) -> None:
        """Events published right before leaving (daemon.stopping) are exported."""
        bus = EventBus()
        async with telemetry_to(
            receiver.endpoint,
            receiver.protocol,
            bus=bus,
            environ={"OTEL_BLRP_SCHEDULE_DELAY": "60000"},
        ):
            bus.publish("hostvisor.daemon.stopping", message="bye")
        assert [r.event_name for r in receiver.log_records()] == ["hostvisor.daemon.stopping"]


class TestMetrics:
    async def test_metric_names_units_and_values(self, receiver: Receiver) -> None:
        """Restarts, exits, up, state and probe duration: named, with units and values."""
        bus = EventBus()
        names = {
            "hostvisor.service.restarts": "{restart}",
            "hostvisor.service.exits": "{exit}",
            "hostvisor.service.up": "1",
            "hostvisor.service.state": "1",
            "hostvisor.health_check.duration": "s",
        }
        async with telemetry_to(receiver.endpoint, receiver.protocol, bus=bus) as telemetry:
            bus.publish(
                "hostvisor.service.exited", service="api", attributes={"process.exit.code": 1}
            )
            bus.publish(
                "hostvisor.service.exited", service="api", attributes={"hostvisor.exit.signal": 9}
            )
            bus.publish(
                "hostvisor.service.backoff",
                service="api",
                attributes={"hostvisor.backoff.attempt": 1},
            )
            telemetry.record_probe("api", 0.02, True)
            telemetry.record_probe("api", 0.5, False)
            await receiver.wait(lambda: set(names) <= receiver.metric_names())
        for name, unit in names.items():
            assert receiver.unit(name) == unit, name
        assert receiver.points("hostvisor.service.restarts") == [
            ({"hostvisor.service.name": "api"}, 1)
        ]
        exits = receiver.points("hostvisor.service.exits")
        assert sorted(exits, key=str) == sorted(
            [
                ({"hostvisor.service.name": "api", "process.exit.code": 1}, 1),
                ({"hostvisor.service.name": "api", "hostvisor.exit.signal": 9}, 1),
            ],
            key=str,
        )
        up = {a["hostvisor.service.name"]: v for a, v in receiver.points("hostvisor.service.up")}
        assert up == {"api": 1, "db": 0}
        state = {
            (a["hostvisor.service.name"], a["hostvisor.service.state"]): v
            for a, v in receiver.points("hostvisor.service.state")
        }
        assert len(state) == 2 * len(ServiceState)
        assert {k for k, v in state.items() if v == 1} == {("api", "running"), ("db", "backoff")}
        probes = {
            a["hostvisor.health_check.success"]: v
            for a, v in receiver.points("hostvisor.health_check.duration")
        }
        assert probes == {True: (1, 0.02), False: (1, 0.5)}

    async def test_dropped_log_bytes_are_counted_per_service(self, receiver: Receiver) -> None:
        """hostvisor.logs.dropped (By) sums the bytes of the hostvisor.logs.dropped events,
        per service and error.type."""
        bus = EventBus()
        async with telemetry_to(receiver.endpoint, receiver.protocol, bus=bus):
            for size, resumed in ((120, False), (4000, True)):
                bus.publish(
                    "hostvisor.logs.dropped",
                    service="api",
                    attributes={
                        "hostvisor.logs.dropped_bytes": size,
                        "hostvisor.logs.dropped_lines": 3,
                        "error.type": "ENOSPC",
                        "hostvisor.logs.resumed": resumed,
                    },
                )
            await receiver.wait(lambda: "hostvisor.logs.dropped" in receiver.metric_names())
        assert receiver.unit("hostvisor.logs.dropped") == "By"
        assert receiver.points("hostvisor.logs.dropped") == [
            ({"hostvisor.service.name": "api", "error.type": "ENOSPC"}, 4120)
        ]

    async def test_gauges_follow_the_snapshot(self, receiver: Receiver) -> None:
        """After an event, the up gauge reports the snapshot as it is now."""
        bus = EventBus()
        states = dict(STATES)
        async with telemetry_to(
            receiver.endpoint, receiver.protocol, bus=bus, snapshot=lambda: states
        ):

            def up() -> dict[str, int]:
                return {
                    a["hostvisor.service.name"]: v
                    for a, v in receiver.points("hostvisor.service.up")
                }

            await receiver.wait(lambda: up() == {"api": 1, "db": 0})
            states["db"] = (S.RUNNING, H.NONE)
            states["api"] = (S.RUNNING, H.UNHEALTHY)
            bus.publish("hostvisor.service.running", service="db")
            await receiver.wait(lambda: up() == {"api": 0, "db": 1})


class TestTransport:
    async def test_endpoint_protocol_and_headers_from_environment(self) -> None:
        """With endpoint and protocol unset, OTEL_EXPORTER_OTLP_* choose gRPC and add headers."""
        bus = EventBus()
        with GrpcReceiver() as receiver:
            environ = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme",
            }
            async with telemetry_to("", "", bus=bus, environ=environ):
                bus.publish("hostvisor.daemon.started")
                await receiver.wait(lambda: len(receiver.logs) >= 1)
        assert receiver.headers[0]["x-tenant"] == "acme"

    async def test_per_signal_endpoint_is_used_as_is(self) -> None:
        """OTEL_EXPORTER_OTLP_LOGS_ENDPOINT is a full URL; no /v1/logs is appended."""
        bus = EventBus()
        with HttpReceiver() as receiver:
            environ = {
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": f"{receiver.endpoint}/v1/logs",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{receiver.endpoint}/v1/metrics",
            }
            async with telemetry_to("", "", bus=bus, environ=environ):
                bus.publish("hostvisor.daemon.started")
                await receiver.wait(lambda: len(receiver.logs) >= 1 and len(receiver.metrics) >= 1)

    def test_defaults(self) -> None:
        """No config, no environment: HTTP/protobuf to localhost:4318 with the signal paths."""
        settings = resolve_export(TelemetrySpec(enabled=True), {})
        assert settings.logs.protocol == "http/protobuf"
        assert settings.logs.endpoint == "http://localhost:4318/v1/logs"
        assert settings.metrics.endpoint == "http://localhost:4318/v1/metrics"
        assert settings.timeout == 5.0
        grpc = resolve_export(TelemetrySpec(enabled=True, protocol="grpc"), {})
        assert (grpc.logs.endpoint, grpc.metrics.endpoint) == ("http://localhost:4317",) * 2

    def test_config_wins_over_environment(self) -> None:
        """[telemetry] endpoint and protocol beat OTEL_EXPORTER_OTLP_*; no scheme means http://."""
        spec = TelemetrySpec(enabled=True, endpoint="collector:4318/", protocol="http/protobuf")
        environ = {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://elsewhere:4317",
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://elsewhere:4318/v1/logs",
        }
        settings = resolve_export(spec, environ)
        assert settings.logs.protocol == "http/protobuf"
        assert settings.logs.endpoint == "http://collector:4318/v1/logs"

    def test_unknown_protocol_is_a_config_error(self) -> None:
        """OTEL_EXPORTER_OTLP_PROTOCOL=http/json is named in the error, not ignored."""
        with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
            resolve_export(
                TelemetrySpec(enabled=True), {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
            )


def run_program(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, str(PROGRAMS / "otel_imports.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(out.stdout))


class TestImports:
    async def test_disabled_yields_none(self) -> None:
        """enabled = false (or OTEL_SDK_DISABLED=true): the context yields None."""
        args = {"bus": EventBus(), "snapshot": dict, "version": "1"}
        async with open_telemetry(TelemetrySpec(enabled=False), **args) as t:  # type: ignore[arg-type]
            assert t is None
        spec = TelemetrySpec(enabled=True)
        async with open_telemetry(spec, environ={"OTEL_SDK_DISABLED": "true"}, **args) as t:  # type: ignore[arg-type]
            assert t is None

    def test_disabled_imports_no_opentelemetry(self) -> None:
        """A disabled daemon never loads the OpenTelemetry SDK."""
        assert run_program("disabled")["opentelemetry"] is False

    @pytest.mark.parametrize(("protocol", "unused"), [("grpc", "http"), ("http/protobuf", "grpc")])
    def test_only_the_exporter_in_use_is_imported(self, protocol: str, unused: str) -> None:
        """gRPC does not load the HTTP exporter, and HTTP does not load gRPC."""
        found = run_program(protocol, f"http://127.0.0.1:{closed_port()}")
        assert found["opentelemetry"] is True
        assert found[unused] is False
        assert found["grpc" if unused == "http" else "http"] is True


class TestNeverInTheWay:
    @pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
    @pytest.mark.parametrize("collector", ["black hole", "closed port", "503"])
    async def test_a_bad_collector_does_not_slow_the_loop(
        self, protocol: str, collector: str
    ) -> None:
        """1000 events are published at once; the loop stays responsive; exit is bounded."""
        bus = EventBus(history=10)
        timeout = 1.5  # long beside a busy host's loop lag, so a stalled loop stands out
        with BlackHole() as hole, (GrpcReceiver if protocol == "grpc" else HttpReceiver)() as busy:
            busy.unavailable = True
            endpoint = {
                "black hole": hole.endpoint,
                "closed port": f"http://127.0.0.1:{closed_port()}",
                "503": busy.endpoint,
            }[collector]
            lags: list[float] = []

            async def heartbeat() -> None:
                while True:
                    start = time.monotonic()
                    await anyio.sleep(0.01)
                    lags.append(time.monotonic() - start - 0.01)

            async with anyio.create_task_group() as tg:
                tg.start_soon(heartbeat)
                async with telemetry_to(endpoint, protocol, bus=bus, timeout=timeout) as telemetry:
                    start = time.monotonic()
                    for i in range(1000):
                        bus.publish("hostvisor.service.starting", service="api", message=str(i))
                    published = time.monotonic() - start
                    await wait_emitted(telemetry, 1000)
                    await anyio.sleep(0.3)  # exports are now failing in the SDK's threads
                    leaving = time.monotonic()
                left = time.monotonic() - leaving
                tg.cancel_scope.cancel()
        assert published < 0.5
        assert left <= timeout + 1.0
        # An export on the loop would stall it for export_timeout (1.5 s) at the black hole.
        assert max(lags) < timeout / 2, max(lags)
        assert statistics.median(lags) < 0.05

    async def test_full_queue_drops_and_counts(self) -> None:
        """Against a black hole, records beyond the bounded queue are dropped and counted."""
        bus = EventBus(history=10)
        environ = {"OTEL_BLRP_MAX_QUEUE_SIZE": "100", "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE": "50"}
        with BlackHole() as hole:
            async with telemetry_to(
                hole.endpoint, "http/protobuf", bus=bus, environ=environ, timeout=0.5
            ) as t:
                for _ in range(1000):
                    bus.publish("hostvisor.service.starting", service="api")
                await wait_emitted(t, 1000)
                assert 100 <= t.emitted <= 150
                assert t.drops()["queue_full"] == 1000 - t.emitted

    async def test_refused_exports_are_counted(self, receiver: Receiver) -> None:
        """Records in a batch the collector refuses (503 / UNAVAILABLE) count as export_failed."""
        bus = EventBus()
        receiver.unavailable = True
        async with telemetry_to(receiver.endpoint, receiver.protocol, bus=bus, timeout=0.5) as t:
            for _ in range(10):
                bus.publish("hostvisor.service.starting", service="api")
            with anyio.fail_after(5):
                while t.drops().get("export_failed", 0) < 10:
                    await anyio.sleep(0.01)  # the count is set by the SDK's export thread
        assert t.drops() == {"export_failed": 10}
        assert receiver.log_records() == []

    async def test_bus_overflow_is_counted(self, receiver: Receiver) -> None:
        """Events the bus dropped for telemetry (seq gaps) count as bus_overflow, exported."""
        bus = EventBus(history=10)
        async with telemetry_to(receiver.endpoint, receiver.protocol, bus=bus) as telemetry:
            burst = SUBSCRIPTION_BUFFER + 500
            for _ in range(burst):  # no checkpoint: the subscription overflows
                bus.publish("hostvisor.service.starting", service="api")
            await wait_emitted(telemetry, SUBSCRIPTION_BUFFER)
            bus.publish("hostvisor.service.running", service="api")
            await wait_emitted(telemetry, burst + 1)
            assert telemetry.drops() == {"bus_overflow": 500}

            def dropped() -> list[object]:
                return [(a, v) for a, v in receiver.points("hostvisor.telemetry.dropped")]

            await receiver.wait(lambda: dropped() == [({"error.type": "bus_overflow"}, 500)])

    @pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
    def test_process_exits_promptly_with_a_black_hole(self, protocol: str) -> None:
        """Leaving takes at most export_timeout + 0.5 s, and the process then exits at once."""
        with BlackHole() as hole:
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(PROGRAMS / "otel_imports.py"),
                    protocol,
                    hole.endpoint,
                    "--events",
                    "500",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout is not None
                found = json.loads(child.stdout.readline())
                printed = time.monotonic()
                child.wait(timeout=10)
                exited = time.monotonic() - printed
            finally:
                child.kill()
                child.wait()
        assert found["close_seconds"] <= 0.5 + 0.5 + 0.2
        assert exited < 0.5
