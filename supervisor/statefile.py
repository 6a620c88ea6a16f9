"""The state file, ``<state>/state.json``: what the next daemon needs to take over.

Written by the daemon after state changes (coalesced, at most every
:data:`WRITE_EVERY` seconds) and once more just before ``hostvisor reexec``
replaces its code. Read by ``hostvisor run`` at start: after a re-exec it
resumes every service exactly (see :mod:`supervisor.carryover`); after a crash
it adopts the processes the file names whose identity still matches (see
:mod:`supervisor.adoption`).

Shape (``FORMAT`` 1)::

    {"format": 1, "hostvisor": "0.2.0", "pid": 123, "written": 1733090000.5,
     "reexec": null | {"lock_fd": 5, "listener_fd": 6, "reply_fd": 7, "reply_id": 1,
                       "started_wall": 1733000000.0, "event_seq": 42},
     "services": {"api": {<one ServiceRecord>}, ...}}

Times are epoch seconds (the next daemon's monotonic clock is not ours); a file
from a newer format than this code is refused (:class:`StateFileError`), as is a
corrupt or truncated one. The file is replaced atomically (write, fsync, rename),
so a crash mid-write leaves the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from supervisor import __version__
from supervisor.errors import HostvisorError
from supervisor.spec import ServiceSpec

__all__ = [
    "FORMAT",
    "MAX_SIZE",
    "WRITE_EVERY",
    "InstanceRecord",
    "ReexecRecord",
    "RunRecord",
    "ServiceRecord",
    "StateFile",
    "StateFileError",
    "atomic_write",
    "read_regular",
    "read_state",
    "spec_digest",
    "state_path",
    "write_state",
]

#: The format this code writes and the newest it reads.
FORMAT = 1
#: Seconds between two writes at most (changes in between are coalesced).
WRITE_EVERY = 0.2
#: A state file larger than this is refused (1,000 services take about 1 MiB).
MAX_SIZE = 64 << 20


class StateFileError(HostvisorError):
    """The state file cannot be used: corrupt, truncated, or from a newer hostvisor."""


def state_path(state_dir: Path) -> Path:
    """``<state>/state.json``."""
    return state_dir / "state.json"


def spec_digest(spec: ServiceSpec) -> str:
    """A digest of everything in ``spec`` (hex sha256 of its repr): equal digests mean
    the unit did not change (the reload diff's spec equality, across processes)."""
    return hashlib.sha256(repr(spec).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(slots=True, kw_only=True)
class InstanceRecord:
    """The running instance of a process service.

    Attributes:
        pid, pgid: its leader (also its group and session id).
        create_time: the leader's start time as psutil reports it (epoch seconds):
            with ``pid``, its identity.
        started_wall: when the instance was spawned (epoch seconds), for its uptime.
        fds: after a re-exec, the inherited read ends of stdout and stderr.
        pending: per fd, the partial line the old drain held (``latin-1`` text).
        health, successes, failures: the probe counters (:class:`~supervisor.health.HealthCounter`).
        known: recent ``(pid, create_time)`` of the service, for ``reclaim_port = "own"``.
    """

    pid: int
    pgid: int
    create_time: float | None
    started_wall: float
    fds: list[int] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    successes: int = 0
    failures: int = 0


@dataclass(slots=True, kw_only=True)
class ServiceRecord:
    """One service's supervisor: its state machine, counters and instance."""

    kind: str
    digest: str
    state: str
    health: str
    message: str = ""
    want_up: bool = True
    restarts: int = 0
    attempts: int = 0
    failed_starts: int = 0
    backoff_attempt: int = 0
    retry_in: float | None = None
    reached_running: bool = False
    adopted: bool = False
    last_exit: dict[str, Any] | None = None
    logs_dropped_bytes: int = 0
    known: list[list[float]] = field(default_factory=list)
    instance: InstanceRecord | None = None
    #: A job's (:mod:`supervisor.job`): its runs in progress and its suspension.
    job: bool = False
    runs: list[RunRecord] = field(default_factory=list)
    suspended: bool = False

    def instances(self) -> list[InstanceRecord]:
        """The service's instance, or a job's runs' instances."""
        found = [self.instance] if self.instance is not None else []
        return found + [run.sup.instance for run in self.runs if run.sup.instance is not None]


@dataclass(slots=True, kw_only=True)
class RunRecord:
    """A job's run in progress: its number, how it was triggered, when it started (epoch
    seconds), seconds it had run, and its supervisor's record (with the instance)."""

    number: int
    trigger: str
    started: float
    elapsed: float
    timed_out: bool = False
    stopped: bool = False
    sup: ServiceRecord


@dataclass(slots=True, kw_only=True)
class ReexecRecord:
    """What survives ``exec`` besides the services: descriptor numbers and clocks."""

    lock_fd: int
    listener_fd: int
    reply_fd: int = -1
    reply_id: Any = None
    started_wall: float = 0.0
    event_seq: int = 0


@dataclass(slots=True, kw_only=True)
class StateFile:
    """The whole file (see the module docstring)."""

    pid: int
    services: dict[str, ServiceRecord]
    reexec: ReexecRecord | None = None
    version: str = __version__
    written: float = 0.0


def write_state(
    path: Path, state: StateFile, cache: dict[str, tuple[ServiceRecord, str]] | None = None
) -> None:
    """Replace ``path`` atomically with ``state`` (mode 0600).

    ``cache`` (service name -> its last record and that record's JSON), kept by a caller
    that writes again and again: a record equal to the cached one is not encoded again
    (the text is the same either way; 1,000 records, one changed: ~12 -> ~1 ms of CPU,
    in a worker thread that holds the GIL meanwhile).

    Raises:
        OSError: the folder is not writable or the disk is full (the old file stays).
    """
    doc = {
        "format": FORMAT,
        "hostvisor": state.version,
        "pid": state.pid,
        "written": time.time(),
        "reexec": asdict(state.reexec) if state.reexec is not None else None,
    }
    if cache is None:
        text = _dumps({**doc, "services": state.services})
    else:
        parts = []
        for name, rec in state.services.items():
            known = cache.get(name)
            if known is None or known[0] != rec:
                known = cache[name] = (rec, _dumps(rec))
            parts.append(f"{_dumps(name)}:{known[1]}")
        for gone in cache.keys() - state.services.keys():
            del cache[gone]
        # The same text as one json.dumps of the whole document: "services" is its last key.
        text = f'{_dumps(doc)[:-1]},"services":{{{",".join(parts)}}}}}'
    atomic_write(path, text.encode())


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False, default=_as_dict)


#: record class -> its field names, in order (filled by :func:`_as_dict`)
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _as_dict(record: object) -> dict[str, Any]:
    """``json.dumps``'s ``default``: a record as :func:`dataclasses.asdict` gives it (its
    fields in order) without asdict's deep copy, which cost ~24 ms of CPU a write at
    1,000 services (the JSON text is the same)."""
    cls = type(record)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        if not is_dataclass(record):
            raise TypeError(f"{cls.__name__} is not JSON serializable")
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(record))
    return {name: getattr(record, name) for name in names}


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: written to a temporary file beside it (mode 0600,
    never through a symbolic link), fsynced, then renamed over it.

    Raises:
        OSError: the folder is not writable or the disk is full (the old file stays).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def read_state(path: Path) -> StateFile | None:
    """The state file at ``path``; ``None`` when there is none.

    Raises:
        StateFileError: unreadable, not JSON, truncated, the wrong shape, or written by
            a newer hostvisor (its format is newer than :data:`FORMAT`): the message
            names the file and what was wrong.
    """
    try:
        data = read_regular(path, MAX_SIZE)
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read the state file: {exc.strerror}") from None
    except ValueError as exc:
        raise StateFileError(f"{path}: {exc}") from None
    if data is None:
        return None
    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise StateFileError(f"{path}: corrupt or truncated state file: {exc}") from None
    return _parse(path, doc)


