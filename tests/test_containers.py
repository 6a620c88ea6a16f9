"""Container units end to end: a real ``hostvisor run`` against a real, private engine.

Issue 5 point 8: every scenario goes through the daemon (tests/daemon_harness.py)
with ``DOCKER_HOST`` pointing at the session's private dockerd
(tests/docker_engine.py). Containers run the busybox test image with
``--network none`` and a per-test label, and are removed at the end of each test.
"""

from __future__ import annotations

import itertools
import json
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.daemon_harness import DaemonProcess, daemon, py_cmd
from tests.docker_engine import DockerEngine

pytestmark = pytest.mark.docker

#: PID 1 that exits at once on SIGTERM (busybox ``sleep`` as PID 1 ignores it).
SLEEPER = ("sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait")
BACKOFF = '[backoff]\ninitial = "0.1s"\nmax = "1s"\njitter = 0.0\n'
PROCESS = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\n'
DOCKER_HEALTH = (
    '[health]\ndocker = true\ninterval = "0.2s"\ntimeout = "2s"\nfailure_threshold = 2\n'
)


class Containers:
    """Names and labels for one test's containers; all of them are removed afterwards."""

    def __init__(self, engine: DockerEngine) -> None:
        self.engine = engine
        self.tag = uuid.uuid4().hex[:10]
        self.label = f"hostvisor-test={self.tag}"

    def name(self, role: str) -> str:
        return f"hvc-{role}-{self.tag}"

    def run(self, name: str, *options: str, cmd: tuple[str, ...] = SLEEPER) -> str:
        """``docker run -d`` a labelled container; returns its id."""
        argv = ["run", "-d", "--name", name, *self.base_options(), *options, self.engine.image]
        return self.engine.docker(*argv, *cmd).stdout.strip()

    def base_options(self) -> list[str]:
        return ["--network", "none", "--stop-timeout", "1", "--label", self.label]

    def inspect(self, name: str) -> dict[str, Any]:
        data = json.loads(self.engine.docker("inspect", name).stdout)
        return dict(data[0])

    def ids(self) -> list[str]:
        """Ids of every container (running or not) carrying this test's label."""
        listing = self.engine.docker("ps", "-aq", "--no-trunc", "--filter", f"label={self.label}")
        return listing.stdout.split()

    def remove_all(self) -> None:
        if self.engine.alive and (ids := self.ids()):
            self.engine.docker("rm", "-f", *ids, check=False)


@pytest.fixture
def containers(engine: DockerEngine) -> Iterator[Containers]:
    made = Containers(engine)
    yield made
    engine.ensure_running()
    made.remove_all()


def unit(name: str, *, extra: str = "", tables: str = "") -> str:
    """A container unit for ``name`` with fast backoff; ``extra`` keys, then ``tables``."""
    head = f'container = "{name}"\nstart_seconds = "0.2s"\nstop_timeout = "1s"\n{extra}'
    return head + BACKOFF + tables


def events_of(d: DaemonProcess, name: str, service: str, *, after: int) -> list[dict[str, Any]]:
    with d._cond:
        return [
            e
            for e in d.events
            if e["seq"] > after and e["event"] == name and e["service"] == service
        ]


def quiet_for(d: DaemonProcess, seconds: float, storm: Callable[[], bool], what: str) -> None:
    """Watch for ``seconds`` (the test's observation window), failing as soon as ``storm()``."""
    try:
        d.wait_for(storm, timeout=seconds)
    except AssertionError:
        return
    raise AssertionError(f"{what} within {seconds:g}s: {d.events[-5:]}")


def open_daemon(
    tmp_path: Path, engine: DockerEngine, units: dict[str, str]
) -> AbstractContextManager[DaemonProcess]:
    """A daemon on ``units`` talking to the private engine."""
    return daemon(tmp_path, units=units, env={"DOCKER_HOST": engine.host})


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


