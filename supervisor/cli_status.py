"""The ``hostvisor`` console script, with a fast path for ``hostvisor status`` (issue 14).

``hostvisor status`` is what scripts and prompts run, so its whole process counts: on
this machine the interpreter alone takes about 19 ms (9 ms without setuptools'
editable-install finder), and the full CLI's imports (argparse, the control client and
its method table, dataclasses through :mod:`supervisor.errors`) cost another 25 ms.
:func:`main` first tries :func:`fast_status`, which understands a strict subset of the
command lines that argparse accepts for ``status`` and needs only ``os``, ``sys``,
``json`` and ``_socket``. For anything else (another verb, ``--help``, an abbreviated
option, a name that cannot be a service's, ``--format markdown``, a socket folder that
is not safe, a path over the OS limit) it defers, before it has sent anything, to
:func:`supervisor.cli.execute`, so that errors, help and every other verb behave
exactly as they do there. Its output and exit codes are the full CLI's, byte for byte
(``tests/test_cli_status.py`` compares them, piped and on a terminal).

The status table is laid out here, plain (:func:`plain_table`) and, on a terminal,
coloured through rich (:func:`rich_table`, which imports rich, ~40 ms);
``supervisor.cli`` uses both.

Import cost is the point of this module: no ``pathlib``, ``argparse``,
``socket`` (``_socket`` is enough), ``dataclasses`` or :mod:`supervisor.errors`; those
are loaded only on the paths that need them (an error answered by the daemon). ``tomllib``
(with ``typing``, about as much as the interpreter's start) is imported only when a config
file is there to read and :mod:`supervisor.socketcache` does not already know its socket.
"""

from __future__ import annotations

import json
import os
import sys

from supervisor.cli_jobs import JOB_COLUMNS, duration_text, fine, is_job, job_cells

TYPE_CHECKING = False
if TYPE_CHECKING:  # no runtime import of typing: it costs ~2 ms
    from collections.abc import Sequence
    from typing import Any, NoReturn

__all__ = [
    "COLUMNS",
    "StatusArgs",
    "colour",
    "config_path",
    "fast_status",
    "last_exit_text",
    "main",
    "parse_status",
    "plain_table",
    "query",
    "rich_table",
    "row_cells",
    "run",
    "socket_path",
    "status_rows",
]

#: The status table's columns (contract section 7).
COLUMNS = ("NAME", "KIND", "STATE", "HEALTH", "PID", "UPTIME", "RESTARTS", "LAST-EXIT")
#: Columns aligned to the right on a terminal.
RIGHT = frozenset({"PID", "RESTARTS"})


# --------------------------------------------------------------------------- the table


def last_exit_text(last: Any) -> str:
    """The LAST-EXIT cell: ``code 1``, ``SIGKILL``, ``unknown`` or ``-``."""
    if not isinstance(last, dict):
        return "-"
    if last.get("unknown"):
        return "unknown"
    if last.get("signal") is not None:
        import signal

        try:
            return signal.Signals(last["signal"]).name
        except ValueError:
            return f"signal {last['signal']}"
    return "-" if last.get("code") is None else f"code {last['code']}"


def row_cells(entry: dict[str, Any]) -> list[str]:
    """The cells of one status entry under :data:`COLUMNS`."""
    pid = entry.get("pid")
    container = entry.get("container_id")
    health = entry.get("health") or "none"
    return [
        str(entry.get("name", "?")),
        str(entry.get("kind", "?")),
        str(entry.get("state", "?")),
        "-" if health == "none" else str(health),
        str(pid) if pid is not None else (str(container)[:12] if container else "-"),
        duration_text(entry.get("uptime_seconds")),
        str(entry.get("restarts", 0)),
        last_exit_text(entry.get("last_exit")),
    ]


def aligned(
    row: Sequence[str], widths: Sequence[int], right: bool, columns: Sequence[str] = COLUMNS
) -> list[str]:
    """``row`` padded to ``widths``; :data:`RIGHT` columns to the right if ``right``."""
    cells = []
    for i, text in enumerate(row):
        pad = " " * (widths[i] - len(text))
        cells.append(pad + text if right and columns[i] in RIGHT else text + pad)
    return cells


def widths_of(rows: Sequence[Sequence[str]], columns: Sequence[str]) -> list[int]:
    return [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]


