"""Test service: prints its pid, sleeps --after seconds, exits with --code."""

import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--after", type=float, default=0.0)
parser.add_argument("--code", type=int, default=1)
args = parser.parse_args()
print(f"pid {os.getpid()}", flush=True)
time.sleep(args.after)
raise SystemExit(args.code)
