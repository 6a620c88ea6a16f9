"""The Docker driver: keeps existing containers up, across engine restarts.

The Docker adapter (STYLE rule 10) is this module and
:mod:`supervisor.drivers.docker_events`, its event-stream half: the only two
modules that import ``docker``. This one holds the ``Driver`` side (adopt,
start, stop, inspect) and the handles; :class:`DockerDriver` inherits the
engine connection, its reconnection and the application of the engine's
events from :class:`~supervisor.drivers.docker_events.EngineEvents`, whose
module docstring tells what happens when the engine goes away and which run
an event belongs to. In short: a handle is one run, named by its
``State.StartedAt``; it ends when an inspect shows another ``StartedAt`` or a
container not running, or on ``destroy``.

Container states are Docker's (``created``, ``running``, ``paused``,
``restarting``, ``removing``, ``exited``, ``dead``), and ``removed`` once gone.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar

import anyio
import docker.errors
from anyio.abc import TaskGroup

from supervisor.drivers.docker_events import EngineEvents, _int
from supervisor.errors import DriverError, SpawnError
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

    async def send_signal(self, sig: int, *, group: bool = False) -> bool:
        """``docker kill --signal=sig``: the engine signals the container's main process
        (PID 1 inside it). ``group`` changes nothing: the engine has no group signal,
        and a container's init passes signals on, or not, as it was built to.

        Returns:
            True if sent; False once this run has ended, or the engine says the
            container is not running (or gone).

        Raises:
            DockerUnavailable: the engine did not answer within ``call_timeout``.
            DriverError: the engine refused (message from the engine).
        """
        if self._exit is not None:
            return False
        return await self._driver._kill_container(self._record, sig)

    async def health_status(self) -> str | None:
        """``State.Health.Status``: ``"starting"``, ``"healthy"``, ``"unhealthy"``, or
        ``None`` for a container without HEALTHCHECK. Inspects when the engine answers;
        during an outage (or a timeout) returns the status last seen (also kept up to
        date by ``health_status`` events)."""
        if self._driver.connected:
            with contextlib.suppress(DriverError):
                await self._driver.refresh(self._record)
        return self._record.health


class DockerDriver(EngineEvents):
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

    async def _kill_container(self, record: _Record, sig: int) -> bool:
        """``docker kill --signal`` of a tracked container; False if it does not run."""
        api = self._api()
        try:
            await self._call(lambda: api.kill(record.id, signal=sig))
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # "is not running"
                return False
            raise DriverError(f"docker kill {record.name!r}: {exc.explanation or exc}") from exc
        return True

    async def stats(self, container_id: str) -> dict[str, Any] | None:
        """One ``docker stats --no-stream`` answer for a container (the engine's
        ``GET /containers/{id}/stats?stream=false&one-shot=true``, bounded like every call);
        ``None`` when it is gone, the engine is unreachable or refused, or the answer is not
        an object. Read by :func:`supervisor.resources.container_figures`."""
        try:
            api = self._api()
            doc = await self._call(lambda: api.stats(container_id, stream=False, one_shot=True))
        except (DriverError, docker.errors.APIError):
            return None
        return doc if isinstance(doc, dict) else None

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


def _target(spec: ServiceSpec) -> ContainerSpec:
    if not isinstance(spec.target, ContainerSpec):
        raise DriverError(f"{spec.name}: not a container unit")
    return spec.target
