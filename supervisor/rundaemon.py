"""``hostvisor run``: load the config, take the state folder's lock, raise the descriptor
limit, run the :class:`~supervisor.daemon.Daemon` until it stops, and say how it ended."""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from pathlib import Path

import anyio

from supervisor import config, fdlimits
from supervisor.daemon import EXIT_SOFTWARE, Daemon, user_mistake
from supervisor.lock import acquire_lock
from supervisor.paths import resolve_socket_path, resolve_state_dir
from supervisor.reexec import ENV as REEXEC_ENV
from supervisor.statefile import StateFile, StateFileError, read_state

__all__ = ["run_daemon"]


def run_daemon(*, config_path: Path, socket_option: str | None = None) -> int:
    """Load the config, take the state folder's lock, and run until stopped.

    Returns:
        The exit code: 0 after a clean stop; 70 (EX_SOFTWARE) after an internal error,
        once every service was stopped.

    Raises:
        ConfigError: the config is invalid.
        AlreadyRunning: another daemon uses the same state folder.
        SocketPathError: the socket path is unusable.
    """
    resume_from = os.environ.pop(REEXEC_ENV, None)
    loaded = config.load(config_path)
    state_dir = resolve_state_dir(loaded.daemon.state_dir)
    socket_path = resolve_socket_path(socket_option, loaded.daemon.socket)
    resumed, lock_fd, listener = (
        _inherited(resume_from, state_dir) if resume_from else (None, -1, None)
    )
    if lock_fd < 0:
        lock_fd = acquire_lock(state_dir)
    fdlimits.raise_nofile()
    # At a file size limit (RLIMIT_FSIZE) a write fails with EFBIG instead of killing us;
    # children get the default back (Popen's restore_signals).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    daemon = Daemon(
        loaded,
        state_dir=state_dir,
        socket_path=socket_path,
        lock_fd=lock_fd,
        resumed=resumed,
        listener=listener,
    )
    # What exists now (the modules, the config) lives as long as the process: moved out of
    # the collector's reach, a full collection no longer walks it (~50 ms each time, the
    # largest part of the daemon's idle cost with `top` open; bench/bench_resources.py).
    gc.collect()
    gc.freeze()
    try:
        anyio.run(daemon.main)
    except Exception as exc:
        # A user's mistake found inside the task group (a socket path held by another
        # process, a regular file at it) is raised alone, so the CLI prints one line.
        mistake = user_mistake(exc)
        if mistake is not None:
            raise mistake from None
        return daemon.exit_code or EXIT_SOFTWARE  # said once in the daemon log
    finally:
        os.close(lock_fd)
    return daemon.exit_code


def _inherited(path: str, state_dir: Path) -> tuple[StateFile | None, int, socket.socket | None]:
    """After ``hostvisor reexec``: the state the old code wrote, the lock it held and its
    listening socket, all inherited across ``exec``. ``(None, -1, None)`` when the file is
    not a re-exec record of this very process (then we start as after a crash)."""
    try:
        state = read_state(Path(path))
    except StateFileError as exc:
        sys.stderr.write(f"hostvisor: re-exec: {exc}; starting as after a crash\n")
        return None, _drop_inherited(state_dir), None
    record = state.reexec if state is not None else None
    if state is None or record is None or state.pid != os.getpid():
        return None, _drop_inherited(state_dir), None
    lock = state_dir / "hostvisor.lock"
    try:
        same = os.path.samestat(os.fstat(record.lock_fd), os.stat(lock))
        listener = socket.socket(fileno=record.listener_fd) if same else None
    except OSError as exc:
        sys.stderr.write(f"hostvisor: re-exec: inherited descriptors are gone ({exc})\n")
        same, listener = False, None
    if not same or listener is None:
        return None, _drop_inherited(state_dir), None
    for fd in (record.lock_fd, record.listener_fd, record.reply_fd):
        if fd >= 0:
            os.set_inheritable(fd, False)
    listener.setblocking(False)
    return state, record.lock_fd, listener


def _drop_inherited(state_dir: Path) -> int:
    """The handover record is unusable: close every descriptor the old code left
    inheritable (its listener, pipes, the reply connection), except the state folder's
    lock, whose fd is returned (-1 if none): we still hold it, and a second open of the
    file could not take it. The services are then adopted as after a crash."""
    lock_fd = -1
    try:
        lock = os.stat(state_dir / "hostvisor.lock")
        names = os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd")
    except OSError:
        return -1
    for name in names:
        fd = int(name)
        try:
            if fd < 3 or not os.get_inheritable(fd):
                continue
            if lock_fd < 0 and os.path.samestat(os.fstat(fd), lock):
                lock_fd = fd
                os.set_inheritable(fd, False)
                continue
            os.close(fd)
        except OSError:
            continue
    return lock_fd
