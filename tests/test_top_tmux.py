"""``hostvisor top`` as a person uses it (issue 12): the venv's ``hostvisor`` console script
in a real terminal (a detached tmux session, 160x40), keys sent with ``send-keys``, the
screen read back with ``capture-pane -p``.

tmux runs on a private server socket in the test's folder, killed in a ``finally``; the
test is skipped when tmux is not installed. Waits poll the screen under a deadline
(there is no event to wait on for what a terminal shows).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess, daemon
from tests.test_top import TICKER, unit

HOSTVISOR = Path(sys.executable).with_name("hostvisor")


class Tmux:
    """A private tmux server with one session, ``top``."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hvtmux", dir="/tmp"))
        self.socket = self.dir / "tmux.sock"
        self.env = {**env, "LANG": "C.UTF-8"}
        self.env.pop("NO_COLOR", None)
        self.env.pop("TMUX", None)

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-u", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
            check=True,
        )
        return done.stdout

    def start(self, command: list[str]) -> None:
        """Run ``command`` in the pane through sh, which then prints ``top exited N`` and
        waits for Enter (tmux 3.3 does not always reap a pane's process, so
        #{pane_dead_status} may stay empty, and may drop a dying pane's last output)."""
        line = f'{shlex.join(command)}; echo "top exited $?"; read _'
        self.run("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", line)
        self.run("set-option", "-t", "top", "remain-on-exit", "on")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def dead(self) -> bool:
        """Whether the pane's process (the shell around ``top``) has ended."""
        return self.run("display-message", "-p", "-t", "top", "#{pane_dead}").strip() == "1"

    def wait(self, condition: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
        """Poll the screen until ``condition(text)`` holds; fail with the screen after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if condition(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.1)  # the polling cadence of a screen, not a synchronisation

    def kill(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.socket), "kill-server"],
            capture_output=True,
            env=self.env,
            timeout=30,
            check=False,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


def pid_on_screen(text: str, name: str) -> str | None:
    """The PID cell of ``name``'s row while it is running, else None."""
    match = re.search(rf"^\W*{re.escape(name)}\s+process\s+running\s+\S+\s+(\d+)\s", text, re.M)
    return match.group(1) if match else None


@pytest.fixture
def two(tmp_path: Path) -> Iterator[DaemonProcess]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (the CI installs it: .ci/run)")
    if not HOSTVISOR.exists():
        pytest.skip(f"no hostvisor console script next to {sys.executable} (pip install -e .)")
    with daemon(tmp_path, units={"api": unit(TICKER), "worker": unit(TICKER)}) as d:
        d.wait_state("api", "running")
        d.wait_state("worker", "running")
        yield d


def test_restart_from_top_changes_the_pid_on_screen(two: DaemonProcess) -> None:
    """Select ``worker``, press ``r`` then ``y``: its pid on screen changes, ``api``'s does
    not; ``q`` ends the program with exit status 0 and the pane's process ends."""
    tmux = Tmux(two.env())
    try:
        tmux.start([str(HOSTVISOR), "top", "-c", str(two.config_path), "--socket", str(two.socket)])
        text = tmux.wait(
            lambda t: (
                pid_on_screen(t, "api") is not None and pid_on_screen(t, "worker") is not None
            ),
            "both rows running",
        )
        api, worker = pid_on_screen(text, "api"), pid_on_screen(text, "worker")
        assert worker == str(two.status("worker")["pid"])
        tmux.keys("Down")
        tmux.wait(lambda t: "worker: CPU" in t, "worker selected")
        tmux.keys("r")
        tmux.wait(lambda t: "restart worker? y/n" in t, "the question")
        tmux.keys("y")
        text = tmux.wait(
            lambda t: pid_on_screen(t, "worker") not in (None, worker), "a new pid for worker"
        )
        assert pid_on_screen(text, "api") == api
        assert pid_on_screen(text, "worker") == str(two.status("worker")["pid"])
        tmux.keys("q")
        tmux.wait(lambda t: "top exited" in t, "top to end")
        assert "top exited 0" in tmux.screen()
        tmux.keys("Enter")
        deadline = time.monotonic() + 30
        while not tmux.dead():
            assert time.monotonic() < deadline, f"the pane did not end:\n{tmux.screen()}"
            time.sleep(0.1)  # polling the pane's state
    finally:
        tmux.kill()
