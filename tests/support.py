"""Test harness: real supervisors over real processes, observed through the event bus.

Usage (pytest-asyncio cannot hold a task group across a fixture's yield, so tests
enter the context manager themselves)::

    async with supervising(tmp_path, make_spec(tmp_path, "web", [...])) as h:
        await h.wait_event("hostvisor.service.running", "web")
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.abc import ObjectReceiveStream

from supervisor.drivers.process import ProcessDriver
from supervisor.events import Event, EventBus
from supervisor.service import Broadcast, ServiceSupervisor
from supervisor.spec import BackoffSpec, ProcessSpec, ServiceSpec, StopSpec
from supervisor.states import ServiceState

PROGRAMS = Path(__file__).parent / "programs"
PY = sys.executable


def program(name: str, *args: object) -> tuple[str, ...]:
    """argv running ``tests/programs/<name>.py`` with this interpreter."""
    return (PY, str(PROGRAMS / f"{name}.py"), *map(str, args))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def marked(name: str, *, anywhere: bool = False) -> list[psutil.Process]:
    """Live processes carrying HOSTVISOR_SERVICE=name: our descendants, or any on the host."""
    candidates = psutil.process_iter() if anywhere else psutil.Process().children(recursive=True)
    found = []
    for proc in candidates:
        try:
            if proc.environ().get("HOSTVISOR_SERVICE") == name and proc.status() != "zombie":
                found.append(proc)
        except psutil.Error:
            pass
    return found


def make_spec(tmp_path: Path, name: str, command: Sequence[str], **overrides: Any) -> ServiceSpec:
    """A process ServiceSpec with fast test defaults (no jitter, short delays)."""
    values: dict[str, Any] = {
        "name": name,
        "target": ProcessSpec(command=tuple(command)),
        "workdir": tmp_path,
        "start_seconds": 0.2,
        "backoff": BackoffSpec(initial=0.05, max=0.2, multiplier=2, jitter=0, reset_after=60),
        "stop": StopSpec(timeout=2.0),
    }
    values.update(overrides)
    return ServiceSpec(**values)


@dataclass
class Harness:
    """What a test sees: the bus, the supervisors, and every event since the start."""

    bus: EventBus
    driver: ProcessDriver
    supervisors: dict[str, ServiceSupervisor]
    changed: Broadcast
    events: ObjectReceiveStream[Event]
    seen: list[Event] = field(default_factory=list)

    def __getitem__(self, name: str) -> ServiceSupervisor:
        return self.supervisors[name]

    async def wait_event(
        self,
        name: str,
        service: str | None = None,
        *,
        timeout: float = 10.0,
        where: Callable[[Event], bool] | None = None,
    ) -> Event:
        """The next event called ``name`` (for ``service``), within ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            async for event in self.events:
                self.seen.append(event)
                if event.event != name or (service is not None and event.service != service):
                    continue
                if where is None or where(event):
                    return event
        raise AssertionError("event stream closed")

    async def wait_until(self, condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
        """Return when ``condition()`` holds, re-checked at every state change."""
        with anyio.fail_after(timeout):
            while not condition():
                await self.changed.wait()

    async def wait_state(self, service: str, state: ServiceState, *, timeout: float = 10.0) -> None:
        """Return when ``service`` is in ``state``."""
        await self.wait_until(lambda: self.supervisors[service].state is state, timeout=timeout)


@asynccontextmanager
async def supervising(
    tmp_path: Path,
    *specs: ServiceSpec,
    driver: ProcessDriver | None = None,
    on_crash: Callable[[str, str, BaseException], None] | None = None,
) -> AsyncIterator[Harness]:
    """Run a supervisor per spec over the real ProcessDriver (or ``driver``, a subclass of
    it); stop them all at the end."""
    bus = EventBus()
    changed = Broadcast()
    driver = driver if driver is not None else ProcessDriver(state_dir=tmp_path / "state")
    supervisors: dict[str, ServiceSupervisor] = {}
    for spec in specs:
        supervisors[spec.name] = ServiceSupervisor(
            spec,
            driver=driver,
            bus=bus,
            peers=supervisors.get,
            changed=changed,
            run_command=driver.run_command,
            rng=random.Random(0),
            on_crash=on_crash,
        )
    async with bus.subscribe(buffer=100_000) as events, anyio.create_task_group() as tg:
        harness = Harness(bus, driver, supervisors, changed, events)
        for sup in supervisors.values():
            await tg.start(sup.run)
        try:
            yield harness
        finally:
            with anyio.move_on_after(15, shield=True):
                gens = [(sup, sup.command_stop()) for sup in supervisors.values()]
                for sup, gen in gens:
                    await sup.wait_settled(gen, frozenset({ServiceState.STOPPED}))
            tg.cancel_scope.cancel()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"256k"``) mounted at ``path`` for the block (root only);
    skips the test where it cannot be mounted."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
