"""The fast path of ``hostvisor status`` (issue 14): ``supervisor.cli_status``.

It must never answer differently from the full CLI (``supervisor.cli``): the same
bytes on stdout and stderr and the same exit code, or it must defer to it. Checked
here three ways:

- its parts against what they replace, on generated inputs: the argv parser against
  argparse, the socket path against ``supervisor.paths``;
- whole processes, ``python -m supervisor status ...`` (the fast path) against
  ``supervisor.cli.main`` (the full one), against a real daemon seen through a
  recording proxy, so that both get the very same answer bytes for the same request;
- what a fast ``status`` imports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import cli, cli_status
from supervisor.errors import SocketPathError
from tests.daemon_harness import PY, DaemonProcess, py_cmd
from tests.test_cli import read_all

# ---------------------------------------------------------------- the argv parser

TOKENS = [
    "status",
    "status",
    "-c",
    "--config",
    "--socket",
    "--json",
    "--format",
    "json",
    "table",
    "markdown",
    "--format=json",
    "--format=table",
    "--format=",
    "--config=c.toml",
    "--socket=",
    "--socket=s.sock",
    "web",
    "api.v2",
    "a_b-c",
    "Web",
    "-",
    "--",
    "-x",
    "--js",
    "--so",
    "-cc.toml",
    "-c=x",
    "--json=1",
    "",
    "x" * 64,
    "--version",
    "-h",
    "start",
    "p q",
]


def argparse_view(argv: list[str]) -> tuple[Any, ...] | None:
    """What the full CLI makes of ``argv`` for ``status``: (config, socket, names, json),
    or None for a usage error, another verb, or anything the fast path must not take."""
    parser = cli._parser()
    try:
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            args, extra = parser.parse_known_args(argv)
    except SystemExit:
        return None
    if extra or args.verb != "status":
        return None
    if args.json and args.format not in (None, "json"):
        return None
    if args.format == "markdown":
        return None
    if any(cli_status.is_service_name(n) is False for n in args.names):
        return None
    return (
        getattr(args, "config", None),
        getattr(args, "socket", None),
        args.names,
        bool(args.json or args.format == "json"),
    )


CASES = [
    (["status"], (None, None, [], False)),
    (["status", "--json"], (None, None, [], True)),
    (["status", "--format", "json"], (None, None, [], True)),
    (["status", "--format=table"], (None, None, [], False)),
    (["status", "web", "api.v2", "--json"], (None, None, ["web", "api.v2"], True)),
    (["status", "--json", "web", "api.v2"], (None, None, ["web", "api.v2"], True)),
    (["-c", "a.toml", "status", "-c", "b.toml"], ("b.toml", None, [], False)),
    (["--socket", "s", "status", "-c", ""], ("", "s", [], False)),
    (["--socket=", "status"], (None, "", [], False)),
]
DEFERRED = [
    [],
    ["--version"],
    ["status", "-h"],
    ["status", "--js"],  # argparse's abbreviation
    ["status", "web", "--json", "api"],  # a second run of names: argparse's error
    ["status", "--json", "--format", "table"],
    ["status", "--format", "markdown"],
    ["status", "Web"],  # cannot be a service name: the full CLI says so
    ["status", "-cc.toml"],
    ["status", "-c", "-x"],
    ["status", "--"],
    ["start", "web"],
]


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_parse_status_agrees_with_argparse(argv: list[str], expected: tuple[Any, ...]) -> None:
    """Command lines the fast path takes: the same reading as argparse's."""
    parsed = cli_status.parse_status(argv)
    assert parsed is not None
    assert parsed.fields() == expected == argparse_view(argv)


@pytest.mark.parametrize("argv", DEFERRED)
def test_parse_status_defers(argv: list[str]) -> None:
    """Help, errors, abbreviations, other verbs: left to argparse."""
    assert cli_status.parse_status(argv) is None


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=7))
def test_parse_status_never_disagrees(argv: list[str]) -> None:
    """On any mix of tokens: the fast parser defers, or reads what argparse reads."""
    parsed = cli_status.parse_status(argv)
    if parsed is not None:
        assert parsed.fields() == argparse_view(argv), argv


