"""The steps before a spawn: wait for dependencies (compose's ``depends_on`` conditions),
run the preflight command, reclaim the port from a stale holder.

Each function takes the :class:`~supervisor.service.ServiceSupervisor` about to start and
returns why the start cannot go ahead (a message), or ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from supervisor import events as ev
from supervisor.errors import SpawnError
from supervisor.fdlimits import DAEMON_ERRNOS
from supervisor.states import DependencyCondition, Health, ServiceState

if TYPE_CHECKING:
    from supervisor.service import ServiceSupervisor

__all__ = ["prepare", "run_in_unit"]

S = ServiceState


async def prepare(sup: ServiceSupervisor) -> str | None:
    """Dependencies, preflight, port. Returns why the start cannot go ahead, or None."""
    await wait_dependencies(sup)
    if sup.spec.preflight is not None:
        failure = await preflight(sup)
        if failure:
            return failure
    if sup.spec.port is not None and sup.spec.kind == "process":
        return await reclaim_port(sup)
    return None


def daemon_trouble(exc: Exception) -> bool:
    """True for the daemon's own shortage (EMFILE, ENFILE, ENOMEM, ENOBUFS), which is not
    the service's failure."""
    return getattr(exc, "errno", None) in DAEMON_ERRNOS


async def wait_dependencies(sup: ServiceSupervisor) -> None:
    deps: Mapping[str, DependencyCondition] = sup.spec.depends_on
    while True:
        waiting = [_waiting_for(sup, name, cond) for name, cond in deps.items()
                   if not dep_ok(sup, name, cond)]  # fmt: skip
        if not waiting:
            return
        sup._set_message(f"waiting for {', '.join(waiting)}")
        await sup.changed.wait()


def _waiting_for(sup: ServiceSupervisor, name: str, condition: DependencyCondition) -> str:
    """``db (healthy)``; for a job whose last run failed, why it will not complete."""
    peer = sup._peers(name)
    failed = getattr(peer, "failed_run", None) if peer is not None else None
    if condition is DependencyCondition.COMPLETED and failed:
        return f"{name} (completed; its last run failed: {failed}; `hostvisor start {name}`)"
    return f"{name} ({condition})"


def dep_ok(sup: ServiceSupervisor, name: str, condition: DependencyCondition) -> bool:
    peer = sup._peers(name)
    if peer is None:
        # Not launched yet (the daemon launches units in name order; config checked that
        # every dependency exists): wait for it, it fires ``changed`` when it starts.
        return False
    if condition is DependencyCondition.COMPLETED:
        return bool(getattr(peer, "completed", False))  # a job (config checked)
    if condition is DependencyCondition.HEALTHY:
        return peer.state is S.RUNNING and peer.health in (Health.HEALTHY, Health.NONE)
    return peer.state is S.RUNNING or (peer.state is S.STARTING and peer.handle is not None)


async def run_in_unit(sup: ServiceSupervisor, argv: Sequence[str], timeout: float) -> Any:
    """Run a preflight or hook command in the unit's workdir and env (``timeout`` s)."""
    assert sup._run_command is not None
    return await sup._run_command(
        argv, cwd=sup.spec.workdir, env=sup.spec.env, service=sup.spec.name, timeout=timeout
    )


async def preflight(sup: ServiceSupervisor) -> str | None:
    spec = sup.spec.preflight
    assert spec is not None and sup._run_command is not None
    sup._set_message("preflight")
    try:
        result = await run_in_unit(sup, spec.command, spec.timeout)
    except (SpawnError, OSError) as exc:  # cannot even start it (EMFILE, ENOENT ...)
        sup._not_counted = daemon_trouble(exc)
        kind = type(exc).__name__
        sup._publish(ev.PREFLIGHT_FAILED, f"preflight: {exc}", **{"error.type": kind})
        return f"preflight: {exc}"
    if result.timed_out:
        why = f"preflight timed out after {spec.timeout:g}s"
    elif result.code != 0:
        why = (
            f"preflight failed: exit code {result.code}"
            if result.code is not None
            else (f"preflight killed by signal {result.signal}")
        )
    else:
        return None
    tail = result.tail(5)
    sup._publish(
        ev.PREFLIGHT_FAILED,
        f"{why}" + (f": {tail}" if tail else ""),
        **{"process.exit.code": result.code, "hostvisor.preflight.stderr": tail},
    )
    return why


async def reclaim_port(sup: ServiceSupervisor) -> str | None:
    from supervisor import ports

    port = sup.spec.port
    assert port is not None
    result = await ports.reclaim(
        port.number,
        policy=port.reclaim,
        service=sup.spec.name,
        known=sup._known,
        stop=sup.spec.stop,
    )
    for holder in result.killed:
        sup._publish(
            ev.PORT_RECLAIMED,
            f"port {port.number}: killed stale holder pid {holder.pid} ({holder.cmdline})",
            **{
                "process.pid": holder.pid,
                "hostvisor.port": port.number,
                "process.command_line": holder.cmdline,
            },
        )
    if result.free:
        return None
    blockers = ", ".join(f"pid {h.pid} ({h.cmdline})" for h in result.blocked) or "unknown"
    why = f"port {port.number} is held by {blockers}"
    sup._publish(
        ev.PORT_BLOCKED,
        why,
        **{
            "hostvisor.port": port.number,
            "process.pid": result.blocked[0].pid if result.blocked else None,
            "process.command_line": result.blocked[0].cmdline if result.blocked else None,
        },
    )
    return why
