"""The control socket: framing, methods, security and robustness (contract section 8).

The server runs in the test's event loop on a real Unix socket in tmp_path and
serves a fake daemon (``tests/programs/ctl_fake_daemon.py``, a ControlTarget
without processes). Clients are raw sockets or the real ``ControlClient``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.control import protocol
from supervisor.control.client import ControlClient
from supervisor.control.methods import HANDLERS
from supervisor.control.protocol import MAX_LINE, ProtocolError, decode, parse_request
from supervisor.control.server import peer_uid, serve
from supervisor.errors import (
    ConfigRejected,
    DaemonUnreachable,
    SocketPathError,
    UnknownService,
)
from tests.programs.ctl_fake_daemon import FakeTarget

NAMES = ["svc000", "svc001", "svc002"]


def make_target(tmp_path: Path, **kw: Any) -> FakeTarget:
    return FakeTarget(NAMES, log_dir=tmp_path, **kw)


@asynccontextmanager
async def running(target: FakeTarget, path: Path, **kw: Any) -> AsyncIterator[Path]:
    """Serve ``target`` on ``path`` until the block ends."""
    kw.setdefault("allow_uids", ())
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve, target, path, **kw))
        yield path
        tg.cancel_scope.cancel()


class Raw:
    """A raw client: bytes out, decoded lines in."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def request(self, method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(json.dumps(message).encode() + b"\n")
        return await self.line()

    async def line(self) -> dict[str, Any]:
        with anyio.fail_after(10):
            value: dict[str, Any] = json.loads(await self.reader.receive_until(b"\n", 1 << 24))
            return value

    async def closed(self) -> bool:
        """True once the server closed the connection (EOF), after any pending lines."""
        with anyio.fail_after(10):
            try:
                while await self.stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        return False


@asynccontextmanager
async def connect(path: Path) -> AsyncIterator[Raw]:
    async with await anyio.connect_unix(path) as stream:
        yield Raw(stream)


async def call(path: Path, method: str, params: Any = None, **kw: Any) -> Any:
    """The real client, from a worker thread."""
    client = ControlClient(path)
    return await anyio.to_thread.run_sync(lambda: client.call(method, params, **kw))


