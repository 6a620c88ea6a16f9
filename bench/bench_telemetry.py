"""Telemetry benchmark of issue 4: restart latency with telemetry off, on, and on a black hole.

    .venv/bin/python bench/bench_telemetry.py                    # 300 kills each, HTTP/protobuf
    .venv/bin/python bench/bench_telemetry.py --protocol grpc --kills 500

Restart latency is SIGKILL -> replacement exec'd (the driver's ``start`` returned),
measured as in ``bench_supervise.py restart``: a :class:`Daemon` with
``backoff.initial = 0s`` and ``start_seconds = 0s`` whose ``process_driver.start`` is
wrapped to timestamp each spawn (CLOCK_MONOTONIC, comparable across processes).

Three daemons run side by side, each in its own process (its own GIL, its own
exporter threads), one per configuration:

- ``off``: no ``[telemetry]``;
- ``collector``: exporting to a working OTLP receiver (``tests/otlp_receivers.py``)
  in its own process, as a real collector would be;
- ``black hole``: exporting to a socket that accepts and never answers.

The kills are interleaved one by one (off, collector, black hole, off, ...), and only
one restart is in flight at any moment, so the machine's noise, which on a shared
host comes in bursts of seconds, falls on the three configurations alike.

Each restart emits four log records (exited, backoff, starting, running); log
batches go out every second (``OTEL_BLRP_SCHEDULE_DELAY`` default) and metrics
every second (``OTEL_METRIC_EXPORT_INTERVAL=1000``, so that both signals export
during the run). Target: the three medians within 20 % of each other.
A plain script: prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor import config  # noqa: E402
from supervisor.daemon import Daemon  # noqa: E402
from supervisor.spec import ServiceSpec  # noqa: E402
from supervisor.states import ServiceState  # noqa: E402

SLEEP = shutil.which("sleep") or "/bin/sleep"
CONFIGS = ("off", "collector", "black hole")

#: The collector process: a real OTLP receiver and a black hole, until stdin closes.
COLLECTOR = r"""
import json, sys
from tests.otlp_receivers import BlackHole, GrpcReceiver, HttpReceiver
cls = GrpcReceiver if sys.argv[1] == "grpc" else HttpReceiver
with cls() as receiver, BlackHole() as hole:
    print(json.dumps({"collector": receiver.endpoint, "black_hole": hole.endpoint}), flush=True)
    sys.stdin.read()
    print(json.dumps({"records": len(receiver.log_records()), "metric_exports": len(receiver.metrics),
                      "black_hole_connections": len(hole.accepted)}), flush=True)
"""


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def write_config(root: Path, n: int, telemetry: str) -> Path:
    units = root / "units"
    units.mkdir(parents=True, exist_ok=True)
    sock = Path(tempfile.mkdtemp(prefix="hvt", dir="/tmp")) / "hv.sock"
    cfg = root / "config.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{root / "state"}"\nsocket = "{sock}"\n'
        f'shutdown_timeout = "10s"\nlog_level = "error"\n{telemetry}\n'
    )
    cfg.chmod(0o644)
    unit = f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0s"\n[backoff]\ninitial = "0s"\n'
    for i in range(n):
        path = units / f"s{i:03d}.toml"
        path.write_text(unit)
        path.chmod(0o644)
    return cfg


# ---------------------------------------------------------------- worker: one daemon


async def worker(cfg: Path) -> None:
    """Run the daemon of ``cfg``; print ``<name> <pid> <spawn ns>`` once each spawn is RUNNING.

    Stops (ordered shutdown, final telemetry flush) on SIGTERM, like ``hostvisor run``.
    """
    loaded = config.load(cfg)
    assert loaded.daemon.state_dir is not None and loaded.daemon.socket  # write_config sets both
    daemon = Daemon(
        loaded, state_dir=loaded.daemon.state_dir, socket_path=Path(loaded.daemon.socket)
    )
    spawned: dict[str, tuple[int, int]] = {}
    original = daemon.process_driver.start

    async def timed_start(spec: ServiceSpec, *, task_group: Any) -> Any:
        handle = await original(spec, task_group=task_group)
        spawned[spec.name] = (handle.pid, now_ns())  # Popen returned: the child has exec'd
        daemon.changed.fire()
        return handle

    daemon.process_driver.start = timed_start  # type: ignore[method-assign]

    async def report() -> None:
        reported: dict[str, tuple[int, int]] = {}
        while True:
            for name, sup in list(daemon.supervisors.items()):
                if (
                    sup.state is ServiceState.RUNNING
                    and name in spawned
                    and reported.get(name) != spawned[name]
                ):
                    reported[name] = spawned[name]
                    print(name, *spawned[name], flush=True)
            await daemon.changed.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(report)
        await daemon.main()
        tg.cancel_scope.cancel()


class Worker:
    """The driver's view of one worker process: the latest (pid, spawn ns) of each service."""

    def __init__(self, name: str, cfg: Path) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[tuple[str, int, int]] = queue.Queue()
        self.latest: dict[str, tuple[int, int]] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            service, pid, ns = line.split()
            self.lines.put((service, int(pid), int(ns)))

    def wait_spawn(self, service: str, after: int, timeout: float = 30.0) -> int:
        """Spawn ns of ``service``'s first RUNNING instance spawned after ``after`` ns."""
        deadline = time.monotonic() + timeout
        while self.latest.get(service, (0, -1))[1] <= after:
            name, pid, ns = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            self.latest[name] = (pid, ns)
        return self.latest[service][1]

    def stop(self) -> tuple[int, float]:
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        return code, time.monotonic() - began


