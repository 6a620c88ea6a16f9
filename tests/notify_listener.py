"""A stand-in for systemd's side of sd_notify(3): a real AF_UNIX datagram socket read by a
thread that stamps each message on arrival (so a stalled event loop in the test does not
change the times). Shared by the module tests and the end-to-end tests of notify."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

_STOP = b"__stop__"


class SystemdSocket:
    """What systemd binds for a ``Type=notify`` unit: a datagram socket, read by a thread.

    Each message is ``(arrival monotonic seconds, {KEY: VALUE})``. ``on_ready``
    runs in the reader thread the moment ``READY=1`` arrives, before the daemon
    can get further.
    """

    def __init__(self, address: str, on_ready: Callable[[], object] | None = None) -> None:
        self.address = address
        self.on_ready = on_ready
        self.ready_checks: list[object] = []
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def notify_socket(self) -> str:
        """The value of ``NOTIFY_SOCKET`` for this socket (``@`` for an abstract one)."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def _run(self) -> None:
        while (data := self._sock.recv(4096)) != _STOP:
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if "READY" in fields and self.on_ready is not None:
                self.ready_checks.append(self.on_ready())
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def close(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(_STOP, self.address)
        self._thread.join(5)
        self._sock.close()

    def having(self, key: str, after: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        with self._cond:
            return [(t, m) for t, m in self.messages if key in m and t > after]

    def wait(self, key: str, count: int = 1, *, after: float = 0.0, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.having(key, after)) >= count, timeout):
                raise AssertionError(f"{count} x {key} not received in {timeout}s: {self.messages}")

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"{what} not received in {timeout}s: {self.messages}")

    def order(self) -> list[str]:
        """The first key of every message, in arrival order (``READY``, ``STATUS`` ...)."""
        with self._cond:
            return [next(iter(m)) for _, m in self.messages]

    async def wait_for(self, key: str, count: int = 1, *, timeout: float = 5.0) -> bool:
        """Wait in a thread (so a deliberately stalled test loop does not matter) for
        ``count`` messages with ``key``; False at the timeout."""
        import anyio

        def done() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.having(key)) >= count, timeout)

        return await anyio.to_thread.run_sync(done)