def plain_table(rows: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> str:
    """The table as plain aligned text (piped, ``NO_COLOR``, ``TERM=dumb``): no escapes."""
    widths = widths_of(rows, columns)
    return "".join(
        "  ".join(aligned(row, widths, False, columns)).rstrip() + "\n" for row in [columns, *rows]
    )


def colour(out: Any) -> bool:
    """Colour only on a terminal, never with NO_COLOR set (no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR", "") != "" or os.environ.get("TERM") == "dumb":
        return False
    return bool(out.isatty())


def rich_table(rows: Sequence[Sequence[str]], out: Any, columns: Sequence[str] = COLUMNS) -> None:
    """The coloured table on a terminal, through rich (imported here only: ~40 ms).

    Columns are aligned here, not by ``rich.table.Table``: laying out 200 rows with
    it took ~115 ms, printing the same rows as styled ``Text`` ~2 ms.
    """
    from rich.console import Console
    from rich.text import Text

    from supervisor.cli_jobs import STYLES

    widths = widths_of(rows, columns)
    text = Text()
    text.append("  ".join(aligned(columns, widths, True, columns)).rstrip(), style="bold")
    for row in rows:
        cells = aligned(row, widths, True, columns)
        cells[-1] = cells[-1].rstrip()
        text.append("\n")
        for i, cell in enumerate(cells):
            text.append(cell, style=STYLES.get(row[i], "") if i in (2, 3) else "")
            if i < len(cells) - 1:
                text.append("  ")
    console = Console(file=out, highlight=False, emoji=False, markup=False)
    console.print(text, soft_wrap=True)


def status_rows(services: list[dict[str, Any]]) -> tuple[list[list[str]], tuple[str, ...]]:
    """The rows and columns of the status table: NEXT-RUN and LAST-RUN if a job is listed."""
    if any(is_job(e) for e in services):
        return [row_cells(e) + job_cells(e) for e in services], (*COLUMNS, *JOB_COLUMNS)
    return [row_cells(e) for e in services], COLUMNS


def table_text(services: list[dict[str, Any]]) -> str:
    """The plain table of ``hostvisor status``."""
    return plain_table(*status_rows(services))


# --------------------------------------------------------------------------- the command line


class _Defer(Exception):
    """The fast path does not handle this: run the full CLI (nothing was sent yet)."""


#: Service names (contract section 5; the protocol's ``SERVICE_NAME``).
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
_FIRST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def is_service_name(text: str) -> bool:
    """``[a-z0-9][a-z0-9_.-]{0,62}``, as ``SERVICE_NAME.fullmatch`` (without ``re``)."""
    return 0 < len(text) <= 63 and text[0] in _FIRST_CHARS and _NAME_CHARS.issuperset(text)


class StatusArgs:
    """What ``hostvisor [-c C] [--socket S] status [NAME...] [--json] [--format F]`` said."""

    __slots__ = ("config", "json", "names", "socket")

    def __init__(self) -> None:
        self.config: str | None = None
        self.socket: str | None = None
        self.names: list[str] = []
        self.json = False

    def fields(self) -> tuple[str | None, str | None, list[str], bool]:
        """``(config, socket, names, json)``."""
        return self.config, self.socket, self.names, self.json


#: Most names in one request (the protocol's ``MAX_NAMES``).
_MAX_NAMES = 4096
_VALUED = {"-c": "config", "--config": "config", "--socket": "socket"}


def _option(args: StatusArgs, argv: Sequence[str], i: int) -> int | None:
    """Take ``-c PATH``, ``--config[=]PATH`` or ``--socket[=]PATH`` at ``argv[i]``; the index
    after it, or None if ``argv[i]`` is not one of them."""
    token = argv[i]
    field = _VALUED.get(token)
    if field is not None:
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            raise _Defer  # argparse's "expected one argument", or a value it would judge
        setattr(args, field, argv[i + 1])
        return i + 2
    for prefix in ("--config=", "--socket="):
        if token.startswith(prefix):
            setattr(args, prefix[2:-1], token[len(prefix) :])
            return i + 1
    return None


def parse_status(argv: Sequence[str]) -> StatusArgs | None:
    """The status command line, if it is one the fast path understands fully; else None.

    Accepted, each exactly as spelled here (argparse's abbreviations, ``-cPATH``,
    ``--`` and values that start with ``-`` are left to argparse):
    ``[-c PATH | --config[=]PATH | --socket[=]PATH]... status`` then, in any order,
    the same options, ``--json``, ``--format json|table`` (or ``--format=...``) and
    one run of service names (argparse takes ``nargs="*"`` names only as one run).
    """
    args = StatusArgs()
    i = 0
    try:
        while i < len(argv) and (after := _option(args, argv, i)) is not None:
            i = after
        if i >= len(argv) or argv[i] != "status":
            return None
        i += 1
        fmt: str | None = None
        names_done = False
        while i < len(argv):
            token = argv[i]
            after = _option(args, argv, i)
            if after is not None:
                i = after
                names_done = names_done or bool(args.names)
                continue
            if token == "--json":
                args.json = True
                names_done = names_done or bool(args.names)
                i += 1
                continue
            if token == "--format" or token.startswith("--format="):
                if token == "--format":
                    if i + 1 >= len(argv):
                        return None
                    value, i = argv[i + 1], i + 2
                else:
                    value, i = token[len("--format=") :], i + 1
                if value not in ("json", "table"):
                    return None  # markdown (the status page), or argparse's "invalid choice"
                fmt = value
                names_done = names_done or bool(args.names)
                continue
            if token.startswith("-") or names_done or not is_service_name(token):
                return None
            args.names.append(token)
            i += 1
    except _Defer:
        return None
    if (args.json and fmt == "table") or len(args.names) > _MAX_NAMES:
        return None  # argparse's usage error; the client's ValueError
    args.json = args.json or fmt == "json"
    return args


# --------------------------------------------------------------------------- paths


def _normal(path: str) -> str:
    """``str(pathlib.PurePosixPath(path))``: no empty or ``.`` parts, no trailing slash."""
    parts = [p for p in path.split("/") if p and p != "."]
    two = path.startswith("//") and not path.startswith("///")  # POSIX keeps exactly two
    root = "//" if two else "/" * path.startswith("/")
    return root + "/".join(parts) or "."


def _join(base: str, tail: str) -> str:
    """``str(pathlib.PurePosixPath(base) / tail)`` for a relative ``tail``."""
    head = _normal(base)
    return _normal(head + tail if head.endswith("/") else f"{head}/{tail}")


def config_path(option: str | None) -> str:
    """:func:`supervisor.paths.resolve_config_path` as a string (no pathlib)."""
    env = os.environ
    raw = option or env.get("HOSTVISOR_CONFIG")
    if not raw:
        if sys.platform == "darwin":
            raise _Defer
        base = env.get("XDG_CONFIG_HOME") or _join(_home(), ".config")
        raw = _join(base, "hostvisor/config.toml")
    return os.path.abspath(os.path.expanduser(raw))


def _home() -> str:
    """``paths.home_dir``: ``$HOME``, else the user's home (``Path.home()``)."""
    home = os.environ.get("HOME")
    if home:
        return home
    home = os.path.expanduser("~")
    if home.startswith("~"):
        raise _Defer  # pathlib raises "Could not determine home directory"
    return home


def socket_path(args: StatusArgs) -> str:
    """The control socket per contract section 2, as ``supervisor.cli`` resolves it."""
    raw = args.socket or os.environ.get("HOSTVISOR_SOCKET")
    if raw:
        path = os.path.abspath(os.path.expanduser(raw))
    else:
        from supervisor.socketcache import configured_socket

        configured = configured_socket(config_path(args.config))
        if configured is not None:
            path = configured
        else:
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            if runtime:
                path = _join(runtime, "hostvisor/hostvisor.sock")
            else:
                path = f"/tmp/hostvisor-{os.getuid()}/hostvisor.sock"
    limit = 104 if sys.platform == "darwin" else 108
    if len(os.fsencode(path)) >= limit:
        raise _Defer  # the full CLI says why (SocketPathError)
    return path


# --------------------------------------------------------------------------- the query


class _Failed(Exception):
    """The query failed after it was sent: the full CLI's exception for it is built
    (importing :mod:`supervisor.errors`) only now, and reported as the full CLI does."""

    def __init__(self, kind: str, message: str = "", error: Any = None) -> None:
        super().__init__(message)
        self.kind = kind  # "unreachable", "control" or "answer" (the daemon's error object)
        self.error = error


def _why(path: str, exc: OSError) -> str:
    import errno

    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
        return f"no daemon at {path}"
    if isinstance(exc, TimeoutError):
        return f"no daemon answers at {path} (timed out)"
    return f"cannot connect to {path}: {exc.strerror or exc}"


def _safe_folder(path: str) -> bool:
    """True when ``supervisor.control.socketfile.unsafe_socket_folder`` finds nothing
    wrong; when it would refuse, the full client says why."""
    try:
        mode = os.stat(os.path.dirname(path) or ".").st_mode
    except OSError:
        return True
    if not mode & 0o022:
        return True
    if not mode & 0o1000:  # not sticky
        return False
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        return True
    return owner in (os.geteuid(), 0)


#: Longest line accepted from the daemon (the client's ``_CLIENT_MAX_LINE``).
_MAX_LINE = 16 * 1024 * 1024


def query(path: str, names: list[str], timeout: float = 10.0) -> Any:
    """The ``status`` method's result, over the socket at ``path`` (as ``ControlClient``)."""
    import _socket

    params = {"services": names} if names else {}
    message = {"jsonrpc": "2.0", "id": 1, "method": "status", "params": params}
    line = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        _connect(sock, path, min(timeout, 5.0))
        sock.settimeout(timeout)
        try:
            sock.sendall(line)
        except ConnectionError:
            pass  # closed by the daemon: its last word (if any) is read below
        except OSError as exc:
            raise _Failed("unreachable", f"lost the daemon at {path}: {exc.strerror}") from None
        buffer = bytearray()
        scanned = 0
        while True:
            end = buffer.find(b"\n", scanned)
            if end >= 0:
                answer = _message(bytes(buffer[:end]), path)
                del buffer[: end + 1]
                scanned = 0
                if "id" not in answer:
                    continue  # a notification
                if "error" in answer:
                    raise _Failed("answer", error=answer["error"])
                if answer.get("id") == 1 and "result" in answer:
                    return answer["result"]
                continue
            if len(buffer) > _MAX_LINE:
                raise _Failed("control", f"the daemon at {path} sent an over-long line")
            scanned = len(buffer)
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                raise _Failed("unreachable", f"no answer from the daemon at {path}") from None
            except ConnectionError:
                chunk = b""
            except OSError as exc:
                raise _Failed("unreachable", f"lost the daemon at {path}: {exc.strerror}") from None
            if not chunk:
                raise _Failed("unreachable", f"the daemon at {path} closed the connection")
            buffer += chunk
    finally:
        sock.close()


def _connect(sock: Any, path: str, timeout: float) -> None:
    """As ``supervisor.control.client._connect``: a blocking connect bounded by SO_SNDTIMEO."""
    import _socket
    import struct

    seconds = max(timeout, 0.001)
    try:
        sock.setblocking(True)
        try:
            packed = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, packed)
        except OSError:
            pass
        try:
            sock.connect(path)
        except BlockingIOError:
            import errno

            raise TimeoutError(errno.ETIMEDOUT, "the daemon's backlog stayed full") from None
        try:  # noqa: SIM105 (contextlib is one more import)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
        except OSError:
            pass
    except OSError as exc:
        raise _Failed("unreachable", _why(path, exc)) from None


