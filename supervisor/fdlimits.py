"""The daemon's descriptor limit (``RLIMIT_NOFILE``) and the one its children get.

At four descriptors per service (two pipes, a log file, a pidfd), systemd's default
soft limit of 1024 (``systemd.exec(5)``, ``LimitNOFILE=``) admits about 250 services.
The daemon raises its soft limit to the hard limit at start, as systemd itself does
for its own process, and spawns every child with the soft limit it started with:
programs that use ``select(2)`` break on descriptors above 1024, which is why
systemd keeps 1024 for services.

A Python spawn cannot set a limit between ``fork`` and ``exec`` without a
``preexec_fn``, which forbids ``vfork`` and costs about 2 ms per spawn here.
Instead :func:`child_limits` lowers the soft limit for the duration of the spawn
(about 0.1 ms) and raises it again: the child inherits the lowered value at
``vfork``. For that to work the numbers below the original limit must stay free:
the long-lived descriptors of each service (pipes, pidfd, log file) are moved above
it by :func:`relocate`, so the spawn's own pipe and other threads' short-lived
descriptors still find room during the window.

:func:`fd_headroom_ok` keeps a reserve: a spawn is refused (as the daemon's
trouble, not the service's failure) while fewer than :data:`RESERVE` descriptors
are left, so the control socket and the daemon log still work at the limit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "RESERVE",
    "FdLimits",
    "child_limits",
    "fd_headroom_ok",
    "limits",
    "raise_nofile",
    "relocate",
]

#: Descriptors kept free for the control socket, its clients and the daemon log.
RESERVE = 64
#: Daemon-side errnos: the daemon is short of a resource, the service did nothing wrong.
DAEMON_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass(frozen=True, slots=True)
class FdLimits:
    """``RLIMIT_NOFILE`` as (soft, hard) for the daemon and for its children."""

    daemon: tuple[int, int]
    children: tuple[int, int]

    @property
    def raised(self) -> bool:
        """True when the daemon's soft limit differs from its children's."""
        return self.daemon != self.children


_current = FdLimits(daemon=(0, 0), children=(0, 0))


def raise_nofile() -> FdLimits:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (capped at 2**20 where the hard
    limit is unlimited); remember the original soft limit for children.

    Returns:
        The limits in force. Never raises: where the limit cannot be changed, both
        stay as they were.
    """
    global _current
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    daemon = (soft, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            daemon = (target, hard)
    _current = FdLimits(daemon=daemon, children=(soft, hard))
    return _current


def limits() -> FdLimits:
    """The limits set by :func:`raise_nofile` (both (0, 0) before it ran)."""
    return _current


@contextlib.contextmanager
def child_limits() -> Iterator[None]:
    """Within: the soft limit is the children's (see the module docstring); no-op when
    :func:`raise_nofile` did not raise it."""
    current = _current
    if not current.raised:
        yield
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, current.children)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, current.daemon)


def relocate(fd: int) -> int:
    """Move a long-lived descriptor above the children's soft limit (``F_DUPFD_CLOEXEC``)
    and return its new number; ``fd`` itself when the limit was not raised.

    Keeping the numbers below the original soft limit free is what lets a spawn run
    within :func:`child_limits`: ``subprocess`` opens its own pipe there, and other
    threads keep finding free descriptors. Never raises: where no higher number is
    free, ``fd`` stays where it is.
    """
    current = _current
    if not current.raised or fd >= current.children[0]:
        return fd
    try:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, current.children[0])
    except OSError:
        return fd
    os.close(fd)
    return moved


def fd_headroom_ok(highest_new_fd: int) -> bool:
    """True if a descriptor just opened as ``highest_new_fd`` leaves the reserve free.

    The kernel hands out the lowest free number, so a new descriptor numbered within
    :data:`RESERVE` of the soft limit means the table is (nearly) full.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft == resource.RLIM_INFINITY or highest_new_fd < soft - RESERVE
