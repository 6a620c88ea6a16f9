"""The daemon's side of resource figures: sampling on demand, the ``resources`` document,
the status fields, the background loop and the ``max_memory`` limit.

Samples are taken only when something needs them (issue 10):

- a ``status`` or ``resources`` call whose last sample is older than it accepts
  (:meth:`ResourcesMixin.refresh_resources`; concurrent callers share one sample);
- a unit with ``max_memory`` in the config: every ``min(1 s, memory_grace / 2)``
  (at least every 0.25 s);
- telemetry enabled: every metric export interval (``OTEL_METRIC_EXPORT_INTERVAL``).

With none of these the loop waits for a state change or a reload and costs nothing.
After each sample the memory limits are checked: an instance whose tree's resident
memory stayed above ``max_memory`` for ``memory_grace`` seconds gets a
``hostvisor.service.memory_exceeded`` event and is restarted through the same path as a
health-check restart (:meth:`~supervisor.service.ServiceSupervisor.restart_for`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from supervisor import events as ev
from supervisor.events import EventBus, rfc3339
from supervisor.resources import NO_FIGURES, ContainerCounter, Figures, Sampler, Tree
from supervisor.service import Broadcast, ServiceSupervisor

if TYPE_CHECKING:
    from supervisor.drivers.base import Handle
    from supervisor.supervising import Supervisor

__all__ = ["ResourcesMixin", "Usage", "memory_interval"]

#: Bounds of the sampling interval a memory limit asks for (seconds).
_MEMORY_EVERY = (0.25, 1.0)
#: ``max_age`` of the ``resources`` method: default and bounds (seconds).
MAX_AGE = (1.0, 0.2, 60.0)


def memory_interval(grace: float) -> float:
    """Seconds between samples for a unit with ``memory_grace = grace``:
    ``min(1, grace / 2)``, at least 0.25."""
    return max(_MEMORY_EVERY[0], min(_MEMORY_EVERY[1], grace / 2))


class Usage:
    """What telemetry reports of one service (replaced wholesale after each sample).

    Attributes:
        figures: the service's summed figures (``NO_FIGURES`` when nothing runs).
        cpu_seconds: accumulated (user, system) CPU seconds of all its instances so far.
    """

    __slots__ = ("cpu_seconds", "figures")

    def __init__(self, figures: Figures, cpu_seconds: tuple[float, float]) -> None:
        self.figures = figures
        self.cpu_seconds = cpu_seconds


def _instances(sup: Supervisor) -> list[ServiceSupervisor]:
    """The ServiceSupervisors whose instances count for ``sup``: itself, or a job's runs."""
    runs = getattr(sup, "runs", None)
    if runs is not None:
        return [run.sup for run in runs]
    return [sup] if isinstance(sup, ServiceSupervisor) else []


def _key(sup: ServiceSupervisor, handle: Handle) -> Hashable:
    return (sup.spec.name, handle.container_id or handle.pid)


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"


