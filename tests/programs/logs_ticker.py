"""Write ``tick <n>`` every INTERVAL seconds on stdout until stdin closes (or is killed)."""

import os
import sys
import threading
import time

interval = float(sys.argv[1])
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
n = 0
while True:
    os.write(1, b"tick %06d\n" % n)
    n += 1
    time.sleep(interval)
