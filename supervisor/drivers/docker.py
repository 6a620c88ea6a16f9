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

Container states are Docker's (``created``, ``running``, ``paused``,
``restarting``, ``removing``, ``exited``, ``dead``), and ``removed`` once gone.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.from_thread
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
    fractional digits, e.g. ``State.StartedAt``); 0 for Docker's zero time."""
    match = _TIME.match(text or "")
    if match is None or text.startswith("0001-"):
        return 0
    main, frac, zone = match.groups()
    moment = datetime.fromisoformat(main + ("+00:00" if zone == "Z" else zone))
    return int(moment.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


class _Record:
    """What the driver knows of one container (by full id), shared by its handles."""

    def __init__(self, container_id: str, name: str) -> None:
        self.id = container_id
        self.name = name
        self.state = "unknown"
        self.exit_code: int | None = None
        self.health: str | None = None
        self.handles: set[ContainerHandle] = set()
        self.dies: deque[tuple[int, int]] = deque(maxlen=8)  # (time ns, exit code)

    def apply_inspect(self, info: Mapping[str, Any]) -> None:
        state = info.get("State") or {}
        self.name = str(info.get("Name") or self.name).lstrip("/")
        self.state = str(state.get("Status") or "unknown")
        self.exit_code = int(state.get("ExitCode", 0)) if self.state != "running" else None
        self.health = (state.get("Health") or {}).get("Status")
        for handle in tuple(self.handles):
            if not (state.get("StartedAt") == handle.started_at and state.get("Running")):
                handle._end(self.code_after(handle.started_ns))

    def code_after(self, started_ns: int) -> int:
        """The exit code of the run started at ``started_ns``: its ``die``, else the last seen."""
        for time_ns, code in self.dies:
            if time_ns >= started_ns:
                return code
        return self.exit_code if self.exit_code is not None else REMOVED_EXIT_CODE

    def died(self, time_ns: int, code: int) -> None:
        self.state, self.exit_code = "exited", code
        self.dies.append((time_ns, code))
        for handle in tuple(self.handles):
            if time_ns >= handle.started_ns:
                handle._end(code)

    def removed(self) -> None:
        self.state = "removed"
        for handle in tuple(self.handles):
            handle._end(self.code_after(handle.started_ns))


class ContainerHandle:
    """One run of a container (one ``State.StartedAt``); satisfies ``Handle``.

    Attributes:
        started_at: the run's ``State.StartedAt`` as the engine wrote it.
        started_ns: the same, in nanoseconds since the epoch.
    """

    def __init__(
        self, driver: DockerDriver, record: _Record, info: Mapping[str, Any], service: str
    ) -> None:
        state = info.get("State") or {}
        self._driver = driver
        self._record = record
        self.service = service
        self.started_at = str(state.get("StartedAt", ""))
        self.started_ns = docker_time_ns(self.started_at)
        self._pid: int | None = int(state.get("Pid") or 0) or None
        self._ended = anyio.Event()
        self._exit: ExitStatus | None = None
        record.handles.add(self)
        for time_ns, code in record.dies:  # a die dispatched before this handle existed
            if time_ns >= self.started_ns:
                self._end(code)
        if not state.get("Running"):
            self._end(int(state.get("ExitCode", 0)))

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
        """Return ``ExitStatus(code=State.ExitCode)`` once this run ended: a ``die``,
        ``stop`` or ``destroy`` event, or a reconcile that found it not running. It
        does not return while the engine is unreachable (the unit keeps its state)."""
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
        """
        if self._exit is not None:
            return self._exit
        seconds = max(0, math.ceil(stop.timeout))
        api = self._driver._api()
        try:
            await self._driver._call(
                lambda: api.stop(self.container_id, timeout=seconds), timeout=seconds
            )
        except docker.errors.NotFound:
            self._record.removed()
        await self._driver.refresh(self._record)
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
            that a hung engine (no closed socket) is noticed too.

    Attributes:
        connected: the engine answered and the event stream is open.
        on_connection_change: called on the event loop with the new value of
            ``connected`` when it flips (and with ``False`` when the first
            connection fails).
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
        self._announced: bool | None = None
        self._client: Any = None
        self._records: dict[str, _Record] = {}
        self._last_ns = 0  # engine time of the last event applied, for ``since``
        self._floor_ns = 0  # local time of the first connection: ``since`` before any event
        self._last_keys: set[tuple[str, str]] = set()  # events applied at exactly _last_ns
        self._stream_limiter = anyio.CapacityLimiter(1)

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
        ``timeout + call_timeout`` seconds; engine failures become DockerUnavailable."""
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

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        api = self._api()
        try:
            info = await self._call(lambda: api.inspect_container(ref))
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise DriverError(f"docker inspect {ref!r}: {exc.explanation or exc}") from exc
        return cast(dict[str, Any], info)

    def _record_for(self, info: Mapping[str, Any]) -> _Record:
        cid = str(info["Id"])
        record = self._records.get(cid)
        if record is None:
            record = self._records[cid] = _Record(cid, str(info.get("Name", cid)).lstrip("/"))
        record.apply_inspect(info)
        return record

    async def refresh(self, record: _Record) -> None:
        """Inspect one tracked container and apply what the engine says.

        Raises:
            DockerUnavailable: the engine did not answer.
        """
        info = await self._inspect(record.id)
        if info is None:
            record.removed()
        else:
            record.apply_inspect(info)

    # ------------------------------------------------------------- Driver
    async def adopt(self, spec: ServiceSpec, *, task_group: TaskGroup) -> ContainerHandle | None:
        """A handle on the unit's container if it runs (no restart), else ``None``.

        Raises:
            DockerUnavailable: the engine did not answer.
        """
        info = await self._inspect(_target(spec).name)
        if info is None or not (info.get("State") or {}).get("Running"):
            return None
        return ContainerHandle(self, self._record_for(info), info, spec.name)

    async def start(self, spec: ServiceSpec, *, task_group: TaskGroup) -> ContainerHandle:
        """Make the unit's container run and return a handle on that run.

        A running container is adopted as it is; ``exited``, ``created`` and
        ``dead`` ones are started whatever their exit code; a paused one is
        unpaused. A missing one is created by ``recreate_command`` (in
        ``spec.workdir`` with ``spec.env``, up to 5 minutes) when the unit has one.

        Raises:
            SpawnError: the container does not exist (and could not be recreated),
                or the engine refused to start it (message from the engine).
            DockerUnavailable: the engine is unreachable or did not answer in time.
        """
        target = _target(spec)
        info = await self._inspect(target.name)
        if info is None and target.recreate_command:
            await self._recreate(spec, target.name, target.recreate_command)
            info = await self._inspect(target.name)
            if info is None:
                raise SpawnError(
                    f"container {target.name!r} does not exist after recreate_command ran"
                )
        if info is None:
            raise SpawnError(
                f"container {target.name!r} does not exist and the unit has no recreate_command"
            )
        record = self._record_for(info)  # tracked before starting: no event is missed
        status = str((info.get("State") or {}).get("Status"))
        if status != "running":
            await self._start_container(target.name, record.id, status)
            info = await self._inspect(record.id)
            if info is None:
                raise SpawnError(f"container {target.name!r} was removed while starting")
            record.apply_inspect(info)
        return ContainerHandle(self, record, info, spec.name)

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
        """
        started, attempt = False, 0
        while True:
            try:
                client, stream = await self._open()
            except DockerUnavailable as exc:
                self._set_connected(False, str(exc))
                client = stream = None
            if client is not None:
                attempt, reconnecting = 0, self._announced is not None
                if self._client is not None:
                    self._client.close()
                self._client = client
                self._set_connected(True, "")
                if reconnecting:
                    await self._reconcile()
            if not started:
                started = True
                task_status.started()
            if stream is None:
                await anyio.sleep(min(self.reconnect_max, self.reconnect_initial * 2**attempt))
                attempt += 1
            else:
                await self._stream(stream)
                self.connected = False  # retry at once; the next round reports an outage

    async def _open(self) -> tuple[Any, Any]:
        """A new client and its event stream, ``since`` the last event seen."""
        gate, abandoned = threading.Lock(), threading.Event()
        opened: list[tuple[Any, Any]] = []

        def connect() -> tuple[Any, Any]:
            timeout = math.ceil(self.call_timeout)
            if self.base_url is None:
                client = docker.from_env(timeout=timeout)
            else:
                client = docker.DockerClient(base_url=self.base_url, timeout=timeout)
            ns = self._last_ns or self._floor_ns
            since = f"{ns // 10**9}.{ns % 10**9:09d}" if ns else None
            try:
                stream = client.api.events(since=since, filters={"type": "container"}, decode=True)
            except BaseException:
                client.close()
                raise
            with gate:  # a late answer after the caller gave up: nobody else would close it
                opened.append((client, stream))
                if abandoned.is_set():
                    _close(opened)
            return client, stream

        floor = time.time_ns()
        try:
            result = await self._call(connect)
        except BaseException as exc:
            with gate:
                abandoned.set()
                _close(opened)
            if isinstance(exc, docker.errors.APIError):
                raise DockerUnavailable(
                    f"the Docker engine refused the event stream: {exc}"
                ) from exc
            raise
        self._floor_ns = self._floor_ns or floor
        return result

    async def _stream(self, stream: Any) -> None:
        """Apply events until the stream ends or a liveness ping fails."""

        def pump() -> None:
            try:
                for item in stream:
                    anyio.from_thread.run_sync(self._apply_event, item)
            except (RuntimeError, *_UNAVAILABLE):  # loop gone, or the engine went away
                return

        async def watchdog(scope: anyio.CancelScope) -> None:
            api = self._client.api
            while True:
                await anyio.sleep(self.ping_interval)
                try:
                    await self._call(api.ping)
                except (DockerUnavailable, docker.errors.APIError):
                    scope.cancel("Docker engine stopped answering pings")
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watchdog, tg.cancel_scope)
                await anyio.to_thread.run_sync(
                    pump, abandon_on_cancel=True, limiter=self._stream_limiter
                )
                tg.cancel_scope.cancel("event stream ended")
        finally:
            stream.close()  # unblocks the reader thread if it was abandoned

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
        """Inspect every container with a live handle after a reconnect."""

        async def refresh(record: _Record) -> None:
            with contextlib.suppress(DriverError):  # gone again: the next reconnect reconciles
                await self.refresh(record)

        async with anyio.create_task_group() as tg:
            for record in [r for r in self._records.values() if r.handles]:
                tg.start_soon(refresh, record)

    def _apply_event(self, item: Mapping[str, Any]) -> None:
        """Apply one engine event (on the event loop); replays after ``since`` are skipped."""
        actor = item.get("Actor") or {}
        cid = str(actor.get("ID") or item.get("id") or "")
        action = str(item.get("Action") or item.get("status") or "")
        time_ns = int(item.get("timeNano") or int(item.get("time") or 0) * 10**9)
        key = (cid, action)
        if time_ns < self._last_ns or (time_ns == self._last_ns and key in self._last_keys):
            return
        if time_ns > self._last_ns:
            self._last_ns, self._last_keys = time_ns, set()
        self._last_keys.add(key)
        record = self._records.get(cid)
        if record is None:
            return
        attrs = actor.get("Attributes") or {}
        if action == "die":
            record.died(time_ns, int(attrs.get("exitCode") or 0))
        elif action == "destroy":
            record.removed()
            del self._records[cid]
        elif action == "start":
            record.state, record.exit_code = "running", None
            if record.health is not None:
                record.health = "starting"
        elif action.startswith("health_status:"):
            record.health = action.partition(":")[2].strip()
        elif action in ("pause", "unpause"):
            record.state = "paused" if action == "pause" else "running"


def _close(opened: list[tuple[Any, Any]]) -> None:
    while opened:
        client, stream = opened.pop()
        stream.close()
        client.close()


def _target(spec: ServiceSpec) -> ContainerSpec:
    if not isinstance(spec.target, ContainerSpec):
        raise DriverError(f"{spec.name}: not a container unit")
    return spec.target
