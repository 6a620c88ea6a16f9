"""Example worker: prints a line every --interval seconds with its role and queue."""

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    role = os.environ.get("WORKER_ROLE", "?")
    queue = os.environ.get("WORKER_QUEUE", "?")
    print(os.environ.get("WORKER_GREETING", "hello"), flush=True)
    n = 0
    while True:
        n += 1
        print(f"tick {n} role={role} queue={queue}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
