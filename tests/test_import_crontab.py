"""``hostvisor import crontab`` as a user runs it: the real CLI on crontabs written like
the seeds' hosts' (tests/import_sources/crontab/), the unit files it writes read back,
``hostvisor check`` on them, and a round trip: an imported job run by a real daemon.

Fixtures: ``seed002.crontab`` is seed 002's two lines exactly; ``openclaw.crontab`` the
same host's crontab grown as crontabs grow (environment lines, redirections, ``%``,
``@reboot``); ``etc-crontab`` Debian 12's /etc/crontab (a user column).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.daemon_harness import DaemonProcess
from tests.import_support import read_unit, run_import

SOURCES = Path(__file__).parent / "import_sources" / "crontab"


def hv_import(
    d: DaemonProcess, *files: str | Path, out: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_import(d, "crontab", *files, out=out, stdin=stdin)


unit = read_unit


def written(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml"))


def test_seed_002_two_lines_become_claim_task_and_monitor_prs_without_a_shell(
    d: DaemonProcess,
) -> None:
    done = hv_import(d, SOURCES / "seed002.crontab")
    assert done.returncode == 0, done.stderr
    assert written(d.units) == ["claim-task", "monitor-prs"]
    claim = unit(d.units, "claim-task")
    assert claim == {
        "description": claim["description"],
        "schedule": "*/5 * * * *",
        "workdir": "/root/.openclaw/workspace",
        "command": ["/usr/bin/python", "scripts/claim-task.py"],
    }
    monitor = unit(d.units, "monitor-prs")
    assert monitor["schedule"] == "*/10 * * * *"
    assert monitor["workdir"] == "/root/.openclaw/workspace"
    assert monitor["command"] == ["/usr/bin/python", "scripts/monitor-prs.py"]
    assert "/bin/sh" not in done.stdout
    assert "claim-task (from line 1): wrote" in done.stdout
    assert "cd /root/.openclaw/workspace && -> workdir" in done.stdout
    assert 'concurrency = "allow"' in done.stdout  # cron's overlap, said once
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_grown_crontab_environment_redirections_percent_and_reboot(d: DaemonProcess) -> None:
    done = hv_import(d, SOURCES / "openclaw.crontab")
    assert done.returncode == 0, done.stderr
    assert written(d.units) == [
        "claim-task", "find", "gateway", "git", "gzip", "mail", "monitor-prs", "pg_dump",
    ]  # fmt: skip
    claim = unit(d.units, "claim-task")
    # The environment lines before a job apply to it; CRON_TZ is the schedule's zone.
    assert claim["env"] == {
        "SHELL": "/bin/bash",
        "PATH": "/root/.local/bin:/usr/local/bin:/usr/bin:/bin",
    }
    assert claim["schedule_timezone"] == "Europe/Berlin"
    assert claim["description"] == "claim a task from the queue every 5 minutes"
    # A log redirection is dropped (hostvisor logs the output), and said so.
    assert claim["command"] == ["/usr/bin/python", "scripts/claim-task.py"]
    assert "`>> /var/log/openclaw/claim-task.log 2>&1`: hostvisor keeps" in done.stdout
    assert "/var/log/openclaw/claim-task.log is no longer written" in done.stdout
    assert unit(d.units, "monitor-prs")["command"] == ["/usr/bin/python", "scripts/monitor-prs.py"]
    # A redirection to a file that is the job's product is kept, in SHELL; \% is %.
    dump = unit(d.units, "pg_dump")
    assert dump["command"] == [
        "/bin/bash", "-c", "pg_dump openclaw > /root/backups/openclaw-$(date +%F).sql",
    ]  # fmt: skip
    assert dump["workdir"] == "~"  # cron runs a job without cd in the home folder
    # The text after an unescaped % is the standard input, each further % a newline.
    mail = unit(d.units, "mail")
    assert mail["command"][:2] == ["/bin/bash", "-c"]
    script = mail["command"][2]
    feed = subprocess.run(
        ["/bin/sh", "-c", script.replace('mail -s "weekday report" ops@example.com', "cat")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert feed.stdout == "Good morning,\nthe report is in /root/reports."
    assert "the text after '%' is the command's standard input" in done.stdout
    # @reboot: a one-shot, named after the command that is not `sleep`.
    gateway = unit(d.units, "gateway")
    assert gateway["restart"] == "no" and gateway["autostart"] is True
    assert "schedule" not in gateway
    assert "make it a service instead" in done.stdout
    # A quoted cd; a relative cd is under the home folder; a glob needs the shell.
    assert unit(d.units, "git")["workdir"] == "/root/.openclaw/my repo"
    assert unit(d.units, "git")["command"] == ["git", "pull", "--ff-only"]
    assert unit(d.units, "gzip")["workdir"] == "~/logs"
    assert unit(d.units, "gzip")["command"] == ["/bin/bash", "-c", "gzip -9 *.log"]
    assert "the command uses a glob '*'" in done.stdout
    assert unit(d.units, "find")["command"] == ["find", "/tmp/openclaw", "-mtime", "+7", "-delete"]
    assert unit(d.units, "find")["schedule"] == "@daily"
    # MAILTO is reported, not mapped, with what to do instead.
    assert "not mapped  line 6 MAILTO=ops@example.com: hostvisor sends no mail" in done.stdout
    assert "[on_failure]" in done.stdout
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_system_crontab_user_column_is_reported_not_run_as(d: DaemonProcess) -> None:
    done = hv_import(d, SOURCES / "etc-crontab")
    assert done.returncode == 0, done.stderr
    assert written(d.units) == ["run-parts", "run-parts-2", "run-parts-3", "run-parts-4"]
    hourly = unit(d.units, "run-parts")
    assert hourly["command"] == ["run-parts", "--report", "/etc/cron.hourly"]
    assert hourly["workdir"] == "/"
    assert hourly["schedule"] == "17 * * * *"
    daily = unit(d.units, "run-parts-2")
    assert daily["command"] == [
        "/bin/sh", "-c",
        "test -x /usr/sbin/anacron || { cd / && run-parts --report /etc/cron.daily; }",
    ]  # fmt: skip
    assert "a system crontab (a user column)" in done.stdout
    assert (
        done.stdout.count("not mapped  user root: hostvisor runs every unit as its own user") == 4
    )
    # The column legend above the first job is no description.
    assert "user-name" not in hourly["description"]
    assert d.cli("check").returncode == 0


def test_environment_line_rules_and_bad_lines(d: DaemonProcess, tmp_path: Path) -> None:
    text = (
        "# a crontab with mistakes in it\n"
        'GREETING = "  hello, world  "\n'
        "CRON_TZ=Mars/Olympus_Mons\n"
        "RANDOM_DELAY=7\n"
        "*/15 * * * * /usr/local/bin/sync-mail --quiet\n"
        "61 * * * * /usr/local/bin/never\n"
        "@every 5m /usr/local/bin/not-cron\n"
        "CRON_TZ=UTC\n"
        "HOME=/srv/app\n"
        "TZ=America/New_York\n"
        "0 0 * * * cd releases && ./prune.sh 'keep 3'\n"
        "0 1 * * * python3 -m app.jobs.nightly --since=yesterday 2>&1\n"
    )
    out = tmp_path / "out"
    done = hv_import(d, "-", stdin=text, out=out)
    assert done.returncode == 0, done.stderr
    assert written(out) == ["app.jobs.nightly", "prune", "sync-mail"]
    sync = unit(out, "sync-mail")
    assert sync["env"] == {"GREETING": "  hello, world  "}  # quotes keep the blanks
    assert "schedule_timezone" not in sync
    assert sync["random_delay"] == "7m"
    assert "unknown time zone 'Mars/Olympus_Mons'" in done.stdout
    assert "not mapped  line 6: the schedule '61 * * * *'" in done.stdout
    assert "not mapped  line 7: unknown macro '@every'" in done.stdout
    prune = unit(out, "prune")
    assert prune["schedule_timezone"] == "UTC"
    assert prune["workdir"] == "/srv/app/releases"  # relative to the crontab's HOME
    assert prune["command"] == ["./prune.sh", "keep 3"]
    assert prune["env"]["HOME"] == "/srv/app"
    assert prune["env"]["TZ"] == "America/New_York"  # the jobs' environment, as cron sets it
    nightly_tz = unit(out, "app.jobs.nightly")
    assert "schedule_timezone" in nightly_tz  # CRON_TZ=UTC still holds
    nightly = unit(out, "app.jobs.nightly")
    assert nightly["command"] == ["python3", "-m", "app.jobs.nightly", "--since=yesterday"]
    assert nightly["workdir"] == "/srv/app"


def test_nothing_to_import_exits_1_naming_why(d: DaemonProcess, tmp_path: Path) -> None:
    empty = tmp_path / "empty.crontab"
    empty.write_text("# DO NOT EDIT THIS FILE\nMAILTO=root\n\n")
    done = hv_import(d, empty, out=tmp_path / "out")
    assert done.returncode == 1
    assert f"{empty}: no job line found" in done.stderr
    bad = tmp_path / "bad.crontab"
    bad.write_text("*/5 * * * cd /x && y\n")  # four fields
    done = hv_import(d, bad, out=tmp_path / "out")
    assert done.returncode == 1
    assert "no job line could be converted" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_nul_byte_where_a_user_may_be_is_a_command_word(d: DaemonProcess, tmp_path: Path) -> None:
    """Found by fuzzing: pwd.getpwnam() raises ValueError on a NUL; the line is read as a
    user crontab's, not an internal error; the check of the unit then refuses the NUL."""
    path = tmp_path / "nul.crontab"
    path.write_text("*/5 * * * * /bin/tr\x00ue now\n")
    done = hv_import(d, path, out=tmp_path / "out")
    assert "internal error" not in done.stderr, done.stderr
    assert done.returncode == 1 and "must not contain a NUL character" in done.stderr


