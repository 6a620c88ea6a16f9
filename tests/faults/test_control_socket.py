"""Faults of the control socket's file: stale-file test, swapped sockets, allow_uids (issue 9, 11).

A real server (:func:`supervisor.control.server.serve`) runs in the test's event
loop on a real Unix socket and serves the fake daemon of ``tests/programs``. A
foreign peer is a real process running as uid 65534 (nobody).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.control.client import ControlClient
from supervisor.control.server import bind_socket, serve
from supervisor.errors import DaemonUnreachable, SocketPathError
from tests.programs.ctl_fake_daemon import FakeTarget

NAMES = ["svc000", "svc001"]
NOBODY = 65534
_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@asynccontextmanager
async def running(path: Path, **kw: Any) -> AsyncIterator[Path]:
    """Serve a fake daemon on ``path`` until the block ends."""
    kw.setdefault("allow_uids", ())
    target = FakeTarget(NAMES, log_dir=path.parent)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(serve, target, path, **kw))
        yield path
        tg.cancel_scope.cancel()


@contextmanager
def public_tmp() -> Iterator[Path]:
    """A fresh folder under /tmp, 0755 like /tmp's own parents, removed after."""
    folder = Path(tempfile.mkdtemp(prefix="hv-ctl-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def call(path: Path, method: str = "status") -> Any:
    client = ControlClient(path)
    return await anyio.to_thread.run_sync(lambda: client.call(method, {}, timeout=10))


class TestStaleSocketFile:
    """Startup removes a socket file only when connecting to it is refused (ECONNREFUSED)."""

    async def test_a_busy_daemon_whose_backlog_is_full_keeps_its_socket(
        self, tmp_path: Path
    ) -> None:
        """A listener that does not accept (full backlog: connect times out) is not replaced."""
        path = tmp_path / "ctl.sock"
        busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        busy.bind(str(path))
        busy.listen(0)
        waiting: list[socket.socket] = []
        try:
            while True:  # fill the backlog: the next connect would block
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                waiting.append(client)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    break
            identity = path.lstat().st_ino
            with pytest.raises(SocketPathError, match="did not answer"):
                bind_socket(path)
            assert path.lstat().st_ino == identity, "the busy daemon's socket was replaced"
        finally:
            for client in waiting:
                client.close()
            busy.close()

    async def test_a_dead_socket_is_still_replaced(self, tmp_path: Path) -> None:
        """ECONNREFUSED (nobody listens): the stale file is replaced and served."""
        path = tmp_path / "ctl.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(path))
        dead.close()
        async with running(path):
            assert "services" in await call(path)


class TestClientRefusesAnUnsafeFolder:
    """The client does not talk through a folder others could swap the socket in."""

    @pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
    async def test_group_or_other_writable_folder(self, tmp_path: Path, mode: int) -> None:
        """One line naming the folder and ``chmod 700``; nothing is sent."""
        folder = tmp_path / "run"
        async with running(folder / "ctl.sock") as path:
            folder.chmod(mode)
            with pytest.raises(DaemonUnreachable) as info:
                await call(path)
            message = str(info.value)
            assert str(folder) in message and f"chmod 700 {folder}" in message
            assert "\n" not in message
            folder.chmod(0o700)
            assert "services" in await call(path)

    async def test_cli_exit_code_4(self, tmp_path: Path) -> None:
        """``hostvisor status`` exits 4 with the one line on stderr, no traceback."""
        folder = tmp_path / "run"
        async with running(folder / "ctl.sock") as path:
            folder.chmod(0o777)
            argv = [sys.executable, "-m", "supervisor", "status", "--socket", str(path)]
            done = await anyio.run_process(argv, check=False)
        stderr = done.stderr.decode()
        assert done.returncode == 4, stderr
        assert "chmod 700" in stderr and "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1

    async def test_sticky_shared_folder_with_our_own_socket(self, tmp_path: Path) -> None:
        """A sticky world-writable folder (like /tmp) is fine when the socket is ours."""
        folder = tmp_path / "shared"
        async with running(folder / "ctl.sock") as path:
            folder.chmod(0o1777)
            assert "services" in await call(path)


class TestSharedFoldersKeepTheirMode:
    """Fault: as root, a socket placed straight in /tmp (or /run) made the daemon chmod
    that folder 0700, locking every other user and service of the host out of it (the
    folder is root's, so it looked like "ours")."""

    async def test_a_sticky_folder_stays_1777(self, tmp_path: Path) -> None:
        folder = tmp_path / "tmp-like"
        folder.mkdir()
        folder.chmod(0o1777)
        async with running(folder / "ctl.sock") as path:
            assert "services" in await call(path)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o1777

    async def test_a_folder_other_programs_use_stays_0755(self, tmp_path: Path) -> None:
        folder = tmp_path / "run-like"
        folder.mkdir()
        folder.chmod(0o755)
        (folder / "other.pid").write_text("1\n")
        async with running(folder / "ctl.sock") as path:
            assert "services" in await call(path)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755

    async def test_a_folder_of_our_own_is_still_made_0700(self, tmp_path: Path) -> None:
        folder = tmp_path / "ours"
        folder.mkdir()
        folder.chmod(0o755)
        async with running(folder / "ctl.sock") as path:
            assert "services" in await call(path)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


FOREIGN_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.errno}))
    sys.exit(0)
