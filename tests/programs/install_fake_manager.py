"""Stand-in for systemctl, loginctl and launchctl: records each call, answers like the real one.

Run as ``install_fake_manager.py TOOL ARGS...`` (the test puts a ``TOOL`` wrapper on PATH).
Appends ``TOOL ARGS...`` as one line to ``$FAKE_MANAGER_LOG``. Behaviour, from the environment:

- ``FAKE_MANAGER_FAIL=<subcommand>``: that subcommand exits 1 with a systemd-like message.
- ``FAKE_LINGER=yes|no``: what ``loginctl show-user`` reports (default ``no``).
- ``FAKE_LOADED=1``: ``launchctl print`` succeeds (the agent is loaded); else it exits 113.
"""

import os
import sys

tool, *args = sys.argv[1:]
with open(os.environ["FAKE_MANAGER_LOG"], "a", encoding="utf-8") as log:
    log.write(" ".join([tool, *args]) + "\n")
words = [a for a in args if not a.startswith("-")]
subcommand = words[0] if words else ""
if subcommand == os.environ.get("FAKE_MANAGER_FAIL"):
    print(f"Job for hostvisor.service failed ({tool} {subcommand}).", file=sys.stderr)
    raise SystemExit(1)
if tool == "loginctl" and subcommand == "show-user":
    print(f"Linger={os.environ.get('FAKE_LINGER', 'no')}")
elif tool == "launchctl" and subcommand == "print" and os.environ.get("FAKE_LOADED") != "1":
    print(f"Could not find service in domain for port: {words[-1]}", file=sys.stderr)
    raise SystemExit(113)
