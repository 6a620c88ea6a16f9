"""``hostvisor status`` against ``supervisorctl status``, 200 services each (issue 3).

    .venv/bin/python bench/bench_status.py                 # 200 services, median of 20 runs
    .venv/bin/python bench/bench_status.py --services 50 --runs 40

Starts a real ``hostvisor run`` and a real ``supervisord``, each running the same
N ``sleep 3600`` programs, waits until every one is running in both, then times the
whole process of ``hostvisor status`` and of ``supervisorctl status`` (fork, exec,
interpreter start-up, imports, the query, the table), once with the output to
/dev/null (what a script sees) and once to a pseudo-terminal (what a user sees:
hostvisor draws its coloured table), alternating the tools so that noise hits both
alike. Prints both medians and their ratio for each. A plain script: prints figures, asserts nothing but
that both commands answered with every service running.

supervisord is installed into its own virtual environment (``--venv``, default
/tmp/hv-bench-supervisord-venv, created with ``python3 -m venv`` and ``pip install
supervisor`` if missing), never into hostvisor's: both use the import name ``supervisor``.
"""

from __future__ import annotations

import argparse
import os
import pty
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLEEP = shutil.which("sleep") or "/bin/sleep"
DEFAULT_VENV = Path("/tmp/hv-bench-supervisord-venv")
TARGET_SECONDS = 0.100


def hostvisor_argv() -> list[str]:
    """The console script next to this interpreter, as a user runs it; else ``-m supervisor``."""
    script = Path(sys.executable).parent / "hostvisor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "supervisor"]


def supervisord_venv(venv: Path) -> Path:
    """``venv/bin``, with supervisor installed there (never in hostvisor's environment)."""
    bin_dir = venv / "bin"
    if not (bin_dir / "supervisorctl").exists():
        print(f"installing supervisor into {venv} ...", file=sys.stderr)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", "supervisor"], check=True)
    return bin_dir


def clean_env() -> dict[str, str]:
    """Our environment without variables that would point either tool elsewhere."""
    drop = ("HOSTVISOR_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "NO_COLOR")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# ---------------------------------------------------------------- the two daemons


def write_hostvisor(root: Path, n: int) -> Path:
    units = root / "hv" / "units"
    units.mkdir(parents=True)
    config = root / "hv" / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{root / "hv" / "state"}"\nsocket = "{root / "hv.sock"}"\n'
        'log_level = "warning"\nshutdown_timeout = "20s"\n'
    )
    for i in range(n):
        (units / f"svc-{i:03d}.toml").write_text(
            f'command = ["{SLEEP}", "3600"]\nstart_seconds = "1s"\n'
        )
    for path in (config, *units.iterdir()):
        path.chmod(0o644)
    return config


def write_supervisord(root: Path, n: int) -> Path:
    folder = root / "sd"
    (folder / "logs").mkdir(parents=True)
    sock = root / "sd.sock"
    lines = [
        "[unix_http_server]",
        f"file = {sock}",
        "chmod = 0700",
        "[supervisord]",
        f"logfile = {folder / 'supervisord.log'}",
        f"pidfile = {folder / 'supervisord.pid'}",
        f"childlogdir = {folder / 'logs'}",
        "loglevel = warn",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]",
        f"serverurl = unix://{sock}",
    ]
    for i in range(n):
        lines += [f"[program:svc-{i:03d}]", f"command = {SLEEP} 3600", "startsecs = 1"]
    conf = folder / "supervisord.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def wait_until(
    check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float = 120.0
) -> float:
    """Seconds until ``check()`` holds. Polls: a benchmark may, a test would not."""
    begin = time.monotonic()
    while not check():
        if proc.poll() is not None:
            raise SystemExit(f"bench_status: exited {proc.returncode} before {what}")
        if time.monotonic() - begin > timeout:
            raise SystemExit(f"bench_status: timed out waiting for {what}")
        time.sleep(0.25)
    return time.monotonic() - begin


def answers(argv: Sequence[str], n: int) -> bool:
    """True if ``argv`` exits 0 and lists ``n`` services as running."""
    result = subprocess.run(argv, capture_output=True, text=True, env=clean_env())
    running = sum(1 for line in result.stdout.splitlines() if " running " in f" {line.lower()} ")
    return result.returncode == 0 and running == n


