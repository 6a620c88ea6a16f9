"""Write SIZE bytes on stdout without any newline, then exit."""

import os
import sys

size = int(sys.argv[1])
block = b"y" * (1 << 20)
left = size
while left:
    view = memoryview(block)[: min(left, len(block))]
    left -= len(view)
    while view:
        view = view[os.write(1, view) :]
