"""Item 6: a probe that cannot run because the *daemon* is out of descriptors has no
verdict (ok=None, daemon_side) and says so; it is never the service's failed check.

The test process is the daemon here: RLIMIT_NOFILE is lowered to the descriptors it
has open and every free slot below is filled, so the next socket() or pipe() fails
with EMFILE for real. The limit is restored in a finally."""

from __future__ import annotations

import errno
import gc
import os
import resource
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from supervisor.drivers.process import ProcessDriver
from supervisor.health import HealthCounter, ProbeResult, daemon_fault, open_probe
from supervisor.spec import HealthCheckSpec
from supervisor.states import Health

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")


@contextmanager
def no_free_descriptors() -> Iterator[None]:
    """Inside: the process cannot open one more descriptor (EMFILE)."""
    gc.collect()  # garbage of earlier tests must not free a descriptor inside
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def assert_no_verdict(result: ProbeResult) -> None:
    assert result.ok is None, result
    assert result.daemon_side is True
    assert result.detail.startswith("daemon out of file descriptors: [EMFILE]"), result.detail


class TestDaemonOutOfDescriptors:
    async def test_tcp_probe_has_no_verdict(self, listener: int) -> None:
        """tcp: no socket for the probe -> ok=None, "daemon out of file descriptors"
        (0.1.0: ok=False, counted as the service's failure)."""
        spec = HealthCheckSpec(tcp=f"127.0.0.1:{listener}", timeout=2)
        async with open_probe(spec, service="x", workdir=Path("."), env={}) as probe:
            with no_free_descriptors():
                result = await probe()
            assert_no_verdict(result)
            assert (await probe()).ok is True  # descriptors back: a verdict again

    async def test_http_probe_has_no_verdict(self, listener: int) -> None:
        """http: httpx's ConnectError wraps the EMFILE; still no verdict."""
        spec = HealthCheckSpec(http=f"http://127.0.0.1:{listener}/health", timeout=2)
        async with open_probe(spec, service="x", workdir=Path("."), env={}) as probe:
            for _ in range(3):
                with no_free_descriptors():
                    result = await probe()
                # A descriptor another thread of the test run closed meanwhile (an earlier
                # test's daemon winding down) lets the connect through: the listener never
                # answers HTTP, so that check times out (or, answered, passes): try again.
                # Any other failed check (ok False) is the fault this test is about.
                if result.ok is not True and "timed out" not in result.detail:
                    break
        assert_no_verdict(result)

    async def test_exec_probe_has_no_verdict(self, tmp_path: Path) -> None:
        """exec: no pipe for the child's output -> no verdict."""
        driver = ProcessDriver(state_dir=tmp_path / "state")
        try:
            spec = HealthCheckSpec(exec=(sys.executable, "-c", "pass"), timeout=5)
            async with open_probe(
                spec, service="x", workdir=tmp_path, env={}, run_command=driver.run_command
            ) as probe:
                with no_free_descriptors():
                    result = await probe()
                assert_no_verdict(result)
                assert (await probe()).ok is True
        finally:
            driver.close()

    def test_no_verdict_is_not_counted(self) -> None:
        """However many daemon-side results come, health and the counts do not move;
        a streak of real failures goes on across them."""
        spec = HealthCheckSpec(tcp="x:1", failure_threshold=3)
        counter = HealthCounter(spec, started_at=0)
        assert counter.record(ProbeResult(True), now=1) is Health.HEALTHY
        fault = ProbeResult(None, "daemon out of file descriptors: ...", daemon_side=True)
        for t in range(2, 100):
            assert counter.record(fault, now=t) is Health.HEALTHY
        assert counter.failures == 0
        counter.record(ProbeResult(False), now=100)
        counter.record(fault, now=101)
        counter.record(ProbeResult(False), now=102)
        assert counter.record(ProbeResult(False), now=103) is Health.UNHEALTHY


class TestDaemonFault:
    @pytest.mark.parametrize(
        ("code", "text"),
        [
            (errno.EMFILE, "daemon out of file descriptors"),
            (errno.ENFILE, "host out of file descriptors"),
            (errno.ENOMEM, "daemon out of memory"),
            (errno.ENOBUFS, "daemon out of socket buffers"),
        ],
    )
    def test_daemon_errnos_deep_in_a_chain(self, code: int, text: str) -> None:
        """The errno is found under __cause__ chains and exception groups."""
        inner = OSError(code, os.strerror(code))
        try:
            try:
                raise ExceptionGroup("attempts", [ConnectionRefusedError(), inner])
            except ExceptionGroup as group:
                raise OSError("All connection attempts failed") from group
        except OSError as outer:
            found = daemon_fault(outer)
        assert found is not None and found.startswith(text)

    @pytest.mark.parametrize(
        "exc",
        [ConnectionRefusedError(errno.ECONNREFUSED, "refused"), TimeoutError(), ValueError()],
    )
    def test_service_failures_are_not_daemon_faults(self, exc: Exception) -> None:
        """Refused, timed out, anything else: the service's failure."""
        assert daemon_fault(exc) is None
