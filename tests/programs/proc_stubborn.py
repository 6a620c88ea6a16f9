"""Ignore SIGTERM, print "ready", and sleep until killed.

With ``member``: the leader forks a member of its group that ignores SIGTERM
(printed as "member <pid>" before "ready"), while the leader itself exits on SIGTERM.
"""

import os
import signal
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "leader"
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "member":
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(60)
    print(f"member {child}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
print("ready", flush=True)
while True:
    time.sleep(60)
