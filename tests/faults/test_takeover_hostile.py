"""Hostile review of issue 10 (re-exec and adoption): what a hostile user or host does to
``hostvisor reexec``, the state file and the take-over at start, through a real daemon.

Each class names the fault it reproduced (each test failed before its fix).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from supervisor.statefile import StateFileError, read_state
from tests.daemon_harness import DaemonProcess, py_cmd
from tests.test_takeover import SLEEP, counter, numbers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pidfds and /proc")


def start_reexec(d: DaemonProcess) -> subprocess.Popen[str]:
    """``hostvisor reexec`` in the background, its output captured."""
    return subprocess.Popen(
        [*REEXEC, "-c", str(d.config_path), "--socket", str(d.socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=d.env(),
    )


def _record(**fields: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "kind": "process",
        "digest": "x",
        "state": "stopped",
        "health": "none",
    }
    rec.update(fields)
    return rec


def _write(path: Path, services: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "pid": 1, "services": services}))


WRONG_TYPES = {
    "last_exit a list": {"last_exit": [1]},
    "last_exit code a string": {"last_exit": {"code": "1"}},
    "known a number": {"known": 5},
    "known not pairs": {"known": [[1]]},
    "known pid a string": {"known": [["a", 1.0]]},
    "want_up a string": {"want_up": "no"},
    "instance pid 0": {"instance": {"pid": 0, "pgid": 0, "create_time": 1.0, "started_wall": 1}},
    "instance counters strings": {
        "instance": {"pid": 5, "pgid": 5, "create_time": 1.0, "started_wall": 1, "successes": "x"}
    },
    "instance fds a string": {
        "instance": {"pid": 5, "pgid": 5, "create_time": 1.0, "started_wall": 1, "fds": "12"}
    },
}


class TestHostileStateFile:
    """Fault: a state file of the right format but wrong field types (``last_exit`` a list,
    ``known`` not pairs) crashed the daemon at start (exit 70) instead of being refused;
    a huge ``retry_in`` kept a service in backoff for ever."""

    @pytest.mark.parametrize("fields", WRONG_TYPES.values(), ids=list(WRONG_TYPES))
    def test_a_field_of_the_wrong_type_is_refused_with_the_file(
        self, tmp_path: Path, fields: dict[str, object]
    ) -> None:
        """Every field is checked when the file is read: StateFileError, naming the file."""
        path = tmp_path / "state.json"
        _write(path, {"idle": _record(**fields)})
        with pytest.raises(StateFileError, match=r"state\.json"):
            read_state(path)

    def test_wrong_reexec_record_types_are_refused(self, tmp_path: Path) -> None:
        """A re-exec record with a descriptor that is not a number is refused."""
        path = tmp_path / "state.json"
        doc = {"format": 1, "pid": 1, "services": {}, "reexec": {"lock_fd": "5", "listener_fd": 6}}
        path.write_text(json.dumps(doc))
        with pytest.raises(StateFileError):
            read_state(path)

    def test_a_malformed_record_does_not_stop_the_daemon_from_starting(
        self, d: DaemonProcess
    ) -> None:
        """Before: AttributeError at take-over, exit 70, no service started. Now the file is
        refused with a clear line and the service starts."""
        d.write_unit("idle", SLEEP)
        _write(d.state / "state.json", {"idle": _record(last_exit=[1], known=5)})
        d.start()
        d.wait_state("idle", "running")
        d.wait_stderr("malformed state file")

    def test_a_huge_retry_in_is_capped_at_the_units_longest_delay(self, d: DaemonProcess) -> None:
        """A recorded backoff delay longer than the unit's backoff max waits the max."""
        d.write_unit("idle", SLEEP + '[backoff]\ninitial = "0.1s"\nmax = "0.5s"\n')
        _write(d.state / "state.json", {"idle": _record(state="backoff", retry_in=1e300)})
        d.start()
        d.wait_state("idle", "running", timeout=10)


class TestReexecKeepsEveryLine:
    """Fault: a log write in flight in a worker thread when ``reexec`` quiesced the drains
    was abandoned (``abandon_on_cancel``), then ``execve`` ended the thread: whole lines
    were lost, counted nowhere (about one per two re-execs with a chatty service)."""

    def test_ten_reexecs_of_a_chatty_service_lose_no_line(self, d: DaemonProcess) -> None:
        """A line every millisecond, ten re-execs: every number once, in order."""
        d.write_unit("count", counter("--every", "0.001", "--code", 7) + 'restart = "no"\n')
        d.start()
        pid = d.wait_state("count", "running")["pid"]
        for _ in range(10):
            result = d.cli("reexec")
            assert result.returncode == 0, result.stderr
        assert d.status("count")["pid"] == pid
        os.kill(pid, signal.SIGUSR2)
        d.wait_for(lambda: d.status("count")["last_exit"] == {"code": 7, "signal": None})

        def complete() -> bool:
            found = numbers(d, "count")
            return bool(found) and found == list(range(found[-1] + 1))

        d.wait_for(complete, timeout=5, what="every line once, in order")
        assert len(numbers(d, "count")) > 1000


