"""Slow and never-reading followers of ``logs -f`` / ``events -f`` (issue 9, item 9).

What holds: a follower that reads too slowly skips ahead (a ``log`` notification
``[hostvisor: N lines skipped ...]`` stands for the lines it missed); one that
reads nothing while the daemon has data for it is dropped after
``send_timeout``; a slow reader of one large answer is served, since the
timeout measures progress; and the daemon's memory stays flat whatever the
followers do, while other clients' ``status`` calls still answer.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.control.client import ControlClient
from supervisor.control.server import serve
from tests.daemon_harness import daemon, py_cmd
from tests.programs.ctl_fake_daemon import FakeTarget

MiB = 1 << 20


@asynccontextmanager
async def running(target: FakeTarget, path: Path, **kw: Any) -> AsyncIterator[Path]:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve, target, path, allow_uids=(), **kw))
        yield path
        tg.cancel_scope.cancel()


def follow_request(method: str, params: dict[str, Any]) -> bytes:
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "follow": True}}
    return json.dumps(message).encode() + b"\n"


class TestSlowFollowerInProcess:
    """The server against a fake daemon whose LogHub the test feeds."""

    async def test_a_slow_follower_skips_ahead_with_a_marker(self, tmp_path: Path) -> None:
        """2,000 lines of 1 KiB while the client reads nothing: it later gets a skip marker
        and the newest line, not the whole backlog."""
        target = FakeTarget(["svc000"], log_dir=tmp_path)
        async with (
            running(target, tmp_path / "ctl.sock", follow_buffer=64 * 1024) as path,
            await anyio.connect_unix(path) as stream,
        ):
            reader = BufferedByteReceiveStream(stream)
            await stream.send(follow_request("logs", {"service": "svc000", "lines": 0}))
            with anyio.fail_after(10):
                assert "result" in json.loads(await reader.receive_until(b"\n", MiB))
            for number in range(2000):
                target.loghub.publish("svc000", [f"line {number} " + "x" * 1024])
                await anyio.lowlevel.checkpoint()
            received: list[str] = []
            with anyio.fail_after(20):
                while not received or not received[-1].startswith("line 1999 "):
                    note = json.loads(await reader.receive_until(b"\n", MiB))
                    assert note["method"] == "log" and note["params"]["service"] == "svc000"
                    received.append(note["params"]["line"])
        markers = [line for line in received if line.startswith("[hostvisor: ")]
        assert markers, "no skip marker: the whole backlog was buffered"
        assert "lines skipped" in markers[0]
        skipped = sum(int(m.split()[1]) for m in markers)
        assert skipped + len(received) - len(markers) == 2000
        assert len(received) < 1000

    async def test_a_follower_that_never_reads_is_dropped(self, tmp_path: Path) -> None:
        """With data pending and no byte taken for send_timeout, the server ends the follow."""
        target = FakeTarget(["svc000"], log_dir=tmp_path)
        async with (
            running(target, tmp_path / "ctl.sock", send_timeout=0.5) as path,
            await anyio.connect_unix(path) as stream,
        ):
            await stream.send(follow_request("logs", {"service": "svc000", "lines": 0}))
            with anyio.fail_after(10):
                while not target.loghub.has_subscribers("svc000"):
                    await anyio.sleep(0.01)
                while target.loghub.has_subscribers("svc000"):
                    target.loghub.publish("svc000", ["y" * 4096] * 64)
                    await anyio.sleep(0.01)

    async def test_a_slow_reader_of_a_large_answer_is_served(self, tmp_path: Path) -> None:
        """~800 KB of ``logs`` read at ~300 KB/s with send_timeout=1 s: the whole answer
        arrives (the timeout bounds a stall, not the whole transfer)."""
        (tmp_path / "svc000.log").write_text("".join(f"{i:05d} {'z' * 400}\n" for i in range(2000)))
        target = FakeTarget(["svc000"], log_dir=tmp_path)
        async with running(target, tmp_path / "ctl.sock", send_timeout=1.0) as path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(str(path))

            def slow_read() -> dict[str, Any]:
                message = {"jsonrpc": "2.0", "id": 1, "method": "logs"}
                message["params"] = {"service": "svc000", "lines": 2000}
                sock.sendall(json.dumps(message).encode() + b"\n")
                data = b""
                sock.settimeout(10)
                while not data.endswith(b"\n"):
                    chunk = sock.recv(16 * 1024)
                    assert chunk, "the server dropped a client that was reading"
                    data += chunk
                    time.sleep(0.05)  # a slow reader, not a synchronisation
                reply: dict[str, Any] = json.loads(data)
                return reply

            with sock:
                reply = await anyio.to_thread.run_sync(slow_read)
        assert len(reply["result"]["lines"]) == 2000


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_never_reading_followers_leave_the_daemon_flat(tmp_path: Path) -> None:
    """A real daemon, a service writing 300 lines of 1 MiB, and raw clients following its log
    and the events without ever reading: the daemon's peak RSS grows by less than 100 MiB
    (the backlog would be ~300 MiB) and ``status`` answers within 5 s throughout."""
    unit = (
        f"command = {py_cmd('control_flood', 300, MiB)}\n"
        'autostart = false\nrestart = "no"\nstart_seconds = "0s"\n'
        '[logs]\nmax_size = "4MiB"\nbackups = 1\n'
    )
    with daemon(tmp_path, units={"flood": unit}) as d:
        assert d.proc is not None
        stuck = []
        try:
            for method, params in (("logs", {"service": "flood", "lines": 0}), ("events", {})):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(str(d.socket))
                sock.sendall(follow_request(method, params))
                stuck.append(sock)  # never read from
            before = rss_kib(d.proc.pid)
            after = d.last_seq()
            client = ControlClient(d.socket)
            client.call("start", {"services": ["flood"], "wait": False}, timeout=5)
            deadline = time.monotonic() + 120

            def exited() -> bool:
                return any(
                    e["seq"] > after and e["event"] == "hostvisor.service.exited" for e in d.events
                )

            while not exited():
                assert time.monotonic() < deadline, "the flood did not finish"
                started = time.monotonic()
                client.call("status", {}, timeout=5)  # raises if no answer within 5 s
                assert time.monotonic() - started < 5
                with contextlib.suppress(AssertionError):  # wakes at the event, or in 0.5 s
                    d.wait_for(exited, timeout=0.5)
            peak = rss_kib(d.proc.pid, "VmHWM")
        finally:
            for sock in stuck:
                sock.close()
    growth_mib = (peak - before) / 1024
    print(f"daemon peak RSS growth: {growth_mib:.1f} MiB")
    assert growth_mib < 100, f"the daemon grew by {growth_mib:.0f} MiB"