# ---------------------------------------------------------------- driver


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "1000")  # inherited by the workers
    for name in [k for k in os.environ if k.startswith("OTEL_EXPORTER_")]:
        del os.environ[name]
    collector = subprocess.Popen(
        [sys.executable, "-c", COLLECTOR, args.protocol],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert collector.stdin is not None and collector.stdout is not None
    endpoints = json.loads(collector.stdout.readline())
    endpoint = {
        "off": "",
        "collector": endpoints["collector"],
        "black hole": endpoints["black_hole"],
    }
    base = Path(tempfile.mkdtemp(prefix="hv-bench-telemetry-"))
    workers: dict[str, Worker] = {}
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    shutdown: dict[str, tuple[int, float]] = {}
    services = [f"s{i:03d}" for i in range(args.services)]
    try:
        for i, name in enumerate(CONFIGS):
            table = (
                ""
                if not endpoint[name]
                else (
                    f'[telemetry]\nenabled = true\nendpoint = "{endpoint[name]}"\n'
                    f'protocol = "{args.protocol}"\nexport_timeout = "{args.export_timeout}"\n'
                )
            )
            workers[name] = Worker(name, write_config(base / f"c{i}", args.services, table))
        for w in workers.values():
            for service in services:
                w.wait_spawn(service, -1, timeout=60)
        time.sleep(2)  # settle: start-up exports done, imports warm
        for k in range(args.kills + args.warmup):
            service = services[k % len(services)]
            order = CONFIGS[k % 3 :] + CONFIGS[: k % 3]  # rotate: nobody always goes first
            for name in order:
                w = workers[name]
                pid, _ = w.latest[service]
                begin = now_ns()
                os.kill(pid, signal.SIGKILL)
                spawned = w.wait_spawn(service, begin)
                if k >= args.warmup:
                    results[name].append((spawned - begin) / 1e9)
        for name, w in workers.items():
            shutdown[name] = w.stop()
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
        collector.stdin.close()
        received = json.loads(collector.stdout.readline() or "{}")
        collector.wait(10)
        shutil.rmtree(base, ignore_errors=True)

    off = statistics.median(results["off"])
    for name in CONFIGS:
        ms = [x * 1000 for x in results[name]]
        median = statistics.median(ms)
        code, seconds = shutdown[name]
        print(
            f"  {name:<10}  median {median:6.2f} ms  p95 {pct(ms, 0.95):6.2f} ms  "
            f"min {min(ms):5.2f} ms  max {max(ms):7.2f} ms  ({len(ms)} kills)  "
            f"x{median / (off * 1000):.2f} of off   SIGTERM -> exit {code} in {seconds:.2f} s"
        )
    medians = [statistics.median(results[n]) for n in CONFIGS]
    spread = (max(medians) - min(medians)) / min(medians) * 100
    print(f"  spread of the three medians: {spread:.1f} % (target <= 20 %)")
    print(
        f"  collector received {received.get('records')} log records and "
        f"{received.get('metric_exports')} metric exports; "
        f"black hole held {received.get('black_hole_connections')} connections"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--protocol", choices=["http/protobuf", "grpc"], default="http/protobuf")
    parser.add_argument(
        "--kills", type=int, default=300, help="kills per configuration (default 300)"
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="kills per configuration not counted"
    )
    parser.add_argument(
        "--services", type=int, default=10, help="services per daemon (killed in turn)"
    )
    parser.add_argument(
        "--export-timeout", default="5s", help="[telemetry] export_timeout (default 5s)"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        anyio.run(worker, args.worker)
        return
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    print(
        f"restart latency, SIGKILL -> replacement exec'd, {args.kills} kills per configuration "
        f"interleaved one by one, {args.services} services per daemon, protocol {args.protocol}, "
        f"export_timeout {args.export_timeout}"
    )
    run(args)


if __name__ == "__main__":
    main()