def _message(line: bytes, path: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _Failed("control", f"the daemon at {path} sent invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Failed("control", f"the daemon at {path} sent a non-object")
    return value


def _report(failure: _Failed, args: StatusArgs) -> int:
    """Say why the query failed, exactly as ``supervisor.cli`` does; its exit code."""
    from supervisor import cli
    from supervisor.control.protocol import error_from_object
    from supervisor.errors import ControlError, DaemonUnreachable

    if failure.kind == "answer":
        exc: ControlError = error_from_object(failure.error)
    elif failure.kind == "unreachable":
        exc = DaemonUnreachable(str(failure))
    else:
        exc = ControlError(str(failure))
    return cli.client_failure(exc, args.config)


# --------------------------------------------------------------------------- the verb


def fast_status(argv: Sequence[str]) -> int | None:
    """Run ``hostvisor status`` if :func:`parse_status` understands ``argv`` and nothing
    needs the full CLI; its exit code, or None to run the full CLI instead."""
    args = parse_status(argv)
    if args is None:
        return None
    try:
        path = socket_path(args)
    except _Defer:
        return None
    if not _safe_folder(path):
        return None
    try:
        doc = query(path, args.names)
    except _Failed as failure:
        return _report(failure, args)
    services = doc.get("services", [])
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif colour(sys.stdout):
        rows, columns = status_rows(services)
        rich_table(rows, sys.stdout, columns)
    else:
        sys.stdout.write(table_text(services))
    return 0 if all(fine(e) for e in services) else 3


def run(argv: Sequence[str]) -> int:
    """One command line (without the program name): the fast path, else the full CLI."""
    try:
        code = fast_status(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hostvisor status | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if code is not None:
        return code
    from supervisor.cli import execute

    return execute(argv)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``hostvisor`` console script (and ``python -m supervisor``)."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))
