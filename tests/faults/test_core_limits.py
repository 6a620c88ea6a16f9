"""Faults of issue 9, items 6 and 12 (daemon side): descriptor limits, and children that
must not inherit the daemon's own OpenTelemetry identity."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess, daemon

needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="no prlimit(1)")


@needs_prlimit
class TestDescriptorLimit:
    def test_300_units_start_under_a_soft_limit_of_1024(self, tmp_path: Path) -> None:
        """Under `prlimit --nofile=1024:20000` every one of 300 units runs (0.1: about 250
        did, the rest sat in backoff with EMFILE), and a child gets the soft limit the
        daemon started with (1024), not the raised one."""
        d = DaemonProcess(tmp_path)
        d.write_unit(
            "probe-limit", 'command = ["sh", "-c", "ulimit -n > nofile; exec sleep 600"]\n'
        )
        for index in range(299):
            d.write_unit(f"s{index:03d}", 'command = ["sleep", "600"]\nstart_seconds = "0.1s"\n')
        try:
            d.start(wrapper=("prlimit", "--nofile=1024:20000", "--"), timeout=60)

            def all_running() -> bool:
                doc = d.call("status")
                return all(s["state"] == "running" for s in doc["services"])

            d.wait_for(all_running, timeout=90, what="300 units running")
            assert (tmp_path / "nofile").read_text().strip() == "1024"
        finally:
            d.cleanup()

    def test_the_socket_still_answers_at_a_hard_limit_of_256(self, tmp_path: Path) -> None:
        """With a hard limit the daemon cannot raise (256) and 100 units wanting ~400
        descriptors, spawns beyond the reserve are deferred as the daemon's trouble (not
        counted towards give_up_after) and the control socket keeps answering."""
        d = DaemonProcess(tmp_path)
        for index in range(100):
            d.write_unit(f"s{index:03d}", 'command = ["sleep", "600"]\ngive_up_after = 1\n')
        try:
            d.start(wrapper=("prlimit", "--nofile=256:256", "--"), timeout=60)

            def deferred_three_times() -> bool:
                counts: dict[str, int] = {}
                for e in d.events:
                    if e["event"] == "hostvisor.service.backoff" and (
                        "out of file descriptors" in e["message"]
                    ):
                        counts[e["service"]] = counts.get(e["service"], 0) + 1
                return max(counts.values(), default=0) >= 3

            d.wait_for(deferred_three_times, timeout=60, what="a spawn deferred 3 times")
            states = {s["state"] for s in d.call("status")["services"]}
            assert "fatal" not in states and "running" in states
            assert d.cli("status").returncode == 3  # answers: some not running
        finally:
            d.cleanup()


class TestOpenTelemetryIdentity:
    def test_children_do_not_inherit_the_daemons_otel_identity(self, tmp_path: Path) -> None:
        """OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and the OTLP headers (and their
        per-signal forms) of the daemon never reach a child, unless the unit sets them."""
        env = {
            "OTEL_SERVICE_NAME": "hostvisor-itself",
            "OTEL_RESOURCE_ATTRIBUTES": "host.role=supervisor",
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer daemon-token",
            "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "authorization=Bearer logs-token",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        }
        dump = 'command = ["sh", "-c", "env > {0}.env; exec sleep 600"]\n'
        units = {
            "plain": dump.format("plain"),
            "own": dump.format("own") + 'env = { OTEL_SERVICE_NAME = "worker" }\n',
        }
        with daemon(tmp_path, units=units, env=env) as d:
            for name in units:
                d.wait_state(name, "running")
            d.wait_for(
                lambda: (tmp_path / "own.env").exists() and (tmp_path / "plain.env").exists()
            )
            plain = (tmp_path / "plain.env").read_text()
            own = (tmp_path / "own.env").read_text()
        assert "hostvisor-itself" not in plain and "daemon-token" not in plain
        assert "logs-token" not in plain and "host.role" not in plain
        assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9" in plain  # not identity
        assert "OTEL_SERVICE_NAME=worker" in own and "daemon-token" not in own
