"""Soak: does anything accumulate in a long-running daemon? (issue 9, item 4)

One real `hostvisor run`, then, at the same time:
- 10 crash-looping units (exit 1 after 50 ms, backoff 10-50 ms) until 1,000 restarts;
- 20 units with a TCP probe every 50 ms until 10,000 probes;
- 5,000 control calls (`status`, from this process over the socket);
- 200 reloads (one unit's env changes each time, so it is stopped and started).

Printed: the daemon's RSS, descriptors, threads and asyncio tasks after a warm-up and at
the end (both with the crash loops stopped, so the same services are up), and their growth (target: RSS < 10 MiB, descriptors within +-3). Tasks are read
by a thread the wrapper adds to the daemon (``soak_daemon.py``), every 0.5 s.

    .venv/bin/python bench/bench_soak.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.control.client import ControlClient

HERE = Path(__file__).resolve().parent
RESTARTS, PROBES, CALLS, RELOADS = 1_000, 10_000, 5_000, 200


def listener() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock, sock.getsockname()[1]


def accept_forever(sock: socket.socket) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.close()


def write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o644)


def sample(proc: psutil.Process, state: Path) -> dict[str, float]:
    tasks_file = state / "tasks"
    return {
        "rss_mib": proc.memory_info().rss / 2**20,
        "fds": proc.num_fds(),
        "threads": proc.num_threads(),
        "tasks": float(tasks_file.read_text() or "nan") if tasks_file.exists() else float("nan"),
    }


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="hv-soak-"))
    units = root / "units"
    units.mkdir()
    state = root / "state"
    sock_path = Path(tempfile.mkdtemp(prefix="hvs", dir="/tmp")) / "hv.sock"
    write(
        root / "config.toml",
        f'[daemon]\nstate_dir = "{state}"\nsocket = "{sock_path}"\nshutdown_timeout = "10s"\n',
    )
    for i in range(10):
        write(
            units / f"crash{i}.toml",
            'command = ["sh", "-c", "sleep 0.05; exit 1"]\nstart_seconds = "0.01s"\n'
            'give_up_after = 0\n[backoff]\ninitial = "0.01s"\nmax = "0.05s"\njitter = 0\n',
        )
    servers = [listener() for _ in range(20)]
    for sock, _ in servers:
        threading.Thread(target=accept_forever, args=(sock,), daemon=True).start()
    for i, (_, port) in enumerate(servers):
        write(
            units / f"probe{i}.toml",
            'command = ["sleep", "3600"]\n'
            f'[health]\ntcp = "127.0.0.1:{port}"\ninterval = "0.05s"\ntimeout = "1s"\n',
        )
    reloaded = units / "reloaded.toml"
    write(reloaded, 'command = ["sleep", "3600"]\nstart_seconds = "0.01s"\nenv = { N = "0" }\n')

    daemon = subprocess.Popen(
        [sys.executable, str(HERE / "soak_daemon.py"), str(root / "config.toml")],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    client = ControlClient(sock_path)
    deadline = time.monotonic() + 30
    while True:
        try:
            doc = client.call("status", {}, timeout=5)
            if all(s["state"] in ("running", "backoff", "starting") for s in doc["services"]):
                break
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the daemon did not come up")
        time.sleep(0.2)
    proc = psutil.Process(daemon.pid)
    crash = [f"crash{i}" for i in range(10)]
    time.sleep(3)  # warm-up: first restarts, probes, imports done
    # Sampled with the crash loops stopped, so that both samples see the same services up.
    client.call("stop", {"services": crash, "wait": True}, timeout=30)
    time.sleep(1)
    start = sample(proc, state)
    client.call("start", {"services": crash, "wait": False}, timeout=30)
    t0 = time.monotonic()

    latencies: list[float] = []
    for n in range(CALLS):
        t = time.perf_counter()
        client.call("status", {}, timeout=10)
        latencies.append(time.perf_counter() - t)
        if n % (CALLS // RELOADS) == 0:
            write(
                reloaded,
                f'command = ["sleep", "3600"]\nstart_seconds = "0.01s"\nenv = {{ N = "{n}" }}\n',
            )
            client.call("reload", {}, timeout=30)

    def restarts() -> int:
        doc = client.call("status", {}, timeout=10)
        return sum(s["restarts"] for s in doc["services"] if s["name"].startswith("crash"))

    while restarts() < RESTARTS or (time.monotonic() - t0) < PROBES * 0.05 / 20:
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    client.call("stop", {"services": crash, "wait": True}, timeout=30)
    time.sleep(1)
    end = sample(proc, state)
    probes = int(20 * elapsed / 0.05)
    daemon.terminate()
    daemon.wait(30)

    print("soak results (one daemon)")
    print(
        f"  load: >= {RESTARTS} restarts, ~{probes} TCP probes, {CALLS} status calls, "
        f"{RELOADS} reloads in {elapsed:.0f} s"
    )
    print(f"  status call latency: median {statistics.median(latencies) * 1e3:.2f} ms")
    for key in ("rss_mib", "fds", "threads", "tasks"):
        print(
            f"  {key:8s} start {start[key]:8.1f}  end {end[key]:8.1f}  "
            f"growth {end[key] - start[key]:+8.1f}"
        )
    verdict = end["rss_mib"] - start["rss_mib"] < 10 and abs(end["fds"] - start["fds"]) <= 3
    print("  verdict:", "flat (RSS < +10 MiB, fds within +-3)" if verdict else "GROWTH")
    print(json.dumps({"start": start, "end": end, "elapsed_s": elapsed}))


if __name__ == "__main__":
    os.environ.pop("HOSTVISOR_SOCKET", None)
    main()
