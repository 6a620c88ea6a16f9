"""Worker-thread pools of the daemon's own, one per kind of blocking work, so that one kind
(a hung disk, a slow ``/proc``) can never take the others' threads with it."""

from __future__ import annotations

import anyio
from anyio.lowlevel import RunVar

__all__ = ["ThreadPool"]


class ThreadPool:
    """A named :class:`anyio.CapacityLimiter` of ``capacity`` threads, one per event loop
    (a ``RunVar``: each ``anyio.run`` gets its own, as tests and benchmarks need).

    Args:
        name: for the ``RunVar`` and for people.
        capacity: worker threads at most at once.
    """

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self._var: RunVar[anyio.CapacityLimiter] = RunVar(f"hostvisor_{name}_threads")

    def __repr__(self) -> str:
        return f"<ThreadPool {self.name}: {self.capacity} threads>"

    def limiter(self) -> anyio.CapacityLimiter:
        """This event loop's limiter (created on first use)."""
        try:
            return self._var.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self.capacity)
            self._var.set(limiter)
            return limiter
