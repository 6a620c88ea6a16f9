"""One run of a test job: writes ``DIR/run-<N>.pid`` (N = $HOSTVISOR_RUN), optionally
leaves an escapee in a session of its own (``DIR/esc-<N>.pid``), holds until
``DIR/go-<N>`` or ``DIR/go`` exists (or forever), then exits with ``--code``.

``--trap SIG``: on that signal write its name to ``DIR/sig-<N>`` and exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--code", type=int, default=0)
    parser.add_argument("--escapee", action="store_true")
    parser.add_argument("--hold", action="store_true", help="wait for go-N or go")
    parser.add_argument("--trap", default="")
    args = parser.parse_args()
    run = os.environ.get("HOSTVISOR_RUN", "0")
    folder: Path = args.dir

    if args.trap:

        def caught(signum: int, frame: FrameType | None) -> None:
            (folder / f"sig-{run}").write_text(signal.Signals(signum).name)
            sys.exit(0)

        signal.signal(signal.Signals[args.trap], caught)

    if args.escapee:
        # A process that left our process group: only the run's marker finds it.
        escapee = subprocess.Popen(["sleep", "600"], start_new_session=True)
        (folder / f"esc-{run}.pid").write_text(str(escapee.pid))
    (folder / f"run-{run}.pid").write_text(str(os.getpid()))
    print(f"run {run} pid {os.getpid()}", flush=True)
    if args.hold:
        while not ((folder / f"go-{run}").exists() or (folder / "go").exists()):
            time.sleep(0.02)
    print(f"run {run} ends with {args.code}", flush=True)
    return int(args.code)


if __name__ == "__main__":
    sys.exit(main())
