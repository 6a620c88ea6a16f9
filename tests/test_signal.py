"""``hostvisor signal NAME... SIG [--group]`` and the ``signal`` control method (issue 12
item 5): real children that report each signal they get over a socket the test listens on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.signals import SignalError, parse_signal, signal_name
from tests.daemon_harness import PY, DaemonProcess, daemon
from tests.docker_engine import DockerEngine

#: A service that says "ready ROLE PID" when up and "ROLE PID SIGNAME" for every HUP or
#: USR1 it gets; with --child it first starts a grandchild in its process group.
REPORTER = r"""
import os, signal, socket, subprocess, sys
where, role = sys.argv[1], sys.argv[2]
if "--child" in sys.argv:
    subprocess.Popen([sys.executable, __file__, where, "child"])
sock = socket.socket(socket.AF_UNIX)
sock.connect(where)
def say(text):
    sock.sendall(f"{text}\n".encode())
def got(signum, frame):
    say(f"{role} {os.getpid()} {signal.Signals(signum).name}")
signal.signal(signal.SIGHUP, got)
signal.signal(signal.SIGUSR1, got)
say(f"ready {role} {os.getpid()}")
while True:
    signal.pause()
"""


class Listener:
    """A Unix socket the children report to; lines are read with a deadline."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hvsig", dir="/tmp"))
        self.path = self.folder / "report.sock"
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(self.path))
        self.server.listen(16)
        self.server.settimeout(15)
        self.conns: list[socket.socket] = []
        self.buffers: dict[socket.socket, bytes] = {}
        self.roles: dict[str, socket.socket] = {}

    def accept(self) -> int:
        """Accept the next reporter (``ready ROLE PID``); return its pid."""
        conn, _ = self.server.accept()
        conn.settimeout(15)
        self.conns.append(conn)
        self.buffers[conn] = b""
        _, role, pid = self._line(conn).split()
        self.roles[role] = conn
        return int(pid)

    def line(self, role: str = "main") -> str:
        """The next line from the latest reporter of ``role``, within 15 s."""
        return self._line(self.roles[role])

    def _line(self, conn: socket.socket) -> str:
        while b"\n" not in self.buffers[conn]:
            chunk = conn.recv(4096)
            assert chunk, "the reporter went away"
            self.buffers[conn] += chunk
        line, _, rest = self.buffers[conn].partition(b"\n")
        self.buffers[conn] = rest
        return line.decode()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.server.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def listener() -> Iterator[Listener]:
    made = Listener()
    try:
        yield made
    finally:
        made.close()


def reporter_unit(tmp_path: Path, listener: Listener, *extra: str, keys: str = "") -> str:
    program = tmp_path / "reporter.py"
    program.write_text(REPORTER)
    argv = [PY, str(program), str(listener.path), "main", *extra]
    return (
        f'command = {json.dumps(argv)}\nstart_seconds = "0.2s"\n{keys}'
        '[backoff]\ninitial = "0.1s"\nmax = "0.5s"\njitter = 0\n'
    )


