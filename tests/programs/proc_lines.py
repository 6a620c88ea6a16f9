"""Write COUNT numbered lines of SIZE bytes on BOTH stdout and stderr, then exit at once.

Each line: ``<stream> <number> <filler>\\n``, written with one os.write per line.
"""

import os
import sys

count, size = int(sys.argv[1]), int(sys.argv[2])
for n in range(count):
    for fd, name in ((1, b"out"), (2, b"err")):
        head = b"%s %06d " % (name, n)
        line = head + b"x" * (size - len(head) - 1) + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
os._exit(0)
