"""Restart or upgrade hostvisor without bouncing a service (issue 10), end to end: a real
``hostvisor run``, ``hostvisor reexec`` as a user runs it, ``kill -9`` of the daemon and a
new ``hostvisor run`` that adopts what the old one left.

Services are tiny programs of tests/programs; the counter writes numbered lines, each in
two writes (so drains hold partial lines), and the tests check that every number is in
the service's log exactly once, in order: nothing lost, nothing doubled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import suppress
from typing import Any

import psutil
import pytest

from supervisor.drivers.process_handle import MARKER, SCOPE
from tests.daemon_harness import DaemonProcess, py_cmd
from tests.support import free_port

SLEEP = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\nstop_timeout = "5s"\n'


def counter(*args: object) -> str:
    return f'command = {py_cmd("takeover_counter", *args)}\nstart_seconds = "0.2s"\n'


def web(port: int) -> str:
    return (
        f"command = {py_cmd('svc_serve', '--port', port)}\nport = {port}\n"
        f'[health]\nhttp = "http://127.0.0.1:{port}/health"\ninterval = "0.2s"\n'
    )


def numbers(d: DaemonProcess, name: str) -> list[int]:
    path = d.state / "logs" / f"{name}.log"
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith("n ")]


def assert_each_once(found: list[int], count: int) -> None:
    assert found == list(range(count)), f"{len(found)} lines; first gap near {_gap(found)}"


def _gap(found: list[int]) -> int:
    return next((i for i, n in enumerate(found) if n != i), len(found))


def instances(d: DaemonProcess, name: str) -> list[int]:
    """Live session leaders anywhere carrying this daemon's marker for ``name``."""
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error, OSError):
            env = proc.environ()
            if (
                env.get(MARKER) == name
                and env.get(SCOPE) == str(d.state)
                and os.getsid(proc.pid) == proc.pid
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc.pid)
    return found


def recorded(d: DaemonProcess, name: str) -> int | None:
    """The pid the state file names for ``name``'s instance, if any."""
    try:
        doc: dict[str, Any] = json.loads((d.state / "state.json").read_text())
    except (OSError, ValueError):
        return None
    inst = doc["services"].get(name, {}).get("instance")
    return int(inst["pid"]) if inst else None


def kill9(d: DaemonProcess) -> None:
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait(10)


def restart_daemon(d: DaemonProcess) -> None:
    """A new ``hostvisor run`` on the same config (its events numbered afresh)."""
    d.events = []
    d.stderr = []
    d.start()