class TestDesiredState:
    @pytest.mark.parametrize("how", ["kill", "stop"])
    def test_container_stopped_from_outside_is_started_again(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers, how: str
    ) -> None:
        """`docker kill`/`docker stop` from outside: exited (with Docker's exit code), backoff,
        running again; status shows the container id and the container runs."""
        name = containers.name("web")
        cid = containers.run(name)
        with open_daemon(tmp_path, engine, {"web": unit(name)}) as d:
            entry = d.wait_state("web", "running")
            assert entry["kind"] == "container" and entry["container_id"] == cid
            before = containers.inspect(name)["State"]["StartedAt"]
            seq = d.last_seq()
            engine.docker(how, name)  # stop: SIGTERM, and the trap exits 0
            code = 137 if how == "kill" else 0
            exited = d.wait_event("hostvisor.service.exited", "web", after=seq)
            assert exited["attributes"]["container.id"] == cid
            assert exited["attributes"]["process.exit.code"] == code
            backoff = d.wait_event("hostvisor.service.backoff", "web", after=exited["seq"])
            d.wait_event("hostvisor.service.running", "web", after=backoff["seq"])
            entry = d.wait_state("web", "running")
            assert entry["container_id"] == cid and entry["restarts"] == 1
            assert entry["last_exit"] == {"code": code, "signal": None}
            state = containers.inspect(name)["State"]
            assert state["Running"] and state["StartedAt"] != before
            assert entry["pid"] == state["Pid"]

    def test_container_exited_255_at_daemon_start_is_started(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """A container that sits `Exited (255)` when the daemon starts is started whatever
        its exit code (Docker's own restart policies would not)."""
        name = containers.name("db")
        once = "if [ -e /ran ]; then exec sleep 1000; fi; touch /ran; exit 255"
        run = engine.docker(
            "run", "--name", name, *containers.base_options(), engine.image, "sh", "-c", once,
            check=False,
        )  # fmt: skip
        assert run.returncode == 255
        assert containers.inspect(name)["State"]["ExitCode"] == 255
        with open_daemon(tmp_path, engine, {"db": unit(name)}) as d:
            entry = d.wait_state("db", "running")
            state = containers.inspect(name)["State"]
            assert state["Running"] and entry["container_id"] == containers.ids()[0]
            assert d.cli("status", "db").returncode == 0


class TestHealth:
    def test_unhealthy_container_is_restarted_with_docker_health(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """`[health] docker = true`: the container's HEALTHCHECK turns unhealthy ->
        hostvisor.health_check.restart, and the container runs again (Docker never restarts
        an unhealthy container itself)."""
        name = containers.name("api")
        containers.run(
            name, "--health-cmd", "test ! -e /sick", "--health-interval", "200ms",
            "--health-retries", "1",
            cmd=("sh", "-c", "rm -f /sick; trap 'exit 0' TERM; sleep 1000 & wait"),
        )  # fmt: skip
        with open_daemon(tmp_path, engine, {"api": unit(name, tables=DOCKER_HEALTH)}) as d:
            entry = d.wait_state("api", "running")
            assert entry["health"] == "healthy"
            before = containers.inspect(name)["State"]["StartedAt"]
            seq = d.last_seq()
            engine.docker("exec", name, "sh", "-c", ": > /sick")
            restart = d.wait_event("hostvisor.health_check.restart", "api", after=seq)
            assert "unhealthy" in restart["message"]
            d.wait_event(
                "hostvisor.health.changed",
                "api",
                after=restart["seq"],
                where=lambda e: e["attributes"]["hostvisor.health.state"] == "healthy",
            )
            entry = d.wait_state("api", "running")
            assert entry["health"] == "healthy" and entry["restarts"] == 1
            state = containers.inspect(name)["State"]
            assert state["Running"] and state["StartedAt"] != before


class TestEngineOutage:
    def test_seed_incident_dockerd_killed_and_started_again(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """SIGKILL dockerd, then a fresh dockerd (the seed incident): disconnected, reconnected,
        and the container the restart left exited runs again."""
        name = containers.name("db")
        containers.run(name)
        with open_daemon(tmp_path, engine, {"db": unit(name)}) as d:
            d.wait_state("db", "running")
            seq = d.last_seq()
            try:
                engine.kill()
                down = d.wait_event("hostvisor.docker.disconnected", after=seq)
            finally:
                engine.start()
            up = d.wait_event("hostvisor.docker.reconnected", after=down["seq"], timeout=30)
            exited = d.wait_event("hostvisor.service.exited", "db", after=up["seq"])
            d.wait_event("hostvisor.service.running", "db", after=exited["seq"])
            assert containers.inspect(name)["State"]["Running"]
            assert d.wait_state("db", "running")["message"] == ""

    def test_a_stop_during_an_outage_finishes_when_the_engine_is_back(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """`stop` while the engine is down: the unit stays stopping with a message (it is
        never reported stopped while its container may run), and is stopped once the
        engine answers again."""
        name = containers.name("pending")
        containers.run(name)
        with open_daemon(tmp_path, engine, {"pending": unit(name)}) as d:
            d.wait_state("pending", "running")
            seq = d.last_seq()
            try:
                engine.kill()
                d.wait_event("hostvisor.docker.disconnected", after=seq)
                d.call("stop", services=["pending"], wait=False)
                entry = d.wait_state("pending", "stopping")
                d.wait_for(
                    lambda: d.status("pending")["message"].startswith("stop pending"),
                    what="the pending-stop message",
                )
            finally:
                engine.start()
            entry = d.wait_state("pending", "stopped", timeout=60)
            assert not containers.inspect(name)["State"]["Running"]
            assert entry["health"] in ("none", "unknown")

    def test_engine_down_for_a_while_no_storm_and_process_units_unaffected(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """While the engine is down: a running container unit keeps its state with health
        unknown and a message and is not started again; a unit in backoff retries at most a
        handful of times; a process unit keeps running with the same pid."""
        db, gone = containers.name("db"), containers.name("gone")
        containers.run(db, "--health-cmd", "true", "--health-interval", "200ms")
        units = {"db": unit(db, tables=DOCKER_HEALTH), "gone": unit(gone), "worker": PROCESS}
        with open_daemon(tmp_path, engine, units) as d:
            d.wait_state("db", "running")
            d.wait_event("hostvisor.service.backoff", "gone")
            pid = d.wait_event("hostvisor.service.running", "worker")["attributes"]["process.pid"]
            seq = d.last_seq()

            def storm() -> bool:
                return (
                    bool(events_of(d, "hostvisor.service.starting", "db", after=seq))
                    or len(events_of(d, "hostvisor.service.starting", "gone", after=seq)) > 5
                    or bool(events_of(d, "hostvisor.health.changed", "db", after=seq))
                )

            try:
                engine.kill()
                d.wait_event("hostvisor.docker.disconnected", after=seq)
                quiet_for(d, 3.0, storm, "a start storm or a health flip")
                entry = d.status("db")
                assert entry["state"] == "running" and entry["health"] == "unknown"
                assert "unreachable" in entry["message"]
                assert d.status("gone")["state"] in ("backoff", "starting")
                worker = d.status("worker")
                assert worker["state"] == "running" and worker["pid"] == pid
                assert not [e for e in d.events if e["seq"] > seq and e["service"] == "worker"]
            finally:
                engine.start()
            up = d.wait_event("hostvisor.docker.reconnected", after=seq, timeout=30)
            d.wait_event("hostvisor.service.running", "db", after=up["seq"])
            assert d.wait_state("worker", "running")["pid"] == pid


class TestMissingContainer:
    def test_recreate_command_creates_the_missing_container(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """A missing container with `recreate_command` (a `docker run -d --name ...` argv) is
        created and running."""
        name = containers.name("cache")
        argv = ["docker", "run", "-d", "--name", name, *containers.base_options(), engine.image]
        extra = f"recreate_command = {json.dumps([*argv, *SLEEPER])}\n"
        with open_daemon(tmp_path, engine, {"cache": unit(name, extra=extra)}) as d:
            entry = d.wait_state("cache", "running", timeout=30)
            info = containers.inspect(name)
            assert info["State"]["Running"] and entry["container_id"] == info["Id"]
            assert containers.ids() == [info["Id"]]

    def test_without_recreate_command_the_unit_waits_in_backoff(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """Without `recreate_command` the unit waits in backoff naming the container, at the
        backoff's pace (no tight loop), and runs once the container exists."""
        name = containers.name("queue")
        with open_daemon(tmp_path, engine, {"queue": unit(name)}) as d:
            d.wait_for(
                lambda: len(events_of(d, "hostvisor.service.backoff", "queue", after=0)) >= 4,
                what="four backoffs",
            )
            entry = d.status("queue")
            assert entry["state"] in ("backoff", "starting")
            assert name in d.wait_state("queue", "backoff")["message"]
            starts = events_of(d, "hostvisor.service.starting", "queue", after=0)
            delays = [
                b["attributes"]["hostvisor.backoff.delay_s"]
                for b in events_of(d, "hostvisor.service.backoff", "queue", after=0)
            ]
            assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
            gaps = [event_time(b) - event_time(a) for a, b in itertools.pairwise(starts)]
            assert all(gap >= delay * 0.9 for gap, delay in zip(gaps, delays, strict=False))
            seq = d.last_seq()
            cid = containers.run(name)
            d.wait_event("hostvisor.service.running", "queue", after=seq, timeout=10)
            assert d.status("queue")["container_id"] == cid


class TestDaemonRestart:
    def test_restarted_daemon_adopts_running_containers(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """hostvisor killed and started again while its containers run: the new daemon adopts
        them (StartedAt unchanged, no duplicate from recreate_command) and only starts the
        one that is not running."""
        up, down = containers.name("up"), containers.name("down")
        containers.run(up)
        containers.run(down)
        duplicate = ["docker", "run", "-d", *containers.base_options(), engine.image, *SLEEPER]
        extra = f"recreate_command = {json.dumps(duplicate)}\n"
        units = {"up": unit(up, extra=extra), "down": unit(down)}
        with open_daemon(tmp_path, engine, units) as first:
            first.wait_state("up", "running")
            first.wait_state("down", "running")
            first.signal(signal.SIGKILL)
            assert first.proc is not None and first.proc.wait(10) == -signal.SIGKILL
        started_at = containers.inspect(up)["State"]["StartedAt"]
        engine.docker("stop", "-t", "0", down)
        ids = sorted(containers.ids())
        with open_daemon(tmp_path, engine, units) as second:
            entry = second.wait_state("up", "running")
            second.wait_state("down", "running")
            assert containers.inspect(up)["State"]["StartedAt"] == started_at
            assert entry["container_id"] == containers.inspect(up)["Id"]
            assert entry["restarts"] == 0
            assert not events_of(second, "hostvisor.service.exited", "up", after=0)
            assert containers.inspect(down)["State"]["Running"]
            assert sorted(containers.ids()) == ids  # no duplicate

    def test_a_clean_daemon_stop_leaves_containers_running(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """SIGTERM stops process units but leaves container units to the engine (containers
        outlive hostvisor); the next daemon adopts them without a restart."""
        name = containers.name("kept")
        containers.run(name)
        units = {"kept": unit(name), "proc": PROCESS}
        with open_daemon(tmp_path, engine, units) as first:
            first.wait_state("kept", "running")
            pid = first.wait_state("proc", "running")["pid"]
            first.signal(signal.SIGTERM)
            assert first.proc is not None and first.proc.wait(30) == 0
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        state = containers.inspect(name)["State"]
        assert state["Running"]
        with open_daemon(tmp_path, engine, units) as second:
            entry = second.wait_state("kept", "running")
            assert containers.inspect(name)["State"]["StartedAt"] == state["StartedAt"]
            assert entry["restarts"] == 0


class TestDependsOn:
    def test_process_waits_for_the_container_to_be_healthy(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """`depends_on = { db = "healthy" }` on a container unit with docker health: the
        process unit (and a container unit) start only once the container is healthy."""
        db, api = containers.name("db"), containers.name("api")
        containers.run(
            db, "--health-cmd", "test -e /ready", "--health-interval", "200ms",
            "--health-start-period", "60s",
        )  # fmt: skip
        containers.run(api)
        engine.docker("stop", "-t", "0", api)
        needs_db = 'depends_on = { db = "healthy" }\n'
        units = {
            "db": unit(db, tables=DOCKER_HEALTH),
            "api": unit(api, extra=needs_db),
            "worker": PROCESS + needs_db,
        }
        with open_daemon(tmp_path, engine, units) as d:
            d.wait_for(
                lambda: all(
                    "waiting for db (healthy)" in d.status(n)["message"] for n in ("api", "worker")
                ),
                what="dependents waiting for db",
            )
            assert d.status("worker")["pid"] is None
            assert not containers.inspect(api)["State"]["Running"]
            assert d.status("db")["state"] == "starting"
            engine.docker("exec", db, "sh", "-c", ": > /ready")
            healthy = d.wait_event(
                "hostvisor.health.changed",
                "db",
                where=lambda e: e["attributes"]["hostvisor.health.state"] == "healthy",
            )
            d.wait_event("hostvisor.service.running", "worker", after=healthy["seq"])
            d.wait_event("hostvisor.service.running", "api", after=healthy["seq"])
            assert containers.inspect(api)["State"]["Running"]
            assert psutil.pid_exists(d.status("worker")["pid"])


class TestReexec:
    def test_reexec_keeps_the_container_and_the_process_unit(
        self, tmp_path: Path, engine: DockerEngine, containers: Containers
    ) -> None:
        """``hostvisor reexec`` with a container unit and a process unit: the same container
        (StartedAt unchanged), the same pid, restarts unchanged, no exit event (issue 10)."""
        box = containers.name("box")
        containers.run(box)
        units = {"box": unit(box), "proc": PROCESS}
        with open_daemon(tmp_path, engine, units) as d:
            entry = d.wait_state("box", "running")
            pid = d.wait_state("proc", "running")["pid"]
            started_at = containers.inspect(box)["State"]["StartedAt"]
            seq = d.last_seq()
            result = d.cli("reexec")
            assert result.returncode == 0, result.stderr
            after = d.wait_state("box", "running")
            assert after["container_id"] == entry["container_id"]
            assert after["restarts"] == entry["restarts"]
            assert containers.inspect(box)["State"]["StartedAt"] == started_at
            assert d.status("proc")["pid"] == pid
            logged = [e for e in d.daemon_log() if e.get("seq", 0) > seq]
            assert not [e for e in logged if e.get("event") == "hostvisor.service.exited"]
