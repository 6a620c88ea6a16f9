"""The Docker driver against a real, private engine (tests/docker_engine.py).

Containers run the busybox test image with ``--network none``; every test makes
its own uniquely named containers and removes them at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup

from supervisor import events as ev
from supervisor.drivers.base import Driver, Handle
from supervisor.drivers.docker import ContainerHandle, DockerDriver, docker_time_ns
from supervisor.errors import DockerUnavailable, SpawnError
from supervisor.events import Event, EventBus
from supervisor.spec import ContainerSpec, ServiceSpec, StopSpec
from tests.docker_engine import DockerEngine

CALL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Result:
    """What ``ProcessDriver.run_command`` returns, as far as the driver reads it."""

    code: int | None
    signal: int | None
    timed_out: bool
    stderr: str


async def run_command(
    argv: Sequence[str], *, cwd: Path, env: dict[str, str], service: str, timeout: float
) -> Result:
    """A minimal command runner (the real one is ProcessDriver.run_command)."""
    with anyio.move_on_after(timeout) as scope:
        done = await anyio.run_process(
            list(argv),
            cwd=cwd,
            env={**os.environ, **env, "HOSTVISOR_SERVICE": service},
            check=False,
            stdin=subprocess.DEVNULL,
        )
    if scope.cancelled_caught:
        return Result(None, None, True, "")
    rc = done.returncode
    return Result(rc if rc >= 0 else None, -rc if rc < 0 else None, False, done.stderr.decode())


@pytest.fixture
def names(engine: DockerEngine) -> Iterator[Any]:
    made: list[str] = []

    def make() -> str:
        made.append(f"hvt-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    if made and engine.alive:
        engine.docker("rm", "-f", *made, check=False)


def unit(
    engine: DockerEngine, container: str, *, recreate: Sequence[str] | None = None
) -> ServiceSpec:
    return ServiceSpec(
        name="svc",
        target=ContainerSpec(
            name=container, recreate_command=tuple(recreate) if recreate else None
        ),
        workdir=Path.cwd(),
        env={"DOCKER_HOST": engine.host},
    )


def run_container(engine: DockerEngine, name: str, *args: str) -> str:
    """``docker run -d --name NAME --network none [ARGS...]``; returns the id."""
    cmd = args or (engine.image, "sleep", "1000")
    return engine.docker("run", "-d", "--name", name, "--network", "none", *cmd).stdout.strip()


def inspect(engine: DockerEngine, name: str, fmt: str) -> str:
    return engine.docker("inspect", "-f", fmt, name).stdout.strip()


async def cli(engine: DockerEngine, *args: str) -> subprocess.CompletedProcess[str]:
    """The docker CLI in a worker thread, so the driver's event loop keeps running."""
    return await anyio.to_thread.run_sync(lambda: engine.docker(*args))


@dataclass
class Rig:
    """A running driver, its bus and a task group for its helpers."""

    driver: DockerDriver
    bus: EventBus
    tg: TaskGroup

    async def start(self, spec: ServiceSpec) -> ContainerHandle:
        return await self.driver.start(spec, task_group=self.tg)

    async def adopt(self, spec: ServiceSpec) -> Handle | None:
        driver: Driver = self.driver  # the protocol the service layer sees
        return await driver.adopt(spec, task_group=self.tg)


@asynccontextmanager
async def open_driver(
    engine: DockerEngine | None,
    *,
    hook: Callable[[bool], None] | None = None,
    call_timeout: float = CALL_TIMEOUT,
    **kwargs: Any,
) -> AsyncIterator[Rig]:
    bus = EventBus()
    base_url = engine.host if engine else "unix:///tmp/hvd-nonexistent/d.sock"
    driver = DockerDriver(
        bus=bus, base_url=base_url, run_command=run_command, call_timeout=call_timeout, **kwargs
    )
    driver.on_connection_change = hook
    async with anyio.create_task_group() as tg:
        await tg.start(driver.run)
        try:
            yield Rig(driver, bus, tg)
        finally:
            tg.cancel_scope.cancel()


