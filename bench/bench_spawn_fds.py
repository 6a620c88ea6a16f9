"""What the daemon's open descriptors cost each spawn (issue 14, restart at 1,000 services).

    .venv/bin/python bench/bench_spawn_fds.py                 # 0, 200, 2,000, 4,000 descriptors
    .venv/bin/python bench/bench_spawn_fds.py --fds 0 4000 --spawns 500

The daemon holds about four descriptors per service (two pipe read ends, a log file, a
pidfd), so at 1,000 services a spawn happens in a process with ~4,000 open
descriptors. ``subprocess.Popen`` here uses ``vfork`` and, in the child,
``close_range(2)`` (seen with ``strace -f``): ``vfork`` shares the memory but not the
descriptor table, so the kernel copies the whole table into the child (one reference
taken per open file) and ``close_range`` drops them again. That work grows with the
number of open descriptors, not with the daemon's memory; this script measures both
apart.

For each count it opens that many descriptors (non-inheritable pipes, as the daemon's
are) and, separately, ten times that number of KiB of heap, then times ``Popen`` of
``/bin/true`` the way the process driver calls it (``start_new_session``,
``close_fds``, stdin from ``/dev/null``, output to ``/dev/null``). Prints medians in
milliseconds and the ratio to the run with no extra descriptors, measured in the same
process. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import time


def popen_median(spawns: int, devnull: int) -> float:
    """Median seconds of one ``Popen`` (until it returns, the child has exec'd)."""
    times = []
    for _ in range(spawns):
        start = time.perf_counter()
        child = subprocess.Popen(
            ["/bin/true"],
            stdin=devnull,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        times.append(time.perf_counter() - start)
        child.wait()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fds", type=int, nargs="+", default=[0, 200, 2000, 4000])
    parser.add_argument("--spawns", type=int, default=300)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    base = popen_median(args.spawns, devnull)
    print(f"Popen of /bin/true, median of {args.spawns}, same process:")
    print(f"  {'no extra descriptors':<34}{base * 1e3:8.3f} ms")
    for count in args.fds:
        if count == 0:
            continue
        pipes = [os.pipe() for _ in range(count // 2)]
        with_fds = popen_median(args.spawns, devnull)
        for r, w in pipes:
            os.close(r)
            os.close(w)
        heap = [bytearray(1024) for _ in range(count * 10)]
        with_heap = popen_median(args.spawns, devnull)
        del heap
        print(
            f"  {f'{count} descriptors open':<34}{with_fds * 1e3:8.3f} ms"
            f"  (x{with_fds / base:.2f}, {(with_fds - base) / count * 1e9:.0f} ns each)"
        )
        print(
            f"  {f'{count * 10} KiB more heap, no fds':<34}{with_heap * 1e3:8.3f} ms  (x{with_heap / base:.2f})"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
