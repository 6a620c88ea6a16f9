"""The process driver: spawn one service process, detect its end, stop its whole group.

Spawning (``subprocess.Popen``, argv, never a shell) happens in the event-loop
thread so that the pid is :meth:`~supervisor.reaper.Reaper.track`-ed before the
reaper can run. Each process gets its own session and process group
(``setsid``), ``stdin`` on ``/dev/null``, stdout and stderr on two pipes
drained into ``<state>/logs/<service>.log``, no descriptor beyond 0-2, and the
environment of contract section 4 (:func:`build_env`).

How a reused pid is never signalled:

- the leader is waited on and signalled through a pidfd (``pidfd_open(2)``)
  opened while it was our unreaped child, so it names that process forever;
- its process group is signalled with ``killpg`` only while the leader is
  unreaped (an unreaped leader pins its pid, hence the group number), or right
  after ``killpg(pgid, 0)`` showed the group non-empty, with no ``await`` in
  between: Linux never hands out a number still used as a pgid, and with the
  daemon as subreaper the last member's zombie is reaped by our reaper, in this
  same thread, so the group cannot empty between the check and the signal;
- any other process (an escaped descendant) is signalled through a pidfd after
  checking that its start time still matches (``psutil.Process.is_running``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import psutil
from anyio.abc import TaskGroup

from supervisor.errors import DriverError, SpawnError
from supervisor.fdlimits import child_limits, fd_headroom_ok, limits, relocate
from supervisor.logfile import RotatingLog
from supervisor.logfiles import (
    CAPTURE_LIMIT,
    LogDrops,
    capture,
    drain_all,
    open_pipe,
    pipe_budget,
)
from supervisor.loghub import LogHub
from supervisor.paths import service_log_path
from supervisor.reaper import (
    Reaper,
    WaitThread,
    child_pids,
    find_marked,
    open_pidfd,
    signal_verified,
    wait_gone,
    waitpid_blocking,
)
from supervisor.spec import ProcessSpec, ServiceSpec, StopSpec
from supervisor.states import ExitStatus

__all__ = [
    "DAEMON_OTEL_ENV",
    "MARKER",
    "STRIPPED_ENV",
    "CommandResult",
    "ProcessDriver",
    "ProcessHandle",
    "build_env",
]

#: The variable that marks a process as one of ours; its value is the service name.
MARKER = "HOSTVISOR_SERVICE"
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
#: Seconds between re-checks of a group whose leader exited (see _wait_group_gone).
GROUP_RECHECK = 1.0
#: Seconds to wait for SIGKILLed escaped descendants to go.
ESCAPEE_KILL_WAIT = 5.0
#: Seconds a service's output may still be read once its group and escapees are gone
#: (a process we could not recognise may hold the pipes open).
DRAIN_GRACE = 1.0
#: Seconds a command's output may still be read after its group is gone.
CAPTURE_GRACE = 0.5


class ProcessHandle:
    """One running process group; satisfies :class:`~supervisor.drivers.base.Handle`.

    Attributes:
        pid: the leader's pid, which is also the group and session id.
        pgid: the process group id (= ``pid``).
        started_at: ``anyio.current_time()`` just before the spawn (monotonic seconds).
        service: the service name (the ``HOSTVISOR_SERVICE`` marker).
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        service: str,
        started_at: float,
        reaper: Reaper | None,
        live: set[int],
    ) -> None:
        self._popen = popen
        self.pid: int = popen.pid
        self.pgid: int = popen.pid
        self.service = service
        self.started_at = started_at
        self._reaper = reaper
        self._live = live
        live.add(self.pid)
        # Our unreaped child: the pidfd cannot name another process.
        pidfd = open_pidfd(self.pid)
        self._pidfd = relocate(pidfd) if pidfd is not None else None
        self._leader: ExitStatus | None = None
        self._waiter: WaitThread | None = None
        self._group_gone = False
        self._lock = anyio.Lock()
        self._drained = anyio.Event()
        self._swept = anyio.Event()
        self._create_time: float | None = None

    def __repr__(self) -> str:
        state = self._leader.describe() if self._leader else "running"
        return f"<ProcessHandle {self.service} pid={self.pid}: {state}>"

    @property
    def create_time(self) -> float | None:
        """The leader's start time as psutil reports it (epoch seconds), to recognise
        it later by ``(pid, create_time)``; ``None`` once it has been reaped.

        Read on first access and kept: reading ``/proc/<pid>/stat`` right after
        the spawn would wait for the exec to settle (~0.6 ms on every restart).
        """
        if self._create_time is None and self._leader is None:
            with contextlib.suppress(psutil.Error):
                self._create_time = psutil.Process(self.pid).create_time()
        return self._create_time

    @property
    def container_id(self) -> None:
        """Always ``None``: a process is not a container."""
        return None

    @property
    def status(self) -> ExitStatus | None:
        """The main process's exit status once it has been reaped; else ``None``."""
        return self._leader

    @property
    def leader_exited(self) -> bool:
        """True once the leader has been reaped (members of its group may remain)."""
        return self._leader is not None

    async def wait(self) -> ExitStatus:
        """Wait until the main process (the group leader) has exited; return its status.

        As systemd's main process (``systemd.service(5)``, ``KillMode=control-group``):
        its exit is the instance's exit, even while other members of its group or
        escaped descendants still run; :meth:`stop` then sweeps those. Idempotent and
        safe to call from several tasks; cancelling one waiter leaves the others waiting.
        """
        if self._leader is not None:
            return self._leader
        async with self._lock:
            if self._leader is None:
                self._leader = await self._wait_leader()
        return self._leader

    @property
    def group_gone(self) -> bool:
        """True once :meth:`wait_group` has seen the leader and its whole group gone."""
        return self._group_gone

    async def wait_group(self) -> ExitStatus:
        """Wait until the leader has exited AND no process of its group remains;
        return the leader's status."""
        status = await self.wait()
        if not self._group_gone:
            await self._wait_group_gone()
            self._group_gone = True
        return status

    async def _wait_leader(self) -> ExitStatus:
        if self._pidfd is not None:
            # Readable once the leader has exited: no polling, no thread.
            await anyio.wait_readable(self._pidfd)
            raw = waitpid_blocking(self.pid)
        else:
            # No pidfd (macOS, Linux < 5.3): one thread blocks in waitpid for the
            # leader's whole life. A cancelled wait() leaves it running and the
            # next wait() takes its result (a second waitpid would find nothing).
            if self._waiter is None:
                self._waiter = WaitThread(self.pid)
            raw = await self._waiter.result()
        return self._reaped(raw)

    def _reaped(self, raw: int | None) -> ExitStatus:
        # None only if something outside this driver reaped our child.
        status = ExitStatus(code=255) if raw is None else ExitStatus.from_wait_status(raw)
        # Keep Popen from ever polling this pid again (its __del__ and
        # subprocess._cleanup would waitpid() a number that may be reused).
        self._popen.returncode = status.code if status.signal is None else -status.signal
        if self._reaper is not None:
            self._reaper.untrack(self.pid)
        self._live.discard(self.pid)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        return status

    def _group_exists(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed its uid: it still exists
            return True
        return True

    async def _wait_group_gone(self) -> None:
        while True:
            event = self._reaper.reaped_event() if self._reaper is not None else None
            if not self._group_exists():
                return
            # Members outlived the leader. Reparented to the daemon (subreaper), their
            # exit raises SIGCHLD and the reaper wakes us right after reaping them.
            # Members reaped by someone else (no subreaper, or a descendant reaping
            # its own children) tell us nothing: the slow re-check bounds how late
            # we notice that the group is empty.
            with anyio.move_on_after(GROUP_RECHECK):
                if event is not None:
                    await event.wait()
                else:
                    await anyio.sleep_forever()

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to every process of the group, if any remains (see module docs).

        Returns:
            True if the group existed and was signalled.
        """
        # No await between the emptiness check and killpg: see the module docstring.
        if self._leader is None or self._group_exists():
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return False
            return True
        return False

    async def kill(self) -> ExitStatus:
        """SIGKILL the whole group and wait until it is gone."""
        self.signal_group(signal.SIGKILL)
        return await self.wait_group()

    async def stop(self, stop: StopSpec) -> ExitStatus:
        """Stop what is left of the instance: ``stop.signal`` to the group and to escaped
        descendants carrying this service's marker, up to ``stop.timeout`` seconds for
        them to go, then SIGKILL.

        Also the sweep after the leader exited on its own (systemd's
        ``KillMode=control-group``): the remaining members and marked escapees get the
        same treatment; with nothing left it returns at once. The log drains go on until
        EOF, but output still held open by a process we could not recognise is cut off
        :data:`DRAIN_GRACE` seconds after this returns, so no pipe, log descriptor or task
        outlives the instance. Returns the leader's exit status.
        """
        deadline = anyio.current_time() + stop.timeout
        escaped = await self._find_escapees()
        for proc in escaped:
            signal_verified(proc, stop.signal)
        signalled = self.signal_group(stop.signal)
        if signalled:
            with anyio.move_on_after(stop.timeout):
                await self.wait_group()
            if not self._group_gone:
                self.signal_group(signal.SIGKILL)
        status = await self.wait_group()
        if signalled or escaped:
            # Escapees made or reparented to us meanwhile get the same treatment. (With
            # nothing signalled and no await since the first walk, it would find the same.)
            known = {(p.pid, p.create_time()) for p in escaped}
            for proc in await self._find_escapees():
                if (proc.pid, proc.create_time()) not in known:
                    signal_verified(proc, stop.signal)
                    escaped.append(proc)
        if escaped:
            left = max(0.0, deadline - anyio.current_time())
            remaining = await wait_gone(escaped, left)
            for proc in remaining:
                signal_verified(proc, signal.SIGKILL)
            if remaining:
                await wait_gone(remaining, ESCAPEE_KILL_WAIT)
        self._swept.set()  # the drains may now be cut off after DRAIN_GRACE (see _drain)
        return status

    async def _find_escapees(self) -> list[psutil.Process]:
        roots = self._escape_roots()
        if not roots:
            return []  # the common case: no orphan of ours anywhere, no /proc walk
        # A walk of /proc may take a while on a busy host: never in the event loop.
        return await anyio.to_thread.run_sync(
            lambda: find_marked(roots, MARKER, self.service, skip_pgid=self.pgid)
        )

    def _escape_roots(self) -> list[int]:
        # Escaped descendants are below the leader while it lives, or were
        # reparented to the daemon (untracked children of ours), or below those.
        roots = [self.pid] if self._leader is None else []
        roots.extend(p for p in child_pids() if p not in self._live)
        return roots

    async def drained(self) -> None:
        """Wait until both log drains have hit EOF and the log file is closed."""
        await self._drained.wait()

    async def _drain(
        self,
        fds: Sequence[int],
        log: RotatingLog,
        hub: LogHub | None,
        drops: LogDrops | None,
        release: Callable[[], None],
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def cut_off_later() -> None:
                    # Output still held open DRAIN_GRACE s after the instance was swept
                    # belongs to a process we could not recognise: stop reading it.
                    await self._swept.wait()
                    await anyio.sleep(DRAIN_GRACE)
                    tg.cancel_scope.cancel()

                tg.start_soon(cut_off_later)
                await drain_all(fds, log, hub=hub, key=self.service, drops=drops)
                tg.cancel_scope.cancel()
        finally:
            release()
            self._drained.set()


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


def build_env(base: Mapping[str, str], extra: Mapping[str, str], service: str) -> dict[str, str]:
    """A child's environment: ``base`` + ``extra`` (wins) + ``HOSTVISOR_SERVICE=service``,
    without :data:`STRIPPED_ENV`."""
    env = {k: v for k, v in base.items() if k not in STRIPPED_ENV}
    if extra:
        env.update((k, v) for k, v in extra.items() if k not in STRIPPED_ENV)
    env[MARKER] = service
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
        self._live: set[int] = set()
        self._devnull = -1
        self._pipe_budget = pipe_budget()
        self._pipe_bytes = 0

    def __repr__(self) -> str:
        return f"<ProcessDriver {self.state_dir} live={len(self._live)}>"

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
                env=build_env(self.base_env, spec.env, spec.name),
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

        def release() -> None:
            self._pipe_bytes -= granted

        drops = self.log_drops(spec.name) if self.log_drops is not None else None
        task_group.start_soon(handle._drain, (out_r, err_r), log, self.loghub, drops, release)
        return handle

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
                env=build_env(self.base_env, env, service),
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
