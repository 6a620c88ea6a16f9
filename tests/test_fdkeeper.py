"""The descriptor keeper and its daemon-side client, with real processes and pipes.

Every keeper here is a real ``python -I -S fdkeeper.py`` process on a real Unix socket;
the "daemon" whose crash is simulated is a real subprocess that is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor import fdkeeper
from supervisor.fdkeeper import Decoder, encode
from supervisor.fdstore import FdStore, keeper_socket_path, split_key

PY = sys.executable
LINE = 100  # bytes per line of the writer below

# A service that prints a numbered 100-byte line every 5 ms forever, and dies of SIGPIPE
# (not an exception) if its pipe loses every reader. Its stdout is non-blocking only so
# that it can tell when the pipe is full (the "F" in its progress file at argv[1]); it
# then waits until the pipe takes the line, as a blocking write would.
WRITER = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
os.set_blocking(1, False)
progress = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
n = 0
while True:
    line = b"%08d %s\n" % (n, b"x" * 90)
    try:
        os.write(1, line)
    except BlockingIOError:
        os.pwrite(progress, b"F", 12)
        select.select([], [1], [])
        continue
    n += 1
    os.pwrite(progress, b"%012d" % n, 0)
    time.sleep(0.005)
"""

# A daemon: registers the read end with the keeper, reads some lines, saves exactly what
# it read, prints the keeper's pid and waits to be killed.
DAEMON = r"""
import os, signal, sys
from pathlib import Path
from supervisor.fdstore import FdStore
sock, out, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = FdStore(Path(sock))
assert store.connect_or_spawn()
store.put("svc", [fd])
assert store.flush()
data = b""
while data.count(b"\n") < 20:
    data += os.read(fd, 4096)
with open(out, "wb") as f:
    f.write(data)
print(store.pid, flush=True)
while True:
    signal.pause()
"""


