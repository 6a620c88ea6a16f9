"""sd_notify end to end: a real ``hostvisor run`` talking to a real AF_UNIX datagram socket.

The socket stands in for systemd's: ``NOTIFY_SOCKET`` points at it, a thread
stamps each datagram on arrival. sd_notify(3), sd_watchdog_enabled(3).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.control.client import ControlClient
from tests.daemon_harness import daemon, py_cmd
from tests.notify_listener import SystemdSocket

_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
SLEEP = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.3s"\nstop_timeout = "2s"\n'


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # If pytest itself runs under systemd, its NOTIFY_SOCKET must not reach our daemons.
    for name in _INHERITED:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["path"])
def systemd(request: pytest.FixtureRequest) -> Iterator[SystemdSocket]:
    if request.param == "abstract":
        address = f"\0hostvisor-e2e-{uuid.uuid4().hex}"
        sock = SystemdSocket(address)
        yield sock
        sock.close()
        return
    folder = tempfile.mkdtemp(prefix="hv-sd-", dir="/tmp")  # short: the sun_path limit
    sock = SystemdSocket(os.path.join(folder, "notify"))
    try:
        yield sock
    finally:
        sock.close()
        os.unlink(sock.address)
        os.rmdir(folder)


def notify_env(systemd: SystemdSocket, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": systemd.notify_socket, **extra}


class TestReady:
    @pytest.mark.parametrize("systemd", ["path", "abstract"], indirect=True)
    def test_ready_once_the_socket_listens_and_autostart_services_started(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """READY=1 arrives once: the control socket answers at that moment, and every
        autostart service has been started (a non-autostart one stays stopped)."""
        units = {"a": SLEEP, "b": SLEEP, "manual": SLEEP + "autostart = false\n"}
        with daemon(tmp_path, units=units, env=notify_env(systemd), start=False) as d:
            client = ControlClient(d.socket)
            systemd.on_ready = lambda: client.call("status", {}, timeout=5)
            d.start(wait=False)
            systemd.wait("READY")
            at_ready = systemd.ready_checks[0]
            assert isinstance(at_ready, dict), at_ready  # answered, not an exception
            states = {s["name"]: s["state"] for s in at_ready["services"]}
            assert states["manual"] == "stopped"
            assert states["a"] in ("starting", "running")
            assert states["b"] in ("starting", "running")
            d.wait_stderr("hostvisor.daemon.started")
            assert len(systemd.having("READY")) == 1


class TestStatus:
    def test_status_line_summarises_and_follows_changes(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """STATUS= reads "2/2 running" once both run, "1/2 running" after one is stopped;
        a line is sent only when it changes."""

        def lines() -> list[str]:
            return [m["STATUS"] for _, m in systemd.having("STATUS")]

        with daemon(tmp_path, units={"a": SLEEP, "b": SLEEP}, env=notify_env(systemd)) as d:
            d.wait_state("a", "running")
            d.wait_state("b", "running")
            systemd.wait_until(lambda: "2/2 running" in lines(), "STATUS=2/2 running")
            d.call("stop", services=["b"], wait=True)
            systemd.wait_until(lambda: lines()[-1] == "1/2 running", "STATUS=1/2 running")
        sent = lines()
        assert sent[0].startswith("0/2 running"), sent
        assert all(x != y for x, y in itertools.pairwise(sent)), sent


class TestWatchdog:
    def test_pings_every_half_watchdog_usec(self, tmp_path: Path, systemd: SystemdSocket) -> None:
        """WATCHDOG_USEC=400000: WATCHDOG=1 about every 0.2 s."""
        env = notify_env(systemd, WATCHDOG_USEC="400000")
        with daemon(tmp_path, units={"a": SLEEP}, env=env):
            systemd.wait("WATCHDOG", 7)
        stamps = [t for t, _ in systemd.having("WATCHDOG")]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert 0.15 <= statistics.median(gaps) <= 0.3, gaps

    def test_a_stopped_daemon_sends_no_pings_and_resumes_on_sigcont(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """SIGSTOP: no WATCHDOG=1 while stopped (systemd would restart us); SIGCONT: they resume."""
        env = notify_env(systemd, WATCHDOG_USEC="400000")
        with daemon(tmp_path, units={"a": SLEEP}, env=env) as d:
            systemd.wait("WATCHDOG", 2)
            assert d.proc is not None
            me = psutil.Process(d.proc.pid)
            d.signal(signal.SIGSTOP)
            d.wait_for(lambda: me.status() == psutil.STATUS_STOPPED, 5, "stopped")
            stopped_at = time.monotonic()
            # The window itself is what is measured: 5 watchdog intervals of silence.
            time.sleep(1.0)
            silent_until = time.monotonic()
            d.signal(signal.SIGCONT)
            systemd.wait("WATCHDOG", 4, after=silent_until, timeout=5)
        # A datagram sent just before the stop may be read a moment later.
        during = [t for t, _ in systemd.having("WATCHDOG") if stopped_at + 0.05 < t < silent_until]
        assert during == []
        resumed = [t for t, _ in systemd.having("WATCHDOG", after=silent_until)]
        assert resumed[0] - silent_until < 0.5
        gaps = [b - a for a, b in itertools.pairwise(resumed)]
        assert statistics.median(gaps) <= 0.3, gaps

    def test_watchdog_pid_of_another_process_means_no_pings(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """WATCHDOG_PID names another process: the watchdog is not ours (sd_watchdog_enabled(3))."""
        env = notify_env(systemd, WATCHDOG_USEC="400000", WATCHDOG_PID="1")
        with daemon(tmp_path, units={"a": SLEEP}, env=env) as d:
            systemd.wait("READY")
            d.wait_state("a", "running")
            ready_at = systemd.having("READY")[0][0]
            time.sleep(max(0.0, ready_at + 1.0 - time.monotonic()))  # 5 intervals
        assert systemd.having("WATCHDOG") == []


class TestReloadAndStop:
    def test_sighup_sends_reloading_with_monotonic_usec_then_ready(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """SIGHUP: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC), then READY=1 once the
        reload is applied (the added unit is known)."""
        with daemon(tmp_path, units={"a": SLEEP}, env=notify_env(systemd)) as d:
            systemd.wait("READY")
            d.write_unit("b", SLEEP)
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            d.signal(signal.SIGHUP)
            systemd.wait("READY", 2)
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert "b" in [s["name"] for s in d.call("status")["services"]]
        keys = [k for k in systemd.order() if k in ("READY", "RELOADING")]
        assert keys == ["READY", "RELOADING", "READY"]
        (_, reloading), *_ = systemd.having("RELOADING")
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after

    def test_reexec_sends_reloading_then_ready_from_the_new_code(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """``hostvisor reexec``: RELOADING=1 from the old code, READY=1 from the new one, the
        same pid all along (systemd's MAINPID stays right; issue 10)."""
        with daemon(tmp_path, units={"a": SLEEP}, env=notify_env(systemd)) as d:
            systemd.wait("READY")
            pid = d.proc.pid  # type: ignore[union-attr]
            result = d.cli("reexec")
            assert result.returncode == 0, result.stderr
            systemd.wait("READY", 2)
            assert d.call("status")["daemon"]["pid"] == pid
        keys = [k for k in systemd.order() if k in ("READY", "RELOADING")]
        assert keys == ["READY", "RELOADING", "READY"]

    def test_sigterm_sends_stopping_then_exits_0(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """SIGTERM: STOPPING=1 at the start of the shutdown; nothing claims readiness after it."""
        with daemon(tmp_path, units={"a": SLEEP}, env=notify_env(systemd)) as d:
            d.wait_state("a", "running")
            d.signal(signal.SIGTERM)
            systemd.wait("STOPPING")
            assert d.stop() == 0
        keys = systemd.order()
        assert keys.count("STOPPING") == 1
        assert "READY" not in keys[keys.index("STOPPING") :]


class TestChildren:
    def test_children_never_see_the_notify_variables(
        self, tmp_path: Path, systemd: SystemdSocket
    ) -> None:
        """NOTIFY_SOCKET, WATCHDOG_*, LISTEN_* are the daemon's alone; a child sees none."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        work = tmp_path / "work"
        work.mkdir()
        unit = (
            f'command = {py_cmd("svc_serve", "--port", port)}\nworkdir = "{work}"\n'
            f'[health]\nhttp = "http://127.0.0.1:{port}/"\ninterval = "0.2s"\n'
        )
        env = notify_env(
            systemd,
            WATCHDOG_USEC="400000",
            WATCHDOG_PID=str(os.getpid()),
            LISTEN_FDS="1",
            LISTEN_PID=str(os.getpid()),
        )
        with daemon(tmp_path, units={"web": unit}, env=env) as d:
            d.wait_state("web", "running")  # healthy: env.json was written before listening
            systemd.wait("READY")
            seen = json.loads((work / "env.json").read_text())
        assert [k for k in _INHERITED if k in seen] == []
        assert seen["HOSTVISOR_SERVICE"] == "web"
