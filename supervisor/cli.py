"""The ``hostvisor`` command line (contract section 7).

Exit codes: 0 success; 1 failure (bad config, a service that did not reach its
target state, a rejected reload); 2 a usage mistake; 3 ``status``: some
service not running (LSB ``status`` convention); 4 no daemon answers, or an
unknown service name.

Start-up time matters (``hostvisor status`` is run by scripts and prompts): the
console script is :func:`supervisor.cli_status.main`, which answers ``status`` itself
without this module (issue 14) and hands every other command line here. This module
imports the standard library, :mod:`supervisor.paths`, :mod:`supervisor.errors` and the
argument helpers at module level; the control client is imported when a verb talks to
the daemon, and the daemon, the config loader, the installer and rich (the coloured
table, ~40 ms) by the verbs that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from supervisor import __version__
from supervisor.cli_jobs import JOB_COLUMNS, action_verdict, fine, is_job, job_cells
from supervisor.cli_porting import add_export_arguments, add_import_arguments
from supervisor.cli_porting import export_verb as _export
from supervisor.cli_porting import import_verb as _import
from supervisor.cli_signal import add_arguments as add_signal
from supervisor.cli_signal import signal_verb
from supervisor.cli_status import (
    COLUMNS,
    colour,
    last_exit_text,
    plain_table,
    rich_table,
    row_cells,
)
from supervisor.errors import (
    ConfigError,
    ConfigRejected,
    ControlError,
    DaemonError,
    DaemonUnreachable,
    HostvisorError,
    PeerNotAllowed,
    SocketPathError,
    UnknownService,
)
from supervisor.paths import resolve_config_path, resolve_socket_path

if TYPE_CHECKING:
    from supervisor.control.client import ControlClient

__all__ = ["client_failure", "execute", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_UNREACHABLE = 4

#: The state each action waits for; any other state after a wait is a failure.
_TARGETS: dict[str, frozenset[str]] = {
    "start": frozenset({"running"}),
    "restart": frozenset({"running"}),
    "stop": frozenset({"stopped", "exited"}),  # a job's start waits for its run: cli_jobs
}
#: Seconds the client waits beyond the daemon's own wait for an answer.
_SLACK = 15.0


def _fail(message: str) -> None:
    print(f"hostvisor: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- paths


def _configured_socket(config: Path) -> Path | None:
    """``[daemon] socket`` of ``config``, expanded like config.py does; None if unset or unreadable.

    Cheap on purpose (``tomllib`` only): a client tolerates a missing or invalid
    config and falls back to the default path. The status fast path's reader
    (:func:`supervisor.socketcache.configured_socket`, which remembers the answer) is the
    one implementation.
    """
    from supervisor.socketcache import configured_socket

    found = configured_socket(str(config))
    return None if found is None else Path(found)


def _socket_path(args: argparse.Namespace) -> Path:
    """The control socket per contract section 2. Raises SocketPathError if too long."""
    configured = None
    if not args.socket and not os.environ.get("HOSTVISOR_SOCKET"):
        configured = _configured_socket(resolve_config_path(args.config))
    return resolve_socket_path(args.socket, configured)


# --------------------------------------------------------------------------- output


_last_exit = last_exit_text  # top_model imports it from here
_row = row_cells
_colour = colour
_COLUMNS = COLUMNS


def _print_table(rows: list[list[str]], out: TextIO, columns: Sequence[str] = _COLUMNS) -> None:
    """A coloured table through rich on a terminal; plain aligned text otherwise."""
    if not _colour(out):  # piped, NO_COLOR or TERM=dumb: no escape codes at all
        out.write(plain_table(rows, columns))
        return
    rich_table(rows, out, columns)


def _event_line(event: dict[str, Any]) -> str:
    """``2026-11-21 10:00:00 hostvisor.service.exited  api  exit code 1`` (local time)."""
    from datetime import datetime

    stamp = str(event.get("time", ""))
    with contextlib.suppress(ValueError):
        stamp = datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    service = event.get("service") or "-"
    line = f"{stamp} {event.get('event', '?'):<30} {service:<16} {event.get('message', '')}"
    return line.rstrip()


# --------------------------------------------------------------------------- client verbs


def _status(args: argparse.Namespace, client: ControlClient) -> int:
    params = {"services": args.names} if args.names else {}
    doc = client.call("status", params)
    services = doc.get("services", [])
    if args.json or args.format == "json":
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.format == "markdown":
        from supervisor.statuspage import render_here

        sys.stdout.write(render_here(doc))
    elif any(is_job(e) for e in services):
        rows = [_row(e) + job_cells(e) for e in services]
        _print_table(rows, sys.stdout, (*_COLUMNS, *JOB_COLUMNS))
    else:
        _print_table([_row(e) for e in services], sys.stdout)
    return EXIT_OK if all(fine(e) for e in services) else EXIT_NOT_RUNNING


def _action(args: argparse.Namespace, client: ControlClient) -> int:
    wait = not args.no_wait
    params = {"services": "all" if args.all else args.names, "wait": wait}
    params["timeout"] = args.timeout
    result = client.call(args.verb, params, timeout=args.timeout + _SLACK)
    failed = 0
    for entry in result.get("services", []):
        name, state = entry.get("name"), entry.get("state")
        if wait and args.verb != "stop" and is_job(entry):
            ok, line = action_verdict(entry, args.verb, resumed=args.all)
            if not ok:
                failed += 1
                _fail(
                    line
                    + (
                        ""
                        if "has not ended" not in line
                        else f" (waited {args.timeout:g}s; --timeout to wait longer)"
                    )
                )
            else:
                print(line)
        elif wait and state not in _TARGETS[args.verb]:
            failed += 1
            want = " or ".join(sorted(_TARGETS[args.verb]))
            why = f": {entry['message']}" if entry.get("message") else ""
            _fail(f"{name} did not reach {want} within {args.timeout:g}s: it is {state}{why}")
        else:
            print(f"{name}: {state}")
    return EXIT_FAILED if failed else EXIT_OK


def _rejected(what: str, exc: ConfigRejected) -> int:
    """Say ``what`` and every config error the daemon sent (one per line); exit 1."""
    issues = exc.data if isinstance(exc.data, list) and exc.data else None
    _fail(f"{what}{'' if issues else f': {exc}'}")
    for issue in issues or []:
        print(issue, file=sys.stderr)
    return EXIT_FAILED


def _reload(args: argparse.Namespace, client: ControlClient) -> int:
    try:
        result = client.call("reload", {}, timeout=120.0)
    except ConfigRejected as exc:
        return _rejected("reload rejected; the running config is unchanged", exc)
    for key in ("added", "removed", "changed"):
        print(f"{key}: {', '.join(result.get(key) or []) or '-'}")
    print(f"unchanged: {len(result.get('unchanged') or [])}")
    return EXIT_OK


def _follow(sub: Any, write: Callable[[Any], None]) -> int:
    """Print notifications until Ctrl-C (exit 0) or the daemon goes away (exit 4)."""
    try:
        with sub:
            for params in sub:
                write(params)
                sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_UNREACHABLE  # not reached: the subscription ends by raising


def _logs(args: argparse.Namespace, client: ControlClient) -> int:
    params = {"service": args.name, "lines": args.lines}
    if not args.follow:
        result = client.call("logs", params, timeout=30.0)
        sys.stdout.writelines(f"{line}\n" for line in result.get("lines", []))
        return EXIT_OK
    sub = client.stream("logs", params)
    sys.stdout.writelines(f"{line}\n" for line in sub.result.get("lines", []))
    sys.stdout.flush()

    def show(params: Any) -> None:
        sys.stdout.write(f"{params.get('line', '')}\n")

    return _follow(sub, show)


def _events(args: argparse.Namespace, client: ControlClient) -> int:
    def show(event: Any) -> None:
        line = json.dumps(event) if args.json else _event_line(event)
        sys.stdout.write(line + "\n")

    if not args.follow:
        for event in client.call("events", {}).get("events", []):
            show(event)
        return EXIT_OK
    sub = client.stream("events", {})
    for event in sub.result.get("events", []):
        show(event)
    sys.stdout.flush()
    return _follow(sub, show)


def _with_client(verb: Callable[[argparse.Namespace, ControlClient], int]) -> Callable[..., int]:
    """Run a client verb; map the daemon's answers to exit codes and one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        from supervisor.control.protocol import SERVICE_NAME

        names = getattr(args, "names", None) or [getattr(args, "name", None) or "x"]
        for name in names:
            if SERVICE_NAME.fullmatch(name) is None:
                _fail(f"unknown service: {name} (names match [a-z0-9][a-z0-9_.-]{{0,62}})")
                return EXIT_UNREACHABLE
        try:
            socket = _socket_path(args)
        except SocketPathError as exc:
            _fail(str(exc))
            return EXIT_UNREACHABLE
        from supervisor.control.client import ControlClient

        try:
            return verb(args, ControlClient(socket))
        except ControlError as exc:
            return client_failure(exc, args.config)

    return run


