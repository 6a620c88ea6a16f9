"""Daemon memory at 200 and 1,000 process services (issue 14). A plain script: prints figures.

    .venv/bin/python bench/bench_memory.py                      # 200 and 1000, 3 runs each
    .venv/bin/python bench/bench_memory.py --services 200 --runs 5
    .venv/bin/python bench/bench_memory.py --code /tmp/old      # the same, of another checkout
    .venv/bin/python bench/bench_memory.py --tracemalloc        # + where the per-service bytes go

For each size it starts the real ``hostvisor run`` (``python -m supervisor run``) with N
``sleep 3600`` units, waits until all are running and 2 s more, then reads RSS and PSS
(``/proc/PID/smaps_rollup``) of the daemon and of every process of hostvisor's own (the
descriptor keeper, ``fdkeeper.py``, a separate process): the children it supervises are
not counted. The cost per service is (figure at 1000 - figure at 200) / 800.

A second, instrumented daemon (the same ``run`` through a wrapper thread), at 200 and at 1000,
lists the modules it has imported (the heavy ones: telemetry, docker, httpx, ssl, rich) and
counts its live asyncio tasks (by the function anyio names them after), ``asyncio.Event`` objects,
anyio task groups and cancel scopes: the bench prints what each service adds. With
``--tracemalloc`` it also takes a ``tracemalloc`` snapshot at both sizes and prints the files,
lines and hostvisor frames (first and last of the traceback) whose allocations grow with the
number of services, in bytes per service. Its RSS is not quoted (tracemalloc itself costs
memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_supervise import SLEEP, _wait_all_running, write_config  # noqa: E402

from supervisor import config  # noqa: E402
from supervisor.control.client import ControlClient  # noqa: E402

HEAVY = ("opentelemetry", "docker", "httpx", "httpcore", "ssl", "_ssl", "rich", "h11", "certifi")

# The instrumented daemon: `run` in the main thread, a thread that waits for REQUEST to
# appear and then writes sys.modules (and, under tracemalloc, a snapshot) next to it.
WRAPPER = r"""
import sys, threading, time, os, json
request, out, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
if frames:
    import tracemalloc
    tracemalloc.start(frames)
def census():
    # Live asyncio tasks (by coroutine), asyncio.Events, anyio task groups and cancel scopes.
    import asyncio, gc
    counts = {}
    def add(key):
        counts[key] = counts.get(key, 0) + 1
    for obj in gc.get_objects():
        kind = type(obj)
        if isinstance(obj, asyncio.Task):
            if obj.done():
                continue
            name = obj.get_name()  # anyio names a task after its function
            if name.startswith("functools"):  # a partial: the coroutine its wrapper awaits
                inner = getattr(obj.get_coro(), "cr_await", None)
                name = getattr(inner, "__qualname__", name)
            add("task " + name)
        elif kind is asyncio.Event:
            add("asyncio.Event")
        elif kind.__name__ in ("TaskGroup", "CancelScope") and kind.__module__.startswith("anyio"):
            add("anyio " + kind.__name__)
    return counts
def dump():
    done = 0
    while True:
        time.sleep(0.05)
        name = f"{request}.{done}"
        if not os.path.exists(name):
            continue
        if frames:
            import gc
            gc.collect()
            tracemalloc.take_snapshot().dump(f"{out}.{done}.snap")
        with open(f"{out}.{done}.tmp", "w") as f:
            json.dump({"modules": sorted(sys.modules), "objects": census()}, f)
        os.rename(f"{out}.{done}.tmp", f"{out}.{done}")
        done += 1
