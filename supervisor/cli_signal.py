"""``hostvisor signal NAME... SIG [--group]`` (contract section 7), kept out of
:mod:`supervisor.cli` to keep it small.

Exit codes: 0 every service was signalled; 1 some had no running instance (a line on
stderr says which); 4 an unknown service or signal name (the signal is checked here,
before connecting, with the daemon's own parser), or no daemon answers.

Stdlib only, as the rest of the CLI's fast path.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from supervisor.signals import SignalError, parse_signal, signal_name

if TYPE_CHECKING:
    from supervisor.control.client import ControlClient

__all__ = ["add_arguments", "signal_verb"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNKNOWN = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``NAME... SIG [--group]`` on the ``signal`` subcommand's parser."""
    parser.add_argument("names", nargs="+", metavar="NAME")
    parser.add_argument("signal", metavar="SIG", help="HUP, SIGUSR1, 10...")
    parser.add_argument(
        "--group", action="store_true", help="the whole process group, not the main process"
    )


def _sent_line(entry: dict[str, Any], name: str, group: bool) -> str:
    cid = entry.get("container_id")
    if cid:
        return f"{entry.get('name')}: {name} sent to container {str(cid)[:12]}"
    whom = f"the process group of pid {entry.get('pid')}" if group else f"pid {entry.get('pid')}"
    return f"{entry.get('name')}: {name} sent to {whom}"


def signal_verb(args: argparse.Namespace, client: ControlClient) -> int:
    """Send the signal through the ``signal`` method; one line per service."""
    try:
        number = parse_signal(args.signal, what="SIG")
    except SignalError as exc:
        print(f"hostvisor: signal: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    params = {"services": args.names, "signal": number, "group": args.group}
    result = client.call("signal", params, timeout=30.0)
    name = signal_name(number)
    missed = 0
    for entry in result.get("services", []):
        if entry.get("signalled"):
            print(_sent_line(entry, name, args.group))
            continue
        missed += 1
        state = entry.get("state", "?")
        print(
            f"hostvisor: {entry.get('name')} is not running ({state}): {name} not sent",
            file=sys.stderr,
        )
    return EXIT_FAILED if missed else EXIT_OK
