"""Fuzzed frames and storms of control calls against a real server on a real socket.

The server runs in this process, in an event loop of its own thread (an anyio
blocking portal), and serves the fake daemon of ``tests/programs``; clients are
plain blocking sockets. That lets the tests count the server's descriptors
(``/proc/self/fd``) and tasks before and after: whatever arrives, the server
answers with the right JSON-RPC error or closes the connection, never crashes,
and leaks nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.control import protocol
from supervisor.control.client import ControlClient
from supervisor.control.protocol import MAX_LINE
from supervisor.control.server import serve
from tests.programs.ctl_fake_daemon import FakeTarget

NAMES = ["svc000", "svc001", "svc002"]
ERRORS = {
    protocol.PARSE_ERROR,
    protocol.INVALID_REQUEST,
    protocol.METHOD_NOT_FOUND,
    protocol.INVALID_PARAMS,
    protocol.UNKNOWN_SERVICE,
    protocol.CONFIG_REJECTED,
}


class Server:
    """A server in its own event-loop thread; counts of fds and tasks on demand."""

    def __init__(self, portal: BlockingPortal, path: Path) -> None:
        self.portal = portal
        self.path = path

    def tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return self.portal.call(count)

    @staticmethod
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        result: dict[str, Any] = ControlClient(self.path).call("status", {}, timeout=timeout)
        return result

    def settled(self, fds: int, tasks: int, what: str) -> None:
        """Wait (deadline 10 s) until fds and tasks are back to the counts given, or below
        (a connection of the test before may still have been closing when they were taken)."""
        deadline = time.monotonic() + 10
        while self.fds() > fds or self.tasks() > tasks:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: fds {fds} -> {self.fds()}, tasks {tasks} -> {self.tasks()}"
                )
            self.portal.call(anyio.sleep, 0.05)  # let the loop close what it holds


@asynccontextmanager
async def serving(target: FakeTarget, path: Path, **kw: Any) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve, target, path, allow_uids=(), **kw))
        yield
        tg.cancel_scope.cancel()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "ctl.sock"
    with start_blocking_portal() as portal:
        target = FakeTarget(NAMES, log_dir=folder)
        with portal.wrap_async_context_manager(serving(target, path, idle_timeout=2.0)):
            yield Server(portal, path)


def exchange(path: Path, payload: bytes, *, timeout: float = 10) -> list[dict[str, Any]]:
    """Send ``payload``, close our side, read every line until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed early (an over-long line): its answer, if any, is still read
        data = b""
        try:
            while chunk := sock.recv(1 << 16):
                data += chunk
        except ConnectionResetError:
            pass
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def codes(replies: list[dict[str, Any]]) -> list[int]:
    return [r["error"]["code"] for r in replies if "error" in r]


def check(server: Server, replies: list[dict[str, Any]]) -> None:
    """Each reply is a result or one of the protocol's error codes; the server still serves."""
    for reply in replies:
        assert reply.get("jsonrpc") == "2.0", reply
        assert "result" in reply or reply["error"]["code"] in ERRORS, reply


@pytest.fixture
def baseline(server: Server) -> Iterator[Callable[[str], None]]:
    """A check, run after the test body, that fds and tasks are back where they were."""
    server.status()  # warm up: the first call creates the worker threads' plumbing
    fds, tasks = server.fds(), server.tasks()
    yield lambda what: server.settled(fds, tasks, what)
    assert server.status()["services"]


# --------------------------------------------------------------------------- frames

params_of = {
    "status": {"services": ["svc000"]},
    "start": {"services": ["svc000"], "wait": False, "timeout": 1},
    "stop": {"services": ["svc000"], "wait": False, "timeout": 1},
    "restart": {"services": "all", "wait": False, "timeout": 1},
    "reload": {},
    "logs": {"service": "svc000", "lines": 3, "follow": False},
    "events": {"since": 0, "follow": False},
}
wrong_values: dict[str, list[Any]] = {
    "services": [1, 1.5, True, {}, [], [1], [None], [["svc000"]], "svc000", "ALL", [{}]],
    "service": [1, True, [], {}, ["svc000"], 1.5],
    "wait": [1, 0, "true", None, [], {}, 1.5],
    "timeout": ["1", True, None, -1, 0, 10**9, [], {}, float("1e308") * 10, 1e-400],
    "lines": [-1, 1.5, "5", True, 10**30, [], {}],
    "follow": [1, "yes", None, [], {}],
    "since": [-1, 1.5, "1", True, 2**64, [], {}],
}
wrong_cases = [
    (method, key, value)
    for method, params in params_of.items()
    for key in params
    for value in wrong_values[key]
    # null is "not given" for these optional params (the default applies)
    if not (value is None and key in ("service", "lines", "since"))
]


