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
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil

from supervisor.drivers.process import MARKER
from supervisor.reaper import signal_verified, wait_gone
from supervisor.spec import ReclaimPort, StopSpec

__all__ = ["PortHolder", "ReclaimResult", "find_holders", "is_listening", "reclaim"]

_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10
#: Seconds to wait for SIGKILLed holders to go.
_KILL_WAIT = 5.0


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


def _listening_inodes(port: int) -> dict[int, int] | None:
    """Inode -> uid of the sockets listening on ``port``; ``None`` without ``/proc/net``."""
    found: dict[int, int] = {}
    suffix = f":{port:04X}"
    seen_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_table = True
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if len(fields) > 9 and fields[3] == _TCP_LISTEN and fields[1].endswith(suffix):
                inode = int(fields[9])
                if inode:
                    found[inode] = int(fields[7])
    return found if seen_table else None


def _pids_holding(inodes: Iterable[int]) -> set[int]:
    """Pids with a descriptor on one of the socket ``inodes`` (``/proc/<pid>/fd``)."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    pids: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue  # gone, or not ours to read
        with fds:
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in wanted:
                        pids.add(int(entry.name))
                        break
    return pids


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
    """True if some socket listens on TCP ``port`` (cheap on Linux: two small files)."""
    inodes = _listening_inodes(port)
    if inodes is not None:
        return bool(inodes)
    return bool(_psutil_listener_pids(port))


def find_holders(port: int) -> list[PortHolder]:
    """Processes listening on TCP ``port``, IPv4 or IPv6, on any address.

    Returns:
        One :class:`PortHolder` per process (a socket shared by forked workers
        gives one per worker), sorted by pid; ``pid == 0`` for a listener whose
        process cannot be seen. ``[]`` when the port is free.
    """
    inodes = _listening_inodes(port)
    if inodes is None:
        pids = _psutil_listener_pids(port)
        unseen: list[PortHolder] = []
    else:
        if not inodes:
            return []
        pids = _pids_holding(inodes)
        unseen = []
        if not pids:
            unseen = [PortHolder(0, uid, "", 0.0, None) for uid in sorted(set(inodes.values()))]
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
    if not is_listening(port):
        return ReclaimResult(free=True)
    holders = await anyio.to_thread.run_sync(find_holders, port)
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
    return ReclaimResult(free=not is_listening(port), killed=killed, blocked=blocked)
