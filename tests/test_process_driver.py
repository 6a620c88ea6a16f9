"""The process driver: spawn, environment, exits, stop, the reaper, run_command."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from anyio.abc import ObjectReceiveStream, TaskGroup

from supervisor.drivers.base import Driver, Handle
from supervisor.drivers.process import ProcessDriver, ProcessHandle
from supervisor.errors import SpawnError
from supervisor.logfiles import LogHub
from supervisor.reaper import Reaper, child_pids, signal_verified
from supervisor.spec import ProcessSpec, ServiceSpec, StopSpec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

PROGRAMS = Path(__file__).parent / "programs"


def program(name: str, *args: object) -> tuple[str, ...]:
    return (sys.executable, str(PROGRAMS / f"{name}.py"), *map(str, args))


def spec_for(tmp_path: Path, name: str, command: Sequence[str], **kw: Any) -> ServiceSpec:
    kw.setdefault("workdir", tmp_path)
    return ServiceSpec(name=name, target=ProcessSpec(command=tuple(command)), **kw)


@dataclass
class Sup:
    driver: ProcessDriver
    reaper: Reaper
    hub: LogHub
    tg: TaskGroup
    handles: list[ProcessHandle] = field(default_factory=list)

    async def start(self, spec: ServiceSpec) -> ProcessHandle:
        handle = await self.driver.start(spec, task_group=self.tg)
        self.handles.append(handle)
        return handle


@asynccontextmanager
async def supervising(
    tmp_path: Path, *, base_env: dict[str, str] | None = None, subreaper: bool = True
) -> AsyncIterator[Sup]:
    """A driver with a running reaper (the daemon as subreaper, as in production)."""
    reaper = Reaper()
    if subreaper:
        reaper.enable_subreaper()
    hub = LogHub()
    driver = ProcessDriver(
        state_dir=tmp_path / "state", reaper=reaper, loghub=hub, base_env=base_env
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(reaper.run)
            sup = Sup(driver, reaper, hub, tg)
            try:
                yield sup
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    for handle in sup.handles:
                        await handle.kill()
                tg.cancel_scope.cancel()
    finally:
        reaper.disable_subreaper()
        reaper.reap()
        driver.close()


async def line_starting(lines: ObjectReceiveStream[str], prefix: str, timeout: float = 10) -> str:
    with anyio.fail_after(timeout):
        async for line in lines:
            if line.startswith(prefix):
                return line
    raise AssertionError(f"stream ended before a line starting with {prefix!r}")


async def until_gone(reaper: Reaper, pid: int, timeout: float = 10) -> None:
    """Wait (on reaper notifications) until ``pid`` no longer exists, zombie included."""
    with anyio.fail_after(timeout):
        while True:
            event = reaper.reaped_event()
            if not os.path.exists(f"/proc/{pid}"):
                return
            with anyio.move_on_after(0.2):
                await event.wait()


def log_text(tmp_path: Path, name: str) -> str:
    return (tmp_path / "state" / "logs" / f"{name}.log").read_text()


class TestProtocol:
    async def test_driver_and_handle_satisfy_the_protocols(self, tmp_path: Path) -> None:
        """ProcessDriver is a Driver, ProcessHandle a Handle; processes are never adopted."""
        async with supervising(tmp_path) as sup:
            driver: Driver = sup.driver
            handle = await sup.start(spec_for(tmp_path, "p", program("proc_env")))
            assert isinstance(handle, Handle)
            assert handle.container_id is None
            assert await driver.adopt(spec_for(tmp_path, "p", ["true"]), task_group=sup.tg) is None
            await handle.wait()


class TestEnvironment:
    async def test_env_rules_session_fds_and_stdin(self, tmp_path: Path) -> None:
        """The child gets base env + spec env (spec wins) + the marker, none of the
        systemd variables, its own session and group, /dev/null on stdin and
        no descriptor beyond 0-2, even one the daemon made inheritable."""
        base = {
            "PATH": os.environ["PATH"],
            "KEEP": "base",
            "OVER": "base",
            "NOTIFY_SOCKET": "/run/x",
            "WATCHDOG_USEC": "1",
            "WATCHDOG_PID": "1",
            "LISTEN_FDS": "1",
            "LISTEN_PID": "1",
            "LISTEN_FDNAMES": "x",
        }
        leaked = os.open(os.devnull, os.O_RDONLY)
        os.set_inheritable(leaked, True)
        try:
            async with supervising(tmp_path, base_env=base) as sup:
                spec = spec_for(
                    tmp_path,
                    "envy",
                    program("proc_env"),
                    env={"OVER": "spec", "HOSTVISOR_SERVICE": "forged", "NOTIFY_SOCKET": "/x"},
                )
                handle = await sup.start(spec)
                assert (await handle.wait()).code == 0
                await handle.drained()
        finally:
            os.close(leaked)
        report = json.loads(log_text(tmp_path, "envy"))
        env = report["env"]
        assert env["HOSTVISOR_SERVICE"] == "envy"
        assert env["KEEP"] == "base"
        assert env["OVER"] == "spec"
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            assert name not in env
        assert "LISTEN_FDNAMES" not in env
        assert report["fds"] == [0, 1, 2]
        assert report["stdin"] == "/dev/null"
        assert report["pid"] == report["pgid"] == report["sid"] == handle.pid
        assert report["sid"] != os.getsid(0)
        assert report["cwd"] == str(tmp_path)

    async def test_argv_is_never_run_by_a_shell(self, tmp_path: Path) -> None:
        """Shell syntax in an argument arrives verbatim."""
        async with supervising(tmp_path) as sup:
            code = "import sys; print(sys.argv[1])"
            handle = await sup.start(
                spec_for(tmp_path, "argv", [sys.executable, "-c", code, "$HOME; echo hi"])
            )
            await handle.wait()
            await handle.drained()
        assert log_text(tmp_path, "argv") == "$HOME; echo hi\n"


class TestSpawnErrors:
    async def test_missing_program_names_errno_and_path(self, tmp_path: Path) -> None:
        """A missing binary is a SpawnError with ENOENT and the program's path."""
        async with supervising(tmp_path) as sup:
            with pytest.raises(SpawnError) as info:
                await sup.start(spec_for(tmp_path, "nope", ["/no/such/program", "x"]))
        assert info.value.errno == errno.ENOENT
        assert "ENOENT" in str(info.value) and "/no/such/program" in str(info.value)

    async def test_missing_workdir_names_the_workdir(self, tmp_path: Path) -> None:
        """A missing workdir is named as such, not blamed on the program."""
        missing = tmp_path / "gone"
        async with supervising(tmp_path) as sup:
            with pytest.raises(SpawnError) as info:
                await sup.start(spec_for(tmp_path, "wd", [sys.executable, "-V"], workdir=missing))
        assert info.value.errno == errno.ENOENT
        assert info.value.path == str(missing)
        assert str(missing) in str(info.value) and "workdir" in str(info.value)
        assert sys.executable not in str(info.value)

    async def test_not_executable_is_eacces(self, tmp_path: Path) -> None:
        """A file without the execute bit gives EACCES and its path."""
        script = tmp_path / "script.sh"
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o644)
        async with supervising(tmp_path) as sup:
            with pytest.raises(SpawnError) as info:
                await sup.start(spec_for(tmp_path, "noexec", [str(script)]))
        assert info.value.errno == errno.EACCES
        assert "EACCES" in str(info.value) and str(script) in str(info.value)

    async def test_failed_spawn_leaks_no_descriptor(self, tmp_path: Path) -> None:
        """Pipes and the log file are closed again when the spawn fails."""
        async with supervising(tmp_path) as sup:
            await sup.driver.run_command(["true"], cwd=tmp_path, env={}, service="warm", timeout=5)
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(5):
                with pytest.raises(SpawnError):
                    await sup.start(spec_for(tmp_path, "nope", ["/no/such/program"]))
            assert len(os.listdir("/proc/self/fd")) == before


