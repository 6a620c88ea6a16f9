"""A process tree for the resource figures: ``--children N`` sleeping children,
``--busy`` a child that spins on a core, ``--alloc MIB`` a child that allocates and
touches MIB mebibytes, ``--escape MIB`` a double-forked ``setsid`` grandchild (it keeps
the environment, so the marker, and is re-parented to the daemon) holding MIB mebibytes.
Prints ``ready`` once every child is in place, then sleeps until killed."""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--children", type=int, default=0)
parser.add_argument("--busy", action="store_true")
parser.add_argument("--alloc", type=int, default=0)
parser.add_argument("--escape", type=int, default=-1)
parser.add_argument("--self-alloc", type=int, default=0)
args = parser.parse_args()


def hold(mib: int) -> None:
    block = b"\x01" * (mib << 20)  # filled, so every page is resident
    os.write(ready_w, b"x")
    while True:
        time.sleep(60 + len(block) * 0)


def child(body: object) -> None:
    if os.fork() == 0:
        try:
            body()  # type: ignore[operator]
        finally:
            os._exit(0)


ready_r, ready_w = os.pipe()
expected = 0
for _ in range(args.children):
    expected += 1
    child(lambda: (os.write(ready_w, b"x"), time.sleep(3600)))
if args.busy:
    expected += 1

    def spin() -> None:
        os.write(ready_w, b"x")
        while True:
            pass

    child(spin)
if args.alloc:
    expected += 1
    child(lambda: hold(args.alloc))
if args.escape >= 0:
    expected += 1
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            hold(args.escape)
        os._exit(0)
    os.wait()
got = 0
while got < expected:
    got += len(os.read(ready_r, 64))
ballast = b"\x01" * (args.self_alloc << 20)
print("ready", flush=True)
sys.stdout.flush()
while True:
    time.sleep(60 + len(ballast) * 0)
