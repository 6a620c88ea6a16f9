"""Keep forking short-lived children that hold many descriptors, until killed.

Usage: probes_fd_churn.py FDS [PARALLEL]

Each child opens FDS descriptors (dups of stdin), lives a few milliseconds and exits,
so that a scan of ``/proc/*/fd`` keeps meeting processes that vanish while it reads
their descriptor table. PARALLEL children (default 4) live at once. Prints "ready"
once the first children run.
"""

import os
import sys
import time

fds = int(sys.argv[1])
parallel = int(sys.argv[2]) if len(sys.argv) > 2 else 4
live: set[int] = set()
announced = False
serial = 0
while True:
    while len(live) < parallel:
        serial += 1
        pid = os.fork()
        if pid == 0:
            for _ in range(fds):
                os.dup(0)
            time.sleep(0.001 * (serial % 7))
            os._exit(0)
        live.add(pid)
    if not announced:
        print("ready", flush=True)
        announced = True
    pid, _ = os.wait()
    live.discard(pid)