REEXEC = (sys.executable, "-m", "supervisor", "reexec")
STUBBORN = f'command = {py_cmd("proc_stubborn")}\nstart_seconds = "0.2s"\nstop_timeout = "3s"\n'


def reexec_during_a_slow_stop(d: DaemonProcess) -> tuple[int, subprocess.Popen[str]]:
    """Units ``slow`` (a 3 s stop) and ``idle``; ``slow`` stopping, then ``hostvisor
    reexec`` in the background, its quiesce waiting for that stop. Returns idle's pid
    and the reexec process."""
    d.write_unit("slow", STUBBORN)
    d.write_unit("idle", SLEEP)
    d.start()
    d.wait_state("slow", "running")
    idle = int(d.wait_state("idle", "running")["pid"])
    assert d.cli("stop", "--no-wait", "slow").returncode == 0
    d.wait_state("slow", "stopping")
    reexec = start_reexec(d)
    d.wait_stderr("re-executing", timeout=60)
    return idle, reexec


class TestStopDuringReexec:
    """Fault: SIGTERM during a re-exec (``systemctl stop`` while ``reexec`` waited for a
    slow stop) was swallowed: the daemon re-executed and never stopped."""

    def test_sigterm_while_reexec_quiesces_stops_the_daemon(self, d: DaemonProcess) -> None:
        """The re-exec gives way to the stop: the daemon stops every service and exits 0;
        the client is told the re-exec did not happen."""
        idle, reexec = reexec_during_a_slow_stop(d)
        try:
            d.signal(signal.SIGTERM)
            assert d.proc is not None
            assert d.proc.wait(30) == 0
            _, err = reexec.communicate(timeout=30)
        finally:
            if reexec.poll() is None:
                reexec.kill()
        assert reexec.returncode != 0
        assert "stop" in err
        assert not psutil.pid_exists(idle) or psutil.Process(idle).status() == "zombie"


class TestCommandsDuringReexec:
    """Fault: a second ``reexec`` (or a ``restart``, a ``reload``) sent while one was under
    way waited for it, was cut off by the ``exec`` and told that the daemon had died
    ("run `hostvisor run` to adopt them") although it ran on."""

    def test_a_second_reexec_and_commands_are_refused_at_once(self, d: DaemonProcess) -> None:
        """Exit 1 and a line saying a reexec is under way; the first one succeeds."""
        idle, first = reexec_during_a_slow_stop(d)
        try:
            for args in (("reexec",), ("restart", "idle"), ("reload",)):
                result = d.cli(*args, timeout=30)
                assert result.returncode == 1, (args, result.stderr)
                assert "reexec is under way" in result.stderr, args
            _, err = first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
        assert first.returncode == 0, err
        assert d.status("idle")["pid"] == idle


class TestBrokenUpgrade:
    """Fault: when the installed code could not start (an import error after an upgrade),
    the refusal was sent with JSON-RPC code -32000, which the client reads as "the daemon
    is going away": ``hostvisor reexec`` said the daemon did not answer after
    re-executing and to run ``hostvisor run``, though the old daemon ran on untouched."""

    def test_a_broken_install_is_reported_as_a_refusal(self, tmp_path: Path) -> None:
        """A ``supervisor`` package that fails to import appears on the daemon's
        PYTHONPATH after it started (an upgrade gone wrong): exit 1, the import error
        named, no word of a daemon that died; the services keep their pids."""
        shadow = tmp_path / "site"
        shadow.mkdir()
        d = DaemonProcess(tmp_path, env={"PYTHONPATH": str(shadow)})
        try:
            d.write_unit("idle", SLEEP)
            d.start()
            pid = d.wait_state("idle", "running")["pid"]
            (shadow / "supervisor").mkdir()
            (shadow / "supervisor" / "__init__.py").write_text(
                'raise ImportError("broken upgrade")\n'
            )
            d.extra_env = {}  # the client itself runs the good code
            result = d.cli("reexec", timeout=120)
            (shadow / "supervisor" / "__init__.py").unlink()
            assert result.returncode == 1
            assert "broken upgrade" in result.stderr
            assert "did not answer" not in result.stderr, result.stderr
            assert "cannot start" in result.stderr
            assert d.status("idle")["pid"] == pid
        finally:
            d.cleanup()


