"""The daemon's side of the descriptor keeper (:mod:`supervisor.fdkeeper`).

The daemon registers the read ends of each instance's stdout/stderr pipes here; the
keeper, a separate tiny process, holds duplicates, so that when the daemon dies a
service that keeps writing neither gets SIGPIPE nor loses a line (it blocks once its
pipe buffer is full). The next daemon :meth:`FdStore.take` s them back at start.

Names. :meth:`FdStore.put` registers a *group* of descriptors under one name (say
``"web"`` for ``[stdout_r, stderr_r]``); the keeper holds descriptor ``i`` of the
group as ``"<name>#<i>"``, and :meth:`FdStore.take` returns those keys
(``{"web#0": 7, "web#1": 8}``; :func:`split_key` parses one).

Use, from the event-loop thread only (no method is thread-safe)::

    store = FdStore(keeper_socket_path(control_socket, state_dir))
    if store.connect_or_spawn():      # start-up: may block up to 2 s
        inherited = store.take()      # start-up: may block up to ``timeout``
    store.put("web", [out_r, err_r])  # never blocks, never raises
    store.drop(["web"])               # before closing those descriptors
    store.quit()                      # ordered shutdown; close() for a re-exec

``put`` and ``drop`` are one non-blocking ``sendmsg`` each. What cannot be sent now
(the socket buffer is full, the keeper is gone) is queued in memory, bounded, and
retried by the next call or :meth:`FdStore.flush`; a keeper that died is respawned
lazily and given every live group again. The store never owns the registered
descriptors: the caller keeps them open until it drops (or re-puts) their group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor.fdkeeper import (
    MAX_FDS,
    MAX_NAME,
    Decoder,
    ProtocolError,
    close_all,
    encode,
    peer_allowed,
)

__all__ = ["KEEPER_SCRIPT", "FdStore", "keeper_socket_path", "split_key"]

log = logging.getLogger("supervisor.fdstore")

#: The keeper program, run as ``python -I -S KEEPER_SCRIPT SOCKET``.
KEEPER_SCRIPT = Path(__file__).with_name("fdkeeper.py")
#: Seconds :meth:`FdStore.connect_or_spawn` waits for a spawned keeper's socket.
START_SECONDS = 2.0
#: Seconds between two lazy spawns (a keeper binds within ~50 ms; a second one started
#: while the first still binds could unlink its socket).
SPAWN_INTERVAL = 2.0
#: Seconds between two connection attempts.
RETRY_INTERVAL = 0.05
#: Queued messages beyond which the queue is replaced by a re-put of every live group.
MAX_PENDING = 4096
#: Longest socket path used as is, bytes (``sun_path`` holds 104 on macOS, 108 on Linux).
SOCKET_PATH_MAX = 100
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

# One queued message: ("put", [(group, key, fd), ...]) or ("drop", [(group, key, -1), ...]).
_Op = tuple[str, list[tuple[str, str, int]]]


def keeper_socket_path(control_socket: Path, state_dir: Path) -> Path:
    """The keeper's socket: beside the control socket, named after the state folder.

    Returns ``<control socket folder>/fds-<12 hex of sha256(str(state_dir))>.sock``, or
    the same name in ``/tmp/hostvisor-<uid>/`` when that path is over 100 bytes.
    """
    name = f"fds-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]}.sock"
    path = control_socket.parent / name
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        path = Path(f"/tmp/hostvisor-{os.getuid()}") / name
    return path


def split_key(key: str) -> tuple[str, int]:
    """``"web#1"`` -> ``("web", 1)``; a key without an index -> ``(key, 0)``."""
    group, sep, index = key.rpartition("#")
    if sep and index.isdigit():
        return group, int(index)
    return key, 0


def _keys(name: str, count: int) -> list[str]:
    return [f"{name}#{i}" for i in range(count)]


class FdStore:
    """A connection to the descriptor keeper at ``socket_path`` (see the module docstring).

    Disabled until :meth:`connect_or_spawn` succeeds: ``put``/``drop`` do nothing and
    ``take`` returns ``{}``. The keeper it spawns is this process's child (in its own
    session); the daemon must not count it among its orphans (:attr:`pid`).
    """

    def __init__(self, socket_path: Path) -> None:
        self._path = socket_path
        self._enabled = False
        self._sock: socket.socket | None = None
        self._decoder = Decoder()
        self._pid: int | None = None
        self._spawned: subprocess.Popen[bytes] | None = None
        self._spawned_at = -SPAWN_INTERVAL
        self._next_try = 0.0
        # group -> ((key, fd), ...): what the keeper should hold, with our fd numbers.
        self._live: dict[str, tuple[tuple[str, int], ...]] = {}
        self._pending: deque[_Op] = deque()
        self._queued: Counter[str] = Counter()  # group -> put entries in _pending
        self._out = b""  # the unsent tail of a frame whose descriptors already went

    def __repr__(self) -> str:
        state = "disabled" if not self._enabled else f"keeper {self._pid}"
        if self._enabled and self._sock is None:
            state += " (disconnected)"
        return (
            f"<FdStore {self._path}: {state}, {len(self._live)} groups, "
            f"{len(self._pending)} pending>"
        )

    @property
    def pid(self) -> int | None:
        """The keeper's pid (from its hello, or of the keeper we spawned), None if unknown."""
        return self._pid

    @property
    def spawned(self) -> subprocess.Popen[bytes] | None:
        """The last keeper this store spawned, None if it connected to a running one."""
        return self._spawned

    @property
    def path(self) -> Path:
        """The keeper's socket path."""
        return self._path

    # -- start-up (may block) ---------------------------------------------------------

    def connect_or_spawn(self) -> bool:
        """Connect to the keeper at the path, or spawn one and wait up to 2 s for it.

        Blocks (start-up only). Returns True when connected (:attr:`pid` is then the
        keeper's); False when no keeper can be reached: the store stays disabled and the
        daemon runs without it (logged). Never raises.
        """
        try:
            self._prepare_folder()
            sock = self._dial()
            if sock is None:
                sock = self._spawn_and_wait()
            if sock is None:
                log.warning(
                    "descriptor keeper unavailable at %s: output is lost if the daemon dies",
                    self._path,
                )
                return False
            self._hello(sock, time.monotonic() + START_SECONDS)
        except (OSError, ProtocolError, subprocess.SubprocessError) as exc:
            log.warning("descriptor keeper unavailable at %s: %s", self._path, exc)
            return False
        self._attach(sock, resync=True, hello=False)
        self._enabled = True
        self.flush()
        return True

    def take(self, timeout: float = 2.0) -> dict[str, int]:
        """Every descriptor the keeper holds, as duplicates: ``{"web#0": fd, ...}``.

        Blocks up to ``timeout`` seconds (start-up only). The descriptors are the
        caller's (non-inheritable); they are registered as live groups (see
        :func:`split_key`), so the caller must :meth:`drop` a group before closing its
        descriptors, and should drop those it does not want. Returns ``{}`` when the
        store is disabled or no keeper runs.

        Raises:
            TimeoutError: the keeper did not answer in time (nothing is kept).
            OSError: the connection broke (nothing is kept; the keeper still holds all).
            ProtocolError: a malformed reply (a ValueError; nothing is kept).
        """
        if not self._enabled:
            return {}
        if self._sock is None and not self._reconnect(spawn=False):
            return {}
        assert self._sock is not None
        sock = self._sock
        deadline = time.monotonic() + timeout
        taken: dict[str, int] = {}
        try:
            self._send_all_blocking(sock, deadline)
            self._send_frame_blocking(sock, encode({"op": "take"}), [], deadline)
            while True:
                message, fds = self._receive(sock, deadline)
                if message.get("op") != "fds":
                    close_all(fds)
                    if message.get("op") == "hello":
                        self._pid = int(message["pid"])
                    continue
                names = message.get("names")
                if not isinstance(names, list) or len(names) != len(fds):
                    close_all(fds)
                    raise ProtocolError("the keeper's fds message does not match its names")
                for key, fd in zip(names, fds, strict=True):
                    close_all([taken.pop(key)] if key in taken else [])
                    taken[key] = fd
                if not message.get("more"):
                    break
        except BaseException as exc:
            close_all(taken.values())
            self._broken(exc)
            raise
        finally:
            if self._sock is sock:
                sock.setblocking(False)
        self._register_taken(taken)
        return taken

    # -- event-loop calls (never block, never raise) -----------------------------------

    def put(self, name: str, fds: Sequence[int], *, send: bool = True) -> None:
        """Have the keeper hold duplicates of ``fds`` as group ``name`` (replacing it).

        Non-blocking; never raises (problems are logged). At most 250 descriptors.
        ``send=False`` only queues it: consecutive puts share one message (up to 250
        descriptors), sent by the next :meth:`flush`, put or drop. A daemon spawning
        many services at once thus makes one ``sendmsg`` per 125 of them, not one each.
        """
        if not self._enabled:
            return
        if not 0 < len(name) <= MAX_NAME - 4 or not 0 < len(fds) <= MAX_FDS:
            log.error("fdstore: refused put of %r with %d descriptors", name, len(fds))
            return
        old = self._live.get(name, ())
        self._purge({name})
        entries = [(name, key, fd) for key, fd in zip(_keys(name, len(fds)), fds, strict=True)]
        self._live[name] = tuple((key, fd) for _, key, fd in entries)
        stale = [(name, key, -1) for key, _ in old[len(fds) :]]
        if stale:
            self._enqueue(("drop", stale))
        self._enqueue(("put", entries))
        if send:
            self.flush()

    def drop(self, names: Sequence[str]) -> None:
        """Have the keeper close its copies of the groups ``names``. Non-blocking; never
        raises. Unknown names are ignored."""
        if not self._enabled:
            return
        gone = set(names)
        self._purge(gone)
        entries = [(n, key, -1) for n in gone for key, _ in self._live.pop(n, ())]
        for start in range(0, len(entries), MAX_FDS):
            self._enqueue(("drop", entries[start : start + MAX_FDS]))
        self.flush()

    def flush(self) -> bool:
        """Send what is queued, reconnecting (or respawning the keeper) if needed.

        Non-blocking; never raises. Returns True when nothing is left to send. The
        daemon may call it on a timer so that a respawned keeper is refilled while no
        put or drop happens.
        """
        if not self._enabled:
            return True
        try:
            if self._sock is None and not self._reconnect(spawn=True):
                return False
            assert self._sock is not None
            self._read_replies(self._sock)
            while self._out or self._pending:
                if self._out:
                    self._out = self._out[self._sock.send(self._out) :]
                    continue
                frame, fds = self._frame(self._pending[0])
                sent = socket.send_fds(self._sock, [frame], fds) if fds else self._sock.send(frame)
                self._pop_pending()
                self._out = frame[sent:]
            return True
        except BlockingIOError:
            return False
        except (OSError, ProtocolError) as exc:
            self._broken(exc)
            return False

    # -- shutdown ----------------------------------------------------------------------

    def quit(self) -> None:
        """Tell the keeper to close everything and exit; wait up to 2 s for its bye.

        For an ordered shutdown (a re-exec uses :meth:`close`). Does not reap the
        keeper: the daemon's reaper (or the caller, via :attr:`spawned`) does. Never raises.
        """
        sock = self._sock if self._sock is not None else self._dial_quiet()
        if sock is not None:
            deadline = time.monotonic() + 2.0
            try:
                self._send_frame_blocking(sock, encode({"op": "quit"}), [], deadline)
                while True:
                    message, fds = self._receive(sock, deadline)
                    close_all(fds)
                    if message.get("op") == "bye":
                        break
            except (OSError, ProtocolError) as exc:
                log.debug("fdstore: quit: %s", exc)
        self._sock = sock
        self.close()

    def close(self) -> None:
        """Close our connection; the keeper keeps running and holding. The store is
        disabled afterwards."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._decoder.close()
        self._decoder = Decoder()
        self._set_pending(deque())
        self._out = b""
        self._live.clear()
        self._enabled = False

    # -- internals ---------------------------------------------------------------------

    def _prepare_folder(self) -> None:
        # Another user must not be able to replace our socket: the folder is ours (or
        # root's) and, if others may write in it, sticky (/tmp). An impostor listening
        # at the path is caught by the peer check in _dial.
        folder = self._path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.getuid(), 0):
            raise PermissionError(f"{folder} must be a folder of ours")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise PermissionError(f"{folder} is writable by others (and not sticky)")

    def _dial(self) -> socket.socket | None:
        """A connected non-blocking socket, or None when no keeper listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(os.fspath(self._path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise
        if not peer_allowed(sock):
            sock.close()
            raise PermissionError(f"the process listening at {self._path} is not ours")
        return sock

    def _dial_quiet(self) -> socket.socket | None:
        try:
            return self._dial()
        except OSError:
            return None

    def _spawn(self) -> None:
        argv = [sys.executable, "-I", "-S", str(KEEPER_SCRIPT), os.fspath(self._path)]
        self._spawned = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
        self._spawned_at = time.monotonic()
        self._pid = self._spawned.pid

    def _spawn_and_wait(self) -> socket.socket | None:
        self._spawn()
        assert self._spawned is not None
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            sock = self._dial()
            if sock is not None:
                return sock
            if self._spawned.poll() is not None:  # start-up: no service to race with
                return self._dial()  # another keeper may have won the path (exit 3)
            time.sleep(0.01)  # start-up only: the keeper binds within ~30 ms
        return None

    def _hello(self, sock: socket.socket, deadline: float) -> None:
        self._send_frame_blocking(sock, encode({"op": "hello"}), [], deadline)
        while True:
            message, fds = self._receive(sock, deadline)
            close_all(fds)
            if message.get("op") == "hello":
                self._pid = int(message["pid"])
                sock.setblocking(False)
                return

    def _reconnect(self, *, spawn: bool) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + RETRY_INTERVAL
        try:
            sock = self._dial()
        except BlockingIOError:
            return False  # the keeper's backlog is full: it lives
        except OSError as exc:
            log.warning("fdstore: cannot reach the keeper at %s: %s", self._path, exc)
            return False
        if sock is not None:
            self._attach(sock, resync=True, hello=True)
            return True
        if spawn and now - self._spawned_at >= SPAWN_INTERVAL:
            try:
                self._spawn()
                log.warning(
                    "fdstore: descriptor keeper gone; spawned a new one (pid %s)", self._pid
                )
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("fdstore: cannot spawn the descriptor keeper: %s", exc)
        return False

    def _attach(self, sock: socket.socket, *, resync: bool, hello: bool) -> None:
        self._sock = sock
        self._decoder.close()
        self._decoder = Decoder()
        self._out = b""
        if resync:  # the keeper may be new or have missed messages: give it every group
            drops = [op for op in self._pending if op[0] == "drop"]
            self._set_pending(deque([*drops, *self._live_ops()]))
        if hello:
            self._pending.appendleft(("hello", []))

    def _live_ops(self) -> list[_Op]:
        entries = [(g, key, fd) for g, pairs in self._live.items() for key, fd in pairs]
        return [("put", entries[i : i + MAX_FDS]) for i in range(0, len(entries), MAX_FDS)]

    def _broken(self, exc: BaseException) -> None:
        if self._sock is not None:
            log.warning("fdstore: connection to the keeper lost: %s", exc)
            self._sock.close()
            self._sock = None
        self._pid = None
        self._out = b""

    def _enqueue(self, op: _Op) -> None:
        tail = self._pending[-1] if self._pending else None
        if (
            op[0] == "put"
            and tail is not None
            and tail[0] == "put"
            and len(tail[1]) + len(op[1]) <= MAX_FDS
        ):
            tail[1].extend(op[1])  # one message for both (the keeper holds keys, not groups)
            self._queued.update(g for g, _, _ in op[1])
            return
        self._pending.append(op)
        if op[0] == "put":
            self._queued.update(g for g, _, _ in op[1])
        if len(self._pending) > MAX_PENDING:
            log.warning(
                "fdstore: %d messages queued for the keeper; resending the live set instead",
                len(self._pending),
            )
            self._set_pending(deque(self._live_ops()))

    def _purge(self, groups: set[str]) -> None:
        """Forget queued puts of ``groups``: their descriptors may be closed soon."""
        if not any(self._queued[g] for g in groups):
            return  # the common case: O(1) per put, not a scan of the queue
        kept: deque[_Op] = deque()
        for kind, entries in self._pending:
            if kind == "put":
                entries = [e for e in entries if e[0] not in groups]
                if not entries:
                    continue
            kept.append((kind, entries))
        self._set_pending(kept)

    def _set_pending(self, ops: deque[_Op]) -> None:
        self._pending = ops
        self._queued = Counter(g for kind, entries in ops if kind == "put" for g, _, _ in entries)

    def _pop_pending(self) -> _Op:
        op = self._pending.popleft()
        if op[0] == "put":
            self._queued.subtract(g for g, _, _ in op[1])
        return op

    @staticmethod
    def _frame(op: _Op) -> tuple[bytes, list[int]]:
        kind, entries = op
        names = [key for _, key, _ in entries]
        if kind == "put":
            return encode({"op": "put", "names": names, "nfds": len(names)}), [
                fd for _, _, fd in entries
            ]
        if kind == "drop":
            return encode({"op": "drop", "names": names}), []
        return encode({"op": kind}), []

    def _register_taken(self, taken: dict[str, int]) -> None:
        groups: dict[str, list[tuple[int, str, int]]] = {}
        for key, fd in taken.items():
            group, index = split_key(key)
            groups.setdefault(group, []).append((index, key, fd))
        for group, items in groups.items():
            self._purge({group})
            self._live[group] = tuple((key, fd) for _, key, fd in sorted(items))

    def _read_replies(self, sock: socket.socket) -> None:
        """Consume replies that arrived unasked for (a hello after a reconnect)."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(sock, 1 << 16, 253, _RECV_FLAGS)
            except BlockingIOError:
                return
            self._feed(data, fds, flags)
            while (item := self._decoder.next()) is not None:
                message, extra = item
                close_all(extra)
                if message.get("op") == "hello":
                    self._pid = int(message["pid"])

    def _feed(self, data: bytes, fds: list[int], flags: int) -> None:
        for fd in fds:
            os.set_inheritable(fd, False)
        if flags & socket.MSG_CTRUNC:
            close_all(fds)
            raise ProtocolError("descriptors from the keeper were truncated")
        if not data:
            raise ConnectionResetError("the keeper closed the connection")
        self._decoder.feed(data, fds)

    def _receive(self, sock: socket.socket, deadline: float) -> tuple[dict[str, Any], list[int]]:
        while (item := self._decoder.next()) is None:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data, fds, flags, _ = socket.recv_fds(sock, 1 << 16, 253, _RECV_FLAGS)
            except TimeoutError:
                raise TimeoutError(f"no answer from the keeper at {self._path}") from None
            self._feed(data, fds, flags)
        return item

    def _send_all_blocking(self, sock: socket.socket, deadline: float) -> None:
        if self._out:
            self._send_frame_blocking(sock, self._out, [], deadline)
            self._out = b""
        while self._pending:
            frame, fds = self._frame(self._pop_pending())
            self._send_frame_blocking(sock, frame, fds, deadline)

    def _send_frame_blocking(
        self, sock: socket.socket, frame: bytes, fds: list[int], deadline: float
    ) -> None:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sent = socket.send_fds(sock, [frame], fds) if fds else sock.send(frame)
        if sent < len(frame):
            sock.sendall(frame[sent:])