s.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "status"}\n')
data = b""
while not data.endswith(b"\n") and (chunk := s.recv(65536)):
    data += chunk
print(data.decode().strip())
"""


async def as_nobody(path: Path) -> dict[str, Any]:
    """Run a raw client as uid/gid 65534 (no supplementary groups); its one answer."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    argv = [python, "-I", "-c", FOREIGN_CLIENT, str(path)]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

    done = await anyio.to_thread.run_sync(run)
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


needs_root_and_acl = pytest.mark.skipif(
    not _ROOT or shutil.which("setfacl") is None,
    reason="needs root (to run a client as uid 65534) and setfacl (package acl)",
)


@needs_root_and_acl
class TestAllowUids:
    """allow_uids grants exactly those uids access, with POSIX ACLs on folder and socket."""

    async def test_not_allowed_cannot_even_connect(self) -> None:
        """Empty allow_uids: 0700/0600 and no ACL; uid 65534 is refused at connect (EACCES)."""
        with public_tmp() as root:
            async with running(root / "run" / "ctl.sock") as path:
                assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                answer = await as_nobody(path)
        assert answer == {"connect": 13}

    async def test_allowed_uid_gets_a_status_answer(self) -> None:
        """allow_uids = [65534]: that uid connects and gets the status document."""
        with public_tmp() as root:
            async with running(root / "run" / "ctl.sock", allow_uids=[NOBODY]) as path:
                answer = await as_nobody(path)
                # The mode bits still grant nobody else anything.
                assert stat.S_IMODE(path.parent.stat().st_mode) & 0o007 == 0
                assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
        assert [s["name"] for s in answer["result"]["services"]] == NAMES

    async def test_a_later_run_without_allow_uids_takes_the_grant_back(self) -> None:
        """The folder outlives the daemon: its ACL from a previous run is removed."""
        with public_tmp() as root:
            path = root / "run" / "ctl.sock"
            async with running(path, allow_uids=[NOBODY]):
                assert "result" in await as_nobody(path)
            async with running(path):
                assert await as_nobody(path) == {"connect": 13}
                assert "services" in await call(path)

    async def test_a_default_acl_on_the_folder_does_not_open_the_socket(self) -> None:
        """A default ACL granting others rw (so the umask is ignored) is removed before bind."""
        with public_tmp() as root:
            folder = root / "run"
            folder.mkdir(mode=0o700)
            subprocess.run(["setfacl", "-d", "-m", f"u:{NOBODY}:rwx", str(folder)], check=True)
            async with running(folder / "ctl.sock") as path:
                assert await as_nobody(path) == {"connect": 13}

    async def test_a_blocking_parent_folder_is_warned_about(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Under a 0700 parent (like $XDG_RUNTIME_DIR) the warning names it and the fix."""
        parent = tmp_path / "xdg"
        parent.mkdir(mode=0o700)
        with caplog.at_level(logging.WARNING):
            async with running(parent / "hostvisor" / "ctl.sock", allow_uids=[NOBODY]):
                pass
        text = caplog.text
        assert str(NOBODY) in text and "[daemon] socket" in text

    async def test_without_setfacl_a_warning_names_the_uids(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No setfacl on PATH: 0700/0600 are kept and the warning says who cannot connect."""
        monkeypatch.setenv("PATH", "/nonexistent")
        with public_tmp() as root, caplog.at_level(logging.WARNING):
            async with running(root / "run" / "ctl.sock", allow_uids=[NOBODY]) as path:
                assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                monkeypatch.undo()
                assert await as_nobody(path) == {"connect": 13}
        assert f"{NOBODY}" in caplog.text and "setfacl" in caplog.text


@needs_root_and_acl
def test_allow_uids_under_the_real_daemon(tmp_path: Path) -> None:
    """``[daemon] allow_uids = [65534]`` in config.toml: that uid gets a status answer from
    a real ``hostvisor run`` (its socket folder is a fresh 0700 folder in /tmp)."""
    from tests.daemon_harness import daemon

    with daemon(tmp_path, config=f"allow_uids = [{NOBODY}]") as d:
        assert d.proc is not None
        answer = anyio.run(as_nobody, d.socket)
        assert answer["result"]["daemon"]["pid"] == d.proc.pid
        assert stat.S_IMODE(d.socket.parent.stat().st_mode) & 0o007 == 0
