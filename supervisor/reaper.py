"""Reaping orphaned descendants without stealing a tracked child's exit status.

On Linux the daemon makes itself a *child subreaper* (``prctl(2)``,
``PR_SET_CHILD_SUBREAPER``): a process that a service's leader leaves behind
(a worker of a group whose leader exited, a daemonized grandchild) is
reparented to the daemon instead of to init. Its exit then raises SIGCHLD
here, and until it is reaped its zombie keeps its process group number in use,
which is what lets the process driver say "no process of the group remains"
(``killpg(pgid, 0)`` fails with ESRCH) only once every member really is gone.

Who reaps what:

- the :class:`~supervisor.drivers.process.ProcessDriver` reaps the children it
  spawned (it waits on a pidfd, then ``waitpid``) and :meth:`Reaper.track` them;
- the :class:`Reaper` reaps every other child of the daemon (orphans
  reparented to it) and never calls ``waitpid`` on a tracked pid, so a
  service's exit status always reaches its driver.

Both run in the event-loop thread, and the driver tracks a pid right after
``Popen`` returns, with no await in between: the reaper cannot see a new child
before it is tracked. Nothing in the daemon may spawn through
``anyio.open_process`` or asyncio subprocesses (their child watchers would race
this reaper) or through ``subprocess`` in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence

import anyio
import anyio.from_thread
import anyio.lowlevel
import psutil
from anyio.abc import TaskStatus

__all__ = [
    "Reaper",
    "WaitThread",
    "child_pids",
    "find_marked",
    "open_pidfd",
    "scan_marked",
    "signal_verified",
    "wait_gone",
    "waitpid_blocking",
]

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _has_children_file() -> bool:
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


#: ``/proc/<pid>/task/<tid>/children`` needs ``CONFIG_PROC_CHILDREN`` (Linux only).
_HAVE_CHILDREN_FILE = _has_children_file()


def _read_small(path: str) -> bytes:
    """The whole of a ``/proc`` file: read until EOF, as a ``seq_file`` (``children``)
    hands out at most a page per read (about 680 pids of 1,000 children otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _children_from_proc(pid: int) -> list[int]:
    # A child is listed under the thread that forked it (or that adopted it).
    pids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pids  # gone
    for tid in tids:
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            pids.extend(map(int, _read_small(f"/proc/{pid}/task/{tid}/children").split()))
    return pids


def child_pids(pid: int | None = None) -> list[int]:
    """Pids of the direct children of ``pid`` (default: this process), zombies included.

    Reads ``/proc/<pid>/task/*/children`` (``proc(5)``), else asks psutil
    (which scans every process). Returns ``[]`` for a process that is gone.
    """
    pid = os.getpid() if pid is None else pid
    if _HAVE_CHILDREN_FILE:
        return _children_from_proc(pid)
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=False)]
    except psutil.Error:
        return []


