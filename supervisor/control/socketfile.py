"""The control socket's place on disk (contract section 2: folder 0700, socket 0600).

Used by both ends, so it stays light (no event loop; ``subprocess`` is imported
only when setfacl(1) runs):

- the client asks :func:`unsafe_socket_folder` before it connects;
- the server binds with :func:`bind_socket`: the folder made ours and 0700
  (:func:`prepare_socket_folder`), a stale socket replaced only on ECONNREFUSED,
  the socket 0600 from its creation, ``[daemon] allow_uids`` granted with POSIX
  ACLs (:func:`grant_socket_access`).

Where the socket is (``--socket``, ``$HOSTVISOR_SOCKET``, XDG) is
:mod:`supervisor.paths`.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from supervisor.errors import SocketPathError
from supervisor.paths import check_socket_path

if TYPE_CHECKING:
    import logging

__all__ = [
    "bind_socket",
    "grant_socket_access",
    "prepare_socket_folder",
    "unsafe_socket_folder",
]


def _log() -> logging.Logger:
    """This module's logger, imported on first use: only the daemon's ACL grants warn,
    and ``logging`` costs the client ~3 ms at start-up (issue 14)."""
    import logging

    return logging.getLogger(__name__)


def unsafe_socket_folder(path: Path) -> str | None:
    """Why the folder of the socket ``path`` cannot be trusted, or ``None`` if it can.

    A folder that group or others may write lets another user swap the socket for
    one of their own, so a client would send its commands (and trust the answers)
    to them. A sticky folder (``/tmp``: mode 1777) lets nobody rename or remove a
    file they do not own, so it is trusted when the socket belongs to the caller
    or to root. With POSIX ACLs the group bits are the ACL mask, so a named
    user's write entry counts as "group". A missing folder or socket is not
    judged here: connecting reports it.

    Returns:
        A one-line message naming the folder and the fix (``chmod 700 FOLDER``).
    """
    folder = path.parent
    try:
        info = os.stat(folder)
    except OSError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    writers = [who for who, bit in (("group", 0o020), ("others", 0o002)) if mode & bit]
    if not writers:
        return None
    if mode & stat.S_ISVTX:
        try:
            owner = os.lstat(path).st_uid
        except OSError:
            return None
        if owner in (os.geteuid(), 0):
            return None
        why = f"is sticky but writable by {' and '.join(writers)}; the socket is uid {owner}'s"
    else:
        why = f"is writable by {' and '.join(writers)}"
    return (
        f"refusing the control socket {path}: its folder {folder} {why} (mode {mode:04o}), "
        f"so another user could swap the socket; fix: chmod 700 {folder}"
    )


# --------------------------------------------------------------------------- socket folder
# The control socket's folder is 0700 and the socket 0600 (contract section 2). Mode
# bits cannot name single uids, so ``[daemon] allow_uids`` is granted with POSIX ACLs
# (``acl(5)``): search on the folder, read and write on the socket, for exactly those
# uids, through setfacl(1) of the ``acl`` package. Where that fails, 0700/0600 stay and a
# warning says which uids cannot connect and why.

_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def _has_acl(path: Path) -> list[str]:
    """The ACL extended attributes ``path`` carries (``[]`` where xattrs are unsupported)."""
    found = []
    for name in _ACL_XATTRS:
        try:
            os.getxattr(path, name, follow_symlinks=False)
        except (OSError, AttributeError):  # ENODATA, ENOTSUP; no xattrs on macOS
            continue
        found.append(name)
    return found


def _foreign_entries(folder: Path, own: str) -> bool:
    """Whether ``folder`` holds anything besides our socket (``own``, and its temporary
    names): a folder other programs use (``/run``), not one hostvisor made for itself."""
    try:
        with os.scandir(folder) as entries:
            # Ours: the socket, its temporary names, the fd keeper's socket (fdstore).
            return any(not e.name.startswith((own, f".{own}", "fds-")) for e in entries)
    except OSError:
        return True


def prepare_socket_folder(folder: Path, own: str = "") -> None:
    """Create ``folder`` 0700, or make an existing folder of ours 0700 without any ACL.

    A sticky folder (``/tmp``) and a root-owned folder that already held other files
    (``/run``, even when the daemon runs as root) are used as they are: changing their
    mode would lock every other user and service of the host out of them. ``own`` is
    the socket's file name. An ACL left by an
    earlier run with ``allow_uids`` is removed, and so is a default ACL, which would
    make the kernel ignore the umask when the socket is created.

    Raises:
        SocketPathError: the folder cannot be created, is not a folder, or
            belongs to another user.
    """
    try:
        existed = folder.is_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        raise SocketPathError(f"cannot create socket folder {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SocketPathError(f"socket folder {folder} is not a folder")
    shared = bool(info.st_mode & stat.S_ISVTX) or (
        info.st_uid == 0 and existed and _foreign_entries(folder, own)
    )
    if info.st_uid == os.geteuid() and not shared:
        for name in _has_acl(folder):
            try:
                os.removexattr(folder, name, follow_symlinks=False)
            except OSError as exc:
                raise SocketPathError(
                    f"cannot remove the ACL of socket folder {folder}: {exc.strerror} "
                    f"(fix: setfacl -b {folder})"
                ) from None
        if stat.S_IMODE(folder.lstat().st_mode) != 0o700:
            folder.chmod(0o700)
    elif info.st_uid != 0:
        raise SocketPathError(
            f"socket folder {folder} belongs to uid {info.st_uid}, not to us: "
            "choose a folder of our own with --socket or [daemon] socket"
        )


def _setfacl(path: Path, entries: str) -> str | None:
    """``setfacl --set ENTRIES PATH``; the reason it failed, or None."""
    import shutil
    import subprocess  # here, not at the top: the client imports this module and must start fast

    program = shutil.which("setfacl")
    if program is None:
        return "setfacl was not found (install the acl package)"
    try:
        done = subprocess.run(
            [program, "--set", entries, os.fspath(path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"setfacl failed: {exc}"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"setfacl failed: {lines[-1] if lines else f'exit status {done.returncode}'}"
    return None


def _blocking_parents(folder: Path, uids: Collection[int]) -> list[Path]:
    """Parents of ``folder`` that others cannot search (a 0700 ``$XDG_RUNTIME_DIR``)."""
    blocking = []
    for parent in folder.parents:
        try:
            info = parent.stat()
        except OSError:
            continue
        if info.st_mode & stat.S_IXOTH or info.st_uid in uids or _has_acl(parent):
            continue
        blocking.append(parent)
    return blocking


def grant_socket_access(path: Path, uids: Collection[int]) -> bool:
    """Let exactly ``uids`` reach the socket ``path``: ACLs on its folder (search) and on
    the socket (read and write). Called after the socket is bound 0600 in a 0700 folder.

    The peer check (``SO_PEERCRED``) still decides who is served; this only lets the
    listed uids get that far. Where ACLs cannot be set (no setfacl, or a file system
    without ACL support) 0700/0600 are kept and a warning is logged; a parent folder
    those uids cannot search (a 0700 ``$XDG_RUNTIME_DIR``) is also warned about,
    since only ``[daemon] socket`` in a reachable folder fixes that.

    Args:
        path: the bound socket.
        uids: the uids to admit besides the owner (root needs no grant).

    Returns:
        True if every grant was set.
    """
    uids = sorted(set(uids) - {os.geteuid(), 0})
    if not uids:
        return True
    who = ", ".join(map(str, uids))
    for target, own, perm in ((path.parent, "rwx", "x"), (path, "rw", "rw")):
        entries = ",".join([f"u::{own}", "g::-", "o::-", *(f"u:{uid}:{perm}" for uid in uids)])
        problem = _setfacl(target, entries)
        if problem is not None:
            _log().warning(
                "allow_uids %s cannot connect to the control socket %s: %s; "
                "the folder stays 0700 and the socket 0600",
                who,
                path,
                problem,
            )
            return False
    for parent in _blocking_parents(path.parent, uids):
        mode = stat.S_IMODE(parent.stat().st_mode)
        _log().warning(
            "allow_uids %s cannot reach the control socket %s: its parent folder %s "
            "(mode %04o) does not let them through; set [daemon] socket to a path in a "
            "folder they can search (for example /tmp/hostvisor-shared/hostvisor.sock)",
            who,
            path,
            parent,
            mode,
        )
    return True


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``.

    Only ECONNREFUSED proves a socket stale (``unix(7)``: no one listens). A
    connect that times out (or fails with EAGAIN, as Linux does at once when the
    listener's backlog is full) is a daemon too busy to accept,
    and any other error proves nothing: in both cases the file is left alone.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(
            f"{path} exists and is not a socket: remove it or choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        pass  # stale: unlinked below
    except FileNotFoundError:
        return  # removed meanwhile
    except (TimeoutError, BlockingIOError):  # EAGAIN: Linux's answer when the backlog is full
        raise SocketPathError(
            f"a process listens on {path} but did not answer within 1 s (a busy daemon?); "
            "not replacing it"
        ) from None
    except OSError as exc:
        raise SocketPathError(
            f"cannot tell whether {path} is in use ({exc.strerror or exc}); not replacing it"
        ) from None
    else:
        raise SocketPathError(f"another process is listening on {path}; not replacing it")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


def bind_socket(path: Path, *, allow_uids: Iterable[int] = (), backlog: int = 512) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from its creation.

    The caller holds the daemon's single-instance lock, so a socket file nobody
    listens on (ECONNREFUSED) is stale and is replaced. ``allow_uids`` other than
    ours and root's are granted access with POSIX ACLs (see
    :func:`grant_socket_access`); setting them may run setfacl(1),
    a few milliseconds at start-up.

    Raises:
        SocketPathError: the path is too long, its folder is not ours, a
            regular file (or anything but a socket) is there, or a process
            listens on it (or does not answer in time).
    """
    check_socket_path(path)
    prepare_socket_folder(path.parent, path.name)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created 0600: no window where others could connect
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise SocketPathError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    grant_socket_access(path, set(allow_uids))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
