"""Stop order: dependents first, as systemd orders stop jobs in reverse of ``After=``.
Used by shutdown, by reload (changed and removed units) and by the last line of defence."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio

from supervisor.spec import ServiceSpec

__all__ = ["dependents_of", "in_stop_order"]


def dependents_of(services: Mapping[str, ServiceSpec]) -> dict[str, set[str]]:
    """name -> the services that depend on it."""
    dependents: dict[str, set[str]] = {name: set() for name in services}
    for name, spec in services.items():
        for dep in spec.depends_on:
            if dep in dependents:
                dependents[dep].add(name)
    return dependents


async def in_stop_order(
    names: Sequence[str],
    services: Mapping[str, ServiceSpec],
    stop: Callable[[str], Awaitable[None]],
) -> None:
    """Run ``stop(name)`` for every name, concurrently, but each only after the named
    services that depend on it (by ``services``' ``depends_on``) are done: dependents
    first, as systemd orders stop jobs in reverse of ``After=``."""
    dependents = dependents_of(services)
    done = {name: anyio.Event() for name in names}

    async def one(name: str) -> None:
        try:
            for other in dependents.get(name, ()):
                if other in done:
                    await done[other].wait()
            await stop(name)
        finally:
            done[name].set()

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(one, name)