def wait_for(condition: Callable[[], object], *, timeout: float = 10.0) -> None:
    """Return once ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def readerless(write_end: int) -> bool:
    """True when no process holds a read end of this pipe (poll reports POLLERR)."""
    poller = select.poll()
    poller.register(write_end, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def read_to_eof(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def keepers_at(folder: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(folder) in part for part in cmdline) and any(
            part.endswith("fdkeeper.py") for part in cmdline
        ):
            found.append(proc)
    return found


@pytest.fixture
def sock_path() -> Iterator[Path]:
    """A socket path short enough for sun_path; every keeper there is killed after."""
    folder = Path(tempfile.mkdtemp(prefix="fdk", dir="/tmp"))
    try:
        yield folder / "k.sock"
    finally:
        for proc in keepers_at(folder):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                proc.wait(5)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pipes() -> Iterator[Callable[[], tuple[int, int]]]:
    """``make()`` -> (read end, write end); whatever is still open is closed after."""
    opened: list[int] = []

    def make() -> tuple[int, int]:
        r, w = os.pipe()
        opened.extend((r, w))
        return r, w

    yield make
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


class Raw:
    """A client speaking the keeper's framing by hand, for what FdStore never sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.decoder = Decoder()

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        self.send_bytes(encode(message), fds)

    def send_bytes(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            sent = socket.send_fds(self.sock, [data], fds)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def receive(self) -> tuple[dict[str, Any], list[int]]:
        while (item := self.decoder.next()) is None:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
            assert data, "the keeper closed the connection"
            self.decoder.feed(data, fds)
        return item

    def closed_by_peer(self) -> bool:
        """True when the keeper closed this connection (EOF or reset within 5 s)."""
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
                fdkeeper.close_all(fds)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def hello(path: Path) -> dict[str, Any]:
    raw = Raw(path)
    try:
        raw.send({"op": "hello"})
        return raw.receive()[0]
    finally:
        raw.close()


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


class TestCrash:
    @pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs F_SETPIPE_SZ (Linux)")
    def test_a_writer_survives_a_killed_daemon_and_no_line_is_lost(self, sock_path: Path) -> None:
        """The daemon is SIGKILLed while its service writes: the service fills its pipe
        and blocks but never gets SIGPIPE; the next daemon takes the read end and every
        line appears exactly once, in order, across what both daemons read."""
        folder = sock_path.parent
        progress, out = folder / "progress", folder / "first"
        r, w = os.pipe()
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 16384)
        capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        writer = subprocess.Popen([PY, "-c", WRITER, str(progress)], stdout=w)
        os.close(w)
        daemon = subprocess.Popen(
            [PY, "-c", DAEMON, str(sock_path), str(out), str(r)],
            pass_fds=[r],
            stdout=subprocess.PIPE,
        )
        os.close(r)  # from here on the daemon (and its keeper) are the only readers
        try:
            assert daemon.stdout is not None
            keeper_pid = int(daemon.stdout.readline())
            daemon.kill()
            daemon.wait(10)
            first = out.read_bytes()

            def written() -> int:
                text = progress.read_bytes()[:12]
                return int(text) if text else 0

            # Nobody reads now: the writer finds its pipe full after ~capacity bytes.
            wait_for(
                lambda: writer.poll() is not None or progress.read_bytes()[12:] == b"F",
                timeout=30,
            )
            assert writer.poll() is None, f"the writer died: {writer.returncode}"
            assert written() * LINE - len(first) > capacity // 2

            store = FdStore(sock_path)
            assert store.connect_or_spawn()
            assert store.spawned is None and store.pid == keeper_pid
            taken = store.take()
            assert list(taken) == ["svc#0"]
            writer.terminate()
            assert writer.wait(10) == -signal.SIGTERM  # not -SIGPIPE at any point
            rest = read_to_eof(taken["svc#0"])
            store.drop(["svc"])
            os.close(taken["svc#0"])
            store.quit()
        finally:
            for proc in (writer, daemon):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

        numbers = [int(line.split(b" ", 1)[0]) for line in (first + rest).splitlines()]
        assert numbers == list(range(len(numbers)))
        assert len(numbers) in (written(), written() + 1)  # killed between write and pwrite
        assert len(first.splitlines()) >= 20 and len(rest) > capacity // 2  # the full pipe
        wait_for(lambda: not psutil.pid_exists(keeper_pid) or _zombie(keeper_pid))


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class TestRoundTrip:
    def test_hello_put_drop_take_quit(self, sock_path: Path, pipes: Any) -> None:
        """hello names the spawned keeper; a put is held, a re-put replaces and a drop
        closes the keeper's copy; take hands back working duplicates; quit leaves no
        process and no socket file."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        keeper = store.spawned
        assert keeper is not None and store.pid == keeper.pid
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        (a_r, a_w), (b_r, b_w), (c_r, c_w) = pipes(), pipes(), pipes()
        store.put("a", [a_r])
        store.put("b", [b_r])
        store.put("c", [c_r])
        assert store.flush()

        store.drop(["b"])
        os.close(b_r)
        wait_for(lambda: readerless(b_w))
        store.put("c", [a_r])  # a re-put: the keeper closes its copy of c's old pipe
        os.close(c_r)
        wait_for(lambda: readerless(c_w))
        assert not readerless(a_w)

        taken = store.take()
        assert sorted(taken) == ["a#0", "c#0"]
        assert not os.get_inheritable(taken["a#0"])
        os.write(a_w, b"ping")
        assert os.read(taken["a#0"], 4) == b"ping"
        fdkeeper.close_all(taken.values())

        store.quit()
        assert keeper.wait(10) == 0
        assert not sock_path.exists()
        assert not psutil.pid_exists(keeper.pid)

    def test_hello_counts_what_is_held(self, sock_path: Path, pipes: Any) -> None:
        """hello answers version 1, the keeper's pid and how many descriptors it holds."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        store.put("web", [pipes()[0], pipes()[0]])
        assert store.flush()
        store.close()  # the keeper keeps running and holding
        answer = hello(sock_path)
        assert answer == {"op": "hello", "version": 1, "pid": store.pid, "count": 2}
        FdStore(sock_path).quit()

    def test_queued_puts_share_messages_of_at_most_250_descriptors(
        self, sock_path: Path, pipes: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """put(send=False) only queues; the next flush sends 300 one-descriptor groups in
        two messages (250 + 50), and the keeper holds all 300."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        sent: list[int] = []
        real = socket.send_fds

        def counting(sock: socket.socket, buffers: Any, fds: Any, *args: Any) -> int:
            sent.append(len(fds))
            return real(sock, buffers, fds, *args)

        monkeypatch.setattr(socket, "send_fds", counting)
        for i in range(300):
            store.put(f"g{i}", [pipes()[0]], send=False)
        assert sent == []
        assert store.flush()
        assert sent == [250, 50]
        store.close()
        assert hello(sock_path)["count"] == 300
        FdStore(sock_path).quit()

    def test_sigterm_ends_the_keeper_and_sigint_does_not(self, sock_path: Path) -> None:
        """SIGINT and SIGHUP are ignored; SIGTERM ends the keeper, which removes its socket."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        keeper = store.spawned
        assert keeper is not None
        keeper.send_signal(signal.SIGINT)
        keeper.send_signal(signal.SIGHUP)
        assert hello(sock_path)["pid"] == keeper.pid
        keeper.terminate()
        assert keeper.wait(10) == 0
        assert not sock_path.exists()

    def test_a_second_keeper_at_the_same_path_leaves(self, sock_path: Path) -> None:
        """A keeper started where one already answers exits 3 and does not disturb it."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        second = subprocess.run(
            [PY, "-I", "-S", fdkeeper.__file__, str(sock_path)], timeout=10, check=False
        )
        assert second.returncode == 3
        assert store.flush() and hello(sock_path)["pid"] == store.pid
        FdStore(sock_path).quit()


class TestHostileClients:
    CASES: dict[str, tuple[bytes, int]] = {  # payload, descriptors attached
        "garbage bytes": (b"\x00\x00\x00\x08\x80\x81\x82\x83\x84\x85\x86\x87", 0),
        "a 2 GiB declared length": (struct.pack(">I", 2**31) + b"{}", 0),
        "a non-JSON payload": (frame(b"hello keeper"), 0),
        "JSON that is no object": (frame(b"[1, 2]"), 0),
        "an unknown op": (frame(b'{"op": "explode"}'), 0),
        "fds without nfds": (frame(b'{"op": "hello"}'), 1),
        "fewer fds than nfds": (frame(b'{"op": "put", "names": ["x", "y"], "nfds": 2}'), 1),
        "names that do not match": (frame(b'{"op": "put", "names": ["x"], "nfds": 2}'), 2),
        "nfds over 250": (frame(json.dumps({"op": "put", "nfds": 251}).encode()), 0),
    }

    @pytest.mark.parametrize("case", list(CASES))
    def test_a_bad_message_closes_only_that_connection(
        self, sock_path: Path, pipes: Any, case: str
    ) -> None:
        """The keeper drops a client that breaks the protocol, closes the descriptors it
        sent, keeps what it held and serves the next client."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        keeper = store.spawned
        assert keeper is not None
        held_r, held_w = pipes()
        store.put("held", [held_r])
        assert store.flush()
        os.close(held_r)

        payload, nfds = self.CASES[case]
        sent = [pipes() for _ in range(nfds)]
        raw = Raw(sock_path)
        raw.send_bytes(payload, [r for r, _ in sent])
        for r, _ in sent:
            os.close(r)
        assert raw.closed_by_peer()
        raw.close()
        for _, w in sent:
            wait_for(lambda w=w: readerless(w))  # the keeper closed what it was sent

        assert keeper.poll() is None
        assert not readerless(held_w)
        second = FdStore(sock_path)
        assert second.connect_or_spawn() and second.pid == keeper.pid
        taken = second.take()
        assert list(taken) == ["held#0"]
        os.write(held_w, b"still here")
        assert os.read(taken["held#0"], 64) == b"still here"
        os.close(taken["held#0"])
        second.quit()
        assert keeper.wait(10) == 0

    def test_a_probe_that_sends_nothing_does_not_replace_the_client(
        self, sock_path: Path, pipes: Any
    ) -> None:
        """A connection replaces the current client only once it sends a valid request:
        one that connects and closes leaves the daemon's connection working."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        assert store.spawned is not None
        keeper = psutil.Process(store.spawned.pid)
        probe = Raw(sock_path)
        probe.send_bytes(b"\x00\x00")  # half a header: no request yet
        # listener, the store's connection and the probe, all accepted
        wait_for(lambda: len(keeper.net_connections("unix")) >= 3)
        assert store.take() == {}  # still the keeper's client
        probe.close()

        assert hello(sock_path)["count"] == 0  # a valid request does replace it
        r, _ = pipes()
        store.put("late", [r])  # the store notices, reconnects and re-puts
        wait_for(store.flush)
        assert "late#0" in take_all(sock_path)


def take_all(path: Path) -> dict[str, int]:
    store = FdStore(path)
    assert store.connect_or_spawn()
    taken = store.take()
    fdkeeper.close_all(taken.values())
    store.quit()
    return taken


class TestRespawn:
    def test_a_killed_keeper_is_respawned_with_everything_put_before(
        self, sock_path: Path, pipes: Any
    ) -> None:
        """After the keeper is SIGKILLed, the next put spawns a new one (over the stale
        socket file) and gives it every live group, so a new daemon takes them all."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        first = store.spawned
        assert first is not None
        ends = {name: pipes() for name in ("a", "b", "c")}
        store.put("a", [ends["a"][0]])
        store.put("b", [ends["b"][0]])
        assert store.flush()
        first.kill()
        first.wait(10)
        assert sock_path.exists()  # stale: nobody listens

        store.put("c", [ends["c"][0]])
        wait_for(lambda: store.flush() and store.spawned is not first, timeout=15)
        second = store.spawned
        assert second is not None and second.pid != first.pid and store.pid == second.pid

        taker = FdStore(sock_path)
        assert taker.connect_or_spawn() and taker.pid == second.pid
        taken = taker.take()
        assert sorted(taken) == ["a#0", "b#0", "c#0"]
        for name, (_, w) in ends.items():
            os.write(w, name.encode())
            assert os.read(taken[f"{name}#0"], 8) == name.encode()
        fdkeeper.close_all(taken.values())
        taker.quit()
        assert second.wait(10) == 0


class TestPeers:
    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
    def test_a_peer_of_another_uid_is_refused(self, sock_path: Path, pipes: Any) -> None:
        """Even when the socket's mode lets it connect, a client of another uid gets no
        answer and does not replace the daemon's connection."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        r, _ = pipes()
        store.put("mine", [r])
        assert store.flush()
        sock_path.parent.chmod(0o711)
        sock_path.chmod(0o666)
        pid = os.fork()
        if pid == 0:  # the child: become nobody, connect, ask
            code = 2
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                peer.settimeout(5)
                peer.connect(str(sock_path))
                try:  # the keeper may close before the send or after it
                    peer.sendall(encode({"op": "hello"}))
                    code = 0 if peer.recv(100) == b"" else 1
                except (ConnectionResetError, BrokenPipeError):
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "another uid got an answer (1) or failed (2)"
        taken = store.take()  # our connection is still the keeper's client
        assert list(taken) == ["mine#0"]
        os.close(taken["mine#0"])
        store.quit()

    @pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another uid")
    def test_an_impostor_keeper_is_not_used(self, sock_path: Path) -> None:
        """A process of another uid listening at the keeper's path (a sticky shared
        folder) gets no descriptors: the store refuses it and stays disabled."""
        sock_path.parent.chmod(0o1777)
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: an impostor listening as nobody
            try:
                os.close(ready_r)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(sock_path))
                listener.listen(4)
                os.write(ready_w, b"1")
                while True:
                    signal.pause()
            finally:
                os._exit(1)
        os.close(ready_w)
        try:
            assert os.read(ready_r, 1) == b"1"
            store = FdStore(sock_path)
            assert not store.connect_or_spawn()
            store.put("secret", [ready_r])  # disabled: nothing is sent anywhere
            assert store.spawned is None
        finally:
            os.close(ready_r)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


class TestSocketPath:
    def test_the_path_sits_beside_the_control_socket(self) -> None:
        """fds-<12 hex of sha256(state folder)>.sock in the control socket's folder."""
        import hashlib

        state = Path("/var/lib/hv")
        digest = hashlib.sha256(b"/var/lib/hv").hexdigest()[:12]
        path = keeper_socket_path(Path("/run/user/1000/hostvisor/hostvisor.sock"), state)
        assert path == Path(f"/run/user/1000/hostvisor/fds-{digest}.sock")

    def test_a_long_path_falls_back_to_tmp(self) -> None:
        """Over 100 bytes, the same name goes to /tmp/hostvisor-<uid>/."""
        control = Path("/" + "d" * 120) / "hostvisor.sock"
        path = keeper_socket_path(control, Path("/state"))
        assert path.parent == Path(f"/tmp/hostvisor-{os.getuid()}")
        assert path.name.startswith("fds-") and len(os.fsencode(path)) <= 100

    def test_split_key(self) -> None:
        """Keys are <group>#<index>."""
        assert split_key("web#1") == ("web", 1)
        assert split_key("a#b#0") == ("a#b", 0)
        assert split_key("plain") == ("plain", 0)


