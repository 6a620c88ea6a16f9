"""Disk full and file size limits: the drain reads on, drops whole lines, counts, resumes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.daemonlog import DaemonLog
from supervisor.logfiles import DrainStats, DropReport, LogDrops, RotatingLog, drain, open_pipe
from tests.support import tmpfs

PROGRAMS = Path(__file__).parent.parent / "programs"
LINE = re.compile(rb"^(line \d{6} x+|after \d{6})$")
MARKER = re.compile(rb"^\[hostvisor: (\d+) lines \((\d+) bytes\) dropped: .+\]$")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem (tmpfs), mounted for the test."""
    with tmpfs(tmp_path / "disk", "256k") as mount:
        yield mount


def fill(disk: Path) -> Path:
    """Fill the disk up to the last byte; returns the filler file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


async def until(condition: object, seconds: float = 20) -> None:
    """Re-check ``condition()`` on every loop turn (a deadline, never a fixed sleep)."""
    with anyio.fail_after(seconds):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.01)


class TestDiskFull:
    async def test_drain_reads_on_drops_whole_lines_and_resumes(self, small_disk: Path) -> None:
        """ENOSPC: the child writes 2 MB into a full 256 KiB disk and is never blocked;
        one report when dropping starts, one when writes succeed again; the file holds
        whole lines only, a marker where lines are missing, and the lines after."""
        log = RotatingLog(small_disk / "svc.log", max_size=1 << 30, backups=1)
        log.write(b"before\n")
        filler = fill(small_disk)
        reports: list[DropReport] = []
        drops = LogDrops(on_report=reports.append)
        read_fd, write_fd, _ = open_pipe(0)
        child = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "logs_phases.py"), "2000", "1000", "50"],
            stdout=write_fd,
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(write_fd)
        stats = DrainStats()
        assert child.stdin is not None and child.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: drain(read_fd, log, stats=stats, drops=drops))
            # The child finished its 2 MB on a full disk: it was never blocked.
            await until(lambda: stats.bytes_read >= 2000 * 1000)
            assert await anyio.to_thread.run_sync(child.stderr.readline) == b"phase1\n"
            await until(lambda: reports)
            assert (reports[0].resumed, reports[0].error) == (False, "ENOSPC")
            filler.unlink()
            child.stdin.write(b"go\n")
            child.stdin.close()
        assert child.wait(10) == 0
        log.close()
        assert [r.resumed for r in reports] == [False, True]
        assert sum(r.bytes for r in reports) == drops.bytes > 1_500_000
        assert drops.episodes == 1
        lines = (small_disk / "svc.log").read_bytes().split(b"\n")
        assert lines[0] == b"before" and lines.pop() == b""
        # Truncating a torn write frees a little room: one episode may leave several
        # markers, which together count every dropped line once.
        markers = [m for m in map(MARKER.match, lines[1:]) if m]
        assert sum(int(m[1]) for m in markers) == drops.lines
        assert sum(int(m[2]) for m in markers) == drops.bytes
        body = [line for line in lines[1:] if not MARKER.match(line)]
        assert all(LINE.match(line) for line in body), [x[:30] for x in body if not LINE.match(x)]
        assert [line for line in body if line.startswith(b"after")] == [
            b"after %06d" % n for n in range(50)
        ]

    async def test_daemon_log_survives_a_full_disk(self, small_disk: Path) -> None:
        """The daemon log on a full disk: nothing raises, lines are counted, and the
        file resumes with a marker once there is room again."""
        logs = small_disk / "logs"
        logs.mkdir()
        reports: list[DropReport] = []
        log = DaemonLog(
            RotatingLog(logs / "hostvisor.log", max_size=1 << 20, backups=1),
            stream=open(os.devnull, "w"),  # noqa: SIM115
            drops=LogDrops(on_report=reports.append),
        )
        filler = fill(small_disk)
        for n in range(500):
            log.write("info", f"message {n}", n=n)
        assert log.drops.lines == 500 and log.drops.failing
        assert [r.resumed for r in reports] == [False]
        filler.unlink()
        log.write("info", "room again")
        log.close()
        assert [r.resumed for r in reports] == [False, True]
        text = (logs / "hostvisor.log").read_text().splitlines()
        size = log.drops.bytes
        assert text[0] == f"[hostvisor: 500 lines ({size} bytes) dropped: No space left on device]"
        assert json.loads(text[1])["message"] == "room again"


class TestFileSizeLimit:
    def test_efbig_rotates_and_drops_only_what_cannot_fit(self, tmp_path: Path) -> None:
        """RLIMIT_FSIZE (SIGXFSZ ignored): a write that crosses the limit is cut back to
        its last whole line, the file rotates and takes the rest; a line longer than
        the limit is dropped (EFBIG) and counted; no file is over the limit."""
        limit = 64 << 10
        path = tmp_path / "f.log"
        result = subprocess.run(
            [sys.executable, str(PROGRAMS / "logs_fsize.py"), str(path), str(limit)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        outcomes = json.loads(result.stdout)
        failed = [o for o in outcomes if o[2]]
        assert failed == [[2 * limit + 6, 1, "EFBIG"]]
        backups = sorted(tmp_path.glob("f.log.*"), key=lambda p: -int(p.suffix[1:]))
        files = [*backups, path]
        assert len(files) > 3
        numbers: list[int] = []
        for each in files:
            data = each.read_bytes()
            assert 0 < len(data) <= limit and data.endswith(b"\n")
            for line in data.splitlines():
                assert re.fullmatch(rb"line (\d{6}) x+", line) and len(line) == 999, line[:20]
                numbers.append(int(line[5:11]))
        assert numbers == sorted(numbers)
        assert numbers[-3:] == [199, 199, 199]
