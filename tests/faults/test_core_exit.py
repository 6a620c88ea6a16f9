"""Faults of issue 9, items 3 and 4: the main process's exit is the service's exit, and
nothing of an instance outlives it (group members, escapees, drains, descriptors)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil

from tests.daemon_harness import DaemonProcess, daemon, py_cmd


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (exited; a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def logged_pid(d: DaemonProcess, service: str, word: str) -> int:
    """The pid that ``service`` printed after ``word`` in its log (waits for the line)."""
    path = d.state / "logs" / f"{service}.log"
    found: list[int] = []

    def check() -> bool:
        text = path.read_text() if path.exists() else ""
        match = re.search(rf"{word} (\d+)", text)
        if match:
            found.append(int(match.group(1)))
        return bool(found)

    d.wait_for(check, timeout=15, what=f"{word} pid in {path}")
    return found[0]


class TestMainProcessExit:
    def test_leader_exit_with_a_background_child_is_reported_at_once(self, tmp_path: Path) -> None:
        """`sh -c "sleep 600 & sleep 1; exit 3"`: the shell's exit 3 is published as
        `exited` with code 3, the background sleep is stopped, and the policy restarts it
        (0.1 reported it `running` forever: wait() waited for the whole group)."""
        unit = (
            'command = ["sh", "-c", "sleep 600 & echo bg $!; sleep 1; exit 3"]\n'
            'start_seconds = "0.2s"\nrestart = "always"\nstop_timeout = "2s"\n'
        )
        with daemon(tmp_path, units={"bg": unit}) as d:
            first = d.wait_state("bg", "running")
            background = logged_pid(d, "bg", "bg")
            exited = d.wait_event("hostvisor.service.exited", "bg", timeout=10)
            assert exited["attributes"]["process.exit.code"] == 3
            assert exited["attributes"]["process.pid"] == first["pid"]
            d.wait_event("hostvisor.service.backoff", "bg", after=exited["seq"], timeout=10)
            d.wait_for(lambda: gone(background), timeout=10, what="the background sleep to go")
            assert d.status("bg")["last_exit"] == {"code": 3, "signal": None}

    def test_setsid_escapee_is_swept_after_a_natural_exit(self, tmp_path: Path) -> None:
        """A descendant that left the group (setsid) but carries the marker is stopped
        once the main process exits on its own (0.1 left it running)."""
        unit = (
            f"command = {py_cmd('proc_daemonize', 'exit')}\n"
            'start_seconds = "0.2s"\nrestart = "no"\nstop_timeout = "2s"\n'
        )
        with daemon(tmp_path, units={"esc": unit}) as d:
            escapee = logged_pid(d, "esc", "grandchild")
            d.wait_state("esc", "exited", timeout=15)
            d.wait_for(lambda: gone(escapee), timeout=10, what="the escapee to be stopped")


class TestNothingAccumulates:
    def test_restarts_leave_the_daemons_descriptors_flat(self, tmp_path: Path) -> None:
        """300 restarts of crash-looping units (with setsid escapees holding their pipes)
        leave the daemon with the descriptors it had: no pipe, log file, pidfd or drain
        outlives its instance."""
        crash = (
            f"command = {py_cmd('proc_daemonize', 'exit')}\n"
            'start_seconds = "0.01s"\ngive_up_after = 0\nstop_timeout = "1s"\n'
            '[backoff]\ninitial = "0.01s"\nmax = "0.02s"\njitter = 0\n'
        )
        names = ["c0", "c1", "c2"]
        with daemon(tmp_path, units=dict.fromkeys(names, crash)) as d:
            assert d.proc is not None
            d.wait_for(lambda: d.status("c0")["restarts"] >= 2, timeout=30)
            d.call("stop", services=names, wait=True)
            d.wait_for(lambda: not marked_any(names), timeout=15, what="escapees gone")
            before = settled_fds(d)  # the last drains close DRAIN_GRACE after their sweep
            d.call("start", services=names, wait=False)

            def restarted() -> bool:
                doc = d.call("status")
                return sum(s["restarts"] for s in doc["services"]) >= 300

            d.wait_for(restarted, timeout=120, what="300 restarts")
            d.call("stop", services=names, wait=True)
            d.wait_for(lambda: not marked_any(names), timeout=15, what="escapees gone")
            after = settled_fds(d)
            assert abs(after - before) <= 2, (before, after)


def settled_fds(d: DaemonProcess) -> int:
    """The daemon's descriptor count once three readings in a row (0.5 s apart while no
    event comes) agree: drains cut off after a sweep close a moment later."""
    seen: list[int] = []

    def same() -> bool:
        assert d.proc is not None
        seen.append(len(os.listdir(f"/proc/{d.proc.pid}/fd")))
        return len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]

    d.wait_for(same, timeout=20, what="the daemon's descriptors to settle")
    return seen[-1]


def marked_any(names: list[str]) -> bool:
    """True while a process marked as one of ``names`` runs anywhere."""
    from tests.support import marked

    return any(marked(name, anywhere=True) for name in names)


class TestUnmarkedOrphans:
    def test_an_unmarked_escapee_does_not_outlive_the_daemon(self, tmp_path: Path) -> None:
        """`env -i setsid sleep 603 &`: no marker to match it to its unit, but it was
        reparented to the daemon (the subreaper); SIGTERM to the daemon stops it too, as
        systemd stops a unit's whole control group (0.1 left it running under init)."""
        unit = (
            'command = ["sh", "-c", "env -i setsid sleep 603 & echo bg $!; sleep 1; exit 0"]\n'
            'restart = "no"\nstart_seconds = "0.2s"\n'
        )
        with daemon(tmp_path, units={"esc": unit}) as d:
            escapee = logged_pid(d, "esc", "bg")
            d.wait_state("esc", "exited", timeout=15)
            assert not gone(escapee)  # nothing can tell whose it is while we run
            assert d.stop() == 0
            d.wait_for(lambda: gone(escapee), timeout=10, what="the orphan stopped")