def rpc(d: DaemonProcess, params: dict[str, Any]) -> dict[str, Any]:
    """One raw JSON-RPC line over the control socket, as ``socat`` would send it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(str(d.socket))
        request = {"jsonrpc": "2.0", "id": 7, "method": "signal", "params": params}
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


class TestParseSignal:
    @pytest.mark.parametrize("text", ["HUP", "SIGHUP", "sighup", " hup ", "1", 1])
    def test_names_and_numbers_as_kill_reads_them(self, text: object) -> None:
        """``HUP``, ``SIGHUP``, any case, a number given as text or as an int."""
        assert parse_signal(text) == signal.SIGHUP

    def test_realtime_signals(self) -> None:
        """``RTMIN+N`` and ``RTMAX-N`` as kill(1) reads them; the top is SIGRTMAX."""
        assert parse_signal("RTMIN+2") == signal.SIGRTMIN + 2
        assert parse_signal("sigrtmax-1") == signal.SIGRTMAX - 1
        assert parse_signal(int(signal.SIGRTMAX)) == signal.SIGRTMAX
        assert signal_name(signal.SIGRTMIN + 2) == "SIGRTMIN+2"
        assert signal_name(1) == "SIGHUP"

    @pytest.mark.parametrize("bad", ["HUPP", "", "0", 0, -1, 65, "RTMIN+99", True, 1.0, None])
    def test_anything_else_is_refused_naming_the_argument(self, bad: object) -> None:
        """The message names the argument and says what is expected."""
        with pytest.raises(SignalError, match=r"^SIG: .*expected a name like HUP"):
            parse_signal(bad, what="SIG")


class TestSignalVerb:
    def test_hup_reaches_the_main_process_which_keeps_running(
        self, tmp_path: Path, listener: Listener
    ) -> None:
        """`hostvisor signal web HUP`: the child handles it; same pid, no restart, exit 0."""
        with daemon(tmp_path, units={"web": reporter_unit(tmp_path, listener)}) as d:
            pid = listener.accept()
            d.wait_state("web", "running")
            done = d.cli("signal", "web", "HUP")
            assert done.returncode == 0, done.stderr
            assert done.stdout == f"web: SIGHUP sent to pid {pid}\n"
            assert listener.line() == f"main {pid} SIGHUP"
            entry = d.status("web")
            assert entry["pid"] == pid and entry["restarts"] == 0 and entry["state"] == "running"
            assert d.cli("signal", "web", "10").returncode == 0  # a number: SIGUSR1
            assert listener.line() == f"main {pid} SIGUSR1"
            d.wait_stderr(f"web: sent SIGUSR1 to pid {pid}")  # said in the daemon log

    def test_group_reaches_a_grandchild_in_the_group(
        self, tmp_path: Path, listener: Listener
    ) -> None:
        """Without --group only the main process; with it, the grandchild too."""
        unit = reporter_unit(tmp_path, listener, "--child")
        with daemon(tmp_path, units={"web": unit}) as d:
            pids = {listener.accept(), listener.accept()}
            assert set(listener.roles) == {"main", "child"}
            main = d.wait_state("web", "running")["pid"]
            (child,) = pids - {main}
            assert d.cli("signal", "web", "HUP").returncode == 0  # the main process only
            assert listener.line("main") == f"main {main} SIGHUP"
            done = d.cli("signal", "web", "USR1", "--group")
            assert done.returncode == 0, done.stderr
            assert done.stdout == f"web: SIGUSR1 sent to the process group of pid {main}\n"
            assert listener.line("main") == f"main {main} SIGUSR1"
            # The grandchild's first report is USR1: the HUP without --group missed it.
            assert listener.line("child") == f"child {child} SIGUSR1"

    def test_an_unknown_signal_is_exit_4_before_any_connection(self, tmp_path: Path) -> None:
        """Checked by the CLI first: no daemon is needed to be told."""
        d = DaemonProcess(tmp_path)
        try:
            done = d.cli("signal", "web", "HUPP")
            assert done.returncode == 4
            assert done.stderr.strip() == (
                "hostvisor: signal: SIG: unknown signal 'HUPP' (expected a name like HUP, "
                f"SIGTERM or USR1, or a number from 1 to {int(signal.SIGRTMAX)})"
            )
        finally:
            d.cleanup()

    def test_unknown_service_4_stopped_service_1(self, tmp_path: Path, listener: Listener) -> None:
        """An unknown name is exit 4; a stopped service is not signalled: exit 1 and a line."""
        units = {
            "web": reporter_unit(tmp_path, listener),
            "idle": reporter_unit(tmp_path, listener, keys="autostart = false\n"),
        }
        with daemon(tmp_path, units=units) as d:
            listener.accept()
            d.wait_state("web", "running")
            done = d.cli("signal", "nope", "HUP")
            assert done.returncode == 4 and "unknown service: nope" in done.stderr
            done = d.cli("signal", "web", "idle", "HUP")
            assert done.returncode == 1
            assert done.stderr == "hostvisor: idle is not running (stopped): SIGHUP not sent\n"
            assert done.stdout.startswith("web: SIGHUP sent to pid")

    def test_a_signal_that_kills_it_restarts_it_by_policy(
        self, tmp_path: Path, listener: Listener
    ) -> None:
        """SIGTERM to a service that does not handle it: it dies by the signal and is
        restarted (restart = "always"): new pid, restarts 1, last exit SIGTERM."""
        with daemon(tmp_path, units={"web": reporter_unit(tmp_path, listener)}) as d:
            pid = listener.accept()
            d.wait_state("web", "running")
            seq = d.last_seq()
            assert d.cli("signal", "web", "TERM").returncode == 0
            exited = d.wait_event("hostvisor.service.exited", "web", after=seq)
            assert exited["attributes"].get("process.exit.code") in (None, -15)
            new_pid = listener.accept()
            entry = d.wait_state("web", "running")
            assert new_pid != pid and entry["pid"] == new_pid and entry["restarts"] == 1
            assert entry["last_exit"] == {"code": None, "signal": int(signal.SIGTERM)}

    def test_a_job_signals_each_live_run(self, tmp_path: Path, listener: Listener) -> None:
        """A job's running run gets the signal like a service's instance."""
        unit = reporter_unit(tmp_path, listener, keys='every = "1h"\n')
        with daemon(tmp_path, units={"job": unit}) as d:
            assert d.cli("start", "job", "--no-wait").returncode == 0
            pid = listener.accept()
            done = d.cli("signal", "job", "HUP")
            assert done.returncode == 0, done.stderr
            assert listener.line() == f"main {pid} SIGHUP"


class TestSignalMethod:
    def test_raw_json_lines(self, tmp_path: Path, listener: Listener) -> None:
        """The method as socat sends it: entries with "signalled"; -32602 for an unknown
        signal, naming it; -32001 for an unknown service; a number works too."""
        with daemon(tmp_path, units={"web": reporter_unit(tmp_path, listener)}) as d:
            pid = listener.accept()
            d.wait_state("web", "running")
            answer = rpc(d, {"services": ["web"], "signal": "SIGHUP"})
            (entry,) = answer["result"]["services"]
            assert entry["name"] == "web" and entry["signalled"] is True and entry["pid"] == pid
            assert "description" in entry
            assert listener.line() == f"main {pid} SIGHUP"
            answer = rpc(d, {"services": ["web"], "signal": 10, "group": True})
            assert answer["result"]["services"][0]["signalled"] is True
            assert listener.line() == f"main {pid} SIGUSR1"
            answer = rpc(d, {"services": ["web"], "signal": "SIGBOGUS"})
            assert answer["error"]["code"] == -32602
            assert "'SIGBOGUS'" in answer["error"]["message"]
            answer = rpc(d, {"services": ["nope"], "signal": "HUP"})
            assert answer["error"]["code"] == -32001
            answer = rpc(d, {"services": ["web"]})
            assert answer["error"]["code"] == -32602
            answer = rpc(d, {"services": ["web"], "signal": "HUP", "grop": True})
            assert answer["error"]["code"] == -32602 and "grop" in answer["error"]["message"]


@pytest.mark.docker
class TestContainer:
    def test_a_container_is_signalled_through_the_engine(
        self, tmp_path: Path, engine: DockerEngine
    ) -> None:
        """`hostvisor signal db HUP`: docker kill --signal reaches the container's main
        process (here it exits 3 on HUP), and the daemon sees that exit."""
        name = f"hvsig-{os.getpid()}-{tmp_path.name[-12:]}".lower()
        script = "trap 'exit 3' HUP; sleep 1000 & wait"
        engine.docker("run", "-d", "--name", name, "--network", "none", "--stop-timeout", "1",
                      engine.image, "sh", "-c", script)  # fmt: skip
        unit = (
            f'container = "{name}"\nstart_seconds = "0.2s"\nstop_timeout = "1s"\nrestart = "no"\n'
        )
        try:
            env = {"DOCKER_HOST": engine.host}
            with daemon(tmp_path, units={"db": unit}, env=env) as d:
                d.wait_state("db", "running")
                seq = d.last_seq()
                done = d.cli("signal", "db", "HUP", "--group")
                assert done.returncode == 0, done.stderr
                assert done.stdout.startswith("db: SIGHUP sent to container ")
                exited = d.wait_event("hostvisor.service.exited", "db", after=seq)
                assert exited["attributes"]["process.exit.code"] == 3
        finally:
            engine.docker("rm", "-f", name, check=False)
