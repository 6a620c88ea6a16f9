"""After a daemon crash: find the processes it left running and decide which to adopt.

A process is ours when its environment carries ``HOSTVISOR_SERVICE=<unit>`` and
``HOSTVISOR_STATE_DIR=<our state folder>`` (two daemons with their own state
folders never touch each other's). A service's instance is the leader of its
own session (each one is spawned with ``setsid``); descendants carry the same
marker but are swept with their leader's group.

Who is adopted (issue 10; pitchfork's ``orphan_policy``):

- the process the state file names for a unit, if its pid, start time and marker
  still match; a pid whose start time does not match is never signalled (reuse);
- otherwise, with ``[daemon] orphans = "adopt"``, the oldest candidate of the unit;
- every other candidate of a unit is stopped, as is every candidate of a unit that
  no longer exists; with ``orphans = "stop"`` every candidate the state file does
  not name is stopped. So no two instances of one service ever run.

Pure planning (:func:`plan`) is separate from reading ``/proc`` (:func:`scan`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import psutil

from supervisor.reaper import scan_marked
from supervisor.statefile import StateFile

__all__ = ["Candidate", "Plan", "plan", "scan"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A live session leader that carries our marker.

    Attributes:
        service: its ``HOSTVISOR_SERVICE`` value.
        pid: its pid (= its session and group id).
        create_time: its start time (epoch seconds, as psutil reports it).
        proc: the psutil handle, which checks the start time before it signals.
    """

    service: str
    pid: int
    create_time: float
    proc: psutil.Process = field(compare=False)


@dataclass(slots=True)
class Plan:
    """What to do with the candidates.

    Attributes:
        adopt: unit name -> the candidate to adopt.
        stop: candidates to stop (stop signal, then SIGKILL).
        ignored: messages about state-file entries left alone (pid reused...).
    """

    adopt: dict[str, Candidate] = field(default_factory=dict)
    stop: list[Candidate] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def scan(scope: str, *, skip: Collection[int] = ()) -> list[Candidate]:
    """Every live session leader of our uid whose environment has ``HOSTVISOR_STATE_DIR=
    scope`` and a ``HOSTVISOR_SERVICE`` marker. Reads ``/proc`` (blocking: run it in a
    worker thread); processes whose environment cannot be read are left out."""
    found: list[Candidate] = []
    for name, procs in scan_marked(scope).items():
        for proc in procs:
            if proc.pid in skip:
                continue
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) != proc.pid:
                    continue  # not a service leader (a member of a group, swept with it)
                found.append(Candidate(name, proc.pid, proc.create_time(), proc))
    return found


def _matches(candidate: Candidate, create_time: float | None) -> bool:
    # psutil rounds start times to the clock tick: allow a hundredth of a second.
    return create_time is not None and abs(candidate.create_time - create_time) < 0.01


def plan(
    candidates: list[Candidate],
    *,
    state: StateFile | None,
    units: Mapping[str, str],
    policy: str,
) -> Plan:
    """Decide (pure) which candidates to adopt and which to stop.

    Args:
        candidates: from :func:`scan`.
        state: the state file, or ``None`` when it was missing, corrupt or too new.
        units: unit name -> its kind (``"process"``/``"container"``) in the config.
        policy: ``[daemon] orphans``: ``"adopt"`` or ``"stop"``.
    """
    result = Plan()
    by_unit: dict[str, list[Candidate]] = {}
    for cand in candidates:
        by_unit.setdefault(cand.service, []).append(cand)
    named: dict[str, tuple[int, float | None]] = {}
    if state is not None:
        for name, rec in state.services.items():
            if rec.instance is not None:
                named[name] = (rec.instance.pid, rec.instance.create_time)
    for name, group in sorted(by_unit.items()):
        if units.get(name) != "process":
            result.stop.extend(group)  # the unit is gone (or is a container now)
            continue
        chosen: Candidate | None = None
        if name in named:
            pid, create_time = named[name]
            chosen = next((c for c in group if c.pid == pid and _matches(c, create_time)), None)
        if chosen is None and policy == "adopt":
            chosen = min(group, key=lambda c: (c.create_time, c.pid))
        if chosen is not None:
            result.adopt[name] = chosen
        result.stop.extend(c for c in group if c is not chosen)
    for name, (pid, create_time) in sorted(named.items()):
        if name not in result.adopt and not any(c.pid == pid for c in candidates):
            with contextlib.suppress(psutil.Error):
                other = psutil.Process(pid)
                if not _matches(Candidate(name, pid, other.create_time(), other), create_time):
                    result.ignored.append(
                        f"{name}: pid {pid} now belongs to another process (started later); "
                        "left alone"
                    )
    return result
