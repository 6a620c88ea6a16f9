"""The control plane end to end: a real ``hostvisor run``, its real socket, and the real CLI
(``python -m supervisor ...``) as a user runs it (contract sections 5, 7 and 8, issue 3).

The fake-daemon tests (test_control.py, test_cli.py) pin the protocol and the CLI's output;
these pin that the daemon behind the socket does what the CLI promises.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from supervisor import __version__
from supervisor.control.client import ControlClient
from tests.daemon_harness import PY, DaemonProcess, daemon, py_cmd
from tests.support import free_port

SLEEP = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\nstop_timeout = "5s"\n'
CHATTY = f'command = {py_cmd("e2e_chatty", "--count", 40, "--size", 100)}\nstart_seconds = "0.2s"\n'
#: Exits at once, every time: two failed starts in a row and it is FATAL.
CRASHY = (
    f"command = {py_cmd('svc_exit', '--after', 0, '--code', 1)}\n"
    'autostart = false\nstart_seconds = "1s"\ngive_up_after = 2\n'
    '[backoff]\ninitial = "0.05s"\nmax = "0.1s"\n'
)


def live_instances(d: DaemonProcess, name: str) -> list[int]:
    """Pids of the daemon's live (non-zombie) descendants carrying ``HOSTVISOR_SERVICE=name``.

    Descendants only: other test runs on this machine use the same service names.
    """
    assert d.proc is not None
    found = []
    for proc in psutil.Process(d.proc.pid).children(recursive=True):
        with suppress(psutil.Error):
            if proc.environ().get("HOSTVISOR_SERVICE") == name and proc.status() != "zombie":
                found.append(proc.pid)
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Follower:
    """A ``hostvisor logs -f`` / ``events -f`` process; a thread collects its stdout lines."""

    def __init__(self, d: DaemonProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "supervisor", *args, "-c", str(d.config_path), "--socket", str(d.socket)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=d.env(),
            cwd=d.root,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_line(
        self, match: Callable[[str], bool], *, after: int = 0, timeout: float = 15
    ) -> int:
        """Index of the first line from index ``after`` on that ``match``es; waits for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.lines)):
                    if match(self.lines[i]):
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    stderr = "" if self.proc.poll() is None else self.proc.stderr.read()  # type: ignore[union-attr]
                    raise AssertionError(f"no such line; got {self.lines[after:][-10:]} {stderr}")
                self._cond.wait(min(left, 0.5))

    def interrupt(self) -> int:
        """Ctrl-C, as a user stops following; the exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def following(d: DaemonProcess, *args: str) -> Iterator[Follower]:
    follower = Follower(d, *args)
    try:
        yield follower
    finally:
        if follower.proc.poll() is None:
            follower.proc.kill()
            follower.proc.wait()


class TestStatus:
    def test_exit_codes_0_3_4(self, tmp_path: Path) -> None:
        """status: 0 when every named service runs, 3 when one does not, 4 for an unknown name."""
        with daemon(tmp_path, units={"a": SLEEP, "b": SLEEP}) as d:
            d.wait_state("a", "running")
            d.wait_state("b", "running")
            assert d.cli("status").returncode == 0
            d.call("stop", services=["b"], wait=True, timeout=30)
            result = d.cli("status")
            assert result.returncode == 3
            assert "b" in result.stdout and "stopped" in result.stdout
            assert d.cli("status", "a").returncode == 0
            assert d.cli("status", "b").returncode == 3
            unknown = d.cli("status", "a", "nope")
            assert unknown.returncode == 4
            assert unknown.stderr.count("\n") == 1 and "unknown service: nope" in unknown.stderr

    def test_no_daemon_is_4_with_a_hint(self, tmp_path: Path) -> None:
        """Nobody listening: exit 4 and one line saying how to start a daemon for this config."""
        with daemon(tmp_path, units={"a": SLEEP}, start=False) as d:
            result = d.cli("status")
            assert result.returncode == 4
            assert f"no daemon at {d.socket}" in result.stderr
            assert f"start one with: hostvisor run -c {d.config_path}" in result.stderr
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr

    def test_json_document_matches_contract_section_5(self, tmp_path: Path) -> None:
        """status --json: the daemon block and each service entry, field by field."""
        port = free_port()
        web = (
            f"command = {py_cmd('svc_serve', '--port', port)}\nport = {port}\n"
            'start_seconds = "0.2s"\n'
            f'[health]\nhttp = "http://127.0.0.1:{port}/health"\ninterval = "0.2s"\n'
        )
        once = f'command = {py_cmd("svc_exit", "--after", 0.3, "--code", 3)}\nrestart = "no"\n'
        with daemon(tmp_path, units={"web": web, "once": once}) as d:
            d.wait_for(lambda: d.status("web")["health"] == "healthy", what="web healthy")
            d.wait_state("once", "exited")
            result = d.cli("status", "--json")
            assert result.returncode == 3  # "once" is not running
            doc = json.loads(result.stdout)
            assert set(doc) == {"daemon", "services"}
            daemon_block = doc["daemon"]
            assert set(daemon_block) == {"pid", "version", "uptime_seconds", "config"}
            assert daemon_block["pid"] == d.proc.pid  # type: ignore[union-attr]
            assert daemon_block["version"] == __version__
            assert isinstance(daemon_block["uptime_seconds"], float)
            assert daemon_block["uptime_seconds"] > 0
            assert os.path.realpath(daemon_block["config"]) == os.path.realpath(d.config_path)
            fields = {
                "name", "kind", "state", "health", "pid", "container_id", "restarts",
                "uptime_seconds", "last_exit", "message", "port", "logs_dropped_bytes", "adopted",
                "description", "cpu_percent", "memory_bytes", "processes",
            }  # fmt: skip
            by_name = {s["name"]: s for s in doc["services"]}
            assert [s["name"] for s in doc["services"]] == ["once", "web"]
            w, o = by_name["web"], by_name["once"]
            assert set(w) == fields
            # "once" (restart = "no") is a one-shot job: the job fields of issue 11 too.
            assert set(o) == fields | {"schedule", "next_run", "last_run", "suspended"}
            assert (o["schedule"], o["next_run"], o["suspended"]) == (None, None, False)
            assert o["last_run"]["outcome"] == "failed" and o["last_run"]["exit"] == o["last_exit"]
            assert w["logs_dropped_bytes"] == 0 and o["logs_dropped_bytes"] == 0
            assert w["adopted"] is False and o["adopted"] is False
            assert (w["kind"], w["state"], w["health"]) == ("process", "running", "healthy")
            assert w["pid"] in live_instances(d, "web") and w["container_id"] is None
            assert w["restarts"] == 0 and w["last_exit"] is None and w["port"] == port
            assert isinstance(w["uptime_seconds"], float) and w["uptime_seconds"] > 0
            assert isinstance(w["message"], str)
            assert (o["state"], o["health"], o["pid"], o["port"]) == ("exited", "none", None, None)
            assert o["last_exit"] == {"code": 3, "signal": None} and o["uptime_seconds"] is None
            # Resource figures (issue 12): the running tree is sampled, an ended one is null.
            assert isinstance(w["cpu_percent"], float) and w["cpu_percent"] >= 0
            assert w["memory_bytes"] > 0 and w["processes"] >= 1
            assert (o["cpu_percent"], o["memory_bytes"], o["processes"]) == (None, None, None)


class TestActions:
    def test_stop_start_restart_wait_for_their_state(self, tmp_path: Path) -> None:
        """stop, start and restart return 0 once the service is stopped / running afresh."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            first = d.wait_state("a", "running")["pid"]
            stop = d.cli("stop", "a")
            assert (stop.returncode, stop.stdout) == (0, "a: stopped\n")
            assert d.status("a")["state"] == "stopped" and gone(first)
            start = d.cli("start", "a")
            assert (start.returncode, start.stdout) == (0, "a: running\n")
            second = d.status("a")["pid"]
            restart = d.cli("restart", "a")
            assert (restart.returncode, restart.stdout) == (0, "a: running\n")
            third = d.status("a")["pid"]
            assert len({first, second, third}) == 3 and gone(second)
            assert live_instances(d, "a") == [third]

    def test_no_wait_returns_before_the_target_state(self, tmp_path: Path) -> None:
        """--no-wait: exit 0 at once; the daemon then gets there on its own."""
        stubborn = (
            f"command = {json.dumps([PY, '-c', _IGNORE_TERM])}\n"
            'start_seconds = "0.2s"\nstop_timeout = "1s"\n'
        )
        with daemon(tmp_path, units={"slow": stubborn}) as d:
            pid = d.wait_state("slow", "running")["pid"]
            seq = d.last_seq()
            result = d.cli("stop", "slow", "--no-wait")
            assert result.returncode == 0
            assert result.stdout in ("slow: running\n", "slow: stopping\n")
            d.wait_event("hostvisor.service.stopped", "slow", after=seq)
            assert gone(pid)
            result = d.cli("start", "slow", "--no-wait")
            assert result.returncode == 0 and result.stdout != "slow: running\n"
            d.wait_state("slow", "running")

    def test_a_service_that_ends_fatal_fails_with_its_name_and_state(self, tmp_path: Path) -> None:
        """start of a service that cannot start: exit 1, one line naming it and its state."""
        with daemon(tmp_path, units={"crashy": CRASHY, "a": SLEEP}) as d:
            result = d.cli("start", "crashy", "--timeout", "30")
            assert result.returncode == 1
            assert result.stderr.startswith("hostvisor: crashy did not reach running")
            assert "it is fatal" in result.stderr and "Traceback" not in result.stderr
            assert d.status("crashy")["state"] == "fatal"

    def test_all(self, tmp_path: Path) -> None:
        """--all acts on every service."""
        with daemon(tmp_path, units={"a": SLEEP, "b": SLEEP, "c": SLEEP}) as d:
            for name in "abc":
                d.wait_state(name, "running")
            stop = d.cli("stop", "--all")
            assert (stop.returncode, stop.stdout) == (0, "a: stopped\nb: stopped\nc: stopped\n")
            assert d.cli("status").returncode == 3
            start = d.cli("start", "--all")
            assert (start.returncode, start.stdout) == (0, "a: running\nb: running\nc: running\n")
            assert d.cli("status").returncode == 0

    def test_unknown_service_is_4_and_changes_nothing(self, tmp_path: Path) -> None:
        """One unknown name among known ones: exit 4, and the known ones are left alone."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            pid = d.wait_state("a", "running")["pid"]
            result = d.cli("stop", "a", "nope")
            assert result.returncode == 4 and "unknown service: nope" in result.stderr
            assert d.status("a")["pid"] == pid

    def test_20_concurrent_restarts_leave_exactly_one_instance(self, tmp_path: Path) -> None:
        """20 clients restart one service at once: each is answered, one instance lives."""
        with daemon(tmp_path, units={"e2e-race": SLEEP}) as d:
            d.wait_state("e2e-race", "running")

            def restart(_: int) -> dict[str, Any]:
                params = {"services": ["e2e-race"], "wait": True, "timeout": 60}
                result: dict[str, Any] = ControlClient(d.socket).call("restart", params, timeout=90)
                return result

            with ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(restart, range(20)))
            assert len(answers) == 20
            assert all(a["services"][0]["name"] == "e2e-race" for a in answers)
            final = d.status("e2e-race")
            assert final["state"] == "running"
            assert live_instances(d, "e2e-race") == [final["pid"]]


_IGNORE_TERM = (
    "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('up', flush=True); time.sleep(600)"
)


class TestReload:
    def test_applied(self, tmp_path: Path) -> None:
        """reload prints added/removed/changed, exits 0; only the changed unit is restarted."""
        units = {"same": SLEEP, "edit": SLEEP, "old": SLEEP}
        with daemon(tmp_path, units=units) as d:
            pids = {name: d.wait_state(name, "running")["pid"] for name in units}
            d.write_unit("edit", SLEEP + 'env = { VERSION = "2" }\n')
            (d.units / "old.toml").unlink()
            d.write_unit("new", SLEEP)
            result = d.cli("reload")
            assert result.returncode == 0, result.stderr
            assert result.stdout == "added: new\nremoved: old\nchanged: edit\nunchanged: 1\n"
            assert d.status("same")["pid"] == pids["same"]
            assert d.wait_state("edit", "running")["pid"] != pids["edit"]
            d.wait_state("new", "running")
            assert gone(pids["old"]) and gone(pids["edit"])
            assert [s["name"] for s in d.call("status")["services"]] == ["edit", "new", "same"]

    def test_rejected_prints_every_error_and_changes_nothing(self, tmp_path: Path) -> None:
        """A bad reload: exit 1, each error on stderr, the services keep running untouched."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            pid = d.wait_state("a", "running")["pid"]
            d.write_unit("b", 'command = ["true"]\nrestart = "sometimes"\n')
            d.write_unit("c", 'command = ["true"]\nstop_timeout = "soon"\n')
            d.write_unit("a", SLEEP + 'env = { VERSION = "2" }\n')
            result = d.cli("reload")
            assert result.returncode == 1
            lines = result.stderr.splitlines()
            assert lines[0].startswith("hostvisor: reload rejected")
            assert any("b.toml: restart" in line for line in lines[1:])
            assert any("c.toml: stop_timeout" in line for line in lines[1:])
            assert "Traceback" not in result.stderr
            doc = d.call("status")
            assert [(s["name"], s["pid"]) for s in doc["services"]] == [("a", pid)]


