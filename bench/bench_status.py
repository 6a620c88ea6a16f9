"""Whole-process time of ``hostvisor status``: 200 services piped, 1,000 ``--json`` (issue 14).

    .venv/bin/python bench/bench_status.py --old /work/old-tree     # medians of 20 runs
    .venv/bin/python bench/bench_status.py --old DIR --compat-venv /tmp/hv-compat --supervisord

Starts a real ``hostvisor run`` with N ``sleep 3600`` services (200, then 1,000), waits
until every one is running, then times the whole process (fork, exec, interpreter
start-up, imports, the query, the output) of, in turns so that noise hits all alike:

- the floors of any Python CLI with this interpreter: ``python -c pass`` and
  ``python -I -S -c pass`` (no site: no .pth files, no editable-install finder);
- ``hostvisor status`` (this tree's console script), piped to /dev/null, and on a
  pseudo-terminal where it draws its coloured table with rich;
- the old tree (``--old DIR``: ``python -m supervisor`` with ``PYTHONPATH=DIR``);
- with ``--compat-venv DIR``: the same tree installed in a venv of its own with
  ``pip install --no-deps -e . --config-settings editable_mode=compat`` (a plain .pth
  entry instead of setuptools' import-hook finder), its ``python -c pass`` and status;
- with ``--supervisord``: ``supervisorctl status`` of the same N programs (supervisord
  in a venv of its own, ``--venv``, created with ``pip install supervisor`` if missing:
  it uses the import name ``supervisor`` too).

``hostvisor status -c CONFIG`` finds the socket in the config; ``supervisor.socketcache``
remembers it with the config's bytes (the first timed run fills the cache), and
the same command with an unusable cache folder (the config parsed by tomllib every time)
is timed beside it.

At 1,000 services the same is timed for ``status --json`` (no terminal). Prints each
median beside the floors and the old tree's, and the targets: 200 piped <= 30 ms,
1,000 ``--json`` <= 60 ms. Asserts nothing but that each command answered, every
service running.

Both trees are byte-compiled first (``compileall``) and ``PYTHONDONTWRITEBYTECODE`` is
dropped from the children's environment: with it set (this sandbox sets it), every start
compiles every imported module from source, which is not what an installed hostvisor does.
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
TARGET_TABLE = 0.030  # 200 services, piped
TARGET_JSON = 0.060  # 1,000 services, --json


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
    drop = (
        "HOSTVISOR_",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "NO_COLOR",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
    )
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


def time_once(
    argv: Sequence[str], *, tty: bool = False, extra: dict[str, str] | None = None
) -> float:
    """Wall-clock seconds of one whole process; its output to /dev/null or to a pty.
    ``extra``: environment on top of :func:`clean_env` (the old tree's PYTHONPATH). Run in
    ``/``: ``python -m`` puts the working folder first on sys.path, which from a
    checkout would shadow the old tree's PYTHONPATH with this one."""
    env = {**clean_env(), "TERM": "xterm-256color", "COLUMNS": "120"} if tty else clean_env()
    env.update(extra or {})
    master, slave = pty.openpty() if tty else (-1, subprocess.DEVNULL)
    drain = threading.Thread(target=_drain, args=(master,), daemon=True)
    if tty:
        drain.start()
    try:
        begin = time.perf_counter()
        code = subprocess.call(argv, stdout=slave, stderr=slave, env=env, cwd="/")
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


class Command:
    """One timed command: ``argv`` with ``extra`` environment, under ``label``."""

    def __init__(self, label: str, argv: Sequence[str], extra: dict[str, str] | None = None):
        self.label, self.argv, self.extra = label, list(argv), extra or {}


COMPAT = ("--config-settings", "editable_mode=compat")


def compat_venv(venv: Path) -> Path:
    """``venv/bin``, with this tree installed editable in compat mode (a .pth, no finder).

    Without the dependencies (``--no-deps``): the fast path of ``status`` needs none,
    so it is timed piped only (on a terminal the table needs rich)."""
    bin_dir = venv / "bin"
    if not (bin_dir / "hostvisor").exists():
        print(f"installing this tree into {venv} (editable_mode=compat) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(bin_dir / "pip"), "install", "-q", "--no-deps", "-e", str(ROOT), *COMPAT],
            check=True,
        )
    return bin_dir


def floors(python: str, label: str = "") -> list[Command]:
    return [
        Command(f"python -c pass{label}", [python, "-c", "pass"]),
        Command(f"python -I -S -c pass{label}", [python, "-I", "-S", "-c", "pass"]),
    ]


def measure(commands: list[Command], runs: int, *, tty: bool = False) -> dict[str, list[float]]:
    """Each command ``runs`` times, in turns; seconds per label."""
    for command in commands:  # warm the page cache
        time_once(command.argv, extra=command.extra, tty=tty)
    times: dict[str, list[float]] = {c.label: [] for c in commands}
    for _ in range(runs):
        for command in commands:
            times[command.label].append(time_once(command.argv, extra=command.extra, tty=tty))
    return times


def report(title: str, times: dict[str, list[float]], target: tuple[str, float] | None) -> None:
    print(title)
    for label, values in times.items():
        med = statistics.median(values)
        print(
            f"  {label:<44} {med * 1000:7.1f} ms   (min {min(values) * 1000:.1f}, "
            f"max {max(values) * 1000:.1f})"
        )
    if target is not None:
        label, limit = target
        med = statistics.median(times[label])
        verdict = "met" if med <= limit else "MISSED"
        print(f"  target: {label} <= {limit * 1000:.0f} ms: {verdict}")


def phase(n: int, runs: int, args: argparse.Namespace, *, json_output: bool) -> None:
    """A daemon with ``n`` services; time status (table, piped and on a pty) or --json."""
    root = Path(tempfile.mkdtemp(prefix="hvbs-", dir="/tmp"))
    hv_config = write_hostvisor(root, n)
    flags = ["--json"] if json_output else []
    status = ["status", *flags, "-c", str(hv_config)]
    hv = Command(
        f"hostvisor status{' --json' if json_output else ''} (this tree)",
        [*hostvisor_argv(), *status],
        {"XDG_CACHE_HOME": str(root / "cache")},
    )
    (root / "no-cache").write_text("a file: the cache folder cannot be made under it")
    parsed = Command(
        "  the same, config parsed (no cache)",
        [*hostvisor_argv(), *status],
        {"XDG_CACHE_HOME": str(root / "no-cache" / "cache")},
    )
    commands = [*floors(sys.executable), hv, parsed]
    if args.old:
        old = Command(
            "old tree (python -m supervisor)",
            [sys.executable, "-m", "supervisor", *status],
            {"PYTHONPATH": str(args.old)},
        )
        commands.append(old)
    if args.compat_venv:
        bin_dir = compat_venv(args.compat_venv)
        commands += floors(str(bin_dir / "python"), " (compat venv)")
        commands.append(
            Command(
                f"hostvisor {' '.join(status[:-2])} (compat venv)",
                [str(bin_dir / "hostvisor"), *status],
            )
        )
    procs = [
        subprocess.Popen(
            [*hostvisor_argv(), "run", "-c", str(hv_config)],
            stderr=subprocess.DEVNULL,
            env=clean_env(),
        )
    ]
    sd_status: list[str] = []
    if args.supervisord and not json_output:
        bin_dir = supervisord_venv(args.venv)
        sd_conf = write_supervisord(root, n)
        sd_status = [str(bin_dir / "supervisorctl"), "-c", str(sd_conf), "status"]
        procs.append(
            subprocess.Popen(
                [str(bin_dir / "supervisord"), "-n", "-c", str(sd_conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=clean_env(),
                cwd=root,
            )
        )
        commands.append(Command("supervisorctl status", sd_status))
    try:
        table = [*hostvisor_argv(), "status", "-c", str(hv_config)]
        up = wait_until(lambda: answers(table, n), f"hostvisor: {n} services running", procs[0])
        print(f"\nhostvisor: {n} services running after {up:.1f}s")
        if sd_status:
            up = wait_until(lambda: answers(sd_status, n), f"supervisord: {n} running", procs[1])
            print(f"supervisord: {n} programs running after {up:.1f}s more")
        times = measure(commands, runs)
        what = "status --json" if json_output else "status"
        target = (hv.label, TARGET_JSON if json_output else TARGET_TABLE)
        report(
            f"whole-process time, {n} services, output to /dev/null, median of {runs}:",
            times,
            target,
        )
        if not json_output:
            tty = [
                c for c in commands if not c.label.startswith("python") and "compat" not in c.label
            ]
            report(
                f"the same `{what}` on a terminal (a pty; rich draws the table):",
                measure(tty, runs, tty=True),
                None,
            )
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)
    print("commands:")
    for command in commands:
        env = " ".join(f"{k}={v}" for k, v in command.extra.items())
        print(f"  {env + ' ' if env else ''}{' '.join(command.argv)}")


def compile_trees(trees: Sequence[Path]) -> None:
    """Write the .pyc files an installed hostvisor has (never timed from source)."""
    for tree in trees:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(tree / "supervisor")],
            check=True,
            stdout=subprocess.DEVNULL,
            env=clean_env(),
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, default=200, help="the table's (default 200)")
    parser.add_argument("--json-services", type=int, default=1000, help="--json's (default 1000)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs of each (default 20)")
    parser.add_argument("--old", type=Path, help="a tree of the old code, to time beside")
    parser.add_argument("--compat-venv", type=Path, help="also time a compat-mode editable venv")
    parser.add_argument("--supervisord", action="store_true", help="also time supervisorctl")
    parser.add_argument(
        "--venv",
        type=Path,
        default=DEFAULT_VENV,
        help=f"supervisord's venv (default {DEFAULT_VENV})",
    )
    args = parser.parse_args()
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("note: PYTHONDONTWRITEBYTECODE is set here; dropped for the timed commands")
    compile_trees([ROOT, *([args.old] if args.old else [])])
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    phase(args.services, args.runs, args, json_output=False)
    if args.json_services:
        phase(args.json_services, args.runs, args, json_output=True)


if __name__ == "__main__":
    main()
