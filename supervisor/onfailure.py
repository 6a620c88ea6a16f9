"""``[on_failure]``: the command run when a job's run fails or times out, or a service
goes FATAL (systemd's ``OnFailure=``; cron's ``MAILTO``).

The hook runs in the unit's workdir with the unit's environment plus, as systemd passes
``$SERVICE_RESULT``/``$EXIT_CODE``/``$EXIT_STATUS`` to ``ExecStopPost=``:

- ``HOSTVISOR_SERVICE``: the unit's name;
- ``HOSTVISOR_EXIT_CODE``: the exit code (``""`` when it ended by a signal or never ran);
- ``HOSTVISOR_EXIT_SIGNAL``: the signal's name (``SIGKILL``), or ``""``;
- ``HOSTVISOR_MESSAGE``: what happened, with the unit's secrets redacted.

It is bounded by its ``timeout`` (its process group is killed then). Its own failure is a
``hostvisor.on_failure.failed`` event, never another hook; and one unit runs at most one
hook at a time (a failure while its hook still runs is logged in that event's place, not
queued), so a job failing every second cannot pile hooks up.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any

from supervisor import events as ev
from supervisor.errors import SpawnError
from supervisor.events import EventBus
from supervisor.spec import ServiceSpec
from supervisor.states import ExitStatus

__all__ = ["FailureHooks", "hook_env"]

CommandRunner = Callable[..., Awaitable[Any]]


def hook_env(spec: ServiceSpec, status: ExitStatus | None, message: str) -> dict[str, str]:
    """The hook's environment: the unit's ``env`` plus the variables of the module
    docstring (``message`` already redacted)."""
    code = "" if status is None or status.code is None else str(status.code)
    sig = ""
    if status is not None and status.signal is not None:
        try:
            sig = signal.Signals(status.signal).name
        except ValueError:
            sig = str(status.signal)
    return {
        **spec.env,
        "HOSTVISOR_SERVICE": spec.name,
        "HOSTVISOR_EXIT_CODE": code,
        "HOSTVISOR_EXIT_SIGNAL": sig,
        "HOSTVISOR_MESSAGE": message,
    }


class FailureHooks:
    """Runs ``[on_failure]`` hooks, at most one per unit at a time.

    Args:
        run_command: :meth:`supervisor.drivers.process.ProcessDriver.run_command`.
        bus: where ``hostvisor.on_failure.failed`` goes (its redactor also cleans the
            message passed to the hook).
        spawn: starts a background task (the daemon's task group ``start_soon``).
    """

    def __init__(
        self,
        *,
        run_command: CommandRunner,
        bus: EventBus,
        spawn: Callable[..., object],
    ) -> None:
        self._run_command = run_command
        self._bus = bus
        self._spawn = spawn
        self._running: set[str] = set()

    def __repr__(self) -> str:
        return f"<FailureHooks running={sorted(self._running)}>"

    def fire(self, spec: ServiceSpec, status: ExitStatus | None, message: str) -> None:
        """Run ``spec``'s hook (if it has one) in the background for this failure."""
        if spec.on_failure is None:
            return
        if spec.name in self._running:
            self._failed(spec, f"on_failure skipped: the previous hook still runs ({message})")
            return
        self._running.add(spec.name)
        self._spawn(self._run, spec, status, self._bus.redactor(message))

    async def _run(self, spec: ServiceSpec, status: ExitStatus | None, message: str) -> None:
        hook = spec.on_failure
        assert hook is not None
        try:
            result = await self._run_command(
                hook.command,
                cwd=spec.workdir,
                env=hook_env(spec, status, message),
                service=spec.name,
                timeout=hook.timeout,
            )
        except (SpawnError, OSError) as exc:
            self._failed(spec, f"on_failure: {exc}", kind=type(exc).__name__)
            return
        finally:
            self._running.discard(spec.name)
        if result.timed_out:
            self._failed(spec, f"on_failure timed out after {hook.timeout:g}s", kind="timeout")
        elif not result.ok:
            tail = result.tail(5)
            why = f"on_failure failed: {result.describe()}" + (f": {tail}" if tail else "")
            self._failed(spec, why, code=result.code)

    def _failed(
        self, spec: ServiceSpec, message: str, *, kind: str = "", code: int | None = None
    ) -> None:
        attributes: dict[str, Any] = {}
        if kind:
            attributes["error.type"] = kind
        if code is not None:
            attributes["process.exit.code"] = code
        self._bus.publish(
            ev.ON_FAILURE_FAILED, service=spec.name, message=message, attributes=attributes
        )
