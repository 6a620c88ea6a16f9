"""How long a drain's disk writes stall the event loop for everyone else (issue 9 item 5).

    .venv/bin/python bench/bench_drain_stall.py                 # 3 runs of 3 s per case
    .venv/bin/python bench/bench_drain_stall.py --delay 0.05 --runs 5

A child writes 200-byte lines, about 2,000 a second, into a pipe that a drain copies
into a RotatingLog, while a ticker task on the same event loop asks to wake every
5 ms and records how late it wakes (the stall other services' probes, restarts and
control calls would see). Four cases:

- ``inline`` (0.1.0): the drain writes the file itself, on the event loop, as 0.1.0
  did (its loop is reproduced here: read, write whole lines, checkpoint);
- ``thread`` (now): :func:`supervisor.logfiles.drain_all`, whose writes run in the
  log writer threads;

each on the real disk (``tmp``) and on a slow disk (``slow``): every ``write(2)`` of
a log file takes ``--delay`` seconds longer (20 ms by default; the kind of stall a
USB disk, a busy NFS server or dirty-page throttling gives), simulated by wrapping
the one function that writes log files.

Prints, per case, the medians over the runs of the ticker's median, p99 and worst
lateness in milliseconds, and the lines that reached the file. A plain script:
prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.lowlevel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor import logfiles  # noqa: E402
from supervisor.logfiles import READ_SIZE, RotatingLog, drain_all, open_pipe  # noqa: E402

WRITER = """
import os, sys, time
end = time.monotonic() + float(sys.argv[1])
line = b"x" * 199 + b"\\n"
while time.monotonic() < end:
    for _ in range(20):
        os.write(1, line)
    time.sleep(0.01)
"""
TICK = 0.005


async def inline_drain(fd: int, log: RotatingLog) -> None:
    """0.1.0's drain: whole lines written synchronously on the event loop."""
    pending = b""
    try:
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not chunk:
                break
            cut = chunk.rfind(b"\n") + 1
            if cut:
                with contextlib.suppress(OSError):
                    log.write(pending + chunk[:cut])
                pending = chunk[cut:]
            else:
                pending += chunk
            await anyio.lowlevel.checkpoint()
    finally:
        os.close(fd)
        log.close()


async def thread_drain(fd: int, log: RotatingLog) -> None:
    await drain_all([fd], log)


async def one_run(
    seconds: float, folder: Path, drain: Callable[[int, RotatingLog], Awaitable[None]]
) -> tuple[list[float], int]:
    path = folder / f"bench-{time.monotonic_ns()}.log"
    log = RotatingLog(path, max_size=1 << 30, backups=1)
    read_fd, write_fd, _ = open_pipe(0)
    argv = [sys.executable, "-c", WRITER, str(seconds)]
    child = subprocess.Popen(argv, stdout=write_fd)  # noqa: ASYNC220  # before the measuring
    os.close(write_fd)
    late: list[float] = []

    async def ticker(scope: anyio.CancelScope) -> None:
        while not scope.cancel_called:
            start = time.perf_counter()
            await anyio.sleep(TICK)
            late.append(max(0.0, time.perf_counter() - start - TICK))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker, tg.cancel_scope)
        await drain(read_fd, log)
        tg.cancel_scope.cancel()
    child.wait()  # it has closed its pipe: exited or about to
    lines = path.read_bytes().count(b"\n")
    path.unlink()
    return late, lines


def slow_disk(delay: float) -> Callable[[], None]:
    """Make every write(2) of a log file take ``delay`` seconds longer; returns the undo."""
    original = logfiles._File._out

    def slow(self: logfiles._File, data: memoryview) -> None:
        time.sleep(delay)
        original(self, data)

    logfiles._File._out = slow  # type: ignore[method-assign]

    def undo() -> None:
        logfiles._File._out = original  # type: ignore[method-assign]

    return undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.02, help="slow disk: s per write")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hv-bench-stall-"))
    print(
        f"ticker every {TICK * 1000:g} ms next to a drain of ~2,000 lines/s (200 B), "
        f"{args.runs} runs of {args.seconds:g} s; lateness in ms, medians over runs"
    )
    print(f"{'case':<24}{'median':>9}{'p99':>9}{'worst':>9}{'lines':>9}")
    for disk in ("tmp", "slow"):
        for name, drain in (("inline (0.1.0)", inline_drain), ("thread (now)", thread_drain)):
            undo = slow_disk(args.delay) if disk == "slow" else (lambda: None)
            medians, p99s, worsts, counts = [], [], [], []
            try:
                for _ in range(args.runs):
                    late, lines = anyio.run(one_run, args.seconds, folder, drain)
                    late.sort()
                    medians.append(statistics.median(late) * 1000)
                    p99s.append(late[int(len(late) * 0.99)] * 1000)
                    worsts.append(late[-1] * 1000)
                    counts.append(lines)
            finally:
                undo()
            label = f"{name}, {disk}"
            print(
                f"{label:<24}{statistics.median(medians):>9.2f}{statistics.median(p99s):>9.2f}"
                f"{statistics.median(worsts):>9.2f}{int(statistics.median(counts)):>9}"
            )
    os.rmdir(folder)


if __name__ == "__main__":
    main()