class TestFraming:
    """decode() and parse_request(): what is a valid message."""

    @pytest.mark.parametrize(
        "line",
        [b"\xff\xfe{}", b"{nope", b"NaN", b'{"a": Infinity}', b"1" * 5000, b"[" * 70 + b"]" * 70],
    )
    def test_garbage_is_a_parse_error(self, line: bytes) -> None:
        """Invalid UTF-8, invalid JSON, NaN/Infinity, 5000-digit numbers and 70 levels: -32700."""
        with pytest.raises(ProtocolError) as info:
            decode(line)
        assert info.value.code == protocol.PARSE_ERROR

    def test_nesting_up_to_the_limit_is_accepted(self) -> None:
        """64 levels of nesting parse; 65 do not."""
        assert decode(b"[" * 64 + b"]" * 64) is not None
        with pytest.raises(ProtocolError):
            decode(b"[" * 65 + b"]" * 65)

    def test_deep_nesting_far_beyond_the_recursion_limit(self) -> None:
        """100 000 levels are an error, not a RecursionError escaping."""
        with pytest.raises(ProtocolError):
            decode(b"[" * 100_000 + b"]" * 100_000)

    @pytest.mark.parametrize(
        ("message", "code"),
        [
            ([{"jsonrpc": "2.0", "id": 1, "method": "status"}], protocol.INVALID_REQUEST),
            ("status", protocol.INVALID_REQUEST),
            ({"id": 1, "method": "status"}, protocol.INVALID_REQUEST),
            ({"jsonrpc": "1.0", "id": 1, "method": "status"}, protocol.INVALID_REQUEST),
            ({"jsonrpc": "2.0", "id": True, "method": "status"}, protocol.INVALID_REQUEST),
            ({"jsonrpc": "2.0", "id": {}, "method": "status"}, protocol.INVALID_REQUEST),
            ({"jsonrpc": "2.0", "id": 1, "method": 7}, protocol.INVALID_REQUEST),
            ({"jsonrpc": "2.0", "id": 1, "method": "shutdown"}, protocol.METHOD_NOT_FOUND),
            ({"jsonrpc": "2.0", "id": 1, "method": "rpc.discover"}, protocol.METHOD_NOT_FOUND),
            ({"jsonrpc": "2.0", "id": 1, "method": "_status"}, protocol.METHOD_NOT_FOUND),
            ({"jsonrpc": "2.0", "id": 1, "method": "status.x"}, protocol.METHOD_NOT_FOUND),
            (
                {"jsonrpc": "2.0", "id": 1, "method": "status", "params": []},
                protocol.INVALID_PARAMS,
            ),
        ],
    )
    def test_invalid_requests(self, message: Any, code: int) -> None:
        """Batches, non-objects, bad jsonrpc/id/method, unknown or dotted names, a params list."""
        with pytest.raises(ProtocolError) as info:
            parse_request(message)
        assert info.value.code == code

    @pytest.mark.parametrize(
        ("method", "params"),
        [
            ("status", {"services": [7]}),
            ("status", {"services": []}),
            ("status", {"services": "svc000"}),
            ("status", {"service": ["svc000"]}),
            ("start", {}),
            ("start", {"services": ["svc000"], "timeout": 0}),
            ("start", {"services": ["svc000"], "timeout": 1e999}),
            ("start", {"services": ["svc000"], "timeout": True}),
            ("start", {"services": ["svc000"], "wait": 1}),
            ("stop", {"services": "everything"}),
            ("reload", {"force": True}),
            ("logs", {"lines": True}),
            ("logs", {"lines": -1}),
            ("logs", {"service": 3}),
            ("events", {"since": "7"}),
        ],
    )
    def test_invalid_params(self, method: str, params: dict[str, Any]) -> None:
        """Wrong types, missing or unknown keys, out-of-range values: -32602."""
        with pytest.raises(ProtocolError) as info:
            parse_request({"jsonrpc": "2.0", "id": "x", "method": method, "params": params})
        assert info.value.code == protocol.INVALID_PARAMS
        assert info.value.id == "x"

    @pytest.mark.parametrize(
        "params",
        [
            {"services": ["../etc"]},
            {"services": ["Web"]},
            {"services": ["a" * 64]},
            {"service": ""},
        ],
    )
    def test_impossible_names_are_unknown_services(self, params: dict[str, Any]) -> None:
        """A string no unit can be named is rejected before use as an unknown service
        (-32001, data.unknown), like any other name that is not configured."""
        method = "logs" if "service" in params else "status"
        with pytest.raises(ProtocolError) as info:
            parse_request({"jsonrpc": "2.0", "id": "x", "method": method, "params": params})
        assert info.value.code == protocol.UNKNOWN_SERVICE
        assert isinstance(info.value.data["unknown"], list)

    def test_defaults_are_filled_in(self) -> None:
        """Omitted params take the documented defaults."""
        req = parse_request({"jsonrpc": "2.0", "id": 1, "method": "logs"})
        assert req.params == {"service": None, "lines": 50, "follow": False}
        req = parse_request(
            {"jsonrpc": "2.0", "method": "restart", "params": {"services": ["a", "a", "b"]}}
        )
        assert req.params == {"services": ["a", "b"], "wait": True, "timeout": 60.0}
        assert not req.has_id

    def test_every_method_of_the_contract_is_served(self) -> None:
        """One table: the contract's methods, each with a server handler."""
        expected = {
            "status",
            "start",
            "stop",
            "restart",
            "reload",
            "reexec",
            "logs",
            "events",
            "signal",
            "resources",
        }
        assert set(protocol.METHODS) == expected
        assert set(HANDLERS) == expected


