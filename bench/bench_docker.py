"""Container-unit benchmarks of issue 5 (point 9). A plain script: prints figures, asserts nothing.

    .venv/bin/python bench/bench_docker.py                     # 20 units, 3 engine restarts
    .venv/bin/python bench/bench_docker.py --units 20 --rounds 5

Needs root, Debian's ``dockerd`` and ``busybox-static``: it starts its own private
engine (tests/docker_engine.py) on a socket under /tmp, never the system's, and a
real ``hostvisor run`` with one container unit per container (``backoff.initial = 0s``,
``start_seconds = 0s``). Measured:

(a) ``docker kill`` of each container in turn: from its ``die`` (``State.FinishedAt``,
    engine clock) to the container running again (``State.StartedAt``) and to the
    unit's ``hostvisor.service.running`` event.
(b) ``kill -9`` dockerd and its containerd, then a fresh dockerd (the seed incident):
    from the engine answering again (first successful ``/_ping``, polled every 10 ms)
    to every container unit running again, and from ``hostvisor.docker.reconnected``.

Machines here are shared and noisy: quote medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402

from tests.daemon_harness import DaemonProcess  # noqa: E402
from tests.docker_engine import DockerEngine, EngineUnavailable, start_engine  # noqa: E402

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 100000 & wait"]
UNIT = (
    'container = "{name}"\nstart_seconds = "0s"\nstop_timeout = "1s"\n'
    '[backoff]\ninitial = "0s"\nmax = "1s"\njitter = 0.0\n'
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engine_seconds(text: str) -> float:
    """Seconds since the epoch of an engine timestamp (nanoseconds cut to microseconds)."""
    main, _, rest = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{main}.{(rest or '0')[:6]:0<6}+00:00").timestamp()


def event_seconds(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def inspect(engine: DockerEngine, name: str) -> dict[str, Any]:
    return dict(json.loads(engine.docker("inspect", name).stdout)[0]["State"])


def running_events(d: DaemonProcess, after: int) -> dict[str, dict[str, Any]]:
    with d._cond:
        found: dict[str, dict[str, Any]] = {}
        for e in d.events:
            if e["seq"] > after and e["event"] == "hostvisor.service.running":
                found.setdefault(e["service"], e)
        return found


def summary(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"  {label}: median {statistics.median(ms):8.1f} ms   p95 {pct(ms, 0.95):8.1f} ms   "
        f"min {min(ms):7.1f}   max {max(ms):7.1f}   (n={len(ms)})"
    )


def bench_die(d: DaemonProcess, engine: DockerEngine, names: list[str]) -> None:
    to_start, to_running = [], []
    for i, name in enumerate(names):
        seq = d.last_seq()
        engine.docker("kill", name)
        event = d.wait_event("hostvisor.service.running", f"u{i:02d}", after=seq, timeout=30)
        state = inspect(engine, name)
        died = engine_seconds(state["FinishedAt"])
        to_start.append(engine_seconds(state["StartedAt"]) - died)
        to_running.append(event_seconds(event) - died)
    print(f"(a) docker kill, {len(names)} container units, backoff.initial=0s, one at a time:")
    print(summary("die -> container running (StartedAt)", to_start))
    print(summary("die -> hostvisor.service.running    ", to_running))


def first_answer(engine: DockerEngine, stop: threading.Event, out: list[float]) -> None:
    """Ping the engine every 10 ms until it answers; record the wall-clock time."""
    while not stop.is_set():
        try:  # the client asks the engine for its API version, so it is a ping too
            client = docker.DockerClient(base_url=engine.host, timeout=1)
        except docker.errors.DockerException:  # refused or not yet listening: poll again
            time.sleep(0.01)
            continue
        client.close()
        out.append(time.time())
        return


def bench_engine_restart(d: DaemonProcess, engine: DockerEngine, n: int, rounds: int) -> None:
    from_answer, from_reconnected, engine_up = [], [], []
    for _ in range(rounds):
        seq = d.last_seq()
        killed = time.time()
        engine.kill()
        d.wait_event("hostvisor.docker.disconnected", after=seq, timeout=30)
        answered: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(target=first_answer, args=(engine, stop, answered))
        poller.start()
        try:
            engine.start()
            poller.join(30)
        finally:
            stop.set()
        up = d.wait_event("hostvisor.docker.reconnected", after=seq, timeout=60)
        after = int(up["seq"])
        # B023: the lambda is only called within this iteration.
        d.wait_for(lambda: len(running_events(d, after)) == n, 60, "all units")  # noqa: B023
        done = max(event_seconds(e) for e in running_events(d, after).values())
        from_answer.append(done - answered[0])
        from_reconnected.append(done - event_seconds(up))
        engine_up.append(answered[0] - killed)
    print(f"(b) kill -9 dockerd + fresh dockerd, {n} container units, {rounds} rounds:")
    print(summary("kill -> engine answers again (dockerd)", engine_up))
    print(summary("engine answers -> every unit running  ", from_answer))
    print(summary("reconnected event -> every unit running", from_reconnected))


def bench_baseline(engine: DockerEngine, n: int) -> None:
    """The engine's own cost, with no hostvisor: SDK ``start`` of exited containers."""
    names = [f"hvb-base-{i:02d}" for i in range(n)]
    for name in names:
        engine.docker("create", "--name", name, "--network", "none", engine.image, *SLEEPER)
    client = docker.DockerClient(base_url=engine.host, timeout=30)
    try:
        one = []
        for name in names:
            begin = time.perf_counter()
            client.api.start(name)
            one.append(time.perf_counter() - begin)
        for name in names:
            client.api.kill(name)
        begin = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(client.api.start, names))
        parallel = time.perf_counter() - begin
    finally:
        client.close()
        engine.docker("rm", "-f", *names)
    print("baseline, the engine alone (docker SDK, no hostvisor):")
    print(summary("start of one exited container      ", one))
    print(f"  start of {n} exited containers at once: {parallel * 1000:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--units", type=int, default=20, help="container units (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="engine restarts (default 3)")
    args = parser.parse_args()
    try:
        engine = start_engine()
    except EngineUnavailable as exc:
        print(f"no Docker engine: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    root = Path(tempfile.mkdtemp(prefix="hv-bench-docker-"))
    d = DaemonProcess(root, env={"DOCKER_HOST": engine.host})
    try:
        names = [f"hvb-{i:02d}" for i in range(args.units)]
        for i, name in enumerate(names):
            engine.docker("run", "-d", "--name", name, "--network", "none", engine.image, *SLEEPER)
            d.write_unit(f"u{i:02d}", UNIT.format(name=name))
        version = engine.docker("version", "-f", "{{.Server.Version}}").stdout.strip()
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, "
            f"Python {sys.version.split()[0]}, dockerd {version}"
        )
        bench_baseline(engine, args.units)
        d.start()
        d.wait_for(lambda: len(running_events(d, 0)) == args.units, 60, "all units running")
        bench_die(d, engine, names)
        bench_engine_restart(d, engine, args.units, args.rounds)
    finally:
        d.cleanup()
        engine.ensure_running()
        engine.remove_all_containers()
        engine.stop()
        shutil.rmtree(engine.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
