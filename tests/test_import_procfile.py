"""``hostvisor import procfile`` (supervisor/importers/procfile.py) as a user runs it: the
real CLI on seed 002's app as a Procfile (tests/import_sources/procfile/Procfile: a web
entry reading $PORT, ``python -m app.main``, the seed's two scripts, a pipe, a line that
is no entry), the unit files read back, ``hostvisor check``, and a round trip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.daemon_harness import DaemonProcess
from tests.import_support import read_unit, run_import

SOURCES = Path(__file__).parent / "import_sources" / "procfile"


def hv_import(
    d: DaemonProcess, *files: str | Path, out: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_import(d, "procfile", *files, out=out, stdin=stdin)


unit = read_unit


def test_entries_names_shell_detection_and_the_port_note(d: DaemonProcess) -> None:
    done = hv_import(d, SOURCES / "Procfile")
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in d.units.glob("*.toml")) == [
        "claims", "errors", "monitor_prs", "web", "worker",
    ]  # fmt: skip
    folder = str(SOURCES)
    worker = unit(d.units, "worker")
    assert worker == {
        "description": "worker (Procfile)",
        "command": ["python", "-m", "app.main", "--role", "worker", "--queue", "claims high"],
        "workdir": folder,  # foreman runs every entry in the Procfile's folder
        "restart": "always",
    }
    # No space after the colon is still an entry (foreman's ^[A-Za-z0-9_-]+:).
    assert unit(d.units, "claims")["command"] == [
        "python", "scripts/claim-task.py", "--loop", "--interval", "300",
    ]  # fmt: skip
    # A name outside the unit-name rule becomes a valid one, printed beside the original.
    assert unit(d.units, "monitor_prs")["description"] == "Monitor_PRs (Procfile)"
    assert "monitor_prs (from Monitor_PRs): wrote" in done.stdout
    # $PORT needs the shell and a note: foreman sets PORT, hostvisor does not.
    web = unit(d.units, "web")
    assert web["command"] == [
        "/bin/sh", "-c",
        "gunicorn app.wsgi:application --bind 0.0.0.0:$PORT --workers 3 --access-logfile -",
    ]  # fmt: skip
    assert "runs through /bin/sh -c: the command uses an expansion '$'" in done.stdout
    assert "the command reads $PORT, which foreman sets and hostvisor does not" in done.stdout
    assert unit(d.units, "errors")["command"][:2] == ["/bin/sh", "-c"]  # a pipe, a glob
    # The comment is skipped silently; the indented line is reported.
    assert "not mapped  line 8: not a `name: command` entry" in done.stdout
    assert "line 1" not in done.stdout
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_no_entry_exits_1_and_writes_nothing(d: DaemonProcess, tmp_path: Path) -> None:
    empty = tmp_path / "Procfile"
    empty.write_text("# nothing here yet\n\nweb - python app.py\n")
    done = hv_import(d, empty, out=tmp_path / "out")
    assert done.returncode == 1
    assert f"{empty}: no `name: command` entry found" in done.stderr
    bad = tmp_path / "Procfile.bad"
    bad.write_text("web: python app.py --title 'unclosed\n")
    done = hv_import(d, bad, out=tmp_path / "out")
    assert done.returncode == 1
    assert "line 1: cannot split the command" in done.stderr
    assert not (tmp_path / "out").exists()


def test_standard_input_has_no_folder(d: DaemonProcess, tmp_path: Path) -> None:
    done = hv_import(d, "-", stdin="app: ./bin/serve --port 8080\n", out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    app = unit(tmp_path / "out", "app")
    assert app["command"] == ["./bin/serve", "--port", "8080"]
    assert "workdir" not in app
    assert "<stdin>: 1 unit" in done.stdout


SERVICE = """\
import json, os, pathlib, sys, time
pathlib.Path("started.json").write_text(json.dumps({"cwd": os.getcwd(), "argv": sys.argv[1:]}))
while True:
    time.sleep(3600)
"""


def test_round_trip_a_procfile_entry_runs_in_its_folder(d: DaemonProcess, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "svc.py").write_text(SERVICE)
    (app / "Procfile").write_text(f"svc: {sys.executable} svc.py --role 'web worker'\n")
    done = hv_import(d, app / "Procfile")
    assert done.returncode == 0, done.stderr
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    d.start()
    d.wait_state("svc", "running")
    started = json.loads((app / "started.json").read_text())
    assert started == {"cwd": str(app), "argv": ["--role", "web worker"]}


def test_release_is_a_one_shot_and_the_folders_env_file_is_read(
    d: DaemonProcess, tmp_path: Path
) -> None:
    """Heroku's release: runs once per deploy (never kept up); foreman reads the folder's
    .env; a command that merely contains "PORT" in a word gets no $PORT note."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "Procfile").write_text(
        "release: python manage.py migrate\nreport: ./report --out REPORT_DIR\n"
    )
    (app / ".env").write_text("DATABASE_URL=sqlite:///data/app.db\n")
    (app / ".env").chmod(0o644)
    done = hv_import(d, str(app / "Procfile"))
    assert done.returncode == 0, done.stderr
    release, report = unit(d.units, "release"), unit(d.units, "report")
    assert release["restart"] == "no"
    assert report["restart"] == "always"
    assert report["env_files"] == [f"-{app / '.env'}"]
    assert "reads $PORT" not in done.stdout
    assert "runs once per deploy" in done.stdout
    assert d.cli("check").returncode == 0