threading.Thread(target=dump, daemon=True).start()
from supervisor.cli import main
main(sys.argv[4:])
"""


def _pss(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _own_processes(daemon: psutil.Process, *places: Path) -> list[psutil.Process]:
    """The daemon and its helpers (the fd keeper may be started detached: match its socket)."""
    found = [daemon]
    children = {c.pid for c in daemon.children(recursive=True)}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid == daemon.pid or "fdkeeper" not in cmd:
            continue
        if proc.pid in children or any(str(p) in cmd for p in places):
            found.append(proc)
    return found


def _units(root: Path, n: int) -> Path:
    unit = f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0s"\n'
    return write_config(root, {f"s{i:04d}": unit for i in range(n)})


def _stop(proc: subprocess.Popen[bytes], root: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(root, ignore_errors=True)


def measure(code: Path, n: int) -> tuple[float, float, float, float]:
    """(daemon RSS, daemon+helpers RSS, daemon+helpers PSS, helpers RSS), MiB."""
    root = Path(tempfile.mkdtemp(prefix="hv-bench-mem-"))
    cfg = _units(root, n)
    client = ControlClient(Path(config.load(cfg).daemon.socket or ""))
    env = {**os.environ, "PYTHONPATH": str(code)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=code,
        env=env,
    )
    try:
        _wait_all_running(client, n, time.monotonic() + 120)
        time.sleep(2)
        daemon = psutil.Process(proc.pid)
        sock = Path(config.load(cfg).daemon.socket or "")
        procs = _own_processes(daemon, root / "state", sock.parent)
        rss = [p.memory_info().rss / 2**20 for p in procs]
        pss = [_pss(p.pid) for p in procs]
        return rss[0], sum(rss), sum(pss), sum(rss[1:])
    finally:
        _stop(proc, root)


Instrumented = tuple[list[str], dict[str, int], str | None]


def instrumented(code: Path, sizes: list[int], frames: int) -> list[Instrumented]:
    """Per size: the daemon's sys.modules, its live tasks (by coroutine), Events, task groups
    and cancel scopes, and the path of its tracemalloc snapshot."""
    results: list[Instrumented] = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="hv-bench-memi-"))
        cfg = _units(root, n)
        client = ControlClient(Path(config.load(cfg).daemon.socket or ""))
        request, out = root / "request", root / "out"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRAPPER,
                str(request),
                str(out),
                str(frames),
                "run",
                "-c",
                str(cfg),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)},
        )
        try:
            _wait_all_running(client, n, time.monotonic() + 300)
            time.sleep(2)
            (root / "request.0").touch()
            deadline = time.monotonic() + 120
            while not (root / "out.0").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            dumped = json.loads((root / "out.0").read_text())
            snap = None
            if frames:
                snap = tempfile.mktemp(prefix=f"hv-bench-snap-{n}-", suffix=".snap")
                shutil.copy(root / "out.0.snap", snap)
            results.append((dumped["modules"], dumped["objects"], snap))
        finally:
            _stop(proc, root)
    return results


def import_time(code: Path) -> list[tuple[int, str]]:
    """The top cumulative imports of `hostvisor run` (``-X importtime``), microseconds."""
    root = Path(tempfile.mkdtemp(prefix="hv-bench-memt-"))
    cfg = _units(root, 5)
    client = ControlClient(Path(config.load(cfg).daemon.socket or ""))
    log = root / "importtime"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "supervisor", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)},
        )
        try:
            _wait_all_running(client, 5, time.monotonic() + 60)
            text = log.read_text(errors="replace")
        finally:
            _stop(proc, root)
    rows = []
    for line in text.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = line[len("import time:") :].split("|")
            if parts[1].strip().isdigit():
                rows.append((int(parts[1]), parts[2].rstrip()))
    return rows


def census_per_service(small: dict[str, int], large: dict[str, int], extra: int, top: int) -> None:
    """Live tasks, Events, task groups and cancel scopes per service (growth small -> large)."""
    grow = {k: (large.get(k, 0) - small.get(k, 0)) / extra for k in set(small) | set(large)}
    tasks = sum(v for k, v in grow.items() if k.startswith("task "))
    print(
        f"  per service: {tasks:.2f} live tasks, {grow.get('asyncio.Event', 0):.2f} asyncio.Events, "
        f"{grow.get('anyio TaskGroup', 0):.2f} task groups, "
        f"{grow.get('anyio CancelScope', 0):.2f} cancel scopes"
    )
    print("  live tasks per service, by coroutine:")
    rows = sorted(((v, k) for k, v in grow.items() if k.startswith("task ") and v), reverse=True)
    for v, k in rows[:top]:
        print(f"    {v:5.2f}  {k[5:]}")


def tracemalloc_breakdown(small: str, large: str, extra: int, top: int) -> None:
    import tracemalloc

    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a = tracemalloc.Snapshot.load(small).filter_traces(filters)
    b = tracemalloc.Snapshot.load(large).filter_traces(filters)
    total = sum(s.size for s in b.statistics("filename")) - sum(
        s.size for s in a.statistics("filename")
    )
    print(f"  traced Python heap per service: {total / extra / 1024:.1f} KiB")
    print(f"  by file (bytes per service, top {top}):")
    for stat in b.compare_to(a, "filename")[:top]:
        frame = stat.traceback[0]
        print(f"    {stat.size_diff / extra:8.0f} B  {_short(frame.filename)}")
    print(f"  by line (bytes per service, top {top}):")
    for stat in b.compare_to(a, "lineno")[:top]:
        frame = stat.traceback[0]
        print(
            f"    {stat.size_diff / extra:8.0f} B  {stat.count_diff / extra:5.1f} blocks  "
            f"{_short(frame.filename)}:{frame.lineno}"
        )
    print(f"  by first hostvisor frame of the traceback (bytes per service, top {top}):")
    grouped: dict[str, int] = {}
    for stat in b.compare_to(a, "traceback"):
        where = next(
            (
                f"{_short(f.filename)}:{f.lineno}"
                for f in stat.traceback
                if "supervisor/" in f.filename
            ),
            "(no hostvisor frame)",
        )
        grouped[where] = grouped.get(where, 0) + stat.size_diff
    for where, size in sorted(grouped.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {size / extra:8.0f} B  {where}")
    print(f"  by last hostvisor frame (the code that allocated; bytes per service, top {top}):")
    grouped = {}
    for stat in b.compare_to(a, "traceback"):
        where = next(
            (
                f"{_short(f.filename)}:{f.lineno}"
                for f in reversed(stat.traceback)
                if "supervisor/" in f.filename
            ),
            "(no hostvisor frame)",
        )
        grouped[where] = grouped.get(where, 0) + stat.size_diff
    for where, size in sorted(grouped.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {size / extra:8.0f} B  {where}")


def _short(path: str) -> str:
    for marker in ("site-packages/", "supervisor/", "lib/python3"):
        if marker in path:
            return path[path.index(marker) :]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout to run (default: this)")
    parser.add_argument("--baseline", type=Path, help="also measure this checkout (old code)")
    parser.add_argument("--tracemalloc", action="store_true", help="per-service allocations")
    parser.add_argument("--frames", type=int, default=12, help="tracemalloc frames (default 12)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    checkouts = [("this", args.code)] + ([("baseline", args.baseline)] if args.baseline else [])
    # A bare interpreter's RSS: the floor under any Python daemon.
    floor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.5)
    bare = psutil.Process(floor.pid).memory_info().rss / 2**20
    floor.kill()
    floor.wait()
    print(f"baseline: a bare `python -c 'import time; time.sleep(30)'` RSS {bare:.1f} MiB")
    for label, code in checkouts:
        print(f"{label}: {code}")
        medians: dict[int, float] = {}
        for n in args.services:
            runs = [measure(code, n) for _ in range(args.runs)]
            med = [statistics.median(r[i] for r in runs) for i in range(4)]
            medians[n] = med[1]
            print(
                f"  {n:5d} services: RSS daemon+helpers {med[1]:.1f} MiB (daemon {med[0]:.1f}, "
                f"helpers {med[3]:.1f})   PSS {med[2]:.1f} MiB   median of {args.runs}"
            )
        if len(medians) >= 2:
            lo, hi = min(medians), max(medians)
            per = (medians[hi] - medians[lo]) * 1024 / (hi - lo)
            print(f"  cost per service (RSS, {lo} -> {hi}): {per:.1f} KiB")
        sizes = sorted(args.services)
        ends = [sizes[0], sizes[-1]] if len(sizes) > 1 else sizes
        got = instrumented(code, ends, args.frames if args.tracemalloc else 0)
        if len(got) == 2:
            census_per_service(got[0][1], got[1][1], ends[1] - ends[0], args.top)
        heavy = [m for m in got[0][0] if m.split(".")[0] in HEAVY]
        print(f"  modules imported by the daemon ({sizes[0]} process units): {len(got[0][0])}")
        print(
            f"  heavy modules among them: {', '.join(sorted(set(m.split('.')[0] for m in heavy))) or 'none'}"
        )
        rows = import_time(code)
        total = max((us for us, _ in rows), default=0)
        print(f"  -X importtime of `hostvisor run`, top cumulative (of {total / 1000:.0f} ms):")
        for us, name in sorted(rows, reverse=True)[:8]:
            print(f"    {us / 1000:7.1f} ms  {name.strip()}")
        if args.tracemalloc and len(got) == 2 and got[0][2] and got[1][2]:
            print(f"  tracemalloc, {sizes[0]} -> {sizes[-1]} services:")
            tracemalloc_breakdown(got[0][2], got[1][2], sizes[-1] - sizes[0], args.top)


if __name__ == "__main__":
    main()
