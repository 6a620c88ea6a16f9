"""``hostvisor reexec`` and adoption after ``kill -9``, with 200 services (issue 10, item 5).

    .venv/bin/python bench/bench_reexec.py                     # 200 services, 5 runs
    .venv/bin/python bench/bench_reexec.py --services 50 --runs 3 --kills 5

Each run starts a real ``hostvisor run -c CONFIG`` (config, state folder and socket in
temporary folders under /tmp, removed afterwards) with N ``sleep 3600`` services
(``start_seconds = "0s"``) and measures, in order:

1. cold start, the baseline for 3: from the spawn of ``hostvisor run`` until a ``status``
   call says every service is running. Twice: the first daemon gets SIGTERM at once (the
   baseline of the SIGTERM at the end), the second one goes on;
2. ``reexec``: a thread polls the control socket with ``status`` calls (one service each,
   0.25 s timeout, back to back) and timestamps every answer while the main thread calls
   ``reexec``. Reported: the time from sending ``reexec`` until its answer; the longest
   gap between two successful ``status`` answers around it (the control socket's
   unavailability; target <= 300 ms), split into last answer -> ``execve`` (seen as the
   change of ``/proc/PID/cmdline``), ``execve`` -> the new code's "listening on" line in
   ``<state>/logs/hostvisor.log``, and that line -> the next answer; the median gap
   before the reexec (the poller's own resolution); the services whose pid changed or
   whose ``restarts`` grew (target 0); the ``hostvisor.service.starting`` events after it
   (``events`` with ``since``);
3. adoption: SIGKILL of the daemon (once the state file names every pid), then a new
   ``hostvisor run``: from its spawn until the socket first answers, and until every
   service is ``running``, ``"adopted": true``, with its old pid (target <= 1 s), polled
   with full ``status`` calls;
4. exit detection of an adopted process: SIGKILL of one adopted service's pid, until its
   ``hostvisor.service.exited`` event is received on an ``events`` follow stream
   (target <= 100 ms), ``--kills`` services one after another: at once after step 3,
   and again 2 s later. Also printed: the event's own ``time`` minus the wall clock at
   the kill (the daemon's side alone).

At the end the daemon gets SIGTERM and is waited for (timed, next to the cold daemon's);
every service process and descriptor keeper of the run still alive after that is killed
and counted. A plain script: prints medians with min and max, each next to its target;
asserts nothing but that the daemon answered.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.control.client import ControlClient  # noqa: E402
from supervisor.errors import HostvisorError  # noqa: E402

SLEEP = shutil.which("sleep") or "/bin/sleep"
#: Targets of issue 10, item 5 (seconds).
TARGET_GAP = 0.300
TARGET_ADOPT = 1.0
TARGET_EXIT = 0.100
#: Timeout of each polling ``status`` call during the reexec (seconds).
POLL_TIMEOUT = 0.25
#: Seconds between the two sets of kills of adopted processes.
SETTLE = 2.0


def hostvisor_argv() -> list[str]:
    """The console script next to this interpreter, as a user runs it; else ``-m supervisor``."""
    script = Path(sys.executable).parent / "hostvisor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "supervisor"]


def clean_env() -> dict[str, str]:
    """Our environment without variables that would point the daemon elsewhere."""
    drop = ("HOSTVISOR_", "PYTHONPATH", "PYTHONHOME", "NOTIFY_SOCKET", "LISTEN_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def write_config(root: Path, n: int) -> tuple[Path, Path]:
    """``root/config.toml`` and N units; returns (config, socket path)."""
    units = root / "units"
    units.mkdir(parents=True)
    sock = Path(tempfile.mkdtemp(prefix="hvbr", dir="/tmp")) / "hv.sock"
    cfg = root / "config.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{root / "state"}"\nsocket = "{sock}"\nshutdown_timeout = "20s"\n'
    )
    for i in range(n):
        (units / f"s{i:03d}.toml").write_text(
            f'command = ["{SLEEP}", "3600"]\nstart_seconds = "0s"\n'
        )
    for path in (cfg, *units.iterdir()):
        path.chmod(0o644)
    return cfg, sock


def spawn(cfg: Path, root: Path) -> subprocess.Popen[bytes]:
    err = (root / "daemon.stderr").open("ab")
    try:
        return subprocess.Popen(
            [*hostvisor_argv(), "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=clean_env(),
            cwd=root,
        )
    finally:
        err.close()


def status(client: ControlClient, timeout: float = 5.0) -> dict[str, Any] | None:
    """The status document, or None when the daemon did not answer."""
    try:
        doc: dict[str, Any] = client.call("status", {}, timeout=timeout)
    except (HostvisorError, OSError):
        return None
    return doc


def last_seq(client: ControlClient) -> int:
    events = client.call("events", {}, timeout=10)["events"]
    return int(events[-1]["seq"]) if events else 0


def count_events(client: ControlClient, since: int, name: str) -> int:
    events = client.call("events", {"since": since}, timeout=10)["events"]
    return sum(1 for e in events if e["event"] == name)


def wait_for(
    client: ControlClient,
    proc: subprocess.Popen[bytes],
    begin: float,
    done: Any,
    what: str,
    *,
    pause: float = 0.005,
    timeout: float = 60.0,
) -> tuple[float | None, float, dict[str, Any]]:
    """Poll full ``status`` calls until ``done(doc)``; returns (first answer, done, doc) as
    seconds after ``begin`` (monotonic). Polls: a benchmark may, a test would not."""
    first: float | None = None
    while True:
        doc = status(client)
        now = time.monotonic()
        if doc is not None:
            if first is None:
                first = now - begin
            if done(doc):
                return first, now - begin, doc
        if proc.poll() is not None:
            raise SystemExit(f"bench_reexec: the daemon exited {proc.returncode} before {what}")
        if now - begin > timeout:
            raise SystemExit(f"bench_reexec: timed out waiting for {what}")
        time.sleep(pause)


def all_running(n: int) -> Any:
    def check(doc: dict[str, Any]) -> bool:
        services = doc["services"]
        return len(services) == n and all(s["state"] == "running" for s in services)

    return check


def all_adopted(old: dict[str, int]) -> Any:
    def check(doc: dict[str, Any]) -> bool:
        services = doc["services"]
        return len(services) == len(old) and all(
            s["state"] == "running" and s.get("adopted") is True and s["pid"] == old[s["name"]]
            for s in services
        )

    return check


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in doc["services"]}


def wait_state_file(root: Path, pids: dict[str, int], timeout: float = 10.0) -> None:
    """Until ``<state>/state.json`` names every service with its current pid (written at
    most every 0.2 s): what the next daemon reads after the kill."""
    path = root / "state" / "state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            services = json.loads(path.read_text())["services"]
            if all(
                (services.get(name) or {}).get("instance", {}).get("pid") == pid
                for name, pid in pids.items()
            ):
                return
        time.sleep(0.01)
    raise SystemExit("bench_reexec: the state file never named every running pid")


class Poller(threading.Thread):
    """Back-to-back one-service ``status`` calls; (sent, answered, ok) per call, monotonic."""

    def __init__(self, sock: Path, name: str) -> None:
        super().__init__(daemon=True)
        self.client = ControlClient(sock)
        self.name_ = name
        self.samples: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                self.client.call("status", {"services": [self.name_]}, timeout=POLL_TIMEOUT)
                ok = True
            except (HostvisorError, OSError):
                ok = False
            self.samples.append((sent, time.monotonic(), ok))
            if not ok:
                time.sleep(0.0005)  # a refused connect fails at once: do not spin


class ExecWatch(threading.Thread):
    """Notes the wall clock when ``/proc/PID/cmdline`` changes: the moment of ``execve``
    (the new code runs as ``python -m supervisor``, the console script did not). Never
    fires when the daemon was started as ``python -m supervisor`` itself."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/cmdline")
        self.first = self.path.read_bytes()
        self.at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                if self.path.read_bytes() != self.first:
                    self.at = time.time()
                    return
            time.sleep(0.0005)


