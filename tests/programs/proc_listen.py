"""Listen on TCP PORT (FAMILY 4 or 6, on any address), print "ready", sleep.

With ``stubborn``: ignore SIGTERM.
"""

import signal
import socket
import sys
import time

port, family = int(sys.argv[1]), sys.argv[2]
if len(sys.argv) > 3 and sys.argv[3] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if family == "6":
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(("::", port))
else:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", port))
sock.listen()
print("ready", flush=True)
while True:
    time.sleep(60)
