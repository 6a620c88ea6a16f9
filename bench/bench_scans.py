"""Event-loop stall during a port reclaim scan on a host with many sockets (issue 9, item 5).

    .venv/bin/python bench/bench_scans.py                      # 20,000 sockets, 5 scans each way
    .venv/bin/python bench/bench_scans.py --sockets 5000 --scans 10 --baseline main

Two helper processes hold ``--sockets`` listening sockets on 127.0.0.1 between them
(so ``/proc/net/tcp`` has that many lines and ``/proc/<pid>/fd`` that many links to
read), and a third one, without our marker, listens on the port the scans look at.
A 10 ms ticker task runs on the event loop and records how late each tick wakes up;
its lateness is the stall that every other service's probes, restarts and control
calls would see at that moment.

Each way runs ``--scans`` reclaims with ``reclaim_port = "no"`` (scan, kill nothing)
and prints the ticker's lateness (median, p95 and max over the scans) and the median
duration of one reclaim:

- ``baseline``: ``reclaim`` of ``supervisor/ports.py`` at git ref ``--baseline``
  (default ``main``, i.e. 0.1.0 plus whatever main has since), loaded from git;
- ``current``: ``reclaim`` of this worktree's ``supervisor/ports.py``;
- ``idle``: the ticker alone, for the noise floor.

A plain script: prints figures, asserts only that every scan found the holder.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor import ports  # noqa: E402 (after the path insert)
from supervisor.spec import StopSpec  # noqa: E402

TICK = 0.010

HOLDER = """
import resource, socket, sys, time
n = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
socks = []
for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    socks.append(s)
print("ready", flush=True)
time.sleep(3600)
"""

LISTENER = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
time.sleep(3600)
"""


def spawn(code: str, *args: object) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "HOSTVISOR_SERVICE"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    if proc.stdout.readline() != b"ready\n":
        raise SystemExit(f"helper {args} did not start")
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_baseline(ref: str) -> types.ModuleType | None:
    """``supervisor/ports.py`` as of git ``ref``, imported as a module of its own."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{ref}:supervisor/ports.py"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline: git show {ref}:supervisor/ports.py failed ({exc})", file=sys.stderr)
        return None
    with tempfile.NamedTemporaryFile("w", suffix="_ports_baseline.py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("ports_baseline", f.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ports_baseline"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        os.unlink(f.name)
    return module


async def measure(scan: Callable[[], Awaitable[object]], scans: int) -> tuple[list[float], float]:
    """Ticker lateness (seconds) over ``scans`` runs of ``scan``, and the median scan time."""
    lateness: list[float] = []
    durations: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        while not done.is_set():
            due = anyio.current_time() + TICK
            await anyio.sleep(TICK)
            lateness.append(max(0.0, anyio.current_time() - due))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(5 * TICK)  # the ticker is running
        lateness.clear()
        for _ in range(scans):
            begin = time.perf_counter()
            await scan()
            durations.append(time.perf_counter() - begin)
            await anyio.sleep(3 * TICK)
        done.set()
    return lateness, statistics.median(durations) if durations else 0.0


def report(label: str, lateness: list[float], scan_s: float | None) -> None:
    ms = sorted(x * 1000 for x in lateness)
    p95 = ms[int(0.95 * (len(ms) - 1))] if ms else 0.0
    scan = f"   one reclaim {scan_s * 1000:7.1f} ms" if scan_s is not None else ""
    print(
        f"  {label:<9} tick lateness median {statistics.median(ms):6.2f} ms   p95 {p95:6.2f} ms"
        f"   max {ms[-1]:7.2f} ms   ({len(ms)} ticks){scan}"
    )


async def compare(port: int, holder_pid: int, scans: int, baseline_ref: str) -> None:
    """Print the ticker's lateness: idle, during baseline reclaims, during current ones."""
    stop = StopSpec(signal=signal.SIGTERM, timeout=1.0)

    async def run(module: types.ModuleType) -> object:
        result = await module.reclaim(port, policy="no", service="web", known=(), stop=stop)
        assert [h.pid for h in result.blocked] == [holder_pid], result
        return result

    idle, _ = await measure(lambda: anyio.sleep(0.2), scans)
    report("idle", idle, None)
    baseline = load_baseline(baseline_ref)
    if baseline is not None:
        lateness, scan_s = await measure(lambda: run(baseline), scans)
        report("baseline", lateness, scan_s)
    lateness, scan_s = await measure(lambda: run(ports), scans)
    report("current", lateness, scan_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=20_000)
    parser.add_argument("--scans", type=int, default=5)
    parser.add_argument("--baseline", default="main", help="git ref of the baseline ports.py")
    args = parser.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    half = args.sockets // 2
    if half + 64 > hard:
        raise SystemExit(
            f"--sockets {args.sockets}: each helper needs {half + 64} fds, hard={hard}"
        )
    port = free_port()
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        # The listener first: the holders' sockets take ports of the ephemeral range.
        helpers.append(spawn(LISTENER, port))
        helpers += [spawn(HOLDER, half), spawn(HOLDER, args.sockets - half)]
        lines = Path("/proc/net/tcp").read_bytes().count(b"\n") - 1
        print(
            f"port reclaim scan, {lines} lines in /proc/net/tcp, {args.sockets} sockets "
            f"in 2 processes, port {port} held by a foreign listener, reclaim_port = no, "
            f"{args.scans} scans each, 10 ms ticker on the loop:"
        )
        anyio.run(compare, port, helpers[0].pid, args.scans, args.baseline)
    finally:
        for proc in helpers:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


if __name__ == "__main__":
    main()
