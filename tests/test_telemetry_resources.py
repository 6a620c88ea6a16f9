"""The resource metrics (issue 10) reach a real OTLP receiver: process.cpu.utilization,
process.cpu.time and process.memory.usage, per service, with the conventions' units."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.daemon_harness import daemon, py_cmd
from tests.otlp_receivers import HttpReceiver, Receiver

MIB = 1024**2
#: Metrics every 200 ms: the daemon samples resources at that interval.
FAST = {"OTEL_BLRP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "200"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def wait(receiver: Receiver, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    anyio.run(receiver.wait, predicate, timeout)


def of(receiver: Receiver, name: str, service: str) -> list[tuple[dict[str, object], object]]:
    return [(a, v) for a, v in receiver.points(name) if a.get("hostvisor.service.name") == service]


class TestResourceMetrics:
    def test_cpu_and_memory_reach_the_collector(self, tmp_path: Path) -> None:
        """A busy child and 40 MiB of memory show in the three metrics, with units 1, s
        and By, attributed with hostvisor.service.name (cpu.time split by cpu.mode)."""
        unit = f"command = {py_cmd('res_tree', '--busy', '--alloc', '40')}\n"
        with HttpReceiver() as receiver:
            config = (
                f'[telemetry]\nenabled = true\nendpoint = "{receiver.endpoint}"\n'
                'protocol = "http/protobuf"\nexport_timeout = "1s"\n'
            )
            with daemon(tmp_path, config=config, env=FAST, units={"busy": unit}) as d:
                d.wait_state("busy", "running")
                wait(
                    receiver,
                    lambda: any(
                        isinstance(v, int) and v > 40 * MIB
                        for _, v in of(receiver, "process.memory.usage", "busy")
                    ),
                )
                wait(
                    receiver,
                    lambda: any(
                        isinstance(v, float) and v > 0.5 / (os.cpu_count() or 1)
                        for _, v in of(receiver, "process.cpu.utilization", "busy")
                    ),
                )
                wait(
                    receiver,
                    lambda: any(
                        a.get("cpu.mode") == "user" and isinstance(v, float) and v > 0.2
                        for a, v in of(receiver, "process.cpu.time", "busy")
                    ),
                )
            modes = {a["cpu.mode"] for a, _ in of(receiver, "process.cpu.time", "busy")}
            assert modes == {"user", "system"}
            assert receiver.unit("process.cpu.utilization") == "1"
            assert receiver.unit("process.cpu.time") == "s"
            assert receiver.unit("process.memory.usage") == "By"
