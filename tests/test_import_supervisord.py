"""``hostvisor import supervisord`` as a user runs it: the real CLI on a Debian-style
/etc/supervisor layout (tests/import_sources/supervisord/: the stock supervisord.conf
with its [include], and conf.d/ files for seed 000's llama.cpp server and an openclaw
group), the unit files read back, ``hostvisor check`` on them, and a round trip: two
imported programs RUNNING under a real daemon, in priority order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tests.daemon_harness import DaemonProcess
from tests.import_support import run_import

SOURCES = Path(__file__).parent / "import_sources" / "supervisord"


def hv_import(
    d: DaemonProcess, *files: str | Path, out: Path | None = None, cwd: Path | None = None,
    stdin: str | None = None, home: str = "/home/joel",
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``hostvisor import supervisord FILE... -o OUT`` with ``HOME`` set (``%(ENV_HOME)s``)."""
    env = {**d.env(), "HOME": home}
    return run_import(d, "supervisord", *files, out=out, stdin=stdin, env=env, cwd=cwd)


def unit(folder: Path, name: str) -> dict[str, Any]:
    return tomllib.loads((folder / f"{name}.toml").read_text())


def test_debian_layout_main_file_and_conf_d(d: DaemonProcess) -> None:
    done = hv_import(d, "supervisord.conf", "conf.d/llama.conf", "conf.d/openclaw.conf",
                     cwd=SOURCES)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in d.units.glob("*.toml")) == [
        "gateway", "llama-server", "nightly-report", "worker-0", "worker-1",
    ]  # fmt: skip
    # The main file has no program: said, not a failure; its sections are reported.
    assert "supervisord.conf: 0 units" in done.stdout
    assert "its programs are in the included files" in done.stdout
    assert "not mapped  [unix_http_server]" in done.stdout
    assert "not mapped  [rpcinterface:supervisor]" in done.stdout
    llama = unit(d.units, "llama-server")
    assert llama == {
        "description": "llama-server (supervisord)",
        "command": [
            "/opt/llama.cpp/build/bin/llama-server", "--model",
            "/home/joel/models/qwen2.5-coder-7b-instruct-q4_k_m.gguf", "--host", "127.0.0.1",
            "--port", "8080", "--ctx-size", "8192", "--n-gpu-layers", "99",
        ],
        "workdir": "/opt/llama.cpp",
        # [supervisord] environment= of the main file reaches the included programs.
        "env": {"TZ": "Europe/Berlin", "CUDA_VISIBLE_DEVICES": "0", "LLAMA_ARG_THREADS": "8"},
        "autostart": True,
        "restart": "always",
        "start_seconds": "10s",
        "give_up_after": 6,  # startretries=5: the first start and 5 retries
        "stop_signal": "SIGINT",
        "stop_timeout": "30s",
        "logs": {"max_size": "20MiB", "backups": 3},
    }  # fmt: skip
    assert "user=llama: hostvisor runs every unit as its own user" in done.stdout
    assert "ENV_HOME" in done.stdout  # expanded from the import's environment, said so
    gateway = unit(d.units, "gateway")
    assert gateway["command"][0] == str(SOURCES / "conf.d" / ".." / "bin" / "openclaw-gateway")
    assert gateway["restart"] == "always"
    assert gateway["give_up_after"] == 4  # supervisord's default startretries = 3
    assert gateway["depends_on"] == {"llama-server": "started"}  # priority 20 after 10
    assert gateway["env"] == {
        "TZ": "Europe/Berlin", "OPENCLAW_HOME": "/root/.openclaw", "NODE_ENV": "production",
    }  # fmt: skip
    for num in (0, 1):
        worker = unit(d.units, f"worker-{num}")
        assert worker["command"][-2:] == ["--queue", f"openclaw-{num}"]  # %(group_name)s
        assert worker["restart"] == "on-failure"  # autorestart=unexpected
        assert worker["depends_on"] == {"gateway": "started"}  # priority 30 in group 20
        assert worker["stop_timeout"] == "60s"
    assert 'exitcodes=0,2: hostvisor\'s "on-failure" takes exit 0 alone' in done.stdout
    report = unit(d.units, "nightly-report")
    assert report["restart"] == "no" and report["autostart"] is False
    assert "depends_on" not in report
    assert 'restart = "no" makes a one-shot' in done.stdout
    assert "not mapped  [eventlistener:crashmail]" in done.stdout
    assert "not mapped  [group:openclaw]" in done.stdout
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_main_file_alone_says_to_import_the_included_files(d: DaemonProcess) -> None:
    done = hv_import(d, SOURCES / "supervisord.conf")
    assert done.returncode == 1
    assert (
        "no [program:x] section found; its [include] files = /etc/supervisor/conf.d/*.conf"
        in done.stderr
    )
    assert not list(d.units.glob("*.toml"))