class TestReexec:
    def test_pids_uptimes_lines_and_probes_survive(self, d: DaemonProcess) -> None:
        """reexec: same daemon pid, same service pids, uptimes go on, no start or stop,
        health stays healthy with no new verdict, and every line is logged exactly once."""
        port = free_port()
        d.write_unit("count", counter("--every", "0.002", "--code", 7))
        d.write_unit("web", web(port))
        d.write_unit("idle", SLEEP)
        d.start()
        d.wait_for(lambda: d.status("web")["health"] == "healthy", what="web healthy")
        d.wait_state("count", "running")
        d.wait_state("idle", "running")
        before = {s["name"]: s for s in d.call("status")["services"]}
        seq = d.last_seq()
        result = d.cli("reexec")
        assert result.returncode == 0, result.stderr
        doc = d.call("status")
        assert doc["daemon"]["pid"] == d.proc.pid  # type: ignore[union-attr]
        after = {s["name"]: s for s in doc["services"]}
        for name, entry in before.items():
            assert after[name]["pid"] == entry["pid"], name
            assert after[name]["restarts"] == entry["restarts"], name
            assert after[name]["state"] == "running", name
            assert after[name]["uptime_seconds"] >= entry["uptime_seconds"], name
            assert after[name]["adopted"] is False, name
        assert after["web"]["health"] == "healthy"
        new = [e for e in d.daemon_log() if e.get("seq", 0) > seq]
        names = {e.get("event") for e in new}
        assert not names & {"hostvisor.service.starting", "hostvisor.service.stopped"}
        assert "hostvisor.health.changed" not in names
        # Still our children: the exit status is exact, not "unknown".
        os.kill(before["count"]["pid"], signal.SIGUSR2)
        d.wait_for(
            lambda: d.status("count")["last_exit"] == {"code": 7, "signal": None},
            what="count's exit code 7",
        )
        found = numbers(d, "count")
        assert len(found) > 100
        assert_each_once(found, len(found))

    def test_a_bad_unit_refuses_reexec_and_changes_nothing(self, d: DaemonProcess) -> None:
        """The installed code checks the config first: exit 1, the file and key named,
        the daemon and its services untouched."""
        d.write_unit("idle", SLEEP)
        d.start()
        pid = d.wait_state("idle", "running")["pid"]
        d.write_unit("broken", "command = 5\n")
        result = d.cli("reexec")
        assert result.returncode == 1
        assert "broken.toml" in result.stderr and "command" in result.stderr
        assert "Traceback" not in result.stderr
        assert d.status("idle")["pid"] == pid
        assert d.call("status")["daemon"]["pid"] == d.proc.pid  # type: ignore[union-attr]

    def test_a_unit_changed_before_reexec_restarts_once(self, d: DaemonProcess) -> None:
        """The new code reads the config as a reload would: a changed unit restarts once,
        gracefully; the others keep their pids."""
        d.write_unit("idle", SLEEP)
        d.write_unit("other", SLEEP)
        d.start()
        idle = d.wait_state("idle", "running")["pid"]
        other = d.wait_state("other", "running")["pid"]
        d.write_unit("other", SLEEP + 'env = { CHANGED = "1" }\n')
        assert d.cli("reexec").returncode == 0
        d.wait_for(
            lambda: (s := d.status("other"))["state"] == "running" and s["pid"] != other,
            what="other restarted",
        )
        assert d.status("other")["restarts"] == 1
        assert d.status("idle")["pid"] == idle
        assert instances(d, "other") == [d.status("other")["pid"]]

    def test_reexec_over_the_socket_answers_once_the_new_code_runs(self, d: DaemonProcess) -> None:
        """The control method: ``{}`` from the new code, on the connection that asked."""
        d.write_unit("idle", SLEEP)
        d.start()
        d.wait_state("idle", "running")
        assert d.client.call("reexec", {}, timeout=120) == {}
        lines = [e.get("message", "") for e in d.daemon_log()]
        assert any("re-exec done" in m for m in lines)