def log_time(root: Path, prefix: str, after: float) -> float | None:
    """Wall clock of the first daemon-log line after ``after`` whose message starts with
    ``prefix`` (``<state>/logs/hostvisor.log``: one JSON object a line, with ``time``)."""
    with contextlib.suppress(OSError):
        for raw in (root / "state" / "logs" / "hostvisor.log").read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(raw)
                when = datetime.fromisoformat(entry["time"]).timestamp()
                if when > after and str(entry.get("message", "")).startswith(prefix):
                    return when
    return None


def keepers(sock: Path) -> list[psutil.Process]:
    """The descriptor keepers of this run's daemons: their socket is beside ``sock``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("fdkeeper" in part for part in cmdline) and any(
            part.startswith(f"{sock.parent}/") for part in cmdline
        ):
            found.append(proc)
    return found


# ---------------------------------------------------------------- one run


def one_run(n: int, kills: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="hv-bench-reexec-", dir="/tmp"))
    cfg, sock = write_config(root, n)
    client = ControlClient(sock)
    seen: list[psutil.Process] = []  # every service process of this run, to sweep at the end
    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, Any] = {"root": root}
    try:
        # 1. cold starts: the baseline for adoption (twice: the first daemon is stopped
        # again, the baseline of the adopted daemon's SIGTERM)
        out["cold"] = []
        for first in (True, False):
            begin = time.monotonic()
            procs.append(spawn(cfg, root))
            _, cold, doc = wait_for(client, procs[-1], begin, all_running(n), "cold start")
            out["cold"].append(cold)
            before = by_name(doc)
            for s in before.values():
                with contextlib.suppress(psutil.Error):
                    seen.append(psutil.Process(s["pid"]))
            if first:
                out["sigterm_cold"] = sigterm(procs[-1])

        # 2. reexec, with a poller on the socket
        seq = last_seq(client)
        poller = Poller(sock, "s000")
        watch = ExecWatch(procs[-1].pid)
        poller.start()
        watch.start()
        time.sleep(0.3)  # samples before: the baseline gap
        sent_wall, sent = time.time(), time.monotonic()
        client.call("reexec", {}, timeout=120)
        answered = time.monotonic()
        time.sleep(0.5)
        poller.stop.set()
        watch.stop.set()
        poller.join(5)
        watch.join(5)
        out["reexec_call"] = answered - sent
        ok = [a for _, a, good in poller.samples if good]
        gaps = [(b - a, a) for a, b in itertools.pairwise(ok)]
        longest, gap_from = max(gaps)
        out["gap"] = longest
        out["gap_at"] = (gap_from - sent, gap_from + longest - sent)
        # Where the gap goes: last answer -> execve -> "listening" in the log -> next answer.
        listening = log_time(root, "listening on", sent_wall)
        if watch.at is not None and listening is not None:
            exec_at = watch.at - sent_wall
            out["split"] = (
                exec_at - out["gap_at"][0],
                listening - watch.at,
                out["gap_at"][1] - (listening - sent_wall),
            )
        out["gap_base"] = statistics.median(g for g, a in gaps if a + g < sent)
        out["polls"] = len(poller.samples)
        out["poll_failures"] = sum(1 for *_, good in poller.samples if not good)
        answer = status(client)
        if answer is None:
            raise SystemExit("bench_reexec: no status after the reexec")
        after = by_name(answer)
        out["restarted"] = sum(
            1
            for name, s in before.items()
            if after[name]["pid"] != s["pid"] or after[name]["restarts"] > s["restarts"]
        )
        out["reexec_starting"] = count_events(client, seq, "hostvisor.service.starting")
        out["reexec_same_daemon_pid"] = answer["daemon"]["pid"] == procs[-1].pid

        # 3. kill -9 of the daemon, then a new one adopts
        old = {name: s["pid"] for name, s in after.items()}
        wait_state_file(root, old)
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(10)
        begin = time.monotonic()
        procs.append(spawn(cfg, root))
        out["socket"], out["adopt"], doc = wait_for(
            client, procs[-1], begin, all_adopted(old), "adoption", pause=0.002
        )
        out["adopt_starting"] = count_events(client, 0, "hostvisor.service.starting")
        out["adopt_events"] = count_events(client, 0, "hostvisor.service.adopted")

        # 4. exit detection of adopted processes, on an events follow stream: at once
        # (while the new daemon still starts its supervisors), then after SETTLE seconds
        names = sorted(old)
        step = max(1, len(names) // (2 * kills))
        victims = names[::step][: 2 * kills]
        out["exit_rx"], out["exit_evt"] = detect_exits(client, old, victims[0::2])
        time.sleep(SETTLE)
        out["exit_rx2"], out["exit_evt2"] = detect_exits(client, old, victims[1::2])
    finally:
        stop_all(procs, seen, sock, out)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(sock.parent, ignore_errors=True)
    return out


def detect_exits(
    client: ControlClient, pids: dict[str, int], victims: list[str]
) -> tuple[list[float], list[float]]:
    """SIGKILL the adopted ``victims`` one after another; per kill, seconds until its
    ``exited`` event is received, and the event's own time minus the kill's wall clock."""
    sub = client.stream("events", {"since": last_seq(client)})
    watchdog = threading.Timer(10.0 + len(victims), sub.close)  # never hang on a missed event
    watchdog.start()
    received: list[float] = []
    stamped: list[float] = []
    try:
        stream: Iterator[Any] = iter(sub)
        for name in victims:
            wall = time.time()
            begin = time.monotonic()
            os.kill(pids[name], signal.SIGKILL)
            for event in stream:
                if event["event"] == "hostvisor.service.exited" and event["service"] == name:
                    received.append(time.monotonic() - begin)
                    stamped.append(datetime.fromisoformat(event["time"]).timestamp() - wall)
                    break
    finally:
        watchdog.cancel()
        sub.close()
    return received, stamped


def sigterm(proc: subprocess.Popen[bytes]) -> float:
    """SIGTERM the daemon and wait for it (SIGKILL after 60 s); seconds until it exited."""
    begin = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - begin


def stop_all(
    procs: list[subprocess.Popen[bytes]],
    seen: list[psutil.Process],
    sock: Path,
    out: dict[str, Any],
) -> None:
    """SIGTERM the daemon and wait; then kill (and report) what is left of this run."""
    for proc in procs:
        if proc.poll() is None:
            out["sigterm"] = sigterm(proc)
    out["daemon_exit"] = procs[-1].returncode if procs else None
    left = [p for p in seen if p.is_running()]
    out["left"] = len(left)
    keeping = keepers(sock)
    out["keepers_left"] = len(keeping)
    for leftover in (*left, *keeping):
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    if left:
        print(f"  !! {len(left)} service processes outlived the daemon's SIGTERM", file=sys.stderr)


# ---------------------------------------------------------------- report


def line(label: str, values: list[float], target: float | None = None, unit: str = "ms") -> str:
    scale = 1000 if unit == "ms" else 1
    digits = 1 if unit == "ms" else 2
    med = statistics.median(values)
    text = (
        f"  {label:<42} median {med * scale:8.{digits}f} {unit}  "
        f"(min {min(values) * scale:.{digits}f}, max {max(values) * scale:.{digits}f}, "
        f"n={len(values)})"
    )
    if target is not None:
        verdict = "met" if med <= target else "MISSED"
        text += f"   target <= {target * scale:g} {unit}: {verdict}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, default=200, help="services (default 200)")
    parser.add_argument("--runs", type=int, default=5, help="runs (default 5)")
    parser.add_argument(
        "--kills", type=int, default=10, help="adopted services killed per run (default 10)"
    )
    args = parser.parse_args()
    n = args.services
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}; "
        f"{n} services (sleep 3600, start_seconds=0s), {args.runs} runs"
    )
    runs = []
    for i in range(args.runs):
        r = one_run(n, args.kills)
        runs.append(r)
        split = r.get("split")
        where = (
            f"{split[0] * 1000:.0f} old + {split[1] * 1000:.0f} exec->listening + "
            f"{split[2] * 1000:.0f} to answer"
            if split
            else "exec not seen"
        )
        print(
            f"  run {i + 1}: cold {r['cold'][0]:.3f} / {r['cold'][1]:.3f} s | reexec {r['reexec_call']:.3f} s, gap "
            f"{r['gap'] * 1000:.0f} ms at +{r['gap_at'][0] * 1000:.0f}..+{r['gap_at'][1] * 1000:.0f} "
            f"ms ({where}), {r['poll_failures']}/{r['polls']} polls failed, restarted "
            f"{r['restarted']} | socket {r['socket']:.3f} s, adopted {r['adopt']:.3f} s | exit "
            f"{statistics.median(r['exit_rx']) * 1000:.1f} / "
            f"{statistics.median(r['exit_rx2']) * 1000:.1f} ms | SIGTERM -> exit "
            f"{r['daemon_exit']} in {r['sigterm']:.2f} s (cold daemon {r['sigterm_cold']:.2f} s), left {r['left']} + "
            f"{r['keepers_left']} keepers",
            flush=True,
        )

    def flat(key: str) -> list[Any]:
        return [x for r in runs for x in r[key]]

    def col(key: str) -> list[Any]:
        return [r[key] for r in runs]

    print(f"reexec with {n} services ({args.runs} runs):")
    print(line("`reexec` sent -> answer", col("reexec_call")))
    print(line("longest gap between status answers", col("gap"), TARGET_GAP))
    splits = [r["split"] for r in runs if r.get("split")]
    if splits:
        print(line("  of it: last answer -> execve", [x[0] for x in splits]))
        print(line("  of it: execve -> 'listening on' logged", [x[1] for x in splits]))
        print(line("  of it: 'listening on' -> next answer", [x[2] for x in splits]))
    print(line("  baseline: median gap before reexec", col("gap_base")))
    restarted = col("restarted")
    print(
        f"  services restarted (pid or restarts)     {' / '.join(map(str, restarted))}   "
        f"target 0: {'met' if not any(restarted) else 'MISSED'}"
    )
    print(
        "  `starting` events after the reexec       "
        + " / ".join(map(str, col("reexec_starting")))
        + f"   same daemon pid: {all(col('reexec_same_daemon_pid'))}"
    )
    print(f"adoption after kill -9 of the daemon, {n} services ({args.runs} runs):")
    print(line("spawn -> socket answers", col("socket")))
    print(line(f"spawn -> all {n} adopted, same pids", col("adopt"), TARGET_ADOPT))
    print(line(f"  baseline: cold start, all {n} running", flat("cold")))
    print(
        "  adopted / `starting` events              "
        + " / ".join(
            f"{a}/{s}" for a, s in zip(col("adopt_events"), col("adopt_starting"), strict=True)
        )
    )
    print(
        f"exit of an adopted process (SIGKILL -> `exited` on an events stream), {args.kills} per run:"
    )
    print(line("at once after all adopted: received", flat("exit_rx"), TARGET_EXIT))
    print(line("  the event's own `time`", flat("exit_evt")))
    print(line(f"{SETTLE:g} s later: received", flat("exit_rx2"), TARGET_EXIT))
    print(line("  the event's own `time`", flat("exit_evt2")))
    print(line("SIGTERM -> the adopting daemon exited", col("sigterm"), unit="s"))
    print(line("  baseline: a cold-started daemon", col("sigterm_cold"), unit="s"))
    print(
        f"  exit codes {col('daemon_exit')}; service processes left behind: {sum(col('left'))}; "
        f"keepers left: {sum(col('keepers_left'))}"
    )
    print(f"command: {sys.executable} {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
