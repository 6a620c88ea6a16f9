"""Faults of issue 9, item 2: a last line of defence. A bug anywhere in the daemon stops
every service before the daemon exits non-zero; a bug in one supervisor restarts that
supervisor instead of leaving its service FATAL, and commands to it are still answered."""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import anyio
import psutil

from supervisor.drivers.process import ProcessDriver, ProcessHandle
from supervisor.events import SERVICE_BACKOFF, SERVICE_RUNNING
from supervisor.spec import ServiceSpec
from supervisor.states import ServiceState
from tests.daemon_harness import DaemonProcess
from tests.support import make_spec, program, supervising

S = ServiceState


class BuggyDriver(ProcessDriver):
    """The real driver, but the first instance's ``wait()`` raises a bug 0.3 s in."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.handles: list[ProcessHandle] = []

    async def start(self, spec: ServiceSpec, *, task_group: Any) -> ProcessHandle:
        handle = await super().start(spec, task_group=task_group)
        self.handles.append(handle)
        if len(self.handles) == 1:

            async def buggy_wait() -> Any:
                await anyio.sleep(0.3)
                raise RuntimeError("planted bug")

            handle.wait = buggy_wait  # type: ignore[method-assign]
        return handle


class TestSupervisorBug:
    async def test_a_bug_restarts_the_supervisor_and_stops_the_lost_instance(
        self, tmp_path: Path
    ) -> None:
        """The instance the bug lost track of is stopped, a backoff event names the error,
        the traceback is handed over, and a fresh instance runs (0.1: FATAL forever)."""
        crashes: list[tuple[str, str, BaseException]] = []
        driver = BuggyDriver(state_dir=tmp_path / "state")
        spec = make_spec(tmp_path, "b", program("svc_sleep"))
        async with supervising(
            tmp_path, spec, driver=driver, on_crash=lambda *a: crashes.append(a)
        ) as h:
            event = await h.wait_event(SERVICE_BACKOFF, "b")
            assert event.attributes["error.type"] == "RuntimeError"
            assert "planted bug" in event.message
            await h.wait_event(SERVICE_RUNNING, "b")
            await h.wait_state("b", S.RUNNING)
            first, second = driver.handles[0], driver.handles[1]
            assert not psutil.pid_exists(first.pid) or (
                psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE
            )
            assert h["b"].handle is second and psutil.pid_exists(second.pid)
            assert crashes and "planted bug" in "".join(traceback.format_exception(crashes[0][2]))

    async def test_stop_reaches_a_supervisor_that_keeps_crashing(self, tmp_path: Path) -> None:
        """A supervisor whose every start hits a bug still answers `stop` at once."""

        class AlwaysBuggy(ProcessDriver):
            async def start(self, spec: ServiceSpec, *, task_group: Any) -> ProcessHandle:
                raise KeyError("planted bug")

        spec = make_spec(tmp_path, "k", program("svc_sleep"))
        async with supervising(
            tmp_path, spec, driver=AlwaysBuggy(state_dir=tmp_path / "state"), on_crash=print
        ) as h:
            await h.wait_event(SERVICE_BACKOFF, "k", where=lambda e: "planted" in e.message)
            gen = h["k"].command_stop()
            with anyio.fail_after(5):
                await h["k"].wait_settled(gen, frozenset({S.STOPPED}))
            assert h["k"].state is S.STOPPED


class TestDaemonBug:
    def test_a_bug_in_the_daemon_stops_every_service_and_exits_70(self, tmp_path: Path) -> None:
        """Whatever escapes the daemon's task group: services are stopped in order, the
        error is logged once, and `hostvisor run` exits 70 (EX_SOFTWARE), no orphan left."""
        d = DaemonProcess(tmp_path)
        sleep = (
            'command = ["sh", "-c", "echo $$ >> pids; exec sleep 600"]\nstart_seconds = "0.2s"\n'
        )
        d.write_unit("db", sleep)
        d.write_unit("api", sleep + 'depends_on = ["db"]\n')
        crashing = Path(__file__).parent.parent / "programs" / "core_crashing_daemon.py"
        proc = subprocess.Popen(
            [sys.executable, str(crashing), str(d.config_path)],
            stderr=subprocess.PIPE,
            text=True,
            env=d.env(),
            cwd=tmp_path,
        )
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
            d.cleanup()
        assert proc.returncode == 70, stderr
        lines = (d.state / "logs" / "hostvisor.log").read_text().splitlines()
        errors = [e for e in map(json.loads, lines) if "planted bug" in e.get("message", "")]
        assert len(errors) == 1 and "RuntimeError" in errors[0]["exception.stacktrace"]
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert len(pids) == 2
        assert not any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
        )
