"""sd_notify(3) and the watchdog, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.notify import Notifier, summary
from supervisor.states import ServiceState
from tests.notify_listener import SystemdSocket

PROGRAMS = Path(__file__).parent / "programs"


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Iterator[SystemdSocket]:
    if request.param == "path":
        folder = tempfile.mkdtemp(prefix="hv-notify-", dir="/tmp")  # short: sun_path limit
        address = os.path.join(folder, "notify.sock")
    else:
        if sys.platform != "linux":
            pytest.skip("abstract sockets are Linux only")
        address = f"\0hostvisor-test-{uuid.uuid4().hex}"
    lst = SystemdSocket(address)
    try:
        yield lst
    finally:
        lst.close()
        if request.param == "path":
            os.unlink(address)
            os.rmdir(os.path.dirname(address))


def notifier_for(listener: SystemdSocket, **env: str) -> Notifier:
    return Notifier.from_environ({"NOTIFY_SOCKET": listener.notify_socket, **env})


class TestFromEnviron:
    def test_unset_is_a_no_op(self) -> None:
        """Without NOTIFY_SOCKET the notifier is disabled and sends nothing."""
        notifier = Notifier.from_environ({})
        assert not notifier.enabled
        assert not notifier.ready()
        assert not notifier.status("1/1 running")
        assert notifier.watchdog_interval() is None
        assert notifier.failures == 0

    @pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@", ""])
    def test_unsupported_addresses_disable(self, value: str) -> None:
        """Only absolute paths and @abstract names are used (sd_notify(3))."""
        assert not Notifier.from_environ({"NOTIFY_SOCKET": value}).enabled

    @pytest.mark.parametrize(
        ("env", "interval"),
        [
            ({"WATCHDOG_USEC": "3000000"}, 1.5),
            ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
            ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
            ({"WATCHDOG_USEC": "0"}, None),
            ({"WATCHDOG_USEC": "soon"}, None),
            ({}, None),
        ],
    )
    def test_watchdog_interval(self, env: dict[str, str], interval: float | None) -> None:
        """Half of WATCHDOG_USEC, only for our pid (sd_watchdog_enabled(3))."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/notify", **env})
        assert notifier.watchdog_interval() == interval

    def test_watchdog_needs_notify_socket(self) -> None:
        """WATCHDOG_USEC alone does not turn pings on: there is nowhere to send them."""
        assert Notifier.from_environ({"WATCHDOG_USEC": "1000000"}).watchdog_interval() is None


