"""CPU, memory and process counts of every service's instance: one pass over ``/proc``.

A sample reads ``/proc/<pid>/stat`` once per process of the host (``proc(5)``: ppid,
pgrp, utime, stime, starttime, rss) and attributes each process to at most one
instance:

- a process instance's tree is the members of its process group
  (:attr:`~supervisor.drivers.process_handle.ProcessHandle.pgid`) and all their
  descendants, plus the escapees carrying its ``HOSTVISOR_SERVICE`` (and, for a job's
  run, ``HOSTVISOR_RUN``) marker that were re-parented to the daemon (a subreaper), and
  their descendants. Only the environment of such children of the daemon that nothing
  else claimed is read, once per ``(pid, starttime)``.
- a container instance's figures are the engine's stats (one-shot reads, see
  :func:`container_figures`).

Conventions:

- ``cpu_percent`` as psutil's ``Process.cpu_percent``: the delta of utime + stime over
  the wall time since the previous sample, 100 = one core fully busy, summed over the
  tree; a process seen for the first time counts its lifetime average.
- ``memory_bytes``: the resident set size summed over the tree, so pages shared between
  processes count once per process (as PM2 and ``ps`` sums do).
- ``processes``: live members of the tree (zombies are not counted).

A process attributed to no instance (and not a child of the daemon) is foreign for
good: its parent and group never change to ours. The passes between two full ones
(every :data:`FULL_PASS_EVERY` seconds) do not read it again, which takes about a third
off a pass on a host running as many processes of its own as of ours.

Where there is no ``/proc`` (macOS) the same pass is made with ``psutil.process_iter``.
Every error is a missing figure, never an exception.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
import psutil

from supervisor.threads import ThreadPool

__all__ = [
    "NO_FIGURES",
    "SAMPLE_TIMEOUT",
    "ContainerCounter",
    "Figures",
    "ProcInfo",
    "Sampler",
    "Tree",
    "container_figures",
    "read_processes",
]

#: Seconds one pass over /proc may take before the sample is abandoned (a hung /proc).
SAMPLE_TIMEOUT = 5.0
#: Seconds between two passes that read every process; those between read only the
#: processes not known to be foreign. It bounds how long a foreign pid reused by a
#: process of ours (the pid space wrapped within one sample interval) goes uncounted.
FULL_PASS_EVERY = 10.0
_POOL = ThreadPool("resources", 1)
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PROC = "/proc"


@dataclass(slots=True)
class Figures:
    """One instance's (or service's) figures; ``None`` = not known. Read-only by
    convention (not frozen: 200 are built per sample, and a frozen init is slow).

    Attributes:
        cpu_percent: 100 = one core fully busy (psutil's convention).
        memory_bytes: resident set size summed over the tree, bytes.
        processes: live processes in the tree.
        gpu_memory_bytes: GPU memory of the tree's processes (NVML), bytes; ``None``
            when NVML is not available.
        pids: the processes counted (for the GPU figure and for tests).
    """

    cpu_percent: float | None = None
    memory_bytes: int | None = None
    processes: int | None = None
    gpu_memory_bytes: int | None = None
    pids: frozenset[int] = frozenset()

    def __add__(self, other: Figures) -> Figures:
        """The sum of two instances' figures (a job's live runs); ``None`` + x = x."""

        def add(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else a + b

        return Figures(
            cpu_percent=add(self.cpu_percent, other.cpu_percent),
            memory_bytes=add(self.memory_bytes, other.memory_bytes),
            processes=add(self.processes, other.processes),
            gpu_memory_bytes=add(self.gpu_memory_bytes, other.gpu_memory_bytes),
            pids=self.pids | other.pids,
        )

    def as_json(self) -> dict[str, Any]:
        """The status-entry fields: ``cpu_percent`` (rounded to 0.1), ``memory_bytes``,
        ``processes``, and ``gpu_memory_bytes`` only when known."""
        cpu = None if self.cpu_percent is None else round(self.cpu_percent, 1)
        doc: dict[str, Any] = {
            "cpu_percent": cpu,
            "memory_bytes": self.memory_bytes,
            "processes": self.processes,
        }
        if self.gpu_memory_bytes is not None:
            doc["gpu_memory_bytes"] = self.gpu_memory_bytes
        return doc


#: The figures of a service with no instance running.
NO_FIGURES = Figures()


class Tree(NamedTuple):
    """One process instance to attribute processes to.

    Attributes:
        key: names the instance in the result (e.g. ``(service, pid)``).
        service: the ``HOSTVISOR_SERVICE`` marker its escapees carry.
        run: the ``HOSTVISOR_RUN`` marker of a job's run ("" for a service).
        pgid: its process group.
    """

    key: Hashable
    service: str
    run: str
    pgid: int


class ProcInfo(NamedTuple):
    """What one pass knows of one process (``proc(5)``, ``/proc/<pid>/stat``).

    ``utime``, ``stime`` and ``start`` are in clock ticks (``start``: since boot);
    ``rss`` in bytes; ``zombie`` for state Z or X. (A tuple: built once per process
    per sample, a frozen dataclass would double the pass's cost.)
    """

    pid: int
    ppid: int
    pgrp: int
    utime: int
    stime: int
    start: int
    rss: int
    zombie: bool


#: What a pass keeps of a process: (ppid, pgrp, its ProcInfo).
Link = tuple[int, int, ProcInfo]


def _scan_proc(
    root: str, skip: Collection[int] = (), kept: set[int] | None = None
) -> dict[int, Link]:
    found: dict[int, Link] = {}
    prefix = root + "/"
    read, close, flags = os.read, os.close, os.O_RDONLY | os.O_CLOEXEC
    zombie, page = (b"Z", b"X"), _PAGE
    for name in os.listdir(root):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in skip:
            if kept is not None:
                kept.add(pid)
            continue  # known not to be ours (Sampler: foreign processes)
        try:
            fd = os.open(prefix + name + "/stat", flags)
        except OSError:
            continue  # gone meanwhile
        try:
            data = read(fd, 4096)
        except OSError:
            continue
        finally:
            close(fd)
        # The command name may hold spaces and parentheses: fields start after the last
        # ')'. Parsed at once, up to rss: between full passes nearly all read are ours.
        rest = data[data.rfind(b")") + 2 :].split(None, 22)
        try:
            info = ProcInfo(
                pid,
                int(rest[1]),
                int(rest[2]),
                int(rest[11]),
                int(rest[12]),
                int(rest[19]),
                int(rest[21]) * page,
                rest[0] in zombie,
            )
        except (ValueError, IndexError):
            continue
        found[pid] = (info.ppid, info.pgrp, info)
    return found


def _read_psutil() -> dict[int, ProcInfo]:
    """The same pass with psutil (macOS, BSD); times converted to ticks of ``_HZ``."""
    found: dict[int, ProcInfo] = {}
    boot = psutil.boot_time()
    attrs = ["ppid", "cpu_times", "create_time", "memory_info", "status"]
    for proc in psutil.process_iter(attrs):
        with contextlib.suppress(psutil.Error, OSError, TypeError, AttributeError):
            info = proc.info
            times, memory = info["cpu_times"], info["memory_info"]
            if times is None or memory is None:
                continue
            found[proc.pid] = ProcInfo(
                pid=proc.pid,
                ppid=int(info["ppid"] or 0),
                pgrp=os.getpgid(proc.pid),
                utime=round(times.user * _HZ),
                stime=round(times.system * _HZ),
                start=round((info["create_time"] - boot) * _HZ),
                rss=int(memory.rss),
                zombie=info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD),
            )
    return found


def _scan(root: str, skip: Collection[int] = (), kept: set[int] | None = None) -> dict[int, Link]:
    """Every process of the host: ``/proc`` when there is one (about 5 us a process),
    else psutil's process list (about 6 times slower). Blocking.

    ``skip``: pids not to read (``/proc`` only); those still listed are added to ``kept``."""
    if os.path.isdir(root) and os.path.exists(f"{root}/self/stat"):
        return _scan_proc(root, skip, kept)
    return {pid: (i.ppid, i.pgrp, i) for pid, i in _read_psutil().items()}


def read_processes(root: str = _PROC) -> dict[int, ProcInfo]:
    """Every process of the host, by pid, fully read (blocking)."""
    return {pid: link[2] for pid, link in _scan(root).items()}


def _boot_seconds() -> float:
    """Seconds since boot, on the clock of ``starttime`` (``CLOCK_BOOTTIME``)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is not None:
        return time.clock_gettime(clock)
    return time.time() - psutil.boot_time()


def _marker_of(pid: int, root: str) -> tuple[str, str] | None:
    """``(HOSTVISOR_SERVICE, HOSTVISOR_RUN)`` of a process, or None without the marker."""
    try:
        if os.path.isdir(root):
            with open(f"{root}/{pid}/environ", "rb") as file:
                raw = file.read()
            env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
            service = env.get(b"HOSTVISOR_SERVICE", b"").decode(errors="replace")
            run = env.get(b"HOSTVISOR_RUN", b"").decode(errors="replace")
        else:
            environ = psutil.Process(pid).environ()
            service, run = environ.get("HOSTVISOR_SERVICE", ""), environ.get("HOSTVISOR_RUN", "")
    except (OSError, psutil.Error, ValueError):
        return None
    return (service, run) if service else None


class Sampler:
    """Samples every process instance in one pass; keeps what the CPU deltas need.

    Args:
        daemon_pid: whose re-parented children are checked for markers (default: us).
        proc_root: the ``/proc`` mount (tests may point elsewhere).
        gpu: returns ``{pid: GPU bytes}`` or ``None`` (:func:`supervisor.gpu.gpu_memory_by_pid`).

    Not thread-safe: one sample at a time (:meth:`sample_async` runs in a one-thread pool).
    """

    def __init__(
        self,
        *,
        daemon_pid: int | None = None,
        proc_root: str = _PROC,
        gpu: Callable[[], dict[int, int] | None] | None = None,
    ) -> None:
        self.daemon_pid = os.getpid() if daemon_pid is None else daemon_pid
        self.proc_root = proc_root
        self._gpu = gpu
        #: (pid, start) -> (utime, stime, boot seconds when read)
        self._ticks: dict[tuple[int, int], tuple[int, int, float]] = {}
        #: (pid, start) -> the marker of a child of the daemon (None: none)
        self._markers: dict[tuple[int, int], tuple[str, str] | None] = {}
        #: service -> accumulated (user, system) CPU seconds; only grows.
        self.cpu_seconds: dict[str, tuple[float, float]] = {}
        #: pids attributed to no instance and not the daemon's children; skipped by the
        #: passes between two full ones (boot seconds of the last: ``_full_at``).
        self._foreign: set[int] = set()
        self._full_at = -float("inf")
        self._daemon_children: list[int] = []

    def __repr__(self) -> str:
        return f"<Sampler {len(self._ticks)} processes known>"

    def sample(self, trees: Sequence[Tree]) -> dict[Hashable, Figures]:
        """The figures of each tree, by its key (blocking; never raises: a failed pass
        gives ``{}``)."""
        now = _boot_seconds()
        full = now - self._full_at >= FULL_PASS_EVERY or any(t.pgid in self._foreign for t in trees)
        kept: set[int] = set()
        try:
            links = _scan(self.proc_root, () if full else self._foreign, kept)
        except OSError:
            return {}
        if full:
            self._full_at = now
        owner, procs = self._attribute(links, trees)
        # A process that is none of ours never becomes ours (its parent and its group do
        # not change, short of re-parenting to init): not read again until the next full
        # pass. The daemon's own children are read every time (their markers decide).
        ours = set(owner).union(self._daemon_children)
        self._foreign = kept.union(pid for pid in links if pid not in ours)
        gpu = self._gpu() if self._gpu is not None else None
        return self._figures(procs, trees, owner, now, gpu)

    def _attribute(
        self, links: Mapping[int, Link], trees: Sequence[Tree]
    ) -> tuple[dict[int, Tree], dict[int, ProcInfo]]:
        """Which tree each process belongs to, and the full stat of those (and of the
        daemon's children)."""
        children: dict[int, list[int]] = {}
        groups: dict[int, list[int]] = {}
        for pid, (ppid, pgrp, _) in links.items():
            children.setdefault(ppid, []).append(pid)
            groups.setdefault(pgrp, []).append(pid)
        owner: dict[int, Tree] = {}

        def claim(roots: Iterable[int], tree: Tree) -> None:
            stack = list(roots)
            while stack:
                pid = stack.pop()
                if pid in owner:
                    continue
                owner[pid] = tree
                stack.extend(children.get(pid, ()))

        for tree in trees:
            if tree.pgid > 1:  # 0 and 1 are never a service's group (init's may be 0)
                claim(groups.get(tree.pgid, ()), tree)
        by_marker = {(t.service, t.run): t for t in trees}
        markers: dict[tuple[int, int], tuple[str, str] | None] = {}
        self._daemon_children = children.get(self.daemon_pid, [])
        for pid in self._daemon_children:
            info = links[pid][2]
            if pid in owner or info.zombie:
                continue
            ident = (pid, info.start)
            marker = (
                self._markers[ident] if ident in self._markers else _marker_of(pid, self.proc_root)
            )
            markers[ident] = marker
            found = by_marker.get(marker) if marker is not None else None
            if found is not None:
                claim([pid], found)
        self._markers = markers  # the children gone are forgotten
        return owner, {pid: links[pid][2] for pid in owner}

    def _figures(
        self,
        procs: Mapping[int, ProcInfo],
        trees: Sequence[Tree],
        owner: Mapping[int, Tree],
        now: float,
        gpu: Mapping[int, int] | None,
    ) -> dict[Hashable, Figures]:
        sums: dict[Hashable, list[Any]] = {t.key: [0.0, 0, 0, 0, []] for t in trees}
        ticks: dict[tuple[int, int], tuple[int, int, float]] = {}
        for pid, tree in owner.items():
            info = procs[pid]
            if info.zombie:
                continue
            ident = (pid, info.start)
            ticks[ident] = (info.utime, info.stime, now)
            before = self._ticks.get(ident)
            if before is None:  # first seen: its lifetime average, its whole CPU time
                du, ds, elapsed = info.utime, info.stime, now - info.start / _HZ
            else:
                du, ds, elapsed = info.utime - before[0], info.stime - before[1], now - before[2]
            du, ds = max(0, du), max(0, ds)
            entry = sums[tree.key]
            if elapsed > 0:
                entry[0] += (du + ds) / _HZ / elapsed * 100
            entry[1] += info.rss
            entry[2] += 1
            entry[3] += gpu.get(pid, 0) if gpu is not None else 0
            entry[4].append(pid)
            user, system = self.cpu_seconds.get(tree.service, (0.0, 0.0))
            self.cpu_seconds[tree.service] = (user + du / _HZ, system + ds / _HZ)
        self._ticks = ticks
        return {
            key: Figures(
                cpu_percent=cpu,
                memory_bytes=rss,
                processes=count,
                gpu_memory_bytes=gpu_bytes if gpu is not None else None,
                pids=frozenset(pids),
            )
            for key, (cpu, rss, count, gpu_bytes, pids) in sums.items()
        }

    async def sample_async(self, trees: Sequence[Tree]) -> dict[Hashable, Figures] | None:
        """:meth:`sample` in the ``resources`` worker thread, abandoned after
        :data:`SAMPLE_TIMEOUT` seconds (a hung ``/proc`` never freezes the daemon; the
        next sample waits for that thread); ``None`` then."""
        with anyio.move_on_after(SAMPLE_TIMEOUT):
            return await anyio.to_thread.run_sync(
                self.sample, trees, limiter=_POOL.limiter(), abandon_on_cancel=True
            )
        return None


# --------------------------------------------------------------------------- containers


class ContainerCounter:
    """The previous CPU reading of each container, for :func:`container_figures`."""

    def __init__(self) -> None:
        #: container id -> (total_usage ns, user ns, system ns, wall seconds)
        self.previous: dict[str, tuple[int, int, int, float]] = {}


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    return doc


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def container_figures(
    stats: Mapping[str, Any],
    *,
    container_id: str,
    counter: ContainerCounter,
    started_ns: int = 0,
    now: float | None = None,
) -> tuple[Figures, tuple[float, float]]:
    """Figures from one one-shot ``docker stats`` answer, and the CPU seconds (user,
    system) used since the previous answer (all of them at the first).

    CPU % is our own delta of ``cpu_stats.cpu_usage.total_usage`` (ns) over the wall
    time (a one-shot read has no ``precpu_stats``); the first answer for a container
    counts its average since ``started_ns`` (epoch ns), or ``None`` without it. Memory
    as the docker CLI computes it (``calculateMemUsageUnixNoCache``): ``memory_stats.usage``
    minus ``stats.total_inactive_file`` (cgroup v1) or ``stats.inactive_file`` (v2), else
    ``stats.cache``. Processes:
    ``pids_stats.current``. A missing or malformed field is ``None``.
    """
    now = time.time() if now is None else now
    total = _number(_get(stats, "cpu_stats", "cpu_usage", "total_usage"))
    user = _number(_get(stats, "cpu_stats", "cpu_usage", "usage_in_usermode")) or 0
    system = _number(_get(stats, "cpu_stats", "cpu_usage", "usage_in_kernelmode")) or 0
    cpu: float | None = None
    used = (0.0, 0.0)
    if total is not None:
        before = counter.previous.get(container_id)
        if before is not None and now > before[3]:
            cpu = max(0, total - before[0]) / 1e9 / (now - before[3]) * 100
            used = (max(0, user - before[1]) / 1e9, max(0, system - before[2]) / 1e9)
        elif before is None:
            if started_ns and now * 1e9 > started_ns:
                cpu = total / (now * 1e9 - started_ns) * 100
            used = (user / 1e9, system / 1e9)
        counter.previous[container_id] = (total, user, system, now)
    usage = _number(_get(stats, "memory_stats", "usage"))
    memory: int | None = None
    if usage is not None:
        inner = _get(stats, "memory_stats", "stats")
        for key in ("total_inactive_file", "inactive_file", "cache"):
            value = _number(_get(inner, key))
            if value is not None:
                memory = usage - value if value < usage else usage
                break
        else:
            memory = usage
    processes = _number(_get(stats, "pids_stats", "current"))
    return Figures(cpu_percent=cpu, memory_bytes=memory, processes=processes), used
