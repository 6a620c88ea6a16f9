"""Fork a member of our group that lives DELAY seconds, print its pid and exit
with code 7 at once: the member outlives the leader."""

import os
import sys
import time

delay = float(sys.argv[1])
child = os.fork()
if child == 0:
    time.sleep(delay)
    os._exit(0)
print(f"member {child}", flush=True)
os._exit(7)
