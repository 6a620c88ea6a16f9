"""Test service: prints ``pid N`` at start, then on each SIGUSR1 writes --count numbered lines
(``line 0000 xxx...``, --size bytes each, one os.write per line) to stdout; sleeps otherwise."""

import argparse
import os
import signal

parser = argparse.ArgumentParser()
parser.add_argument("--count", type=int, default=40)
parser.add_argument("--size", type=int, default=100)
args = parser.parse_args()
batch = 0


def chatter(signum: int, frame: object) -> None:
    global batch
    for n in range(args.count):
        head = b"line %02d-%04d " % (batch, n)
        os.write(1, head + b"x" * (args.size - len(head) - 1) + b"\n")
    batch += 1


signal.signal(signal.SIGUSR1, chatter)
os.write(1, b"pid %d\n" % os.getpid())
while True:
    signal.pause()
