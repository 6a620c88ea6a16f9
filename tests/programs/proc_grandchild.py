"""Print "out" and "err", fork a grandchild in our group that sleeps, print its
pid, and sleep: a command that never ends by itself."""

import os
import sys
import time

print("out", flush=True)
print("err", file=sys.stderr, flush=True)
child = os.fork()
if child == 0:
    while True:
        time.sleep(60)
print(f"grandchild {child}", flush=True)
while True:
    time.sleep(60)