def test_values_supervisord_refuses_are_refused_naming_section_and_key(
    d: DaemonProcess, tmp_path: Path
) -> None:
    cases = {
        "command=/bin/true\n": "line 1: File contains no section headers",
        "[program:a]\ncommand=/bin/a\nenvironment=A=1,B=two words\n": "'words' follows B=two",
        "[program:a]\ncommand=/bin/a\nenvironment=A=1,B\n": "unexpected end of KEY=value pairs",
        "[program:a]\ncommand=/bin/a\nnumprocs=2\n": "needs %(process_num) in process_name",
        "[program:a]\ncommand=/bin/a --conf %(nowhere)s\n": "names %(nowhere)s",
        "[program:a]\ncommand=/bin/a\nautorestart=sometimes\n": "autorestart=sometimes",
        "[program:a]\ndirectory=/srv\n": "[program:a]: no command",
        "[program:a]\ncommand=/bin/a\nstopsignal=FOO\n": "stopsignal=FOO: not a signal name",
        "[supervisord]\nlogfile=/tmp/s.log\n": "no [program:x] section found",
    }  # fmt: skip
    for number, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"case{number}.conf"
        path.write_text(text)
        done = hv_import(d, path, out=tmp_path / "out")
        assert done.returncode == 1, (text, done.stdout)
        assert message in done.stderr, (text, done.stderr)
    assert not (tmp_path / "out").exists()


def test_defaults_unknown_keys_and_stdin(d: DaemonProcess, tmp_path: Path) -> None:
    text = (
        "[program:api]\n"
        "command=/srv/api/bin/serve --bind '127.0.0.1:9000'   ; the API\n"
        "stopasgroup=false\n"
        "redirect_stderr=false\n"
        "stdout_logfile_maxbytes=0\n"
        "exitcodes=0\n"
        "startsecs=3\n"
        "frobnicate=yes\n"
    )
    done = hv_import(d, "-", stdin=text, out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    api = unit(tmp_path / "out", "api")
    assert api["command"] == ["/srv/api/bin/serve", "--bind", "127.0.0.1:9000"]  # no comment
    assert api["restart"] == "on-failure"  # supervisord's default autorestart=unexpected
    assert api["give_up_after"] == 4
    assert api["start_seconds"] == "3s"
    assert "workdir" not in api and "logs" not in api
    assert "frobnicate=yes: not known to hostvisor import" in done.stdout
    assert "stopasgroup=false: hostvisor signals the whole process group" in done.stdout
    assert "stdout_logfile_maxbytes=0: 0 (never rotate) has no counterpart" in done.stdout
    assert 'exitcodes=0 -> restart = "on-failure" (exit 0 is expected)' in done.stdout


def test_every_key_is_reported_and_duplicates_are_not_merged_silently(
    d: DaemonProcess, tmp_path: Path
) -> None:
    """priority=999 on a lone program, numprocs=1, numprocs_start and process_name are
    reported; a [program:x] given twice and a key given twice merge as supervisord
    merges them (the last value wins), and the values dropped are reported."""
    text = (
        "[program:api]\n"
        "command=/bin/sleep 1\n"
        "priority=999\n"
        "numprocs=1\n"
        "numprocs_start=5\n"
        "process_name=api-%(process_num)s\n"
        "[program:api]\n"
        "command=/bin/sleep 2\n"
        "autostart=true\n"
        "autostart=false   ; the last one counts\n"
    )
    done = hv_import(d, "-", stdin=text, out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    api = unit(tmp_path / "out", "api-5")
    assert api["command"] == ["/bin/sleep", "2"] and api["autostart"] is False
    for shown in ("priority=999", "numprocs=1", "numprocs_start=5 -> %(process_num)s = 5",
                  "process_name=api-%(process_num)s"):  # fmt: skip
        assert shown in done.stdout, (shown, done.stdout)
    assert "duplicate [program:api] (line 7; first on line 1): supervisord merges" in done.stdout
    assert (
        "[program:api] command=/bin/sleep 1 (line 2): command= is given again on line 8: "
        "supervisord keeps the last value"
    ) in done.stdout
    assert "[program:api] autostart=true (line 9): autostart= is given again" in done.stdout


SERVICE = """\
import json, os, pathlib, sys, time
name = sys.argv[sys.argv.index("--name") + 1]
info = {"cwd": os.getcwd(), "greeting": os.environ.get("GREETING"), "role": os.environ.get("ROLE")}
pathlib.Path(f"started-{name}.json").write_text(json.dumps(info))
while True:
    time.sleep(3600)
"""


def test_round_trip_two_programs_running_in_priority_order(
    d: DaemonProcess, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "svc.py").write_text(SERVICE)
    conf = app / "supervisord.conf"
    conf.write_text(
        "[supervisord]\n"
        'environment=GREETING="hello, from supervisord"\n\n'
        "[program:backend]\n"
        f"command={sys.executable} %(here)s/svc.py --name %(program_name)s\n"
        "directory=%(here)s\n"
        "priority=10\n"
        "startsecs=1\n\n"
        "[program:frontend]\n"
        f"command={sys.executable} %(here)s/svc.py --name %(program_name)s\n"
        "directory=%(here)s\n"
        "priority=20\n"
        'environment=ROLE="front"\n'
        "stopsignal=TERM\n"
        "stopwaitsecs=5\n"
    )
    done = hv_import(d, conf)
    assert done.returncode == 0, done.stderr
    assert unit(d.units, "frontend")["depends_on"] == {"backend": "started"}
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    d.start()
    d.wait_state("backend", "running")
    d.wait_state("frontend", "running")
    back = json.loads((app / "started-backend.json").read_text())
    front = json.loads((app / "started-frontend.json").read_text())
    assert back == {"cwd": str(app), "greeting": "hello, from supervisord", "role": None}
    assert front == {"cwd": str(app), "greeting": "hello, from supervisord", "role": "front"}