class TestAdoption:
    def test_kill9_then_run_adopts_with_no_duplicate_and_no_lost_line(
        self, d: DaemonProcess
    ) -> None:
        """Lines written while no daemon ran are kept by the fd keeper and logged by the
        next daemon; the process is adopted (same pid), never duplicated; its exit is
        seen at once, with an unknown status, and it is restarted."""
        d.write_unit("count", counter("--count", 300))
        d.write_unit("idle", SLEEP)
        d.start()
        pid = d.wait_state("count", "running")["pid"]
        idle = d.wait_state("idle", "running")["pid"]
        d.wait_for(lambda: recorded(d, "count") == pid, what="the state file")
        os.kill(pid, signal.SIGUSR1)
        d.wait_for(lambda: len(numbers(d, "count")) == 300, what="300 lines")
        kill9(d)
        os.kill(pid, signal.SIGUSR1)  # written while no daemon runs: into the kept pipe
        assert psutil.pid_exists(pid)
        restart_daemon(d)
        d.wait_event("hostvisor.service.adopted", "count")
        entry = d.status("count")
        assert (entry["pid"], entry["adopted"], entry["state"]) == (pid, True, "running")
        assert d.status("idle")["pid"] == idle
        d.wait_for(lambda: len(numbers(d, "count")) >= 600, what="600 lines")
        assert_each_once(numbers(d, "count"), 600)
        assert instances(d, "count") == [pid]
        assert instances(d, "idle") == [idle]
        os.kill(pid, signal.SIGKILL)
        exited = d.wait_event("hostvisor.service.exited", "count")
        assert "unknown" in exited["message"]
        d.wait_for(
            lambda: (s := d.status("count"))["state"] == "running" and s["pid"] != pid,
            what="count restarted",
        )
        entry = d.status("count")
        assert entry["adopted"] is False
        assert entry["last_exit"] == {"code": None, "signal": None, "unknown": True}
        assert "unknown" in d.cli("status", "count").stdout

    def test_a_daemon_killed_mid_start_up_leaves_every_spawned_pipe_with_the_keeper(
        self, d: DaemonProcess
    ) -> None:
        """kill -9 while the daemon is still spawning 300 services: the read ends of every
        child spawned so far are held by the fd keeper, so none dies of EPIPE on its next
        write. (A batch of keeper registrations sent after the whole start-up pass left
        them all with the daemon alone.) At most one spawn can be caught between its
        ``Popen`` and its ``put``, with no await between them."""
        for i in range(300):
            d.write_unit(f"s{i:03d}", 'command = ["sleep", "600"]\nstart_seconds = "0s"\n')
        d.start(wait=False)
        assert d.proc is not None
        daemon = psutil.Process(d.proc.pid)

        def spawned() -> list[psutil.Process]:
            return [c for c in daemon.children() if c.name() == "sleep"]

        deadline = time.monotonic() + 30  # polled: the daemon prints nothing while spawning
        while len(children := spawned()) < 40:
            assert time.monotonic() < deadline, "40 services spawned"
        keepers = [c for c in daemon.children() if "fdkeeper.py" in " ".join(c.cmdline())]
        kill9(d)
        try:
            assert len(keepers) == 1, keepers
            fds = f"/proc/{keepers[0].pid}/fd"
            held = {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)}
            unheld = [c.pid for c in children if os.readlink(f"/proc/{c.pid}/fd/1") not in held]
            assert len(unheld) <= 1, f"{len(unheld)} of {len(children)} children's pipes unheld"
        finally:
            restart_daemon(d)  # adopts or starts them all; the fixture stops it
            d.wait_for(
                lambda: all(d.status(c)["state"] == "running" for c in ("s000", "s299")),
                what="all adopted or started",
            )

    def test_a_reused_pid_is_never_signalled(self, d: DaemonProcess) -> None:
        """The state file names a pid that now belongs to another process (its start time
        differs): that process is left alone and the service starts afresh."""
        stranger = subprocess.Popen(["sleep", "600"])
        try:
            d.write_unit("idle", SLEEP)
            d.state.mkdir(parents=True, exist_ok=True)
            created = psutil.Process(stranger.pid).create_time()
            record = {
                "kind": "process", "digest": "x", "state": "running", "health": "none",
                "instance": {
                    "pid": stranger.pid, "pgid": stranger.pid, "create_time": created - 100,
                    "started_wall": time.time() - 100,
                },
            }  # fmt: skip
            doc = {"format": 1, "pid": 1, "services": {"idle": record}}
            (d.state / "state.json").write_text(json.dumps(doc))
            d.start()
            entry = d.wait_state("idle", "running")
            assert entry["pid"] != stranger.pid and entry["adopted"] is False
            d.stop()
            assert stranger.poll() is None, "the stranger was signalled"
        finally:
            stranger.kill()
            stranger.wait()

    @pytest.mark.parametrize(
        ("content", "says"),
        [
            (b'{"format": 1, "pid": 12, "serv', "corrupt or truncated"),
            (b'{"format": 99, "pid": 12, "services": {}}', "reads format 1 at most"),
            (b"\xff\xfe garbage", "corrupt or truncated"),
        ],
    )
    def test_an_unusable_state_file_leaves_the_orphans_to_the_policy(
        self, d: DaemonProcess, content: bytes, says: str
    ) -> None:
        """A corrupt, truncated or newer state file: one clear line, and the process our
        marker finds is adopted (``orphans = "adopt"``, the default): still one instance."""
        d.write_unit("idle", SLEEP)
        d.start()
        pid = d.wait_state("idle", "running")["pid"]
        kill9(d)
        (d.state / "state.json").write_bytes(content)
        restart_daemon(d)
        d.wait_event("hostvisor.service.adopted", "idle")
        assert d.status("idle")["pid"] == pid
        assert any(says in line and "state.json" in line for line in d.stderr)
        assert not any("Traceback" in line for line in d.stderr)
        assert instances(d, "idle") == [pid]

    def test_orphans_stop_stops_what_the_state_file_does_not_name(self, d: DaemonProcess) -> None:
        """``orphans = "stop"``: with the state file lost, the old process is stopped before
        a new one starts; never two at once."""
        d.write_config('orphans = "stop"')
        d.write_unit("idle", SLEEP)
        d.start()
        pid = d.wait_state("idle", "running")["pid"]
        kill9(d)
        (d.state / "state.json").unlink()
        restart_daemon(d)
        entry = d.wait_state("idle", "running")
        assert entry["pid"] != pid and entry["adopted"] is False
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert instances(d, "idle") == [entry["pid"]]

    def test_units_changed_or_removed_while_no_daemon_ran(self, d: DaemonProcess) -> None:
        """A changed unit's process is adopted, then restarted once, gracefully; a removed
        unit's process is stopped; an unchanged one is simply adopted."""
        for name in ("same", "changed", "removed"):
            d.write_unit(name, SLEEP)
        d.start()
        pids = {n: d.wait_state(n, "running")["pid"] for n in ("same", "changed", "removed")}
        d.wait_for(lambda: recorded(d, "removed") == pids["removed"], what="the state file")
        kill9(d)
        d.write_unit("changed", SLEEP + 'env = { CHANGED = "1" }\n')
        (d.units / "removed.toml").unlink()
        restart_daemon(d)
        d.wait_for(
            lambda: (
                (s := d.status("changed"))["state"] == "running" and s["pid"] != pids["changed"]
            ),
            what="changed restarted",
        )
        assert d.status("same")["pid"] == pids["same"]
        assert d.status("same")["adopted"] is True
        assert not psutil.pid_exists(pids["removed"]) or (
            psutil.Process(pids["removed"]).status() == "zombie"
        )
        assert instances(d, "changed") == [d.status("changed")["pid"]]


