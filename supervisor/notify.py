"""sd_notify(3) and sd_watchdog_enabled(3): telling systemd we are ready and alive.

Under a ``Type=notify`` (or ``Type=notify-reload``) unit systemd passes the
path of a datagram socket in ``NOTIFY_SOCKET``; a leading ``@`` names a Linux
abstract socket. The daemon sends newline-separated ``KEY=VALUE`` assignments:

=====================================  ================================================
``READY=1``                            the control socket listens and autostart
                                       services have been started
``STATUS=12/14 running, 1 backoff``    a one-line summary, sent only when it changes
``WATCHDOG=1``                         every ``WATCHDOG_USEC / 2`` (``WatchdogSec=``)
``STOPPING=1``                         shutdown has begun
``RELOADING=1`` + ``MONOTONIC_USEC=``  a reload has begun (``READY=1`` follows)
=====================================  ================================================

Without ``NOTIFY_SOCKET`` every call is a no-op. Sends never block and never
raise: a failure is counted in :attr:`Notifier.failures` and kept in
:attr:`Notifier.last_error` for the daemon to log.

Why not the ``sdnotify`` package: it swallows every error (nothing to log), does
not read ``WATCHDOG_USEC``/``WATCHDOG_PID``, and mishandles abstract sockets;
the protocol is one ``sendto`` on an ``AF_UNIX``/``SOCK_DGRAM`` socket.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping

import anyio
from anyio.abc import TaskStatus

from supervisor.states import ServiceState

__all__ = ["Notifier", "summary"]

#: Non-running states worth naming in the status line, in this order. STOPPED
#: and EXITED are left out: they are where a service is meant to be.
_NOTABLE = (
    ServiceState.STARTING,
    ServiceState.BACKOFF,
    ServiceState.STOPPING,
    ServiceState.FATAL,
    ServiceState.WAITING,  # jobs between runs
)


def summary(states: Iterable[ServiceState]) -> str:
    """A short status line for ``STATUS=``: ``"12/14 running, 1 backoff"``.

    Args:
        states: the current state of every configured service.

    Returns:
        ``"<running>/<total> running"``, followed by the count of each of
        starting, backoff, stopping, fatal and waiting (jobs) that is not zero.
    """
    counts = Counter(states)
    total = sum(counts.values())
    parts = [f"{counts[ServiceState.RUNNING]}/{total} running"]
    parts.extend(f"{counts[s]} {s.value}" for s in _NOTABLE if counts[s])
    return ", ".join(parts)


def _address(value: str) -> str | None:
    """The ``sendto`` address for ``NOTIFY_SOCKET``, or None if unsupported.

    sd_notify(3): an absolute path, or ``@`` for the abstract namespace (the
    ``@`` becomes a NUL byte). Other forms (``vsock:``) are not supported.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify(3) messages; a no-op when ``NOTIFY_SOCKET`` is unset.

    Build it with :meth:`from_environ`. Every method returns True when a
    datagram was sent, False when nothing was sent (disabled, unchanged status,
    or a failure counted in :attr:`failures`).

    Attributes:
        enabled: True when ``NOTIFY_SOCKET`` names a usable socket.
        failures: sends that failed (socket gone, buffer full, ...).
        last_error: the most recent failure, for the daemon log.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._last_status: str | None = None
        self.enabled = address is not None
        self.failures = 0
        self.last_error: OSError | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Args:
            environ: the environment to read (default ``os.environ``). It is not
                modified; children get a clean environment from their driver.

        Returns:
            A notifier; disabled when ``NOTIFY_SOCKET`` is unset or unsupported.
            The watchdog is on when ``WATCHDOG_USEC`` is a positive integer and
            ``WATCHDOG_PID`` is unset or our pid (sd_watchdog_enabled(3)).
        """
        env = os.environ if environ is None else environ
        address = _address(env.get("NOTIFY_SOCKET", ""))
        watchdog_usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            pid = env.get("WATCHDOG_PID", "")
            if usec > 0 and (not pid or int(pid) == os.getpid()):
                watchdog_usec = usec
        except ValueError:
            watchdog_usec = None
        return cls(address, watchdog_usec=watchdog_usec)

    def __repr__(self) -> str:
        if not self.enabled:
            return "<Notifier disabled>"
        where = (self._address or "").replace("\0", "@")
        interval = self.watchdog_interval()
        dog = f", watchdog every {interval:g}s" if interval else ""
        return f"<Notifier {where}{dog}, {self.failures} failures>"

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; never blocks or raises.

        Returns:
            True if the datagram was handed to the kernel.
        """
        if self._address is None:
            return False
        try:
            if self._socket is None:
                # Python sockets are close-on-exec: children never inherit it.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._socket = sock
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as error:  # gone, refused, buffer full (BlockingIOError)
            self.failures += 1
            self.last_error = error
            return False
        return True

    def ready(self) -> bool:
        """``READY=1``: start-up (or a reload) is complete."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """``STATUS=<text>``, only when ``text`` differs from the last one sent."""
        if not self.enabled or text == self._last_status:
            return False
        sent = self.send(f"STATUS={text}")
        if sent:
            self._last_status = text
        return sent

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, microseconds).

        sd_notify(3) requires ``MONOTONIC_USEC`` with ``RELOADING=1`` for
        ``Type=notify-reload``; send :meth:`ready` when the reload is done.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one keep-alive ping."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: ``WATCHDOG_USEC / 2``, or None when off.

        Half the timeout, as sd_watchdog_enabled(3) recommends. None when
        disabled, ``WATCHDOG_USEC`` is unset, or ``WATCHDOG_PID`` is another pid.
        """
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def run_watchdog(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Ping ``WATCHDOG=1`` every :meth:`watchdog_interval` until cancelled.

        The pings come from the event loop on purpose: a stalled loop stops
        them, and systemd restarts a daemon that no longer supervises.
        Returns at once (after ``task_status.started()``) when the watchdog is off.
        """
        interval = self.watchdog_interval()
        task_status.started()
        if interval is None:
            return
        while True:
            self.watchdog()
            await anyio.sleep(interval)

    def close(self) -> None:
        """Close the socket (a later send reopens it)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
