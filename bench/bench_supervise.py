"""Supervision benchmarks of issue 2. A plain script: prints figures, asserts nothing.

    .venv/bin/python bench/bench_supervise.py restart    # SIGKILL -> replacement exec'd, 50 kills
    .venv/bin/python bench/bench_supervise.py idle       # CPU and RSS over 60 s idle, 200 services
    .venv/bin/python bench/bench_supervise.py startup    # `hostvisor run` -> 200 services running
    .venv/bin/python bench/bench_supervise.py startup --services 200 1000 --runs 3  # + posix_spawn floor
    .venv/bin/python bench/bench_supervise.py startup --services 200 1000 --runs 3 --old /tmp/old
    .venv/bin/python bench/bench_supervise.py logs       # 200 MiB of 64-byte lines into the log
    .venv/bin/python bench/bench_supervise.py all

Machines here are shared and noisy: quote medians, and compare against a baseline
measured in the same run (printed next to each figure where one exists).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from restart_harness import restart_latencies  # noqa: E402

from supervisor import config  # noqa: E402
from supervisor.control.client import ControlClient  # noqa: E402
from supervisor.drivers.process import ProcessDriver  # noqa: E402
from supervisor.spec import LogSpec, ProcessSpec, ServiceSpec  # noqa: E402

SLEEP = shutil.which("sleep") or "/bin/sleep"
RUNNING_EVENT = "hostvisor.service.running"


def write_config(root: Path, units: dict[str, str], *, extra: str = "") -> Path:
    (root / "units").mkdir(parents=True, exist_ok=True)
    cfg = root / "config.toml"
    sock = Path(tempfile.mkdtemp(prefix="hvb", dir="/tmp")) / "hv.sock"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{root / "state"}"\nsocket = "{sock}"\n'
        f'shutdown_timeout = "10s"\nlog_level = "warning"\n{extra}\n'
    )
    cfg.chmod(0o644)
    for name, text in units.items():
        path = root / "units" / f"{name}.toml"
        path.write_text(text)
        path.chmod(0o644)
    return cfg


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- restart latency


async def _restart(n: int) -> list[float]:
    root = Path(tempfile.mkdtemp(prefix="hv-bench-restart-"))
    unit = f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0s"\n[backoff]\ninitial = "0s"\n'
    cfg = write_config(root, {f"s{i:03d}": unit for i in range(n)})
    latencies = await restart_latencies(cfg, n)  # each service killed once
    shutil.rmtree(root, ignore_errors=True)
    return latencies


def bench_restart(n: int = 50) -> None:
    latencies = anyio.run(_restart, n)
    ms = [x * 1000 for x in latencies]
    print(f"restart latency, SIGKILL -> replacement exec'd, {n} services, backoff.initial=0s:")
    print(
        f"  median {statistics.median(ms):.2f} ms   p95 {pct(ms, 0.95):.2f} ms   "
        f"min {min(ms):.2f} ms   max {max(ms):.2f} ms   ({len(ms)} kills)"
    )


# ---------------------------------------------------------------- idle CPU and RSS


class _Listener:
    """A TCP listener in a thread that accepts and closes (the target of 200 probes a second)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()


def _start_daemon(cfg: Path, tree: Path = ROOT) -> tuple[subprocess.Popen[bytes], ControlClient]:
    sock = Path(config.load(cfg).daemon.socket or "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "-c", str(cfg)],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        cwd=tree,
        env=dict(os.environ, PYTHONPATH=str(tree)),
    )
    return proc, ControlClient(sock)


