"""The Docker driver: keeps existing containers up, across engine restarts.

The only module that imports ``docker``. Every blocking SDK call runs in a
worker thread under a deadline (``call_timeout`` seconds), so a hung engine
never stalls the event loop. One thread reads the engine's event stream
(``GET /events``, containers only) for every unit; the event loop applies it.

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

Container states are Docker's (``created``, ``running``, ``paused``,
``restarting``, ``removing``, ``exited``, ``dead``), and ``removed`` once gone.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import docker
import docker.errors
from anyio.abc import TaskGroup, TaskStatus

from supervisor import events as ev
from supervisor.errors import DockerUnavailable, DriverError, SpawnError
from supervisor.events import EventBus
from supervisor.spec import ContainerSpec, ServiceSpec, StopSpec
from supervisor.states import ExitStatus

__all__ = ["CommandOutcome", "ContainerHandle", "DockerDriver", "docker_time_ns"]

T = TypeVar("T")

#: Seconds a ``recreate_command`` (``docker compose up -d``) may take.
RECREATE_TIMEOUT = 300.0
#: Exit code reported for a container removed under us with no ``die`` seen (it was killed).
REMOVED_EXIT_CODE = 137
#: Longest engine event (one JSON line) read, in bytes; a longer line is skipped.
MAX_EVENT_BYTES = 1 << 20
#: Events that may change whether a run goes on: each asks for a fresh inspect.
_LIFECYCLE = frozenset({"start", "die", "restart", "pause", "unpause", "stop", "kill", "oom"})

_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")
# requests' errors (ConnectionError, ReadTimeout) are OSErrors; so is docker's APIError,
# which callers catch first.
_UNAVAILABLE = (OSError, TimeoutError)


class CommandOutcome(Protocol):
    """What a command runner returns (``ProcessDriver.run_command``'s ``CommandResult``)."""

    @property
    def code(self) -> int | None: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def timed_out(self) -> bool: ...
    @property
    def stderr(self) -> str: ...


RunCommand = Callable[..., Awaitable[CommandOutcome]]


def docker_time_ns(text: str) -> int:
    """Nanoseconds since the epoch of an engine timestamp (RFC 3339 with up to 9
    fractional digits, e.g. ``State.StartedAt``); 0 for Docker's zero time or an
    unreadable one."""
    match = _TIME.match(text or "")
    if match is None or text.startswith("0001-"):
        return 0
    main, frac, zone = match.groups()
    try:
        moment = datetime.fromisoformat(main + ("+00:00" if zone == "Z" else zone))
    except ValueError:  # month 13 and the like
        return 0
    return int(moment.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def _int(value: object) -> int | None:
    """An integer from an engine field (int or decimal string), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and 0 < len(value) <= 20 and value.lstrip("-").isdigit():
        return int(value)
    return None


def _state_of(info: Mapping[str, Any]) -> Mapping[str, Any]:
    state = info.get("State")
    return state if isinstance(state, Mapping) else {}


class _Record:
    """What the driver knows of one container (by full id), shared by its handles."""

    def __init__(self, container_id: str, name: str) -> None:
        self.id = container_id
        self.name = name
        self.state = "unknown"
        self.exit_code: int | None = None
        self.health: str | None = None
        self.handles: set[ContainerHandle] = set()
        self.started_at = ""  # State.StartedAt of the freshest inspect: names the run
        self.running = False
        self.seen = 0  # number of the freshest inspect applied (inspects are numbered)
        self.last_die: int | None = None  # exitCode of the last die event, in stream order
        self.gone = False
        self.dirty = False  # an event asked for a fresh inspect
        self.confirming = False

    def apply_inspect(self, info: Mapping[str, Any], seq: int) -> None:
        """Apply inspect answer number ``seq``; an answer older than one applied is dropped."""
        if seq < self.seen:
            return
        self.seen = seq
        state = _state_of(info)
        self.name = str(info.get("Name") or self.name).lstrip("/")
        self.state = str(state.get("Status") or "unknown")
        self.running = bool(state.get("Running"))
        self.started_at = str(state.get("StartedAt") or "")
        self.exit_code = None if self.state == "running" else (_int(state.get("ExitCode")) or 0)
        health = state.get("Health")
        self.health = health.get("Status") if isinstance(health, Mapping) else None
        self.end_finished()

    def current(self, handle: ContainerHandle) -> bool:
        """True while the freshest inspect shows ``handle``'s run going on."""
        return not self.gone and self.running and self.started_at == handle.started_at

    def code_for(self, handle: ContainerHandle) -> int:
        """The exit code of ``handle``'s ended run: ``State.ExitCode`` if the container
        still shows that run, else the last ``die`` seen, else the last code known."""
        if not self.gone and self.started_at == handle.started_at and self.exit_code is not None:
            return self.exit_code
        if self.last_die is not None:
            return self.last_die
        return self.exit_code if self.exit_code is not None else REMOVED_EXIT_CODE

    def end_finished(self) -> None:
        for handle in tuple(self.handles):
            if not self.current(handle):
                handle._end(self.code_for(handle))

    def removed(self) -> None:
        self.state, self.gone = "removed", True
        self.end_finished()


class ContainerHandle:
    """One run of a container (one ``State.StartedAt``); satisfies ``Handle``.

    Attributes:
        started_at: the run's ``State.StartedAt`` as the engine wrote it.
        started_ns: the same, in nanoseconds since the epoch (engine clock; shown, never
            compared with event times).
    """

    def __init__(
        self,
        driver: DockerDriver,
        record: _Record,
        info: Mapping[str, Any],
        service: str,
        *,
        seq: int,
    ) -> None:
        state = _state_of(info)
        self._driver = driver
        self._record = record
        self.service = service
        self.started_at = str(state.get("StartedAt") or "")
        self.started_ns = docker_time_ns(self.started_at)
        self._pid: int | None = _int(state.get("Pid")) or None
        self._ended = anyio.Event()
        self._exit: ExitStatus | None = None
        record.handles.add(self)
        if not state.get("Running"):
            self._end(_int(state.get("ExitCode")) or 0)
        elif record.gone or (record.seen > seq and not record.current(self)):
            self._end(record.code_for(self))  # a newer inspect (or destroy) saw this run end

    def __repr__(self) -> str:
        return f"<ContainerHandle {self._record.name} {self._record.id[:12]}: {self.state}>"

    def _end(self, code: int) -> None:
        if self._exit is None:
            self._exit = ExitStatus(code=code)
            self._pid = None
            self._record.handles.discard(self)
            self._ended.set()

    @property
    def pid(self) -> int | None:
        """``State.Pid``, the container's init process on the host; ``None`` once ended."""
        return self._pid

    @property
    def container_id(self) -> str:
        """The full container id."""
        return self._record.id

    @property
    def name(self) -> str:
        """The container's name, without Docker's leading ``/``."""
        return self._record.name

    @property
    def state(self) -> str:
        """The container's state as last seen (``running``, ``exited``, ``removed`` ...)."""
        return self._record.state

    @property
    def exit_code(self) -> int | None:
        """``State.ExitCode`` as last seen; ``None`` while running."""
        return self._record.exit_code

    @property
    def ended(self) -> bool:
        """True once this run has ended."""
        return self._exit is not None

    async def wait(self) -> ExitStatus:
        """Return ``ExitStatus(code=State.ExitCode)`` once this run ended: an inspect
        (after a ``die``, ``stop`` ... event, a reconnect or the periodic check) that
        shows another ``StartedAt`` or a container not running, or its ``destroy``.
        It does not return while the engine is unreachable (the unit keeps its state)."""
        await self._ended.wait()
        assert self._exit is not None
        return self._exit

    async def stop(self, stop: StopSpec) -> ExitStatus:
        """``docker stop -t ceil(stop.timeout)``: the image's STOPSIGNAL, then SIGKILL.

        ``stop.signal`` is not used: a container is stopped with its own stop signal,
        as ``docker stop`` and compose do. Idempotent once ended.

        Raises:
            DockerUnavailable: the engine did not answer within
                ``stop.timeout + call_timeout`` seconds.
            DriverError: the engine refused (message from the engine).
        """
        if self._exit is not None:
            return self._exit
        await self._driver._stop_container(self._record, stop)
        if self._exit is None:  # running again (a restart policy): this run still ended
            self._end(self._record.exit_code or 0)
        assert self._exit is not None
        return self._exit

    async def health_status(self) -> str | None:
        """``State.Health.Status``: ``"starting"``, ``"healthy"``, ``"unhealthy"``, or
        ``None`` for a container without HEALTHCHECK. Inspects when the engine answers;
        during an outage (or a timeout) returns the status last seen (also kept up to
        date by ``health_status`` events)."""
        if self._driver.connected:
            with contextlib.suppress(DriverError):
                await self._driver.refresh(self._record)
        return self._record.health


class DockerDriver:
    """Starts, adopts and watches containers; satisfies ``Driver``.

    Args:
        bus: where ``hostvisor.docker.disconnected`` / ``.reconnected`` go.
        run_command: runs a unit's ``recreate_command``
            (``ProcessDriver.run_command(argv, *, cwd, env, service, timeout)``).
        base_url: the engine's address; ``None`` resolves ``DOCKER_HOST`` and the
            current Docker context as the SDK does (``docker.from_env``).
        call_timeout: seconds any one engine call may take.
        reconnect_initial, reconnect_max: the reconnect delay in seconds,
            doubling from ``reconnect_initial`` up to ``reconnect_max``.
        ping_interval: seconds between liveness pings while streaming events, so
            that a hung engine (no closed socket) is noticed too; each ping is
            followed by an inspect of every tracked container.

    Attributes:
        connected: the engine answered and the event stream is open.
        on_connection_change: called on the event loop with the new value of
            ``connected`` when it flips (and with ``False`` when the first
            connection fails).
        malformed_events: engine events skipped because they could not be read.
    """

    def __init__(
        self,
        *,
        bus: EventBus,
        run_command: RunCommand | None = None,
        base_url: str | None = None,
        call_timeout: float = 10.0,
        reconnect_initial: float = 0.25,
        reconnect_max: float = 5.0,
        ping_interval: float = 10.0,
    ) -> None:
        self.bus = bus
        self.run_command = run_command
        self.base_url = base_url
        self.call_timeout = call_timeout
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.ping_interval = ping_interval
        self.connected = False
        self.on_connection_change: Callable[[bool], None] | None = None
        self.malformed_events = 0
        self._announced: bool | None = None
        self._client: Any = None
        self._records: dict[str, _Record] = {}
        self._last_ns = 0  # engine time of the last event received: ``since`` of a reconnect
        self._inspects = 0  # inspects asked so far: numbers their answers
        self._stream_gen = 0  # events of an abandoned stream are dropped
        self._tg: TaskGroup | None = None
        self._confirming = 0
        self._idle = anyio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        where = self.base_url or "DOCKER_HOST/context"
        return f"<DockerDriver {where}: {'connected' if self.connected else 'disconnected'}>"

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

    async def _inspect(self, ref: str) -> tuple[int, dict[str, Any]] | None:
        """``(number, docker inspect ref)``, or ``None`` if no such container.

        Raises:
            DockerUnavailable: the engine did not answer.
            DriverError: it refused, or answered something that is not a container.
        """
        api = self._api()
        self._inspects += 1
        seq = self._inspects
        try:
            info = await self._call(lambda: api.inspect_container(ref))
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise DriverError(f"docker inspect {ref!r}: {exc.explanation or exc}") from exc
        if not (
            isinstance(info, dict)
            and isinstance(info.get("Id"), str)
            and isinstance(info.get("State"), Mapping)
        ):
            raise DriverError(f"docker inspect {ref!r}: the engine's answer is not a container")
        return seq, info

    def _record_for(self, info: Mapping[str, Any], seq: int) -> _Record:
        cid = str(info["Id"])
        record = self._records.get(cid)
        if record is None:
            record = self._records[cid] = _Record(cid, str(info.get("Name", cid)).lstrip("/"))
        record.apply_inspect(info, seq)
        return record

    async def refresh(self, record: _Record) -> None:
        """Inspect one tracked container and apply what the engine says.

        Raises:
            DockerUnavailable: the engine did not answer.
            DriverError: the engine refused or answered nonsense.
        """
        found = await self._inspect(record.id)
        if found is None:
            record.removed()
        else:
            record.apply_inspect(found[1], found[0])

    async def _stop_container(self, record: _Record, stop: StopSpec) -> None:
        """``docker stop -t ceil(stop.timeout)`` of a tracked container, then an inspect."""
        seconds = max(0, math.ceil(stop.timeout))
        api = self._api()
        try:
            await self._call(lambda: api.stop(record.id, timeout=seconds), timeout=seconds)
        except docker.errors.NotFound:
            record.removed()
        except docker.errors.APIError as exc:
            raise DriverError(f"docker stop {record.name!r}: {exc.explanation or exc}") from exc
        await self.refresh(record)

    async def wait_idle(self) -> None:
        """Return once every inspect asked for by an event has been applied."""
        while self._confirming:
            await self._idle.wait()

    # ------------------------------------------------------------- Driver
    async def adopt(self, spec: ServiceSpec, *, task_group: TaskGroup) -> ContainerHandle | None:
        """A handle on the unit's container if it runs (no restart), else ``None``.

        Raises:
            DockerUnavailable: the engine did not answer.
            DriverError: the engine refused or answered nonsense.
        """
        found = await self._inspect(_target(spec).name)
        if found is None or not _state_of(found[1]).get("Running"):
            return None
        seq, info = found
        return ContainerHandle(self, self._record_for(info, seq), info, spec.name, seq=seq)

    async def start(self, spec: ServiceSpec, *, task_group: TaskGroup) -> ContainerHandle:
        """Make the unit's container run and return a handle on that run.

        A running container is adopted as it is; ``exited``, ``created`` and
        ``dead`` ones are started whatever their exit code; a paused one is
        unpaused. A missing one is created by ``recreate_command`` (in
        ``spec.workdir`` with ``spec.env``, up to 5 minutes) when the unit has one.

        Cancelled (a ``stop`` or ``restart`` arrived meanwhile), it leaves the
        container stopped, never running and untracked: an engine call in flight
        is let finish (up to ``call_timeout``), a ``recreate_command`` in flight
        gets ``spec.stop.timeout`` more seconds and is then killed, and whatever
        runs under the container's name is stopped (``docker stop -t``), all
        shielded and bounded; then the cancellation goes on.

        Raises:
            SpawnError: the container does not exist (and could not be recreated),
                or the engine refused to start it (message from the engine).
            DockerUnavailable: the engine is unreachable or did not answer in time.
            DriverError: the engine answered nonsense.
        """
        target = _target(spec)
        try:
            return await self._start(spec, target)
        except anyio.get_cancelled_exc_class():
            bound = spec.stop.timeout + 2 * self.call_timeout + 1
            with anyio.move_on_after(bound, shield=True):
                await self._stop_after_cancel(target.name, spec.stop)
            raise

    async def _start(self, spec: ServiceSpec, target: ContainerSpec) -> ContainerHandle:
        found = await self._inspect(target.name)
        if found is None and target.recreate_command:
            argv = target.recreate_command
            await _finish_on_cancel(
                lambda: self._recreate(spec, target.name, argv), grace=spec.stop.timeout
            )
            found = await self._inspect(target.name)
            if found is None:
                raise SpawnError(
                    f"container {target.name!r} does not exist after recreate_command ran"
                )
        if found is None:
            raise SpawnError(
                f"container {target.name!r} does not exist and the unit has no recreate_command"
            )
        seq, info = found
        record = self._record_for(info, seq)  # tracked before starting: no event is missed
        status = str(_state_of(info).get("Status"))
        if status != "running":
            await _finish_on_cancel(
                lambda: self._start_container(target.name, record.id, status),
                grace=self.call_timeout + 1,
            )
            found = await self._inspect(record.id)
            if found is None:
                raise SpawnError(f"container {target.name!r} was removed while starting")
            seq, info = found
            record.apply_inspect(info, seq)
        return ContainerHandle(self, record, info, spec.name, seq=seq)

    async def _stop_after_cancel(self, name: str, stop: StopSpec) -> None:
        """After a cancelled start: stop the container ``name`` if it runs (best effort:
        an engine that does not answer cannot be helped)."""
        with contextlib.suppress(DriverError):
            found = await self._inspect(name)
            if found is not None and _state_of(found[1]).get("Running"):
                await self._stop_container(self._record_for(found[1], found[0]), stop)

    async def _start_container(self, name: str, cid: str, status: str) -> None:
        if status in ("restarting", "removing"):
            raise SpawnError(f"container {name!r} is {status}; will try again")
        api = self._api()
        try:
            if status == "paused":
                await self._call(lambda: api.unpause(cid))
            else:
                await self._call(lambda: api.start(cid))
        except docker.errors.NotFound as exc:
            raise SpawnError(f"container {name!r} was removed while starting") from exc
        except docker.errors.APIError as exc:
            raise SpawnError(f"container {name!r} did not start: {exc.explanation or exc}") from exc

    async def _recreate(self, spec: ServiceSpec, name: str, argv: tuple[str, ...]) -> None:
        if self.run_command is None:
            raise SpawnError(f"container {name!r} does not exist and no command runner is set")
        result = await self.run_command(
            list(argv), cwd=spec.workdir, env=spec.env, service=spec.name, timeout=RECREATE_TIMEOUT
        )
        if result.timed_out:
            how = f"timed out after {RECREATE_TIMEOUT:g}s"
        elif result.signal is not None:
            how = f"signal {result.signal}"
        elif result.code != 0:
            how = f"exit code {result.code}"
        else:
            return
        tail = result.stderr.strip().splitlines()[-3:]
        detail = f": {' / '.join(tail)}" if tail else ""
        raise SpawnError(
            f"container {name!r} does not exist; recreate_command failed ({how}){detail}"
        )

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


async def _finish_on_cancel(fn: Callable[[], Awaitable[T]], *, grace: float) -> T:
    """Await ``fn()``; if the caller is cancelled meanwhile, let ``fn`` go on (shielded)
    for ``grace`` more seconds, then cancel it, and re-raise the caller's cancellation.

    For steps that change the engine (``docker start``, ``recreate_command``): cut off
    mid-way, the engine may still carry them out after the caller has looked.
    """
    results: list[T] = []
    failures: list[Exception] = []
    inner = anyio.CancelScope(shield=True)
    done = anyio.Event()

    async def work() -> None:
        with inner:
            try:
                results.append(await fn())
            except Exception as exc:  # handed to the caller, not to the task group
                failures.append(exc)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            inner.deadline = min(inner.deadline, anyio.current_time() + grace)
            raise
    if failures:
        raise failures[0]
    return results[0]


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


def _target(spec: ServiceSpec) -> ContainerSpec:
    if not isinstance(spec.target, ContainerSpec):
        raise DriverError(f"{spec.name}: not a container unit")
    return spec.target
