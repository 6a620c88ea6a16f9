"""Write COUNT distinct lines of SIZE bytes each on stdout as fast as the pipe takes them, then exit 0.

python control_flood.py COUNT SIZE
"""

import os
import sys

count, size = int(sys.argv[1]), int(sys.argv[2])
filler = b"f" * size
for number in range(count):
    head = b"line %d " % number
    view = memoryview(head + filler[: size - len(head) - 1] + b"\n")
    while view:
        view = view[os.write(1, view) :]
