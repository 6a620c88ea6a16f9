"""``hostvisor run`` end to end: one instance per state folder, ordered shutdown, reload by
SIGHUP, the daemon log, orphan reaping, and the seed host's worker-supervisor as one unit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from tests.daemon_harness import PY, DaemonProcess, daemon, dependency_chain, py_cmd
from tests.support import free_port, marked

SLEEP = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\n'


class TestSingleInstance:
    def test_second_daemon_on_the_same_state_folder_exits_1(self, tmp_path: Path) -> None:
        """A second `hostvisor run` on the same state folder says who runs and exits 1."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            d.wait_state("a", "running")
            second = subprocess.run(
                [PY, "-m", "supervisor", "run", "-c", str(d.config_path)],
                capture_output=True,
                text=True,
                timeout=30,
                env=d.env(),
            )
            assert second.returncode == 1
            assert f"already running (pid {d.proc.pid})" in second.stderr  # type: ignore[union-attr]
            assert "Traceback" not in second.stderr
            assert d.status("a")["state"] == "running"


class TestShutdown:
    def test_sigterm_stops_dependents_first_and_exits_0(self, tmp_path: Path) -> None:
        """SIGTERM: dependents stop before what they depend on, no child is left, exit 0."""
        units = dependency_chain(SLEEP)
        with daemon(tmp_path, units=units) as d:
            for name in units:
                d.wait_state(name, "running")
            pids = [d.status(n)["pid"] for n in units]
            d.signal(signal.SIGTERM)
            assert d.proc.wait(30) == 0  # type: ignore[union-attr]
            log = d.daemon_log()
            stopped = [e["service"] for e in log if e.get("event") == "hostvisor.service.stopped"]
            assert stopped.index("web") < stopped.index("api") < stopped.index("db")
            assert any(e.get("event") == "hostvisor.daemon.stopping" for e in log)
            assert not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
            )

    def test_a_child_ignoring_sigterm_is_killed_within_shutdown_timeout(
        self, tmp_path: Path
    ) -> None:
        """A service that ignores SIGTERM is SIGKILLed after stop_timeout; the daemon exits 0."""
        stubborn = [
            PY,
            "-c",
            "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)",
        ]
        unit = f'command = {json.dumps(stubborn)}\nstart_seconds = "0.2s"\nstop_timeout = "1s"\n'
        with daemon(tmp_path, units={"stubborn": unit}) as d:
            pid = d.wait_state("stubborn", "running")["pid"]
            begin = time.monotonic()
            d.signal(signal.SIGTERM)
            assert d.proc.wait(30) == 0  # type: ignore[union-attr]
            assert time.monotonic() - begin < 8
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


