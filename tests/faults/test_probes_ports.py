"""Items 5 and 11: port scans run off the event loop, bounded; reclaim survives
processes vanishing mid-scan and reports every holder, IPv4 and IPv6."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import psutil
import pytest

from supervisor import ports
from supervisor.ports import find_holders, is_listening_async, reclaim
from supervisor.spec import StopSpec
from tests.support import free_port, program
from tests.test_ports import foreign_listener, ipv6_available

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

FAST = StopSpec(timeout=2.0)


@contextmanager
def fd_churn(fds: int = 3000) -> Iterator[subprocess.Popen[bytes]]:
    """tests/programs/probes_fd_churn.py: processes with many fds, each gone in ms."""
    proc = subprocess.Popen(program("probes_fd_churn", fds), stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class TestScansLeaveTheLoopAlone:
    async def test_reclaim_scans_in_worker_threads(self) -> None:
        """Every /proc scan of reclaim runs in a worker thread, never on the event loop
        (0.1.0 read /proc/net/tcp on the loop, twice per reclaim: ~70-110 ms of stall
        with 20,000 sockets on the host, see bench/bench_scans.py)."""
        loop_thread = threading.get_ident()
        seen: list[tuple[str, int]] = []
        originals = (ports._listening_inodes, ports._pids_holding)

        def spy(name: str, fn):  # type: ignore[no-untyped-def]
            def wrapped(*args):  # type: ignore[no-untyped-def]
                seen.append((name, threading.get_ident()))
                return fn(*args)

            return wrapped

        port = free_port()
        ports._listening_inodes = spy("tcp", originals[0])  # type: ignore[assignment]
        ports._pids_holding = spy("fd", originals[1])  # type: ignore[assignment]
        try:
            async with foreign_listener(port, "4") as proc:
                result = await reclaim(port, policy="no", service="web", known=(), stop=FAST)
            assert [h.pid for h in result.blocked] == [proc.pid]
        finally:
            ports._listening_inodes, ports._pids_holding = originals
        assert {name for name, _ in seen} == {"tcp", "fd"}
        assert all(ident != loop_thread for _, ident in seen), seen

    async def test_a_thousand_scans_share_a_few_threads(self) -> None:
        """1,000 concurrent scans (1,000 units starting together) never run more than
        SCAN_THREADS worker threads at once."""
        running = 0
        peak = 0
        lock = threading.Lock()
        original = ports._listening_inodes

        def counting(port: int) -> dict[int, int] | None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                return original(port)
            finally:
                with lock:
                    running -= 1

        ports._listening_inodes = counting  # type: ignore[assignment]
        try:
            port = free_port()
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for _ in range(1000):
                        tg.start_soon(is_listening_async, port)
        finally:
            ports._listening_inodes = original
        assert 1 <= peak <= ports.SCAN_THREADS


class TestVanishingProcesses:
    def test_scans_survive_processes_vanishing_mid_scan(self) -> None:
        """find_holders keeps working while processes with thousands of fds come and
        go under it (their /proc/PID/fd disappears between listing and reading)."""
        port = free_port()
        with socket.socket() as server, fd_churn():
            server.bind(("127.0.0.1", port))
            server.listen()
            for _ in range(40):
                holders = find_holders(port)
                assert [h.pid for h in holders] == [os.getpid()]

    async def test_reclaim_survives_a_holder_that_exits_by_itself(self, tmp_path: Path) -> None:
        """`any`: reclaim while churning processes come and go: the holder is stopped,
        the port is free, nothing raises."""
        port = free_port()
        with fd_churn():
            async with foreign_listener(port, "4") as proc:
                with anyio.fail_after(20):
                    result = await reclaim(port, policy="any", service="w", known=(), stop=FAST)
                assert result.free and [h.pid for h in result.killed] == [proc.pid]

    def test_a_holder_gone_before_the_kill_is_not_signalled(self) -> None:
        """The kill is verified: a holder seen by the scan whose pid now names another
        process (start time differs) is never signalled."""
        victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            real = psutil.Process(victim.pid).create_time()
            stale = ports.PortHolder(victim.pid, os.getuid(), "old", real - 5.0, "web")
            assert ports._same_process(stale) is None
            assert (
                ports._same_process(ports.PortHolder(victim.pid, os.getuid(), "", real, None))
                is not None
            )
            assert victim.poll() is None
        finally:
            victim.kill()
            victim.wait()


UNPRIVILEGED_PROBE = """
import socket, sys
from supervisor.ports import find_holders
port = int(sys.argv[1])
s = socket.socket()
s.bind(("0.0.0.0", port))
s.listen()
print([(h.pid, h.uid) for h in find_holders(port)] == [(__import__("os").getpid(), 65534), (0, 0)])
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run as an unprivileged uid")
@pytest.mark.skipif(not ipv6_available(), reason="no IPv6")
class TestBothFamilies:
    async def test_unseen_ipv6_holder_is_reported_next_to_a_seen_ipv4_one(self) -> None:
        """IPv4 held by our process, IPv6 by another user's that we cannot see: both are
        holders (0.1.0 dropped the unseen one, so the port looked ours to reclaim)."""
        port = free_port()
        async with foreign_listener(port, "6"):  # root's, unreadable for uid 65534
            root = Path(__file__).parent.parent.parent
            site = Path(psutil.__file__).parent.parent
            env = dict(os.environ, PYTHONPATH=f"{root}:{site}")
            for python in (sys.executable, "/usr/bin/python3"):
                try:
                    out = await anyio.run_process(
                        [python, "-c", UNPRIVILEGED_PROBE, str(port)],
                        user=65534,
                        env=env,
                        cwd="/",
                        check=False,
                    )
                except (PermissionError, FileNotFoundError):
                    continue
                if out.returncode == 0 or b"find_holders" in out.stderr:
                    break
            else:
                pytest.skip("no interpreter usable by uid 65534")
        assert out.stdout.startswith(b"True"), out.stdout + out.stderr

    async def test_ipv4_and_ipv6_holders_both_killed(self, tmp_path: Path) -> None:
        """`any`: one holder on 0.0.0.0:port and another on [::]:port are both stopped."""
        port = free_port()
        async with foreign_listener(port, "4") as v4, foreign_listener(port, "6") as v6:
            with anyio.fail_after(20):
                result = await reclaim(port, policy="any", service="w", known=(), stop=FAST)
            assert result.free
            assert sorted(h.pid for h in result.killed) == sorted([v4.pid, v6.pid])
