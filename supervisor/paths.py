"""Default paths of contract section 2: config, state, logs, control socket.

Linux follows the XDG Base Directory specification; macOS uses
``~/Library/Application Support/hostvisor``. Resolution order, first that applies:

- config: ``-c`` · ``$HOSTVISOR_CONFIG`` · ``$XDG_CONFIG_HOME/hostvisor/config.toml``
- socket: ``--socket`` · ``$HOSTVISOR_SOCKET`` · ``[daemon] socket`` ·
  ``$XDG_RUNTIME_DIR/hostvisor/hostvisor.sock`` · ``/tmp/hostvisor-$UID/hostvisor.sock``
- state: ``[daemon] state_dir`` · ``$XDG_STATE_HOME/hostvisor``

The socket file itself (its folder's mode and ACLs, the stale-socket test, the
bind) is :mod:`supervisor.control.socketfile`.

Why not ``platformdirs`` (issue 14): it gives the same XDG and macOS folders, but
only for ``os.environ``, while every function here takes an ``environ`` mapping
(``install`` and the tests resolve paths for another environment than the
process's); it has no answer for the socket's ``/tmp/hostvisor-$UID`` fallback;
and its import costs 5.4 ms (``python -X importtime``, cumulative) on a
``status`` whose whole budget is 30 ms, where these six functions cost nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from supervisor.errors import SocketPathError

__all__ = [
    "SOCKET_PATH_MAX",
    "check_socket_path",
    "default_config_path",
    "default_socket_path",
    "default_state_dir",
    "environ_or_os",
    "home_dir",
    "log_dir",
    "resolve_config_path",
    "resolve_socket_path",
    "resolve_state_dir",
    "service_log_path",
]

#: ``sizeof(sockaddr_un.sun_path)`` less the terminating NUL: 108 on Linux, 104 on macOS.
SOCKET_PATH_MAX = 104 if sys.platform == "darwin" else 108


def environ_or_os(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    """``environ``, or ``os.environ`` when None (every path function takes an ``environ``)."""
    return os.environ if environ is None else environ


def home_dir(env: Mapping[str, str]) -> Path:
    """``$HOME`` of ``env``, else the user's home."""
    return Path(env.get("HOME") or Path.home())


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/hostvisor/config.toml`` (macOS: Application Support)."""
    env = environ_or_os(environ)
    if sys.platform == "darwin":
        return home_dir(env) / "Library/Application Support/hostvisor/config.toml"
    base = env.get("XDG_CONFIG_HOME") or str(home_dir(env) / ".config")
    return Path(base) / "hostvisor" / "config.toml"


def resolve_config_path(option: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The config file: ``-c`` · ``$HOSTVISOR_CONFIG`` · default; made absolute."""
    env = environ_or_os(environ)
    raw = option or env.get("HOSTVISOR_CONFIG") or str(default_config_path(env))
    return Path(os.path.abspath(os.path.expanduser(raw)))


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/hostvisor`` (default ``~/.local/state/hostvisor``)."""
    env = environ_or_os(environ)
    if sys.platform == "darwin":
        return home_dir(env) / "Library/Application Support/hostvisor"
    base = env.get("XDG_STATE_HOME") or str(home_dir(env) / ".local/state")
    return Path(base) / "hostvisor"


def resolve_state_dir(configured: Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """``[daemon] state_dir`` when set, else the default."""
    return configured if configured is not None else default_state_dir(environ)


def log_dir(state_dir: Path) -> Path:
    """``<state>/logs``."""
    return state_dir / "logs"


def service_log_path(state_dir: Path, service: str) -> Path:
    """``<state>/logs/<service>.log``; ``hostvisor`` is the daemon's own log."""
    return log_dir(state_dir) / f"{service}.log"


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/hostvisor/hostvisor.sock``, else ``/tmp/hostvisor-$UID/...``."""
    env = environ_or_os(environ)
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "hostvisor" / "hostvisor.sock"
    return Path(f"/tmp/hostvisor-{os.getuid()}") / "hostvisor.sock"


def resolve_socket_path(
    option: str | None,
    configured: Path | None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """The control socket: ``--socket`` · ``$HOSTVISOR_SOCKET`` · config · default.

    Raises:
        SocketPathError: the path is longer than the OS allows.
    """
    env = environ_or_os(environ)
    raw = option or env.get("HOSTVISOR_SOCKET")
    if raw:
        path = Path(os.path.abspath(os.path.expanduser(raw)))
    elif configured is not None:
        path = configured
    else:
        path = default_socket_path(env)
    check_socket_path(path)
    return path


def check_socket_path(path: Path) -> None:
    """Raise :class:`SocketPathError` if ``path`` does not fit in ``sockaddr_un``."""
    size = len(os.fsencode(str(path)))
    if size >= SOCKET_PATH_MAX:
        raise SocketPathError(
            f"control socket path is {size} bytes, over the OS limit of "
            f"{SOCKET_PATH_MAX - 1}: {path} (set [daemon] socket or --socket to a shorter path)"
        )
