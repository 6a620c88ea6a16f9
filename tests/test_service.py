"""The life cycle of one service: restart policies, backoff, give_up_after, spawn errors,
preflight, health checks, post_start, depends_on and commands — over real processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from supervisor import events as ev
from supervisor.spec import (
    BackoffSpec,
    HealthCheckSpec,
    PostStartSpec,
    PreflightSpec,
)
from supervisor.states import DependencyCondition, Health, Restart, ServiceState
from tests.support import PY, free_port, make_spec, marked, program, supervising

S = ServiceState


class TestRestartPolicy:
    async def test_always_restarts_a_crashed_process(self, tmp_path: Path) -> None:
        """A crash gives exited, backoff, then a new instance with restarts counted."""
        spec = make_spec(tmp_path, "crashy", program("svc_exit", "--after", "0.3", "--code", "3"))
        async with supervising(tmp_path, spec) as h:
            exited = await h.wait_event(ev.SERVICE_EXITED, "crashy")
            assert exited.attributes["process.exit.code"] == 3
            backoff = await h.wait_event(ev.SERVICE_BACKOFF, "crashy")
            assert backoff.attributes["hostvisor.backoff.attempt"] == 1
            await h.wait_event(ev.SERVICE_STARTING, "crashy")
            await h.wait_until(lambda: h["crashy"].restarts >= 1)
            assert h["crashy"].last_exit is not None and h["crashy"].last_exit.code == 3

    async def test_on_failure_leaves_a_clean_exit_alone(self, tmp_path: Path) -> None:
        """restart = on-failure: exit 0 ends in EXITED, with no new instance."""
        spec = make_spec(
            tmp_path,
            "job",
            program("svc_exit", "--after", "0.3", "--code", "0"),
            restart=Restart.ON_FAILURE,
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("job", S.EXITED)
            assert h["job"].restarts == 0
            assert h["job"].status_entry()["last_exit"] == {"code": 0, "signal": None}

    async def test_no_never_restarts(self, tmp_path: Path) -> None:
        """restart = no: a failing exit also ends in EXITED."""
        spec = make_spec(
            tmp_path,
            "once",
            program("svc_exit", "--after", "0.3", "--code", "2"),
            restart=Restart.NO,
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("once", S.EXITED)
            assert h["once"].restarts == 0


class TestBackoffAndGiveUp:
    async def test_delays_grow_and_are_capped(self, tmp_path: Path) -> None:
        """Failed starts back off initial * 2^n up to max (no jitter here)."""
        spec = make_spec(
            tmp_path,
            "flap",
            program("svc_exit", "--code", "1"),
            backoff=BackoffSpec(initial=0.05, max=0.2, multiplier=2, jitter=0),
        )
        async with supervising(tmp_path, spec) as h:
            delays = []
            for _ in range(4):
                event = await h.wait_event(ev.SERVICE_BACKOFF, "flap")
                delays.append(event.attributes["hostvisor.backoff.delay_s"])
            assert delays == [0.05, 0.1, 0.2, 0.2]

    @pytest.mark.parametrize("probe", [False, True], ids=["start_seconds", "probe"])
    async def test_backoff_resets_after_reset_after_seconds_running(
        self, tmp_path: Path, probe: bool
    ) -> None:
        """Two quick crashes back off 0.05 then 0.1 s; an instance that ran longer than
        reset_after before crashing starts the sequence again at initial (the reset is a
        timer of the instance's life, RUNNING by start_seconds or by its first passing
        probe); one that runs shorter does not."""
        runs = tmp_path / "runs"
        code = (
            "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) "
            "if p.exists() else 0; p.write_text('x' * (n + 1)); "
            "time.sleep(1.2 if n == 2 else 0.02); raise SystemExit(1)"
        )
        health = HealthCheckSpec(exec=(PY, "-c", "pass"), interval=0.05, timeout=2)
        spec = make_spec(
            tmp_path,
            "phoenix",
            [PY, "-c", code, str(runs)],
            start_seconds=0,
            health=health if probe else None,
            backoff=BackoffSpec(initial=0.05, max=5, multiplier=2, jitter=0, reset_after=0.4),
        )
        async with supervising(tmp_path, spec) as h:
            seen = []
            for _ in range(4):
                event = await h.wait_event(ev.SERVICE_BACKOFF, "phoenix")
                seen.append(
                    (
                        event.attributes["hostvisor.backoff.attempt"],
                        event.attributes["hostvisor.backoff.delay_s"],
                    )
                )
            assert seen == [(1, 0.05), (2, 0.1), (1, 0.05), (2, 0.1)]

    async def test_gives_up_after_n_failed_starts(self, tmp_path: Path) -> None:
        """give_up_after = 3: the third failed start in a row is FATAL, with an event."""
        # start_seconds far above the program's life: a slow interpreter start on a loaded
        # machine (0.2 s here once, on a CI clone) must not count as a start that succeeded.
        spec = make_spec(
            tmp_path, "doomed", program("svc_exit", "--code", "1"), give_up_after=3,
            start_seconds=10.0,
        )  # fmt: skip
        async with supervising(tmp_path, spec) as h:
            fatal = await h.wait_event(ev.SERVICE_FATAL, "doomed")
            assert "3 failed starts" in fatal.message
            assert h["doomed"].state is S.FATAL
            assert h["doomed"].restarts == 2

    async def test_spawn_error_names_errno_and_path(self, tmp_path: Path) -> None:
        """A missing binary is a failed start with errno and path, never RUNNING without a pid."""
        spec = make_spec(tmp_path, "ghost", ["/nonexistent/bin/ghostd", "--serve"], give_up_after=2)
        async with supervising(tmp_path, spec) as h:
            backoff = await h.wait_event(ev.SERVICE_BACKOFF, "ghost")
            assert "ENOENT" in backoff.message and "/nonexistent/bin/ghostd" in backoff.message
            await h.wait_state("ghost", S.FATAL)
            assert not any(e.event == ev.SERVICE_RUNNING for e in h.seen)
            assert h["ghost"].status_entry()["pid"] is None

    async def test_missing_workdir_is_a_failed_start(self, tmp_path: Path) -> None:
        """A workdir that does not exist is named in the message."""
        spec = make_spec(
            tmp_path, "lost", [PY, "-c", "pass"], workdir=tmp_path / "nowhere", give_up_after=1
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("lost", S.FATAL)
            assert "nowhere" in h["lost"].message

    async def test_an_early_exit_is_a_failed_start(self, tmp_path: Path) -> None:
        """Up less than start_seconds counts as a failed start (supervisord's startsecs)."""
        spec = make_spec(
            tmp_path,
            "brief",
            program("svc_exit", "--after", "0.1", "--code", "0"),
            start_seconds=1.0,
            give_up_after=2,
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("brief", S.FATAL, timeout=15)
            assert not any(e.event == ev.SERVICE_RUNNING for e in h.seen)


class TestPreflight:
    async def test_failure_skips_the_spawn_then_recovers(self, tmp_path: Path) -> None:
        """Preflight exit != 0: an event with the code and stderr tail, no spawn, backoff;
        once it passes the service runs."""
        flag = tmp_path / "ok"
        check = [
            PY,
            "-c",
            f"import os,sys; os.path.exists({str(flag)!r}) or sys.exit('broken import: x')",
        ]
        spec = make_spec(
            tmp_path,
            "pf",
            program("svc_sleep"),
            preflight=PreflightSpec(command=tuple(check), timeout=5),
        )
        async with supervising(tmp_path, spec) as h:
            failed = await h.wait_event(ev.PREFLIGHT_FAILED, "pf")
            assert failed.attributes["process.exit.code"] == 1
            assert "broken import: x" in failed.message
            await h.wait_event(ev.SERVICE_BACKOFF, "pf")
            assert h["pf"].handle is None
            flag.write_text("")
            await h.wait_state("pf", S.RUNNING)

    async def test_timeout_kills_the_preflight_group(self, tmp_path: Path) -> None:
        """A preflight that hangs is killed at its timeout, with its children."""
        check = [
            PY,
            "-c",
            "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)",
        ]
        spec = make_spec(
            tmp_path,
            "slowpf",
            program("svc_sleep"),
            preflight=PreflightSpec(command=tuple(check), timeout=0.5),
        )
        async with supervising(tmp_path, spec) as h:
            failed = await h.wait_event(ev.PREFLIGHT_FAILED, "slowpf")
            assert "timed out" in failed.message
            await h.wait_until(lambda: not marked("slowpf"), timeout=5)


class TestHealth:
    async def test_http_probe_makes_it_running_then_restarts_after_threshold(
        self, tmp_path: Path
    ) -> None:
        """RUNNING after the first passing check; failure_threshold failures in a row give
        health.changed, health_check.restart, and a restart through backoff."""
        port = free_port()
        spec = make_spec(
            tmp_path,
            "api",
            program("svc_serve", "--port", port),
            health=HealthCheckSpec(
                http=f"http://127.0.0.1:{port}/health", interval=0.1, timeout=1, failure_threshold=3
            ),
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("api", S.RUNNING)
            assert h["api"].health is Health.HEALTHY
            first_pid = h["api"].handle.pid  # type: ignore[union-attr]
            (tmp_path / "unhealthy").write_text("")
            changed = await h.wait_event(
                ev.HEALTH_CHANGED, "api", where=lambda e: "-> unhealthy" in e.message
            )
            assert "HTTP 503" in changed.message
            await h.wait_event(ev.HEALTH_CHECK_RESTART, "api")
            await h.wait_event(ev.SERVICE_BACKOFF, "api")
            (tmp_path / "unhealthy").unlink()
            await h.wait_state("api", S.RUNNING)
            assert h["api"].handle.pid != first_pid  # type: ignore[union-attr]
            assert h["api"].restarts == 1

    async def test_a_hung_probe_ends_at_its_timeout(self, tmp_path: Path) -> None:
        """A server that accepts and never answers fails the probe at ``timeout``."""
        port = free_port()
        (tmp_path / "hang").write_text("")
        spec = make_spec(
            tmp_path,
            "mute",
            program("svc_serve", "--port", port),
            health=HealthCheckSpec(
                http=f"http://127.0.0.1:{port}/health",
                interval=0.1,
                timeout=0.3,
                failure_threshold=2,
            ),
        )
        async with supervising(tmp_path, spec) as h:
            # A slow host may refuse the first probes before the server binds: wait for a
            # failure that is the timeout, then for the restart it leads to.
            await h.wait_event(
                ev.HEALTH_CHANGED, "mute", where=lambda e: "timed out" in e.message, timeout=20
            )
            await h.wait_event(ev.HEALTH_CHECK_RESTART, "mute")

    async def test_tcp_and_exec_probes(self, tmp_path: Path) -> None:
        """A tcp probe passes when the port accepts; an exec probe by its exit code."""
        port = free_port()
        tcp = make_spec(
            tmp_path,
            "tcp",
            program("svc_serve", "--port", port),
            health=HealthCheckSpec(tcp=f"127.0.0.1:{port}", interval=0.1),
        )
        exe = make_spec(
            tmp_path,
            "exe",
            program("svc_sleep"),
            health=HealthCheckSpec(exec=(PY, "-c", "raise SystemExit(0)"), interval=0.1),
        )
        async with supervising(tmp_path, tcp, exe) as h:
            await h.wait_state("tcp", S.RUNNING)
            await h.wait_state("exe", S.RUNNING)
            assert h["exe"].health is Health.HEALTHY


class TestPostStart:
    async def test_put_once_per_start(self, tmp_path: Path) -> None:
        """post_start PUTs once the service is healthy (the seed's sync endpoint)."""
        port = free_port()
        spec = make_spec(
            tmp_path,
            "w",
            program("svc_serve", "--port", port),
            health=HealthCheckSpec(http=f"http://127.0.0.1:{port}/health", interval=0.1),
            post_start=PostStartSpec(http=f"http://127.0.0.1:{port}/sync", method="PUT"),
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("w", S.RUNNING)
            with anyio.fail_after(5):
                while not (tmp_path / "syncs").exists():
                    await anyio.sleep(0.02)
            assert (tmp_path / "syncs").read_text() == "PUT /sync\n"

    async def test_failure_is_an_event_not_a_restart(self, tmp_path: Path) -> None:
        """A failing hook gives post_start.failed and the service keeps running."""
        spec = make_spec(
            tmp_path,
            "hooked",
            program("svc_sleep"),
            post_start=PostStartSpec(command=(PY, "-c", "raise SystemExit(4)")),
        )
        async with supervising(tmp_path, spec) as h:
            failed = await h.wait_event(ev.POST_START_FAILED, "hooked")
            assert "exit 4" in failed.message
            assert h["hooked"].state is S.RUNNING and h["hooked"].restarts == 0


class TestDependsOn:
    async def test_waits_for_a_healthy_dependency(self, tmp_path: Path) -> None:
        """A dependent stays STARTING with a message until its dependency is healthy."""
        port = free_port()
        (tmp_path / "unhealthy").write_text("")
        db = make_spec(
            tmp_path,
            "db",
            program("svc_serve", "--port", port),
            health=HealthCheckSpec(
                http=f"http://127.0.0.1:{port}/health", interval=0.1, failure_threshold=100
            ),
        )
        app = make_spec(
            tmp_path, "app", program("svc_sleep"), depends_on={"db": DependencyCondition.HEALTHY}
        )
        async with supervising(tmp_path, db, app) as h:
            await h.wait_until(lambda: h["app"].message == "waiting for db (healthy)")
            assert h["app"].state is S.STARTING and h["app"].handle is None
            (tmp_path / "unhealthy").unlink()
            await h.wait_state("app", S.RUNNING)


class TestCommands:
    async def test_stop_start_restart(self, tmp_path: Path) -> None:
        """stop ends in STOPPED with no process left; start and restart bring a new pid."""
        spec = make_spec(tmp_path, "svc", program("svc_sleep"))
        async with supervising(tmp_path, spec) as h:
            sup = h["svc"]
            await h.wait_state("svc", S.RUNNING)
            gen = sup.command_stop()
            await sup.wait_settled(gen, frozenset({S.STOPPED}))
            assert sup.state is S.STOPPED and not marked("svc")
            gen = sup.command_start()
            await sup.wait_settled(gen, frozenset({S.RUNNING}))
            pid = sup.handle.pid  # type: ignore[union-attr]
            gen = sup.command_restart()
            await sup.wait_settled(gen, frozenset({S.RUNNING}))
            assert sup.handle.pid != pid  # type: ignore[union-attr]

    async def test_twenty_concurrent_restarts_leave_one_instance(self, tmp_path: Path) -> None:
        """Commands are serialised per service: exactly one live instance afterwards."""
        spec = make_spec(tmp_path, "busy", program("svc_sleep"))
        async with supervising(tmp_path, spec) as h:
            sup = h["busy"]
            await h.wait_state("busy", S.RUNNING)
            answered = 0

            async def restart() -> None:
                nonlocal answered
                await sup.wait_settled(sup.command_restart(), frozenset({S.RUNNING}))
                answered += 1

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(restart)
            assert answered == 20
            assert sup.state is S.RUNNING
            assert len(marked("busy")) == 1


class TestRaces:
    async def test_a_stop_landing_as_the_process_exits_ends_stopped(self, tmp_path: Path) -> None:
        """An exit and a stop in the same instant: STOPPED, never IllegalTransition."""
        spec = make_spec(tmp_path, "web", program("svc_exit", "--after", "1.0", "--code", "1"))
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("web", S.RUNNING)
            handle = h["web"].handle
            assert handle is not None
            await handle.wait()  # the supervisor's own watcher sees the same exit
            h["web"].command_stop()
            await h.wait_state("web", S.STOPPED)

    async def test_stop_on_a_fatal_service_ends_stopped(self, tmp_path: Path) -> None:
        """`stop` is done when the service is stopped, from fatal or exited too."""
        spec = make_spec(tmp_path, "doomed", program("svc_exit", "--code", "1"), give_up_after=1)
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("doomed", S.FATAL)
            sup = h["doomed"]
            await sup.wait_settled(sup.command_stop(), frozenset({S.STOPPED}))
            assert sup.state is S.STOPPED and sup.last_exit is not None


class TestHealthRestartPolicy:
    async def test_health_restarts_count_towards_give_up_after(self, tmp_path: Path) -> None:
        """An instance that never passes a check is a failed start, like a crash: FATAL
        after give_up_after of them."""
        port = free_port()
        (tmp_path / "unhealthy").write_text("")
        spec = make_spec(
            tmp_path,
            "sick",
            program("svc_serve", "--port", port),
            give_up_after=2,
            health=HealthCheckSpec(
                http=f"http://127.0.0.1:{port}/health", interval=0.1, timeout=1, failure_threshold=1
            ),
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("sick", S.FATAL, timeout=20)
            assert h["sick"].restarts == 1
            assert h["sick"].health is Health.UNKNOWN  # no instance, no health

    async def test_restart_no_is_respected(self, tmp_path: Path) -> None:
        """restart = "no": failing checks stop the service and it stays EXITED."""
        port = free_port()
        spec = make_spec(
            tmp_path,
            "once",
            program("svc_serve", "--port", port),
            restart=Restart.NO,
            health=HealthCheckSpec(
                http=f"http://127.0.0.1:{port}/health", interval=0.1, timeout=1, failure_threshold=2
            ),
        )
        async with supervising(tmp_path, spec) as h:
            await h.wait_state("once", S.RUNNING)
            (tmp_path / "unhealthy").write_text("")
            await h.wait_event(ev.HEALTH_CHECK_RESTART, "once")
            await h.wait_state("once", S.EXITED)
            assert h["once"].restarts == 0


class TestFootprint:
    async def test_a_running_process_service_keeps_three_tasks(self, tmp_path: Path) -> None:
        """A running process service (no probe, no post_start, quiet) keeps three tasks:
        its supervisor and one per log pipe. Its timers (start_seconds, reset_after) are
        deadlines of the supervisor's own wait, its log writer runs only while there are
        lines (issue 14: the memory per service is mostly its tasks)."""
        names = [f"q{i}" for i in range(5)]
        specs = [make_spec(tmp_path, name, ["sleep", "60"], start_seconds=0) for name in names]
        before = len(asyncio.all_tasks())
        async with supervising(tmp_path, *specs) as h:
            await h.wait_until(lambda: all(h[name].state is S.RUNNING for name in names))
            assert len(asyncio.all_tasks()) - before <= 3 * len(names)
