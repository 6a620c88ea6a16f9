"""A blocking client of the control socket, for the CLI and for scripts.

It uses plain :mod:`socket` and :mod:`json` (no event loop, no heavy imports)
so that ``hostvisor status`` starts fast. Params are validated with the same
method table the server uses before anything is sent.

Example::

    client = ControlClient(Path("/run/user/1000/hostvisor/hostvisor.sock"))
    doc = client.call("status", {})
    with client.stream("logs", {"service": "api", "follow": True}) as sub:
        print(sub.result["lines"])
        for params in sub:  # {"service": "api", "line": "..."}
            ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from supervisor.control.protocol import (
    MAX_LINE,
    METHODS,
    ProtocolError,
    encode,
    error_from_object,
    request,
)
from supervisor.control.socketfile import unsafe_socket_folder
from supervisor.errors import ControlError, DaemonUnreachable

__all__ = ["NOT_YET", "ControlClient", "Subscription", "new_request", "parse_message", "result_of"]

#: Longest line the client accepts from a server, bytes (generous: the server caps at 1 MiB).
_CLIENT_MAX_LINE = 16 * MAX_LINE


class _Connection:
    """One connected socket with line reading.

    Raises:
        DaemonUnreachable: nothing answers at ``path``, or its folder is writable by
            group or others (see :func:`supervisor.control.socketfile.unsafe_socket_folder`).
    """

    def __init__(self, path: Path, timeout: float | None) -> None:
        problem = unsafe_socket_folder(path)
        if problem is not None:
            raise DaemonUnreachable(problem)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = bytearray()
        try:
            _connect(self.sock, path, 5.0 if timeout is None else min(timeout, 5.0))
        except OSError as exc:
            self.sock.close()
            raise DaemonUnreachable(_why(path, exc)) from None
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    def send(self, message: Mapping[str, Any]) -> None:
        try:
            self.sock.sendall(encode(message))
        except ConnectionError:
            pass  # closed by the daemon: its last word (if any) is read by receive()
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.path}: {exc.strerror}") from None

    def receive(self) -> dict[str, Any]:
        """The next message; raises DaemonUnreachable on EOF or timeout."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return parse_message(line, self.path)
            if len(self.buffer) > _CLIENT_MAX_LINE:
                raise ControlError(f"the daemon at {self.path} sent an over-long line")
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise DaemonUnreachable(f"no answer from the daemon at {self.path}") from None
            except ConnectionError:
                chunk = b""
            except OSError as exc:
                raise DaemonUnreachable(f"lost the daemon at {self.path}: {exc.strerror}") from None
            if not chunk:
                raise DaemonUnreachable(f"the daemon at {self.path} closed the connection")
            self.buffer += chunk

    def response(self, rid: int) -> Any:
        """The result of request ``rid``; notifications before it are skipped."""
        while (found := result_of(self.receive(), rid)) is NOT_YET:
            pass
        return found


#: :func:`result_of`'s answer for a message that is not the response awaited.
NOT_YET: Any = object()


def parse_message(line: bytes, path: Path) -> dict[str, Any]:
    """One line from the daemon at ``path`` as a message; ControlError for garbage."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"the daemon at {path} sent invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ControlError(f"the daemon at {path} sent a non-object")
    return value


def result_of(message: Mapping[str, Any], rid: int) -> Any:
    """The ``result`` of ``message`` if it answers request ``rid``; ``NOT_YET`` for a
    notification or another answer. Raises the error an error response carries."""
    if "id" not in message:
        return NOT_YET
    if "error" in message:
        raise error_from_object(message["error"])
    if message.get("id") == rid and "result" in message:
        return message["result"]
    return NOT_YET


def new_request(rid: int, method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Request ``rid`` of ``method``, its params validated with the method table first.

    Raises:
        ValueError: no such method, or params that do not validate (nothing is sent).
    """
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"no such method: {method!r}")
    try:
        spec.validate(dict(params or {}))
    except ProtocolError as exc:
        raise ValueError(f"{method}: {exc}") from None
    return request(rid, method, params or {})