class TestMethods:
    """Each method of contract section 8 over a real socket."""

    async def test_status(self, tmp_path: Path) -> None:
        """The section 5 document; a filter by name; an unknown name is -32001."""
        target = make_target(tmp_path, stopped=["svc002"])
        async with running(target, tmp_path / "s" / "ctl.sock") as path:
            doc = await call(path, "status")
            assert [s["name"] for s in doc["services"]] == NAMES
            assert doc["daemon"]["version"] == "0.1.0"
            doc = await call(path, "status", {"services": ["svc002"]})
            assert [s["state"] for s in doc["services"]] == ["stopped"]
            with pytest.raises(UnknownService, match="nope"):
                await call(path, "status", {"services": ["nope"]})

    async def test_actions_pass_wait_and_timeout(self, tmp_path: Path) -> None:
        """start/stop/restart hand names (or "all"), wait and timeout to the daemon."""
        target = make_target(tmp_path, stopped=["svc002"])
        async with running(target, tmp_path / "ctl.sock") as path:
            result = await call(path, "start", {"services": ["svc002"], "timeout": 5})
            assert [(s["name"], s["state"]) for s in result["services"]] == [("svc002", "running")]
            await call(path, "stop", {"services": "all", "wait": False})
            await call(path, "restart", {"services": ["svc001"]})
        assert target.calls[-3:] == [
            ("start", (["svc002"], True, 5.0)),
            ("stop", ("all", False, 60.0)),
            ("restart", (["svc001"], True, 60.0)),
        ]

    async def test_reload(self, tmp_path: Path) -> None:
        """The diff on success; -32002 with every error as data when rejected."""
        async with running(make_target(tmp_path), tmp_path / "a.sock") as path:
            assert (await call(path, "reload"))["changed"] == ["svc000"]
        target = make_target(tmp_path, reject_reload=True)
        async with running(target, tmp_path / "b.sock") as path:
            with pytest.raises(ConfigRejected) as info:
                await call(path, "reload")
            assert info.value.code == -32002
            assert info.value.data == [
                "units/web.toml: health.intervall: unknown key",
                "config.toml: bad",
            ]

    async def test_logs_returns_the_last_lines(self, tmp_path: Path) -> None:
        """The last N lines of a service's log, or of the daemon's; unknown names -32001."""
        (tmp_path / "svc000.log").write_text("".join(f"line {i}\n" for i in range(100)))
        (tmp_path / "hostvisor.log").write_text('{"msg": "daemon"}\n')
        async with running(make_target(tmp_path), tmp_path / "ctl.sock") as path:
            result = await call(path, "logs", {"service": "svc000", "lines": 3})
            assert result == {"lines": ["line 97", "line 98", "line 99"]}
            assert len((await call(path, "logs", {"service": "svc000"}))["lines"]) == 50
            assert (await call(path, "logs", {}))["lines"] == ['{"msg": "daemon"}']
            assert (await call(path, "logs", {"service": "svc001"}))["lines"] == []
            with pytest.raises(UnknownService):
                await call(path, "logs", {"service": "nope"})

    async def test_events_since(self, tmp_path: Path) -> None:
        """Recent events as section 6 objects; ``since`` keeps only later seqs."""
        target = make_target(tmp_path)
        for name in NAMES:
            target.bus.publish("hostvisor.service.running", service=name, message="up")
        async with running(target, tmp_path / "ctl.sock") as path:
            events = (await call(path, "events"))["events"]
            assert [e["seq"] for e in events] == [1, 2, 3]
            assert set(events[0]) == {"seq", "time", "event", "service", "message", "attributes"}
            assert [e["seq"] for e in (await call(path, "events", {"since": 2}))["events"]] == [3]

    async def test_ids_and_notifications(self, tmp_path: Path) -> None:
        """A response carries its request's id; a notification (no id) gets no response."""
        target = make_target(tmp_path, stopped=["svc000"])
        async with running(target, tmp_path / "ctl.sock") as path, connect(path) as raw:
            note = {"jsonrpc": "2.0", "method": "start", "params": {"services": ["svc000"]}}
            await raw.send(json.dumps(note).encode() + b"\n")
            reply = await raw.request("status", {"services": ["svc000"]}, id="abc")
            assert reply["id"] == "abc"
            assert reply["result"]["services"][0]["state"] == "running"  # the notification ran
            assert (await raw.request("status", id=None))["id"] is None


