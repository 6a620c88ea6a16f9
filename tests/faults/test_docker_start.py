"""Issue 9 item 10: a `stop` during a container's start leaves the container stopped.

The service layer cancels a container start that a command interrupts; the driver's start
used to be cut off mid-way, so a ``recreate_command`` that had already created the container,
or a ``docker start`` the engine carried out after the caller gave up, left a running
container that nothing tracked while the unit said ``stopped``.
"""

from __future__ import annotations

import json
import os
import select
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.spec import ContainerSpec, ServiceSpec, StopSpec
from tests.docker_engine import DockerEngine
from tests.faults.test_docker_stream import EngineProxy, proxied_driver, proxy
from tests.test_containers import Containers, containers, open_daemon
from tests.test_containers import unit as unit_toml
from tests.test_docker_driver import inspect, names, open_driver

__all__ = ["containers", "names", "proxy"]  # fixtures, used by name

pytestmark = pytest.mark.docker


def spec_for(engine: DockerEngine, name: str, recreate: list[str] | None = None) -> ServiceSpec:
    return ServiceSpec(
        name="svc",
        target=ContainerSpec(name=name, recreate_command=tuple(recreate) if recreate else None),
        workdir=Path.cwd(),
        env={"DOCKER_HOST": engine.host},
        stop=StopSpec(timeout=1.0),
    )


def read_fifo(path: Path, timeout: float = 20.0) -> str:
    """What a writer puts into the FIFO ``path``; raises TimeoutError after ``timeout`` s."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data = b""
        while not data.endswith(b"\n"):
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError(f"nothing written to {path} within {timeout:g}s")
            chunk = os.read(fd, 100)
            if not chunk:  # the writer closed without a full line
                break
            data += chunk
        return data.decode()
    finally:
        os.close(fd)


def running(engine: DockerEngine, name: str) -> str:
    found = engine.docker("inspect", "-f", "{{.State.Running}}", name, check=False)
    return found.stdout.strip() or "missing"


class TestDriverStartCancelled:
    async def test_cancel_while_recreate_command_runs_stops_what_it_started(
        self, engine: DockerEngine, names: Any, tmp_path: Path
    ) -> None:
        """recreate_command has created and started the container and goes on (a slow
        `compose up`): cancelling start() kills the command after stop_timeout and stops
        the container; the cancellation still propagates."""
        name = names()
        ready = tmp_path / "ready"
        os.mkfifo(ready)
        script = (
            f"docker run -d --name {name} --network none {engine.image} sleep 1000 >/dev/null"
            f" && echo up > {ready}; exec sleep 60"
        )
        spec = spec_for(engine, name, ["sh", "-c", script])
        async with open_driver(engine) as rig:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(rig.start, spec)
                    assert await anyio.to_thread.run_sync(read_fifo, ready) == "up\n"
                    assert running(engine, name) == "true"
                    tg.cancel_scope.cancel()
        assert running(engine, name) == "false"

    async def test_cancel_while_docker_start_is_in_flight_leaves_it_stopped(
        self, engine: DockerEngine, proxy: EngineProxy, names: Any
    ) -> None:
        """The `POST /start` reaches the engine only after the caller was cancelled: the
        driver waits for that call, then stops the container it started."""
        name = names()
        engine.docker("create", "--name", name, "--network", "none", engine.image, "sleep", "1000")
        proxy.hold_start = True
        async with proxied_driver(proxy.url, call_timeout=5.0) as rig:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(rig.start, spec_for(engine, name))
                    await anyio.to_thread.run_sync(proxy.start_held.wait, 10)
                    assert proxy.start_held.is_set()
                    tg.cancel_scope.cancel()
                    proxy.release.set()  # the engine gets the start after the cancel
        assert inspect(engine, name, "{{.State.Status}}") == "exited"
        assert inspect(engine, name, "{{.State.StartedAt}}") != "0001-01-01T00:00:00Z"


class TestStopDuringStart:
    def test_stop_while_a_slow_recreate_command_runs_leaves_the_container_stopped(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """`hostvisor stop` while recreate_command (`docker run -d`, then 20 s more work) is in
        flight: the unit is stopped and `docker inspect` shows the container not running."""
        name = containers.name("slow")
        ready = tmp_path / "ready"
        os.mkfifo(ready)
        argv = ["docker", "run", "-d", "--name", name, *containers.base_options(), engine.image]
        script = " ".join([*argv, "sleep", "1000"]) + f" >/dev/null && echo up > {ready}"
        script += "; exec sleep 20"
        extra = f"recreate_command = {json.dumps(['sh', '-c', 'sleep 1; ' + script])}\n"
        with open_daemon(tmp_path, engine, {"slow": unit_toml(name, extra=extra)}) as d:
            d.wait_state("slow", "starting")
            assert read_fifo(ready) == "up\n"  # the container runs; the command goes on
            assert containers.inspect(name)["State"]["Running"]
            d.call("stop", services=["slow"], wait=True, timeout=30)
            assert d.wait_state("slow", "stopped")["container_id"] is None
            assert not containers.inspect(name)["State"]["Running"]
