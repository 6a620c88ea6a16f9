"""Opens telemetry, publishes events, closes; prints which modules got imported (JSON).

Usage: otel_imports.py disabled | grpc ENDPOINT | http/protobuf ENDPOINT [--events N]
"""

import json
import sys
import time

import anyio

from supervisor.events import EventBus
from supervisor.spec import TelemetrySpec
from supervisor.telemetry import open_telemetry


async def main(argv: list[str]) -> None:
    mode = argv[0]
    events = int(argv[argv.index("--events") + 1]) if "--events" in argv else 1
    if mode == "disabled":
        spec = TelemetrySpec(enabled=False)
    else:
        spec = TelemetrySpec(enabled=True, protocol=mode, endpoint=argv[1], export_timeout=0.5)
    bus = EventBus()
    env = {"OTEL_BLRP_SCHEDULE_DELAY": "20", "OTEL_METRIC_EXPORT_INTERVAL": "50"}
    async with open_telemetry(spec, bus=bus, snapshot=dict, version="0", environ=env) as t:
        for _ in range(events):
            bus.publish("hostvisor.service.starting", service="api")
        if t is not None:
            with anyio.fail_after(5):
                while t.emitted + t.dropped < events:
                    await anyio.sleep(0)
            await anyio.sleep(0.2)  # exports are under way
        closing = time.monotonic()
    modules = list(sys.modules)
    found = {
        "opentelemetry": any(m.startswith("opentelemetry") for m in modules),
        "grpc": any(
            m == "grpc" or m.startswith("opentelemetry.exporter.otlp.proto.grpc") for m in modules
        ),
        "http": any(m.startswith("opentelemetry.exporter.otlp.proto.http") for m in modules),
        "close_seconds": time.monotonic() - closing,
    }
    print(json.dumps(found), flush=True)


anyio.run(main, sys.argv[1:])