class TestFollow:
    """logs and events with follow: the result, then notifications until the client closes."""

    async def test_logs_follow(self, tmp_path: Path) -> None:
        """New lines arrive as ``log`` notifications; closing unsubscribes."""
        (tmp_path / "svc001.log").write_text("old\n")
        target = make_target(tmp_path)
        async with running(target, tmp_path / "ctl.sock") as path:
            async with connect(path) as raw:
                params = {"service": "svc001", "lines": 5, "follow": True}
                assert (await raw.request("logs", params, id=9)) == {
                    "jsonrpc": "2.0",
                    "id": 9,
                    "result": {"lines": ["old"]},
                }
                assert target.loghub.has_subscribers("svc001")
                target.loghub.publish("svc001", ["new 1", "new 2"])
                target.loghub.publish("svc000", ["not followed"])
                for text in ("new 1", "new 2"):
                    note = await raw.line()
                    assert note == {
                        "jsonrpc": "2.0",
                        "method": "log",
                        "params": {"service": "svc001", "line": text},
                    }
            with anyio.fail_after(5):
                while target.loghub.has_subscribers("svc001"):
                    await anyio.sleep(0.01)

    async def test_logs_follow_of_an_unknown_service(self, tmp_path: Path) -> None:
        """An error response, and the connection keeps serving."""
        async with (
            running(make_target(tmp_path), tmp_path / "ctl.sock") as path,
            connect(path) as raw,
        ):
            reply = await raw.request("logs", {"service": "nope", "follow": True})
            assert reply["error"]["code"] == -32001
            assert "result" in await raw.request("status")

    async def test_events_follow_without_duplicates(self, tmp_path: Path) -> None:
        """Events after ``since`` in the result, later ones as notifications, each once."""
        target = make_target(tmp_path)
        target.bus.publish("hostvisor.daemon.started")
        target.bus.publish("hostvisor.service.running", service="svc000")
        async with running(target, tmp_path / "ctl.sock") as path, connect(path) as raw:
            reply = await raw.request("events", {"follow": True, "since": 1})
            assert [e["seq"] for e in reply["result"]["events"]] == [2]
            target.bus.publish("hostvisor.service.stopped", service="svc000", message="bye")
            note = await raw.line()
            assert note["method"] == "event"
            assert (note["params"]["seq"], note["params"]["message"]) == (3, "bye")

    async def test_python_client_stream(self, tmp_path: Path) -> None:
        """ControlClient.stream gives the result, then notification params."""
        target = make_target(tmp_path)
        async with running(target, tmp_path / "ctl.sock") as path:
            sub = await anyio.to_thread.run_sync(lambda: ControlClient(path).stream("events"))
            with sub:
                assert sub.result == {"events": []}
                target.bus.publish("hostvisor.daemon.reloaded", message="ok")
                params = await anyio.to_thread.run_sync(lambda: next(iter(sub)))
                assert params["event"] == "hostvisor.daemon.reloaded"


