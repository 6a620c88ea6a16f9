"""Shutdown races of the control plane: nothing is left hanging when the server stops.

The daemon cancels :func:`serve` once its services are stopped. A command still
in progress then (a ``start`` waiting for its services), or received and not yet
read, is answered with error -32000 "the daemon is shutting down" (the client's
``DaemonUnreachable``, exit 4); followers are closed; and ``serve`` returns
within about a second, its tasks gone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.control.client import ControlClient
from supervisor.control.protocol import SERVER_BUSY
from supervisor.control.server import serve
from supervisor.errors import DaemonUnreachable
from tests.programs.ctl_fake_daemon import FakeTarget


class StuckTarget(FakeTarget):
    """A daemon whose ``start`` waits forever (a service that never gets RUNNING)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.entered = anyio.Event()

    async def start(
        self, names: Sequence[str] | Literal["all"], *, wait: bool, timeout: float
    ) -> dict[str, Any]:
        self.entered.set()
        await anyio.sleep_forever()
        raise AssertionError("not reached")


def line(method: str, params: dict[str, Any], id: int = 1) -> bytes:
    message = {"jsonrpc": "2.0", "id": id, "method": method, "params": params}
    return json.dumps(message).encode() + b"\n"


async def read_all(reader: BufferedByteReceiveStream) -> list[dict[str, Any]]:
    """Every line until the server closes the connection."""
    replies = []
    with anyio.fail_after(10):
        while True:
            try:
                replies.append(json.loads(await reader.receive_until(b"\n", 1 << 24)))
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                return replies


class TestShutdown:
    """Cancelling serve() answers what is in flight and ends every task."""

    async def test_a_command_in_progress_is_answered(self, tmp_path: Path) -> None:
        """A ``start`` still waiting when the server stops gets -32000, not silence."""
        target = StuckTarget(["svc000"], log_dir=tmp_path)
        path = tmp_path / "ctl.sock"
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(partial(serve, target, path, allow_uids=()))
                stream = await anyio.connect_unix(path)
                reader = BufferedByteReceiveStream(stream)
                await stream.send(line("start", {"services": ["svc000"]}, id=7))
                await target.entered.wait()
                tg.cancel_scope.cancel()
        replies = await read_all(reader)
        await stream.aclose()
        assert len(replies) == 1
        assert replies[0]["id"] == 7
        assert replies[0]["error"]["code"] == SERVER_BUSY
        assert "shutting down" in replies[0]["error"]["message"]

    async def test_the_cli_client_sees_unreachable(self, tmp_path: Path) -> None:
        """ControlClient raises DaemonUnreachable (the CLI's exit 4) with the reason."""
        target = StuckTarget(["svc000"], log_dir=tmp_path)
        path = tmp_path / "ctl.sock"
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                ControlClient(path).call("start", {"services": ["svc000"]}, timeout=20)
            except DaemonUnreachable as exc:
                outcome.append(exc)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(partial(serve, target, path, allow_uids=()))
                async with anyio.create_task_group() as clients:
                    clients.start_soon(partial(anyio.to_thread.run_sync, call))
                    await target.entered.wait()
                    tg.cancel_scope.cancel()
        assert outcome and "shutting down" in str(outcome[0])

    async def test_requests_sent_at_the_moment_of_shutdown_are_answered(
        self, tmp_path: Path
    ) -> None:
        """Requests that reach the socket just as the server stops get an answer each
        (a result, or -32000), never a closed connection without one."""
        target = FakeTarget(["svc000"], log_dir=tmp_path)
        path = tmp_path / "ctl.sock"
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(partial(serve, target, path, allow_uids=()))
                streams = [await anyio.connect_unix(path) for _ in range(20)]
                readers = [BufferedByteReceiveStream(s) for s in streams]
                # Wait until each connection is being served (its handler reads).
                for reader, stream in zip(readers, streams, strict=True):
                    await stream.send(line("status", {}, id=0))
                    assert "result" in json.loads(await reader.receive_until(b"\n", 1 << 24))
                for stream in streams:
                    await stream.send(line("status", {}, id=1) + line("reload", {}, id=2))
                tg.cancel_scope.cancel()
        for reader, stream in zip(readers, streams, strict=True):
            replies = await read_all(reader)
            await stream.aclose()
            assert [r["id"] for r in replies] == [1, 2]
            for reply in replies:
                assert "result" in reply or reply["error"]["code"] == SERVER_BUSY, reply

    @pytest.mark.parametrize("method", ["logs", "events"])
    async def test_followers_that_never_read_do_not_hold_up_the_stop(
        self, tmp_path: Path, method: str
    ) -> None:
        """A follower with a full socket buffer: serve() still returns within seconds."""
        target = FakeTarget(["svc000"], log_dir=tmp_path)
        path = tmp_path / "ctl.sock"
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(partial(serve, target, path, allow_uids=()))
                stream = await anyio.connect_unix(path)
                params = {"service": "svc000"} if method == "logs" else {}
                await stream.send(line(method, {**params, "follow": True}))
                reader = BufferedByteReceiveStream(stream)
                assert "result" in json.loads(await reader.receive_until(b"\n", 1 << 24))
                for _ in range(200):
                    if method == "logs":
                        target.loghub.publish("svc000", ["w" * 8192] * 8)
                    else:
                        target.bus.publish("hostvisor.daemon.reloaded", message="m" * 8192)
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
        await stream.aclose()
        assert not path.exists()