def record_of(d: DaemonProcess, name: str) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((d.state / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    found: dict[str, Any] = doc["services"].get(name, {})
    return found


class TestStateFileWriter:
    def test_a_change_reaches_the_state_file_before_the_full_snapshot(
        self, d: DaemonProcess
    ) -> None:
        """The writer snapshots only the services that changed: a restart of one and a
        stop of another reach state.json within 3 s (the full snapshot of all is every
        5 s), and the service nobody touched keeps its record as it was."""
        for name in ("a", "b", "calm"):
            d.write_unit(name, SLEEP)
        d.start()
        for name in ("a", "b", "calm"):
            d.wait_state(name, "running")
        d.wait_for(
            lambda: all(record_of(d, n).get("state") == "running" for n in ("a", "b", "calm")),
            what="all recorded running",
        )
        calm = record_of(d, "calm")
        old = recorded(d, "a")
        assert old is not None
        os.kill(old, signal.SIGKILL)
        d.wait_for(
            lambda: recorded(d, "a") not in (None, old), timeout=3, what="a's new pid recorded"
        )
        d.call("stop", services=["b"], wait=False)
        d.wait_for(
            lambda: (
                record_of(d, "b").get("state") == "stopped"
                and record_of(d, "b").get("instance") is None
            ),
            timeout=3,
            what="b recorded stopped",
        )
        assert record_of(d, "calm") == calm