class TestSocketFile:
    """Binding: modes, stale sockets, live sockets, regular files."""

    async def test_folder_0700_and_socket_0600(self, tmp_path: Path) -> None:
        """A new folder is 0700 and the socket 0600; the process umask is left as it was."""
        umask = os.umask(0o022)
        try:
            async with running(make_target(tmp_path), tmp_path / "new" / "ctl.sock") as path:
                assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                assert stat.S_ISSOCK(path.stat().st_mode)
            assert os.umask(0o022) == 0o022
        finally:
            os.umask(umask)

    async def test_existing_folder_of_ours_is_tightened(self, tmp_path: Path) -> None:
        """A folder we own with looser modes becomes 0700."""
        folder = tmp_path / "run"
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
        async with running(make_target(tmp_path), folder / "ctl.sock"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    async def test_stale_socket_is_replaced(self, tmp_path: Path) -> None:
        """A socket file nobody listens on (a killed daemon's) is replaced."""
        path = tmp_path / "ctl.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(path))
        dead.close()
        assert path.exists()
        async with running(make_target(tmp_path), path):
            assert "services" in await call(path, "status")

    async def test_live_socket_is_never_stolen(self, tmp_path: Path) -> None:
        """A second server on a live socket fails; the first keeps serving."""
        async with running(make_target(tmp_path), tmp_path / "ctl.sock") as path:
            with pytest.raises(SocketPathError, match="listening"):
                await serve(make_target(tmp_path), path, allow_uids=())
            assert "services" in await call(path, "status")

    async def test_regular_file_is_refused_and_kept(self, tmp_path: Path) -> None:
        """A regular file at the socket path is an error and is not deleted."""
        path = tmp_path / "ctl.sock"
        path.write_text("precious")
        with pytest.raises(SocketPathError, match="not a socket"):
            await serve(make_target(tmp_path), path, allow_uids=())
        assert path.read_text() == "precious"

    async def test_too_long_path(self, tmp_path: Path) -> None:
        """A path over the sockaddr_un limit is a clear error."""
        with pytest.raises(SocketPathError, match="OS limit"):
            await serve(make_target(tmp_path), tmp_path / ("x" * 120), allow_uids=())

    async def test_socket_removed_on_exit(self, tmp_path: Path) -> None:
        """Cancelling serve() removes the socket file; a client then finds no daemon."""
        async with running(make_target(tmp_path), tmp_path / "ctl.sock") as path:
            pass
        assert not path.exists()
        with pytest.raises(DaemonUnreachable, match="no daemon"):
            await call(path, "status")


class TestRobustness:
    """Malformed, huge, idle, slow and numerous clients never stall the others."""

    async def test_a_line_of_exactly_1_mib_is_served(self, tmp_path: Path) -> None:
        """The limit is inclusive: a 1 MiB request (padded with spaces) is answered."""
        head = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "status"}).encode()
        line = head[:-1] + b" " * (MAX_LINE - len(head)) + b"}"
        assert len(line) == MAX_LINE
        async with (
            running(make_target(tmp_path), tmp_path / "ctl.sock") as path,
            connect(path) as raw,
        ):
            await raw.send(line + b"\n")
            assert "result" in await raw.line()

    async def test_a_longer_line_is_an_error_then_closed(self, tmp_path: Path) -> None:
        """1 MiB + 1 byte: one error response, then the connection is closed."""
        async with (
            running(make_target(tmp_path), tmp_path / "ctl.sock") as path,
            connect(path) as raw,
        ):
            await raw.send(b" " * (MAX_LINE + 1) + b"\n")
            assert (await raw.line())["error"]["code"] == protocol.INVALID_REQUEST
            assert await raw.closed()
            assert "services" in await call(path, "status")

    async def test_malformed_frames_get_errors_and_the_connection_goes_on(
        self, tmp_path: Path
    ) -> None:
        """Each bad line gets its error code; the same connection then serves status."""
        frames = [
            (b"\xc3\x28", protocol.PARSE_ERROR),
            (b"{", protocol.PARSE_ERROR),
            (b"[" * 200 + b"]" * 200, protocol.PARSE_ERROR),
            (b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"services":[1e999]}}', -32602),
            (b"[]", protocol.INVALID_REQUEST),
            (b'{"jsonrpc":"2.0","id":1,"method":"__init__"}', protocol.METHOD_NOT_FOUND),
            (b'{"jsonrpc":"2.0","id":1,"method":"logs","params":{"service":"../x"}}', -32001),
            (b'{"jsonrpc":"2.0","id":' + b"9" * 4400 + b',"method":"status"}', -32700),
        ]
        async with (
            running(make_target(tmp_path), tmp_path / "ctl.sock") as path,
            connect(path) as raw,
        ):
            for frame, code in frames:
                await raw.send(frame + b"\n")
                assert (await raw.line())["error"]["code"] == code, frame[:40]
            assert "result" in await raw.request("status")

    async def test_idle_connections_are_closed(self, tmp_path: Path) -> None:
        """No complete request within idle_timeout: closed (a partial line does not count)."""
        async with (
            running(make_target(tmp_path), tmp_path / "ctl.sock", idle_timeout=0.3) as path,
            connect(path) as silent,
            connect(path) as partial,
        ):
            await partial.send(b'{"jsonrpc": "2.0", ')
            assert await silent.closed()
            assert await partial.closed()

    async def test_200_idle_connections_and_status_still_answers(self, tmp_path: Path) -> None:
        """With 200 connections open and silent, a new client gets its status."""
        async with running(make_target(tmp_path), tmp_path / "ctl.sock") as path:
            streams = [await anyio.connect_unix(path) for _ in range(200)]
            try:
                assert len((await call(path, "status"))["services"]) == 3
            finally:
                for stream in streams:
                    await stream.aclose()

    async def test_at_the_cap_the_longest_idle_connection_makes_room(self, tmp_path: Path) -> None:
        """max_connections=20 and 200 silent clients: status answers; the oldest were closed."""
        async with running(
            make_target(tmp_path), tmp_path / "ctl.sock", max_connections=20
        ) as path:
            streams = [await anyio.connect_unix(path) for _ in range(200)]
            try:
                assert "services" in await call(path, "status")
                assert await Raw(streams[0]).closed()
            finally:
                for stream in streams:
                    await stream.aclose()

    async def test_at_the_cap_with_every_connection_busy_new_ones_are_closed(
        self, tmp_path: Path
    ) -> None:
        """Busy (following) connections are not evicted; a new client is accepted and closed."""
        async with (
            running(make_target(tmp_path), tmp_path / "ctl.sock", max_connections=2) as path,
            connect(path) as one,
            connect(path) as two,
        ):
            for raw in (one, two):
                assert "result" in await raw.request("events", {"follow": True})
            with pytest.raises(DaemonUnreachable, match="too many connections"):
                await call(path, "status")

    async def test_a_client_that_stops_reading_stalls_nobody(self, tmp_path: Path) -> None:
        """A follower that never reads is dropped after send_timeout; others are served."""
        target = make_target(tmp_path)
        async with (
            running(target, tmp_path / "ctl.sock", send_timeout=0.5) as path,
            connect(path) as stuck,
        ):
            assert "result" in await stuck.request("events", {"follow": True})
            for _ in range(1000):
                target.bus.publish("hostvisor.daemon.reloaded", message="x" * 2000)
            assert "services" in await call(path, "status")
            with anyio.fail_after(10):
                while target.bus._subscribers:
                    await anyio.sleep(0.05)

    async def test_peer_uid_of_a_socketpair_is_ours(self) -> None:
        """SO_PEERCRED (LOCAL_PEERCRED on macOS) reads the peer's uid."""
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with left, right:
            assert peer_uid(left) == os.geteuid()


