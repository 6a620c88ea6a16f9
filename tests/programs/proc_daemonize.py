"""Double-fork a grandchild that calls setsid() (leaves our process group, keeps
the environment) and sleeps, ignoring SIGTERM if asked; print its pid, then
either exit (``exit``) or keep sleeping (``stay``)."""

import os
import signal
import sys
import time

mode = sys.argv[1]
stubborn = len(sys.argv) > 2 and sys.argv[2] == "stubborn"
read_fd, write_fd = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        if stubborn:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(write_fd, b"%d\n" % os.getpid())
        os.close(write_fd)
        while True:
            time.sleep(60)
    os._exit(0)
os.close(write_fd)
os.wait()
pid = int(os.read(read_fd, 64))
print(f"grandchild {pid}", flush=True)
if mode == "exit":
    sys.exit(0)
while True:
    time.sleep(60)