# ---------------------------------------------------------------- the socket's path

PARTS = st.sampled_from(["/", "//", "///", ".", "..", "a", "b/", "~", "$HOME", "x y", ""])
PATHS = st.lists(PARTS, max_size=5).map("".join)
ENV_KEYS = ["HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "HOSTVISOR_CONFIG", "HOSTVISOR_SOCKET"]


def full_socket(args: cli_status.StatusArgs) -> str | None:
    namespace = argparse.Namespace(config=args.config, socket=args.socket)
    try:
        return str(cli._socket_path(namespace))
    except SocketPathError:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    env=st.dictionaries(st.sampled_from(ENV_KEYS), PATHS.filter(bool), max_size=5),
    config=st.none() | PATHS,
    sock=st.none() | PATHS,
)
def test_socket_path_is_the_full_clis(
    env: dict[str, str], config: str | None, sock: str | None
) -> None:
    """Options and environment in any combination: the same path (or a deferral where
    the full CLI finds it too long), and the same config path for the hint."""
    args = cli_status.StatusArgs()
    args.config, args.socket = config, sock
    with mock.patch.dict(os.environ, env):
        for key in ENV_KEYS:
            if key not in env:
                os.environ.pop(key, None)
        try:
            fast: str | None = cli_status.socket_path(args)
        except cli_status._Defer:
            fast = None
        assert fast == full_socket(args)
        assert cli_status.config_path(config) == str(cli.resolve_config_path(config))


def test_socket_from_a_config_file(tmp_path: Path) -> None:
    """``[daemon] socket`` relative to the config's folder, ``~`` and ``$VAR`` expanded."""
    config = tmp_path / "conf" / "config.toml"
    config.parent.mkdir()
    for text in (
        '[daemon]\nsocket = "../run/ctl.sock"\n',
        "[daemon]\nsocket = '~/x.sock' # comment\n",
        '[daemon]\nsocket = "$HOME/y.sock"\nallow_uids = [1000, 0,]\n',
        '[daemon]\nsocket = "a\\u0062.sock"\n',  # an escape: tomllib's answer
        "[daemon]\nsocket = 5\n",
        "[daemon\n",
        '[daemon]\nsocket = ""\n',
    ):
        config.write_text(text)
        args = cli_status.StatusArgs()
        args.config = str(config)
        with mock.patch.dict(os.environ, {"XDG_RUNTIME_DIR": str(tmp_path / "rt")}):
            os.environ.pop("HOSTVISOR_SOCKET", None)
            assert cli_status.socket_path(args) == full_socket(args), text


# ---------------------------------------------------------------- whole processes


class RecordingProxy:
    """A Unix socket in front of the daemon's: each distinct request line is forwarded
    once and its answer recorded; a repeated line gets the recorded bytes. So the fast
    and the full CLI see the same answer for the same request, uptimes included."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.answers: dict[bytes, bytes] = {}
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                line = conn.makefile("rb").readline()
                self.requests.append(line)
                if line not in self.answers:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as up:
                        up.connect(str(self.upstream))
                        up.sendall(line)
                        self.answers[line] = up.makefile("rb").readline()
                conn.sendall(self.answers[line])

    def close(self) -> None:
        self.server.close()


@contextlib.contextmanager
def proxy(d: DaemonProcess) -> Iterator[RecordingProxy]:
    p = RecordingProxy(d.socket, d.sockdir / "proxy.sock")
    try:
        yield p
    finally:
        p.close()


FULL = "import sys\nfrom supervisor.cli import main\nmain(sys.argv[1:])\n"


def both(argv: list[str], env: dict[str, str]) -> tuple[Any, Any]:
    """(code, stdout, stderr) of the fast path (``python -m supervisor``) and the full CLI."""
    fast = subprocess.run([PY, "-m", "supervisor", *argv], capture_output=True, env=env, timeout=60)
    full = subprocess.run([PY, "-c", FULL, *argv], capture_output=True, env=env, timeout=60)
    return (fast.returncode, fast.stdout, fast.stderr), (full.returncode, full.stdout, full.stderr)


def on_a_pty(argv: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """(code, output) of the fast path and of the full CLI, each on a pseudo-terminal."""
    results = []
    for command in ([PY, "-m", "supervisor", *argv], [PY, "-c", FULL, *argv]):
        master, slave = pty.openpty()
        proc = subprocess.Popen(command, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        output = read_all(master)
        results.append((proc.wait(timeout=60), output))
    return results[0], results[1]


def same(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Assert both answer alike; a job's NEXT-RUN and LAST-RUN are relative to the clock,
    so a second ticking between the two runs is tried again (a few times: a slow host may
    tick more than once; a real difference fails every time)."""
    fast, full = both(argv, env)
    for _ in range(4):
        if fast == full:
            break
        fast, full = both(argv, env)
    assert fast == full, argv
    return fast