def time_once(argv: Sequence[str], *, tty: bool = False) -> float:
    """Wall-clock seconds of one whole process; its output to /dev/null or to a pty."""
    env = {**clean_env(), "TERM": "xterm-256color", "COLUMNS": "120"} if tty else clean_env()
    master, slave = pty.openpty() if tty else (-1, subprocess.DEVNULL)
    drain = threading.Thread(target=_drain, args=(master,), daemon=True)
    if tty:
        drain.start()
    try:
        begin = time.perf_counter()
        code = subprocess.call(argv, stdout=slave, stderr=slave, env=env)
        elapsed = time.perf_counter() - begin
    finally:
        if tty:
            os.close(slave)
            drain.join(5)
    if code != 0:
        raise SystemExit(f"bench_status: {' '.join(argv)} exited {code}")
    return elapsed


def _drain(fd: int) -> None:
    """Read a pty master until the other side is closed (EIO on Linux), then close it."""
    try:
        while os.read(fd, 1 << 16):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- main


def run(n: int, runs: int, venv: Path) -> None:
    bin_dir = supervisord_venv(venv)
    root = Path(tempfile.mkdtemp(prefix="hvbs-", dir="/tmp"))
    hv_config = write_hostvisor(root, n)
    sd_conf = write_supervisord(root, n)
    hv_status = [*hostvisor_argv(), "status", "-c", str(hv_config)]
    sd_status = [str(bin_dir / "supervisorctl"), "-c", str(sd_conf), "status"]
    procs = [
        subprocess.Popen(
            [*hostvisor_argv(), "run", "-c", str(hv_config)],
            stderr=subprocess.DEVNULL,
            env=clean_env(),
        ),
        subprocess.Popen(
            [str(bin_dir / "supervisord"), "-n", "-c", str(sd_conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=clean_env(),
            cwd=root,
        ),
    ]
    try:
        up = wait_until(lambda: answers(hv_status, n), f"hostvisor: {n} services running", procs[0])
        print(f"hostvisor: {n} services running after {up:.1f}s")
        up = wait_until(
            lambda: answers(sd_status, n), f"supervisord: {n} programs running", procs[1]
        )
        print(f"supervisord: {n} programs running after {up:.1f}s more")
        time_once(hv_status), time_once(sd_status)  # warm the page cache for both
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(runs):
            for tty in (False, True):
                for label, argv in (("hostvisor", hv_status), ("supervisorctl", sd_status)):
                    times.setdefault((label, tty), []).append(time_once(argv, tty=tty))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nwhole-process time of `status` with {n} services, median of {runs} runs:")
    for tty in (False, True):
        report(times[("hostvisor", tty)], times[("supervisorctl", tty)], tty=tty)
    print(f"commands:\n  {' '.join(hv_status)}\n  {' '.join(sd_status)}")


def report(hv: list[float], sd: list[float], *, tty: bool) -> None:
    hv_med, sd_med = statistics.median(hv), statistics.median(sd)
    print("output to a terminal (a pty):" if tty else "output to /dev/null:")
    for label, values, med in (
        ("hostvisor status", hv, hv_med),
        ("supervisorctl status", sd, sd_med),
    ):
        print(
            f"  {label:<22} {med * 1000:7.1f} ms   (min {min(values) * 1000:.1f}, "
            f"max {max(values) * 1000:.1f})"
        )
    verdict = "met" if hv_med <= TARGET_SECONDS and hv_med < sd_med else "MISSED"
    print(
        f"  ratio supervisorctl / hostvisor: {sd_med / hv_med:.2f}x; target "
        f"(<= {TARGET_SECONDS * 1000:.0f} ms and faster than supervisorctl): {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, default=200, help="services in each (default 200)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each (default 20)")
    parser.add_argument(
        "--venv",
        type=Path,
        default=DEFAULT_VENV,
        help=f"supervisord's venv (default {DEFAULT_VENV})",
    )
    args = parser.parse_args()
    run(args.services, args.runs, args.venv)


if __name__ == "__main__":
    main()
