"""Log files that move under us: rm, mv (logrotate without copytruncate), rm -rf logs/,
SIGUSR1's reopen_all(), and two writers of one path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio

from supervisor.daemonlog import DaemonLog
from supervisor.logfiles import CHECK_EVERY, RotatingLog, drain, open_pipe, reopen_all

PROGRAMS = Path(__file__).parent.parent / "programs"


async def until(condition: object, seconds: float = 10) -> None:
    """Re-check ``condition()`` until it holds (a deadline, never a fixed sleep)."""
    with anyio.fail_after(seconds):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.01)


def ticks(path: Path) -> list[int]:
    try:
        return [int(line.split()[1]) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


class Ticker:
    """A real child writing ``tick N`` every 20 ms, drained into ``log``."""

    def __init__(self, log: RotatingLog) -> None:
        self.log = log
        read_fd, write_fd, _ = open_pipe(0)
        self.child = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "logs_ticker.py"), "0.02"],
            stdout=write_fd,
            stdin=subprocess.PIPE,
        )
        os.close(write_fd)
        self.fd = read_fd

    async def run(self) -> None:
        await drain(self.fd, self.log)

    def stop(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.close()
        self.child.wait(10)


class TestServiceLogMoved:
    async def test_removed_log_is_recreated_within_a_second(self, tmp_path: Path) -> None:
        """`rm svc.log` while the service writes: within CHECK_EVERY (1 s) the path exists
        again and receives the new lines (not an unlinked inode)."""
        path = tmp_path / "logs" / "svc.log"
        path.parent.mkdir()
        log = RotatingLog(path, max_size=1 << 20, backups=1)
        ticker = Ticker(log)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await until(lambda: len(ticks(path)) >= 3)
            path.unlink()
            with anyio.fail_after(CHECK_EVERY + 5):
                await until(lambda: len(ticks(path)) >= 3)
            ticker.stop()
        log.close()

    async def test_moved_log_is_reopened_and_the_old_file_stops(self, tmp_path: Path) -> None:
        """`mv svc.log svc.log.1`: new lines go to a new svc.log; the moved file stops
        growing; no line is lost or written twice across the two files."""
        path = tmp_path / "svc.log"
        moved = tmp_path / "svc.log.1"
        log = RotatingLog(path, max_size=1 << 20, backups=3)
        ticker = Ticker(log)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await until(lambda: len(ticks(path)) >= 3)
            path.rename(moved)
            await until(lambda: len(ticks(path)) >= 3)
            ticker.stop()
        log.close()
        old, new = ticks(moved), ticks(path)
        assert old + new == list(range(len(old) + len(new)))

    async def test_folder_removed_is_recreated_private(self, tmp_path: Path) -> None:
        """`rm -rf <state>/logs`: the folder comes back (mode 0700) with the log in it."""
        folder = tmp_path / "logs"
        folder.mkdir()
        path = folder / "svc.log"
        log = RotatingLog(path, max_size=1 << 20, backups=1)
        ticker = Ticker(log)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await until(lambda: len(ticks(path)) >= 3)
            shutil.rmtree(folder)
            await until(lambda: len(ticks(path)) >= 3)
            ticker.stop()
        log.close()
        assert folder.stat().st_mode & 0o777 == 0o700


class TestReopenAll:
    def test_reopen_all_moves_writes_to_the_new_file_at_once(self, tmp_path: Path) -> None:
        """logrotate's postrotate (SIGUSR1 -> reopen_all()): after a mv, the very next
        write goes to the new file, with no second of delay."""
        path = tmp_path / "a.log"
        log = RotatingLog(path, max_size=1 << 20, backups=1)
        log.write(b"one\n")
        path.rename(tmp_path / "a.log.1")
        assert reopen_all() >= 1
        assert path.exists()
        log.write(b"two\n")
        log.close()
        assert path.read_bytes() == b"two\n"
        assert (tmp_path / "a.log.1").read_bytes() == b"one\n"

    def test_closed_logs_leave_the_registry(self, tmp_path: Path) -> None:
        """A closed (or forgotten) log is not kept: reopen_all() no longer sees it."""
        before = reopen_all()
        closed = RotatingLog(tmp_path / "c.log", max_size=100, backups=1)
        forgotten = RotatingLog(tmp_path / "f.log", max_size=100, backups=1)
        assert reopen_all() == before + 2
        closed.close()
        del forgotten
        assert reopen_all() == before


class TestOnePathOneFile:
    def test_two_logs_of_one_path_share_size_and_rotation(self, tmp_path: Path) -> None:
        """An old and a new instance writing one path at once: every file stays under
        max_size and the lines, read back across rotations, are all there in order."""
        path = tmp_path / "s.log"
        old = RotatingLog(path, max_size=1000, backups=100)
        new = RotatingLog(path, max_size=1000, backups=100)
        for n in range(300):
            (old if n % 2 else new).write(b"line %04d %s\n" % (n, b"z" * 30))
        old.close()
        new.write(b"last\n")
        new.close()
        files = [*sorted(tmp_path.glob("s.log.*"), key=lambda p: -int(p.suffix[1:])), path]
        lines: list[bytes] = []
        for each in files:
            assert each.stat().st_size <= 1000
            lines += each.read_bytes().splitlines()
        assert lines == [b"line %04d %s" % (n, b"z" * 30) for n in range(300)] + [b"last"]


class TestDaemonLogFolderRemoved:
    def test_rm_rf_logs_then_rotation_keeps_logging(self, tmp_path: Path) -> None:
        """issue 9 item 7: `rm -rf <state>/logs`, then enough events to rotate
        hostvisor.log: nothing raises out of the log, the folder is back (0700),
        and the newest lines are in hostvisor.log."""
        folder = tmp_path / "logs"
        folder.mkdir(mode=0o700)
        log = DaemonLog(
            RotatingLog(folder / "hostvisor.log", max_size=4000, backups=2),
            stream=open(os.devnull, "w"),  # noqa: SIM115
        )
        log.write("info", "before")
        shutil.rmtree(folder)
        for n in range(200):
            log.write("info", f"message {n:04d}")
        log.close()
        assert folder.stat().st_mode & 0o777 == 0o700
        assert '"message 0199"' in (folder / "hostvisor.log").read_text()
        assert (folder / "hostvisor.log.1").exists()
        assert log.failures == 0
