"""Test service: prints its pid and sleeps until signalled."""

import os
import time

print(f"pid {os.getpid()}", flush=True)
while True:
    time.sleep(3600)