def _execed(d: DaemonProcess) -> bool:
    """The re-exec record is written and the daemon has one thread: the new code, before
    it starts any (the old code runs worker threads)."""
    assert d.proc is not None
    try:
        if not json.loads((d.state / "state.json").read_text()).get("reexec"):
            return False
        return psutil.Process(d.proc.pid).num_threads() == 1
    except (OSError, ValueError, psutil.Error):
        return False


class TestStopRightAfterExec:
    """Fault: SIGTERM in the half second after ``execve``, before the new code had its
    signal handlers, killed the daemon outright (default action): every service was
    left running unsupervised (``systemctl stop`` during a re-exec orphaned them); one
    just before ``execve`` was swallowed with the old event loop. (Still open: one that
    a worker thread takes in the last milliseconds before ``execve``.)"""

    def test_sigterm_just_after_exec_is_an_ordered_stop(self, d: DaemonProcess) -> None:
        """The signal waits (blocked across ``execve``) for the new code, which stops
        every service in order and exits 0."""
        d.write_unit("idle", SLEEP)
        d.start()
        idle = d.wait_state("idle", "running")["pid"]
        reexec = subprocess.Popen(
            [*REEXEC, "-c", str(d.config_path), "--socket", str(d.socket)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=d.env(),
        )
        try:
            deadline = time.monotonic() + 60
            while not _execed(d):
                assert time.monotonic() < deadline, "no re-exec"
            d.signal(signal.SIGTERM)
            assert d.proc is not None
            assert d.proc.wait(30) == 0
        finally:
            reexec.kill()
            reexec.wait()
        assert not psutil.pid_exists(idle) or psutil.Process(idle).status() == "zombie"


class TestUnusableHandover:
    def test_the_inherited_lock_is_kept_and_the_other_descriptors_closed(
        self, tmp_path: Path
    ) -> None:
        """The new code finds no usable handover record: it keeps the lock it inherited (a
        second open of the file could not take it; before, the daemon exited "already
        running" with its own pid) and closes the listener and pipes the old code left."""
        import fcntl
        import socket

        state = tmp_path / "state"
        state.mkdir()
        lock = os.open(state / "hostvisor.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "s.sock"))
        listener.listen()
        read, write = os.pipe()
        keep = [lock, listener.fileno(), read]
        for fd in keep:
            os.set_inheritable(fd, True)
        probe = (
            "import os, sys\n"
            "from pathlib import Path\n"
            "from supervisor.rundaemon import _drop_inherited\n"
            f"got = _drop_inherited(Path({str(state)!r}))\n"
            f"open_fds = [fd for fd in {keep!r} if fd != got and os.path.exists(f'/proc/self/fd/{{fd}}')]\n"
            "print(got, open_fds)\n"
        )
        try:
            out = subprocess.run(
                [sys.executable, "-c", probe], pass_fds=keep, capture_output=True, text=True,
                timeout=30, check=True,
            ).stdout.split(maxsplit=1)  # fmt: skip
        finally:
            listener.close()
            for fd in (lock, read, write):
                os.close(fd)
        assert int(out[0]) == lock
        assert out[1].strip() == "[]"


class TestClosedStream:
    """Fault: a service that closed one of its streams (``exec 1>&-``) had that pipe's read
    end closed by its drain at EOF, but its fd number was still recorded and handed over by
    reexec: the new code drained whatever descriptor had that number by then."""

    def test_only_open_pipes_are_handed_over(self, d: DaemonProcess) -> None:
        """After reexec the service's recorded descriptors are its one open pipe, a pipe
        in the daemon; the pid is unchanged."""
        script = "exec 1>&-; echo before >&2; exec sleep 600"
        d.write_unit(
            "half", f'command = ["sh", "-c", {json.dumps(script)}]\nstart_seconds = "0.2s"\n'
        )
        d.start()
        pid = d.wait_state("half", "running")["pid"]
        log = d.state / "logs" / "half.log"
        d.wait_for(lambda: log.exists() and "before" in log.read_text(), what="stderr logged")
        result = d.cli("reexec")
        assert result.returncode == 0, result.stderr
        assert d.status("half")["pid"] == pid
        assert d.proc is not None
        fds = recorded_fds(d, "half")
        assert len(fds) == 1, fds
        assert os.readlink(f"/proc/{d.proc.pid}/fd/{fds[0]}").startswith("pipe:")


def recorded_fds(d: DaemonProcess, name: str) -> list[int]:
    doc = json.loads((d.state / "state.json").read_text())
    return [int(fd) for fd in doc["services"][name]["instance"]["fds"]]
