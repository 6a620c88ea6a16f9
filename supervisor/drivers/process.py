"""The process driver: spawn one service process, detect its end, stop its whole group.

Spawning (``subprocess.Popen``, argv, never a shell) happens in the event-loop
thread so that the pid is :meth:`~supervisor.reaper.Reaper.track`-ed before the
reaper can run. Each process gets its own session and process group
(``setsid``), ``stdin`` on ``/dev/null``, stdout and stderr on two pipes
drained into ``<state>/logs/<service>.log``, no descriptor beyond 0-2, and the
environment of contract section 4 (:func:`build_env`).

The life of one spawned process group (waiting, signalling, the sweep) is
:class:`~supervisor.drivers.process_handle.ProcessHandle`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psutil
from anyio.abc import TaskGroup

from supervisor.drivers.process_handle import MARKER, RUN_MARKER, SCOPE, ProcessHandle
from supervisor.errors import DriverError, SpawnError
from supervisor.fdlimits import child_limits, fd_headroom_ok, limits, relocate
from supervisor.logfile import RotatingLog
from supervisor.logfiles import (
    CAPTURE_LIMIT,
    LogDrops,
    capture,
    open_pipe,
    pipe_budget,
)
from supervisor.loghub import LogHub
from supervisor.paths import service_log_path
from supervisor.reaper import Reaper, child_pids, scan_marked
from supervisor.spec import ProcessSpec, ServiceSpec
from supervisor.states import ExitStatus

__all__ = [
    "DAEMON_OTEL_ENV",
    "MARKER",
    "SCOPE",
    "STRIPPED_ENV",
    "CommandResult",
    "ProcessDriver",
    "ProcessHandle",
    "build_env",
]

#: Never passed to a child (contract section 4): they describe the daemon's own
#: systemd notification socket, watchdog and socket activation.
STRIPPED_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)
#: The daemon's own OpenTelemetry identity and credentials: not inherited by children
#: (a unit's ``env`` may still set them). The OTLP exporter's per-signal forms included.
DAEMON_OTEL_ENV = frozenset(
    {"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_HEADERS"}
    | {f"OTEL_EXPORTER_OTLP_{signal}_HEADERS" for signal in ("TRACES", "METRICS", "LOGS")}
)
#: Bytes asked for each service pipe (``F_SETPIPE_SZ``), within the driver's
#: pipe budget (see :func:`supervisor.logfiles.pipe_budget`); the default pipe is 64 KiB.
PIPE_SIZE = 1 << 20
#: Seconds a service's output may still be read once its group and escapees are gone
#: Seconds a command's output may still be read after its group is gone.
CAPTURE_GRACE = 0.5
#: Seconds one scan of our marked processes serves stopping strangers (see ``marked``).
MARKED_FRESH = 0.25
#: ``F_GETPIPE_SZ`` (``fcntl(2)``, Linux); the fcntl module names it from Python 3.10.
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def _check_headroom(highest_fd: int) -> None:
    """Raise SpawnError (EMFILE, the daemon's trouble) when a spawn would eat into the
    descriptor reserve kept for the control socket and the daemon log."""
    if not fd_headroom_ok(highest_fd):
        soft = limits().daemon[0] or highest_fd
        raise SpawnError(
            f"spawn deferred: the daemon is out of file descriptors (limit {soft}); "
            "raise LimitNOFILE= (systemd) or `ulimit -n` for hostvisor",
            errno=errno.EMFILE,
        )


def build_env(
    base: Mapping[str, str], extra: Mapping[str, str], service: str, scope: str = ""
) -> dict[str, str]:
    """A child's environment: ``base`` + ``extra`` (wins) + ``HOSTVISOR_SERVICE=service``
    (+ ``HOSTVISOR_STATE_DIR=scope`` when given), without :data:`STRIPPED_ENV`."""
    env = {k: v for k, v in base.items() if k not in STRIPPED_ENV}
    if extra:
        env.update((k, v) for k, v in extra.items() if k not in STRIPPED_ENV)
    env[MARKER] = service
    if scope:
        env[SCOPE] = scope
    elif SCOPE in env:
        del env[SCOPE]
    return env


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """How a command of :meth:`ProcessDriver.run_command` ended.

    Attributes:
        code, signal: as :class:`~supervisor.states.ExitStatus` (one is set).
        timed_out: True if it was killed at its timeout (then ``signal`` is SIGKILL).
        stdout, stderr: the last 64 KiB of each, decoded as UTF-8 (errors replaced).
        duration: seconds from spawn until the group was gone.
    """

    code: int | None
    signal: int | None
    timed_out: bool
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        """True for exit code 0 within the timeout."""
        return self.code == 0 and not self.timed_out

    def tail(self, n_lines: int = 10) -> str:
        """The last ``n_lines`` lines of stderr, joined by newlines."""
        if n_lines <= 0:
            return ""
        return "\n".join(self.stderr.rstrip("\n").split("\n")[-n_lines:])

    def describe(self) -> str:
        """``"timed out"``, ``"exit code 1"`` or ``"signal SIGKILL"``."""
        if self.timed_out:
            return "timed out"
        return ExitStatus(code=self.code, signal=self.signal).describe()


class ProcessDriver:
    """Starts service processes and runs short commands; satisfies ``Driver``.

    Args:
        state_dir: the state folder; logs go to ``<state_dir>/logs``.
        reaper: the daemon's reaper; spawned pids are tracked in it so that it
            never reaps them, and its notifications speed up group checks.
        loghub: live log followers, fed by the drains.
        log_drops: service name -> its :class:`~supervisor.logfiles.LogDrops` (lines a
            full disk made us drop, kept across instances); ``None``: not counted.
        base_env: the environment children start from (default ``os.environ``),
            copied at construction.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        reaper: Reaper | None = None,
        loghub: LogHub | None = None,
        log_drops: Callable[[str], LogDrops] | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.reaper = reaper
        self.loghub = loghub
        self.log_drops = log_drops
        # Copied once, without the stripped variables: spawning then only merges.
        self.base_env: dict[str, str] = build_env(
            os.environ if base_env is None else base_env, {}, ""
        )
        del self.base_env[MARKER]
        for name in [k for k in self.base_env if k in DAEMON_OTEL_ENV]:
            del self.base_env[name]
        #: ``HOSTVISOR_STATE_DIR`` of our children: which daemon's they are.
        self.scope = str(state_dir)
        #: Holds duplicates of the pipes' read ends across a daemon crash
        #: (:class:`supervisor.fdstore.FdStore`), once the daemon set one.
        self.fdstore: Any = None
        self._live: set[int] = set()
        self._marked: tuple[float, dict[str, list[psutil.Process]]] | None = None
        self._marked_lock = anyio.Lock()
        self._devnull = -1
        self._pipe_budget = pipe_budget()
        self._pipe_bytes = 0

    def __repr__(self) -> str:
        return f"<ProcessDriver {self.state_dir} live={len(self._live)}>"

    def orphans(self) -> list[psutil.Process]:
        """The daemon's children that no instance or command of ours tracks: descendants of
        services reparented to the daemon (a subreaper) that carry no marker we could match
        to a unit. Stopped at shutdown, as systemd stops a unit's whole control group."""
        found = []
        for pid in child_pids():
            if pid in self._live:
                continue
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(pid))
        return found

    @property
    def connected(self) -> bool:
        """Always True: there is no engine between us and a process."""
        return True

    def _pipe(self, size: int) -> tuple[int, int, int]:
        if self._pipe_bytes + size > self._pipe_budget:
            size = 0
        read_fd, write_fd, granted = open_pipe(size)
        self._pipe_bytes += granted
        # The read end lives as long as the instance: above the children's fd limit.
        # The write end is closed right after the spawn.
        return relocate(read_fd), write_fd, granted

    def close(self) -> None:
        """Release the shared ``/dev/null`` descriptor (the driver stays usable)."""
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1

    async def adopt(self, spec: ServiceSpec, *, task_group: TaskGroup) -> None:
        """Processes are never adopted: a process outliving the daemon is a stale
        holder that port reclaim deals with."""
        return None

    async def start(self, spec: ServiceSpec, *, task_group: TaskGroup) -> ProcessHandle:
        """Spawn ``spec``'s command; its log drains run in ``task_group``.

        Raises:
            SpawnError: missing program or workdir, permission denied, or the log
                file is unusable (a symbolic link...): errno and path in the message.
            DriverError: ``spec`` is not a process unit.
        """
        if not isinstance(spec.target, ProcessSpec):
            raise DriverError(f"{spec.name}: not a process unit")
        log = self._open_log(spec)
        fds: list[int] = []
        granted = 0
        try:
            out_r, out_w, size = self._pipe(PIPE_SIZE)
            fds += (out_r, out_w)
            granted += size
            err_r, err_w, size = self._pipe(PIPE_SIZE)
            fds += (err_r, err_w)
            granted += size
            _check_headroom(max(fds))
            started_at = anyio.current_time()
            popen = self._spawn(
                spec.target.command,
                cwd=spec.workdir,
                env=build_env(self.base_env, spec.env, spec.name, self.scope),
                stdout=out_w,
                stderr=err_w,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            self._pipe_bytes -= granted
            log.close()
            raise
        os.close(out_w)
        os.close(err_w)
        handle = ProcessHandle(
            popen, service=spec.name, started_at=started_at, reaper=self.reaper, live=self._live
        )
        handle.run = spec.env.get(RUN_MARKER, "")
        self._start_drain(handle, (out_r, err_r), log, granted=granted, task_group=task_group)
        return handle

    def _start_drain(
        self,
        handle: ProcessHandle,
        fds: tuple[int, ...],
        log: RotatingLog,
        *,
        granted: int,
        task_group: TaskGroup,
        pending: Sequence[bytes] = (),
    ) -> None:
        name = f"{handle.service}/{handle.pid}"
        handle.fds = fds
        store = self.fdstore
        if store is not None:
            # Sent now, before any await: a child whose read ends only the daemon holds
            # dies of EPIPE with a daemon killed -9 (batching these puts over one pass of
            # the event loop left every child of a start-up in that window).
            store.put(name, fds)
            if store.pid:
                # The keeper is our child but no orphan: leaving it out of the sweeps
                # keeps the common case free of /proc walks (about 1 ms per restart).
                self._live.add(store.pid)

        def release() -> None:
            self._pipe_bytes -= granted
            if store is not None:
                store.drop([name])

        drops = self.log_drops(handle.service) if self.log_drops is not None else None
        drain = partial(handle._drain, pending=pending)
        task_group.start_soon(drain, fds, log, self.loghub, drops, release)

    def resume(
        self,
        service: str,
        *,
        pid: int,
        started_at: float,
        create_time: float | None,
        own_child: bool,
        pidfd: int | None = None,
    ) -> ProcessHandle:
        """A handle on a process of ``service`` that already runs; its output is drained
        once :meth:`attach` is called (from the supervisor's task group).

        ``own_child``: still our child (after ``hostvisor reexec``: exit statuses stay
        exact), or adopted after a crash (``pidfd`` opened and its identity checked by
        the caller; its exit status cannot be known).
        """
        if own_child and self.reaper is not None:
            self.reaper.track(pid)
        handle = ProcessHandle(
            None,
            pid=pid,
            pidfd=pidfd,
            own_child=own_child,
            create_time=create_time,
            service=service,
            started_at=started_at,
            reaper=self.reaper,
            live=self._live,
        )
        handle.adopted = True
        handle.scope = self.scope
        if not own_child:
            handle.marked_scan = self.marked
        return handle

    async def marked(self) -> dict[str, list[psutil.Process]]:
        """Every live process of ours anywhere (``HOSTVISOR_SERVICE`` and our
        ``HOSTVISOR_STATE_DIR``), by service: one pass over ``/proc`` in a worker thread,
        shared by the callers of the next :data:`MARKED_FRESH` seconds."""
        async with self._marked_lock:
            now = anyio.current_time()
            if self._marked is None or now - self._marked[0] > MARKED_FRESH:
                found = await anyio.to_thread.run_sync(scan_marked, self.scope)
                self._marked = (anyio.current_time(), found)
            return self._marked[1]

    def attach(
        self,
        handle: ProcessHandle,
        spec: ServiceSpec,
        *,
        fds: Sequence[int],
        pending: Sequence[bytes] = (),
        task_group: TaskGroup,
    ) -> bool:
        """Drain ``fds`` (the read ends of a resumed instance's stdout and stderr, ours
        from now on) into the service's log, from the partial lines ``pending``.

        Returns:
            False when the log cannot be opened (the fds are closed then) or there are
            no fds (the output was lost with the previous daemon).
        """
        try:
            log = self._open_log(spec) if fds else None
        except SpawnError:
            log = None
        if log is None:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return False
        granted = 0
        for fd in fds:
            os.set_inheritable(fd, False)
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                granted += fcntl.fcntl(fd, _F_GETPIPE_SZ)
        self._pipe_bytes += granted
        self._start_drain(
            handle, tuple(fds), log, granted=granted, task_group=task_group, pending=pending
        )
        return True

    async def log_note(self, spec: ServiceSpec, line: str) -> None:
        """Append ``line`` (one line of our own, e.g. a job run's header) to ``spec``'s log
        through the log's one shared file, and show it to ``logs -f`` followers. A log
        that cannot be written is left alone here: the run's spawn reports it."""

        def write() -> None:
            log = self._open_log(spec)
            try:
                log.append(line.encode("utf-8", "replace") + b"\n")
            finally:
                log.close()

        with contextlib.suppress(SpawnError, OSError):
            await anyio.to_thread.run_sync(write)
        if self.loghub is not None and self.loghub.has_subscribers(spec.name):
            self.loghub.publish(spec.name, [line])

    def _open_log(self, spec: ServiceSpec) -> RotatingLog:
        path = service_log_path(self.state_dir, spec.name)
        try:
            # RotatingLog creates a missing logs folder itself (0700).
            return RotatingLog(path, max_size=spec.logs.max_size, backups=spec.logs.backups)
        except DriverError as exc:
            raise SpawnError(str(exc), errno=errno.ELOOP, path=str(path)) from exc
        except OSError as exc:
            raise SpawnError.from_oserror(exc, argv=(), workdir=str(path)) from exc

    def _spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        stdout: int,
        stderr: int,
    ) -> subprocess.Popen[bytes]:
        if not argv:
            raise SpawnError("spawn failed: empty command")
        if not os.path.isdir(cwd):  # name the workdir, not the program
            code = errno.ENOTDIR if os.path.exists(cwd) else errno.ENOENT
            exc = OSError(code, f"workdir {os.strerror(code).lower()}", str(cwd))
            raise SpawnError.from_oserror(exc, argv=argv, workdir=str(cwd))
        if self._devnull < 0:
            self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with child_limits():  # the soft RLIMIT_NOFILE the daemon started with
                popen = subprocess.Popen(
                    list(argv),
                    cwd=cwd,
                    env=env,
                    stdin=self._devnull,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise SpawnError.from_oserror(exc, argv=argv, workdir=str(cwd)) from exc
        # Still in the event-loop thread, no await since Popen: the reaper has not run.
        if self.reaper is not None:
            self.reaper.track(popen.pid)
        return popen

    async def run_command(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        service: str,
        timeout: float,
    ) -> CommandResult:
        """Run a short command (preflight, exec probe, hook) to completion.

        Same spawn path and environment rules as a service (own session,
        ``env`` over the daemon's, the marker). The whole process group is
        SIGKILLed at ``timeout`` seconds, or when the caller is cancelled.

        Raises:
            SpawnError: it could not start (errno and path in the message).
        """
        fds: list[int] = []
        try:
            out_r, out_w, _ = self._pipe(0)
            fds += (out_r, out_w)
            err_r, err_w, _ = self._pipe(0)
            fds += (err_r, err_w)
            _check_headroom(max(fds))
            started = anyio.current_time()
            popen = self._spawn(
                argv,
                cwd=cwd,
                env=build_env(self.base_env, env, service, self.scope),
                stdout=out_w,
                stderr=err_w,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(out_w)
        os.close(err_w)
        handle = ProcessHandle(
            popen, service=service, started_at=started, reaper=self.reaper, live=self._live
        )
        out, err = bytearray(), bytearray()
        timed_out = False
        try:
            async with anyio.create_task_group() as tg:
                done = [anyio.Event(), anyio.Event()]
                tg.start_soon(capture, out_r, out, done[0])
                tg.start_soon(capture, err_r, err, done[1])
                with anyio.move_on_after(timeout):
                    await handle.wait_group()
                if not handle.group_gone:
                    timed_out = True
                    await handle.kill()
                # A process that left the group may hold the pipes open: do not wait for it.
                with anyio.move_on_after(CAPTURE_GRACE):
                    await done[0].wait()
                    await done[1].wait()
                tg.cancel_scope.cancel()
        finally:
            if not handle.group_gone:  # cancelled from outside: never leave the group behind
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await handle.kill()
        status = handle.status or ExitStatus(signal=int(signal.SIGKILL))
        return CommandResult(
            code=status.code,
            signal=status.signal,
            timed_out=timed_out,
            stdout=bytes(out[-CAPTURE_LIMIT:]).decode("utf-8", "replace"),
            stderr=bytes(err[-CAPTURE_LIMIT:]).decode("utf-8", "replace"),
            duration=anyio.current_time() - started,
        )
