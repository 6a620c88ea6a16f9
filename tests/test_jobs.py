"""Scheduled and one-shot units end to end (issue 11): a real ``hostvisor run``, real
runs, the CLI as a user types it.

Runs are tests/programs/job_run.py: it writes its pid to ``w/run-<N>.pid`` (N = the
run's HOSTVISOR_RUN), may leave an escapee in a session of its own, and holds until
``w/go-<N>`` (or ``w/go``) exists, so a test decides when a run ends instead of
guessing how long it takes. Intervals are 1-3 s; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from contextlib import suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.drivers.process_handle import MARKER, RUN_MARKER, SCOPE
from supervisor.schedule import GRACE
from tests.daemon_harness import DaemonProcess, py_cmd

FAST_BACKOFF = '[backoff]\ninitial = "0.05s"\nmax = "0.1s"\njitter = 0\n'
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def work(d: DaemonProcess) -> Path:
    path = d.root / "w"
    path.mkdir(exist_ok=True)
    return path


def run_cmd(d: DaemonProcess, *flags: object) -> str:
    return f"command = {py_cmd('job_run', work(d), *flags)}\n"


def of(d: DaemonProcess, name: str, service: str) -> list[dict[str, Any]]:
    with d._cond:
        return [e for e in d.events if e["event"] == name and e["service"] == service]


def attr(event: dict[str, Any], key: str) -> Any:
    return event["attributes"][key]


def run_no(event: dict[str, Any]) -> int:
    return int(event["attributes"]["hostvisor.job.run"])


def ended(
    d: DaemonProcess, service: str, run: int, *, after: int = 0, timeout: float = 20
) -> dict[str, Any]:
    """The event that ended run ``run`` of ``service`` (succeeded, failed, timed out)."""
    names = ("hostvisor.job.succeeded", "hostvisor.job.failed", "hostvisor.job.timed_out")
    found: list[dict[str, Any]] = []

    def match() -> bool:
        with d._cond:
            found[:] = [
                e
                for e in d.events
                if e["seq"] > after and e["event"] in names and e["service"] == service
                and run_no(e) == run
            ]  # fmt: skip
        return bool(found)

    d.wait_for(match, timeout, f"the end of {service} run {run}")
    return found[0]


def pid_file(d: DaemonProcess, kind: str, run: int, timeout: float = 15) -> int:
    path = work(d) / f"{kind}-{run}.pid"
    d.wait_for(lambda: path.exists() and path.read_text() != "", timeout, f"{path}")
    return int(path.read_text())


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def release(d: DaemonProcess, run: int | None = None) -> None:
    (work(d) / ("go" if run is None else f"go-{run}")).touch()


def marked_runs(d: DaemonProcess, service: str) -> dict[int, str]:
    """Live processes anywhere marked as ``service``'s (pid -> their HOSTVISOR_RUN)."""
    found: dict[int, str] = {}
    for proc in psutil.process_iter():
        with suppress(psutil.Error, OSError):
            env = proc.environ()
            if (
                env.get(MARKER) == service
                and env.get(SCOPE) == str(d.state)
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found[proc.pid] = env.get(RUN_MARKER, "")
    return found


def kill_escapees(d: DaemonProcess) -> None:
    for path in work(d).glob("esc-*.pid"):
        with suppress(OSError, ValueError):
            os.kill(int(path.read_text()), signal.SIGKILL)


def is_rfc3339(text: object) -> bool:
    if not isinstance(text, str) or not RFC3339.match(text):
        return False
    datetime.fromisoformat(text.replace("Z", "+00:00"))
    return True


def restart_daemon(d: DaemonProcess) -> None:
    d.events = []
    d.stderr = []
    d.start()


# ---------------------------------------------------------------- schedules


class TestSchedules:
    def test_every_second_appends_logs_a_header_per_run_and_reports_status(
        self, d: DaemonProcess
    ) -> None:
        out = d.root / "out.txt"
        line = f'echo "tick $HOSTVISOR_RUN" >> {shlex.quote(str(out))}; echo "hello $HOSTVISOR_RUN"'
        d.write_unit("tick", f'command = ["sh", "-c", {json.dumps(line)}]\nevery = "1s"\n')
        d.start()
        d.wait_for(lambda: len(of(d, "hostvisor.job.succeeded", "tick")) >= 3, 20, "3 runs")
        triggered = of(d, "hostvisor.job.triggered", "tick")
        numbers = [run_no(e) for e in triggered]
        assert numbers[:3] == [1, 2, 3]
        assert all(attr(e, "hostvisor.job.trigger") == "schedule" for e in triggered)
        assert all(is_rfc3339(attr(e, "hostvisor.job.scheduled_time")) for e in triggered)
        succeeded = of(d, "hostvisor.job.succeeded", "tick")
        assert [run_no(e) for e in succeeded][:3] == [1, 2, 3]
        assert all(attr(e, "process.exit.code") == 0 for e in succeeded)
        assert all(attr(e, "hostvisor.job.duration_s") >= 0 for e in succeeded)
        assert out.read_text().splitlines()[:3] == ["tick 1", "tick 2", "tick 3"]
        log = (d.state / "logs" / "tick.log").read_text().splitlines()
        for n in (1, 2, 3):
            header = next(
                i for i, text in enumerate(log) if text.startswith(f"--- hostvisor: tick run {n} ")
            )
            assert "(schedule)" in log[header]
            assert f"hello {n}" in log[header + 1 :][:3]
        entry = d.status("tick")
        assert entry["schedule"] == "every 1s"
        assert entry["suspended"] is False
        assert is_rfc3339(entry["next_run"])
        last = entry["last_run"]
        assert is_rfc3339(last["started"]) and last["run"] >= 3
        d.wait_for(lambda: d.status("tick")["state"] == "waiting", what="tick waiting")
        # Between runs the job is waiting, which `status` counts as fine.
        shown: list[Any] = []

        def fine() -> bool:
            shown[:] = [d.cli("status")]
            return bool(shown[0].returncode == 0)

        d.wait_for(fine, what="status exit 0")
        header = shown[0].stdout.splitlines()[0].split()
        assert header[-2:] == ["NEXT-RUN", "LAST-RUN"]
        assert "succeeded" in shown[0].stdout and "waiting" in shown[0].stdout
        assert (d.state / "jobs.json").exists()

    def test_six_field_cron_fires_on_its_even_seconds(self, d: DaemonProcess) -> None:
        d.write_unit("cron", 'command = ["true"]\nschedule = "* * * * * */2"\n')
        d.start()
        d.wait_for(lambda: len(of(d, "hostvisor.job.succeeded", "cron")) >= 2, 20, "2 runs")
        times = [
            datetime.fromisoformat(attr(e, "hostvisor.job.scheduled_time").replace("Z", "+00:00"))
            for e in of(d, "hostvisor.job.triggered", "cron")
        ]
        assert all(t.second % 2 == 0 and t.microsecond == 0 for t in times)
        assert (times[1] - times[0]).total_seconds() == 2
        entry = d.status("cron")
        assert entry["schedule"] == "* * * * * */2"
        upcoming = datetime.fromisoformat(entry["next_run"].replace("Z", "+00:00"))
        assert upcoming.second % 2 == 0 and upcoming > times[1]


# ---------------------------------------------------------------- concurrency


class TestConcurrency:
    def test_forbid_skips_while_a_run_goes_and_never_runs_two(self, d: DaemonProcess) -> None:
        d.write_unit("job", run_cmd(d, "--hold") + 'every = "1s"\n')
        d.start()
        first = pid_file(d, "run", 1)
        skipped = d.wait_event(
            "hostvisor.job.skipped",
            "job",
            where=lambda e: attr(e, "hostvisor.job.skip_reason") == "running",
        )
        assert run_no(skipped) == 1
        assert "forbid" in skipped["message"]
        assert alive(first)
        assert not (work(d) / "run-2.pid").exists()
        assert set(marked_runs(d, "job").values()) == {"1"}
        release(d, 1)
        ended(d, "job", 1)
        second = pid_file(d, "run", 2)
        assert second != first
        release(d, 2)
        ended(d, "job", 2)
        # Never two at once: every trigger after the first comes after the previous end.
        seq = [(e["event"], run_no(e)) for e in d.events if e["service"] == "job"
               and e["event"] in ("hostvisor.job.triggered", "hostvisor.job.succeeded")]  # fmt: skip
        assert seq[:4] == [
            ("hostvisor.job.triggered", 1),
            ("hostvisor.job.succeeded", 1),
            ("hostvisor.job.triggered", 2),
            ("hostvisor.job.succeeded", 2),
        ]

    def test_allow_runs_side_by_side_and_each_sweep_spares_the_other_run(
        self, d: DaemonProcess
    ) -> None:
        d.write_unit(
            "job", run_cmd(d, "--hold", "--escapee") + 'every = "1s"\nconcurrency = "allow"\n'
        )
        try:
            d.start()
            one, two = pid_file(d, "run", 1), pid_file(d, "run", 2)
            esc1, esc2 = pid_file(d, "esc", 1), pid_file(d, "esc", 2)
            assert one != two and alive(one) and alive(two)
            assert not of(d, "hostvisor.job.succeeded", "job")
            runs = marked_runs(d, "job")
            assert runs[esc1] == "1" and runs[esc2] == "2"
            release(d, 1)
            ended(d, "job", 1)
            d.wait_for(lambda: not alive(esc1), what="run 1's escapee swept at run 1's end")
            assert alive(two) and alive(esc2), "run 1's sweep touched run 2"
            assert not [e for e in of(d, "hostvisor.job.succeeded", "job") if run_no(e) == 2]
            release(d, 2)
            assert attr(ended(d, "job", 2), "process.exit.code") == 0
            d.wait_for(lambda: not alive(esc2), what="run 2's escapee swept at run 2's end")
            # stop ends every run in progress (several, under allow) and their escapees.
            result = d.cli("stop", "job")
            assert result.returncode == 0, result.stderr
            d.wait_for(lambda: not marked_runs(d, "job"), what="no run of job left")
            assert d.status("job")["suspended"] is True
        finally:
            kill_escapees(d)

    def test_replace_stops_the_old_run_at_the_next_trigger(self, d: DaemonProcess) -> None:
        d.write_unit(
            "job",
            run_cmd(d, "--hold", "--trap", "SIGTERM") + 'every = "1s"\nconcurrency = "replace"\n',
        )
        d.start()
        one = pid_file(d, "run", 1)
        two = pid_file(d, "run", 2)
        assert (work(d) / "sig-1").read_text() == "SIGTERM"
        assert not alive(one)
        assert two != one
        assert not of(d, "hostvisor.job.skipped", "job")
        assert not [e for e in of(d, "hostvisor.job.triggered", "job") if run_no(e) == 1][1:]


# ---------------------------------------------------------------- run_timeout, retries


class TestRunBounds:
    def test_run_timeout_stops_the_run_with_the_stop_signal_and_the_schedule_goes_on(
        self, d: DaemonProcess
    ) -> None:
        d.write_unit(
            "slow",
            run_cmd(d, "--hold", "--trap", "SIGINT")
            + 'every = "2s"\nrun_timeout = "1s"\nstop_signal = "SIGINT"\n',
        )
        d.start()
        out = d.wait_event("hostvisor.job.timed_out", "slow", timeout=20)
        assert run_no(out) == 1
        assert attr(out, "hostvisor.job.run_timeout_s") == 1.0
        assert attr(out, "hostvisor.job.duration_s") >= 1.0
        assert (work(d) / "sig-1").read_text() == "SIGINT"
        assert not of(d, "hostvisor.job.succeeded", "slow")
        again = d.wait_event(
            "hostvisor.job.triggered", "slow", where=lambda e: run_no(e) == 2, timeout=20
        )
        assert attr(again, "hostvisor.job.trigger") == "schedule"
        second = ended(d, "slow", 2)
        assert second["event"] == "hostvisor.job.timed_out"

    def test_the_last_run_timed_out_is_shown_in_status(self, d: DaemonProcess) -> None:
        d.write_unit("slow", run_cmd(d, "--hold") + 'every = "1h"\nrun_timeout = "1s"\n')
        d.start()
        result = d.cli("start", "slow")
        assert result.returncode == 1, result
        assert "timed out" in result.stdout + result.stderr
        entry = d.status("slow")
        assert entry["state"] == "waiting"
        assert entry["last_run"]["outcome"] == "timed_out"
        assert d.cli("status", "slow").returncode == 3

    def test_on_failure_retries_exactly_give_up_after_times_per_run(self, d: DaemonProcess) -> None:
        tries = d.root / "tries.txt"
        line = f'echo "$HOSTVISOR_RUN" >> {shlex.quote(str(tries))}; exit 4'
        d.write_unit(
            "flaky",
            f'command = ["sh", "-c", {json.dumps(line)}]\nevery = "2s"\n'
            f'restart = "on-failure"\ngive_up_after = 3\n{FAST_BACKOFF}',
        )
        d.start()
        first = ended(d, "flaky", 1, timeout=10)
        assert first["event"] == "hostvisor.job.failed"
        assert attr(first, "process.exit.code") == 4
        assert tries.read_text().split().count("1") == 3
        second = ended(d, "flaky", 2)
        assert second["event"] == "hostvisor.job.failed"
        counted = tries.read_text().split()
        assert counted.count("1") == 3 and counted.count("2") == 3
        assert d.status("flaky")["state"] in ("waiting", "starting", "running", "backoff")

    def test_retries_until_the_next_trigger_with_give_up_after_0(self, d: DaemonProcess) -> None:
        """give_up_after = 0: a run retrying in backoff is ended, failed, by the next
        trigger, which starts the next run (not skipped as "still going")."""
        d.write_unit(
            "flaky",
            'command = ["sh", "-c", "exit 6"]\nevery = "2s"\nrestart = "on-failure"\n'
            '[backoff]\ninitial = "30s"\nmax = "30s"\njitter = 0\n',
        )
        d.start()
        first = ended(d, "flaky", 1, timeout=15)
        assert first["event"] == "hostvisor.job.failed"
        assert attr(first, "process.exit.code") == 6
        d.wait_event("hostvisor.job.triggered", "flaky", timeout=10, after=first["seq"])
        assert not [e for e in of(d, "hostvisor.job.skipped", "flaky")]


# ---------------------------------------------------------------- one-shots, depends_on


class TestCompleted:
    def test_api_starts_only_after_migrate_exited_0(self, d: DaemonProcess) -> None:
        done = d.root / "migrated"
        d.write_unit(
            "migrate",
            f'command = ["sh", "-c", "sleep 0.3; touch {done}"]\nrestart = "no"\n',
        )
        d.write_unit(
            "api",
            f'command = ["sh", "-c", "test -f {done} && exec sleep 600"]\n'
            'depends_on = { migrate = "completed" }\nstart_seconds = "0.2s"\n',
        )
        d.start()
        d.wait_state("api", "running")
        ok = d.wait_event("hostvisor.job.succeeded", "migrate")
        running = d.wait_event("hostvisor.service.running", "api")
        assert ok["seq"] < running["seq"]
        assert d.status("api")["restarts"] == 0
        assert not of(d, "hostvisor.service.exited", "api")
        migrate = d.status("migrate")
        assert migrate["state"] == "exited" and migrate["last_run"]["outcome"] == "succeeded"
        assert migrate["schedule"] is None and migrate["next_run"] is None
        assert d.cli("status").returncode == 0  # a completed one-shot counts as fine

    def test_a_failed_migrate_holds_api_until_it_is_fixed_and_started(
        self, d: DaemonProcess
    ) -> None:
        fixed = d.root / "fixed"
        d.write_unit("migrate", f'command = ["test", "-f", "{fixed}"]\nrestart = "no"\n')
        d.write_unit("api", 'command = ["sleep", "600"]\ndepends_on = { migrate = "completed" }\n')
        d.start()
        failed = d.wait_event("hostvisor.job.failed", "migrate")
        assert attr(failed, "process.exit.code") == 1
        d.wait_for(lambda: "migrate" in d.status("api")["message"], what="api says why")
        api = d.status("api")
        assert api["pid"] is None and api["state"] not in ("running", "fatal")
        assert "failed" in api["message"]
        assert d.status("migrate")["state"] == "exited"
        assert d.cli("status").returncode == 3
        fixed.touch()
        result = d.cli("start", "migrate")
        assert result.returncode == 0, result
        assert "succeeded" in result.stdout
        d.wait_state("api", "running")
        assert d.cli("status").returncode == 0


# ---------------------------------------------------------------- catch_up


class TestCatchUp:
    def test_a_trigger_missed_while_the_daemon_was_down(self, d: DaemonProcess) -> None:
        """Both jobs ran every 2 s and the daemon stopped; then they became hourly and
        their stamps in jobs.json were moved back an hour and 2 * GRACE (the daemon was
        down that long; a trigger at most GRACE late is simply on time). At the next start
        "once" runs once with trigger catch_up, "none" reports the miss and waits."""
        for name in ("once", "none"):
            d.write_unit(name, f'command = ["true"]\nevery = "2s"\ncatch_up = "{name}"\n')
        d.start()
        d.wait_event("hostvisor.job.succeeded", "once", timeout=20)
        d.wait_event("hostvisor.job.succeeded", "none", timeout=20)
        assert d.stop() == 0
        ledger = d.state / "jobs.json"
        doc = json.loads(ledger.read_text())
        assert doc["format"] == 1
        assert ledger.stat().st_mode & 0o777 == 0o600
        runs = {}
        for name in ("once", "none"):
            d.write_unit(name, f'command = ["true"]\nevery = "1h"\ncatch_up = "{name}"\n')
            entry = doc["jobs"][name]
            assert entry["runs"] >= 1 and entry["last_run"]["outcome"] == "succeeded"
            runs[name] = entry["runs"]
            entry["last_trigger"] -= 3600 + 2 * GRACE
        ledger.write_text(json.dumps(doc))
        restart_daemon(d)
        caught = d.wait_event("hostvisor.job.triggered", "once")
        assert attr(caught, "hostvisor.job.trigger") == "catch_up"
        assert run_no(caught) == runs["once"] + 1  # run numbers go on
        assert is_rfc3339(attr(caught, "hostvisor.job.scheduled_time"))
        missed = d.wait_event("hostvisor.job.skipped", "none")
        assert attr(missed, "hostvisor.job.skip_reason") == "missed"
        assert is_rfc3339(attr(missed, "hostvisor.job.scheduled_time"))
        ended(d, "once", runs["once"] + 1)
        assert len(of(d, "hostvisor.job.triggered", "once")) == 1
        assert not of(d, "hostvisor.job.triggered", "none")
        assert not of(d, "hostvisor.job.skipped", "once")
        soon = datetime.now().astimezone() + timedelta(minutes=30)
        for name in ("once", "none"):
            entry = d.status(name)
            assert entry["state"] == "waiting"
            assert datetime.fromisoformat(entry["next_run"].replace("Z", "+00:00")) > soon
        assert d.status("none")["last_run"]["run"] == runs["none"]


# ---------------------------------------------------------------- on_failure


def hook(d: DaemonProcess, name: str, code: int = 0) -> str:
    out = d.root / f"hook-{name}.txt"
    script = (
        f'{{ echo "service=$HOSTVISOR_SERVICE"; echo "code=$HOSTVISOR_EXIT_CODE"; '
        f'echo "signal=$HOSTVISOR_EXIT_SIGNAL"; echo "message=$HOSTVISOR_MESSAGE"; '
        f"echo ---; }} >> {shlex.quote(str(out))}; exit {code}"
    )
    return f'[on_failure]\ncommand = ["sh", "-c", {json.dumps(script)}]\ntimeout = "10s"\n'


def hook_calls(d: DaemonProcess, name: str) -> list[dict[str, str]]:
    path = d.root / f"hook-{name}.txt"
    if not path.exists() or not path.read_text().endswith("---\n"):
        return []
    calls = []
    for block in path.read_text().split("---\n")[:-1]:
        calls.append(dict(line.split("=", 1) for line in block.splitlines()))
    return calls


class TestOnFailure:
    SECRET = "s3cr3t-token-value"

    def test_a_failed_run_runs_the_hook_with_a_redacted_message(self, d: DaemonProcess) -> None:
        d.write_unit(
            "job",
            f'command = ["/nonexistent/{self.SECRET}"]\nevery = "1h"\n'
            f'env = {{ API_TOKEN = "{self.SECRET}" }}\n' + hook(d, "job"),
        )
        d.start()
        assert d.cli("start", "job").returncode == 1
        d.wait_for(lambda: len(hook_calls(d, "job")) == 1, what="the hook's call")
        call = hook_calls(d, "job")[0]
        assert call["service"] == "job"
        assert call["message"] and self.SECRET not in call["message"]
        assert "***" in call["message"]

    def test_an_exit_code_reaches_the_hook(self, d: DaemonProcess) -> None:
        d.write_unit("job", 'command = ["sh", "-c", "exit 9"]\nrestart = "no"\n' + hook(d, "job"))
        d.start()
        d.wait_event("hostvisor.job.failed", "job")
        d.wait_for(lambda: len(hook_calls(d, "job")) == 1, what="the hook's call")
        call = hook_calls(d, "job")[0]
        assert (call["service"], call["code"], call["signal"]) == ("job", "9", "")
        assert "exit code 9" in call["message"]

    def test_a_service_gone_fatal_runs_the_hook(self, d: DaemonProcess) -> None:
        d.write_unit(
            "svc",
            'command = ["sh", "-c", "exit 3"]\ngive_up_after = 2\n' + FAST_BACKOFF + hook(d, "svc"),
        )
        d.start()
        d.wait_event("hostvisor.service.fatal", "svc")
        d.wait_for(lambda: len(hook_calls(d, "svc")) == 1, what="the hook's call")
        call = hook_calls(d, "svc")[0]
        assert (call["service"], call["code"]) == ("svc", "3")

    def test_a_failing_hook_is_an_event_and_never_a_loop(self, d: DaemonProcess) -> None:
        d.write_unit("job", 'command = ["false"]\nevery = "1h"\n' + hook(d, "job", code=7))
        d.write_unit("probe", 'command = ["true"]\nevery = "1h"\n')
        d.start()
        assert d.cli("start", "job").returncode == 1
        failed = d.wait_event("hostvisor.on_failure.failed", "job")
        assert "7" in failed["message"]
        # Something else happens afterwards; the hook has still run once only.
        assert d.cli("start", "probe").returncode == 0
        assert len(hook_calls(d, "job")) == 1
        assert len(of(d, "hostvisor.on_failure.failed", "job")) == 1
        assert len(of(d, "hostvisor.job.failed", "job")) == 1


# ---------------------------------------------------------------- CLI


class TestCli:
    def test_start_waits_for_the_run_and_judges_it(self, d: DaemonProcess) -> None:
        fail = d.root / "fail"
        d.write_unit("job", f'command = ["sh", "-c", "test ! -f {fail}"]\nevery = "1h"\n')
        d.start()
        result = d.cli("start", "job")
        assert result.returncode == 0, result
        assert "job: run 1 succeeded" in result.stdout
        assert d.status("job")["state"] == "waiting"
        assert d.cli("status", "job").returncode == 0
        fail.touch()
        result = d.cli("start", "job")
        assert result.returncode == 1, result
        assert "exit code 1" in result.stdout + result.stderr
        assert d.cli("status", "job").returncode == 3
        assert d.cli("status").returncode == 3
        fail.unlink()
        seq = d.last_seq()
        result = d.cli("start", "job", "--no-wait")
        assert result.returncode == 0, result
        ended(d, "job", 3, after=seq)
        assert d.cli("status", "job").returncode == 0

    def test_start_all_resumes_jobs_without_running_them(self, d: DaemonProcess) -> None:
        """`start --all` (make everything up) ends suspensions; it does not run every
        scheduled job now, as `start NAME` does."""
        d.write_unit("hourly", 'command = ["true"]\nevery = "1h"\n')
        d.write_unit("idle", 'command = ["sleep", "600"]\n')
        d.start()
        d.wait_state("idle", "running")
        assert d.cli("stop", "hourly").returncode == 0
        assert d.status("hourly")["suspended"] is True
        result = d.cli("start", "--all")
        assert result.returncode == 0, result
        entry = d.status("hourly")
        assert entry["state"] == "waiting" and entry["suspended"] is False
        assert not of(d, "hostvisor.job.triggered", "hourly")

    def test_stop_suspends_the_schedule_and_start_resumes_it(self, d: DaemonProcess) -> None:
        d.write_unit("tick", 'command = ["true"]\nevery = "1s"\n')
        d.start()
        d.wait_event("hostvisor.job.succeeded", "tick", timeout=20)
        result = d.cli("stop", "tick")
        assert result.returncode == 0, result
        entry = d.status("tick")
        assert (entry["state"], entry["suspended"], entry["next_run"]) == ("stopped", True, None)
        assert "suspended" in d.cli("status").stdout
        seq = d.last_seq()
        # Three intervals pass with no trigger (an absence: observed for a bounded time).
        with pytest.raises(AssertionError):
            d.wait_event("hostvisor.job.triggered", "tick", after=seq, timeout=3.5)
        result = d.cli("start", "tick")
        assert result.returncode == 0, result
        entry = d.status("tick")
        assert entry["suspended"] is False and is_rfc3339(entry["next_run"])
        d.wait_event(
            "hostvisor.job.triggered",
            "tick",
            after=seq,
            where=lambda e: attr(e, "hostvisor.job.trigger") == "schedule",
        )

    def test_stop_ends_a_run_in_progress(self, d: DaemonProcess) -> None:
        d.write_unit("job", run_cmd(d, "--hold") + 'every = "1h"\n')
        d.start()
        assert d.cli("start", "job", "--no-wait").returncode == 0
        pid = pid_file(d, "run", 1)
        result = d.cli("stop", "job")
        assert result.returncode == 0, result
        assert not alive(pid)
        entry = d.status("job")
        assert (entry["state"], entry["suspended"]) == ("stopped", True)
        assert entry["last_run"]["outcome"] == "stopped"


# ---------------------------------------------------------------- daemon life


class TestDaemonLife:
    def test_reexec_during_a_run_keeps_it_and_its_exact_exit_status(self, d: DaemonProcess) -> None:
        d.write_unit("job", run_cmd(d, "--hold", "--code", 5) + 'every = "1h"\n')
        d.start()
        assert d.cli("start", "job", "--no-wait").returncode == 0
        pid = pid_file(d, "run", 1)
        daemon_pid = d.proc.pid  # type: ignore[union-attr]
        result = d.cli("reexec")
        assert result.returncode == 0, result.stderr
        doc = d.call("status", services=["job"])
        assert doc["daemon"]["pid"] == daemon_pid
        entry = doc["services"][0]
        assert entry["pid"] == pid and entry["state"] == "running"
        assert entry["last_run"]["outcome"] == "running" and entry["last_run"]["run"] == 1
        release(d)
        d.wait_for(
            lambda: (d.status("job")["last_run"] or {}).get("outcome") == "failed",
            what="run 1 failed",
        )
        entry = d.status("job")
        assert entry["last_exit"] == {"code": 5, "signal": None}
        assert entry["last_run"]["run"] == 1
        log = d.daemon_log()
        failed = [e for e in log if e.get("event") == "hostvisor.job.failed"]
        assert len(failed) == 1 and failed[0]["attributes"]["process.exit.code"] == 5
        triggered = [e for e in log if e.get("event") == "hostvisor.job.triggered"]
        assert [e["attributes"]["hostvisor.job.run"] for e in triggered] == [1]
        assert not (work(d) / "run-2.pid").exists()

    def test_a_completed_one_shot_does_not_run_again_after_reexec(self, d: DaemonProcess) -> None:
        """A one-shot runs once per daemon life: `reexec` keeps its life (and its exited
        state), so migrate does not migrate twice."""
        d.write_unit("migrate", 'command = ["true"]\nrestart = "no"\n')
        d.start()
        d.wait_event("hostvisor.job.succeeded", "migrate")
        assert d.cli("reexec").returncode == 0
        assert d.cli("status", "migrate").returncode == 0  # exited 0: a completed one-shot
        # A second run would be triggered at once by the new code, and a stop waits for it.
        d.call("stop", services=["migrate"], wait=True)
        since = d.call("events")["events"]  # the new code's own events only
        assert not [e for e in since if e["event"] == "hostvisor.job.triggered"]
        assert d.status("migrate")["last_run"]["run"] == 1

    def test_a_run_orphaned_by_a_killed_daemon_is_stopped_by_the_next(
        self, d: DaemonProcess
    ) -> None:
        d.write_unit("job", run_cmd(d, "--hold", "--escapee") + 'every = "1h"\n')
        try:
            d.start()
            assert d.cli("start", "job", "--no-wait").returncode == 0
            pid, esc = pid_file(d, "run", 1), pid_file(d, "esc", 1)
            assert d.proc is not None
            d.proc.kill()
            d.proc.wait(10)
            assert alive(pid) and alive(esc)
            restart_daemon(d)
            d.wait_for(lambda: not alive(pid) and not alive(esc), what="the orphan stopped")
            assert not marked_runs(d, "job")
            entry = d.status("job")
            assert entry["state"] == "waiting"
            assert entry["last_run"] is None or entry["last_run"]["outcome"] != "running"
        finally:
            kill_escapees(d)
            with suppress(OSError, ValueError):
                os.kill(int((work(d) / "run-1.pid").read_text()), signal.SIGKILL)
