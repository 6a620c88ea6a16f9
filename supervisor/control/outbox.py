"""What waits for a following client (``logs``/``events`` with ``follow``), bounded in bytes.

A follower that reads slowly must never back up the log hub or the event bus, nor
hold memory without bound. :func:`relay` moves each notification, encoded, into
the follower's :class:`Outbox` as soon as it arrives; the connection sends from
the outbox at the client's pace. An outbox holds at most :data:`FOLLOW_BUFFER`
bytes (the ``follow_buffer`` of :func:`supervisor.control.server.serve`), all the
outboxes of one server together at most :data:`FOLLOW_BUDGET` (their
:class:`Pool`); past that the oldest messages are skipped and counted, so a slow
client skips ahead and is told how much it missed.

Internal to :mod:`supervisor.control`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import anyio

from supervisor.control.protocol import encode

__all__ = ["FOLLOW_BUDGET", "FOLLOW_BUFFER", "Outbox", "Pool", "relay"]

#: Bytes of notifications held for one following client before the oldest are skipped.
FOLLOW_BUFFER = 256 * 1024
#: Bytes of notifications held for all following clients together (the same rule).
FOLLOW_BUDGET = 16 * 1024 * 1024


class Pool:
    """Bytes held by every outbox of one server, against one limit (bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def over(self) -> bool:
        """True while the outboxes together hold more than ``limit`` bytes."""
        return self.used > self.limit


class Outbox:
    """Encoded notifications waiting for one following client, bounded in bytes.

    ``put`` never blocks: past ``limit`` bytes (or while every outbox together
    holds more than ``pool.limit``) the oldest waiting messages are dropped and
    counted, the newest is always kept, so a slow client skips ahead.
    """

    def __init__(self, *, limit: int, pool: Pool) -> None:
        self._items: deque[bytes] = deque()
        self._limit = limit
        self._pool = pool
        self._ready = anyio.Event()
        self._ended = False
        self.size = 0
        self.skipped = 0

    def put(self, data: bytes) -> None:
        """Queue one encoded message (dropping the oldest past the limits)."""
        self._items.append(data)
        self._take(len(data))
        while len(self._items) > 1 and (self.size > self._limit or self._pool.over):
            self._take(-len(self._items.popleft()))
            self.skipped += 1
        self._ready.set()

    def _take(self, size: int) -> None:
        self.size += size
        self._pool.used += size

    def end(self) -> None:
        """No more messages: ``get`` raises EndOfStream once the waiting ones are sent."""
        self._ended = True
        self._ready.set()

    def discard(self) -> None:
        """Drop everything still waiting (the connection is gone)."""
        self._take(-self.size)
        self._items.clear()

    async def get(self) -> tuple[int, bytes]:
        """The next message, and how many were skipped just before it.

        Raises:
            anyio.EndOfStream: :meth:`end` was called and nothing waits.
        """
        while not self._items:
            if self._ended:
                raise anyio.EndOfStream
            self._ready = anyio.Event()
            await self._ready.wait()
        data = self._items.popleft()
        self._take(-len(data))
        skipped, self.skipped = self.skipped, 0
        return skipped, data


async def relay(messages: AsyncIterator[dict[str, Any]], outbox: Outbox) -> None:
    """Encode each of ``messages`` into ``outbox`` as soon as it comes; end it after."""
    try:
        async for message in messages:
            try:
                outbox.put(encode(message))
            except ValueError:  # NaN in an event attribute: JSON cannot carry it
                outbox.skipped += 1
    finally:
        outbox.end()
