"""Log capture: drains, rotation, link refusal, tail, live followers."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from supervisor.drivers.process import ProcessDriver
from supervisor.errors import DriverError, SpawnError
from supervisor.logfiles import (
    PENDING_CAP,
    DrainStats,
    LogHub,
    RotatingLog,
    drain,
    drain_all,
    open_pipe,
    tail,
)
from supervisor.spec import LogSpec, ProcessSpec, ServiceSpec

PROGRAMS = Path(__file__).parent / "programs"


def program(name: str, *args: object) -> list[str]:
    return [sys.executable, str(PROGRAMS / f"{name}.py"), *map(str, args)]


@asynccontextmanager
async def driver_running(
    tmp_path: Path, hub: LogHub | None = None
) -> AsyncIterator[tuple[ProcessDriver, anyio.abc.TaskGroup]]:
    driver = ProcessDriver(state_dir=tmp_path / "state", loghub=hub)
    try:
        async with anyio.create_task_group() as tg:
            yield driver, tg
    finally:
        driver.close()


def spec_for(tmp_path: Path, name: str, command: list[str], **kw: object) -> ServiceSpec:
    return ServiceSpec(
        name=name, target=ProcessSpec(command=tuple(command)), workdir=tmp_path, **kw
    )  # type: ignore[arg-type]


def log_path(tmp_path: Path, name: str) -> Path:
    return tmp_path / "state" / "logs" / f"{name}.log"


class TestDrain:
    async def test_both_streams_intact_after_immediate_exit(self, tmp_path: Path) -> None:
        """200 numbered 3 KB lines on stdout AND stderr, then exit at once: all 400
        lines arrive whole, each exactly once, in order per stream."""
        async with driver_running(tmp_path) as (driver, tg):
            handle = await driver.start(
                spec_for(tmp_path, "lines", program("proc_lines", 200, 3000)), task_group=tg
            )
            with anyio.fail_after(20):
                assert (await handle.wait()).code == 0
                await handle.drained()
        lines = log_path(tmp_path, "lines").read_bytes().split(b"\n")
        assert lines.pop() == b""
        assert len(lines) == 400
        pattern = re.compile(rb"^(out|err) (\d{6}) x+$")
        seen: dict[bytes, list[int]] = {b"out": [], b"err": []}
        for line in lines:
            match = pattern.match(line)
            assert match and len(line) == 2999, line[:40]
            seen[match[1]].append(int(match[2]))
        assert seen[b"out"] == list(range(200))
        assert seen[b"err"] == list(range(200))

    async def test_lines_longer_than_a_pipe_write_are_not_torn(self, tmp_path: Path) -> None:
        """Lines of 100 KB (each written in many pieces by the kernel, so reads end
        mid-line) on both streams still arrive whole and unmixed."""
        async with driver_running(tmp_path) as (driver, tg):
            spec = spec_for(tmp_path, "wide", program("proc_lines", 40, 100_000))
            handle = await driver.start(spec, task_group=tg)
            with anyio.fail_after(20):
                await handle.wait()
                await handle.drained()
        lines = log_path(tmp_path, "wide").read_bytes().splitlines()
        assert len(lines) == 80
        assert all(len(line) == 99_999 and line.endswith(b"x") for line in lines)
        for stream in (b"out", b"err"):
            numbers = [int(line[4:10]) for line in lines if line.startswith(stream)]
            assert numbers == list(range(40))

    async def test_service_log_rotates_per_unit_settings(self, tmp_path: Path) -> None:
        """A service's [logs] max_size and backups apply to its drained log."""
        spec = spec_for(
            tmp_path,
            "rot",
            program("proc_lines", 200, 3000),
            logs=LogSpec(max_size=100_000, backups=2),
        )
        async with driver_running(tmp_path) as (driver, tg):
            handle = await driver.start(spec, task_group=tg)
            with anyio.fail_after(20):
                await handle.wait()
                await handle.drained()
        files = sorted(p.name for p in (tmp_path / "state" / "logs").iterdir())
        assert files == ["rot.log", "rot.log.1", "rot.log.2"]
        for name in files:
            data = (tmp_path / "state" / "logs" / name).read_bytes()
            assert 0 < len(data) <= 100_000
            assert all(len(line) == 2999 for line in data.splitlines())

    async def test_huge_line_keeps_memory_bounded(self, tmp_path: Path) -> None:
        """A 10 MB line without a newline is written out in pieces: the partial
        line held never exceeds the cap, and every byte arrives (+ a newline)."""
        read_fd, write_fd, _ = open_pipe(0)
        child = subprocess.Popen(program("proc_longline", 10_000_000), stdout=write_fd)
        os.close(write_fd)
        log = RotatingLog(tmp_path / "long.log", max_size=1 << 30, backups=1)
        stats = DrainStats()
        with anyio.fail_after(20):
            await drain(read_fd, log, stats=stats)
        log.close()
        assert child.wait() == 0
        assert stats.bytes_read == 10_000_000
        assert 0 < stats.max_pending <= PENDING_CAP
        assert (tmp_path / "long.log").stat().st_size == 10_000_001

    async def test_partial_last_line_gets_a_newline(self, tmp_path: Path) -> None:
        """Output that ends without a newline is completed at EOF."""
        async with driver_running(tmp_path) as (driver, tg):
            code = "import sys; sys.stdout.write('a\\nno newline')"
            handle = await driver.start(
                spec_for(tmp_path, "p", [sys.executable, "-c", code]), task_group=tg
            )
            with anyio.fail_after(10):
                await handle.wait()
                await handle.drained()
        assert log_path(tmp_path, "p").read_text() == "a\nno newline\n"

    async def test_followers_receive_lines_live(self, tmp_path: Path) -> None:
        """A LogHub subscriber sees the service's lines as they are drained."""
        hub = LogHub()
        async with driver_running(tmp_path, hub) as (driver, tg), hub.subscribe("f") as lines:
            assert hub.has_subscribers("f")
            handle = await driver.start(
                spec_for(tmp_path, "f", program("proc_lines", 3, 20)), task_group=tg
            )
            got = []
            with anyio.fail_after(10):
                async for line in lines:
                    got.append(line[:10])
                    if len(got) == 6:
                        break
                await handle.wait()
        assert sorted(got) == sorted(f"{s} {n:06d}"[:10] for s in ("out", "err") for n in range(3))
        assert not hub.has_subscribers("f")