class TestFrames:
    """Every kind of broken frame: the right error code, or a closed connection."""

    @pytest.mark.parametrize(("method", "key", "value"), wrong_cases)
    def test_wrong_type_for_every_param(
        self, server: Server, method: str, key: str, value: Any
    ) -> None:
        """Each param of each method of contract section 8, given a wrong type or range:
        -32602 (or -32001 for a string that cannot be a service name)."""
        params = {**params_of[method], key: value}
        text = json.dumps({"jsonrpc": "2.0", "id": 5, "method": method, "params": params})
        replies = exchange(server.path, text.replace("Infinity", "1e999").encode() + b"\n")
        assert len(replies) == 1 and replies[0]["id"] == 5, replies
        assert codes(replies) in ([protocol.INVALID_PARAMS], [protocol.UNKNOWN_SERVICE]), replies

    @pytest.mark.parametrize(
        "frame",
        [
            b"\xff\xfe\xfd",
            b'{"jsonrpc":"2.0","id":1,"method":"status\xc3"}',
            b'{"jsonrpc":"2.0","id":1,"method":"\xed\xa0\x80"}',  # a UTF-8 encoded surrogate
            b"[" * 100_000,
            b"{" * 50_000,
            b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
            b'{"jsonrpc":"2.0","id":' + b"7" * 10_000 + b',"method":"status"}',
            b'{"jsonrpc":"2.0","id":1,"method":"logs","params":{"lines":' + b"9" * 10_000 + b"}}",
            b'{"jsonrpc":"2.0","id":1,"method":"start","params":{"timeout":1'
            + b"0" * 10_000
            + b'.5,"services":"all"}}',
        ],
        ids=[
            "bytes",
            "bad-utf8",
            "surrogate",
            "deep-arrays",
            "deep-objects",
            "deep-valid",
            "id-10k-digits",
            "lines-10k-digits",
            "timeout-10k-digits",
        ],
    )
    def test_malformed_frames(self, server: Server, frame: bytes, baseline: Any) -> None:
        """Invalid UTF-8, nesting 100,000 deep, numbers of 10,000 digits: one error each."""
        replies = exchange(server.path, frame + b"\n")
        check(server, replies)
        assert len(replies) == 1 and "error" in replies[0], replies
        assert replies[0]["error"]["code"] in (protocol.PARSE_ERROR, protocol.INVALID_PARAMS)
        baseline("malformed frame")

    @pytest.mark.parametrize("size", [MAX_LINE + 1, 4 * MAX_LINE])
    def test_huge_lines(self, server: Server, size: int, baseline: Any) -> None:
        """Over 1 MiB (with or without a newline at the end): -32600 once, then closed."""
        for payload in (b"a" * size + b"\n", b"[" * size):
            replies = exchange(server.path, payload, timeout=30)
            check(server, replies)
            assert codes(replies) == [protocol.INVALID_REQUEST], replies
        baseline("huge line")

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        garbage=st.one_of(
            st.binary(max_size=600),
            st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        )
    )
    def test_random_bytes(self, server: Server, garbage: bytes) -> None:
        """Random bytes and text: at most one reply per line, all valid, server up."""
        replies = exchange(server.path, garbage + b"\n")
        check(server, replies)
        assert len(replies) <= garbage.count(b"\n") + 1

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(sorted(params_of)),
        params=st.dictionaries(
            st.sampled_from(sorted(wrong_values)),
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers()
                | st.floats(allow_nan=False)
                | st.text(max_size=70),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
                max_leaves=8,
            ),
            max_size=4,
        ),
    )
    def test_random_params(self, server: Server, method: str, params: dict[str, Any]) -> None:
        """Random values for the real param names: a result or a protocol error."""
        if params.get("follow") is True:
            params["follow"] = False  # a follow would never end
        text = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        replies = exchange(server.path, text.replace("Infinity", "1e999").encode() + b"\n")
        check(server, replies)
        assert len(replies) == 1

    def test_no_leak_after_the_fuzzing(self, server: Server, baseline: Any) -> None:
        """After everything above, 200 more garbage exchanges leave fds and tasks as they were."""
        for number in range(200):
            exchange(server.path, b"\xff" * number + b"\n{}\n[]\n")
        baseline("200 garbage exchanges")