def read_regular(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path``, read without following a symbolic link and without
    blocking (a FIFO planted there would hang the daemon's start, deaf to SIGTERM);
    ``None`` when there is no file. The counterpart of :func:`atomic_write`.

    Raises:
        OSError: it cannot be opened or read (``strerror`` says why).
        ValueError: it is not a regular file, or larger than ``limit`` bytes.
    """
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = bytearray()
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return bytes(data)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _parse(path: Path, doc: Any) -> StateFile:
    if not isinstance(doc, dict):
        raise StateFileError(f"{path}: expected a JSON object")
    fmt = doc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise StateFileError(f"{path}: no format version")
    if fmt > FORMAT:
        raise StateFileError(
            f"{path}: written by hostvisor {doc.get('hostvisor', '?')} (state format {fmt}); "
            f"this hostvisor {__version__} reads format {FORMAT} at most: its processes are "
            "handled by [daemon] orphans"
        )
    try:
        services = {
            str(name): _service(rec) for name, rec in _dict(doc.get("services", {})).items()
        }
        reexec = doc.get("reexec")
        return StateFile(
            pid=_int(doc.get("pid")),
            services=services,
            reexec=_reexec(reexec) if reexec is not None else None,
            version=str(doc.get("hostvisor", "")),
            written=_num(doc.get("written", 0.0)),
        )
    except (TypeError, ValueError) as exc:
        raise StateFileError(f"{path}: malformed state file: {exc}") from None


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value


def _known(value: Any) -> list[Any]:
    """A ``[pid, start time]`` pair (the pid written as a number, the time maybe null)."""
    if len(_list(value)) != 2 or not 0 < _num(value[0]) < 2**31 or value[0] % 1:
        raise ValueError(f"known: expected a [pid, start time] pair, got {value!r:.40}")
    return [float(value[0]), None if value[1] is None else _num(value[1])]


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"expected a non-negative integer, got {value!r:.40}")
    return value


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a number, got {value!r:.40}")
    return float(value)


def _fields(cls: type, value: Any) -> dict[str, Any]:
    """The items of ``value`` that are fields of ``cls`` (unknown ones are ignored, so an
    older daemon of the same format reads a file with keys it does not know)."""
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return {k: v for k, v in _dict(value).items() if k in known}


def _reexec(value: Any) -> ReexecRecord:
    rec = ReexecRecord(**_fields(ReexecRecord, value))
    for name in ("lock_fd", "listener_fd", "event_seq"):
        _int(getattr(rec, name))
    if rec.reply_fd != -1:
        _int(rec.reply_fd)
    rec.started_wall = _num(rec.started_wall)
    return rec


def _exit(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    items = _dict(value)
    for key in ("code", "signal"):
        if items.get(key) is not None:
            _int(items[key])
    return items


def _service(value: Any) -> ServiceRecord:
    # Every field is checked here: a record of the wrong shape must be refused with the
    # file, never crash the daemon that restores it (supervisor.carryover trusts it).
    items = _fields(ServiceRecord, value)
    instance = items.pop("instance", None)
    runs = _list(items.pop("runs", []))
    rec = ServiceRecord(**items)
    rec.runs = [_run(run) for run in runs]
    if not isinstance(rec.suspended, bool) or not isinstance(rec.job, bool):
        raise ValueError("job, suspended: expected true or false")
    for name in ("restarts", "attempts", "failed_starts", "backoff_attempt", "logs_dropped_bytes"):
        _int(getattr(rec, name))
    for name in ("kind", "digest", "state", "health", "message"):
        if not isinstance(getattr(rec, name), str):
            raise ValueError(f"{name}: expected a string")
    for name in ("want_up", "reached_running", "adopted"):
        if not isinstance(getattr(rec, name), bool):
            raise ValueError(f"{name}: expected true or false")
    if rec.retry_in is not None:
        rec.retry_in = _num(rec.retry_in)
    rec.last_exit = _exit(rec.last_exit)
    rec.known = [_known(pair) for pair in _list(rec.known)]
    if instance is not None:
        inst = InstanceRecord(**_fields(InstanceRecord, instance))
        if not 0 < _int(inst.pid) < 2**31 or not 0 < _int(inst.pgid) < 2**31:
            raise ValueError(f"instance: no pid or process group {inst.pid}")  # 0 is our own
        inst.started_wall = _num(inst.started_wall)
        if inst.create_time is not None:
            inst.create_time = _num(inst.create_time)
        inst.fds = [_int(fd) for fd in _list(inst.fds)]
        inst.pending = [str(p) for p in _list(inst.pending)]
        inst.successes, inst.failures = _int(inst.successes), _int(inst.failures)
        rec.instance = inst
    return rec


def _run(value: Any) -> RunRecord:
    items = _fields(RunRecord, value)
    sup = _service(items.pop("sup", None))
    if sup.instance is None or sup.runs:
        raise ValueError("runs: a run without an instance")
    run = RunRecord(sup=sup, **items)
    _int(run.number)
    if not isinstance(run.trigger, str):
        raise ValueError("runs: trigger: expected a string")
    run.started, run.elapsed = _num(run.started), _num(run.elapsed)
    if not isinstance(run.timed_out, bool) or not isinstance(run.stopped, bool):
        raise ValueError("runs: expected true or false")
    return run
