"""The control socket's server: JSON-RPC 2.0 over a Unix socket (contract section 8).

:func:`serve` binds the socket safely (:func:`supervisor.control.socketfile.bind_socket`:
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

The daemon implements :class:`ControlTarget`; the server only translates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
from anyio.abc import ObjectReceiveStream, SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

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
    notification,
    parse_request,
    response,
)
from supervisor.control.socketfile import bind_socket
from supervisor.errors import ControlError
from supervisor.events import Event, EventBus

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
#: A log line is cut to this many characters, so that any one fits in a message.
_MAX_LOG_CHARS = 64 * 1024
#: Bytes of notifications held for one following client before the oldest are skipped.
FOLLOW_BUFFER = 256 * 1024
#: Bytes of notifications held for all following clients together (the same rule).
FOLLOW_BUDGET = 16 * 1024 * 1024
#: Bytes written at once; ``send_timeout`` bounds the time each piece may take.
_SEND_CHUNK = 64 * 1024
#: What a send raises when the client went away or stopped reading (send_timeout).
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class LogFeed(Protocol):
    """What the server needs of :class:`supervisor.logfiles.LogHub`."""

    def subscribe(self, key: str | None) -> AbstractAsyncContextManager[ObjectReceiveStream[str]]:
        """Receive the lines of service ``key`` (``None``: the daemon log) from now on."""
        ...


class ControlTarget(Protocol):
    """What the daemon offers the control socket. Each method may raise UnknownService."""

    def status(self, names: Sequence[str] | None) -> dict[str, Any]:
        """Contract section 5 document. Raises UnknownService for an unknown name."""
        ...

    async def start(
        self, names: Sequence[str] | Literal["all"], *, wait: bool, timeout: float
    ) -> dict[str, Any]:
        """``{"services": [status entries]}`` once started (or timed out, with ``wait``)."""
        ...

    async def stop(
        self, names: Sequence[str] | Literal["all"], *, wait: bool, timeout: float
    ) -> dict[str, Any]:
        """``{"services": [status entries]}`` once stopped (or timed out, with ``wait``)."""
        ...

    async def restart(
        self, names: Sequence[str] | Literal["all"], *, wait: bool, timeout: float
    ) -> dict[str, Any]:
        """``{"services": [status entries]}`` once restarted (or timed out, with ``wait``)."""
        ...

    async def reload(self) -> dict[str, Any]:
        """``{"added","removed","changed","unchanged"}``; raises ConfigRejected(data=[str])."""
        ...

    def log_path(self, service: str | None) -> Path:
        """The log file of ``service``; ``None`` is the daemon log."""
        ...

    @property
    def loghub(self) -> LogFeed:
        """Live log lines by service."""
        ...

    @property
    def bus(self) -> EventBus:
        """The event bus: ``recent(since=)`` and ``subscribe()``."""
        ...


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


class _Outbox:
    """Encoded notifications waiting for one following client, bounded in bytes.

    ``put`` never blocks: past ``limit`` bytes (or while every outbox together
    holds more than ``pool.limit``) the oldest waiting messages are dropped and
    counted, the newest is always kept, so a slow client skips ahead.
    """

    def __init__(self, *, limit: int, pool: _Pool) -> None:
        self._items: deque[bytes] = deque()
        self._limit = limit
        self._pool = pool
        self._ready = anyio.Event()
        self._ended = False
        self.size = 0
        self.skipped = 0

    def put(self, data: bytes) -> None:
        self._items.append(data)
        self._take(len(data))
        while len(self._items) > 1 and (self.size > self._limit or self._pool.over):
            self._take(-len(self._items.popleft()))
            self.skipped += 1
        self._ready.set()

    def _take(self, size: int) -> None:
        self.size += size
        self._pool.used += size

    def end(self) -> None:
        """No more messages: ``get`` raises EndOfStream once the waiting ones are sent."""
        self._ended = True
        self._ready.set()

    def discard(self) -> None:
        """Drop everything still waiting (the connection is gone)."""
        self._take(-self.size)
        self._items.clear()

    async def get(self) -> tuple[int, bytes]:
        """The next message, and how many were skipped just before it."""
        while not self._items:
            if self._ended:
                raise anyio.EndOfStream
            self._ready = anyio.Event()
            await self._ready.wait()
        data = self._items.popleft()
        self._take(-len(data))
        skipped, self.skipped = self.skipped, 0
        return skipped, data


class _Pool:
    """Bytes held by every outbox of one server, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def over(self) -> bool:
        return self.used > self.limit


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
        self.pool = _Pool(FOLLOW_BUDGET)
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
            reply = await self.dispatch(req)
        except anyio.get_cancelled_exc_class():
            if req.has_id:  # the server stops: say so rather than leave the client hanging
                with anyio.move_on_after(1.0, shield=True), contextlib.suppress(*_GONE):
                    await conn.stream.send(encode(_shutting_down(req)))
            raise
        if req.has_id:
            await self.reply(conn, reply)
        return True

    async def dispatch(self, req: Request) -> dict[str, Any]:
        """The response to a request that is not followed."""
        try:
            result = await _METHODS[req.method.name](self.target, req.params)
        except ControlError as exc:
            return error_response(req.id, exc.code, str(exc), exc.data)
        except Exception as exc:
            log.exception("control socket: %s failed", req.method.name)
            return error_response(req.id, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        return response(req.id, result)

    async def follow(
        self, conn: _Connection, reader: BufferedByteReceiveStream, req: Request
    ) -> bool:
        """Send the result, then notifications until the client closes or the source ends.

        Returns True (keep serving) only when the request was answered with an error.
        """
        if req.method.name == "events":
            async with self.target.bus.subscribe() as events:
                since = req.params["since"]
                recent = self.target.bus.recent(since=since)
                after = recent[-1].seq if recent else (since or 0)
                first = response(req.id, {"events": _fit([e.as_json() for e in recent])})
                await self.pump(conn, reader, first, _event_notifications(events, after), None)
            return False
        service = req.params["service"]
        try:
            path = self.target.log_path(service)
        except ControlError as exc:
            await self.send(conn, error_response(req.id, exc.code, str(exc), exc.data))
            return True
        async with self.target.loghub.subscribe(service) as lines:
            first = response(req.id, {"lines": await _tail(path, req.params["lines"])})
            messages = _log_notifications(lines, service)
            await self.pump(conn, reader, first, messages, partial(_skipped_lines, service))
        return False

    async def pump(
        self,
        conn: _Connection,
        reader: BufferedByteReceiveStream,
        first: dict[str, Any],
        messages: AsyncIterator[dict[str, Any]],
        marker: Callable[[int], dict[str, Any]] | None,
    ) -> None:
        """Send ``first``, then ``messages``, until either side ends.

        A relay task moves each message into a byte-bounded :class:`_Outbox` as it
        arrives, so the subscription never backs up; this task sends from the
        outbox, preceded by ``marker(skipped)`` where messages were skipped.
        """
        outbox = _Outbox(limit=self.follow_buffer, pool=self.pool)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_closed, reader, tg.cancel_scope)
                tg.start_soon(_relay, messages, outbox)
                try:
                    await self.send(conn, first)
                    while True:
                        skipped, data = await outbox.get()
                        if skipped and marker is not None:
                            await self.send(conn, marker(skipped))
                        await self.send_bytes(conn, data)
                except (anyio.EndOfStream, *_GONE):
                    pass
                tg.cancel_scope.cancel("the stream ended")
        finally:
            outbox.discard()