class TestMessages:
    async def test_ready_status_stopping(self, listener: SystemdSocket) -> None:
        """READY=1, STATUS=<text> and STOPPING=1 arrive as sent, on path and abstract sockets."""
        notifier = notifier_for(listener)
        assert notifier.ready()
        assert notifier.status("3/4 running, 1 backoff")
        assert notifier.stopping()
        assert await listener.wait_for("STOPPING")
        assert [m for _, m in listener.messages] == [
            {"READY": "1"},
            {"STATUS": "3/4 running, 1 backoff"},
            {"STOPPING": "1"},
        ]

    async def test_status_only_when_changed(self, listener: SystemdSocket) -> None:
        """The same status text is sent once; a new text is sent again."""
        notifier = notifier_for(listener)
        assert notifier.status("1/2 running")
        assert not notifier.status("1/2 running")
        assert notifier.status("2/2 running")
        assert await listener.wait_for("STATUS", 2)
        notifier.ready()
        assert await listener.wait_for("READY")
        assert [m["STATUS"] for _, m in listener.having("STATUS")] == [
            "1/2 running",
            "2/2 running",
        ]

    async def test_reloading_carries_monotonic_usec(self, listener: SystemdSocket) -> None:
        """RELOADING=1 comes with MONOTONIC_USEC on CLOCK_MONOTONIC, in one datagram."""
        notifier = notifier_for(listener)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert await listener.wait_for("RELOADING")
        (_, message), *_ = listener.messages
        assert message["RELOADING"] == "1"
        assert before <= int(message["MONOTONIC_USEC"]) <= after

    def test_missing_socket_is_counted_not_raised(self, tmp_path: Path) -> None:
        """A socket that is gone makes sends return False and count, never raise."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
        assert notifier.enabled
        assert not notifier.ready()
        assert not notifier.status("0/1 running")
        assert notifier.failures == 2
        assert isinstance(notifier.last_error, OSError)


class TestWatchdog:
    async def test_pings_every_half_watchdog_usec(self, listener: SystemdSocket) -> None:
        """WATCHDOG=1 is sent at once and then every WATCHDOG_USEC/2 seconds."""
        notifier = notifier_for(listener, WATCHDOG_USEC="200000")
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run_watchdog)
            assert await listener.wait_for("WATCHDOG", 4)
            tg.cancel_scope.cancel()
        times = [t for t, _ in listener.having("WATCHDOG")][:4]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.08 <= gap <= 0.3 for gap in gaps), gaps

    async def test_other_watchdog_pid_sends_nothing(self, listener: SystemdSocket) -> None:
        """WATCHDOG_PID of another process: run_watchdog returns without a ping."""
        notifier = notifier_for(listener, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
        with anyio.fail_after(1):
            await notifier.run_watchdog()
        notifier.ready()
        assert await listener.wait_for("READY")
        assert listener.having("WATCHDOG") == []

    async def test_stalled_loop_stops_pings(self, listener: SystemdSocket) -> None:
        """Pings come from the event loop: while it is blocked, none are sent."""
        notifier = notifier_for(listener, WATCHDOG_USEC="100000")  # ping every 50 ms
        async with anyio.create_task_group() as tg:
            await tg.start(notifier.run_watchdog)
            assert await listener.wait_for("WATCHDOG", 2)
            stall_start = time.monotonic()
            time.sleep(0.4)  # blocking the loop is the point
            stall_end = time.monotonic()
            count = len(listener.having("WATCHDOG"))
            assert await listener.wait_for("WATCHDOG", count + 1)
            tg.cancel_scope.cancel()
        during = [t for t, _ in listener.having("WATCHDOG") if stall_start < t < stall_end]
        assert during == []

    async def test_sigstopped_process_sends_nothing(self, listener: SystemdSocket) -> None:
        """A SIGSTOPped process stops pinging, so systemd's watchdog fires; SIGCONT resumes."""
        env = {**os.environ, "NOTIFY_SOCKET": listener.notify_socket, "WATCHDOG_USEC": "100000"}
        child = subprocess.Popen([sys.executable, str(PROGRAMS / "otel_watchdog.py")], env=env)
        try:
            assert await listener.wait_for("READY", timeout=10)
            assert await listener.wait_for("WATCHDOG", 2)
            child.send_signal(signal.SIGSTOP)
            stopped = len(listener.having("WATCHDOG"))
            # Five intervals with no ping (a ping racing SIGSTOP may still land).
            assert not await listener.wait_for("WATCHDOG", stopped + 2, timeout=0.25)
            child.send_signal(signal.SIGCONT)
            assert await listener.wait_for("WATCHDOG", stopped + 3)
        finally:
            child.kill()
            child.wait()


class TestSummary:
    def test_counts_running_and_notable_states(self) -> None:
        """'<running>/<total> running' plus the non-zero counts of troubled states."""
        S = ServiceState
        states = [S.RUNNING] * 12 + [S.BACKOFF, S.STOPPED]
        assert summary(states) == "12/14 running, 1 backoff"
        assert summary([S.RUNNING, S.FATAL, S.STARTING, S.STARTING]) == (
            "1/4 running, 2 starting, 1 fatal"
        )

    def test_empty(self) -> None:
        """No services at all is still a readable line."""
        assert summary([]) == "0/0 running"

    def test_jobs_between_runs_are_counted_as_waiting(self) -> None:
        """Scheduled jobs between runs show up as "waiting", not as missing."""
        S = ServiceState
        assert summary([S.RUNNING, S.WAITING, S.WAITING]) == "1/3 running, 2 waiting"
