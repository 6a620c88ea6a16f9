"""The ``hostvisor`` CLI against a fake daemon on a real socket (contract section 7).

Most tests call ``supervisor.cli.execute`` in a worker thread while the server
runs in the test's event loop; those about processes (start-up imports, a TTY,
Ctrl-C while following) run ``python -m supervisor`` for real.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor import __version__
from supervisor.cli import execute
from tests.programs.ctl_fake_daemon import FakeTarget
from tests.test_control import NAMES, running


@dataclass
class Outcome:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No socket or config from the environment of the test run leaks in."""
    for name in ("HOSTVISOR_SOCKET", "HOSTVISOR_CONFIG", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg-run"))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """``await cli("status", ...)``: run the CLI in a thread; exit code and output."""

    async def run(*argv: str) -> Outcome:
        def call() -> int:
            try:
                return execute(list(argv))
            except SystemExit as exc:  # argparse usage errors
                return int(exc.code or 0)

        capsys.readouterr()
        code = await anyio.to_thread.run_sync(call)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run


def target(tmp_path: Path, **kw: Any) -> FakeTarget:
    return FakeTarget(NAMES, log_dir=tmp_path, **kw)


async def hostvisor(*argv: str, env: dict[str, str] | None = None) -> Outcome:
    """``python -m supervisor ARGV`` as a real process."""
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, "-m", "supervisor", *argv], check=False, env=env
        )
    return Outcome(done.returncode, done.stdout.decode(), done.stderr.decode())


class TestStatus:
    """``status``: exit 0 all running, 3 some not, 4 unreachable or unknown name."""

    async def test_all_running_is_0(self, tmp_path: Path, cli: Any) -> None:
        """A plain table (not a TTY) with the contract's columns, no escape codes."""
        async with running(target(tmp_path), tmp_path / "ctl.sock") as sock:
            result = await cli("status", "--socket", str(sock))
        assert result.code == 0
        lines = result.out.splitlines()
        assert lines[0].split() == [
            "NAME",
            "KIND",
            "STATE",
            "HEALTH",
            "PID",
            "UPTIME",
            "RESTARTS",
            "LAST-EXIT",
        ]
        assert lines[1].split() == ["svc000", "process", "running", "-", "10000", "2m05s", "0", "-"]
        assert "\x1b" not in result.out

    async def test_some_not_running_is_3(self, tmp_path: Path, cli: Any) -> None:
        """One stopped service makes 3; naming only running ones makes 0."""
        async with running(target(tmp_path, stopped=["svc002"]), tmp_path / "ctl.sock") as sock:
            assert (await cli("status", "--socket", str(sock))).code == 3
            assert (await cli("status", "svc002", "--socket", str(sock))).code == 3
            assert (await cli("status", "svc000", "svc001", "--socket", str(sock))).code == 0

    async def test_unknown_name_is_4(self, tmp_path: Path, cli: Any) -> None:
        """An unknown service: 4 and one line on stderr naming it."""
        async with running(target(tmp_path), tmp_path / "ctl.sock") as sock:
            result = await cli("status", "nope", "--socket", str(sock))
        assert result.code == 4
        assert result.err.strip().splitlines() == ["hostvisor: unknown service: nope"]

    async def test_no_daemon_is_4_with_a_hint(self, tmp_path: Path, cli: Any) -> None:
        """Nothing at the socket: 4 and one line saying how to start a daemon."""
        config = tmp_path / "config.toml"
        result = await cli("status", "-c", str(config), "--socket", str(tmp_path / "no.sock"))
        assert result.code == 4
        assert result.err.splitlines() == [
            f"hostvisor: no daemon at {tmp_path / 'no.sock'} "
            f"(start one with: hostvisor run -c {config})"
        ]

    async def test_json(self, tmp_path: Path, cli: Any) -> None:
        """--json prints the section 5 document; the exit code is the same as the table's."""
        async with running(target(tmp_path, stopped=["svc001"]), tmp_path / "ctl.sock") as sock:
            result = await cli("status", "--json", "--socket", str(sock))
        assert result.code == 3
        doc = json.loads(result.out)
        assert set(doc) == {"daemon", "services"}
        assert [s["state"] for s in doc["services"]] == ["running", "stopped", "running"]

    async def test_socket_from_the_config_file(self, tmp_path: Path, cli: Any) -> None:
        """``-c`` alone finds the daemon through ``[daemon] socket`` (relative to the config)."""
        config = tmp_path / "conf" / "config.toml"
        config.parent.mkdir()
        config.write_text('[daemon]\nsocket = "../run/ctl.sock"\n')
        async with running(target(tmp_path), tmp_path / "run" / "ctl.sock"):
            assert (await cli("status", "-c", str(config))).code == 0
            assert (await cli("-c", str(config), "status")).code == 0

    async def test_socket_from_the_environment(
        self, tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """$HOSTVISOR_SOCKET beats the config; --socket beats both."""
        config = tmp_path / "config.toml"
        config.write_text('[daemon]\nsocket = "elsewhere.sock"\n')
        async with running(target(tmp_path), tmp_path / "ctl.sock") as sock:
            monkeypatch.setenv("HOSTVISOR_SOCKET", str(sock))
            assert (await cli("status", "-c", str(config))).code == 0
            monkeypatch.setenv("HOSTVISOR_SOCKET", str(tmp_path / "wrong.sock"))
            assert (await cli("status", "-c", str(config), "--socket", str(sock))).code == 0

    async def test_default_socket_and_an_invalid_config(self, tmp_path: Path, cli: Any) -> None:
        """A broken config file is tolerated: the default path ($XDG_RUNTIME_DIR) is used."""
        config = tmp_path / "config.toml"
        config.write_text("[daemon\nnot toml")
        path = tmp_path / "xdg-run" / "hostvisor" / "hostvisor.sock"
        async with running(target(tmp_path), path):
            assert (await cli("status", "-c", str(config))).code == 0


class TestActions:
    """``start|stop|restart``: 0 done, 1 failed, 4 unreachable or unknown, 2 usage."""

    async def test_start_and_stop(self, tmp_path: Path, cli: Any) -> None:
        """Services reach their target state: exit 0, one line each."""
        fake = target(tmp_path, stopped=["svc002"])
        async with running(fake, tmp_path / "ctl.sock") as sock:
            result = await cli("start", "svc002", "--socket", str(sock), "--timeout", "5")
            assert (result.code, result.out) == (0, "svc002: running\n")
            result = await cli("stop", "--all", "--socket", str(sock))
            assert result.code == 0
            assert result.out.splitlines() == [f"{n}: stopped" for n in NAMES]
            assert (await cli("restart", "svc000", "--socket", str(sock))).code == 0
        assert fake.calls[-3][1] == (["svc002"], True, 5.0)
        assert fake.calls[-2][1] == ("all", True, 60.0)

    async def test_a_fatal_service_fails_with_its_state(self, tmp_path: Path, cli: Any) -> None:
        """A service that ends fatal: exit 1 and a message naming it, its state and message."""
        fake = target(tmp_path, stopped=["svc001"], fatal=["svc001"])
        async with running(fake, tmp_path / "ctl.sock") as sock:
            result = await cli("start", "svc000", "svc001", "--socket", str(sock))
        assert result.code == 1
        assert result.out == "svc000: running\n"
        assert result.err == (
            "hostvisor: svc001 did not reach running within 60s: it is fatal: gave up\n"
        )

    async def test_no_wait(self, tmp_path: Path, cli: Any) -> None:
        """--no-wait returns at once with the state reached so far: exit 0."""
        fake = target(tmp_path, fatal=["svc001"])
        async with running(fake, tmp_path / "ctl.sock") as sock:
            result = await cli("restart", "svc001", "--no-wait", "--socket", str(sock))
        assert (result.code, result.out) == (0, "svc001: starting\n")
        assert fake.calls[-1][1][1] is False

    async def test_unknown_and_unreachable_are_4(self, tmp_path: Path, cli: Any) -> None:
        """An unknown name and a missing daemon both exit 4."""
        async with running(target(tmp_path), tmp_path / "ctl.sock") as sock:
            assert (await cli("stop", "nope", "--socket", str(sock))).code == 4
        assert (await cli("stop", "svc000", "--socket", str(tmp_path / "x.sock"))).code == 4

    async def test_an_invalid_name_is_an_unknown_service(self, tmp_path: Path, cli: Any) -> None:
        """A name no unit can have is unknown (4), checked before anything is sent."""
        fake = target(tmp_path)
        async with running(fake, tmp_path / "ctl.sock") as sock:
            result = await cli("restart", "Bad/Name", "--socket", str(sock))
            assert (await cli("logs", "../etc", "--socket", str(sock))).code == 4
        assert result.code == 4
        assert result.err.startswith("hostvisor: unknown service: Bad/Name")
        assert fake.calls == []

    @pytest.mark.parametrize(
        "argv",
        [("start",), ("stop", "svc000", "--all"), ("start", "a", "--timeout", "0"), ("bogus",)],
    )
    async def test_usage_errors_are_2(
        self, tmp_path: Path, cli: Any, argv: tuple[str, ...]
    ) -> None:
        """No names and no --all, both, a zero timeout, an unknown verb: 2, one line."""
        result = await cli(*argv, "--socket", str(tmp_path / "ctl.sock"))
        assert result.code == 2
        assert len(result.err.strip().splitlines()) == 1
        assert result.err.startswith("hostvisor: ")


class TestReload:
    """``reload``: 0 applied (the diff printed), 1 rejected (every error printed)."""

    async def test_applied(self, tmp_path: Path, cli: Any) -> None:
        """Added, removed and changed are printed."""
        async with running(target(tmp_path), tmp_path / "ctl.sock") as sock:
            result = await cli("reload", "--socket", str(sock))
        assert result.code == 0
        assert result.out.splitlines() == [
            "added: new",
            "removed: -",
            "changed: svc000",
            "unchanged: 1",
        ]

    async def test_rejected(self, tmp_path: Path, cli: Any) -> None:
        """Every validation error goes to stderr, one per line; exit 1."""
        async with running(target(tmp_path, reject_reload=True), tmp_path / "ctl.sock") as sock:
            result = await cli("reload", "--socket", str(sock))
        assert result.code == 1
        lines = result.err.splitlines()
        assert lines[0].startswith("hostvisor: reload rejected")
        assert lines[1:] == ["units/web.toml: health.intervall: unknown key", "config.toml: bad"]


class TestLogsAndEvents:
    """``logs`` and ``events``, with and without ``-f``."""

    async def test_logs_last_lines(self, tmp_path: Path, cli: Any) -> None:
        """-n N prints the last N lines (default 50); no NAME is the daemon log."""
        (tmp_path / "svc000.log").write_text("".join(f"line {i}\n" for i in range(80)))
        (tmp_path / "hostvisor.log").write_text('{"event": "x"}\n')
        async with running(target(tmp_path), tmp_path / "ctl.sock") as sock:
            result = await cli("logs", "svc000", "-n", "2", "--socket", str(sock))
            assert (result.code, result.out) == (0, "line 78\nline 79\n")
            assert len((await cli("logs", "svc000", "--socket", str(sock))).out.splitlines()) == 50
            assert (await cli("logs", "--socket", str(sock))).out == '{"event": "x"}\n'
            assert (await cli("logs", "nope", "--socket", str(sock))).code == 4
        assert (await cli("logs", "--socket", str(tmp_path / "gone.sock"))).code == 4

    async def test_events(self, tmp_path: Path, cli: Any) -> None:
        """A human line per event (time event service message), or JSON lines with --json."""
        fake = target(tmp_path)
        fake.bus.publish("hostvisor.service.exited", service="svc000", message="exit code 1")
        fake.bus.publish("hostvisor.daemon.reloaded", message="ok")
        async with running(fake, tmp_path / "ctl.sock") as sock:
            human = await cli("events", "--socket", str(sock))
            as_json = await cli("events", "--json", "--socket", str(sock))
        assert human.code == 0
        first, second = human.out.splitlines()
        assert first.split()[2:] == ["hostvisor.service.exited", "svc000", "exit", "code", "1"]
        assert second.split()[2:] == ["hostvisor.daemon.reloaded", "-", "ok"]
        assert [json.loads(line)["seq"] for line in as_json.out.splitlines()] == [1, 2]

    async def test_logs_follow_until_ctrl_c(self, tmp_path: Path) -> None:
        """``logs -f`` prints the tail, then new lines as published; Ctrl-C exits 0."""
        (tmp_path / "svc001.log").write_text("before\n")
        fake = target(tmp_path)
        argv = ["logs", "svc001", "-f", "--socket", str(tmp_path / "ctl.sock")]
        async with (
            running(fake, tmp_path / "ctl.sock"),
            await anyio.open_process([sys.executable, "-m", "supervisor", *argv]) as proc,
        ):
            assert proc.stdout is not None
            out = BufferedByteReceiveStream(proc.stdout)
            with anyio.fail_after(20):
                assert await out.receive_until(b"\n", 1 << 16) == b"before"
                while not fake.loghub.has_subscribers("svc001"):
                    await anyio.sleep(0.01)
                fake.loghub.publish("svc001", ["after 1", "after 2"])
                assert await out.receive_until(b"\n", 1 << 16) == b"after 1"
                assert await out.receive_until(b"\n", 1 << 16) == b"after 2"
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == 0

    async def test_events_follow_ends_with_4_when_the_daemon_goes(self, tmp_path: Path) -> None:
        """``events -f --json`` prints new events; when the daemon stops it exits 4."""
        fake = target(tmp_path)
        argv = ["events", "-f", "--json", "--socket", str(tmp_path / "ctl.sock")]
        proc = None
        try:
            async with running(fake, tmp_path / "ctl.sock"):
                proc = await anyio.open_process([sys.executable, "-m", "supervisor", *argv])
                assert proc.stdout is not None
                with anyio.fail_after(20):
                    while not fake.bus._subscribers:
                        await anyio.sleep(0.01)
                    fake.bus.publish("hostvisor.service.fatal", service="svc002", message="gave up")
                    out = BufferedByteReceiveStream(proc.stdout)
                    event = json.loads(await out.receive_until(b"\n", 1 << 16))
                assert (event["event"], event["service"]) == ("hostvisor.service.fatal", "svc002")
            with anyio.fail_after(20):
                assert await proc.wait() == 4
            assert proc.stderr is not None
            assert b"closed the connection" in await proc.stderr.receive()
        finally:
            if proc is not None:
                with anyio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.kill()
                    await proc.aclose()


class TestProcess:
    """The command as users run it: a real process."""

    async def test_version(self) -> None:
        """``--version`` prints ``hostvisor X.Y.Z``."""
        result = await hostvisor("--version")
        assert (result.code, result.out) == (0, f"hostvisor {__version__}\n")

    async def test_status_imports_nothing_heavy(self, tmp_path: Path) -> None:
        """``status`` starts fast: no anyio, OpenTelemetry, docker, pydantic, httpx, rich, click,
        daemon or config module is imported."""
        heavy = [
            "anyio",
            "opentelemetry",
            "docker",
            "pydantic",
            "httpx",
            "rich",
            "click",
            "supervisor.daemon",
            "supervisor.config",
        ]
        code = (
            "import sys\n"
            "from supervisor.cli import execute\n"
            f"code = execute(['status', '--socket', {str(tmp_path / 'ctl.sock')!r}])\n"
            f"print(code, [m for m in {heavy!r} if m in sys.modules])\n"
        )
        async with running(target(tmp_path), tmp_path / "ctl.sock"):
            with anyio.fail_after(30):
                done = await anyio.run_process([sys.executable, "-c", code])
        assert done.stdout.decode().splitlines()[-1] == "0 []"

    @pytest.mark.parametrize("no_color", [False, True])
    async def test_table_on_a_terminal(self, tmp_path: Path, no_color: bool) -> None:
        """On a TTY: a rich table, coloured unless NO_COLOR is set."""
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
        env.pop("NO_COLOR", None)
        if no_color:
            env["NO_COLOR"] = "1"
        master, slave = pty.openpty()
        argv = [sys.executable, "-m", "supervisor", "status", "--socket", str(tmp_path / "c.sock")]
        async with running(target(tmp_path, stopped=["svc002"]), tmp_path / "c.sock"):
            proc = await anyio.open_process(argv, stdout=slave, stderr=subprocess.PIPE, env=env)
            os.close(slave)
            with anyio.fail_after(30):
                output = await anyio.to_thread.run_sync(read_all, master)
                assert await proc.wait() == 3
        text = output.decode()
        assert "NAME" in text and "svc002" in text and "stopped" in text
        colour = "\x1b[32m" in text or "\x1b[38;" in text  # green "running"
        assert colour is not no_color


def read_all(fd: int) -> bytes:
    """Everything from a pty master until the child closes its side (EIO on Linux)."""
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except OSError:
        pass
    finally:
        os.close(fd)
    return data


class TestLocalVerbs:
    """``check`` and ``run`` read the config themselves."""

    async def test_check(self, tmp_path: Path, cli: Any) -> None:
        """A valid config: 0 and ``ok``; an invalid one: 1 and ``file: key: message`` lines."""
        (tmp_path / "units").mkdir()
        (tmp_path / "units" / "web.toml").write_text('command = ["sleep", "10"]\n')
        config = tmp_path / "config.toml"
        config.write_text("[daemon]\n")
        result = await cli("check", "-c", str(config))
        assert (result.code, result.out.split(":")[0]) == (0, "ok")
        (tmp_path / "units" / "web.toml").write_text('command = ["sleep"]\nrestartt = "no"\n')
        result = await cli("check", "-c", str(config))
        assert result.code == 1
        assert "restartt" in result.err
        assert all(line.count(": ") >= 1 for line in result.err.splitlines())

    async def test_run_with_a_bad_config_is_1(self, tmp_path: Path, cli: Any) -> None:
        """``run`` prints every config error and exits 1 without starting."""
        config = tmp_path / "config.toml"
        config.write_text("[daemon]\nbogus = 1\n")
        result = await cli("run", "-c", str(config))
        assert result.code == 1
        assert "bogus" in result.err

    async def test_install_print(self, tmp_path: Path, cli: Any) -> None:
        """``install --print`` shows the unit that would run ``hostvisor run -c CONFIG``."""
        (tmp_path / "units").mkdir()
        config = tmp_path / "config.toml"
        config.write_text("[daemon]\n")
        result = await cli("install", "--systemd", "--print", "-c", str(config))
        assert result.code == 0
        assert f"run -c {config}" in result.out

    async def test_status_of_no_services(self, tmp_path: Path, cli: Any) -> None:
        """A daemon with no services: the header only, exit 0."""
        async with running(FakeTarget([], log_dir=tmp_path), tmp_path / "ctl.sock") as sock:
            result = await cli("status", "--socket", str(sock))
        assert (result.code, result.out.split()) == (
            0,
            ["NAME", "KIND", "STATE", "HEALTH", "PID", "UPTIME", "RESTARTS", "LAST-EXIT"],
        )