async def _relay(messages: AsyncIterator[dict[str, Any]], outbox: _Outbox) -> None:
    """Encode each of ``messages`` into ``outbox`` as soon as it comes."""
    try:
        async for message in messages:
            try:
                outbox.put(encode(message))
            except ValueError:  # NaN in an event attribute: JSON cannot carry it
                outbox.skipped += 1
    finally:
        outbox.end()


def _skipped_lines(service: str | None, count: int) -> dict[str, Any]:
    """The ``log`` notification that stands for ``count`` lines a slow client missed."""
    line = f"[hostvisor: {count} lines skipped: this client read too slowly]"
    return notification("log", {"service": service, "line": line})


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


async def _log_notifications(
    lines: ObjectReceiveStream[str], service: str | None
) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        yield notification("log", {"service": service, "line": line[:_MAX_LOG_CHARS]})


async def _event_notifications(
    events: ObjectReceiveStream[Event], after: int
) -> AsyncIterator[dict[str, Any]]:
    async for event in events:
        if event.seq > after:
            yield notification("event", event.as_json())


def _fit(items: list[Any]) -> list[Any]:
    """The newest ``items`` whose JSON fits in one response line (oldest dropped first)."""
    budget = MAX_LINE - 4096
    kept: list[Any] = []
    for item in reversed(items):
        budget -= len(json.dumps(item, ensure_ascii=False).encode("utf-8", "replace")) + 1
        if budget < 0:
            break
        kept.append(item)
    kept.reverse()
    return kept


async def _tail(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of ``path`` (``[]`` if it does not exist), fitted to a line."""

    def read() -> list[str]:
        from supervisor.logfiles import tail

        try:
            lines = tail(path, count) if count else []
        except FileNotFoundError:
            return []
        return _fit([line[:_MAX_LOG_CHARS] for line in lines])

    return await anyio.to_thread.run_sync(read)


async def _status(target: ControlTarget, params: dict[str, Any]) -> Any:
    return target.status(params["services"])


async def _start(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.start(params["services"], wait=params["wait"], timeout=params["timeout"])


async def _stop(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.stop(params["services"], wait=params["wait"], timeout=params["timeout"])


async def _restart(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.restart(params["services"], wait=params["wait"], timeout=params["timeout"])


async def _reload(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.reload()


async def _logs(target: ControlTarget, params: dict[str, Any]) -> Any:
    return {"lines": await _tail(target.log_path(params["service"]), params["lines"])}


async def _events(target: ControlTarget, params: dict[str, Any]) -> Any:
    return {"events": _fit([e.as_json() for e in target.bus.recent(since=params["since"])])}


#: The server side of :data:`supervisor.control.protocol.METHODS`.
_METHODS: dict[str, Callable[[ControlTarget, dict[str, Any]], Awaitable[Any]]] = {
    "status": _status,
    "start": _start,
    "stop": _stop,
    "restart": _restart,
    "reload": _reload,
    "logs": _logs,
    "events": _events,
}


@asynccontextmanager
async def _listening(path: Path, allow_uids: Iterable[int]) -> AsyncIterator[SocketListener]:
    sock = bind_socket(path, allow_uids=allow_uids)
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
    async with _listening(path, allow) as listener, anyio.create_task_group() as tg:
        task_status.started()
        try:
            await server.accept_loop(listener, tg)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()  # nothing new while the open connections finish
            server.close_all()
