"""The writer of one log: whole lines from the drains of :mod:`supervisor.logfiles`,
written in worker threads so that the event loop never waits for the disk."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from supervisor.lazyevent import LazyEvent
from supervisor.logfile import RotatingLog, WriteOutcome, count_lines
from supervisor.threads import ThreadPool

if TYPE_CHECKING:
    from supervisor.logfiles import LogDrops

__all__ = ["WRITER_LINGER", "WRITE_BACKLOG", "WRITE_STALL", "WRITE_THREADS", "LogWriter"]

#: Bytes of lines a drain queues for the writer thread; beyond, whole lines are dropped.
WRITE_BACKLOG = 4 << 20
#: Seconds without a completed write after which a full queue drops lines
#: instead of making the drains (and so the child) wait: a hung disk.
WRITE_STALL = 5.0
#: Worker threads writing log files, for all logs of a daemon together.
WRITE_THREADS = 4
#: Seconds a writer's task stays once its queue is empty, waiting for more lines: a quiet
#: log has no task, a chatty one keeps the same task.
WRITER_LINGER = 2.0

#: The threads that write logs: their own, so a hung disk never takes the default
#: pool (docker calls, /proc scans) with it.
_WRITERS = ThreadPool("log_writer", WRITE_THREADS)


class _Append:
    """One write handed to a worker thread; the writer takes it back until it begins."""

    def __init__(self, log: RotatingLog, data: bytes, marker: bytes) -> None:
        self.log, self.data, self.marker = log, data, marker
        self.lock = threading.Lock()
        self.started = self.taken_back = False
        self.done = threading.Event()

    def __call__(self) -> WriteOutcome | None:
        with self.lock:
            if self.taken_back:
                return None
            self.started = True
        try:
            return self.log.append(self.data, self.marker)
        finally:
            self.done.set()

    def take_back(self) -> bool:
        """True if no thread has begun it (and none will)."""
        with self.lock:
            self.taken_back = not self.started
            return self.taken_back


class LogWriter:
    """Takes whole lines from a log's drains and writes them in a worker thread.

    :meth:`put` never waits. Past ``backlog`` bytes queued, the drains wait in
    :meth:`room` for the disk (the child waits as it would for a synchronous
    write); once no write has completed for :data:`WRITE_STALL` seconds (a hung
    disk) they read on and whole lines are dropped, a gap (``None``) marking
    where. Used on the event loop.

    Its task (:meth:`run`) is started in ``task_group`` by the first :meth:`put`, and
    ends once nothing came for :data:`WRITER_LINGER` seconds (the next put starts it
    again); a writer whose task never ran writes what is queued in :meth:`finish`.
    """

    def __init__(
        self,
        log: RotatingLog,
        drops: LogDrops,
        backlog: int = WRITE_BACKLOG,
        *,
        task_group: TaskGroup | None = None,
    ) -> None:
        self.log, self.drops, self.backlog = log, drops, backlog
        self.task_group = task_group
        self._running = False  # a task runs (or is about to run) run()
        self._finished = False
        self._items: list[bytes | None] = []
        self._queued = 0
        self._wake = LazyEvent()
        self._taken = LazyEvent()
        self._closing = False
        self._stalled = False
        self._marker_due = False
        self._scope: anyio.CancelScope | None = None
        self._abandoned = False  # closing, a write was left hanging: drop the rest
        self._job: _Append | None = None  # the write handed to a thread

    async def room(self) -> None:
        """Wait while the queue is full and the disk is still taking writes."""
        while self._queued >= self.backlog and not self._stalled:
            with anyio.move_on_after(WRITE_STALL):
                await self._taken.wait()
                continue
            self._stalled = True

    def put(self, data: bytes) -> None:
        if self._stalled and self._queued + len(data) > self.backlog:
            why = f"the disk took no write for {WRITE_STALL:g} s"
            self.drops.dropped(self.log.path, len(data), count_lines(data), "backlog", why)
            if not self._items or self._items[-1] is not None:
                self._items.append(None)
            return
        self._items.append(data)
        self._queued += len(data)
        self._wake.set()
        if not self._running and self.task_group is not None:
            self._running = True
            self.task_group.start_soon(self.run)

    def close(self) -> None:
        """Write what is queued, then let :meth:`run` return; a write that takes longer
        than :data:`WRITE_STALL` seconds from now is abandoned (a hung disk must not
        keep the instance's drain alive) and the rest dropped."""
        self._closing = True
        self._wake.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, anyio.current_time() + WRITE_STALL)

    async def run(self) -> None:
        """Write what is queued until closed, or until nothing came for a while."""
        self._running = True
        lingered = False
        try:
            while self._items or not self._closing:
                if not self._items:
                    with anyio.move_on_after(WRITER_LINGER) as idle:
                        await self._wake.wait()
                    self._wake = LazyEvent()
                    quiet = idle.cancelled_caught and not self._items and not self._closing
                    if quiet and self.task_group is not None:
                        lingered = True  # the next put starts a task again
                        return
                    continue
                await self._write_queued()
        finally:
            self._running = False
            if not lingered:
                await self.finish()

    async def finish(self) -> None:
        """After :meth:`run` (or instead of it, if its task was cancelled before it began):
        cancelled (a stop, or `hostvisor reexec`, whose execve ends every thread), a
        write a thread has begun is waited for, then a last try for what is queued; both
        bounded. Done once."""
        if self._finished:
            return
        self._finished = True
        job, self._job = self._job, None
        if job is None and not self._items:
            return
        with anyio.move_on_after(1.0, shield=True):
            if job is not None:
                await anyio.to_thread.run_sync(job.done.wait, 1.0, abandon_on_cancel=True)
            if self._items:
                await self._write_queued()

    async def _write_queued(self) -> None:
        items, self._items, self._queued = self._items, [], 0
        self._taken.set()
        self._taken = LazyEvent()
        while items:  # runs of lines between the gaps (None) that mark dropped lines
            gap = next((i for i, item in enumerate(items) if item is None), len(items))
            data, rest = b"".join(items[:gap]), items[gap:]  # type: ignore[arg-type]
            try:
                if data:
                    await self._write(data)
            except anyio.get_cancelled_exc_class():
                # What no thread has begun to write stays queued (see run).
                job = self._job
                if job is not None and job.take_back():
                    self._job = None
                    self._marker_due = self._marker_due or bool(job.marker)
                    rest = [data, *rest]
                self._items[:0] = rest
                self._queued += sum(len(item) for item in rest if item is not None)
                raise
            if rest:
                self._marker_due = True
            items = rest[1:]

    async def _write(self, data: bytes) -> None:
        marker = self.drops.marker() if self._marker_due else b""
        why = f"the disk took no write for {WRITE_STALL:g} s"
        outcome = WriteOutcome(len(data), count_lines(data), "backlog", why)
        if not self._abandoned:
            self._job = job = _Append(self.log, data, marker)
            with anyio.CancelScope() as self._scope:
                if self._closing:
                    self._scope.deadline = anyio.current_time() + WRITE_STALL
                result = await anyio.to_thread.run_sync(
                    job, abandon_on_cancel=True, limiter=_WRITERS.limiter()
                )
                outcome = result if result is not None else outcome
            self._job = None
            self._abandoned = self._scope.cancelled_caught
            self._scope = None
        self._stalled = False
        if outcome.marked:
            self.drops.marked()
        if outcome.error:
            path, nbytes, nlines = self.log.path, outcome.dropped_bytes, outcome.dropped_lines
            self.drops.dropped(path, nbytes, nlines, outcome.error, outcome.message)
            self._marker_due = True
        elif self._marker_due:
            self._marker_due = False
            self.drops.resumed(self.log.path)