class TestExit:
    async def test_exit_code_is_reported(self, tmp_path: Path) -> None:
        """wait() returns the exit code; repeated and concurrent waits agree."""
        async with supervising(tmp_path) as sup:
            handle = await sup.start(
                spec_for(tmp_path, "x", [sys.executable, "-c", "raise SystemExit(3)"])
            )
            results: list[int | None] = []

            async def waiter() -> None:
                results.append((await handle.wait()).code)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    tg.start_soon(waiter)
            assert results == [3, 3]
            assert (await handle.wait()).code == 3
            assert handle.status is not None and handle.status.code == 3

    async def test_killing_signal_is_reported(self, tmp_path: Path) -> None:
        """A process killed by a signal reports the signal, not a code."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("k") as lines:
            handle = await sup.start(spec_for(tmp_path, "k", program("proc_stubborn")))
            await line_starting(lines, "ready")
            os.kill(handle.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                status = await handle.wait()
        assert status.signal == signal.SIGKILL and status.code is None

    async def test_wait_returns_when_the_main_process_exits(self, tmp_path: Path) -> None:
        """The leader's exit is the instance's exit (systemd's main process), even while
        a member of its group lives; wait_group() waits for the member too."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("o") as lines:
            handle = await sup.start(spec_for(tmp_path, "o", program("proc_orphan", 3)))
            member = int((await line_starting(lines, "member")).split()[1])
            with anyio.fail_after(10):
                status = await handle.wait()
            assert status.code == 7
            assert handle.leader_exited
            assert os.path.exists(f"/proc/{member}") and not handle.group_gone
            with anyio.fail_after(10):
                assert (await handle.wait_group()).code == 7
            assert not os.path.exists(f"/proc/{member}")  # exited AND reaped

    async def test_stop_after_the_leader_exited_sweeps_the_group(self, tmp_path: Path) -> None:
        """stop() on an instance whose leader already exited stops the members left."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("sw") as lines:
            handle = await sup.start(spec_for(tmp_path, "sw", program("proc_orphan", 600)))
            member = int((await line_starting(lines, "member")).split()[1])
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 7
                status = await handle.stop(StopSpec(signal=int(signal.SIGTERM), timeout=5))
            assert status.code == 7 and handle.group_gone
            assert not os.path.exists(f"/proc/{member}")


class TestWithoutPidfd:
    async def test_thread_fallback_survives_a_cancelled_wait(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Where pidfds are missing, a thread waits; a cancelled wait() loses nothing."""
        import supervisor.drivers.process_handle as process

        monkeypatch.setattr(process, "open_pidfd", lambda pid: None)
        async with supervising(tmp_path) as sup, sup.hub.subscribe("np") as lines:
            code = "import time; print('ready', flush=True); time.sleep(0.3); raise SystemExit(4)"
            handle = await sup.start(spec_for(tmp_path, "np", [sys.executable, "-c", code]))
            await line_starting(lines, "ready")
            with anyio.move_on_after(0.05):
                await handle.wait()
            assert handle.status is None
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 4

    async def test_stranger_wait_keeps_one_thread_across_cancelled_waits(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An adopted process that is not our child, without pidfds: a thread waits for it;
        cancelled wait()s (an instance's timers cancel the wait) leave that thread for the
        next wait() instead of abandoning one blocked thread each."""
        import supervisor.drivers.process_handle as process

        monkeypatch.setattr(process, "open_pidfd", lambda pid: None)
        code = (
            "import subprocess; d = subprocess.DEVNULL; "
            "print(subprocess.Popen(['sleep', '60'], start_new_session=True, stdout=d, stderr=d).pid)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        pid = int(out.stdout)
        try:
            handle = ProcessHandle(
                None, service="stranger", started_at=0.0, reaper=None, live=set(), pid=pid,
                own_child=False,
            )  # fmt: skip
            before = threading.active_count()
            for _ in range(3):
                with anyio.move_on_after(0.05):
                    await handle.wait()
            assert handle.status is None
            assert threading.active_count() <= before + 1
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(10):
                assert not (await handle.wait()).known  # not our child: its status is unknown
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class TestStop:
    async def test_graceful_stop(self, tmp_path: Path) -> None:
        """A process that obeys SIGTERM stops at once with that signal."""
        async with supervising(tmp_path) as sup:
            handle = await sup.start(spec_for(tmp_path, "g", ["sleep", "60"]))
            started = time.monotonic()
            with anyio.fail_after(5):
                status = await handle.stop(StopSpec(signal=signal.SIGTERM, timeout=5))
            assert status.signal == signal.SIGTERM
            assert time.monotonic() - started < 2
            assert await handle.stop(StopSpec()) == status  # idempotent

    async def test_sigkill_after_stop_timeout(self, tmp_path: Path) -> None:
        """A child ignoring SIGTERM is SIGKILLed once stop.timeout has passed."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("s") as lines:
            handle = await sup.start(spec_for(tmp_path, "s", program("proc_stubborn")))
            await line_starting(lines, "ready")
            started = time.monotonic()
            with anyio.fail_after(10):
                status = await handle.stop(StopSpec(timeout=0.5))
            elapsed = time.monotonic() - started
        assert status.signal == signal.SIGKILL
        assert 0.5 <= elapsed < 3

    async def test_leader_gone_but_member_stubborn_is_not_stopped(self, tmp_path: Path) -> None:
        """The leader exits on SIGTERM, a member ignores it: stop() waits for the
        member, SIGKILLs the group at the timeout, and only then returns."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("m") as lines:
            handle = await sup.start(spec_for(tmp_path, "m", program("proc_stubborn", "member")))
            member = int((await line_starting(lines, "member")).split()[1])
            await line_starting(lines, "ready")
            started = time.monotonic()
            with anyio.fail_after(10):
                status = await handle.stop(StopSpec(timeout=1.0))
            elapsed = time.monotonic() - started
            assert status.code == 0  # the leader's own exit
            assert elapsed >= 1.0
            assert not os.path.exists(f"/proc/{member}")

    async def test_daemonized_grandchild_with_marker_is_killed(self, tmp_path: Path) -> None:
        """A grandchild that left the group with setsid() but carries the marker is
        stopped with the service, SIGKILLed if it ignores stop.signal."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("d") as lines:
            handle = await sup.start(
                spec_for(tmp_path, "d", program("proc_daemonize", "stay", "stubborn"))
            )
            grandchild = int((await line_starting(lines, "grandchild")).split()[1])
            assert os.getpgid(grandchild) != handle.pgid
            with anyio.fail_after(10):
                await handle.stop(StopSpec(timeout=0.5))
            await until_gone(sup.reaper, grandchild)

    async def test_escaped_grandchild_after_leader_exit_is_killed(self, tmp_path: Path) -> None:
        """After the leader exited, a setsid() grandchild reparented to the daemon
        is still found by its marker at stop."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("e") as lines:
            handle = await sup.start(spec_for(tmp_path, "e", program("proc_daemonize", "exit")))
            grandchild = int((await line_starting(lines, "grandchild")).split()[1])
            with anyio.fail_after(10):
                await handle.wait()
            assert psutil.Process(grandchild).ppid() == os.getpid()  # subreaper adopted it
            with anyio.fail_after(10):
                await handle.stop(StopSpec(timeout=2))
            await until_gone(sup.reaper, grandchild)

    async def test_other_services_escapees_are_left_alone(self, tmp_path: Path) -> None:
        """Stopping one service never touches a process marked for another."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("keep") as lines:
            keep = await sup.start(spec_for(tmp_path, "keep", program("proc_daemonize", "exit")))
            grandchild = int((await line_starting(lines, "grandchild")).split()[1])
            await keep.wait()
            other = await sup.start(spec_for(tmp_path, "other", ["sleep", "60"]))
            with anyio.fail_after(10):
                await other.stop(StopSpec(timeout=1))
            assert psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
            os.kill(grandchild, signal.SIGKILL)
            await until_gone(sup.reaper, grandchild)


class TestReaper:
    async def test_subreaper_is_enabled_on_linux(self) -> None:
        """enable_subreaper() succeeds on Linux."""
        reaper = Reaper()
        try:
            assert reaper.enable_subreaper() is True
        finally:
            reaper.disable_subreaper()

    async def test_orphan_is_reaped_and_leader_status_delivered(self, tmp_path: Path) -> None:
        """An orphan reparented to the daemon is reaped (no zombie left), and the
        leader's own exit code still reaches the driver."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("r") as lines:
            handle = await sup.start(spec_for(tmp_path, "r", program("proc_orphan", 0.2)))
            member = int((await line_starting(lines, "member")).split()[1])
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 7
                await handle.wait_group()  # the orphan ends on its own after 0.2 s
            assert not os.path.exists(f"/proc/{member}")
            assert sup.reaper.reaped_count >= 1

    async def test_reap_never_takes_a_tracked_childs_status(self, tmp_path: Path) -> None:
        """Reaping while a tracked child is a zombie leaves it to the driver."""
        async with supervising(tmp_path) as sup:
            handle = await sup.start(
                spec_for(tmp_path, "t", [sys.executable, "-c", "raise SystemExit(5)"])
            )
            pidfd = os.pidfd_open(handle.pid)
            try:
                with anyio.fail_after(10):
                    await anyio.wait_readable(pidfd)  # exited: a zombie now
            finally:
                os.close(pidfd)
            assert handle.pid not in [pid for pid, _ in sup.reaper.reap()]
            assert psutil.Process(handle.pid).status() == psutil.STATUS_ZOMBIE
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 5
            assert not sup.reaper.is_tracked(handle.pid)


class TestPidReuse:
    """How a reused pid is never signalled: the leader is watched through a pidfd
    opened while it was our unreaped child; its group is signalled only while
    the leader is unreaped or the group is seen non-empty; other processes get
    signals through a pidfd after their start time is checked."""

    async def test_an_ended_handle_signals_nothing(self, tmp_path: Path) -> None:
        """Once the group is gone, stop() and signal_group() send nothing at all."""
        async with supervising(tmp_path) as sup:
            handle = await sup.start(spec_for(tmp_path, "z", ["true"]))
            status = await handle.wait()
            assert handle.signal_group(signal.SIGKILL) is False
            assert await handle.stop(StopSpec(timeout=0)) is status

    async def test_signal_verified_refuses_another_process(self, tmp_path: Path) -> None:
        """A psutil identity whose start time no longer matches is not signalled."""
        async with supervising(tmp_path) as sup, sup.hub.subscribe("v") as lines:
            handle = await sup.start(spec_for(tmp_path, "v", program("proc_stubborn")))
            await line_starting(lines, "ready")
            stale = psutil.Process(handle.pid)
            stale._ident = (handle.pid, stale.create_time() - 100)  # as if the pid were reused
            assert signal_verified(stale, signal.SIGKILL) is False
            assert psutil.Process(handle.pid).status() != psutil.STATUS_ZOMBIE
            assert signal_verified(psutil.Process(handle.pid), signal.SIGKILL) is True
            with anyio.fail_after(10):
                assert (await handle.wait()).signal == signal.SIGKILL


class TestRunCommand:
    async def test_captures_output_and_code(self, tmp_path: Path) -> None:
        """stdout, stderr and the exit code come back; the marker is set."""
        code = (
            "import os,sys; print(os.environ['HOSTVISOR_SERVICE']);"
            "print('bad', file=sys.stderr); sys.exit(2)"
        )
        async with supervising(tmp_path) as sup:
            result = await sup.driver.run_command(
                [sys.executable, "-c", code], cwd=tmp_path, env={}, service="pre", timeout=10
            )
        assert (result.code, result.signal, result.timed_out) == (2, None, False)
        assert result.stdout == "pre\n"
        assert result.tail(5) == "bad"
        assert not result.ok

    async def test_timeout_kills_the_whole_group(self, tmp_path: Path) -> None:
        """At the timeout the command and its grandchild are SIGKILLed."""
        async with supervising(tmp_path) as sup:
            with anyio.fail_after(10):
                result = await sup.driver.run_command(
                    program("proc_grandchild"), cwd=tmp_path, env={}, service="slow", timeout=0.5
                )
            assert result.timed_out and result.signal == signal.SIGKILL
            grandchild = int(result.stdout.split("grandchild ")[1].split()[0])
            assert not os.path.exists(f"/proc/{grandchild}")
            assert "err" in result.stderr
            assert 0.5 <= result.duration < 3

    async def test_cancelled_command_kills_its_group(self, tmp_path: Path) -> None:
        """Cancelling the caller kills the command's group too."""
        async with supervising(tmp_path) as sup:
            before = set(sup.driver._live)
            with anyio.move_on_after(0.5):
                await sup.driver.run_command(
                    program("proc_grandchild"), cwd=tmp_path, env={}, service="c", timeout=60
                )
            assert sup.driver._live == before
            ours = []
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.environ().get("HOSTVISOR_SERVICE") == "c":
                        ours.append(proc)
                except psutil.NoSuchProcess:
                    continue
            assert ours == []

    async def test_output_is_bounded(self, tmp_path: Path) -> None:
        """Only the last 64 KiB of a chatty command's output are kept."""
        code = "import sys; sys.stdout.write('a' * 1000000 + 'END')"
        async with supervising(tmp_path) as sup:
            result = await sup.driver.run_command(
                [sys.executable, "-c", code], cwd=tmp_path, env={}, service="big", timeout=10
            )
        assert len(result.stdout) == 64 * 1024
        assert result.stdout.endswith("aEND")

    async def test_spawn_error(self, tmp_path: Path) -> None:
        """A command that cannot start raises SpawnError."""
        async with supervising(tmp_path) as sup:
            with pytest.raises(SpawnError):
                await sup.driver.run_command(
                    ["/no/such"], cwd=tmp_path, env={}, service="x", timeout=1
                )


class TestRestartCost:
    async def test_kill_to_wait_and_spawn_are_fast(self, tmp_path: Path) -> None:
        """Medians over 20 restarts: SIGKILL to wait() returning, and start() (Popen
        until exec). Printed with -s; the bounds only catch a polling regression."""
        async with supervising(tmp_path) as sup:
            spec = spec_for(tmp_path, "fast", ["sleep", "60"])
            spawn: list[float] = []
            detect: list[float] = []
            for _ in range(20):
                t0 = time.perf_counter()
                handle = await sup.driver.start(spec, task_group=sup.tg)
                spawn.append(time.perf_counter() - t0)
                os.kill(handle.pid, signal.SIGKILL)
                t0 = time.perf_counter()
                with anyio.fail_after(5):
                    await handle.wait()
                detect.append(time.perf_counter() - t0)
        spawn_ms, detect_ms = statistics.median(spawn) * 1e3, statistics.median(detect) * 1e3
        print(f"\nspawn median {spawn_ms:.2f} ms, SIGKILL->wait median {detect_ms:.2f} ms")
        assert spawn_ms < 50 and detect_ms < 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc children file")
def test_child_pids_lists_every_child_past_one_page() -> None:
    # /proc/<pid>/task/<tid>/children hands out at most a page per read: ~680 pids.
    import subprocess

    children = [subprocess.Popen(["sleep", "60"]) for _ in range(1000)]
    try:
        assert {c.pid for c in children} <= set(child_pids())
    finally:
        for c in children:
            c.kill()
        for c in children:
            c.wait()


def test_scan_marked_finds_exactly_the_processes_of_its_scope(tmp_path: Path) -> None:
    """The raw /proc pre-filter keeps the parsed check: a scope that merely starts with
    ours, another service marker, and a process without markers are left out."""
    import subprocess

    from supervisor.reaper import scan_marked

    scope = str(tmp_path / "state")
    envs = {
        "mine": {"HOSTVISOR_SERVICE": "web", "HOSTVISOR_STATE_DIR": scope},
        "longer": {"HOSTVISOR_SERVICE": "web", "HOSTVISOR_STATE_DIR": scope + "-other"},
        "nameless": {"HOSTVISOR_STATE_DIR": scope},
        "plain": {},
    }
    procs = {
        what: subprocess.Popen(["sleep", "60"], env={"PATH": os.environ["PATH"], **env})
        for what, env in envs.items()
    }
    try:
        found = scan_marked(scope)
        assert {name: [p.pid for p in ps] for name, ps in found.items()} == {
            "web": [procs["mine"].pid]
        }
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


async def test_zombies_behind_a_tracked_one_are_reaped_once_it_is_untracked() -> None:
    """waitid shows one zombie at a time: behind a tracked one (its spawner's to reap),
    an untracked zombie is reaped when the tracked one is untracked, with no list of
    the children; a second reap that finds the same tracked zombie lists them."""
    import contextlib
    import select
    import shutil

    def zombie(argv: list[str]) -> int:
        # posix_spawn, not Popen: a dropped Popen is reaped by the next Popen (_cleanup).
        pid = os.posix_spawn(shutil.which(argv[0]) or argv[0], argv, os.environ)
        pidfd = os.pidfd_open(pid)
        try:
            select.select([pidfd], [], [], 10)  # readable once it has exited
        finally:
            os.close(pidfd)
        return pid

    for second_reap in (False, True):
        reaper = Reaper()
        tracked = zombie(["true"])
        reaper.track(tracked)
        other = zombie(["true"])
        peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        assert peek is not None and peek.si_pid == tracked  # waitid shows the oldest
        assert reaper.reap() == []
        assert psutil.Process(other).status() == psutil.STATUS_ZOMBIE
        if second_reap:
            assert [pid for pid, _ in reaper.reap()] == [other]
        else:
            event = reaper.reaped_event()
            os.waitpid(tracked, 0)
            reaper.untrack(tracked)
            assert event.is_set()
        assert not psutil.pid_exists(other)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(tracked, 0)