def client_failure(exc: ControlError, config: str | None) -> int:
    """Say why a call to the daemon failed (one line on stderr); the exit code: 4 for no
    daemon, an unknown service or a refused peer, 1 for any other error it answered."""
    if isinstance(exc, DaemonUnreachable):
        hint = ""
        if str(exc).startswith("no daemon at"):
            hint = f" (start one with: hostvisor run -c {resolve_config_path(config)})"
        _fail(f"{exc}{hint}")
    elif isinstance(exc, UnknownService | PeerNotAllowed):
        _fail(str(exc))
    else:
        _fail(f"the daemon answered: {exc} (error {exc.code})")
        return EXIT_FAILED
    return EXIT_UNREACHABLE


# --------------------------------------------------------------------------- local verbs


def _run(args: argparse.Namespace) -> int:
    from supervisor.rundaemon import run_daemon

    try:
        return run_daemon(config_path=resolve_config_path(args.config), socket_option=args.socket)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return EXIT_FAILED
    except DaemonError as exc:
        _fail(str(exc))
        return EXIT_FAILED


def _check(args: argparse.Namespace) -> int:
    from supervisor import config

    path = resolve_config_path(args.config)
    issues = config.check(path)
    for issue in issues:
        print(issue, file=sys.stderr)
    if issues:
        return EXIT_FAILED
    units = len(config.load(path).services)
    print(f"ok: {units} unit{'' if units == 1 else 's'} ({path})")
    return EXIT_OK