FOREIGN_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "status"}\n')
data = b""
while not data.endswith(b"\n") and (chunk := s.recv(65536)):
    data += chunk
print(data.decode())
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b"", "nothing after the one response"
"""


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a client as uid 65534",
)
class TestForeignPeer:
    """A peer whose uid is not ours, root's or allowed gets -32003 and nothing else."""

    @staticmethod
    async def as_nobody(path: Path) -> list[dict[str, Any]]:
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        argv += [python, "-I", "-c", FOREIGN_CLIENT, str(path)]
        with anyio.fail_after(20):
            done = await anyio.run_process(argv, check=True)
        return [json.loads(line) for line in done.stdout.decode().splitlines() if line]

    @asynccontextmanager
    async def open_socket(self, allow_uids: tuple[int, ...]) -> AsyncIterator[Path]:
        """A server whose folder and socket modes let anyone connect (0711, 0666)."""
        folder = Path(tempfile.mkdtemp(prefix="hv-", dir="/tmp"))
        try:
            target = FakeTarget(NAMES, log_dir=folder)
            path = folder / "run" / "ctl.sock"
            async with running(target, path, allow_uids=allow_uids):
                folder.chmod(0o711)
                path.parent.chmod(0o711)
                path.chmod(0o666)
                yield path
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    async def test_refused_even_with_open_file_modes(self) -> None:
        """The peer check, not the file mode, refuses uid 65534: one -32003 response."""
        async with self.open_socket(()) as path:
            replies = await self.as_nobody(path)
        assert len(replies) == 1
        assert replies[0]["error"]["code"] == protocol.PEER_NOT_ALLOWED
        assert "result" not in replies[0]

    async def test_allowed_by_allow_uids(self) -> None:
        """The same client is served when its uid is in allow_uids."""
        async with self.open_socket((65534,)) as path:
            replies = await self.as_nobody(path)
        assert [s["name"] for s in replies[0]["result"]["services"]] == NAMES


