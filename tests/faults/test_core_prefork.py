"""Issue 9, item 3 with a real pre-fork server: a FastAPI app under `uvicorn --workers 2`
whose master is SIGKILLed must not look healthy because its orphaned workers still hold the
port. The master's exit is the service's exit: the workers are stopped and it restarts."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.daemon_harness import PROGRAMS, daemon
from tests.support import free_port

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class TestPreforkServer:
    def test_sigkill_of_the_uvicorn_master_restarts_the_service(self, tmp_path: Path) -> None:
        """0.1 showed the dead master as running/healthy with 0 restarts while its workers
        went on serving; now: exited by SIGKILL, workers stopped, a new master healthy."""
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "core_fastapi_app:app",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--app-dir",
            str(PROGRAMS),
        ]
        unit = (
            f'command = {json.dumps(argv)}\nport = {port}\nrestart = "always"\n'
            'stop_timeout = "5s"\n'
            f'[health]\nhttp = "http://127.0.0.1:{port}/health"\ninterval = "1s"\n'
            'timeout = "2s"\nfailure_threshold = 15\n'
            '[backoff]\ninitial = "0.2s"\nmax = "1s"\n'
        )
        with daemon(tmp_path, units={"api": unit}) as d:
            d.wait_for(
                lambda: d.status("api")["health"] == "healthy", timeout=60, what="api healthy"
            )
            master = d.status("api")["pid"]
            d.wait_for(
                lambda: len(psutil.Process(master).children()) >= 2, timeout=30, what="2 workers"
            )
            workers = [p.pid for p in psutil.Process(master).children()]
            seq = d.last_seq()
            os.kill(master, signal.SIGKILL)
            exited = d.wait_event("hostvisor.service.exited", "api", after=seq, timeout=20)
            assert exited["attributes"]["process.pid"] == master
            assert exited["attributes"]["hostvisor.exit.signal"] == signal.SIGKILL
            d.wait_for(lambda: all(gone(w) for w in workers), timeout=20, what="workers gone")

            def fresh_and_healthy() -> bool:
                entry = d.status("api")
                return entry["pid"] not in (None, master) and entry["health"] == "healthy"

            d.wait_for(fresh_and_healthy, timeout=60, what="a new master, healthy")
            entry = d.status("api")
            assert entry["restarts"] >= 1 and entry["state"] == "running"
            assert entry["last_exit"] == {"code": None, "signal": signal.SIGKILL}
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                assert json.load(r)["master"] == entry["pid"]
