"""Port holders: finding listeners (IPv4, IPv6) and reclaiming the port by policy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from anyio.abc import TaskGroup

from supervisor.drivers.process import ProcessDriver, ProcessHandle
from supervisor.logfiles import LogHub
from supervisor.ports import find_holders, reclaim
from supervisor.spec import ProcessSpec, ServiceSpec, StopSpec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

PROGRAMS = Path(__file__).parent / "programs"
LISTEN = str(PROGRAMS / "proc_listen.py")
FAST = StopSpec(signal=signal.SIGTERM, timeout=2.0)


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass
class Ports:
    driver: ProcessDriver
    hub: LogHub
    tg: TaskGroup
    tmp_path: Path

    async def listener(self, service: str, port: int, *extra: str) -> ProcessHandle:
        """A listener started by the driver (so it carries the marker of ``service``)."""
        spec = ServiceSpec(
            name=service,
            target=ProcessSpec(command=(sys.executable, LISTEN, str(port), *extra)),
            workdir=self.tmp_path,
        )
        async with self.hub.subscribe(service) as lines:
            handle = await self.driver.start(spec, task_group=self.tg)
            with anyio.fail_after(10):
                async for line in lines:
                    if line == "ready":
                        break
        return handle


@asynccontextmanager
async def ports(tmp_path: Path) -> AsyncIterator[Ports]:
    hub = LogHub()
    driver = ProcessDriver(state_dir=tmp_path / "state", loghub=hub)
    try:
        async with anyio.create_task_group() as tg:
            yield Ports(driver, hub, tg, tmp_path)
            tg.cancel_scope.cancel()
    finally:
        driver.close()


@asynccontextmanager
async def foreign_listener(port: int, *extra: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A listener without any marker, as a user's own process would be."""
    env = {k: v for k, v in os.environ.items() if k != "HOSTVISOR_SERVICE"}
    proc = subprocess.Popen(
        [sys.executable, LISTEN, str(port), *extra], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    try:
        with anyio.fail_after(10):
            assert await anyio.to_thread.run_sync(proc.stdout.readline) == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


class TestFindHolders:
    async def test_ipv4_listener_with_marker(self, tmp_path: Path) -> None:
        """A process listening on 0.0.0.0:port is found with its marker, uid,
        command line and start time."""
        port = free_port()
        async with ports(tmp_path) as p:
            handle = await p.listener("web", port, "4")
            holders = find_holders(port)
            assert [h.pid for h in holders] == [handle.pid]
            holder = holders[0]
            assert holder.marker == "web"
            assert holder.uid == os.getuid()
            assert "proc_listen.py" in holder.cmdline and str(port) in holder.cmdline
            assert holder.create_time == handle.create_time
            await handle.kill()

    @pytest.mark.skipif(not ipv6_available(), reason="no IPv6")
    async def test_ipv6_listener_is_found(self, tmp_path: Path) -> None:
        """A listener on [::]:port (IPv6 only) is found too."""
        port = free_port(socket.AF_INET6)
        async with ports(tmp_path) as p:
            handle = await p.listener("v6", port, "6")
            assert [h.pid for h in find_holders(port)] == [handle.pid]
            await handle.kill()

    def test_free_port_has_no_holder(self) -> None:
        """Nothing listening: no holders."""
        assert find_holders(free_port()) == []


class TestReclaim:
    async def test_free_port_needs_nothing(self) -> None:
        """A free port is reported free, nothing killed or blocked."""
        result = await reclaim(free_port(), policy="own", service="x", known=(), stop=FAST)
        assert (result.free, result.killed, result.blocked) == (True, [], [])

    async def test_own_kills_a_holder_with_our_marker(self, tmp_path: Path) -> None:
        """`own`: a stale holder marked with this service is stopped with stop.signal."""
        port = free_port()
        async with ports(tmp_path) as p:
            stale = await p.listener("web", port, "4")
            with anyio.fail_after(10):
                result = await reclaim(port, policy="own", service="web", known=(), stop=FAST)
            assert result.free and result.blocked == []
            assert [h.pid for h in result.killed] == [stale.pid]
            assert (await stale.wait()).signal == signal.SIGTERM

    async def test_own_kills_a_recorded_identity(self, tmp_path: Path) -> None:
        """`own`: a holder whose (pid, start time) the daemon recorded is ours,
        whatever its marker."""
        port = free_port()
        async with ports(tmp_path) as p:
            stale = await p.listener("renamed", port, "4")
            assert stale.create_time is not None
            known = [(stale.pid, stale.create_time)]
            with anyio.fail_after(10):
                result = await reclaim(port, policy="own", service="web", known=known, stop=FAST)
            assert result.free and [h.pid for h in result.killed] == [stale.pid]
            await stale.wait()

    async def test_own_never_kills_a_foreign_holder(self, tmp_path: Path) -> None:
        """`own`: a holder without our marker or identity is blocked, left running,
        and named by pid and command line."""
        port = free_port()
        async with foreign_listener(port, "4") as proc:
            result = await reclaim(
                port, policy="own", service="web", known=[(proc.pid, 1.0)], stop=FAST
            )
            assert not result.free and result.killed == []
            assert [h.pid for h in result.blocked] == [proc.pid]
            assert proc.poll() is None
            assert "proc_listen.py" in result.blocked[0].describe()

    async def test_another_services_marker_is_foreign(self, tmp_path: Path) -> None:
        """`own`: a holder marked for another service is not ours."""
        port = free_port()
        async with ports(tmp_path) as p:
            other = await p.listener("other", port, "4")
            result = await reclaim(port, policy="own", service="web", known=(), stop=FAST)
            assert [h.pid for h in result.blocked] == [other.pid] and not result.free
            assert other.status is None
            await other.kill()

    async def test_any_kills_a_foreign_holder_of_our_uid(self) -> None:
        """`any`: any holder running under our uid is killed."""
        port = free_port()
        async with foreign_listener(port, "4") as proc:
            with anyio.fail_after(10):
                result = await reclaim(port, policy="any", service="web", known=(), stop=FAST)
            assert result.free and [h.pid for h in result.killed] == [proc.pid]
            assert proc.wait(timeout=5) == -signal.SIGTERM

    async def test_no_never_kills(self, tmp_path: Path) -> None:
        """`no`: even our own stale holder is left alone."""
        port = free_port()
        async with ports(tmp_path) as p:
            stale = await p.listener("web", port, "4")
            result = await reclaim(port, policy="no", service="web", known=(), stop=FAST)
            assert not result.free and [h.pid for h in result.blocked] == [stale.pid]
            assert stale.status is None
            await stale.kill()

    async def test_stubborn_holder_is_sigkilled_after_timeout(self, tmp_path: Path) -> None:
        """A holder ignoring stop.signal is SIGKILLed after stop.timeout."""
        port = free_port()
        async with ports(tmp_path) as p:
            stale = await p.listener("web", port, "4", "stubborn")
            with anyio.fail_after(10):
                result = await reclaim(
                    port, policy="own", service="web", known=(), stop=StopSpec(timeout=0.3)
                )
            assert result.free
            assert (await stale.wait()).signal == signal.SIGKILL


PROBE = """
import subprocess, sys
from supervisor.ports import find_holders
port = int(sys.argv[2])
p = subprocess.Popen([sys.executable, sys.argv[1], str(port), "4"], stdout=subprocess.PIPE)
assert p.stdout.readline() == b"ready\\n"
found = [h.pid for h in find_holders(port)]
p.kill()
print(found == [p.pid], found, p.pid)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to switch to an unprivileged uid")
class TestUnprivileged:
    def test_own_listener_found_as_non_root(self) -> None:
        """As an ordinary user (uid 65534) find_holders still sees its own listener."""
        import psutil

        root = Path(__file__).parent.parent
        site = Path(psutil.__file__).parent.parent
        env = dict(os.environ, PYTHONPATH=f"{root}:{site}")
        for python in (sys.executable, "/usr/bin/python3"):
            try:
                out = subprocess.run(
                    [python, "-c", PROBE, LISTEN, str(free_port())],
                    user=65534,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                    cwd="/",
                    check=False,
                )
            except (PermissionError, FileNotFoundError):
                continue
            if out.returncode == 0 or "find_holders" in out.stderr:
                break
        else:
            pytest.skip("no interpreter usable by uid 65534")
        assert out.stdout.startswith("True"), out.stdout + out.stderr