def _wait_all_running(client: ControlClient, n: int, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            doc = client.call("status", {}, timeout=5)
        except Exception:
            time.sleep(0.005)
            continue
        services = doc["services"]
        if len(services) == n and all(s["state"] == "running" for s in services):
            return time.monotonic()
        time.sleep(0.005)
    raise TimeoutError("services did not all reach running")


def _idle(n: int, seconds: float, probe: bool) -> tuple[float, float]:
    root = Path(tempfile.mkdtemp(prefix="hv-bench-idle-"))
    listener = _Listener() if probe else None
    unit = f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0.5s"\n'
    if listener is not None:
        unit += f'[health]\ntcp = "127.0.0.1:{listener.port}"\ninterval = "1s"\ntimeout = "1s"\n'
    cfg = write_config(root, {f"s{i:03d}": unit for i in range(n)})
    proc, client = _start_daemon(cfg)
    try:
        _wait_all_running(client, n, time.monotonic() + 60)
        time.sleep(3)  # let start-up settle before the idle window
        me = psutil.Process(proc.pid)
        before = me.cpu_times()
        t0 = time.monotonic()
        time.sleep(seconds)
        after = me.cpu_times()
        elapsed = time.monotonic() - t0
        rss = me.memory_info().rss / 2**20
        user = (after.user - before.user) / elapsed * 100
        system = (after.system - before.system) / elapsed * 100
        print(f"    (user {user:.3f} %, system {system:.3f} %)")
        return user + system, rss
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(root, ignore_errors=True)


def bench_idle(n: int = 200, seconds: float = 60, which: str = "both") -> None:
    print(f"daemon idle over {seconds:g} s with {n} services (telemetry off, no container units):")
    for probe in {"both": (False, True), "probes": (True,), "none": (False,)}[which]:
        cpu, rss = _idle(n, seconds, probe)
        what = "a 1 s TCP probe each" if probe else "no probes          "
        print(f"  {what}: CPU {cpu:.3f} % of a core   RSS {rss:.1f} MiB")


# ---------------------------------------------------------------- start-up


def _compile(tree: Path) -> None:
    """Byte-compile ``tree``'s package as an install does (``PYTHONDONTWRITEBYTECODE``
    would otherwise make every start compile ~80 modules: ~0.1 s, not ours to count)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(tree / "supervisor")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _wait_running_events(client: ControlClient, n: int, deadline: float) -> float:
    """When the n-th ``service.running`` event arrived (``events`` followed from the
    first: the daemon pushes each one, nobody polls it)."""
    while True:
        try:
            sub = client.stream("events", {"since": 0}, timeout=5)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)
    with sub:
        # A subscriber that falls behind loses events (at 1,000 services on a busy box):
        # no event for 5 s ends the wait instead of hanging.
        sub._connection.sock.settimeout(5)
        running = {e["service"] for e in sub.result["events"] if e["event"] == RUNNING_EVENT}
        if len(running) < n:
            for event in sub:
                if event["event"] == RUNNING_EVENT:
                    running.add(event["service"])
                    if len(running) == n:
                        break
        return time.monotonic()


def _startup_once(n: int, tree: Path, how: str) -> tuple[float, float]:
    """Seconds from ``hostvisor run`` until all n are running (``how``: "status", a
    status poll every 5 ms, or "events", the n-th running event), and until the last
    child was created (after the daemon's own start; /proc times, 10 ms ticks)."""
    root = Path(tempfile.mkdtemp(prefix="hv-bench-startup-"))
    unit = f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0s"\n'
    cfg = write_config(root, {f"s{i:04d}": unit for i in range(n)})
    begin = time.monotonic()
    proc, client = _start_daemon(cfg, tree)
    try:
        wait = _wait_all_running if how == "status" else _wait_running_events
        running = wait(client, n, begin + 120) - begin
        daemon = psutil.Process(proc.pid)
        kids = [c for c in daemon.children() if c.name() == "sleep"]
        # Both from /proc start times, so that the boot-time rounding cancels out.
        spawned = max(c.create_time() for c in kids) - daemon.create_time()
        return running, spawned
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        shutil.rmtree(root, ignore_errors=True)


def bench_startup(n: int = 200, runs: int = 5, old: Path | None = None, how: str = "both") -> None:
    trees = {"new": ROOT} | ({"old": old} if old is not None else {})
    for tree in trees.values():
        _compile(tree)
    hows = ("status", "events") if how == "both" else (how,)
    ways = [(name, way) for way in hows for name in trees]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {way: [] for way in ways}
    for _ in range(runs):  # the trees alternate: a noisy neighbour hits both alike
        for name, how in ways:
            times[name, how].append(_startup_once(n, trees[name], how))
    baseline = []
    for _ in range(runs):
        begin = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.monotonic() - begin)
    floor = [_posix_spawn_floor(n) for _ in range(runs)]
    spawn = statistics.median(floor)
    print(f"`hostvisor run` until {n} services are running (start_seconds=0s), {runs} runs:")
    for (name, how), got in times.items():
        running = [r for r, _ in got]
        last = [s for _, s in got]
        label = f"  {name} " if len(trees) > 1 else "  "
        label += "status poll " if how == "status" else "events      "
        print(
            f"{label}median {statistics.median(running):.3f} s   min {min(running):.3f} s   "
            f"(last child created at {statistics.median(last):.2f} s; "
            f"ratio to the floor {statistics.median(running) / spawn:.1f}x)"
        )
    print(
        f"  baseline: bare `python -c pass` {statistics.median(baseline) * 1000:.0f} ms; "
        f"floor: a bare os.posix_spawn loop of the same {n} `sleep 3600` children "
        f"{spawn * 1000:.0f} ms"
    )


def _posix_spawn_floor(n: int) -> float:
    """Seconds for ``os.posix_spawn`` of n ``sleep 3600`` children (then killed and reaped)."""
    begin = time.monotonic()
    pids = [os.posix_spawn(SLEEP, [SLEEP, "3600"], os.environ) for _ in range(n)]
    elapsed = time.monotonic() - begin
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    return elapsed


# ---------------------------------------------------------------- log capture

WRITER = r"""
import os, sys, time
total, line = int(sys.argv[1]), 64
per_block = (1 << 20) // line
blocks = []
n = 0
while n * line < total:
    blocks.append("".join(f"{i:062d}\n" for i in range(n, n + per_block)).encode())
    n += per_block
with open(sys.argv[2], "w") as f:
    f.write(repr(time.time()))
for block in blocks:
    view = memoryview(block)
    while view:
        view = view[os.write(1, view):]
"""


async def _logs(total: int) -> tuple[float, int, int]:
    root = Path(tempfile.mkdtemp(prefix="hv-bench-logs-"))
    stamp = root / "began"
    driver = ProcessDriver(state_dir=root / "state")
    spec = ServiceSpec(
        name="firehose",
        target=ProcessSpec(command=(sys.executable, "-c", WRITER, str(total), str(stamp))),
        workdir=root,
        logs=LogSpec(max_size=64 << 20, backups=10),
    )
    async with anyio.create_task_group() as tg:
        handle = await driver.start(spec, task_group=tg)
        await handle.wait()
        await handle.drained()
        done = time.time()
    began = float(stamp.read_text())
    files = sorted((root / "state" / "logs").glob("firehose.log*"))
    expected = 0
    lines = 0
    for path in sorted(files, key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0):
        with path.open("rb") as f:
            for raw in f:
                if int(raw) != expected:
                    raise AssertionError(f"line {expected} missing or out of order in {path}")
                expected += 1
                lines += 1
    shutil.rmtree(root, ignore_errors=True)
    return done - began, lines, len(files)


def bench_logs(mib: int = 200, runs: int = 3) -> None:
    total = mib << 20
    rates = []
    for _ in range(runs):
        seconds, lines, files = anyio.run(_logs, total)
        rates.append(total / seconds / 2**20)
    # Baseline in the same run: the same writer into /dev/null, no daemon involved.
    root = Path(tempfile.mkdtemp(prefix="hv-bench-null-"))
    base = []
    for _ in range(runs):
        with open(os.devnull, "wb") as null:
            subprocess.run(
                [sys.executable, "-c", WRITER, str(total), str(root / "b")], stdout=null, check=True
            )
        base.append(total / (time.time() - float((root / "b").read_text())) / 2**20)
    shutil.rmtree(root, ignore_errors=True)
    print(f"log capture, one child writing {mib} MiB of 64-byte lines, rotation at 64 MiB:")
    print(
        f"  median {statistics.median(rates):.0f} MiB/s over {runs} runs "
        f"({lines} lines in {files} files, none lost, in order)   "
        f"baseline writer -> /dev/null {statistics.median(base):.0f} MiB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", choices=["restart", "idle", "startup", "logs", "all"])
    parser.add_argument("--seconds", type=float, default=60, help="idle window (default 60)")
    parser.add_argument(
        "--services",
        type=int,
        nargs="+",
        default=[200],
        help="startup: numbers of services (default 200; e.g. 200 1000)",
    )
    parser.add_argument("--runs", type=int, default=5, help="startup: runs per size (default 5)")
    parser.add_argument(
        "--old", type=Path, help="startup: another checkout (old code), run alternately"
    )
    parser.add_argument(
        "--how",
        choices=["status", "events", "both"],
        default="both",
        help="startup: all running by a status poll, by the running events, or both",
    )
    parser.add_argument(
        "--probes",
        choices=["both", "probes", "none"],
        default="both",
        help="idle: with probes, without, or both (default)",
    )
    args = parser.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    if args.which in ("restart", "all"):
        bench_restart()
    if args.which in ("startup", "all"):
        for n in args.services:
            bench_startup(n, args.runs, args.old, args.how)
    if args.which in ("logs", "all"):
        bench_logs()
    if args.which in ("idle", "all"):
        bench_idle(seconds=args.seconds, which=args.probes)


if __name__ == "__main__":
    main()