def _connect(sock: socket.socket, path: Path, timeout: float) -> None:
    """Connect, waiting up to ``timeout`` seconds for room in a busy daemon's backlog.

    A non-blocking (or Python-timeout) connect to a Unix socket whose listen backlog is
    full fails at once with EAGAIN on Linux, so a storm of clients would see a live
    daemon as unreachable. A blocking connect waits for room instead, bounded by
    ``SO_SNDTIMEO`` (``unix(7)``); EAGAIN after that is reported as a timeout.
    """
    seconds = max(timeout, 0.001)
    sock.setblocking(True)
    with contextlib.suppress(OSError):  # not every platform honours it; then we do not wait
        packed = struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, packed)
    try:
        sock.connect(os.fspath(path))
    except BlockingIOError:
        raise TimeoutError(errno.ETIMEDOUT, "the daemon's backlog stayed full") from None
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))


def _why(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
        return f"no daemon at {path}"
    if isinstance(exc, TimeoutError):
        return f"no daemon answers at {path} (timed out)"
    return f"cannot connect to {path}: {exc.strerror or exc}"


class Subscription:
    """A followed ``logs`` or ``events`` call: ``result``, then notification params.

    Iterating yields the ``params`` of each notification (a log line object or
    an event) until the daemon closes the connection, which raises
    :class:`DaemonUnreachable`. Close it (or leave the ``with`` block) to stop.
    """

    def __init__(self, connection: _Connection, result: Any, notification: str) -> None:
        self._connection = connection
        self._notification = notification
        self.result = result

    def __iter__(self) -> Iterator[Any]:
        while True:
            message = self._connection.receive()
            if message.get("method") == self._notification:
                yield message.get("params")

    def close(self) -> None:
        """Close the connection; the server stops sending."""
        self._connection.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ControlClient:
    """Calls methods of contract section 8 on the socket at ``path``.

    Each call opens its own connection (cheap on a Unix socket), so a client
    may be shared by threads.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next_id = 0

    def __repr__(self) -> str:
        return f"<ControlClient {self.path}>"

    def _request(self, method: str, params: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
        self._next_id += 1
        return self._next_id, new_request(self._next_id, method, params)

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = 10.0
    ) -> Any:
        """Send one request and return its ``result``.

        Args:
            method: a name of :data:`~supervisor.control.protocol.METHODS`.
            params: its params (validated here first).
            timeout: seconds to wait for the answer; ``None`` waits forever.

        Raises:
            ValueError: the params do not validate (nothing was sent).
            DaemonUnreachable: no socket, nobody listening, no answer in time
                (a connect waits up to 5 s for room in a busy daemon's backlog), the
                connection closed before an answer, the daemon is shutting down
                (-32000), or the socket's folder is writable by group or others
                (someone could swap the socket: ``chmod 700`` it).
            UnknownService, ConfigRejected, PeerNotAllowed, ControlError: the
                daemon answered with an error.
        """
        rid, message = self._request(method, params)
        connection = _Connection(self.path, timeout)
        try:
            connection.send(message)
            return connection.response(rid)
        finally:
            connection.close()

    def stream(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float = 10.0
    ) -> Subscription:
        """Send a request with ``"follow": true`` and return the subscription.

        ``timeout`` bounds the wait for the first answer (seconds); after it
        the subscription waits for notifications without a limit.

        Raises:
            ValueError: ``method`` cannot be followed, or the params do not validate.
            DaemonUnreachable, ControlError: as :meth:`call`.
        """
        spec = METHODS.get(method)
        if spec is None or not spec.streams:
            raise ValueError(f"{method!r} cannot be followed")
        rid, message = self._request(method, {**(params or {}), "follow": True})
        connection = _Connection(self.path, timeout)
        try:
            connection.send(message)
            result = connection.response(rid)
        except BaseException:
            connection.close()
            raise
        connection.sock.settimeout(None)
        return Subscription(connection, result, spec.notification)