class TestReload:
    def test_invalid_config_changes_nothing(self, tmp_path: Path) -> None:
        """SIGHUP with a bad unit: config.rejected with the errors; services untouched."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            pid = d.wait_state("a", "running")["pid"]
            d.write_unit("b", 'command = ["true"]\nrestart = "sometimes"\n')
            d.signal(signal.SIGHUP)
            rejected = d.wait_event("hostvisor.config.rejected")
            assert "b.toml: restart" in rejected["message"]
            assert d.status("a")["pid"] == pid
            assert "b" not in [s["name"] for s in d.call("status")["services"]]

    def test_restarts_exactly_the_changed_units(self, tmp_path: Path) -> None:
        """SIGHUP: changed restarted, added started, removed stopped, unchanged left alone."""
        with daemon(tmp_path, units={"same": SLEEP, "edit": SLEEP, "gone": SLEEP}) as d:
            pids = {n: d.wait_state(n, "running")["pid"] for n in ("same", "edit", "gone")}
            d.write_unit("edit", SLEEP + 'env = { VERSION = "2" }\n')
            (d.units / "gone.toml").unlink()
            d.write_unit("new", SLEEP)
            seq = d.last_seq()
            d.signal(signal.SIGHUP)
            reloaded = d.wait_event("hostvisor.daemon.reloaded", after=seq)
            attrs = reloaded["attributes"]
            assert attrs["hostvisor.reload.added"] == ["new"]
            assert attrs["hostvisor.reload.removed"] == ["gone"]
            assert attrs["hostvisor.reload.changed"] == ["edit"]
            assert attrs["hostvisor.reload.unchanged"] == ["same"]
            assert d.status("same")["pid"] == pids["same"]
            assert d.wait_state("edit", "running")["pid"] != pids["edit"]
            d.wait_state("new", "running")
            d.wait_for(lambda: not marked("gone", anywhere=True), what="gone's process to end")


class TestReloadRaces:
    def test_a_start_during_a_reload_waits_for_it(self, tmp_path: Path) -> None:
        """`start` while a SIGHUP reload retires the changed unit: the reload completes,
        the new spec runs, and SIGTERM afterwards still stops the daemon."""
        stubborn = py_cmd("proc_stubborn")

        def unit(version: str) -> str:
            return f'description = "{version}"\ncommand = {stubborn}\nstart_seconds = "0.2s"\nstop_timeout = "1s"\n'

        with daemon(tmp_path, units={"slow": unit("v1")}) as d:
            old = d.wait_state("slow", "running")["pid"]
            d.write_unit("slow", unit("v2"))
            seq = d.last_seq()
            d.signal(signal.SIGHUP)
            d.wait_state("slow", "stopping")
            d.call("start", services=["slow"], wait=False)
            d.wait_event("hostvisor.daemon.reloaded", after=seq)
            assert d.wait_state("slow", "running")["pid"] != old
            d.signal(signal.SIGTERM)
            assert d.proc.wait(20) == 0  # type: ignore[union-attr]


class TestDaemonLog:
    def test_events_are_json_lines_in_the_daemon_log(self, tmp_path: Path) -> None:
        """Every event lands in <state>/logs/hostvisor.log as one JSON object per line."""
        with daemon(tmp_path, units={"a": SLEEP}) as d:
            d.wait_state("a", "running")
            d.wait_for(
                lambda: any(e.get("event") == "hostvisor.service.running" for e in d.daemon_log())
            )
            record = next(
                e for e in d.daemon_log() if e.get("event") == "hostvisor.service.running"
            )
            assert set(record) >= {"seq", "time", "event", "service", "message", "attributes"}
            assert record["service"] == "a"
            assert record["attributes"]["process.pid"] == d.status("a")["pid"]
            d.wait_stderr("hostvisor.service.running a:")


class TestOrphans:
    def test_orphaned_grandchildren_are_reaped(self, tmp_path: Path) -> None:
        """The daemon is a child subreaper: a double-forked grandchild that exits leaves no zombie."""
        script = (
            "import os,time\n"
            "if os.fork() == 0:\n"
            "    if os.fork() == 0:\n"
            "        time.sleep(0.5); os._exit(0)\n"
            "    os._exit(0)\n"
            "print('forked', flush=True); time.sleep(600)\n"
        )
        unit = f'command = {json.dumps([PY, "-c", script])}\nstart_seconds = "0.2s"\n'
        with daemon(tmp_path, units={"forker": unit}) as d:
            d.wait_state("forker", "running")
            me = psutil.Process(d.proc.pid)  # type: ignore[union-attr]

            def children() -> list[psutil.Process]:  # the fd keeper is a child too
                return [k for k in me.children() if "fdkeeper.py" not in " ".join(k.cmdline())]

            deadline = time.monotonic() + 10
            # The orphan's exit produces no event we can wait on: check until the deadline.
            while time.monotonic() < deadline:
                kids = children()
                zombies = [k for k in kids if k.status() == "zombie"]
                if len(kids) == 1 and not zombies:
                    break
                time.sleep(0.1)
            assert [k.status() for k in children()] != ["zombie"]
            assert all(k.status() != "zombie" for k in children())
            assert len(children()) == 1


class TestUserMistakes:
    def test_group_writable_config_is_refused(self, tmp_path: Path) -> None:
        """A mode-664 config: exit 1, the path, the mode and the fix; no traceback."""
        with daemon(tmp_path, units={"a": SLEEP}, start=False) as d:
            d.config_path.chmod(0o664)
            result = subprocess.run(
                [PY, "-m", "supervisor", "run", "-c", str(d.config_path)],
                capture_output=True,
                text=True,
                timeout=30,
                env=d.env(),
            )
            assert result.returncode == 1
            assert str(d.config_path) in result.stderr and "0664" in result.stderr
            assert "Traceback" not in result.stderr

    def test_check_prints_every_error(self, tmp_path: Path) -> None:
        """`hostvisor check` lists each error as file: key: message and exits 1."""
        with daemon(tmp_path, start=False) as d:
            d.write_unit("web", 'command = ["x"]\n[health]\nintervall = "5s"\nhttp = "http://x"\n')
            d.write_unit("Bad Name", 'command = ["x"]\n')
            result = d.cli("check")
            assert result.returncode == 1
            assert (
                'web.toml: health.intervall: unknown key (did you mean "interval"?)'
                in result.stderr
            )
            assert "Bad Name.toml" in result.stderr


class TestSeedWorker:
    def test_the_mac_mini_worker_supervisor_as_one_unit(self, tmp_path: Path) -> None:
        """users.md section 1: kill a stale holder of the port, preflight before every spawn,
        env file + forced WORKER_ROLE=host, HTTP health, PUT sync after start, backoff."""
        port = free_port()
        worker = tmp_path / "worker"
        (worker / "src").mkdir(parents=True)
        env_file = tmp_path / "system-bus.env"
        env_file.write_text("WORKER_ROLE=cluster\nINNGEST_SIGNING_KEY=signkey-very-secret-123\n")
        env_file.chmod(0o600)
        # A stale worker from an earlier run still holds the port (it carries our marker).
        stale = subprocess.Popen(
            [PY, str(Path(__file__).parent / "programs" / "svc_serve.py"), "--port", str(port)],
            cwd=worker,
            env={**os.environ, "HOSTVISOR_SERVICE": "system-bus-worker"},
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        unit = f"""
description = "joelclaw host worker (bun run src/serve.ts in the seed)"
command = {py_cmd("svc_serve", "--port", port)}
workdir = "{worker}"
env_files = ["{env_file}"]
env = {{ WORKER_ROLE = "host" }}
port = {port}
reclaim_port = "own"
stop_timeout = "2s"

