"""The job keys of a unit (issue 11, :mod:`supervisor.config_jobs`): every rule broken is
one ``file: key: message`` from ``hostvisor check``; keys set in ``[defaults]`` for
services never break a scheduled unit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import check, load
from supervisor.states import DependencyCondition, Restart


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write(tmp_path / "config.toml", "")
    (tmp_path / "units").mkdir()
    return tmp_path


CMD = 'command = ["true"]\n'

#: (unit text, the key named, a piece of the message)
BAD_JOBS = [
    (CMD + 'schedule = "* * * * *"\nevery = "1m"\n', "every", "not both"),
    (CMD + 'every = "1m"\nrestart = "always"\n', "restart", 'cannot restart "always"'),
    (CMD + 'schedule = "*/5 * * * *"\n[health]\ntcp = "127.0.0.1:1"\n', "health",
     "scheduled unit has no health"),
    (CMD + 'every = "1m"\nport = 8000\n', "port", "scheduled unit has no port"),
    (CMD + 'every = "1m"\n[post_start]\ncommand = ["true"]\n', "post_start",
     "scheduled unit has no post_start"),
    (CMD + 'concurrency = "allow"\n', "concurrency", "only for scheduled units"),
    (CMD + 'catch_up = "once"\n', "catch_up", "only for scheduled units"),
    (CMD + 'random_delay = "5s"\n', "random_delay", "only for scheduled units"),
    (CMD + 'schedule_timezone = "UTC"\n', "schedule_timezone", "only for scheduled units"),
    (CMD + 'schedule = "61 * * * *"\n', "schedule", "minute field"),
    (CMD + 'schedule = "@reboot"\n', "schedule", "one-shot"),
    (CMD + 'schedule = "* * * *"\n', "schedule", "cron expression"),
    (CMD + 'schedule = "* * * * *"\nschedule_timezone = "Mars/Olympus"\n', "schedule_timezone",
     "unknown time zone"),
    (CMD + 'every = "0.5s"\n', "every", "at least 1s"),
    (CMD + 'every = "soon"\n', "every", ""),
    (CMD + 'every = "1m"\nconcurrency = "queue"\n', "concurrency", ""),
    (CMD + 'every = "1m"\ncatch_up = "all"\n', "catch_up", ""),
    (CMD + 'run_timeout = "1s"\n', "run_timeout", "only for jobs"),
    (CMD + 'restart = "no"\nrun_timeout = "0s"\n', "run_timeout", ""),
    ('container = "db"\nevery = "1m"\n', "every", "only process units"),
    ('container = "db"\nschedule = "* * * * *"\n', "schedule", "only process units"),
    (CMD + '[on_failure]\ntimeout = "5s"\n', "on_failure", "needs a command"),
    (CMD + 'depends_on = { other = "completed" }\n', "depends_on", '"other" never completes'),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "message"), BAD_JOBS)
def test_each_broken_rule_names_file_and_key(root: Path, text: str, key: str, message: str) -> None:
    unit = write(root / "units" / "job.toml", text)
    write(root / "units" / "other.toml", CMD)  # a service, not a job
    issues = check(root / "config.toml", environ={})
    ours = [i for i in issues if i.file == str(unit) and i.key == key]
    assert ours, f"no issue for {key!r}: {[str(i) for i in issues]}"
    assert message in ours[0].message
    assert str(ours[0]).startswith(f"{unit}: {key}: ")


def test_hostvisor_check_prints_file_key_message_and_exits_1(root: Path) -> None:
    """The CLI, as a user runs it: every job error, each on its line, exit 1."""
    bad = write(root / "units" / "bad.toml", CMD + 'every = "1m"\nrestart = "always"\nport = 80\n')
    cron = write(root / "units" / "cron.toml", CMD + 'schedule = "61 * * * *"\n')
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "check", "-c", str(root / "config.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    out = done.stdout + done.stderr
    assert f"{bad}: restart: " in out
    assert f"{bad}: port: " in out
    assert f"{cron}: schedule: " in out


def test_service_defaults_do_not_break_a_scheduled_unit(root: Path) -> None:
    """``[defaults] restart = "always"`` and ``[defaults.health]`` are for services: a
    scheduled unit gets restart "no" and no probe; a service still gets both; a
    ``[defaults] run_timeout`` does not reach a service."""
    write(
        root / "config.toml",
        '[defaults]\nrestart = "always"\nrun_timeout = "5m"\nport = 9000\n'
        '[defaults.health]\ntcp = "127.0.0.1:9000"\n'
        '[defaults.post_start]\ncommand = ["true"]\n',
    )
    write(root / "units" / "tick.toml", CMD + 'every = "10m"\n')
    write(root / "units" / "cron.toml", CMD + 'schedule = "*/5 * * * *"\nrestart = "on-failure"\n')
    write(root / "units" / "svc.toml", CMD)
    assert [str(i) for i in check(root / "config.toml", environ={})] == []
    loaded = load(root / "config.toml", environ={})
    tick, cron, svc = (loaded.services[n] for n in ("tick", "cron", "svc"))
    assert tick.is_job and tick.schedule is not None
    assert tick.restart is Restart.NO
    assert tick.health is None and tick.port is None and tick.post_start is None
    assert tick.run_timeout == 300
    assert cron.restart is Restart.ON_FAILURE
    assert svc.restart is Restart.ALWAYS and svc.health is not None and svc.run_timeout is None
    assert not svc.is_job


def test_a_units_own_every_wins_over_a_defaults_schedule(root: Path) -> None:
    """A ``schedule`` in ``[defaults]`` neither makes a unit with its own ``every`` a
    "both set" error nor replaces its interval; a unit without either stays a service."""
    write(root / "config.toml", '[defaults]\nschedule = "0 3 * * *"\n')
    write(root / "units" / "tick.toml", CMD + 'every = "10m"\n')
    write(root / "units" / "svc.toml", CMD)
    assert [str(i) for i in check(root / "config.toml", environ={})] == []
    loaded = load(root / "config.toml", environ={})
    tick = loaded.services["tick"].schedule
    assert tick is not None and (tick.cron, tick.every) == (None, 600.0)
    assert tick.describe() == "every 10m"
    assert not loaded.services["svc"].is_job


def test_job_keys_parse_to_the_documented_values(root: Path) -> None:
    write(
        root / "units" / "claim.toml",
        CMD + 'schedule = "* * * * * */15"\nschedule_timezone = "Europe/Berlin"\n'
        'concurrency = "replace"\ncatch_up = "once"\nrandom_delay = "30s"\nrun_timeout = "5m"\n'
        '[on_failure]\ncommand = ["notify", "x"]\ntimeout = "10s"\n',
    )
    write(root / "units" / "migrate.toml", CMD + 'restart = "no"\n')
    write(root / "units" / "api.toml", CMD + 'depends_on = { migrate = "completed" }\n')
    assert [str(i) for i in check(root / "config.toml", environ={})] == []
    loaded = load(root / "config.toml", environ={})
    claim = loaded.services["claim"]
    sched = claim.schedule
    assert sched is not None
    assert (sched.cron, sched.every, sched.timezone) == ("* * * * * */15", None, "Europe/Berlin")
    assert (sched.concurrency, sched.catch_up, sched.random_delay) == ("replace", "once", 30.0)
    assert sched.describe() == "* * * * * */15"
    assert claim.run_timeout == 300
    assert claim.on_failure is not None
    assert tuple(claim.on_failure.command) == ("notify", "x")
    assert claim.on_failure.timeout == 10
    assert loaded.services["migrate"].is_job and loaded.services["migrate"].schedule is None
    api = loaded.services["api"]
    assert not api.is_job
    assert api.depends_on == {"migrate": DependencyCondition.COMPLETED}
