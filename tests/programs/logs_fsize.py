"""Under RLIMIT_FSIZE = LIMIT bytes (SIGXFSZ ignored, as the daemon does), append numbered
1000-byte lines and one line longer than the limit to a RotatingLog at PATH; print the
outcomes as JSON."""

import json
import resource
import signal
import sys
from pathlib import Path

from supervisor.logfiles import RotatingLog

path, limit = Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
log = RotatingLog(path, max_size=10 * limit, backups=20)
outcomes = []
for n in range(200):
    if n == 100:
        outcomes.append(log.append(b"huge " + b"h" * (2 * limit) + b"\n"))
    head = b"line %06d " % n
    # Three lines per write: a write that crosses the limit is cut short mid-batch.
    outcomes.append(log.append((head + b"x" * (999 - len(head)) + b"\n") * 3))
log.close()
print(json.dumps([[o.dropped_bytes, o.dropped_lines, o.error] for o in outcomes]))
