"""Finding and reclaiming the holder of a service's TCP port before it is spawned.

A service that crashed while the daemon was down, or a worker its leader left
behind, may still listen on the port; the new instance would then fail with
EADDRINUSE forever. Before each spawn the service layer calls :func:`reclaim`:

- ``own``: kill a holder only if it is ours, i.e. its environment carries
  ``HOSTVISOR_SERVICE=<service>``, or its ``(pid, start time)`` is one the
  daemon recorded for this service;
- ``any``: kill any holder running under the daemon's uid;
- ``no``: never kill.

A holder that is not killed is *blocked*: the service waits in backoff and
``hostvisor.port.blocked`` names its pid and command line.

On Linux the listening sockets come from ``/proc/net/tcp`` and ``tcp6``
(any address, IPv4 or IPv6) and their owners from ``/proc/<pid>/fd``: only the
processes whose descriptors we may read are found (all of them as root, our
own otherwise). A listener whose process cannot be seen is reported with
``pid == 0`` and the socket's uid. Elsewhere psutil's ``net_connections`` is used.

Those scans grow with the host (``/proc/net/tcp`` of 20,000 sockets is ~3 MB, and
every descriptor of every process is one ``readlink``), so :func:`reclaim` runs them
in worker threads, at most :data:`SCAN_THREADS` at once for the whole daemon: the
event loop, and every other service's probes and restarts, never wait on them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.to_thread
import psutil

from supervisor.drivers.process import MARKER
from supervisor.reaper import signal_verified, wait_gone
from supervisor.spec import ReclaimPort, StopSpec
from supervisor.threads import ThreadPool

__all__ = [
    "SCAN_THREADS",
    "PortHolder",
    "ReclaimResult",
    "find_holders",
    "is_listening",
    "is_listening_async",
    "reclaim",
]

_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10
#: Seconds to wait for SIGKILLed holders to go.
_KILL_WAIT = 5.0

#: Worker threads scanning ``/proc`` at once, for the whole daemon (per event loop).
#: Enough for the loop never to wait on a scan, few enough that 1,000 units starting
#: together queue for them instead of taking 1,000 threads (and the GIL) at once;
#: the scans hold the GIL for their parsing, so more threads would not be faster.
SCAN_THREADS = 2

_T = TypeVar("_T")
_SCANS = ThreadPool("proc_scan", SCAN_THREADS)


async def _in_thread(fn: Callable[[int], _T], port: int) -> _T:
    """``fn(port)`` in a worker thread, at most :data:`SCAN_THREADS` at once.

    Waiting for a thread is cancellable; a scan that has begun runs to its end
    (a few hundred ms at most) before the cancellation is delivered.
    """
    return await anyio.to_thread.run_sync(fn, port, limiter=_SCANS.limiter())


@dataclass(frozen=True, slots=True)
class PortHolder:
    """A process listening on the port.

    Attributes:
        pid: its pid; 0 when the socket's process cannot be seen (another user's).
        uid: its real uid (for ``pid == 0``, the socket's owner).
        cmdline: its command line, shell-quoted (``""`` if unknown).
        create_time: its start time as psutil reports it (epoch seconds; 0.0 if unknown).
        marker: its ``HOSTVISOR_SERVICE`` value, or ``None`` (absent or unreadable).
    """

    pid: int
    uid: int
    cmdline: str
    create_time: float
    marker: str | None

    def describe(self) -> str:
        """``pid 4242 (python -m http.server)``, for events."""
        if not self.pid:
            return f"a process of uid {self.uid} that cannot be seen"
        return f"pid {self.pid} ({self.cmdline or '?'})"


@dataclass(frozen=True, slots=True)
class ReclaimResult:
    """What :func:`reclaim` did.

    Attributes:
        free: True if nothing listens on the port any more.
        killed: holders that were stopped (``hostvisor.port.reclaimed``).
        blocked: holders left alone (``hostvisor.port.blocked``).
    """

    free: bool
    killed: list[PortHolder] = field(default_factory=list)
    blocked: list[PortHolder] = field(default_factory=list)


def _read_table(path: str) -> bytes | None:
    """The whole of ``path`` (``/proc/net/tcp`` of 20,000 sockets is ~3 MB), or ``None``."""
    try:
        with open(path, "rb") as table:
            return table.read()
    except OSError:
        return None


def _listening_inodes(port: int) -> dict[int, int] | None:
    """Inode -> uid of the sockets listening on ``port``; ``None`` without ``/proc/net``.

    Blocking (a read of ~3 MB and a few ms of CPU with 20,000 sockets on the host):
    call it in a worker thread (:func:`_in_thread`). A regular expression finds the
    candidate lines, so Python code only looks at the few that name the port.
    """
    found: dict[int, int] = {}
    # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    candidate = re.compile(rb":%04X [0-9A-F]+:[0-9A-F]{4} %s " % (port, _TCP_LISTEN.encode()))
    seen_table = False
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        data = _read_table(path)
        if data is None:
            continue
        seen_table = True
        for match in candidate.finditer(data):
            begin = data.rfind(b"\n", 0, match.start()) + 1
            end = data.find(b"\n", match.end())
            fields = data[begin : end if end >= 0 else len(data)].split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN.encode():
                local = fields[1].decode("ascii", "replace")
                inode = int(fields[9])
                if inode and local.endswith(f":{port:04X}"):
                    found[inode] = int(fields[7])
    return found if seen_table else None


def _socket_links(pid: str) -> Iterator[str]:
    """The targets of ``/proc/<pid>/fd/*``; stops quietly at EACCES (another user's
    process, unless we are root) and at ENOENT/ESRCH (the process exited meanwhile:
    reading the directory of a process that is gone fails halfway through)."""
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for fd in fds:
                try:
                    yield os.readlink(fd.path)
                except OSError:
                    continue  # that descriptor was closed meanwhile
    except OSError:
        return


def _pids_holding(inodes: Iterable[int]) -> dict[int, set[int]]:
    """Pid -> the socket ``inodes`` it has a descriptor on (``/proc/<pid>/fd``).

    Blocking (one ``readlink`` per descriptor of every process we may read):
    call it in a worker thread. Processes that vanish mid-scan or that we may not
    read are skipped, never an error.
    """
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    held: dict[int, set[int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return held
    for name in entries:
        for link in _socket_links(name):
            inode = wanted.get(link)
            if inode is not None:
                held.setdefault(int(name), set()).add(inode)
    return held


def _holder(pid: int) -> PortHolder | None:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            uid = proc.uids().real
            cmdline = shlex.join(proc.cmdline())
            create_time = proc.create_time()
    except psutil.Error:
        return None
    try:
        marker = proc.environ().get(MARKER)
    except psutil.Error:
        marker = None
    return PortHolder(pid, uid, cmdline, create_time, marker)


def _psutil_listener_pids(port: int) -> set[int]:
    """Listener pids from psutil (macOS, or Linux without ``/proc/net``)."""

    def listens(conn: psutil._ntuples.pconn | psutil._ntuples.sconn) -> bool:
        laddr = conn.laddr
        return conn.status == psutil.CONN_LISTEN and getattr(laddr, "port", None) == port

    try:
        return {c.pid for c in psutil.net_connections(kind="tcp") if c.pid and listens(c)}
    except psutil.AccessDenied:  # macOS without root: look at the processes we may see
        pids: set[int] = set()
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if any(listens(c) for c in proc.net_connections(kind="tcp")):
                    pids.add(proc.pid)
        return pids


def is_listening(port: int) -> bool:
    """True if some socket listens on TCP ``port``.

    Blocking: reads ``/proc/net/tcp`` and ``tcp6`` (on Linux; psutil elsewhere), which
    grows with every socket of the host (~3 MB, tens of ms, for 20,000 sockets). From
    the event loop use :func:`is_listening_async`.
    """
    inodes = _listening_inodes(port)
    if inodes is not None:
        return bool(inodes)
    return bool(_psutil_listener_pids(port))


async def is_listening_async(port: int) -> bool:
    """:func:`is_listening` in a worker thread of the scan limiter (:data:`SCAN_THREADS`)."""
    return await _in_thread(is_listening, port)


def find_holders(port: int) -> list[PortHolder]:
    """Processes listening on TCP ``port``, IPv4 or IPv6, on any address.

    Blocking: walks ``/proc/*/fd`` (one ``readlink`` per descriptor on the host that
    we may read); the event loop calls it through :func:`reclaim`, in a worker thread.

    Returns:
        One :class:`PortHolder` per process (a socket shared by forked workers
        gives one per worker), sorted by pid; then one with ``pid == 0`` per uid
        owning a listening socket whose process cannot be seen (another user's,
        another pid namespace's), even when other holders were seen (IPv4 held by
        one process, IPv6 by another user's). ``[]`` when the port is free.
    """
    inodes = _listening_inodes(port)
    unseen: list[PortHolder] = []
    if inodes is None:
        pids = _psutil_listener_pids(port)
    else:
        if not inodes:
            return []
        held = _pids_holding(inodes)
        pids = set(held)
        matched: set[int] = set()
        for held_inodes in held.values():
            matched |= held_inodes
        unseen_uids = {uid for inode, uid in inodes.items() if inode not in matched}
        unseen = [PortHolder(0, uid, "", 0.0, None) for uid in sorted(unseen_uids)]
    holders = [h for h in (_holder(pid) for pid in sorted(pids)) if h is not None]
    return holders + unseen


def _is_ours(
    holder: PortHolder, policy: ReclaimPort, service: str, known: list[tuple[int, float]]
) -> bool:
    if holder.pid in (0, 1, os.getpid()):
        return False
    if policy == "any":
        return holder.uid == os.getuid()
    if policy == "own":
        if holder.marker == service:
            return True
        return any(pid == holder.pid and abs(ct - holder.create_time) < 0.01 for pid, ct in known)
    return False


def _same_process(holder: PortHolder) -> psutil.Process | None:
    try:
        proc = psutil.Process(holder.pid)
        if abs(proc.create_time() - holder.create_time) < 1e-6:
            return proc
    except psutil.Error:
        pass
    return None  # gone, or the pid now names another process


def _group_is_ours(pgid: int, service: str) -> bool:
    if pgid in (0, 1, os.getpgrp()):
        return False
    try:
        return psutil.Process(pgid).environ().get(MARKER) == service
    except psutil.Error:
        return False


def _send(proc: psutil.Process, sig: int, service: str) -> None:
    """Signal ``proc``'s group if its leader is ours-marked, else ``proc`` alone."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    # signal 0 through a pidfd: proves the holder (a member of pgid) is alive
    # right now, so the group is not empty and its number cannot be reused.
    if _group_is_ours(pgid, service) and signal_verified(proc, 0):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    else:
        signal_verified(proc, sig)


async def reclaim(
    port: int,
    *,
    policy: ReclaimPort,
    service: str,
    known: Iterable[tuple[int, float]],
    stop: StopSpec,
) -> ReclaimResult:
    """Make ``port`` free for ``service`` if the policy allows killing its holders.

    Args:
        port: the TCP port.
        policy: ``"own"``, ``"any"`` or ``"no"`` (the unit's ``reclaim_port``).
        service: the service name (its ``HOSTVISOR_SERVICE`` marker).
        known: ``(pid, create_time)`` of the processes the daemon started for
            this service (``ProcessHandle.create_time``).
        stop: the service's stop policy: ``stop.signal`` (to the holder's group
            when the group's leader carries the marker, else to the holder),
            up to ``stop.timeout`` seconds, then SIGKILL.

    Returns:
        Whether the port is free, and which holders were killed or left alone.
    """
    if not await is_listening_async(port):
        return ReclaimResult(free=True)
    holders = await _in_thread(find_holders, port)
    known_list = list(known)
    killed: list[PortHolder] = []
    blocked: list[PortHolder] = []
    procs: list[psutil.Process] = []
    for holder in holders:
        if not _is_ours(holder, policy, service, known_list):
            blocked.append(holder)
            continue
        proc = _same_process(holder)
        if proc is not None:
            _send(proc, stop.signal, service)
            procs.append(proc)
            killed.append(holder)
    if procs:
        remaining = await wait_gone(procs, stop.timeout)
        for proc in remaining:
            _send(proc, signal.SIGKILL, service)
        if remaining:
            await wait_gone(remaining, _KILL_WAIT)
    free = not await is_listening_async(port)
    return ReclaimResult(free=free, killed=killed, blocked=blocked)