async def next_event(events: Any, name: str) -> Event:
    async for event in events:
        if event.event == name:
            return event  # type: ignore[no-any-return]
    raise AssertionError(f"event stream closed before {name}")


def test_docker_time_ns_reads_engine_timestamps() -> None:
    """RFC 3339 with nanoseconds becomes integer nanoseconds; Docker's zero time is 0."""
    assert docker_time_ns("1970-01-01T00:00:01.000000002Z") == 1_000_000_002
    assert docker_time_ns("1970-01-01T01:00:01.5+01:00") == 1_500_000_000
    assert docker_time_ns("0001-01-01T00:00:00Z") == 0
    assert docker_time_ns("") == 0


class TestWithoutEngine:
    async def test_absent_engine_is_reported_and_start_fails_fast(self) -> None:
        """With no engine the driver is ready at once, publishes disconnected, tells the hook,
        and start raises DockerUnavailable without calling anything."""
        seen: list[bool] = []
        with anyio.fail_after(5):
            async with open_driver(None, hook=seen.append, reconnect_initial=60) as rig:
                assert [e.event for e in rig.bus.recent()] == [ev.DOCKER_DISCONNECTED]
                assert not rig.driver.connected and seen == [False]
                with anyio.fail_after(1), pytest.raises(DockerUnavailable):
                    await rig.start(unit_stub("qdrant"))


def unit_stub(container: str) -> ServiceSpec:
    return ServiceSpec(name="svc", target=ContainerSpec(name=container), workdir=Path.cwd())