# --------------------------------------------------------------------------- storms


def storm_client(path: Path, kind: int) -> None:
    """One of: connect and close at once; a full status call; a partial line, then close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))  # blocking: waits for room in the backlog, as the CLI does
        sock.settimeout(20)
        if kind == 1:
            assert ControlClient(path).call("status", {}, timeout=20)["services"]
        elif kind == 2:
            sock.sendall(b'{"jsonrpc":"2.0","id":1,"meth')


class TestStorms:
    """Many connections at once, silent ones, stalled ones: the server stays up and answers."""

    def test_1000_concurrent_connections_and_status_still_answers(
        self, server: Server, baseline: Any
    ) -> None:
        """1,000 clients open and close concurrently (some with a call, some mid-line) next
        to 300 silent and 50 stalled connections; status answers within 5 s throughout."""
        silent = []
        try:
            for number in range(350):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(server.path))
                if number >= 300:
                    sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "sta')
                silent.append(sock)
            stop = threading.Event()
            answered: list[float] = []

            def watch() -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    assert server.status(timeout=5)["services"]
                    answered.append(time.monotonic() - started)

            with ThreadPoolExecutor(max_workers=64) as pool:
                watcher = pool.submit(watch)
                try:
                    storm = [pool.submit(storm_client, server.path, n % 3) for n in range(1000)]
                    for future in storm:
                        future.result()
                finally:
                    stop.set()
                watcher.result()
            assert answered and max(answered) < 5
        finally:
            for sock in silent:
                sock.close()
        baseline("storm")

    def test_the_client_waits_for_room_in_a_full_backlog(self, tmp_path: Path) -> None:
        """A daemon whose listen backlog is full (a storm) is busy, not unreachable: the
        client's connect waits for room (up to 5 s) instead of failing with EAGAIN."""
        path = tmp_path / "busy.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(0)
        queued = []
        while True:  # fill the backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            queued.append(sock)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                break
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(ControlClient(path).call("status", {}, timeout=10))
            except Exception as exc:
                outcome.append(exc)

        def answer() -> None:
            while True:  # the queued (closed) connections first, then the client's
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(10)
                    if conn.recv(1 << 16):
                        conn.sendall(b'{"jsonrpc":"2.0","id":1,"result":{"services":[]}}\n')
                        return

        client = threading.Thread(target=call)
        client.start()
        time.sleep(0.5)  # let the client reach connect() while the backlog is full
        for sock in queued:
            sock.close()
        server = threading.Thread(target=answer, daemon=True)
        server.start()
        client.join(20)
        server.join(20)
        listener.close()
        assert outcome == [{"services": []}], outcome

    def test_a_stalled_partial_line_is_timed_out_without_blocking_others(
        self, server: Server, baseline: Any
    ) -> None:
        """A client that sends half a request and stalls is closed after idle_timeout (2 s
        here); meanwhile other clients are served."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
            stalled.settimeout(20)
            stalled.connect(str(server.path))
            stalled.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "st')
            assert server.status()["services"]
            assert stalled.recv(1) == b"", "the stalled connection was not closed"
        baseline("stalled line")

    def test_connection_cap_with_a_storm_of_silent_clients(self, tmp_path: Path) -> None:
        """max_connections=16 and 500 silent clients: the oldest idle ones are closed to make
        room, and status still answers."""
        path = tmp_path / "cap.sock"
        with start_blocking_portal() as portal:
            target = FakeTarget(NAMES, log_dir=tmp_path)
            with portal.wrap_async_context_manager(serving(target, path, max_connections=16)):
                silent = []
                try:
                    for _ in range(500):
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        sock.connect(str(path))
                        silent.append(sock)
                    assert ControlClient(path).call("status", {}, timeout=5)["services"]
                    silent[0].settimeout(10)
                    assert silent[0].recv(1) == b""
                finally:
                    for sock in silent:
                        sock.close()
