"""The state folder's lock: one daemon per state folder (``flock(2)``), holding its pid."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from supervisor.errors import AlreadyRunning

__all__ = ["acquire_lock"]


def acquire_lock(state_dir: Path) -> int:
    """Take ``<state>/hostvisor.lock`` (flock) and write our pid in it; return the fd.

    Raises:
        AlreadyRunning: another daemon holds it (its pid in the message).
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / "hostvisor.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise AlreadyRunning(int(text) if text.isdigit() else None, str(path)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
