"""The control socket's server: JSON-RPC 2.0 over a Unix socket (contract section 8).

:func:`serve` binds the socket safely (:func:`~supervisor.control.socketfile.bind_socket`:
folder 0700, socket 0600 from the first instant, ``allow_uids`` granted with
POSIX ACLs, a stale socket replaced only on ECONNREFUSED), checks every peer's
uid with ``SO_PEERCRED`` (Linux) or ``LOCAL_PEERCRED`` (macOS) before reading a
byte, and serves each connection in its own task.

Defences, each bounded so that one client never stalls another: lines over
1 MiB close the connection; malformed input gets a JSON-RPC error; a connection
that sends no complete request for ``idle_timeout`` seconds is closed; a client
that takes no byte of what we send for ``send_timeout`` seconds is dropped; a
follower (``logs``/``events`` with ``follow``) that reads too slowly skips
ahead, since at most :data:`FOLLOW_BUFFER` bytes wait for it (and
:data:`FOLLOW_BUDGET` for all followers); at most ``max_connections`` are open
(by default ``min(512, RLIMIT_NOFILE - 64)``), and when the cap is reached the
connection idle the longest is closed to make room, else the new one is
accepted and closed at once. When the server stops, whatever request it holds
is answered with -32000 "the daemon is shutting down" before its connection
closes.

The daemon implements :class:`ControlTarget`; the server only translates
(:mod:`supervisor.control.methods`). What waits for a follower is bounded by
:mod:`supervisor.control.outbox`; the socket file is :mod:`supervisor.control.socketfile`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.control.methods import (
    ControlTarget,
    Feed,
    LogFeed,
    dispatch,
    dispatch_reexec,
    open_feed,
)
from supervisor.control.outbox import FOLLOW_BUDGET, FOLLOW_BUFFER, Outbox, Pool, relay
from supervisor.control.protocol import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MAX_LINE,
    PEER_NOT_ALLOWED,
    SERVER_BUSY,
    ProtocolError,
    Request,
    decode,
    encode,
    error_response,
    parse_request,
)
from supervisor.control.socketfile import bind_socket
from supervisor.errors import ControlError

__all__ = [
    "FOLLOW_BUDGET",
    "FOLLOW_BUFFER",
    "ControlTarget",
    "LogFeed",
    "bind_socket",
    "peer_uid",
    "serve",
]

log = logging.getLogger(__name__)

#: Lines above this size are parsed in a worker thread, so the event loop keeps serving.
_THREAD_PARSE = 64 * 1024
#: Bytes written at once; ``send_timeout`` bounds the time each piece may take.
_SEND_CHUNK = 64 * 1024
#: What a send raises when the client went away or stopped reading (send_timeout).
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket.

    Linux: ``SO_PEERCRED`` (``unix(7)``); macOS/BSD: ``LOCAL_PEERCRED``, a
    ``struct xucred`` (``getpeereid(3)`` reads the same).

    Raises:
        OSError: the platform offers neither.
    """
    if hasattr(socket, "SO_PEERCRED"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", raw)[1])
    if sys.platform == "darwin" or "bsd" in sys.platform:
        local_peercred, sol_local = 0x001, 0
        raw = sock.getsockopt(sol_local, local_peercred, struct.calcsize("IIh16I") + 8)
        return int(struct.unpack_from("=II", raw)[1])  # cr_version, cr_uid
    raise OSError("no way to read peer credentials on this platform")


def default_max_connections() -> int:
    """``min(512, RLIMIT_NOFILE - 64)``, at least 8: keeps descriptors for services and logs."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 512
    return max(8, min(512, soft - 64))


# --------------------------------------------------------------------------- serving


class _Connection:
    """One accepted connection: its stream, and whether it waits for a request."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.scope = anyio.CancelScope()
        self.idle_since: float | None = anyio.current_time()
        self.replying: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        state = "busy" if self.idle_since is None else f"idle since {self.idle_since:.1f}"
        return f"<_Connection {state}>"


class _Server:
    def __init__(
        self,
        target: ControlTarget,
        *,
        allowed: frozenset[int],
        idle_timeout: float,
        send_timeout: float,
        max_connections: int,
        follow_buffer: int,
    ) -> None:
        self.target = target
        self.allowed = allowed
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.follow_buffer = follow_buffer
        self.pool = Pool(FOLLOW_BUDGET)
        self.open: set[_Connection] = set()
        self.closing = False

    def make_room(self) -> bool:
        """Close the connection idle the longest if the cap is reached; False if none can go."""
        if len(self.open) < self.max_connections:
            return True
        idle = [c for c in self.open if c.idle_since is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since or 0.0)
        self.open.discard(victim)
        victim.scope.cancel()
        return True

    def close_all(self) -> None:
        """The server stops: every connection answers what it holds, then closes."""
        self.closing = True
        for conn in self.open:
            conn.scope.cancel()
            if conn.replying is not None:  # an answer being written gets one more second
                conn.replying.deadline = min(conn.replying.deadline, anyio.current_time() + 1)

    async def accept_loop(
        self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup
    ) -> None:
        failing = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE/ENFILE: wait for descriptors to come back
                if not failing:  # once per episode, not ten lines a second
                    log.warning("control socket: accept failed: %s; retrying", exc)
                failing = True
                await anyio.sleep(0.1)
                continue
            failing = False
            if not self.make_room():
                _refuse(stream, "too many connections to the control socket; try again")
                await stream.aclose()
                continue
            conn = _Connection(stream)
            self.open.add(conn)
            tg.start_soon(self.handle, conn)

    async def handle(self, conn: _Connection) -> None:
        # Shielded from the server's own cancellation: close_all() ends each connection
        # through its scope, so that a request in progress is answered before it closes.
        with anyio.CancelScope(shield=True):
            try:
                with conn.scope:
                    await self.converse(conn)
            except _GONE:
                pass  # the client went away or stopped reading
            except Exception:  # a bug in one connection must not end the server
                log.exception("control socket: connection failed")
            finally:
                self.open.discard(conn)
                await conn.stream.aclose()

    async def send(self, conn: _Connection, message: dict[str, Any]) -> None:
        try:
            data = encode(message)
        except ValueError as exc:  # NaN or infinity in a result: JSON cannot carry it
            log.error("control socket: cannot encode an answer: %s", exc)
            data = encode(error_response(message.get("id"), INTERNAL_ERROR, f"{exc}"))
        await self.send_bytes(conn, data)

    async def reply(self, conn: _Connection, message: dict[str, Any]) -> None:
        """Send one answer, finished even if the server stops meanwhile (within 1 s then)."""
        with anyio.CancelScope(shield=True) as scope:
            conn.replying = scope
            if self.closing:
                scope.deadline = anyio.current_time() + 1
            try:
                await self.send(conn, message)
            finally:
                conn.replying = None
        if scope.cancelled_caught:
            raise TimeoutError("the server stopped while an answer was being written")

    async def send_bytes(self, conn: _Connection, data: bytes) -> None:
        """Write ``data``; TimeoutError if the client takes none of it for ``send_timeout``.

        Written in pieces so that the timeout measures progress: a client reading
        a 1 MiB answer slowly is served, one that stops reading is dropped.
        """
        for start in range(0, len(data), _SEND_CHUNK):
            with anyio.fail_after(self.send_timeout):
                await conn.stream.send(data[start : start + _SEND_CHUNK])

    async def converse(self, conn: _Connection) -> None:
        try:
            uid = peer_uid(conn.stream.extra(anyio.abc.SocketAttribute.raw_socket))
        except OSError as exc:
            log.warning("control socket: cannot read peer credentials: %s", exc)
            uid = -1
        if uid not in self.allowed:
            msg = f"uid {uid} is not allowed on this socket (see [daemon] allow_uids)"
            await _last_word(conn.stream, error_response(None, PEER_NOT_ALLOWED, msg))
            return
        reader = BufferedByteReceiveStream(conn.stream)
        while True:
            conn.idle_since = anyio.current_time()
            try:
                line = await self.read_line(conn, reader)
            except anyio.get_cancelled_exc_class():
                if self.closing:
                    await self.refuse_pending(conn, reader, b"")
                raise
            if line is None:
                return
            if self.closing:  # read from the buffer after close_all(): refuse, do not run
                await self.refuse_pending(conn, reader, line + b"\n")
                return
            conn.idle_since = None
            if not await self.answer(conn, reader, line):
                return

    async def read_line(self, conn: _Connection, reader: BufferedByteReceiveStream) -> bytes | None:
        """The next line; None after EOF, idle timeout, or an over-long line (answered)."""
        with anyio.move_on_after(self.idle_timeout):
            try:
                line = await reader.receive_until(b"\n", MAX_LINE + 1)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                return None
            except anyio.DelimiterNotFound:
                line = b"x" * (MAX_LINE + 1)
            if len(line) > MAX_LINE:
                msg = f"line longer than {MAX_LINE} bytes"
                await _last_word(conn.stream, error_response(None, INVALID_REQUEST, msg))
                return None
            return line
        return None

    async def refuse_pending(
        self, conn: _Connection, reader: BufferedByteReceiveStream, first: bytes
    ) -> None:
        """At shutdown: answer ``first`` and each complete request already received
        with error -32000 (nothing of it is run)."""
        raw = conn.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        data = first + reader.buffer
        with contextlib.suppress(OSError):
            while len(data) <= MAX_LINE and (chunk := raw.recv(1 << 16, socket.MSG_DONTWAIT)):
                data += chunk
        with anyio.move_on_after(1.0, shield=True), contextlib.suppress(*_GONE):
            for line in data.split(b"\n")[:-1]:
                try:
                    req = parse_request(decode(line))
                except ProtocolError:
                    continue
                if req.has_id:
                    await conn.stream.send(encode(_shutting_down(req)))

    async def answer(
        self, conn: _Connection, reader: BufferedByteReceiveStream, line: bytes
    ) -> bool:
        """Serve one line; False when the connection is to be closed."""
        if not line.strip():
            return True
        try:
            if len(line) > _THREAD_PARSE:
                value = await anyio.to_thread.run_sync(decode, line)
            else:
                value = decode(line)
            req = parse_request(value)
        except ProtocolError as exc:
            await self.reply(conn, error_response(exc.id, exc.code, str(exc), exc.data))
            return not exc.fatal
        if req.method.streams and req.params.get("follow"):
            if not req.has_id:
                return True  # a follow nobody could receive
            return await self.follow(conn, reader, req)
        try:
            if req.method.name == "reexec":
                raw = conn.stream.extra(anyio.abc.SocketAttribute.raw_socket)
                reply = await dispatch_reexec(self.target, req, raw)
            else:
                reply = await dispatch(self.target, req)
        except anyio.get_cancelled_exc_class():
            if req.has_id:  # the server stops: say so rather than leave the client hanging
                with anyio.move_on_after(1.0, shield=True), contextlib.suppress(*_GONE):
                    await conn.stream.send(encode(_shutting_down(req)))
            raise
        if req.has_id:
            await self.reply(conn, reply)
        return True

    async def follow(
        self, conn: _Connection, reader: BufferedByteReceiveStream, req: Request
    ) -> bool:
        """Send the result, then notifications until the client closes or the source ends.

        Returns True (keep serving) only when the request was answered with an error.
        """
        async with contextlib.AsyncExitStack() as stack:
            try:
                feed = await stack.enter_async_context(open_feed(self.target, req))
            except ControlError as exc:  # logs of an unknown service
                await self.send(conn, error_response(req.id, exc.code, str(exc), exc.data))
                return True
            await self.pump(conn, reader, feed)
        return False

    async def pump(self, conn: _Connection, reader: BufferedByteReceiveStream, feed: Feed) -> None:
        """Send ``feed.first``, then ``feed.messages``, until either side ends.

        A relay task moves each message into a byte-bounded
        :class:`~supervisor.control.outbox.Outbox` as it arrives, so the subscription
        never backs up; this task sends from the outbox, preceded by
        ``feed.marker(skipped)`` where messages were skipped.
        """
        outbox = Outbox(limit=self.follow_buffer, pool=self.pool)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_closed, reader, tg.cancel_scope)
                tg.start_soon(relay, feed.messages, outbox)
                try:
                    await self.send(conn, feed.first)
                    while True:
                        skipped, data = await outbox.get()
                        if skipped and feed.marker is not None:
                            await self.send(conn, feed.marker(skipped))
                        await self.send_bytes(conn, data)
                except (anyio.EndOfStream, *_GONE):
                    pass
                tg.cancel_scope.cancel("the stream ended")
        finally:
            outbox.discard()