@pytest.mark.docker
class TestStart:
    async def test_starts_an_exited_container_whatever_its_exit_code(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """A container that sits Exited (255) is started; the handle names the running run."""
        name = names()
        script = "test -f /once || { touch /once; exit 255; }; exec sleep 1000"
        cid = run_container(engine, name, engine.image, "sh", "-c", script)
        engine.docker("wait", name)
        assert inspect(engine, name, "{{.State.ExitCode}}") == "255"
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            assert isinstance(handle, Handle)
            assert handle.container_id == cid
            assert handle.state == "running" and handle.exit_code is None
            assert handle.pid == int(inspect(engine, name, "{{.State.Pid}}"))
            assert inspect(engine, name, "{{.State.Running}}") == "true"

    async def test_starts_a_created_container(self, engine: DockerEngine, names: Any) -> None:
        """A container that was created and never started is started."""
        name = names()
        engine.docker("create", "--name", name, "--network", "none", engine.image, "sleep", "1000")
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            assert handle.state == "running"
            assert inspect(engine, name, "{{.State.Running}}") == "true"

    async def test_adopts_a_running_container_without_restarting_it(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """adopt and start both return a handle on a running container; StartedAt is unchanged."""
        name = names()
        run_container(engine, name)
        started_at = inspect(engine, name, "{{.State.StartedAt}}")
        async with open_driver(engine) as rig:
            adopted = await rig.adopt(unit(engine, name))
            assert isinstance(adopted, ContainerHandle)
            assert adopted.started_at == started_at
            again = await rig.start(unit(engine, name))
            assert again.started_at == started_at
            assert not adopted.ended and not again.ended
        assert inspect(engine, name, "{{.State.StartedAt}}") == started_at

    async def test_adopt_returns_none_for_a_stopped_or_missing_container(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """Only a running container is adopted; an exited or missing one is left to start()."""
        name = names()
        engine.docker("create", "--name", name, "--network", "none", engine.image, "true")
        async with open_driver(engine) as rig:
            assert await rig.adopt(unit(engine, name)) is None
            assert await rig.adopt(unit(engine, names())) is None
        assert inspect(engine, name, "{{.State.Status}}") == "created"


@pytest.mark.docker
class TestWaitAndStop:
    async def test_wait_returns_137_when_killed_from_outside(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """`docker kill` from another shell ends the handle with exit code 137 (die event)."""
        name = names()
        run_container(engine, name)
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                status = await handle.wait()
            assert status.code == 137 and status.signal is None
            assert handle.state == "exited" and handle.exit_code == 137
            assert handle.pid is None
            assert (await handle.wait()) == status

    async def test_wait_returns_when_the_container_exits_on_its_own(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """A container that exits by itself right after the start ends its handle with its code."""
        name = names()
        engine.docker(
            "create", "--name", name, "--network", "none", engine.image, "sh", "-c", "exit 3"
        )
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            with anyio.fail_after(10):
                status = await handle.wait()
            assert status.code == 3

    async def test_stop_sends_the_stop_signal_first(self, engine: DockerEngine, names: Any) -> None:
        """A container that exits on SIGTERM stops at once with its own exit code."""
        name = names()
        script = "trap 'exit 0' TERM; sleep 1000 & wait"
        run_container(engine, name, engine.image, "sh", "-c", script)
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            began = anyio.current_time()
            with anyio.fail_after(8):
                status = await handle.stop(StopSpec(timeout=10))
            assert status.code == 0
            assert anyio.current_time() - began < 5
            assert inspect(engine, name, "{{.State.Running}}") == "false"

    async def test_stop_kills_after_the_timeout(self, engine: DockerEngine, names: Any) -> None:
        """A container that ignores SIGTERM (sleep as pid 1) is killed after stop.timeout: 137."""
        name = names()
        run_container(engine, name)
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            began = anyio.current_time()
            with anyio.fail_after(8):
                status = await handle.stop(StopSpec(timeout=1))
            took = anyio.current_time() - began
            assert status.code == 137
            assert 0.9 <= took < 5
            with anyio.fail_after(1):
                assert (await handle.stop(StopSpec(timeout=1))) == status  # idempotent
            assert (await handle.wait()) == status


@pytest.mark.docker
class TestMissingContainer:
    async def test_missing_without_recreate_command_names_the_container(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """start raises SpawnError naming the container when it does not exist."""
        name = names()
        async with open_driver(engine) as rig:
            with pytest.raises(SpawnError, match=f"container '{name}' does not exist"):
                await rig.start(unit(engine, name))

    async def test_recreate_command_creates_the_container(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """A missing container is created by recreate_command, then handled as running."""
        name = names()
        recreate = ["docker", "run", "-d", "--name", name, "--network", "none"]
        recreate += [engine.image, "sleep", "1000"]
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name, recreate=recreate))
            assert handle.state == "running"
            assert handle.container_id == inspect(engine, name, "{{.Id}}")

    async def test_failing_recreate_command_is_a_spawn_error(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """A recreate_command that fails, or succeeds without creating it, is a SpawnError."""
        name = names()
        async with open_driver(engine) as rig:
            failing = unit(engine, name, recreate=["sh", "-c", "echo nope >&2; exit 4"])
            with pytest.raises(SpawnError, match=r"recreate_command failed \(exit code 4\): nope"):
                await rig.start(failing)
            useless = unit(engine, name, recreate=["true"])
            with pytest.raises(SpawnError, match="does not exist after recreate_command"):
                await rig.start(useless)


@pytest.mark.docker
class TestHealth:
    async def test_health_status_follows_the_healthcheck(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """health_status is the container's HEALTHCHECK status: healthy, then unhealthy."""
        name = names()
        run_container(
            engine, name, "--health-cmd", "test ! -f /bad", "--health-interval", "1s",
            "--health-retries", "1", engine.image, "sleep", "1000",
        )  # fmt: skip
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            with anyio.fail_after(15):
                while await handle.health_status() != "healthy":
                    await anyio.sleep(0.2)  # a probe's interval: the state is the engine's
            await cli(engine, "exec", name, "sh", "-c", ": > /bad")
            with anyio.fail_after(15):
                while await handle.health_status() != "unhealthy":
                    await anyio.sleep(0.2)

    async def test_no_healthcheck_is_none(self, engine: DockerEngine, names: Any) -> None:
        """A container without HEALTHCHECK reports None."""
        name = names()
        run_container(engine, name)
        async with open_driver(engine) as rig:
            handle = await rig.start(unit(engine, name))
            assert await handle.health_status() is None


@pytest.mark.docker
class TestEngineRestart:
    async def test_seed_incident_dockerd_killed_and_restarted(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """SIGKILL dockerd: disconnected, the handle keeps waiting and starts fail fast; a fresh
        dockerd leaves the container Exited (137): reconnected, and wait() returns 137 so the
        service layer starts it again."""
        name = names()
        run_container(
            engine, name, "--stop-timeout", "1", "--health-cmd", "true",
            "--health-interval", "1s", engine.image, "sleep", "1000",
        )  # fmt: skip
        flips: list[bool] = []
        async with open_driver(engine, hook=flips.append) as rig, rig.bus.subscribe() as events:
            handle = await rig.start(unit(engine, name))
            try:
                await anyio.to_thread.run_sync(engine.kill)
                with anyio.fail_after(10):
                    down = await next_event(events, ev.DOCKER_DISCONNECTED)
                assert "unreachable" in down.message and not rig.driver.connected
                with anyio.move_on_after(1):
                    await handle.wait()
                assert not handle.ended and handle.state == "running"
                with anyio.fail_after(1), pytest.raises(DockerUnavailable):
                    await rig.start(unit(engine, name))
                with anyio.fail_after(1):
                    assert await handle.health_status() is not None  # last seen, no engine call
            finally:
                await anyio.to_thread.run_sync(engine.ensure_running)
            with anyio.fail_after(20):
                await next_event(events, ev.DOCKER_RECONNECTED)
                status = await handle.wait()
            assert status.code == 137
            assert flips == [True, False, True]
            again = await rig.start(unit(engine, name))
            assert again.state == "running" and not again.ended
            assert inspect(engine, name, "{{.State.Running}}") == "true"

    async def test_container_that_died_during_the_outage_is_found_on_reconnect(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """A container whose process dies while the engine is down (no event for it) ends its
        handle once the engine is back: every tracked container is inspected on reconnect."""
        name = names()
        run_container(engine, name)
        async with open_driver(engine) as rig, rig.bus.subscribe() as events:
            handle = await rig.start(unit(engine, name))
            assert handle.pid is not None
            try:
                await anyio.to_thread.run_sync(engine.kill)
                with anyio.fail_after(10):
                    await next_event(events, ev.DOCKER_DISCONNECTED)
                os.kill(handle.pid, signal.SIGKILL)  # the container's init, seen from the host
                with anyio.move_on_after(0.5):
                    await handle.wait()
                assert not handle.ended
            finally:
                await anyio.to_thread.run_sync(engine.ensure_running)
            with anyio.fail_after(20):
                await next_event(events, ev.DOCKER_RECONNECTED)
                status = await handle.wait()
            assert status.code == 137

    async def test_hung_engine_is_noticed_and_calls_stay_bounded(
        self, engine: DockerEngine, names: Any
    ) -> None:
        """A frozen dockerd (SIGSTOP: the socket stays open, nothing answers) fails the liveness
        ping: disconnected, calls return within their deadline, the handle keeps waiting; once
        it thaws: reconnected and the same run is still tracked."""
        name = names()
        run_container(engine, name)
        fast = open_driver(engine, call_timeout=1.0, ping_interval=0.3)
        async with fast as rig, rig.bus.subscribe() as events:
            handle = await rig.start(unit(engine, name))
            assert engine.pid is not None
            os.kill(engine.pid, signal.SIGSTOP)
            try:
                with anyio.fail_after(3):
                    await handle.health_status()  # an inspect that times out: last seen
                with anyio.fail_after(5):
                    await next_event(events, ev.DOCKER_DISCONNECTED)
                with anyio.move_on_after(0.5):
                    await handle.wait()
                assert not handle.ended
            finally:
                os.kill(engine.pid, signal.SIGCONT)
            with anyio.fail_after(15):
                await next_event(events, ev.DOCKER_RECONNECTED)
            assert not handle.ended and handle.state == "running"
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 137
