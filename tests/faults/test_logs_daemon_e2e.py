"""The real daemon with a stderr nobody reads (`hostvisor run | less`, less stopped)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from supervisor.control.client import ControlClient

PY = sys.executable


def test_unread_stderr_never_freezes_the_daemon(tmp_path: Path) -> None:
    """A unit restarting every 10 ms floods stderr (a pipe we do not read) with
    events: the control socket keeps answering, and once stderr is read again one line
    says how many lines were dropped. On 0.1 the event loop blocks in print()."""
    sockdir = Path(tempfile.mkdtemp(prefix="hv", dir="/tmp"))
    sock = sockdir / "hv.sock"
    (tmp_path / "units").mkdir()
    (tmp_path / "config.toml").write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nsocket = "{sock}"\n'
        'shutdown_timeout = "10s"\n'
    )
    for n in range(8):
        (tmp_path / "units" / f"flood{n}.toml").write_text(
            'command = ["true"]\nstart_seconds = "0s"\n'
            '[backoff]\ninitial = "10ms"\nmax = "10ms"\nreset_after = "1h"\n'
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTVISOR_")}
    daemon = subprocess.Popen(
        [PY, "-m", "supervisor", "run", "-c", str(tmp_path / "config.toml")],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    client = ControlClient(sock)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():  # start-up: no event to wait on before the socket
            assert daemon.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        restarts: list[int] = []
        # Enough restarts (4 lines each) to push far more than the 64 KiB pipe and the
        # 64 KiB queue of human lines.
        while not restarts or restarts[-1] < 1200:
            assert time.monotonic() < deadline, f"restarts seen: {restarts[-5:]}"
            doc = client.call("status", {}, timeout=5)
            restarts.append(sum(s["restarts"] for s in doc["services"]))
        # The reader comes back: it reads how many lines were dropped.
        assert daemon.stderr is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(map(bytes.decode, daemon.stderr)))
        reader.start()
        notice = "log lines dropped: stderr was not being read"
        while not any(notice in line for line in lines):  # the lines arrive on their own
            assert time.monotonic() < deadline + 30, lines[-5:]
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        reader.join(10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert sum("log lines dropped: stderr was not being read" in line for line in lines) >= 1
