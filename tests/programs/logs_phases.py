"""Write COUNT numbered lines of SIZE bytes on stdout, say ``phase1`` on stderr, wait for a
line on stdin, then write AFTER lines ``after <n>`` and exit."""

import os
import sys

count, size, after = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def put(line: bytes) -> None:
    view = memoryview(line)
    while view:
        view = view[os.write(1, view) :]


for n in range(count):
    head = b"line %06d " % n
    put(head + b"x" * (size - len(head) - 1) + b"\n")
os.write(2, b"phase1\n")
sys.stdin.readline()
for n in range(after):
    put(b"after %06d\n" % n)
