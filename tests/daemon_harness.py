"""Run a real ``hostvisor run`` in a subprocess and talk to it over its real socket.

Sync on purpose: the daemon is another process, and the tests read like a user's
shell session. Waiting is event-driven: a thread follows the daemon's ``events``
stream, and waits re-check their condition at every event, under a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from supervisor.control.client import ControlClient

PY = sys.executable
PROGRAMS = Path(__file__).parent / "programs"


class DaemonProcess:
    """A daemon on ``root/config.toml`` with its state in ``root/state``."""

    def __init__(self, root: Path, *, config: str = "", env: dict[str, str] | None = None) -> None:
        self.root = root
        self.units = root / "units"
        self.units.mkdir(exist_ok=True)
        self.sockdir = Path(tempfile.mkdtemp(prefix="hv", dir="/tmp"))
        self.socket = self.sockdir / "hv.sock"
        self.state = root / "state"
        self.config_path = root / "config.toml"
        self.extra_env = env or {}
        self.write_config(config)
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.client = ControlClient(self.socket)

    # -------------------------------------------------------------- files

    def write_config(self, extra: str = "") -> None:
        text = (
            f'[daemon]\nstate_dir = "{self.state}"\nsocket = "{self.socket}"\n'
            f'shutdown_timeout = "10s"\n{extra}\n'
        )
        self.config_path.write_text(text)
        self.config_path.chmod(0o644)

    def write_unit(self, name: str, text: str) -> Path:
        path = self.units / f"{name}.toml"
        path.write_text(text)
        path.chmod(0o644)
        return path

    # -------------------------------------------------------------- process

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTVISOR_")}
        env.update(self.extra_env)
        return env

    def start(
        self, *, wait: bool = True, timeout: float = 20.0, wrapper: tuple[str, ...] = ()
    ) -> None:
        """Start ``hostvisor run`` (under ``wrapper``, e.g. ``("prlimit", "--nofile=1024")``)."""
        self.proc = subprocess.Popen(
            [*wrapper, PY, "-m", "supervisor", "run", "-c", str(self.config_path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=self.env(),
            cwd=self.root,
        )
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if wait:
            self.wait_stderr("hostvisor.daemon.started", timeout=timeout)
            threading.Thread(target=self._follow_events, daemon=True).start()
            self.wait_for(
                lambda: any(e["event"] == "hostvisor.daemon.started" for e in self.events)
            )

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.stderr.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _follow_events(self) -> None:
        try:
            with self.client.stream("events", {"since": 0}) as sub:
                with self._cond:
                    self.events.extend(sub.result["events"])
                    self._cond.notify_all()
                for event in sub:
                    with self._cond:
                        self.events.append(event)
                        self._cond.notify_all()
        except Exception:
            pass
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self, condition: Callable[[], bool], timeout: float = 15.0, what: str = ""
    ) -> None:
        """Wait until ``condition()`` holds, re-checking at each event or stderr line."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out waiting for {what or condition}; stderr tail:\n"
                        + "".join(self.stderr[-15:])
                    )
                self._cond.wait(min(left, 0.5))

    def wait_stderr(self, text: str, timeout: float = 15.0) -> None:
        self.wait_for(lambda: any(text in line for line in self.stderr), timeout, repr(text))

    def wait_event(
        self,
        name: str,
        service: str | None = None,
        *,
        after: int = 0,
        timeout: float = 15.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The first event ``name`` (for ``service``) with ``seq > after``."""
        found: list[dict[str, Any]] = []

        def match() -> bool:
            for event in self.events:
                if (
                    event["seq"] > after
                    and event["event"] == name
                    and (service is None or event["service"] == service)
                    and (where is None or where(event))
                ):
                    found.append(event)
                    return True
            return False

        self.wait_for(match, timeout, f"event {name} {service}")
        return found[0]

    def last_seq(self) -> int:
        with self._cond:
            return self.events[-1]["seq"] if self.events else 0

    def call(self, method: str, **params: Any) -> Any:
        return self.client.call(method, params, timeout=30)

    def status(self, name: str) -> dict[str, Any]:
        doc = self.call("status", services=[name])
        return dict(doc["services"][0])

    def wait_state(self, name: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
        """Wait (event-driven) until ``name`` is in ``state``; returns its status entry."""
        entry: dict[str, Any] = {}

        def check() -> bool:
            entry.update(self.status(name))
            return entry["state"] == state

        self.wait_for(check, timeout, f"{name} {state}")
        return entry

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                PY,
                "-m",
                "supervisor",
                *args,
                "-c",
                str(self.config_path),
                "--socket",
                str(self.socket),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=self.root,
        )

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def daemon_log(self) -> list[dict[str, Any]]:
        path = self.state / "logs" / "hostvisor.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@contextmanager
def daemon(
    root: Path,
    *,
    config: str = "",
    env: dict[str, str] | None = None,
    units: dict[str, str] | None = None,
    start: bool = True,
) -> Iterator[DaemonProcess]:
    """A :class:`DaemonProcess` with ``units`` written, started, and always cleaned up."""
    d = DaemonProcess(root, config=config, env=env)
    for name, text in (units or {}).items():
        d.write_unit(name, text)
    try:
        if start:
            d.start()
        yield d
    finally:
        d.cleanup()


def py_cmd(program: str, *args: object) -> str:
    """A TOML array literal running tests/programs/<program>.py."""
    argv = [PY, str(PROGRAMS / f"{program}.py"), *map(str, args)]
    return json.dumps(argv)


def dependency_chain(unit: str) -> dict[str, str]:
    """Units ``db <- api <- web`` (``web`` needs ``api`` started, ``api`` needs ``db``), each
    ``unit`` plus its ``depends_on``: for tests of stop order."""
    return {
        "db": unit,
        "api": unit + 'depends_on = ["db"]\n',
        "web": unit + 'depends_on = { api = "started" }\n',
    }