[preflight]
command = ["{PY}", "-c", "import pathlib,sys; pathlib.Path('src/index.host.ts').exists() or sys.exit('Cannot find module ./src/index.host.ts')"]
timeout = "10s"

[health]
http = "http://127.0.0.1:{port}/api/inngest"
interval = "0.2s"
timeout = "1s"
failure_threshold = 3

[post_start]
http = "http://127.0.0.1:{port}/api/inngest"
method = "PUT"

[backoff]
initial = "0.1s"
max = "0.5s"
multiplier = 2.0
"""
        try:
            with daemon(tmp_path, units={"system-bus-worker": unit}) as d:
                failed = d.wait_event("hostvisor.preflight.failed", "system-bus-worker")
                assert "Cannot find module" in failed["message"]
                d.wait_event("hostvisor.service.backoff", "system-bus-worker")
                (worker / "src" / "index.host.ts").write_text("export {}\n")
                reclaimed = d.wait_event("hostvisor.port.reclaimed", "system-bus-worker")
                assert reclaimed["attributes"]["process.pid"] == stale.pid
                entry = d.wait_state("system-bus-worker", "running")
                assert entry["health"] == "healthy" and entry["pid"] != stale.pid
                child_env = json.loads((worker / "env.json").read_text())
                assert child_env["WORKER_ROLE"] == "host"
                assert child_env["INNGEST_SIGNING_KEY"] == "signkey-very-secret-123"
                assert child_env["HOSTVISOR_SERVICE"] == "system-bus-worker"
                d.wait_for(lambda: (worker / "syncs").exists(), what="the PUT sync")
                assert (worker / "syncs").read_text() == "PUT /api/inngest\n"
                # Three failed checks in a row: restart through the same backoff as a crash.
                (worker / "unhealthy").write_text("")
                d.wait_event("hostvisor.health_check.restart", "system-bus-worker")
                d.wait_event(
                    "hostvisor.service.backoff",
                    "system-bus-worker",
                    where=lambda e: "health checks failed" in e["message"],
                )
                (worker / "unhealthy").unlink()
                seq = d.last_seq()
                d.wait_event("hostvisor.service.running", "system-bus-worker", after=seq)
                # The secret from the env file never shows in events or the daemon log.
                log_text = (d.state / "logs" / "hostvisor.log").read_text()
                assert "signkey-very-secret-123" not in log_text
                assert "signkey-very-secret-123" not in json.dumps(d.call("status"))
        finally:
            stale.kill()
            stale.wait()


class TestSupervisorCrash:
    async def test_a_bug_in_one_supervisor_spares_the_others(self, tmp_path: Path) -> None:
        """An unexpected exception in one supervisor puts that service in backoff with the
        error and an event, and the supervisor tries again; the daemon and the other
        services keep running, and shutdown is not held up by it."""
        import anyio

        from supervisor import config
        from supervisor.daemon import Daemon
        from supervisor.states import ServiceState

        d = DaemonProcess(tmp_path)  # only for its files; the daemon runs in-process here
        d.write_unit("good", SLEEP)
        d.write_unit("bad", SLEEP)
        loaded = config.load(d.config_path)
        daemon = Daemon(loaded, state_dir=d.state, socket_path=d.socket)
        real_start = daemon.process_driver.start
        calls = []

        async def start(spec: Any, *, task_group: Any) -> Any:
            if spec.name == "bad":
                calls.append(spec.name)
                raise RuntimeError("boom")  # a bug, not a spawn error
            return await real_start(spec, task_group=task_group)

        daemon.process_driver.start = start  # type: ignore[method-assign]
        async with daemon.bus.subscribe() as events, anyio.create_task_group() as tg:
            daemon._tg = tg
            for spec in loaded.services.values():
                await daemon._launch(spec)
            with anyio.fail_after(10):
                while not (
                    len(calls) >= 2 and daemon.supervisors["good"].state is ServiceState.RUNNING
                ):
                    await daemon.changed.wait()
            assert daemon.supervisors["bad"].state is not ServiceState.FATAL
            with anyio.fail_after(5):
                async for event in events:
                    if event.event == "hostvisor.service.backoff" and event.service == "bad":
                        assert event.attributes["error.type"] == "RuntimeError"
                        assert "RuntimeError: boom" in event.message
                        break
            with anyio.fail_after(5):
                await daemon.shutdown()
            tg.cancel_scope.cancel()
        d.cleanup()
