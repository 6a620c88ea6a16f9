"""The Docker driver's event-stream half: the engine connection and its events.

Part of the Docker adapter (STYLE rule 10): this module and
:mod:`supervisor.drivers.docker` are the only two that import ``docker``
(split for size, STYLE rule 12). :class:`EngineEvents` is the base class
of :class:`~supervisor.drivers.docker.DockerDriver` and is not used alone: it
holds the client, runs every blocking SDK call in a worker thread under a
deadline (``call_timeout`` seconds), so a hung engine never stalls the event
loop, and reads the engine's event stream (``GET /events``, containers only)
in one thread of its own for every unit; the event loop applies it.

When the engine goes away: ``hostvisor.docker.disconnected``, reconnection with
a capped backoff, and handles keep their last state (``wait()`` does not return,
so nothing is started or removed in a storm). When it answers again: the event
stream resumes ``since`` the last event seen, ``hostvisor.docker.reconnected``,
and every tracked container is inspected. One the restart left exited (the seed
incident: ``kill -9 dockerd`` leaves ``Exited (137)``) ends its handle, and the
service layer starts it again.

Which run an event belongs to (issue 9 item 10). Events carry the engine's wall
clock (``time``/``timeNano``), which can be stepped (NTP, a VM resumed, an
operator) and is replayed when the stream reconnects ``since`` an earlier
moment. So no event is ever filtered, de-duplicated or matched to a run by its
time: a lifecycle event (``die``, ``start``, ``restart``, ``pause``,
``unpause``) only asks for a fresh ``docker inspect`` of that container, and a
handle ends when an inspect shows its run is over: ``State.StartedAt`` differs
from the one the handle was born with (the engine writes it once per run, so it
names the run), or ``State.Running`` is false. A replayed or late ``die`` of an
earlier run finds the fresh run still running and changes nothing; a ``die``
stamped an hour "in the past" by a stepped clock is acted on at once. Inspect
answers are applied in the order they were asked (an older answer overtaken by
a newer one is dropped). Only ``destroy`` is final by itself (container ids are
never reused). Applying an event twice is harmless, so a replay needs no
de-duplication, and ``since`` is only the time of the last event as the same
engine stamped it (never the host's clock). Every ``ping_interval`` the tracked
containers are inspected as well, so even an event stream that stays open but
goes silent cannot hide a ``die`` for longer than that.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import docker
import docker.errors
from anyio.abc import TaskGroup, TaskStatus

from supervisor import events as ev
from supervisor.errors import DockerUnavailable, DriverError
from supervisor.events import EventBus

if TYPE_CHECKING:
    from supervisor.drivers.docker import _Record

__all__ = ["MAX_EVENT_BYTES", "EngineEvents"]

T = TypeVar("T")

#: Longest engine event (one JSON line) read, in bytes; a longer line is skipped.
MAX_EVENT_BYTES = 1 << 20
#: Events that may change whether a run goes on: each asks for a fresh inspect.
_LIFECYCLE = frozenset({"start", "die", "restart", "pause", "unpause", "stop", "kill", "oom"})
# requests' errors (ConnectionError, ReadTimeout) are OSErrors; so is docker's APIError,
# which callers catch first.
_UNAVAILABLE = (OSError, TimeoutError)


class EngineEvents:
    """The connection half of ``DockerDriver``: connect, stream events, reconnect.

    Its attributes are set by ``DockerDriver.__init__`` (documented there);
    :meth:`refresh` is ``DockerDriver``'s inspect of one tracked container.
    """

    bus: EventBus
    base_url: str | None
    call_timeout: float
    reconnect_initial: float
    reconnect_max: float
    ping_interval: float
    connected: bool
    on_connection_change: Callable[[bool], None] | None
    malformed_events: int
    _announced: bool | None
    _client: Any
    _records: dict[str, _Record]
    _last_ns: int
    _stream_gen: int
    _tg: TaskGroup | None
    _confirming: int
    _idle: anyio.Event

    async def refresh(self, record: _Record) -> None:
        """Inspect ``record`` and apply the answer (``DockerDriver.refresh``)."""
        raise NotImplementedError

    # ------------------------------------------------------------- engine calls
    def _api(self) -> Any:
        if not self.connected or self._client is None:
            raise DockerUnavailable("the Docker engine is not reachable (reconnecting)")
        return self._client.api

    async def _call(self, fn: Callable[[], T], *, timeout: float = 0.0) -> T:
        """Run one blocking SDK call in a worker thread, bounded by
        ``timeout + call_timeout`` seconds. Engine failures become DockerUnavailable,
        ``docker.errors.APIError`` is re-raised for the caller, anything else the SDK
        raises (a malformed answer) becomes DriverError."""
        limit = timeout + self.call_timeout
        try:
            with anyio.fail_after(limit + 0.5):
                return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except TimeoutError as exc:
            raise DockerUnavailable(f"the Docker engine did not answer within {limit:g}s") from exc
        except docker.errors.APIError:
            raise
        except (docker.errors.DockerException, *_UNAVAILABLE) as exc:
            raise DockerUnavailable(f"the Docker engine is not reachable: {exc}") from exc
        except Exception as exc:  # urllib3/http.client internals, a JSON error: never a crash
            raise DriverError(f"the Docker SDK failed: {type(exc).__name__}: {exc}") from exc

    async def wait_idle(self) -> None:
        """Return once every inspect asked for by an event has been applied."""
        while self._confirming:
            await self._idle.wait()

    # ------------------------------------------------------------- connection
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, stream events, reconnect forever; cancel to stop.

        Reports readiness (``task_group.start``) after the first connection
        attempt, successful or not, so a daemon does not wait for an absent engine.
        A stream that ends within ``reconnect_max`` seconds of opening (an engine
        that accepts and hangs up at once) is retried at the reconnect backoff.
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await self._connect_forever(task_status)
            finally:
                self._tg = None

    async def _connect_forever(self, task_status: TaskStatus[None]) -> None:
        started, attempt = False, 0
        while True:
            stream = await self._connect()
            if not started:
                started = True
                task_status.started()
            if stream is not None:
                opened = anyio.current_time()
                await self._stream(stream)
                self.connected = False  # the next round reports an outage if there is one
                if anyio.current_time() - opened >= self.reconnect_max:
                    attempt = 0
                    continue  # a stream that lived: reconnect at once
            await anyio.sleep(self._delay(attempt))
            attempt += 1

    def _delay(self, attempt: int) -> float:
        """The reconnect delay in seconds; ``attempt`` is capped so it never overflows."""
        return min(self.reconnect_max, self.reconnect_initial * 2.0 ** min(attempt, 64))

    async def _connect(self) -> Any:
        """Open a client and its event stream; ``None`` if the engine is unreachable."""
        try:
            client, stream = await self._open()
        except DriverError as exc:
            self._set_connected(False, str(exc))
            return None
        reconnecting = self._announced is not None
        previous, self._client = self._client, client
        if previous is not None:
            _close_quietly(previous)
        self._set_connected(True, "")
        if reconnecting:
            await self._reconcile()
        return stream

    async def _open(self) -> tuple[Any, Any]:
        """A new client and its event stream, ``since`` the last event seen."""
        gate, abandoned = threading.Lock(), threading.Event()
        opened: list[tuple[Any, Any]] = []
        ns = self._last_ns  # the engine's own clock, never the host's
        since = f"{ns // 10**9}.{ns % 10**9:09d}" if ns > 0 else None

        def connect() -> tuple[Any, Any]:
            timeout = math.ceil(self.call_timeout)
            if self.base_url is None:
                client = docker.from_env(timeout=timeout)
            else:
                client = docker.DockerClient(base_url=self.base_url, timeout=timeout)
            try:
                stream = client.api.events(since=since, filters={"type": "container"})
            except BaseException:
                _close_quietly(client)
                raise
            with gate:  # a late answer after the caller gave up: nobody else would close it
                opened.append((client, stream))
                if abandoned.is_set():
                    _close(opened)
            return client, stream

        try:
            return await self._call(connect)
        except BaseException as exc:
            with gate:
                abandoned.set()
                _close(opened)
            if isinstance(exc, docker.errors.APIError):
                raise DockerUnavailable(
                    f"the Docker engine refused the event stream: {exc}"
                ) from exc
            raise

    async def _stream(self, stream: Any) -> None:
        """Apply events until the stream ends or a liveness ping fails.

        The stream is read by a thread of its own (not anyio's pool: a reader that
        cannot be unblocked must not hold up the next stream). It hands one event
        at a time to the loop (at most one in flight, so nothing queues up), and any
        failure of the stream, of any type, ends it; :meth:`run` reconnects.
        """
        self._stream_gen += 1
        gen, token, ended = self._stream_gen, anyio.lowlevel.current_token(), anyio.Event()

        def deliver(item: object) -> None:
            if gen == self._stream_gen:
                self._apply_event(item)

        def pump() -> None:
            try:
                for item in _decode_events(stream):
                    anyio.from_thread.run_sync(deliver, item, token=token)
            except Exception:  # the engine went away, the loop is gone, or garbage
                pass
            finally:
                with contextlib.suppress(Exception):
                    anyio.from_thread.run_sync(ended.set, token=token)

        async def watchdog(scope: anyio.CancelScope) -> None:
            api = self._client.api
            while True:
                await anyio.sleep(self.ping_interval)
                try:
                    await self._call(api.ping)
                except (DriverError, docker.errors.APIError):
                    scope.cancel("Docker engine stopped answering pings")
                    return
                await self._reconcile()  # a silent stream hides no die for long

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watchdog, tg.cancel_scope)
                threading.Thread(target=pump, name="hostvisor-docker-events", daemon=True).start()
                await ended.wait()
                tg.cancel_scope.cancel("event stream ended")
        finally:
            self._stream_gen += 1  # late events of this stream are dropped
            _close_quietly(stream)  # unblocks the reader thread

    def _set_connected(self, connected: bool, reason: str) -> None:
        self.connected = connected
        if self._announced is connected:
            return
        previous, self._announced = self._announced, connected
        where = {"server.address": self.base_url or "DOCKER_HOST/context"}
        if not connected:
            self.bus.publish(
                ev.DOCKER_DISCONNECTED,
                message=f"Docker engine unreachable: {reason}",
                attributes={**where, "error.type": "DockerUnavailable"},
            )
        elif previous is False:
            self.bus.publish(
                ev.DOCKER_RECONNECTED, message="Docker engine reachable again", attributes=where
            )
        if self.on_connection_change is not None:
            self.on_connection_change(connected)

    async def _reconcile(self) -> None:
        """Inspect every container with a live handle; forget the removed ones (whose
        ``destroy`` was missed). A record without handles is kept: a ``start()`` in
        progress holds it before its handle exists."""

        async def refresh(record: _Record) -> None:
            with contextlib.suppress(DriverError):  # gone again: the next reconnect reconciles
                await self.refresh(record)

        for cid in [c for c, r in self._records.items() if r.gone]:
            del self._records[cid]
        async with anyio.create_task_group() as tg:
            for record in [r for r in self._records.values() if r.handles]:
                tg.start_soon(refresh, record)

    # ------------------------------------------------------------- events
    def _apply_event(self, item: object) -> None:
        """Apply one engine event (on the event loop); never raises.

        Nothing is filtered or matched by the event's time (see the module
        docstring): a lifecycle event of a tracked container asks for a fresh
        inspect, which decides; ``destroy`` ends its handles; ``health_status``
        updates the health last seen. An event that cannot be read is skipped and
        counted in :attr:`malformed_events`.
        """
        parsed = _parse_event(item)
        if parsed is None:
            self.malformed_events += 1
            return
        cid, action, time_ns, attrs = parsed
        if time_ns > 0:
            self._last_ns = time_ns  # the latest in stream order, even if the clock went back
        record = self._records.get(cid)
        if record is None:
            return
        if action == "destroy":
            record.removed()
            del self._records[cid]
        elif action.startswith("health_status"):
            record.health = action.partition(":")[2].strip() or record.health
        elif action in _LIFECYCLE:
            if action == "die":
                record.last_die = _int(attrs.get("exitCode"))
            self._confirm(record)

    def _confirm(self, record: _Record) -> None:
        """Inspect ``record`` soon (coalesced: one inspect in flight per container)."""
        record.dirty = True
        if record.confirming or self._tg is None:
            return
        record.confirming = True
        self._confirming += 1
        self._idle = anyio.Event()
        self._tg.start_soon(self._confirmer, record)

    async def _confirmer(self, record: _Record) -> None:
        delay = self.reconnect_initial
        try:
            while record.dirty and not record.gone:
                record.dirty = False
                try:
                    await self.refresh(record)
                except DriverError:
                    if not self.connected:
                        return  # the reconnect inspects every tracked container
                    record.dirty = True  # a refusal (500) or a timeout: try again
                    await anyio.sleep(delay)
                    delay = min(self.reconnect_max, delay * 2)
        finally:
            record.confirming = False
            self._confirming -= 1
            if not self._confirming:
                self._idle.set()


def _int(value: object) -> int | None:
    """An integer from an engine field (int or decimal string), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and 0 < len(value) <= 20 and value.lstrip("-").isdigit():
        return int(value)
    return None


