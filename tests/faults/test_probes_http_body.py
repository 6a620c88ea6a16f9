"""Item 9: an HTTP probe (and the post_start hook's request) reads at most 64 KiB of a
body, never waits for the end of an endless one, and answers with the status code."""

from __future__ import annotations

import subprocess
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from supervisor.health import http_status, open_probe, tls_context
from supervisor.spec import HealthCheckSpec
from tests.support import program

TIMEOUT = 5.0


@contextmanager
def body_server(tmp_path: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of tests/programs/probes_body_server.py (a real server)."""
    proc = subprocess.Popen(
        program("probes_body_server"), cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def probe_once(url: str, **spec: object) -> tuple[bool | None, str]:
    async with open_probe(
        HealthCheckSpec(http=url, timeout=TIMEOUT, **spec),  # type: ignore[arg-type]
        service="x",
        workdir=Path("."),
        env={},
    ) as probe:
        with anyio.fail_after(TIMEOUT):
            result = await probe()
    return result.ok, result.detail


class TestHttpProbeBody:
    async def test_endless_body_is_healthy_by_its_status(self, tmp_path: Path) -> None:
        """A 200 whose body never ends is healthy, answered within the timeout
        (0.1.0 waited for the end of the body, timed out and counted a failure)."""
        with body_server(tmp_path) as base:
            ok, detail = await probe_once(f"{base}/endless")
        assert ok is True and "HTTP 200" in detail

    async def test_event_stream_is_healthy_by_its_status(self, tmp_path: Path) -> None:
        """An SSE endpoint (an event every 50 ms, forever) is healthy within the timeout."""
        with body_server(tmp_path) as base:
            ok, detail = await probe_once(f"{base}/events")
        assert ok is True, detail

    async def test_endless_body_of_an_error_status_fails_at_once(self, tmp_path: Path) -> None:
        """A 503 with an endless body fails by its status, not by a timeout."""
        with body_server(tmp_path) as base:
            ok, detail = await probe_once(f"{base}/endless-503")
        assert ok is False and "HTTP 503" in detail

    async def test_a_50_mib_body_costs_the_daemon_no_memory(self, tmp_path: Path) -> None:
        """Probing a 50 MiB page allocates well under 1 MiB in the daemon
        (0.1.0 read the whole body into memory: a peak above 50 MiB)."""
        with body_server(tmp_path) as base:
            spec = HealthCheckSpec(http=f"{base}/big", timeout=TIMEOUT)
            async with open_probe(spec, service="x", workdir=Path("."), env={}) as probe:
                await probe()  # warm up: imports, first-use caches
                tracemalloc.start()
                try:
                    before, _ = tracemalloc.get_traced_memory()
                    tracemalloc.reset_peak()
                    with anyio.fail_after(TIMEOUT):
                        result = await probe()
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
        assert result.ok is True, result.detail
        print(f"peak allocation of one probe of a 50 MiB page: {peak - before} bytes")
        assert peak - before < 1024 * 1024, f"probe allocated {peak - before} bytes at its peak"


class TestHttpStatusHelper:
    """`health.http_status`: the request of HTTP probes and of the post_start hook."""

    @pytest.mark.parametrize("path", ["/endless", "/big", "/events"])
    async def test_put_returns_the_status_without_the_whole_body(
        self, tmp_path: Path, path: str
    ) -> None:
        """PUT (post_start's method) to an endless or huge body: the status, in time."""
        with body_server(tmp_path) as base:
            async with httpx.AsyncClient(timeout=TIMEOUT, verify=tls_context()) as client:
                with anyio.fail_after(TIMEOUT):
                    code = await http_status(client, base + path, method="PUT", timeout=TIMEOUT)
            assert code == 200
            assert f"PUT {path}" in (tmp_path / "requests").read_text()

    async def test_inside_a_scope_with_the_same_deadline(self, tmp_path: Path) -> None:
        """Called under the caller's own `fail_after(timeout)` (as the post_start hook
        wraps it), the body read ends first: the status, not a TimeoutError."""
        with body_server(tmp_path) as base:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                with anyio.fail_after(0.5):
                    code = await http_status(client, f"{base}/events", timeout=0.5)
        assert code == 200

    async def test_no_status_line_in_time_is_a_timeout(self, tmp_path: Path) -> None:
        """A listener that never answers: TimeoutError after `timeout` seconds."""
        import socket

        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            url = f"http://127.0.0.1:{server.getsockname()[1]}/"
            async with httpx.AsyncClient(timeout=30) as client:
                with pytest.raises(TimeoutError), anyio.fail_after(5):
                    await http_status(client, url, timeout=0.2)