class TestLogHub:
    async def test_full_subscriber_skips_ahead_instead_of_blocking(self) -> None:
        """publish() never blocks: a follower over its byte bound loses its oldest
        lines and reads a marker saying how many, then the newest lines."""
        hub = LogHub()
        async with hub.subscribe(None, max_bytes=3 * (100 + 64)) as lines:
            hub.publish(None, [c * 100 for c in "abcde"])
            assert hub.dropped == 2
            got = [lines.receive_nowait() for _ in range(4)]
            assert got == [
                "[hostvisor: 2 lines skipped, follower too slow]",
                "c" * 100,
                "d" * 100,
                "e" * 100,
            ]
            with pytest.raises(anyio.WouldBlock):
                lines.receive_nowait()

    def test_publish_without_subscribers_is_a_no_op(self) -> None:
        """Nobody listening: nothing kept, nothing dropped."""
        hub = LogHub()
        hub.publish("x", ["a"])
        assert not hub.has_subscribers("x") and hub.dropped == 0


class TestRotation:
    def test_rotates_at_max_size_and_keeps_backups(self, tmp_path: Path) -> None:
        """Files never exceed max_size, exactly `backups` old files are kept, and
        the kept lines are the newest ones, in order, none torn."""
        path = tmp_path / "svc.log"
        log = RotatingLog(path, max_size=1000, backups=3)
        for n in range(200):
            log.write(b"line %04d %s\n" % (n, b"z" * 40))  # 51 bytes
        log.close()
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["svc.log", "svc.log.1", "svc.log.2", "svc.log.3"]
        kept: list[bytes] = []
        for name in ("svc.log.3", "svc.log.2", "svc.log.1", "svc.log"):
            data = (tmp_path / name).read_bytes()
            assert len(data) <= 1000
            assert data.endswith(b"\n")
            kept += data.splitlines()
        numbers = [int(line.split()[1]) for line in kept]
        assert numbers == list(range(200 - len(numbers), 200))
        assert len(numbers) > 3 * 19

    def test_one_big_write_is_split_at_line_boundaries(self, tmp_path: Path) -> None:
        """A single write of many lines rotates between lines, not inside one."""
        path = tmp_path / "b.log"
        log = RotatingLog(path, max_size=100, backups=50)
        log.write(b"".join(b"%02d-------\n" % n for n in range(30)))  # 30 x 11 bytes
        log.close()
        files = sorted(
            tmp_path.iterdir(), key=lambda p: -int(p.suffix[1:]) if p.suffix != ".log" else 0
        )
        content = b"".join(p.read_bytes() for p in files)
        assert content.splitlines() == [b"%02d-------" % n for n in range(30)]
        assert all(p.stat().st_size <= 100 for p in files)

    def test_backups_zero_truncates(self, tmp_path: Path) -> None:
        """With backups = 0 the file is truncated instead of renamed."""
        path = tmp_path / "t.log"
        log = RotatingLog(path, max_size=100, backups=0)
        for n in range(30):
            log.write(b"%02d-------\n" % n)
        log.close()
        assert [p.name for p in tmp_path.iterdir()] == ["t.log"]
        assert path.read_bytes().endswith(b"29-------\n")
        assert path.stat().st_size <= 100

    def test_line_longer_than_max_size_is_kept_whole(self, tmp_path: Path) -> None:
        """A single line over max_size is written whole into a fresh file."""
        path = tmp_path / "l.log"
        log = RotatingLog(path, max_size=10, backups=2)
        log.write(b"short\n")
        log.write(b"a much longer line\n")
        log.close()
        assert path.read_bytes() == b"a much longer line\n"
        assert (tmp_path / "l.log.1").read_bytes() == b"short\n"

    def test_appends_to_an_existing_file(self, tmp_path: Path) -> None:
        """Reopening continues the file and counts its size towards max_size."""
        path = tmp_path / "a.log"
        path.write_bytes(b"x" * 90 + b"\n")
        log = RotatingLog(path, max_size=100, backups=1)
        log.write_line("0123456789")
        log.close()
        assert (tmp_path / "a.log.1").stat().st_size == 91
        assert path.read_text() == "0123456789\n"


