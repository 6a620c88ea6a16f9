"""Review of issue 12 (``hostvisor signal``): what a signal leaves behind for ``stop``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.daemon_harness import PY, daemon

#: Says "up" and, on SIGTERM, "graceful" before exiting 0.
GRACEFUL = (
    "import signal, sys, time\n"
    "def bye(signum, frame):\n"
    "    print('graceful', flush=True)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "print('up', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


def test_stop_after_sigstop_is_graceful(tmp_path: Path) -> None:
    """A service frozen with ``hostvisor signal NAME STOP`` still stops cleanly: the
    stop signal is followed by SIGCONT (systemd.kill(5): "systemd will always send
    SIGCONT, to ensure that even suspended tasks can be terminated cleanly"), so its
    SIGTERM handler runs instead of a SIGKILL at the end of stop_timeout."""
    unit = (
        f"command = {json.dumps([PY, '-u', '-c', GRACEFUL])}\n"
        'start_seconds = "0.2s"\nstop_timeout = "8s"\n'
    )
    with daemon(tmp_path, units={"frozen": unit}) as d:
        d.wait_state("frozen", "running")
        done = d.cli("signal", "frozen", "STOP")
        assert done.returncode == 0, done.stderr
        assert d.cli("stop", "frozen").returncode == 0
        entry = d.wait_state("frozen", "stopped")
        assert entry["last_exit"] == {"code": 0, "signal": None}, entry["last_exit"]
        log = (d.state / "logs" / "frozen.log").read_text()
        assert "graceful" in log


def test_group_reaches_members_left_after_the_main_process_exited(tmp_path: Path) -> None:
    """The main process exited, a member that ignores SIGTERM lingers in the group (the
    sweep waits stop_timeout for it): ``signal NAME KILL --group`` reaches it, so the
    service need not wait the whole stop_timeout."""
    script = "trap '' TERM; (trap '' TERM; exec sleep 1000) & exit 0"
    unit = f'command = ["bash", "-c", "{script}"]\nrestart = "no"\nstop_timeout = "60s"\n'
    with daemon(tmp_path, units={"linger": unit}) as d:
        d.wait_state("linger", "stopping")
        done = d.cli("signal", "linger", "KILL", "--group")
        assert done.returncode == 0, done.stderr
        d.wait_for(lambda: d.status("linger")["state"] != "stopping", 15, "the group gone")