class TestLogs:
    def test_last_n_lines_of_a_service(self, tmp_path: Path) -> None:
        """logs NAME -n N prints exactly the last N lines the service wrote."""
        with daemon(tmp_path, units={"chatty": CHATTY}) as d:
            pid = d.wait_state("chatty", "running")["pid"]
            log = d.state / "logs" / "chatty.log"
            os.kill(pid, signal.SIGUSR1)
            d.wait_for(lambda: "line 00-0039" in log.read_text(), what="40 lines in the log")
            result = d.cli("logs", "chatty", "-n", "3")
            assert result.returncode == 0
            assert [line[:12] for line in result.stdout.splitlines()] == [
                "line 00-0037",
                "line 00-0038",
                "line 00-0039",
            ]
            everything = d.cli("logs", "chatty", "-n", "1000").stdout.splitlines()
            assert everything[0] == f"pid {pid}" and len(everything) == 41
            assert d.cli("logs", "nope").returncode == 4

    def test_follow_across_rotation_and_restart(self, tmp_path: Path) -> None:
        """logs -f keeps following when the file rotates and when the service restarts."""
        unit = CHATTY + '[logs]\nmax_size = "1KiB"\nbackups = 3\n'
        with daemon(tmp_path, units={"chatty": unit}) as d:
            pid = d.wait_state("chatty", "running")["pid"]
            log = d.state / "logs" / "chatty.log"
            d.wait_for(lambda: f"pid {pid}" in log.read_text(), what="the pid line in the log")
            with following(d, "logs", "chatty", "-f", "-n", "5") as f:
                start = f.wait_line(lambda line: line == f"pid {pid}")
                os.kill(pid, signal.SIGUSR1)  # 4000 bytes through a 1 KiB log: rotations
                end = f.wait_line(lambda line: line.startswith("line 00-0039"), after=start)
                assert [line[:12] for line in f.lines[start + 1 : end + 1]] == [
                    f"line 00-{n:04d}" for n in range(40)
                ]
                # Followers get lines as they are read; the file is written (and rotated)
                # by a writer thread a moment later.
                d.wait_for(lambda: (log.parent / "chatty.log.1").exists(), what="a rotation")
                assert d.cli("restart", "chatty").returncode == 0
                pid2 = d.status("chatty")["pid"]
                start = f.wait_line(lambda line: line == f"pid {pid2}", after=end)
                os.kill(pid2, signal.SIGUSR1)
                end = f.wait_line(lambda line: line.startswith("line 00-0039"), after=start)
                assert [line[:12] for line in f.lines[start + 1 : end + 1]] == [
                    f"line 00-{n:04d}" for n in range(40)
                ]
                assert f.interrupt() == 0

    def test_the_daemon_log_without_a_name(self, tmp_path: Path) -> None:
        """logs with no NAME prints the daemon's own log: JSON lines with its events."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            d.wait_state("a", "running")
            d.wait_for(
                lambda: "hostvisor.service.running" in d.cli("logs", "-n", "200").stdout,
                what="the running event in the daemon log",
            )
            result = d.cli("logs", "-n", "200")
            assert result.returncode == 0
            records = [json.loads(line) for line in result.stdout.splitlines()]
            assert any(r.get("event") == "hostvisor.daemon.started" for r in records)
            assert any(
                r.get("event") == "hostvisor.service.running" and r.get("service") == "a"
                for r in records
            )
            assert len(d.cli("logs", "-n", "2").stdout.splitlines()) == 2


class TestEvents:
    def test_events_lists_recent_events(self, tmp_path: Path) -> None:
        """events prints the recent events, one per line, names and services readable."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            d.wait_event("hostvisor.service.running", "a")
            result = d.cli("events")
            assert result.returncode == 0
            assert any(
                "hostvisor.service.running" in line and " a " in line
                for line in result.stdout.splitlines()
            )

    def test_follow_gets_new_events(self, tmp_path: Path) -> None:
        """events -f --json: the recent events, then each new one as it happens, in order."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            d.wait_state("a", "running")
            with following(d, "events", "-f", "--json") as f:
                f.wait_line(lambda line: json.loads(line)["event"] == "hostvisor.daemon.started")
                assert d.cli("stop", "a").returncode == 0

                def stopped(line: str) -> bool:
                    event = json.loads(line)
                    return bool(event["event"] == "hostvisor.service.stopped")

                f.wait_line(stopped)
                seqs = [json.loads(line)["seq"] for line in list(f.lines)]
                assert seqs == sorted(set(seqs))
                assert f.interrupt() == 0


class TestSocketFile:
    def test_folder_0700_and_socket_0600_under_the_real_daemon(self, tmp_path: Path) -> None:
        """The daemon tightens an existing folder of ours to 0700 and creates the socket 0600."""
        with daemon(tmp_path, units={"a": SLEEP}, start=False) as d:
            folder = d.sockdir / "run"
            folder.mkdir(mode=0o755)
            folder.chmod(0o755)
            d.socket = folder / "hv.sock"
            d.client = ControlClient(d.socket)
            d.write_config()
            d.start()
            assert stat.S_ISSOCK(d.socket.lstat().st_mode)
            assert stat.S_IMODE(d.socket.lstat().st_mode) == 0o600
            assert stat.S_IMODE(folder.lstat().st_mode) == 0o700, sorted(os.listdir(folder))
            assert d.cli("status").returncode in (0, 3)

    def test_a_stale_socket_of_a_killed_daemon_is_replaced(self, tmp_path: Path) -> None:
        """SIGKILL leaves the socket file behind; the next daemon replaces it and answers."""
        orphans: list[int] = []
        with daemon(tmp_path, units={"e2e-stale": SLEEP}) as d:
            try:
                orphans.append(d.wait_state("e2e-stale", "running")["pid"])
                assert d.proc is not None
                d.proc.kill()
                d.proc.wait(10)
                before = d.socket.lstat()
                assert stat.S_ISSOCK(before.st_mode)
                dead = d.cli("status")
                assert dead.returncode == 4 and "no daemon at" in dead.stderr
                with d._cond:
                    d.stderr.clear()
                    d.events.clear()
                d.start()
                after = d.socket.lstat()
                # A new file (the inode number itself may be reused): a new change time.
                assert (after.st_ino, after.st_ctime_ns) != (before.st_ino, before.st_ctime_ns)
                assert stat.S_ISSOCK(after.st_mode) and stat.S_IMODE(after.st_mode) == 0o600
                orphans.append(d.wait_state("e2e-stale", "running")["pid"])
                assert d.cli("status").returncode == 0
            finally:
                for pid in orphans:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


class TestVersion:
    def test_python_m_supervisor_version(self) -> None:
        """python -m supervisor --version prints `hostvisor X.Y.Z` and exits 0."""
        result = subprocess.run(
            [PY, "-m", "supervisor", "--version"], capture_output=True, text=True, timeout=30
        )
        assert (result.returncode, result.stdout) == (0, f"hostvisor {__version__}\n")
