"""Issue 9, items 7 and 8 through a real `hostvisor run`: logs moved or removed under the
daemon, SIGUSR1, and a full disk reported in `status --json` and as an event."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

from tests.daemon_harness import daemon
from tests.support import tmpfs


def ticker(interval: float, width: int = 10) -> str:
    """A unit printing a numbered line of ``width`` bytes every ``interval`` seconds."""
    code = (
        "import itertools, sys, time\n"
        "for n in itertools.count():\n"
        f"    print(str(n).rjust({width}, 'x'), flush=True); time.sleep({interval})\n"
    )
    return f'command = {json.dumps([sys.executable, "-c", code])}\nstart_seconds = "0.2s"\n'


TICKER = ticker(0.02)


class TestLogsMovedUnderTheDaemon:
    def test_mv_then_sigusr1_writes_to_the_new_file_at_once(self, tmp_path: Path) -> None:
        """logrotate without copytruncate: `mv web.log web.log.1`, then SIGUSR1 (its
        postrotate): the service's next lines go to a new web.log, not the moved file."""
        with daemon(tmp_path, units={"web": TICKER}) as d:
            d.wait_state("web", "running")
            log = d.state / "logs" / "web.log"
            d.wait_for(lambda: log.exists() and log.stat().st_size > 0, what="first lines")
            log.rename(log.with_suffix(".log.1"))
            d.signal(signal.SIGUSR1)
            d.wait_for(
                lambda: log.exists() and log.stat().st_size > 0, timeout=10, what="a new web.log"
            )
            d.wait_stderr("reopened")

    def test_rm_rf_logs_folder_keeps_the_daemon_and_its_logs(self, tmp_path: Path) -> None:
        """`rm -rf <state>/logs` while services log and events flow: the folder comes back
        (0700), service and daemon logs go on, and the daemon lives (0.1 died at rotation)."""
        with daemon(tmp_path, units={"web": TICKER}) as d:
            d.wait_state("web", "running")
            logs = d.state / "logs"
            shutil.rmtree(logs)
            assert d.cli("restart", "web").returncode == 0  # events, daemon log lines
            d.wait_for(lambda: (logs / "web.log").exists(), timeout=10, what="web.log again")

            def daemon_log_back() -> bool:
                # The daemon log checks its path at most once a second while it writes:
                # keep events coming until it has noticed.
                if (logs / "hostvisor.log").exists():
                    return True
                d.call("restart", services=["web"], wait=True)
                return False

            d.wait_for(daemon_log_back, timeout=20, what="hostvisor.log again")
            assert logs.stat().st_mode & 0o777 == 0o700
            assert d.proc is not None and d.proc.poll() is None
            assert d.status("web")["state"] == "running"


class TestDiskFull:
    def test_a_full_disk_is_counted_in_status_and_published(self, tmp_path: Path) -> None:
        """The logs folder on a 256 KiB tmpfs and a chatty service: whole lines are dropped,
        `status --json` counts them in logs_dropped_bytes, hostvisor.logs.dropped is
        published, and the service is never blocked (it stays running)."""
        flood = ticker(0.0005, width=200)
        with (
            tmpfs(tmp_path / "state" / "logs", "256k"),
            daemon(tmp_path, units={"chatty": flood}) as d,
        ):
            d.wait_state("chatty", "running")
            event = d.wait_event("hostvisor.logs.dropped", "chatty", timeout=60)
            assert event["attributes"]["hostvisor.logs.dropped_bytes"] > 0
            d.wait_for(lambda: d.status("chatty")["logs_dropped_bytes"] > 0, timeout=10)
            assert d.status("chatty")["state"] == "running"
