"""Test service for re-exec and adoption: prints ``pid N``; on each SIGUSR1 writes --count
numbered lines ``n 000042`` (each in two os.write calls, so a drain sees partial lines);
with --every S also one line every S seconds; exits with code --code on SIGUSR2.
Lines are numbered across batches, so a test can check each appears exactly once."""

import argparse
import os
import signal
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--count", type=int, default=100)
parser.add_argument("--every", type=float, default=0.0)
parser.add_argument("--code", type=int, default=7)
args = parser.parse_args()
counter = 0


def line() -> None:
    global counter
    text = b"n %06d\n" % counter
    os.write(1, text[:4])
    os.write(1, text[4:])
    counter += 1


wanted = {signal.SIGUSR1, signal.SIGUSR2}
signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
os.write(1, b"pid %d\n" % os.getpid())
while True:
    info = signal.sigtimedwait(wanted, args.every) if args.every else signal.sigwaitinfo(wanted)
    if info is None:
        line()
    elif info.si_signo == signal.SIGUSR2:
        sys.exit(args.code)
    else:
        for _ in range(args.count):
            line()
