"""An event whose ``anyio.Event`` is made only when a task waits on it.

Each service holds several events that are set far more often than waited on (a
supervisor's wake-up, a log writer's queue, an instance's end): an ``anyio.Event``
costs an ``asyncio.Event`` and its deque of waiters, about 0.4 KiB, from the start.
:class:`LazyEvent` is a drop-in for the three calls used (``set``, ``is_set``,
``wait``) and costs a small object until someone waits. :class:`Broadcast` (the
daemon's "something changed") makes its event only when a task waits, too.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel

__all__ = ["Broadcast", "LazyEvent"]


class LazyEvent:
    """A one-shot event, as ``anyio.Event``: once set it stays set."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<LazyEvent {'set' if self._set else 'unset'}>"

    def set(self) -> None:
        """Set it and wake every waiter."""
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        """Return once it is set (at once, after a checkpoint, if it already is)."""
        if self._set:
            await anyio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class Broadcast:
    """A level-triggered "something changed" signal many tasks can wait on."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None  # made by the first waiter after a fire

    def fire(self) -> None:
        """Wake every current waiter."""
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        """Return at the next :meth:`fire`."""
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()