class Reaper:
    """Reaps untracked children on every SIGCHLD and tells waiters that it did.

    Use::

        reaper = Reaper()
        reaper.enable_subreaper()
        await task_group.start(reaper.run)
        driver = ProcessDriver(state_dir=..., reaper=reaper)
    """

    def __init__(self) -> None:
        self._tracked: set[int] = set()
        #: The tracked zombie that hid the others from the last peek (see :meth:`reap`).
        self._blocked_by: int | None = None
        self._reaped = anyio.Event()
        self.reaped_count = 0
        self.subreaper = False

    def __repr__(self) -> str:
        return (
            f"<Reaper tracked={len(self._tracked)} reaped={self.reaped_count} "
            f"subreaper={self.subreaper}>"
        )

    def enable_subreaper(self) -> bool:
        """Make this process a child subreaper (Linux ``prctl(PR_SET_CHILD_SUBREAPER, 1)``).

        Returns:
            True if it is now one; False on other systems or if the call failed.
        """
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ok = bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
        except (OSError, AttributeError):
            ok = False
        self.subreaper = ok
        return ok

    def disable_subreaper(self) -> None:
        """Undo :meth:`enable_subreaper` (tests; a daemon keeps it for its lifetime)."""
        if self.subreaper:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            self.subreaper = False

    def track(self, pid: int) -> None:
        """Leave ``pid`` alone: its spawner reaps it and needs its exit status."""
        self._tracked.add(pid)

    def untrack(self, pid: int) -> None:
        """Forget ``pid`` (call after reaping it). If a tracked zombie hid other zombies
        from the last reap, reap again now (and wake the waiters if that reaped any)."""
        self._tracked.discard(pid)
        if self._blocked_by is not None:
            self._blocked_by = None
            if self.reap():
                self._notify()

    def is_tracked(self, pid: int) -> bool:
        """True while ``pid`` is tracked."""
        return pid in self._tracked

    def reaped_event(self) -> anyio.Event:
        """The event set after the next SIGCHLD has been handled.

        Take it *before* checking a condition, then wait on it: a reap that
        happens after the check sets it, so no wake-up is lost.
        """
        return self._reaped

    async def wait_reaped(self) -> None:
        """Wait until the next SIGCHLD has been handled (untracked zombies reaped)."""
        await self._reaped.wait()

    def reap(self) -> list[tuple[int, int]]:
        """Reap every untracked zombie child now; never blocks. Those hidden behind a
        tracked zombie (``waitid`` shows one at a time) are reaped once it is untracked,
        or by the next call that finds the same tracked zombie still there.

        Returns:
            ``(pid, wait status)`` of each child reaped.
        """
        done: list[tuple[int, int]] = []
        while True:
            # Peek (WNOWAIT) at one zombie child: none means nothing to do.
            try:
                peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                peek = None
            if peek is None or peek.si_pid == 0:  # macOS fills in a zero pid
                self._blocked_by = None
                break
            if peek.si_pid in self._tracked:
                # A tracked zombie hides the others from waitid. Its spawner reaps it
                # soon, and untrack() then reaps again: no list of our 1,000 children
                # (~0.3 ms) at every restart. The same one still there at the next
                # SIGCHLD: scan them all.
                if self._blocked_by == peek.si_pid:
                    done.extend(self._reap_scan())
                self._blocked_by = peek.si_pid
                break
            got = self._reap_one(peek.si_pid)
            if got is None:
                break
            done.append(got)
        self.reaped_count += len(done)
        return done

    @staticmethod
    def _reap_one(pid: int) -> tuple[int, int] | None:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        return (got, status) if got else None

    def _reap_scan(self) -> list[tuple[int, int]]:
        done = []
        for pid in set(child_pids()) - self._tracked:
            got = self._reap_one(pid)
            if got is not None:
                done.append(got)
        return done

    def _notify(self) -> None:
        event, self._reaped = self._reaped, anyio.Event()
        event.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reap on every SIGCHLD until cancelled; reaps once at the start.

        Reports readiness through ``task_status`` once the signal handler is
        installed, so that no SIGCHLD after ``await tg.start(reaper.run)`` is missed.
        """
        with anyio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.reap()
            self._notify()
            task_status.started()
            async for _ in signals:
                self.reap()
                self._notify()


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (``pidfd_open(2)``, Linux >= 5.3), or ``None`` where unsupported.

    Raises:
        ProcessLookupError: no process has that pid.
    """
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except ProcessLookupError:
        raise
    except OSError:  # ENOSYS on old kernels, EINVAL...
        return None
    return fd


def signal_verified(proc: psutil.Process, sig: int) -> bool:
    """Send ``sig`` to ``proc`` only if it is still the process psutil saw.

    Opens a pidfd first, then checks that the pid's start time still matches
    (``is_running``): if it does, the pidfd names that very process, and the
    signal goes through it (``pidfd_send_signal(2)``), never to a reused pid.
    Without pidfds, falls back to ``kill`` right after the check.

    Returns:
        True if the signal was sent.
    """
    try:
        fd = open_pidfd(proc.pid)
    except ProcessLookupError:
        return False
    try:
        if not proc.is_running():
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(proc.pid, sig)
        return True
    except (ProcessLookupError, PermissionError, psutil.Error):
        return False
    finally:
        if fd is not None:
            os.close(fd)


