"""``hostvisor run``: load the config, take the state folder's lock, raise the descriptor
limit, run the :class:`~supervisor.daemon.Daemon` until it stops, and say how it ended."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio

from supervisor import config, fdlimits
from supervisor.daemon import EXIT_SOFTWARE, Daemon, user_mistake
from supervisor.lock import acquire_lock
from supervisor.paths import resolve_socket_path, resolve_state_dir

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
    loaded = config.load(config_path)
    state_dir = resolve_state_dir(loaded.daemon.state_dir)
    socket_path = resolve_socket_path(socket_option, loaded.daemon.socket)
    lock_fd = acquire_lock(state_dir)
    fdlimits.raise_nofile()
    # At a file size limit (RLIMIT_FSIZE) a write fails with EFBIG instead of killing us;
    # children get the default back (Popen's restore_signals).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    daemon = Daemon(loaded, state_dir=state_dir, socket_path=socket_path)
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
