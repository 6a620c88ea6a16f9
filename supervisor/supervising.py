"""What the daemon needs of a supervisor, whichever kind it is: a
:class:`~supervisor.service.ServiceSupervisor` (a service kept up) or a
:class:`~supervisor.job.JobSupervisor` (a job's runs). Status, commands, reload,
shutdown and the state file see only this surface.
"""

from __future__ import annotations

from typing import Any, Protocol

import anyio

from supervisor.drivers.base import Handle
from supervisor.spec import ServiceSpec
from supervisor.states import ExitStatus, Health, ServiceState

__all__ = ["Supervisor"]


class Supervisor(Protocol):
    """One unit's supervisor, as the daemon drives it."""

    spec: ServiceSpec
    health: Health
    message: str
    last_exit: ExitStatus | None
    adopted: bool

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> ServiceState: ...
    @property
    def handle(self) -> Handle | None: ...
    @property
    def restarts(self) -> int: ...
    @property
    def spec_digest(self) -> str: ...

    def live_handles(self) -> list[Handle]: ...
    def command_start(self) -> int: ...
    def command_stop(self) -> int: ...
    def command_restart(self) -> int: ...
    async def wait_settled(self, gen: int, targets: frozenset[ServiceState]) -> None: ...
    def status_entry(self) -> dict[str, Any]: ...
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = ...) -> None: ...