def _parse_event(item: object) -> tuple[str, str, int, Mapping[str, Any]] | None:
    """``(container id, action, time ns, attributes)`` of an engine event, or ``None``."""
    if not isinstance(item, Mapping):
        return None
    actor = item.get("Actor")
    actor = actor if isinstance(actor, Mapping) else {}
    cid = actor.get("ID") or item.get("id")
    action = item.get("Action") or item.get("status")
    if not (isinstance(cid, str) and cid and isinstance(action, str)):
        return None
    attrs = actor.get("Attributes")
    nanos = _int(item.get("timeNano"))
    if nanos is None:
        nanos = (_int(item.get("time")) or 0) * 10**9
    return cid, action, nanos, attrs if isinstance(attrs, Mapping) else {}


def _decode_events(chunks: Iterable[bytes | str]) -> Iterator[object]:
    """Engine events from the raw ``/events`` body: one JSON value per line (what the
    engine's ``json.Encoder`` writes). A line that is not JSON yields ``None``; a line
    longer than :data:`MAX_EVENT_BYTES` is skipped whole (memory stays bounded)."""
    buffer, skipping = b"", False
    for chunk in chunks:
        buffer += chunk.encode() if isinstance(chunk, str) else chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if skipping:
                skipping = False
                yield None
                continue
            if line.strip():
                try:
                    yield json.loads(line)
                except (ValueError, RecursionError):
                    yield None
        if len(buffer) > MAX_EVENT_BYTES:
            buffer, skipping = b"", True


def _close_quietly(thing: Any) -> None:
    """``close()`` a stream or client; a failure to close (a socket already gone, an SSH
    transport that cannot cancel) must not take the driver down."""
    with contextlib.suppress(Exception):
        thing.close()


def _close(opened: list[tuple[Any, Any]]) -> None:
    while opened:
        client, stream = opened.pop()
        _close_quietly(stream)
        _close_quietly(client)
