"""Probes and threshold counting (Kubernetes' probe terms)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from supervisor.health import HealthCounter, ProbeResult, open_probe, probe_tcp
from supervisor.spec import HealthCheckSpec
from supervisor.states import Health
from tests.support import free_port, program


class TestTcpProbe:
    async def test_a_listening_port_passes(self) -> None:
        """A port with a listener accepts the probe."""
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            await probe_tcp("127.0.0.1", server.getsockname()[1], timeout=1)

    async def test_a_closed_port_fails_with_the_reason(self) -> None:
        """Nothing listening: the probe raises OSError naming ECONNREFUSED."""
        port = free_port()
        with pytest.raises(OSError, match="ECONNREFUSED"):
            await probe_tcp("127.0.0.1", port, timeout=1)

    async def test_ipv6_loopback(self) -> None:
        """[::1]:port works like IPv4."""
        with socket.socket(socket.AF_INET6) as server:
            server.bind(("::1", 0))
            server.listen()
            spec = HealthCheckSpec(tcp=f"[::1]:{server.getsockname()[1]}")
            async with open_probe(spec, service="x", workdir=Path("."), env={}) as probe:
                result = await probe()
        assert result.ok is True


class TestHttpProbe:
    async def test_expect_status_overrides_2xx_3xx(self, tmp_path: Path) -> None:
        """With expect_status = [503], a 503 is healthy and a 200 is not."""
        import subprocess

        port = free_port()
        (tmp_path / "unhealthy").write_text("")
        server = subprocess.Popen(
            program("svc_serve", "--port", port), cwd=tmp_path, stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None and "serving" in server.stdout.readline()
            url = f"http://127.0.0.1:{port}/health"
            expect_spec = HealthCheckSpec(http=url, expect_status=(503,))
            plain_spec = HealthCheckSpec(http=url)
            async with (
                open_probe(expect_spec, service="x", workdir=tmp_path, env={}) as expect,
                open_probe(plain_spec, service="x", workdir=tmp_path, env={}) as plain,
            ):
                assert (await expect()).ok is True
                result = await plain()
                assert result.ok is False and "HTTP 503" in result.detail
                assert (await expect()).ok is True  # one client, a fresh connection each time
        finally:
            server.kill()
            server.wait()

    async def test_refused_connection_is_a_failure_not_an_exception(self) -> None:
        """A probe never raises for a failing service; it answers ok=False with a reason."""
        spec = HealthCheckSpec(http=f"http://127.0.0.1:{free_port()}/health", timeout=1)
        async with open_probe(spec, service="x", workdir=Path("."), env={}) as probe:
            result = await probe()
        assert result.ok is False and "ConnectError" in result.detail


class TestDockerProbe:
    @pytest.mark.parametrize(
        ("status", "ok"),
        [("healthy", True), ("unhealthy", False), ("starting", None), (None, False)],
    )
    async def test_maps_the_container_health_status(
        self, status: str | None, ok: bool | None
    ) -> None:
        """healthy/unhealthy map to pass/fail; starting is not counted; no HEALTHCHECK fails."""

        async def docker_status() -> str | None:
            return status

        spec = HealthCheckSpec(docker=True)
        async with open_probe(
            spec, service="x", workdir=Path("."), env={}, docker_status=docker_status
        ) as probe:
            assert (await probe()).ok is ok


class TestHealthCounter:
    def test_failure_threshold_in_a_row(self) -> None:
        """Unhealthy only after failure_threshold failures in a row; a success resets the count."""
        counter = HealthCounter(HealthCheckSpec(tcp="x:1", failure_threshold=3), started_at=0)
        fail, good = ProbeResult(False), ProbeResult(True)
        assert counter.record(good, now=1) is Health.HEALTHY
        assert counter.record(fail, now=2) is Health.HEALTHY
        assert counter.record(fail, now=3) is Health.HEALTHY
        assert counter.record(good, now=4) is Health.HEALTHY
        for t in (5, 6):
            counter.record(fail, now=t)
        assert counter.record(fail, now=7) is Health.UNHEALTHY

    def test_success_threshold(self) -> None:
        """Healthy only after success_threshold successes in a row."""
        counter = HealthCounter(HealthCheckSpec(tcp="x:1", success_threshold=2), started_at=0)
        assert counter.record(ProbeResult(True), now=1) is Health.UNKNOWN
        assert counter.record(ProbeResult(True), now=2) is Health.HEALTHY

    def test_failures_in_start_period_do_not_count(self) -> None:
        """Failures before started_at + start_period are ignored (Docker's start period)."""
        spec = HealthCheckSpec(tcp="x:1", failure_threshold=1, start_period=10)
        counter = HealthCounter(spec, started_at=100)
        assert counter.record(ProbeResult(False), now=105) is Health.UNKNOWN
        assert counter.record(ProbeResult(False), now=111) is Health.UNHEALTHY