UNITS = {
    "web": f"command = {py_cmd('svc_sleep')}\n",
    "api": f"command = {py_cmd('svc_sleep')}\n",
    "done": f'command = {py_cmd("svc_exit", "--code", "0")}\nrestart = "no"\n',
    "bad": f'command = {py_cmd("svc_exit", "--code", "3")}\nrestart = "no"\n',
}


def start_daemon(d: DaemonProcess, units: dict[str, str]) -> None:
    for name, text in units.items():
        d.write_unit(name, text)
    d.start()
    for name in units:
        d.wait_state(name, "exited" if name in ("done", "bad") else "running")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTVISOR_", "NO_COLOR"))}
    return {**clean, "XDG_RUNTIME_DIR": str(tmp_path / "rt"), "XDG_CONFIG_HOME": str(tmp_path)}


class TestAgainstTheFullCli:
    def test_tables_json_names_and_errors(self, d: DaemonProcess, env: dict[str, str]) -> None:
        """Every form of ``status``: the fast and the full CLI print the same bytes and exit
        alike (0 all fine, 3 some not, 4 unknown name); they send the same request."""
        start_daemon(d, UNITS)
        with proxy(d) as p:
            sock = ["--socket", str(p.path)]
            cases: list[tuple[list[str], int | None]] = [
                (["status", *sock], 3),
                (["status", "--json", *sock], 3),
                (["status", "--format", "json", *sock], 3),
                (["status", "--format=table", *sock], 3),
                ([*sock, "status", "web", "api"], 0),
                (["status", "web", "done", "--json", *sock], None),
                (["status", "bad", *sock], 3),
                (["status", "nope", *sock], 4),
                (["status", "web", "nope", "--json", *sock], 4),
            ]
            for argv, code in cases:
                assert cli_status.parse_status(argv) is not None, argv  # the fast path's
                result = same(argv, env)
                assert code is None or result[0] == code, (argv, result)
            tty = {**env, "TERM": "xterm-256color", "COLUMNS": "120"}
            fast, full = on_a_pty(["status", *sock], tty)
            for _ in range(4):  # "failed 1s ago": the clock, as in same()
                if fast == full:
                    break
                fast, full = on_a_pty(["status", *sock], tty)
            assert fast == full and b"\x1b[" in fast[1]  # rich's colours, in both
            assert len(p.requests) >= 2 * len(cases)
            assert all(a == b for a, b in zip(p.requests[::2], p.requests[1::2], strict=True))
        out = same(["status", "--socket", str(p.path)], env)  # the proxy is gone: no daemon
        assert out[0] == 4 and b"no daemon at" in out[2] and b"start one with" in out[2]

    def test_socket_from_the_config_file(self, d: DaemonProcess, env: dict[str, str]) -> None:
        """``-c CONFIG`` with ``[daemon] socket``, and ``$HOSTVISOR_SOCKET``: same answers."""
        start_daemon(d, {"web": UNITS["web"], "api": UNITS["api"]})
        with proxy(d) as p:
            config = d.root / "proxy.toml"
            config.write_text(f'[daemon]\nsocket = "{p.path}"  # the proxy\n')
            assert same(["status", "-c", str(config)], env)[0] == 0
            assert same(["-c", str(config), "status", "--json"], env)[0] == 0
            env = {**env, "HOSTVISOR_SOCKET": str(p.path)}
            assert same(["status", "web", "-c", str(d.root / "none.toml")], env)[0] == 0

    def test_a_job(self, d: DaemonProcess, env: dict[str, str]) -> None:
        """A job listed: the NEXT-RUN and LAST-RUN columns, the same in both."""
        start_daemon(d, UNITS)
        d.write_unit("cron", 'command = ["true"]\nevery = "1h"\n')
        d.call("reload")
        d.wait_for(lambda: d.status("cron")["state"] in ("waiting", "exited"), what="cron")
        with proxy(d) as p:
            _code, out, _ = same(["status", "--socket", str(p.path)], env)
            assert b"NEXT-RUN" in out.splitlines()[0]
            same(["status", "cron", "--socket", str(p.path)], env)

    def test_no_daemon(self, tmp_path: Path, env: dict[str, str]) -> None:
        """Nothing at the socket, or at the default one: exit 4, the same line and hint."""
        for argv in (
            ["status", "--socket", str(tmp_path / "none.sock")],
            ["status", "-c", str(tmp_path / "config.toml")],
            ["status", "--json"],
        ):
            code, out, err = same(argv, env)
            assert (code, out) == (4, b"")
            assert err.startswith(b"hostvisor: no daemon at ") and b"hostvisor run -c" in err

    def test_deferred_forms(self, tmp_path: Path, env: dict[str, str]) -> None:
        """Help, usage errors, other verbs, a socket path over the OS limit and a socket
        folder others may write go to the full CLI: the same output and exit code."""
        sock = str(tmp_path / "none.sock")
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        for argv, code in (
            (["status", "--js", "--socket", sock], 4),  # argparse reads --json: no daemon
            (["status", "Bad"], 4),
            (["--version"], 0),
            (["status", "--socket", "/tmp/" + "x" * 120], 4),
            (["status", "--socket", str(shared / "s.sock")], 4),
        ):
            result = same(argv, env)
            assert result[0] == code, (argv, result)
        assert b"chmod 700" in same(["status", "--socket", str(shared / "s.sock")], env)[2]


