"""A DaemonLog whose stderr nobody reads: write COUNT messages, say ``wrote`` on stdout,
then wait for a line on stdin and close (flushing stderr)."""

import sys

from supervisor.daemonlog import DaemonLog

count = int(sys.argv[1])
log = DaemonLog(None)
for n in range(count):
    log.write("info", f"message {n:06d} " + "y" * 80)
print("wrote", log.stderr_dropped, flush=True)
sys.stdin.readline()
log.write("info", "after the reader came back")
log.close()