def test_round_trip_an_imported_job_runs_in_its_folder(d: DaemonProcess, tmp_path: Path) -> None:
    work = tmp_path / "workspace"
    (work / "scripts").mkdir(parents=True)
    (work / "scripts" / "claim-task.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path('claimed.txt').write_text(os.getcwd() + ' ' + os.environ['HOSTVISOR_RUN'])\n"
    )
    crontab = tmp_path / "crontab"
    crontab.write_text(f"*/5 * * * * cd {work} && {sys.executable} scripts/claim-task.py\n")
    done = hv_import(d, crontab)
    assert done.returncode == 0, done.stderr
    assert unit(d.units, "claim-task")["command"] == [sys.executable, "scripts/claim-task.py"]
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    d.start()
    assert d.wait_state("claim-task", "waiting")["schedule"] == "*/5 * * * *"
    run = d.cli("start", "claim-task")  # runs it now and waits for the run to end
    assert run.returncode == 0, run.stdout + run.stderr
    assert "run 1 succeeded" in run.stdout
    d.wait_event("hostvisor.job.succeeded", "claim-task")
    assert (work / "claimed.txt").read_text() == f"{work} 1"


def test_tz_is_the_jobs_environment_not_the_schedules_zone(
    d: DaemonProcess, tmp_path: Path
) -> None:
    done = hv_import(d, "-", stdin="TZ=Europe/Paris\n0 8 * * * /usr/bin/report\n", out=tmp_path)
    assert done.returncode == 0, done.stderr
    report = unit(tmp_path, "report")
    assert report["env"] == {"TZ": "Europe/Paris"}
    assert "schedule_timezone" not in report
    assert 'set schedule_timezone = "Europe/Paris"' in done.stdout