class TestRefusal:
    def test_symlink_is_refused_and_target_untouched(self, tmp_path: Path) -> None:
        """A symlink planted at the log path raises a clear error naming the path;
        its target is not written to."""
        target = tmp_path / "precious"
        target.write_text("keep me\n")
        link = tmp_path / "svc.log"
        link.symlink_to(target)
        with pytest.raises(DriverError, match="symbolic link") as info:
            RotatingLog(link, max_size=100, backups=1)
        assert str(link) in str(info.value)
        assert target.read_text() == "keep me\n"

    async def test_symlink_makes_the_start_fail(self, tmp_path: Path) -> None:
        """Through the driver: the service fails to start with that message, and
        no process is spawned."""
        target = tmp_path / "precious"
        target.write_text("keep me\n")
        path = log_path(tmp_path, "s")
        path.parent.mkdir(parents=True)
        path.symlink_to(target)
        marker = tmp_path / "spawned"
        async with driver_running(tmp_path) as (driver, tg):
            with pytest.raises(SpawnError, match="symbolic link"):
                await driver.start(spec_for(tmp_path, "s", ["touch", str(marker)]), task_group=tg)
        assert target.read_text() == "keep me\n"
        assert not marker.exists()

    def test_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A FIFO at the path is refused at once (opening it must not hang)."""
        fifo = tmp_path / "f.log"
        os.mkfifo(fifo)
        with pytest.raises(DriverError):
            RotatingLog(fifo, max_size=100, backups=1)

    def test_new_file_is_private(self, tmp_path: Path) -> None:
        """A new log file is created mode 0600."""
        RotatingLog(tmp_path / "n.log", max_size=100, backups=1).close()
        assert (tmp_path / "n.log").stat().st_mode & 0o777 == 0o600


class TestTail:
    def test_last_lines_spill_into_the_previous_file(self, tmp_path: Path) -> None:
        """tail() reads the end of the file and continues in .1 when short."""
        path = tmp_path / "t.log"
        (tmp_path / "t.log.1").write_text("".join(f"old {n}\n" for n in range(5)))
        path.write_text("new 0\nnew 1\n")
        assert tail(path, 3) == ["old 4", "new 0", "new 1"]
        assert tail(path, 2) == ["new 0", "new 1"]
        assert tail(path, 100) == [f"old {n}" for n in range(5)] + ["new 0", "new 1"]

    def test_walks_back_through_several_rotations(self, tmp_path: Path) -> None:
        """With a small max_size, the last N lines span .1, .2 ... as far as needed."""
        path = tmp_path / "s.log"
        (tmp_path / "s.log.2").write_text("a 0\na 1\n")
        (tmp_path / "s.log.1").write_text("b 0\nb 1\n")
        path.write_text("c 0\n")
        assert tail(path, 4) == ["a 1", "b 0", "b 1", "c 0"]
        assert tail(path, 50) == ["a 0", "a 1", "b 0", "b 1", "c 0"]

    def test_long_file_is_read_from_the_end(self, tmp_path: Path) -> None:
        """Only the end of a large file matters; partial first blocks are dropped."""
        path = tmp_path / "big.log"
        path.write_text("".join(f"line {n:07d}\n" for n in range(200_000)))
        assert tail(path, 3) == ["line 0199997", "line 0199998", "line 0199999"]

    def test_missing_file_and_zero_lines(self, tmp_path: Path) -> None:
        """No file gives no lines; n <= 0 gives none."""
        assert tail(tmp_path / "none.log", 10) == []
        (tmp_path / "x.log").write_text("a\n")
        assert tail(tmp_path / "x.log", 0) == []


class TestWriterTask:
    async def test_a_quiet_log_has_no_writer_task_and_the_next_line_still_lands(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The writer's task ends once its log has been quiet for WRITER_LINGER seconds
        (an idle service keeps no task for it) and the next line starts it again: every
        line is in the file, in order; the drain itself goes on until EOF."""
        from supervisor import logwriter

        monkeypatch.setattr(logwriter, "WRITER_LINGER", 0.05)
        path = tmp_path / "quiet.log"
        read_fd, write_fd, _ = open_pipe(0)
        log = RotatingLog(path, max_size=1 << 20, backups=1)

        def writer_tasks() -> int:
            return sum("LogWriter.run" in task.get_name() for task in asyncio.all_tasks())

        async def until(condition: Callable[[], bool]) -> None:
            with anyio.fail_after(10):
                while not condition():
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_all, [read_fd], log)
            for line in (b"one\n", b"two\n"):
                os.write(write_fd, line)
                await until(lambda line=line: path.exists() and path.read_bytes().endswith(line))
                await until(lambda: writer_tasks() == 0)
            os.close(write_fd)
        assert path.read_bytes() == b"one\ntwo\n"

    async def test_a_line_handed_to_a_new_writer_task_survives_a_cancellation(
        self, tmp_path: Path
    ) -> None:
        """Drains cancelled right after the first line started the writer's task: the line
        is still written (bounded, as at any cancellation)."""
        path = tmp_path / "cut.log"
        read_fd, write_fd, _ = open_pipe(0)
        os.write(write_fd, b"last words\n")
        log = RotatingLog(path, max_size=1 << 20, backups=1)
        with anyio.CancelScope() as scope:

            async def cancel_soon() -> None:
                scope.cancel()  # runs after the first read handed the line to the writer

            async with anyio.create_task_group() as tg:
                tg.start_soon(drain_all, [read_fd], log)
                tg.start_soon(cancel_soon)
        os.close(write_fd)
        assert path.read_bytes() == b"last words\n"