# --------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
requests = st.fixed_dictionaries(
    {
        "jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]),
        "method": st.sampled_from([*protocol.METHODS, "nope", "rpc.x"]),
    },
    optional={
        "id": st.none() | st.integers() | st.text(max_size=10) | json_values,
        "params": st.dictionaries(
            st.sampled_from(
                ["services", "service", "wait", "timeout", "lines", "follow", "since", "x"]
            ),
            json_values | st.sampled_from(["all", ["svc000"], ["svc000", "nope"], ["../x"]]),
            max_size=4,
        )
        | json_values,
    },
)


@pytest.fixture(scope="module")
def fake_daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The fake daemon as its own process, serving a real socket (for sync fuzzing)."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "ctl.sock"
    program = Path(__file__).parent / "programs" / "ctl_fake_daemon.py"
    proc = subprocess.Popen(
        [sys.executable, str(program), str(path), "--log-dir", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    """Send ``payload``, close our side, and read every line until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


class TestFuzzing:
    """Garbage from hypothesis never crashes or stalls the server."""

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(garbage=st.binary(max_size=300))
    def test_random_bytes(self, fake_daemon: Any, garbage: bytes) -> None:
        """Every line of random bytes gets at most one error; a good client is still served."""
        path, proc = fake_daemon
        replies = exchange(path, garbage + b"\n")
        assert all("error" in r or "result" in r for r in replies)
        assert len(replies) <= garbage.count(b"\n") + 1
        assert len(ControlClient(path).call("status")["services"]) == 3
        assert proc.poll() is None

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(message=requests)
    def test_random_requests(self, fake_daemon: Any, message: dict[str, Any]) -> None:
        """Random request objects get a result or a protocol error, never an internal error."""
        path, proc = fake_daemon
        if isinstance(message.get("params"), dict):
            message["params"].pop("follow", None)  # a follow would never end
        replies = exchange(path, json.dumps(message).encode() + b"\n")
        for reply in replies:
            assert reply.get("error", {}).get("code") != protocol.INTERNAL_ERROR, reply
        if "id" in message and replies:
            assert replies[0].get("id") in (message["id"], None)
        assert proc.poll() is None