class TestVolume:
    def test_take_spans_several_messages(self, sock_path: Path, pipes: Any) -> None:
        """600 descriptors come back in messages of at most 250 (``more`` on all but the
        last), each under its own key."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        r, _ = pipes()
        for i in range(600):
            store.put(f"g{i}", [r])
        wait_for(store.flush, timeout=15)  # non-blocking: 600 puts may fill the socket buffer
        raw = Raw(sock_path)
        raw.send({"op": "take"})
        sizes, keys = [], []
        while True:
            message, fds = raw.receive()
            assert message["op"] == "fds" and len(fds) == message["nfds"]
            sizes.append(len(fds))
            keys += message["names"]
            fdkeeper.close_all(fds)
            if not message["more"]:
                break
        raw.close()
        assert max(sizes) <= 250 and sum(sizes) == 600 and len(sizes) >= 3
        assert sorted(keys) == sorted(f"g{i}#0" for i in range(600))
        FdStore(sock_path).quit()

    def test_put_never_blocks_on_a_stopped_keeper(self, sock_path: Path, pipes: Any) -> None:
        """With the keeper stopped (SIGSTOP), 6,000 puts return at once and are queued
        (beyond the bound, replaced by the live set); after SIGCONT a flush delivers
        them and the keeper holds every live group."""
        store = FdStore(sock_path)
        assert store.connect_or_spawn()
        keeper = store.spawned
        assert keeper is not None
        r, _ = pipes()
        keeper.send_signal(signal.SIGSTOP)
        try:
            for i in range(6000):
                store.put(f"g{i}", [r])
            assert not store.flush()  # the socket buffer is full: queued, not waited for
            store.drop([f"g{i}" for i in range(5000)])
        finally:
            keeper.send_signal(signal.SIGCONT)
        wait_for(store.flush)
        taken = take_all(sock_path)
        assert sorted(taken) == sorted(f"g{i}#0" for i in range(5000, 6000))
