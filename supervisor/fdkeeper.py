"""The descriptor keeper: a tiny process that holds the read ends of the services' pipes.

When the daemon dies (``kill -9``, an OOM kill, a crash), a service that keeps writing
must neither die of SIGPIPE nor lose a line. This process holds a duplicate of every
read end the daemon hands it, never reads from them, and gives duplicates back to the
next daemon over a Unix socket with ``SCM_RIGHTS`` (``unix(7)``). While no daemon
reads, a writer blocks once its pipe buffer is full; nothing is dropped. The design
is pitchfork's log sink (jdx/pitchfork #661); systemd's fd store (``FDSTORE=1``,
``sd_pid_notify_with_fds(3)``) would only work under systemd, this works in a
terminal, under systemd and under launchd alike.

It is run as a plain script, ``python -I -S fdkeeper.py SOCKET_PATH``, and imports
nothing outside the standard library (about 7 MiB resident). The daemon side is
:mod:`supervisor.fdstore`, which also imports :func:`encode` and :class:`Decoder`
from here, so the framing exists once.

Protocol (version 1). Each message is a 4-byte big-endian length and a UTF-8 JSON
object, sent in one ``sendmsg`` with its descriptors as ``SCM_RIGHTS``; a message with
descriptors declares ``"nfds": N``. The receiver queues the descriptors of each
``recvmsg`` in arrival order and pops N when it parses that message. At most
:data:`MAX_MESSAGE` bytes and :data:`MAX_FDS` descriptors per message (the kernel's
``SCM_MAX_FD`` is 253). Requests:

- ``{"op": "hello"}`` -> ``{"op": "hello", "version": 1, "pid": PID, "count": N}``
- ``{"op": "put", "names": [...], "nfds": N}`` + N fds: hold them (a name already held:
  its old descriptor is closed). No reply.
- ``{"op": "drop", "names": [...]}``: close them. No reply.
- ``{"op": "take"}`` -> one or more ``{"op": "fds", "names": [...], "nfds": N,
  "more": bool}`` carrying duplicates of every held descriptor (the keeper keeps its own).
- ``{"op": "quit"}`` -> ``{"op": "bye"}``; everything is closed and the keeper exits 0.

One client at a time: a new connection replaces the previous one with its first valid
request (a probe that connects and closes replaces nothing), after everything the
previous one sent has been read and applied, so that the puts of a daemon killed just
after sending them still count. A peer of another uid (not root) is refused. A bad
message closes that connection, never the keeper; so does a client that leaves replies
unread for :data:`STALL_SECONDS`. SIGINT, SIGHUP and SIGPIPE are ignored; SIGTERM or
``quit`` ends it, and so does finding that its socket path no longer names its socket.

Exit codes: 0 on SIGTERM or ``quit``; 2 when the path is unusable (not a socket, cannot
bind); 3 when another keeper already answers at the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections import deque

TYPE_CHECKING = False  # typing costs ~1 MiB of a process that should stay tiny
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "MAX_FDS",
    "MAX_HELD",
    "MAX_MESSAGE",
    "VERSION",
    "Decoder",
    "ProtocolError",
    "close_all",
    "encode",
    "peer_allowed",
]

VERSION = 1
#: Largest JSON payload, bytes.
MAX_MESSAGE = 1 << 20
#: Most descriptors one message carries (below ``SCM_MAX_FD``, 253 on Linux).
MAX_FDS = 250
#: Most descriptors held at once; a put beyond it closes the excess.
MAX_HELD = 65_536
#: Longest name, characters (keeps a full ``fds`` reply under :data:`MAX_MESSAGE`).
MAX_NAME = 512
#: Seconds a client may leave replies unread before it is dropped.
STALL_SECONDS = 10.0
#: Seconds between checks that the socket path still names our socket.
CHECK_SECONDS = 30.0
#: Most descriptors queued without their message (a partial message's own).
_MAX_QUEUED = 2 * 253
_MAX_WAITING = 8
_DRAIN_READS = 20_000
_HEADER = struct.Struct(">I")
_RECV_BYTES = 1 << 16
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class ProtocolError(ValueError):
    """The peer broke the framing or sent a message that is not a valid request."""


def encode(message: dict[str, Any]) -> bytes:
    """One frame: 4-byte big-endian length, then ``message`` as compact UTF-8 JSON."""
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(payload) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(payload)} bytes is over {MAX_MESSAGE}")
    return _HEADER.pack(len(payload)) + payload


class Decoder:
    """Frames from a byte stream plus the descriptors that came with it.

    Descriptors arrive attached to the first byte of the ``sendmsg`` that carried them,
    so a batch received with a ``recvmsg`` belongs to a message that starts within (or
    before the end of) that read. A batch still queued once the stream has passed its
    end was claimed by no message: :class:`ProtocolError`. Queued descriptors are ours
    to close (:meth:`close`).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]
        self._batches: deque[tuple[int, list[int]]] = deque()  # (stream end, fds)
        self._queued = 0

    def feed(self, data: bytes, fds: list[int]) -> None:
        """Add what one ``recvmsg`` returned."""
        self._buf += data
        if fds:
            self._batches.append((self._offset + len(self._buf), list(fds)))
            self._queued += len(fds)
            if self._queued > _MAX_QUEUED:
                raise ProtocolError("too many descriptors without a message")

    def next(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next complete message and its descriptors, or None until more arrives.

        Raises:
            ProtocolError: bad length, bad JSON, bad ``nfds``, or descriptors that do not
                match the messages.
        """
        if self._batches and self._batches[0][0] <= self._offset:
            raise ProtocolError("descriptors that no message declared")
        if len(self._buf) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        if size > MAX_MESSAGE:
            raise ProtocolError(f"declared length {size} is over {MAX_MESSAGE}")
        if len(self._buf) < _HEADER.size + size:
            return None
        payload = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        self._offset += _HEADER.size + size
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"not a JSON message: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("a message must be a JSON object")
        nfds = message.get("nfds", 0)
        if type(nfds) is not int or not 0 <= nfds <= MAX_FDS:
            raise ProtocolError(f"bad nfds: {nfds!r}")
        fds = self._pop(nfds)
        if self._batches and self._batches[0][0] <= self._offset:
            close_all(fds)  # they came with this message or before it: more than declared
            raise ProtocolError("descriptors that no message declared")
        return message, fds

    def _pop(self, count: int) -> list[int]:
        fds: list[int] = []
        while len(fds) < count:
            if not self._batches:
                close_all(fds)
                raise ProtocolError(f"message declares {count} descriptors, {len(fds)} came")
            batch = self._batches[0][1]
            taken = batch[: count - len(fds)]
            del batch[: len(taken)]
            fds.extend(taken)
            self._queued -= len(taken)
            if not batch:
                self._batches.popleft()
        return fds

    def close(self) -> None:
        """Close every queued descriptor and forget buffered bytes."""
        for _, fds in self._batches:
            close_all(fds)
        self._batches.clear()
        self._queued = 0
        self._buf.clear()


def close_all(fds: Any) -> None:
    """Close each descriptor in ``fds``, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


_OPS = frozenset({"hello", "put", "drop", "take", "quit"})


def _check(message: dict[str, Any], fds: list[int]) -> tuple[str, list[str]]:
    """``(op, names)`` of a valid request; ProtocolError otherwise (fds not closed)."""
    op = message.get("op")
    if op not in _OPS:
        raise ProtocolError(f"unknown op {op!r}")
    if fds and op != "put":
        raise ProtocolError(f"{op!r} carries no descriptors")
    if op not in ("put", "drop"):
        return op, []
    names = message.get("names")
    if not isinstance(names, list) or (op == "put" and len(names) != len(fds)):
        raise ProtocolError("names must be a list (one per descriptor)")
    for name in names:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ProtocolError(f"bad name: {name!r}")
    return op, names


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder()
        self.out = bytearray()  # bytes whose descriptors, if any, already went
        self.take: deque[str] | None = None  # names still to send for a take
        self.stalled_since: float | None = None

    @property
    def wants_write(self) -> bool:
        return bool(self.out) or self.take is not None

    def close(self) -> None:
        self.decoder.close()
        self.sock.close()


class Keeper:
    """The keeper's state and loop; :func:`main` runs one."""

    def __init__(self, listener: socket.socket, path: str, wakeup: int) -> None:
        self.listener = listener
        self.path = path
        st = os.stat(path)
        self.identity = (st.st_dev, st.st_ino)
        self.wakeup = wakeup
        self.held: dict[str, int] = {}
        self.client: _Client | None = None
        self.waiting: list[_Client] = []  # accepted, no message yet
        self.running = True
        self.reserve = os.open(os.devnull, os.O_RDONLY)  # freed to accept at EMFILE

    def serve(self) -> None:
        next_check = time.monotonic() + CHECK_SECONDS
        while self.running:
            poller = select.poll()
            poller.register(self.listener, select.POLLIN)
            poller.register(self.wakeup, select.POLLIN)
            for waiting in self.waiting:
                poller.register(waiting.sock, select.POLLIN)
            client = self.client
            if client is not None:
                mask = select.POLLIN | (select.POLLOUT if client.wants_write else 0)
                poller.register(client.sock, mask)
            timeout = max(0.0, next_check - time.monotonic())
            if client is not None and client.stalled_since is not None:
                timeout = min(timeout, client.stalled_since + STALL_SECONDS - time.monotonic())
            for fd, events in poller.poll(max(0, int(timeout * 1000) + 1)):
                self._dispatch(fd, events)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_SECONDS
                self.running = self.running and self._still_ours()
            self._check_stall()

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self.wakeup:
            with contextlib.suppress(OSError):
                os.read(self.wakeup, 512)
        elif fd == self.listener.fileno():
            self._accept()
        else:
            client = self._by_fd(fd)
            if client is None:
                return
            try:
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read(client, limit=16)
                if self.client is client and client.wants_write:
                    self._write(client)
            except (OSError, ProtocolError):
                self._drop_client(client)

    def _by_fd(self, fd: int) -> _Client | None:
        for client in (self.client, *self.waiting):
            if client is not None and client.sock.fileno() == fd:
                return client
        return None

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    return
                # Out of descriptors: free the reserve to accept and refuse the peer, or
                # it would stay in the backlog and wake every poll.
                os.close(self.reserve)
                with contextlib.suppress(OSError):
                    self.listener.accept()[0].close()
                self.reserve = os.open(os.devnull, os.O_RDONLY)
                return
            if not peer_allowed(conn):
                conn.close()
                continue
            conn.setblocking(False)
            # It replaces the client once it sends a message: a probe that connects
            # and closes (a second keeper testing the path) must not.
            self.waiting.append(_Client(conn))
            if len(self.waiting) > _MAX_WAITING:
                self._drop_client(self.waiting[0])

    def _promote(self, client: _Client) -> None:
        self.waiting.remove(client)
        previous = self.client
        if previous is not None:
            # What the previous client sent before it died still counts: read to EOF
            # (a recvmsg returns at most one message with descriptors, and a dead
            # client's socket buffer holds a few hundred), bounded against a live one.
            with contextlib.suppress(OSError, ProtocolError):
                self._read(previous, limit=_DRAIN_READS)
            self._drop_client(previous)
        self.client = client

    def _read(self, client: _Client, *, limit: int) -> None:
        for _ in range(limit):
            try:
                data, fds, flags, _ = socket.recv_fds(client.sock, _RECV_BYTES, 253, _RECV_FLAGS)
            except BlockingIOError:
                return
            if flags & socket.MSG_CTRUNC:
                close_all(fds)
                raise ProtocolError("descriptors were truncated (out of descriptors?)")
            client.decoder.feed(data, fds)
            while (item := client.decoder.next()) is not None:
                self._handle(client, *item)
            if not data or not self.running:
                self._drop_client(client)
                return

    def _handle(self, client: _Client, message: dict[str, Any], fds: list[int]) -> None:
        try:
            op, names = _check(message, fds)
        except ProtocolError:
            close_all(fds)
            raise
        if self.client is not client:
            self._promote(client)  # only a valid request replaces the client
        if op == "put":
            for name, fd in zip(names, fds, strict=True):
                old = self.held.pop(name, None)
                if old is not None:
                    os.close(old)
                if len(self.held) < MAX_HELD:
                    self.held[name] = fd
                else:
                    os.close(fd)
        elif op == "drop":
            for name in names:
                old = self.held.pop(name, None)
                if old is not None:
                    os.close(old)
        elif op == "hello":
            reply = {"op": "hello", "version": VERSION, "pid": os.getpid(), "count": len(self.held)}
            self._queue(client, encode(reply))
        elif op == "take":
            client.take = deque(self.held)
        else:  # quit
            self.running = False
            self._close_held()
            self._queue(client, encode({"op": "bye"}))
            with contextlib.suppress(OSError):
                self._write(client)

    def _queue(self, client: _Client, frame: bytes) -> None:
        client.out += frame
        if len(client.out) > MAX_MESSAGE + _HEADER.size:
            raise ProtocolError("client does not read its replies")

    def _write(self, client: _Client) -> None:
        while True:
            if client.out:
                try:
                    sent = client.sock.send(client.out)
                except BlockingIOError:
                    self._stalled(client)
                    return
                del client.out[:sent]
            elif client.take is not None:
                if not self._send_chunk(client, client.take):
                    self._stalled(client)
                    return
            else:
                client.stalled_since = None
                return
            client.stalled_since = None

    def _send_chunk(self, client: _Client, names: deque[str]) -> bool:
        chunk: list[str] = []
        while names and len(chunk) < MAX_FDS:
            name = names.popleft()
            if name in self.held:
                chunk.append(name)
        more = bool(names)
        frame = encode({"op": "fds", "names": chunk, "nfds": len(chunk), "more": more})
        try:
            if chunk:
                sent = socket.send_fds(client.sock, [frame], [self.held[n] for n in chunk])
            else:
                sent = client.sock.send(frame)
        except BlockingIOError:
            names.extendleft(reversed(chunk))
            return False
        client.out += frame[sent:]
        if not more:
            client.take = None
        return True

    def _stalled(self, client: _Client) -> None:
        if client.stalled_since is None:
            client.stalled_since = time.monotonic()

    def _check_stall(self) -> None:
        client = self.client
        since = None if client is None else client.stalled_since
        if client is not None and since is not None and time.monotonic() - since >= STALL_SECONDS:
            self._drop_client(client)

    def _drop_client(self, client: _Client) -> None:
        client.close()
        if self.client is client:
            self.client = None
        elif client in self.waiting:
            self.waiting.remove(client)

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def _close_held(self) -> None:
        close_all(self.held.values())
        self.held.clear()

    def shutdown(self) -> None:
        """Close every descriptor and unlink the socket if it is still ours."""
        self._close_held()
        for client in (self.client, *self.waiting):
            if client is not None:
                self._drop_client(client)
        if self._still_ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.listener.close()


def peer_allowed(conn: socket.socket) -> bool:
    """True for a peer of our uid or root; Linux ``SO_PEERCRED``, BSD ``LOCAL_PEERCRED``."""
    me = os.getuid()
    try:
        if hasattr(socket, "SO_PEERCRED"):
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            uid = struct.unpack("3i", raw)[1]
        elif sys.platform == "darwin":
            # struct xucred { u_int cr_version; uid_t cr_uid; ... }; SOL_LOCAL is 0.
            opt = getattr(socket, "LOCAL_PEERCRED", 1)
            raw = conn.getsockopt(0, opt, 76)
            uid = struct.unpack_from("=II", raw)[1]
        else:
            return True  # the socket is 0600 in a 0700 folder
    except OSError:
        return False
    return uid in (me, 0)


def _bind(path: str) -> socket.socket | int:
    """The listener at ``path``, or an exit code (2 unusable, 3 another keeper answers)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError:
        return 2
    else:
        if not stat.S_ISSOCK(st.st_mode):
            return 2
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens
        except OSError:
            return 2
        else:
            return 3
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError:
        listener.close()
        return 2
    finally:
        os.umask(old)
    listener.listen(16)
    listener.setblocking(False)
    return listener


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else MAX_HELD + 1024
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str]) -> int:
    """Run a keeper at ``argv[1]`` until SIGTERM or ``quit``; return the exit code."""
    if len(argv) != 2:
        return 2
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    _raise_nofile()
    bound = _bind(argv[1])
    if isinstance(bound, int):
        return bound
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    keeper = Keeper(bound, argv[1], read_end)

    def stop(signum: int, frame: object) -> None:
        keeper.running = False

    signal.set_wakeup_fd(write_end)
    signal.signal(signal.SIGTERM, stop)
    try:
        keeper.serve()
    finally:
        keeper.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