def _manager(args: argparse.Namespace) -> Any:
    return "systemd" if args.systemd else "launchd" if args.launchd else None


def _install(args: argparse.Namespace) -> int:
    from supervisor.install import install

    return install(
        manager=_manager(args),
        config_path=resolve_config_path(args.config),
        print_only=args.print_only,
        start=not args.no_start,
        out=sys.stdout,
        err=sys.stderr,
        socket=Path(os.path.abspath(args.socket)) if args.socket else None,
    )


def _uninstall(args: argparse.Namespace) -> int:
    from supervisor.install import uninstall

    return uninstall(manager=_manager(args), out=sys.stdout, err=sys.stderr)


# --------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("hostvisor").strip()
        _fail(f"{where + ': ' if where else ''}{message} (see: {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def _seconds(text: str) -> float:
    """``--timeout``: seconds, or a duration like ``90s``, ``2m``."""
    try:
        value = float(text)
    except ValueError:
        from supervisor.config_values import parse_duration

        try:
            value = parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected more than 0 and at most 1 day, got {text}")
    return value


#: The most lines `logs -n` asks for (the control protocol's bound on ``logs.lines``).
MAX_LINES = 100_000


def _count(text: str) -> int:
    try:
        value = int(text) if len(text) <= 12 else -1
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LINES:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise argparse.ArgumentTypeError(
            f"expected a number of lines from 0 to {MAX_LINES:,}, got {shown!r}"
        )
    return value


def _reexec(args: argparse.Namespace, client: ControlClient) -> int:
    before = client.call("status", {})  # unreachable here: exit 4, as for every verb
    old_pid = before.get("daemon", {}).get("pid")
    try:
        client.call("reexec", {}, timeout=300.0)
    except ConfigRejected as exc:
        return _rejected("reexec refused; the daemon goes on with its code", exc)
    except DaemonUnreachable as exc:
        _fail(
            f"reexec: the daemon did not answer after re-executing ({exc}); its services "
            "keep running: see `hostvisor logs`, then run `hostvisor run` to adopt them"
        )
        return EXIT_FAILED
    except ControlError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    after = client.call("status", {})
    daemon = after.get("daemon", {})
    print(f"hostvisor {daemon.get('version')} runs (pid {daemon.get('pid')}, was {old_pid})")
    return EXIT_OK


def _top(args: argparse.Namespace, client: ControlClient) -> int:
    doc = client.call("status", {})  # no daemon: exit 4 here, before the screen opens
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        _fail("top: needs a terminal (stdin and stdout); try: hostvisor status")
        return EXIT_USAGE
    from supervisor.top import run_top  # textual: only for this verb

    return run_top(client.path, doc)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-c", "--config", metavar="PATH", default=argparse.SUPPRESS, help="config.toml to use"
    )
    common.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="control socket to use"
    )
    parser = _Parser(prog="hostvisor", description="Supervise processes and containers.")
    parser.add_argument("--version", action="version", version=f"hostvisor {__version__}")
    parser.add_argument("-c", "--config", metavar="PATH", help="config.toml to use")
    parser.add_argument("--socket", metavar="PATH", help="control socket to use")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)

    def verb(name: str, run: Callable[[argparse.Namespace], int], text: str) -> Any:
        sub = verbs.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(run=run)
        return sub

    verb("run", _run, "run the daemon in the foreground")
    verb("check", _check, "validate config and units")
    status = verb("status", _with_client(_status), "show services (exit 3 if any is not running)")
    status.add_argument("names", nargs="*", metavar="NAME")
    status.add_argument("--json", action="store_true", help="print the JSON document")
    status.add_argument("--format", choices=("table", "markdown", "json"), help="default table")
    for name in ("start", "stop", "restart"):
        action = verb(name, _with_client(_action), f"{name} services and wait for them")
        action.add_argument("names", nargs="*", metavar="NAME")
        action.add_argument("--all", action="store_true", help="every service")
        action.add_argument("--no-wait", action="store_true", help="return at once")
        action.add_argument(
            "--timeout", type=_seconds, default=60.0, metavar="S", help="seconds (default 60)"
        )
    add_signal(verb("signal", _with_client(signal_verb), "send a signal to services (SIG)"))
    verb("reload", _with_client(_reload), "re-read config and units; restart changed units")
    verb("reexec", _with_client(_reexec), "re-execute the daemon in place, keeping every service")
    logs = verb("logs", _with_client(_logs), "print a service's log (the daemon's without NAME)")
    logs.add_argument("name", nargs="?", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="follow new lines")
    logs.add_argument("-n", "--lines", type=_count, default=50, metavar="N", help="default 50")
    events = verb("events", _with_client(_events), "print recent events")
    events.add_argument("-f", "--follow", action="store_true", help="follow new events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    verb("top", _with_client(_top), "a live view of the services; start, stop, restart from it")
    for name, run in (("install", _install), ("uninstall", _uninstall)):
        sub = verb(name, run, f"{name} a systemd user unit or launchd agent")
        managers = sub.add_mutually_exclusive_group()
        managers.add_argument("--systemd", action="store_true")
        managers.add_argument("--launchd", action="store_true")
    add_import_arguments(verb("import", _import, "write units from other tools' files"))
    add_export_arguments(verb("export", _export, "print the units as Kubernetes manifests"))
    install = verbs.choices["install"]
    install.add_argument("--print", dest="print_only", action="store_true", help="print only")
    install.add_argument("--no-start", action="store_true", help="write and enable, do not start")
    return parser


def execute(argv: Sequence[str]) -> int:
    """Run one command line (without the program name); returns the exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `export k8s --namespace ns web`: names after an option (import: files)
        listed = "names" if args.verb == "export" else "files" if args.verb == "import" else ""
        if not listed or any(e.startswith("-") and e != "-" for e in extra):
            parser.parse_args(argv)  # the usual usage error
        setattr(args, listed, [*getattr(args, listed), *extra])
    if args.verb is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.verb in _TARGETS and bool(args.names) == bool(args.all):
        parser.error(f"{args.verb}: name services or give --all (one of them)")
    if args.verb == "status" and args.json and args.format not in (None, "json"):
        parser.error(f"status: --json means --format json, not --format {args.format}")
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hostvisor logs | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except HostvisorError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    return code


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``hostvisor`` console script."""
    sys.exit(execute(sys.argv[1:] if argv is None else argv))
