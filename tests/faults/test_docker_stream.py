"""Issue 9 item 10, the rest of the class: an engine connection that misbehaves must not hide
a container's end, spin, or crash the driver.

The faults are real bytes on a real socket: :class:`EngineProxy` relays the private engine's
socket and, on request, garbles or silences the ``/events`` body, answers ``docker inspect``
with something that is not a container, or holds a ``docker start`` in flight.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import events as ev
from supervisor.drivers.docker import DockerDriver
from supervisor.errors import DriverError
from tests.docker_engine import DockerEngine
from tests.test_docker_driver import Rig, cli, names, run_command, run_container, unit

__all__ = ["EngineProxy", "names", "proxied_driver"]

#: A line longer than the driver's MAX_EVENT_BYTES (1 MiB).
OVERSIZE = (1 << 20) + 10
_EVENTS = re.compile(rb"^GET /v[\d.]+/events")
_INSPECT = re.compile(rb"^GET /v[\d.]+/containers/[^/ ]+/json")
_START = re.compile(rb"^POST /v[\d.]+/containers/[^/ ]+/start")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class EngineProxy:
    """A unix socket at ``path`` relaying to the engine's socket, with faults on request.

    Attributes:
        events: ``"pass"``, ``"silence"`` (headers go through, no event ever does) or
            ``"inject"`` (``inject`` bytes are sent as a chunk before the engine's events).
        bad_inspect: if set, ``docker inspect`` is answered ``200`` with this JSON body.
        hold_start: if set, a ``docker start`` request waits until ``release`` is set;
            ``start_held`` is set meanwhile.
    """

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.events = "pass"
        self.inject = b""
        self.bad_inspect: bytes | None = None
        self.hold_start = False
        self.start_held = threading.Event()
        self.release = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(64)
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def close(self) -> None:
        self._closed = True
        self.release.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        engine.connect(str(self.upstream))
        flags = {"events": False}
        down = threading.Thread(target=self._down, args=(engine, client, flags), daemon=True)
        down.start()
        try:
            while data := client.recv(65536):
                if _EVENTS.match(data):
                    flags["events"] = True
                if self.bad_inspect is not None and _INSPECT.match(data):
                    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    head += b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(
                        self.bad_inspect
                    )
                    client.sendall(head + self.bad_inspect)
                    break
                if self.hold_start and _START.match(data):
                    self.start_held.set()
                    self.release.wait(60)
                engine.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, engine):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _down(self, engine: socket.socket, client: socket.socket, flags: dict[str, bool]) -> None:
        head, headers_done = b"", False
        try:
            while data := engine.recv(65536):
                if flags["events"] and self.events != "pass":
                    if not headers_done:
                        head += data
                        if b"\r\n\r\n" not in head:
                            continue
                        top, _, data = head.partition(b"\r\n\r\n")
                        client.sendall(top + b"\r\n\r\n")
                        headers_done = True
                        if self.events == "inject":
                            client.sendall(_chunk(self.inject))
                    if self.events == "silence":
                        continue
                client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy(engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProxy]:
    folder = Path(tmp_path_factory.mktemp("px", numbered=True))
    made = EngineProxy(engine.socket, folder / "p.sock")
    yield made
    made.close()


@asynccontextmanager
async def proxied_driver(url: str, **kwargs: Any) -> AsyncIterator[Rig]:
    bus = ev.EventBus()
    driver = DockerDriver(bus=bus, base_url=url, run_command=run_command, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(driver.run)
        try:
            yield Rig(driver, bus, tg)
        finally:
            tg.cancel_scope.cancel()


@pytest.mark.docker
class TestGarbledStream:
    async def test_a_line_that_is_not_json_hides_no_later_event(
        self, engine: DockerEngine, proxy: EngineProxy, names: Any
    ) -> None:
        """Garbage and an over-long line in the event stream are skipped, counted, and the
        events after them still arrive (the SDK's decoder used to wait for the garbage to
        parse, buffering every later event, forever and without bound)."""
        name = names()
        run_container(engine, name)
        proxy.events = "inject"
        proxy.inject = b"this is not json\n" + b"x" * OVERSIZE + b"\n[[[\n"
        async with proxied_driver(proxy.url, call_timeout=5.0, ping_interval=600) as rig:
            handle = await rig.start(unit(engine, name))
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 137
            assert rig.driver.malformed_events == 3

    async def test_a_stream_that_goes_silent_hides_a_die_for_one_ping_at_most(
        self, engine: DockerEngine, proxy: EngineProxy, names: Any
    ) -> None:
        """An event stream that stays open but delivers nothing (a proxy, a stuck engine
        goroutine) while pings succeed: the periodic inspect still ends the handle."""
        name = names()
        run_container(engine, name)
        proxy.events = "silence"
        async with proxied_driver(proxy.url, call_timeout=5.0, ping_interval=0.5) as rig:
            handle = await rig.start(unit(engine, name))
            await cli(engine, "kill", name)
            with anyio.fail_after(10):
                assert (await handle.wait()).code == 137


@pytest.mark.docker
class TestUnexpectedAnswers:
    @pytest.mark.parametrize("body", [b"[]", b'{"Id": 5}', b'{"Id": "x", "State": 3}'])
    async def test_an_inspect_that_is_not_a_container_is_a_driver_error(
        self, engine: DockerEngine, proxy: EngineProxy, names: Any, body: bytes
    ) -> None:
        """`docker inspect` answered with valid JSON that is not a container: start and
        adopt raise DriverError (the service layer's retry), not AttributeError/KeyError
        (which crashed the service's supervisor)."""
        name = names()
        run_container(engine, name)
        async with proxied_driver(proxy.url, call_timeout=5.0) as rig:
            proxy.bad_inspect = body
            with pytest.raises(DriverError, match="not a container"):
                await rig.start(unit(engine, name))
            with pytest.raises(DriverError, match="not a container"):
                await rig.adopt(unit(engine, name))
            proxy.bad_inspect = None
            assert not (await rig.start(unit(engine, name))).ended


class TestReconnect:
    async def test_an_engine_that_hangs_up_at_once_for_ever_never_crashes_the_driver(
        self, tmp_path: Path
    ) -> None:
        """A socket that accepts and closes every connection, 1,100 times in a row: the
        driver keeps retrying at its capped delay (the delay 2**attempt overflowed a float
        after 1,024 attempts, about 85 minutes of outage at 5 s a try, and the driver died)."""
        path = Path(tmp_path / "e.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(64)
        accepted = 0
        enough = threading.Event()

        def hang_up() -> None:
            nonlocal accepted
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.close()
                accepted += 1
                if accepted >= 1100:
                    enough.set()

        threading.Thread(target=hang_up, daemon=True).start()
        try:
            rig = proxied_driver(
                f"unix://{path}", reconnect_initial=1e-6, reconnect_max=1e-4, call_timeout=2.0
            )
            async with rig as r:
                with anyio.fail_after(120):
                    await anyio.to_thread.run_sync(enough.wait, abandon_on_cancel=True)
                assert not r.driver.connected
                assert [e.event for e in r.bus.recent()] == [ev.DOCKER_DISCONNECTED]
        finally:
            listener.close()