def test_a_fast_status_imports_only_what_it_uses(d: DaemonProcess, env: dict[str, str]) -> None:
    """No argparse, pathlib, dataclasses, socket, the full CLI, the errors
    or the control package: json, _socket and the fast path's own modules only."""
    start_daemon(d, {"web": UNITS["web"], "api": UNITS["api"]})
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "from supervisor.cli_status import run\n"
        f"code = run(['status', '-c', {str(d.config_path)!r}])\n"
        "new = sorted(m for m in set(sys.modules) - before if not m.startswith('encodings'))\n"
        "print(code, new, file=sys.stderr)\n"
    )
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    last = done.stderr.strip().splitlines()[-1]
    assert last.split(" ", 1)[0] == "0", done.stderr
    new = set(eval(last.split(" ", 1)[1]))
    allowed = {
        "supervisor",
        "__future__",
        "supervisor.cli_status",
        "supervisor.cli_jobs",
        "supervisor.socketcache",
        "tomllib",
        "tomllib._parser",
        "tomllib._re",
        "tomllib._types",
        "typing",
        "_typing",
        "typing.io",
        "typing.re",
        "collections.abc",
        "contextlib",
        "warnings",
        "string",
        "_string",
        "datetime",
        "_datetime",
        "math",
        "types",
        "json",
        "json.decoder",
        "json.scanner",
        "json.encoder",
        "_json",
        "_socket",
        "struct",
        "_struct",
        "re",
        "re._compiler",
        "re._parser",
        "re._constants",
        "re._casefix",
        "enum",
        "_sre",
        "copyreg",
        "functools",
        "operator",
        "_operator",
        "keyword",
        "reprlib",
        "collections",
        "_collections",
        "itertools",
        "_functools",
        "time",
    }
    assert new <= allowed, sorted(new - allowed)
