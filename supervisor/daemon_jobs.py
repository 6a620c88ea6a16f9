"""The daemon's side of jobs and failure hooks: which supervisor a unit gets, the jobs'
history file (:mod:`supervisor.jobledger`) and the ``[on_failure]`` hooks
(:mod:`supervisor.onfailure`); kept out of :mod:`supervisor.daemon` to keep it small."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyio.abc import TaskGroup

from supervisor.drivers.base import Driver
from supervisor.drivers.process import ProcessDriver
from supervisor.events import EventBus
from supervisor.service import Broadcast, ServiceSupervisor
from supervisor.spec import Loaded, ServiceSpec

if TYPE_CHECKING:
    from supervisor.jobledger import JobLedger
    from supervisor.onfailure import FailureHooks
    from supervisor.supervising import Supervisor

__all__ = ["ChangeMark", "JobsMixin"]


class ChangeMark(Broadcast):
    """The daemon's shared ``changed`` broadcast as one supervisor holds it: a fire also
    adds the supervisor's name to ``marks`` (``Daemon.changed_names``), so that the
    state-file writer snapshots only the supervisors that changed."""

    def __init__(self, shared: Broadcast, marks: set[str], name: str) -> None:
        # No event of its own: waiting and firing are the shared broadcast's.
        self._shared, self._marks, self._name = shared, marks, name

    def fire(self) -> None:
        """Mark this supervisor changed and wake every waiter of the shared broadcast."""
        self._marks.add(self._name)
        self._shared.fire()

    async def wait(self) -> None:
        """Return at the next fire of the shared broadcast (any supervisor's)."""
        await self._shared.wait()


class JobsMixin:
    """Builds each unit's supervisor for :class:`~supervisor.daemon.Daemon`."""

    loaded: Loaded
    state_dir: Path
    bus: EventBus
    changed: Broadcast
    changed_names: set[str]
    process_driver: ProcessDriver
    supervisors: dict[str, Supervisor]
    _tg: TaskGroup | None
    _rng: random.Random
    _hooks: FailureHooks | None = None
    _ledger: JobLedger | None = None

    def _driver_for(self, spec: ServiceSpec) -> Driver:
        raise NotImplementedError

    def _on_probe(self, service: str, seconds: float, ok: bool) -> None:
        raise NotImplementedError

    def _supervisor_crashed(self, service: str, message: str, exc: BaseException) -> None:
        raise NotImplementedError

    def log_line(self, level: str, message: str) -> None:
        raise NotImplementedError

    @property
    def hooks(self) -> FailureHooks:
        """The ``[on_failure]`` runner (made at first use; its hooks run in the daemon's
        task group)."""
        if self._hooks is None:
            from supervisor.onfailure import FailureHooks

            def spawn(func: Any, *args: Any) -> None:
                if self._tg is not None:
                    self._tg.start_soon(func, *args)

            self._hooks = FailureHooks(
                run_command=self.process_driver.run_command, bus=self.bus, spawn=spawn
            )
        return self._hooks

    def job_ledger(self) -> JobLedger:
        """``<state>/jobs.json`` (loaded at first use, when the first job is built; its
        writer runs in the daemon's task group)."""
        if self._ledger is None:
            from supervisor.jobledger import JobLedger, ledger_path

            self._ledger = JobLedger(
                ledger_path(self.state_dir), warn=lambda line: self.log_line("warning", line)
            )
            if self._tg is not None:
                self._tg.start_soon(self._ledger.run)
        return self._ledger

    def flush_jobs(self) -> None:
        """Write the jobs' history now (at shutdown and before a re-exec); blocking."""
        if self._ledger is not None:
            self._ledger.forget({n for n, s in self.loaded.services.items() if s.is_job})
            self._ledger.flush()

    def _make_supervisor(self, spec: ServiceSpec) -> Supervisor:
        """A :class:`~supervisor.job.JobSupervisor` for a job, else a
        :class:`~supervisor.service.ServiceSupervisor`."""
        common: dict[str, Any] = {
            "driver": self._driver_for(spec),
            "bus": self.bus,
            "peers": self.supervisors.get,
            "changed": ChangeMark(self.changed, self.changed_names, spec.name),
            "run_command": self.process_driver.run_command,
            "rng": self._rng,
            "on_probe": self._on_probe,
            "on_crash": self._supervisor_crashed,
        }
        if spec.is_job:
            from supervisor.job import JobSupervisor

            return JobSupervisor(
                spec, on_failure=self.hooks.fire, ledger=self.job_ledger(), **common
            )
        return ServiceSupervisor(spec, on_fatal=self.hooks.fire, **common)
