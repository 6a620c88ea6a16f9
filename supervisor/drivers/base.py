"""The protocol every driver satisfies, so that a service supervisor does not care
whether it keeps a process or a container alive.

A :class:`Driver` starts (or adopts) one instance of a service and returns a
:class:`Handle`; the handle waits for that instance to end and stops it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from anyio.abc import TaskGroup

from supervisor.spec import ServiceSpec, StopSpec
from supervisor.states import ExitStatus

__all__ = ["Driver", "Handle"]


@runtime_checkable
class Handle(Protocol):
    """One running instance of a service."""

    @property
    def pid(self) -> int | None:
        """The main process id (a container's init pid on the host, if known)."""
        ...

    @property
    def container_id(self) -> str | None:
        """The container id, or ``None`` for a process."""
        ...

    async def wait(self) -> ExitStatus:
        """Return how the instance ended, once it has; may be called many times.

        A process has ended when its main process (the group leader) has, as with
        systemd's main process; :meth:`stop` then stops what is left of it.
        """
        ...

    async def stop(self, stop: StopSpec) -> ExitStatus:
        """Send ``stop.signal``, wait ``stop.timeout`` seconds, then kill; return the exit.

        Idempotent: stopping an ended instance returns its exit status as soon as what is
        left of it (a process's group members and marked escapees) is gone.
        """
        ...

    async def send_signal(self, sig: int, *, group: bool = False) -> bool:
        """Send ``sig`` to the main process, or with ``group`` to its whole process group
        (``killpg(2)``); a container's goes through the engine (``docker kill --signal``)
        to its main process, with or without ``group``. Never reaches a reused pid.

        Returns:
            True if sent; False once the instance has ended (nothing is sent).

        Raises:
            DriverError: the engine refused or did not answer (containers).
        """
        ...


class Driver(Protocol):
    """Starts instances of one kind of service."""

    @property
    def connected(self) -> bool:
        """False while the driver's engine is unreachable (a Docker outage): nothing the
        service does then counts (health results, failed starts). Always True for processes."""
        ...

    async def start(self, spec: ServiceSpec, *, task_group: TaskGroup) -> Handle:
        """Start one instance of ``spec``; helper tasks (log drains) run in ``task_group``.

        Cancelled midway, it leaves no instance running untracked (a container whose
        start was under way ends stopped).

        Raises:
            SpawnError: the instance could not be started (errno and path in the message).
            DriverError: the driver cannot work right now (e.g. Docker unreachable).
        """
        ...

    async def adopt(self, spec: ServiceSpec, *, task_group: TaskGroup) -> Handle | None:
        """Return a handle on an instance that already runs (a container that outlived
        the daemon), or ``None``: processes are never adopted."""
        ...
