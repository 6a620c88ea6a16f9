"""A follower that reads slower than the service writes costs bounded memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio

from supervisor.logfiles import FOLLOW_BUFFER, LogHub, RotatingLog, drain, open_pipe

PROGRAMS = Path(__file__).parent.parent / "programs"


class TestSlowFollower:
    async def test_queue_is_bounded_in_bytes_and_skips_ahead(self, tmp_path: Path) -> None:
        """64 MiB without a newline (pieces of ~1 MiB) and a follower that reads nothing
        meanwhile: it holds at most FOLLOW_BUFFER bytes, then reads a marker saying how
        many lines it skipped, then the newest lines."""
        hub = LogHub()
        log = RotatingLog(tmp_path / "big.log", max_size=1 << 30, backups=1)
        read_fd, write_fd, _ = open_pipe(0)
        child = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "proc_longline.py"), str(64 << 20)], stdout=write_fd
        )
        os.close(write_fd)
        async with hub.subscribe("big") as follower:
            with anyio.fail_after(60):
                await drain(read_fd, log, hub=hub, key="big")
            held: list[str] = []
            while True:
                try:
                    held.append(follower.receive_nowait())
                except anyio.WouldBlock:
                    break
        log.close()
        assert child.wait(10) == 0
        assert sum(len(line) for line in held) <= FOLLOW_BUFFER
        assert hub.dropped > 0
        assert held[0] == f"[hostvisor: {hub.dropped} lines skipped, follower too slow]"
        assert all(set(line) == {"y"} for line in held[1:])