async def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` seconds for every process in ``procs`` to exit.

    Uses pidfds (readable at exit, no polling) where available, else psutil's
    ``wait_procs`` in a worker thread.

    Returns:
        The processes still running at the deadline.
    """
    watched: list[tuple[psutil.Process, int]] = []
    others: list[psutil.Process] = []
    for proc in procs:
        try:
            fd = open_pidfd(proc.pid)
        except ProcessLookupError:
            continue
        if fd is None:
            others.append(proc)
        elif not proc.is_running():
            os.close(fd)
        else:
            watched.append((proc, fd))
    try:
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                for _, fd in watched:
                    tg.start_soon(_wait_readable, fd)
                if others:
                    await anyio.to_thread.run_sync(
                        lambda: psutil.wait_procs(others, timeout=timeout),
                        abandon_on_cancel=True,
                    )
    finally:
        for _, fd in watched:
            os.close(fd)
    return [p for p in procs if _alive(p)]


async def _wait_readable(fd: int) -> None:
    await anyio.wait_readable(fd)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def find_marked(
    roots: Sequence[int],
    key: str,
    value: str,
    *,
    skip_pgid: int | None = None,
    also: Mapping[str, str] | None = None,
) -> list[psutil.Process]:
    """Processes in the trees under ``roots`` (roots included) whose environment has
    ``key=value`` (and every item of ``also``), except members of process group
    ``skip_pgid``.

    The process driver uses it to find descendants that left a service's
    group (``setsid``) but carry its ``HOSTVISOR_SERVICE`` marker. Reads
    ``/proc`` (a few files per descendant); processes whose environment cannot
    be read are left out.
    """
    found: list[psutil.Process] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(child_pids(pid))
        try:
            if skip_pgid is not None and os.getpgid(pid) == skip_pgid:
                continue  # still in the group: signalled with it
            proc = psutil.Process(pid)
            environ = proc.environ()
            if environ.get(key) == value and all(
                environ.get(k) == v for k, v in (also or {}).items()
            ):
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def scan_marked(scope: str) -> dict[str, list[psutil.Process]]:
    """Every live process of our uid whose environment has ``HOSTVISOR_STATE_DIR=scope``,
    by its ``HOSTVISOR_SERVICE`` value (one pass over ``/proc``; blocking)."""
    found: dict[str, list[psutil.Process]] = {}
    uid, me = os.getuid(), os.getpid()
    for proc in _maybe_marked(scope):
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if uid != 0 and proc.uids().real != uid:
                continue
            env = proc.environ()
            name = env.get("HOSTVISOR_SERVICE")
            if name and env.get("HOSTVISOR_STATE_DIR") == scope and proc.status() != "zombie":
                found.setdefault(name, []).append(proc)
    return found


def _maybe_marked(scope: str) -> Iterator[psutil.Process]:
    """The processes whose raw ``/proc/PID/environ`` holds ``HOSTVISOR_STATE_DIR=scope``
    (a superset of the marked ones: the caller still checks the parsed environment);
    every process where there is no ``/proc``. The raw read costs ~6 µs a process, a
    ``psutil`` environment ~30 µs: with 2,000 processes on the host, 14 ms against 70 ms
    before the first spawn of a start-up."""
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    if not names:
        yield from psutil.process_iter()
        return
    needle = b"HOSTVISOR_STATE_DIR=" + os.fsencode(scope)
    for name in names:
        if not name.isdigit():
            continue
        if needle in _read_environ(name):
            with contextlib.suppress(psutil.Error):
                yield psutil.Process(int(name))


def _read_environ(pid: str) -> bytes:
    """``/proc/<pid>/environ`` whole; b"" when it cannot be read (gone, not ours)."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return b""
    finally:
        os.close(fd)
    return b"".join(chunks)


def waitpid_blocking(pid: int) -> int | None:
    """Reap ``pid`` (blocking); its wait status, or ``None`` if it was not ours to reap."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


class WaitThread:
    """A thread blocked in ``waitpid`` on one child, for systems without pidfds.

    Started once per child and kept until it has reaped it, so that a
    cancelled waiter loses nothing: :meth:`result` may be awaited again.
    """

    def __init__(self, pid: int) -> None:
        self.status: int | None = None
        self._done = anyio.Event()
        token = anyio.lowlevel.current_token()

        def run() -> None:
            self.status = waitpid_blocking(pid)
            with contextlib.suppress(Exception):  # the event loop may be gone by now
                anyio.from_thread.run_sync(self._done.set, token=token)

        threading.Thread(target=run, name=f"hostvisor-wait-{pid}", daemon=True).start()

    async def result(self) -> int | None:
        """The child's wait status once reaped (``None`` if it was not ours)."""
        await self._done.wait()
        return self.status
