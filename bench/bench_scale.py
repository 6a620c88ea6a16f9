"""Issue 14 at 1,000 services: idle CPU, TCP probe cost, restart latency. Prints, asserts nothing.

    .venv/bin/python bench/bench_scale.py                       # all three, this tree only
    .venv/bin/python bench/bench_scale.py --old /tmp/old-scale  # and the old code (a worktree)
    .venv/bin/python bench/bench_scale.py idle probes --seconds 30 --runs 3
    .venv/bin/python bench/bench_scale.py restart --kills 100

- **idle**: a real ``hostvisor run`` (``python -m supervisor run``) with 1,000
  ``sleep 3600`` process services; its CPU times (user + system) over the window, after
  every service runs and 5 s of settling. Nobody asks for ``status`` meanwhile.
- **probes**: the same with a ``[health] tcp`` probe on each (``interval = "5s"``), all
  against one listener in a thread of this process: 200 connects a second.
- **restart**: the method of ``bench_supervise.py restart`` (the daemon in-process, its
  process driver's ``start`` wrapped to timestamp the moment the child has exec'd;
  ``backoff.initial = 0s``), once with 50 services (the baseline) and once with 1,000,
  in the same run; each in a fresh interpreter.

``--old DIR`` runs every scenario with ``PYTHONPATH=DIR`` as well (a detached worktree
of the old commit: ``git worktree add --detach /tmp/old-scale 6840fd2``), interleaved
with this tree's runs so that the noise of a shared host falls on both alike.
"""

from __future__ import annotations

import argparse
import json
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
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SLEEP = shutil.which("sleep") or "/bin/sleep"


def write_config(root: Path, units: dict[str, str]) -> tuple[Path, Path]:
    (root / "units").mkdir(parents=True, exist_ok=True)
    cfg = root / "config.toml"
    sock = Path(tempfile.mkdtemp(prefix="hvs", dir="/tmp")) / "hv.sock"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{root / "state"}"\nsocket = "{sock}"\n'
        f'shutdown_timeout = "20s"\nlog_level = "warning"\n'
    )
    cfg.chmod(0o644)
    for name, text in units.items():
        path = root / "units" / f"{name}.toml"
        path.write_text(text)
        path.chmod(0o644)
    return cfg, sock


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- restart (child side)


def restart_child(n: int, kills: int) -> None:
    """Runs in a fresh interpreter whose sys.path starts with the tree under test."""
    import anyio
    from restart_harness import restart_latencies

    root = Path(tempfile.mkdtemp(prefix="hv-scale-restart-"))
    unit = f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0s"\n[backoff]\ninitial = "0s"\n'
    cfg, _ = write_config(root, {f"s{i:04d}": unit for i in range(n)})
    # 2 s for start-up to settle; 10 ms between a replacement running and the next kill
    latencies = anyio.run(partial(restart_latencies, cfg, n, kills=kills, settle=2, pause=0.01))
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(latencies))


def _child_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def measure_restart(tree: Path, n: int, kills: int) -> list[float]:
    out = subprocess.run(
        [sys.executable, __file__, "_restart_child", str(n), str(kills)],
        env=_child_env(tree),
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return [x * 1000 for x in json.loads(out.stdout.strip().splitlines()[-1])]


# ---------------------------------------------------------------- idle / probes


class Listener:
    """A TCP listener in a thread that accepts and closes (the target of every probe)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def _call(sock: Path, method: str) -> Any:
    """One control request, newline-delimited JSON (the contract's protocol), no imports
    of the tree under test."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}).encode() + b"\n"
        )
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def _wait_running(sock: Path, n: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            doc = _call(sock, "status")
            services = (doc.get("result") or doc)["services"]
            if len(services) == n and all(s["state"] == "running" for s in services):
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.2)
    raise TimeoutError("services did not all reach running")


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_idle(
    tree: Path, n: int, seconds: float, listener: Listener | None, interval: str
) -> float:
    root = Path(tempfile.mkdtemp(prefix="hv-scale-idle-"))
    unit = f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0.5s"\n'
    if listener is not None:
        unit += (
            f'[health]\ntcp = "127.0.0.1:{listener.port}"\n'
            f'interval = "{interval}"\ntimeout = "1s"\n'
        )
    cfg, sock = write_config(root, {f"s{i:04d}": unit for i in range(n)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_child_env(tree),
        cwd=tree,
    )
    try:
        _wait_running(sock, n, time.monotonic() + 180)
        time.sleep(5)
        before, t0 = _cpu(proc.pid), time.monotonic()
        accepted0 = listener.accepted if listener else 0
        time.sleep(seconds)
        used, elapsed = _cpu(proc.pid) - before, time.monotonic() - t0
        if listener is not None:
            rate = (listener.accepted - accepted0) / elapsed
            print(f"      ({rate:.0f} probes/s accepted)", flush=True)
        return used / elapsed * 100
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_restart_child":
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        restart_child(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("which", nargs="*", default=["idle", "probes", "restart"])
    parser.add_argument("--old", type=Path, help="a worktree of the old code, run as well")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30, help="idle window (default 30)")
    parser.add_argument("--runs", type=int, default=3, help="idle/probe runs per tree")
    parser.add_argument("--kills", type=int, default=50, help="kills per restart run")
    parser.add_argument("--interval", default="5s", help="probe interval (default 5s)")
    args = parser.parse_args()
    trees = {"new": ROOT} | ({"old": args.old.resolve()} if args.old else {})
    n = args.services
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}; trees: "
        + ", ".join(f"{k}={v}" for k, v in trees.items()),
        flush=True,
    )
    for which in args.which:
        if which in ("idle", "probes"):
            listener = Listener() if which == "probes" else None
            what = f"a {args.interval} TCP probe each" if listener else "no probes"
            print(f"daemon CPU over {args.seconds:g} s, {n} services, {what}:", flush=True)
            got: dict[str, list[float]] = {k: [] for k in trees}
            for _ in range(args.runs):
                for name, tree in trees.items():
                    got[name].append(measure_idle(tree, n, args.seconds, listener, args.interval))
                    print(f"    {name}: {got[name][-1]:.3f} %", flush=True)
            for name, values in got.items():
                runs = " / ".join(f"{v:.3f}" for v in values)
                print(
                    f"  {name:4s} median {statistics.median(values):.3f} % of a core  ({runs})",
                    flush=True,
                )
        elif which == "restart":
            print(
                f"restart latency, SIGKILL -> replacement exec'd, backoff.initial=0s, "
                f"{args.kills} kills per run:",
                flush=True,
            )
            for name, tree in trees.items():
                base = measure_restart(tree, 50, args.kills)
                big = measure_restart(tree, n, args.kills)
                mb, mg = statistics.median(base), statistics.median(big)
                for label, ms in (("50 services  ", base), (f"{n} services", big)):
                    print(
                        f"  {name:4s} {label}: median {statistics.median(ms):.2f} ms  "
                        f"p95 {pct(ms, 0.95):.2f}  min {min(ms):.2f}  max {max(ms):.2f}",
                        flush=True,
                    )
                print(
                    f"  {name:4s} {n} / 50: x{mg / mb:.2f} (target <= x1.20)",
                    flush=True,
                )
        else:
            parser.error(f"unknown scenario {which!r}")


if __name__ == "__main__":
    main()
