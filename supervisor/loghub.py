"""Live followers of the logs (``hostvisor logs -f``): fan-out that never blocks a drain.

A drain publishes each chunk's lines to a :class:`LogHub` only while someone
follows that log; each follower (:class:`LogFollower`) holds a bounded queue
and skips ahead, with a note, when its reader is too slow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ObjectReceiveStream

__all__ = [
    "FOLLOW_BUFFER",
    "FOLLOW_LINE_MAX",
    "LogFollower",
    "LogHub",
]

#: Bytes of lines a follower (``logs -f``) holds before it skips ahead.
FOLLOW_BUFFER = 1 << 20
#: Characters of one line a follower receives (the control server's cut too).
FOLLOW_LINE_MAX = 64 << 10
#: Bytes a follower's queue counts per line on top of its characters.
_LINE_OVERHEAD = 64


class LogFollower(ObjectReceiveStream[str]):
    """One follower's lines, bounded in bytes: a slow reader skips ahead.

    When a new line would take the queue over ``max_bytes`` (characters plus
    64 per line), the oldest lines are discarded, and the reader's next line
    is ``[hostvisor: N lines skipped, follower too slow]``. Lines are cut at
    :data:`FOLLOW_LINE_MAX` characters.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.skipped = 0
        self._lines: deque[str] = deque()
        self._bytes = 0
        self._unreported = 0
        self._closed = False
        self._wake = anyio.Event()

    def __repr__(self) -> str:
        return f"<LogFollower {len(self._lines)} lines, {self._bytes}/{self.max_bytes} bytes>"

    @property
    def queued_bytes(self) -> int:
        """Bytes held for the reader (characters plus 64 per line); at most ``max_bytes``
        plus one line."""
        return self._bytes

    def offer(self, line: str) -> int:
        """Queue ``line``; never blocks. Returns the number of old lines discarded."""
        line = line[:FOLLOW_LINE_MAX]
        cost = len(line) + _LINE_OVERHEAD
        skipped = 0
        while self._lines and self._bytes + cost > self.max_bytes:
            self._bytes -= len(self._lines.popleft()) + _LINE_OVERHEAD
            skipped += 1
        self._lines.append(line)
        self._bytes += cost
        self._unreported += skipped
        self.skipped += skipped
        self._wake.set()
        return skipped

    def receive_nowait(self) -> str:
        """The next line, or raise ``anyio.WouldBlock`` / ``anyio.EndOfStream``."""
        if self._unreported:
            count, self._unreported = self._unreported, 0
            return f"[hostvisor: {count} lines skipped, follower too slow]"
        if self._lines:
            line = self._lines.popleft()
            self._bytes -= len(line) + _LINE_OVERHEAD
            return line
        if self._closed:
            raise anyio.EndOfStream
        raise anyio.WouldBlock

    async def receive(self) -> str:
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                await self._wake.wait()
                self._wake = anyio.Event()

    async def aclose(self) -> None:
        self._closed = True
        self._wake.set()


class LogHub:
    """Live followers of service logs (key: the service name) and the daemon log (key ``None``).

    A publisher never blocks; a follower holds at most ``max_bytes`` of lines
    and skips ahead when it falls behind (see :class:`LogFollower`); lines
    skipped by all followers are counted in :attr:`dropped`.
    """

    def __init__(self) -> None:
        self._subscribers: dict[str | None, set[LogFollower]] = {}
        self.dropped = 0

    def __repr__(self) -> str:
        count = sum(len(s) for s in self._subscribers.values())
        return f"<LogHub subscribers={count} dropped={self.dropped}>"

    def has_subscribers(self, key: str | None) -> bool:
        """True if anyone follows ``key`` (cheap; drains check it for every chunk)."""
        return bool(self._subscribers.get(key))

    def publish(self, key: str | None, lines: Sequence[str]) -> None:
        """Hand ``lines`` (without newlines) to every follower of ``key``; never blocks."""
        for follower in tuple(self._subscribers.get(key, ())):
            for line in lines:
                self.dropped += follower.offer(line)

    @asynccontextmanager
    async def subscribe(
        self, key: str | None, *, max_bytes: int = FOLLOW_BUFFER
    ) -> AsyncIterator[LogFollower]:
        """Receive every line published for ``key`` while the context is open.

        Args:
            key: a service name, or ``None`` for the daemon log.
            max_bytes: bytes of lines held for a slow reader before it skips ahead.

        Yields:
            A :class:`LogFollower` (an ``ObjectReceiveStream[str]``: ``async for line in it``).
        """
        follower = LogFollower(max_bytes)
        self._subscribers.setdefault(key, set()).add(follower)
        try:
            yield follower
        finally:
            followers = self._subscribers.get(key)
            if followers is not None:
                followers.discard(follower)
                if not followers:
                    del self._subscribers[key]
            await follower.aclose()