class ResourcesMixin:
    """Resource figures for :class:`~supervisor.daemon.Daemon` (module docstring)."""

    supervisors: dict[str, Supervisor]
    bus: EventBus
    changed: Broadcast
    telemetry: Any
    docker_driver: Any
    _sampler: Sampler | None = None
    _containers: ContainerCounter | None = None
    _inflight: anyio.Event | None = None
    #: monotonic time of the last sample (-inf: none yet) and its wall time
    _sampled_at: float = -math.inf
    _sampled_wall: float = 0.0
    #: instance key -> its figures, from the last sample
    _figures: dict[Hashable, Figures] | None = None
    #: service -> accumulated (user, system) CPU seconds of its containers
    _container_cpu: dict[str, tuple[float, float]] | None = None
    #: instance key -> monotonic time its memory was first seen over the limit
    _over: dict[Hashable, float] | None = None
    #: service -> (its instances' keys, its fields) from the last sample, built on first use
    _fields: dict[str, tuple[tuple[Hashable, ...], dict[str, Any]]] | None = None
    #: id(handle) -> (the handle, its tree) of the process instances of the last sample
    _trees: dict[int, tuple[Any, Tree]] | None = None
    #: (the services mapping and its size) -> whether any unit has ``max_memory``
    _limited: tuple[int, int, float | None] = (0, -1, None)

    def _resolve(self, names: Any) -> list[str]:
        raise NotImplementedError

    # ------------------------------------------------------------ figures

    def resource_fields(self, name: str) -> dict[str, Any]:
        """The status-entry fields of service ``name``: ``cpu_percent``, ``memory_bytes``,
        ``processes`` (``null`` when no instance runs or none was sampled yet; a job sums
        its live runs) and ``gpu_memory_bytes`` when NVML works."""
        sup = self.supervisors[name]
        keys = tuple(_key(i, i.handle) for i in _instances(sup) if i.handle is not None)
        cache = self._fields = self._fields if self._fields is not None else {}
        known = cache.get(name)
        if known is not None and known[0] == keys:
            return known[1]  # the answer 200 entries need each second (`top`): built once
        fields = self._service_figures(sup).as_json()
        cache[name] = (keys, fields)
        return fields

    def _limit_interval(self) -> float | None:
        """Seconds between samples the units' memory limits ask for (the shortest
        :func:`memory_interval`), or None without any ``max_memory``: worked out again
        after a reload, not at every state change of every service."""
        services = getattr(getattr(self, "loaded", None), "services", None) or {}
        ident = (id(services), len(services))
        if self._limited[:2] != ident:
            graces = [s.memory_grace for s in services.values() if s.max_memory is not None]
            self._limited = (*ident, memory_interval(min(graces)) if graces else None)
        return self._limited[2]

    def _service_figures(self, sup: Supervisor) -> Figures:
        known = self._figures or {}
        total: Figures | None = None
        for inst in _instances(sup):
            handle = inst.handle
            figures = known.get(_key(inst, handle)) if handle is not None else None
            if figures is not None:
                total = figures if total is None else total + figures
        return total or NO_FIGURES

    def resources(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """The ``resources`` result: ``{"time": RFC 3339 of the sample, "services": {name:
        {"cpu_percent", "memory_bytes", "processes"}}}`` for ``names`` (default: every
        service). Raises UnknownService."""
        chosen = self._resolve(names if names else "all")
        wall = datetime.fromtimestamp(self._sampled_wall or time.time(), UTC)
        return {
            "time": rfc3339(wall),
            "services": {name: self.resource_fields(name) for name in chosen},
        }

    async def refresh_resources(self, max_age: float) -> None:
        """Sample every instance unless the last sample is at most ``max_age`` seconds old;
        callers arriving while a sample is taken share it. Never raises (a failed sample
        leaves the figures unknown). A process instance started since the last sample makes
        it stale whatever its age: its figures would be null while it runs."""
        if anyio.current_time() - self._sampled_at <= max_age and not self._unsampled():
            return
        if self._inflight is not None:
            await self._inflight.wait()
            return
        done = self._inflight = anyio.Event()
        try:
            await self._sample()
        except Exception:  # a bug here must cost figures, never the daemon
            logging.getLogger(__name__).warning("resource sample failed", exc_info=True)
            self._sampled_at = anyio.current_time()
        finally:
            self._inflight = None
            done.set()

    def _unsampled(self) -> bool:
        """Whether a process instance runs that the last sample did not see."""
        trees = self._trees or {}
        for sup in self.supervisors.values():
            for inst in _instances(sup):
                handle = inst.handle
                if handle is None or handle.container_id or handle.pid is None:
                    continue
                hit = trees.get(id(handle))
                if hit is None or hit[0] is not handle:
                    return True
        return False

    async def _sample(self) -> None:
        if self._sampler is None:
            from supervisor.gpu import gpu_memory_by_pid

            self._sampler = Sampler(gpu=gpu_memory_by_pid)
            self._containers = ContainerCounter()
        trees: list[Tree] = []
        containers: list[tuple[ServiceSupervisor, Any]] = []
        # A handle's tree never changes: kept from one sample to the next (by the handle
        # object itself, so that a recycled id() cannot match).
        cached, kept = self._trees or {}, {}
        for sup in list(self.supervisors.values()):
            for inst in _instances(sup):
                handle = inst.handle
                if handle is None:
                    continue
                hit = cached.get(id(handle))
                if hit is not None and hit[0] is handle:
                    kept[id(handle)] = hit
                    trees.append(hit[1])
                elif handle.container_id:
                    containers.append((inst, handle))
                elif handle.pid is not None:
                    pgid = int(getattr(handle, "pgid", None) or handle.pid)
                    run = getattr(handle, "run", "")
                    tree = Tree(key=_key(inst, handle), service=inst.name, run=run, pgid=pgid)
                    kept[id(handle)] = (handle, tree)
                    trees.append(tree)
        self._trees = kept
        found: dict[Hashable, Figures] = {}
        async with anyio.create_task_group() as tg:
            for inst, handle in containers:
                tg.start_soon(self._sample_container, inst, handle, found)
            if trees:
                found.update(await self._sampler.sample_async(trees) or {})
        self._figures = found
        self._fields = None
        self._sampled_at = anyio.current_time()
        self._sampled_wall = time.time()
        self._after_sample()

    async def _sample_container(
        self, sup: ServiceSupervisor, handle: Any, found: dict[Hashable, Figures]
    ) -> None:
        from supervisor.resources import container_figures

        driver = self.docker_driver
        stats = await driver.stats(handle.container_id) if driver is not None else None
        if stats is None or self._containers is None:
            return
        figures, used = container_figures(
            stats,
            container_id=handle.container_id,
            counter=self._containers,
            started_ns=getattr(handle, "started_ns", 0),
        )
        found[_key(sup, handle)] = figures
        cpu = self._container_cpu = self._container_cpu or {}
        user, system = cpu.get(sup.name, (0.0, 0.0))
        cpu[sup.name] = (user + used[0], system + used[1])

    def _after_sample(self) -> None:
        self._enforce_memory()
        if self.telemetry is not None:
            self.telemetry.update_resources(self.usage())

    def usage(self) -> dict[str, Usage]:
        """Per service: its figures and accumulated CPU seconds (for the metrics)."""
        procs = self._sampler.cpu_seconds if self._sampler is not None else {}
        boxes = self._container_cpu or {}
        return {
            name: Usage(self._service_figures(sup), procs.get(name) or boxes.get(name, (0.0, 0.0)))
            for name, sup in self.supervisors.items()
        }

    # ------------------------------------------------------------ max_memory

    def _enforce_memory(self) -> None:
        """Restart each instance whose tree stayed over ``max_memory`` for ``memory_grace``."""
        if self._limit_interval() is None and not self._over:
            return
        now = anyio.current_time()
        over = self._over if self._over is not None else {}
        still: dict[Hashable, float] = {}
        for sup in list(self.supervisors.values()):
            for inst in _instances(sup):
                limit, handle = inst.spec.max_memory, inst.handle
                if limit is None or handle is None:
                    continue
                key = _key(inst, handle)
                figures = (self._figures or {}).get(key)
                if figures is None or figures.memory_bytes is None:
                    if key in over:  # not known this time: the episode goes on
                        still[key] = over[key]
                    continue
                if figures.memory_bytes <= limit:
                    continue
                since = over.get(key, now)
                if now - since >= inst.spec.memory_grace and self._memory_restart(
                    inst, figures.memory_bytes, limit
                ):
                    continue
                still[key] = since
        self._over = still

    def _memory_restart(self, sup: ServiceSupervisor, size: int, limit: int) -> bool:
        grace = sup.spec.memory_grace
        reason = f"memory {_mib(size)} over max_memory {_mib(limit)}"
        if not sup.restart_for(f"restarted: {reason}"):
            return False
        handle = sup.handle
        self.bus.publish(
            ev.MEMORY_EXCEEDED,
            service=sup.name,
            message=f"{reason} for {grace:g}s: restarting",
            attributes={
                "hostvisor.memory.bytes": size,
                "hostvisor.memory.limit_bytes": limit,
                "hostvisor.memory.grace_s": grace,
                "process.pid": handle.pid if handle is not None else None,
            },
        )
        return True

    # ------------------------------------------------------------ the loop

    def _resource_interval(self) -> float | None:
        """Seconds between background samples, or ``None`` when nothing needs them."""
        every = [] if (limits := self._limit_interval()) is None else [limits]
        if self.telemetry is not None:
            every.append(float(getattr(self.telemetry, "metric_interval", 60.0)))
        return min(every) if every else None

    async def watch_resources(self) -> None:
        """Sample in the background while something needs it (module docstring); the
        units' limits are read again at every turn, so a reload takes effect. Runs until
        cancelled; never raises."""
        while True:
            interval = self._resource_interval()
            if interval is None:
                await self.changed.wait()
                continue
            left = self._sampled_at + interval - anyio.current_time()
            if left <= 0:
                await self.refresh_resources(0.0)
                continue
            with anyio.move_on_after(left):
                await self.changed.wait()