def _shutting_down(req: Request) -> dict[str, Any]:
    message = f"the daemon is shutting down; {req.method.name} was not completed"
    return error_response(req.id, SERVER_BUSY, message)


def _refuse(stream: SocketStream, message: str) -> None:
    """Best effort, never blocking: one error line before an accepted connection is closed."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    with contextlib.suppress(OSError):
        raw.send(encode(error_response(None, SERVER_BUSY, message)))


async def _last_word(stream: SocketStream, message: dict[str, Any]) -> None:
    """Send ``message``, then drain (up to 1 s, 1 MiB) before the caller closes.

    Closing a Unix socket with unread input makes the peer's read fail with
    ECONNRESET before it sees our answer; draining until its EOF avoids that.
    """
    with anyio.move_on_after(1.0):
        try:
            await stream.send(encode(message))
            await stream.send_eof()
            drained = 0
            while drained <= MAX_LINE:
                drained += len(await stream.receive())
        except (anyio.EndOfStream, *_GONE):
            pass


async def _until_closed(reader: BufferedByteReceiveStream, scope: anyio.CancelScope) -> None:
    """Read (and drop) whatever a following client sends; cancel ``scope`` at EOF."""
    try:
        while True:
            await reader.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        scope.cancel("the client closed the connection")


@asynccontextmanager
async def _listening(
    path: Path, allow_uids: Iterable[int], inherited: socket.socket | None
) -> AsyncIterator[SocketListener]:
    sock = inherited if inherited is not None else bind_socket(path, allow_uids=allow_uids)
    identity = os.stat(path)
    listener = await anyio.abc.SocketListener.from_socket(sock)
    try:
        yield listener
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()
        try:  # remove our socket file, not one a successor has bound since
            now = os.stat(path)
            if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
                os.unlink(path)
        except OSError:
            pass


async def serve(
    target: ControlTarget,
    path: Path,
    *,
    allow_uids: Iterable[int],
    idle_timeout: float = 60.0,
    send_timeout: float = 30.0,
    max_connections: int | None = None,
    follow_buffer: int = FOLLOW_BUFFER,
    inherited: socket.socket | None = None,
    on_listening: Callable[[socket.socket], None] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control protocol on ``path`` until cancelled; removes the socket file then.

    When cancelled, the listener closes first; a request in progress (a ``start``
    waiting for its services) and any complete request already received are
    answered with error -32000 "the daemon is shutting down", followers are
    closed, and every connection's task ends within about a second.

    Args:
        target: the daemon (see :class:`ControlTarget`).
        path: the socket's path; its folder is created 0700.
        allow_uids: uids allowed besides the daemon's own and root (``[daemon] allow_uids``),
            granted access to folder and socket with POSIX ACLs.
        idle_timeout: seconds a connection may wait without sending a complete request
            (a partial line does not count).
        send_timeout: seconds a client may take no byte of what we send before it is dropped.
        max_connections: open connections at most; default :func:`default_max_connections`.
        follow_buffer: bytes of notifications held for one slow follower before the oldest
            are skipped (:data:`FOLLOW_BUFFER`; all followers together hold at most
            :data:`FOLLOW_BUDGET`).
        inherited: a socket already listening on ``path`` (kept across ``hostvisor
            reexec``): served instead of binding a new one; connections queued in its
            backlog meanwhile are answered.
        on_listening: called with the listening socket (the daemon keeps it for a re-exec).
        task_status: ``started()`` once the socket accepts connections.

    Raises:
        SocketPathError: the socket cannot be bound (see :func:`bind_socket`).
    """
    allow = frozenset(allow_uids)
    server = _Server(
        target,
        allowed=frozenset({os.geteuid(), 0, *allow}),
        idle_timeout=idle_timeout,
        send_timeout=send_timeout,
        max_connections=max_connections or default_max_connections(),
        follow_buffer=follow_buffer,
    )
    async with _listening(path, allow, inherited) as listener, anyio.create_task_group() as tg:
        if on_listening is not None:
            on_listening(listener.extra(anyio.abc.SocketAttribute.raw_socket))
        task_status.started()
        try:
            await server.accept_loop(listener, tg)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()  # nothing new while the open connections finish
            server.close_all()
