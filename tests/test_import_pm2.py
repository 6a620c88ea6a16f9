"""``hostvisor import pm2`` as a user runs it: the real CLI on an ecosystem.config.json
grown as teams grow them (comments, a trailing comma, node, python, bash and npm apps,
a deploy section) and on what ``pm2 jlist`` prints (pm2 5.4: the shell's environment
frozen into each process, the pm2-logrotate module), the unit files read back, ``hostvisor
check`` on them, and a round trip: an imported python app RUNNING, stopped with SIGINT.

The import's environment is set by each test (PATH with stand-in interpreters, HOME,
LANG), as pm2's rules (``python`` or ``python3``) and the jlist's "same as this shell"
filter read it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tests.daemon_harness import DaemonProcess

SOURCES = Path(__file__).parent / "import_sources" / "pm2"
#: The jlist fixture's shell, as this test's shell: these are "the same here".
SHELL = {"HOME": "/root", "LANG": "C.UTF-8", "SHELL": "/bin/bash", "USER": "root",
         "LOGNAME": "root", "NVM_DIR": "/root/.nvm"}  # fmt: skip


def stand_ins(folder: Path, *names: str) -> str:
    """A PATH holding executables ``names`` (``#!/bin/sh`` stand-ins), then /usr/bin:/bin."""
    folder.mkdir(exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def hv_import(
    d: DaemonProcess, *files: str | Path, path: str, out: Path | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    argv = [sys.executable, "-m", "supervisor", "import", "pm2", *map(str, files)]
    argv += ["-o", str(out or d.units), "-c", str(d.config_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTVISOR_", "PM2"))}
    env = {k: v for k, v in env.items() if k not in ("NVM_BIN", "PYTHONUNBUFFERED")}
    env.update(SHELL, PATH=path, PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60, env=env, cwd=d.root
    )


def unit(folder: Path, name: str) -> dict[str, Any]:
    return tomllib.loads((folder / f"{name}.toml").read_text())


def test_ecosystem_file_node_python_bash_and_npm_apps(d: DaemonProcess, tmp_path: Path) -> None:
    path = stand_ins(tmp_path / "bin", "npm", "python3")
    done = hv_import(d, SOURCES / "ecosystem.config.json", path=path)
    assert done.returncode == 0, done.stderr
    assert "read without its comments and trailing commas" in done.stdout
    assert "not mapped  deploy: pm2 deploy" in done.stdout
    gateway = unit(d.units, "openclaw-gateway")
    assert gateway == {
        "description": "openclaw-gateway (pm2)",
        "workdir": "/root/.openclaw/gateway",
        "command": ["node", "--max-old-space-size=512", "--enable-source-maps", "dist/index.js",
                    "--port", "18789", "--log-format", "json"],
        "env": {"NODE_ENV": "production", "GATEWAY_WORKERS": "4", "LOG_JSON": "true"},
        "give_up_after": 16,  # pm2's default max_restarts
        "stop_signal": "SIGINT",  # pm2 stops with SIGINT
        "stop_timeout": "5s",  # kill_timeout 5000 ms
        "max_memory": "300MiB",
        "backoff": {"initial": "100ms", "max": "15s", "multiplier": 1.5, "jitter": 0.0,
                    "reset_after": "30s"},  # pm2's exponential backoff, God.js
    }  # fmt: skip
    assert "env_staging (NODE_ENV, GATEWAY_WORKERS): pm2 applies it with" in done.stdout
    worker = unit(d.units, "app-worker")
    assert worker["command"] == [
        "/root/.openclaw/venv/bin/python", "app/main.py", "--role", "worker", "--queue",
        "claims high",
    ]  # fmt: skip
    assert worker["env"] == {"PYTHONUNBUFFERED": "1"}  # pm2 sets it for python
    assert worker["restart"] == "on-failure"  # stop_exit_codes: [0]
    assert worker["give_up_after"] == 10
    assert worker["start_seconds"] == "10s"
    assert worker["stop_timeout"] == "1600ms"  # pm2's default kill_timeout
    assert worker["backoff"] == {"initial": "2s", "max": "2s", "multiplier": 1.0, "jitter": 0.0}
    monitor = unit(d.units, "monitor-prs")
    assert monitor["command"] == ["bash", "scripts/monitor-prs.sh"]  # pm2's rule for .sh
    assert monitor["restart"] == "no"
    assert 'cron_restart="0 */6 * * *": a restart at a time of day, not a job' in done.stdout
    assert (
        'watch=["scripts"], ignore_watch=["node_modules", "logs"]: hostvisor does not restart '
        "on file changes" in done.stdout
    )
    dashboard = unit(d.units, "dashboard")
    assert dashboard["command"] == ["npm", "run", "start", "--", "--host", "0.0.0.0"]
    assert dashboard["port"] == 3000 and dashboard["env"] == {"PORT": "3000"}
    assert "this one has a #! line: run directly" in done.stdout
    assert "instances=2: hostvisor runs one process per unit" in done.stdout
    assert "exec_mode=cluster: pm2's cluster mode" in done.stdout
    assert "wait_ready=true, listen_timeout=10000: hostvisor does not wait" in done.stdout
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_jlist_keeps_what_is_the_apps_not_the_shells_or_pm2s(
    d: DaemonProcess, tmp_path: Path
) -> None:
    done = hv_import(d, SOURCES / "jlist.json", path="/usr/local/bin:/usr/bin:/bin")
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in d.units.glob("*.toml")) == ["app-worker", "openclaw-gateway"]
    assert "pm2-logrotate: a pm2 module" in done.stdout
    worker = unit(d.units, "app-worker")
    assert worker["command"] == ["python3", "/root/.openclaw/workspace/app/main.py", "--role",
                                 "worker"]  # fmt: skip
    assert worker["workdir"] == "/root/.openclaw/workspace"
    # The frozen shell: nvm's PATH differs from this shell's, so it is kept; HOME is not.
    assert worker["env"] == {
        "PYTHONUNBUFFERED": "1",
        "NVM_BIN": "/root/.nvm/versions/node/v20.18.0/bin",
        "PATH": "/root/.nvm/versions/node/v20.18.0/bin:/usr/local/sbin:/usr/local/bin:"
        "/usr/sbin:/usr/bin:/sbin:/bin",
        "OPENCLAW_QUEUE": "claims",
    }
    assert "env HOME, LANG, LOGNAME, NVM_DIR, SHELL, USER: inherited" in done.stdout
    assert "env PM2_HOME, PM2_JSON_PROCESSING, PM2_USAGE, app-worker, unique_id: pm2's own" in (
        done.stdout
    )
    assert "SSH_CONNECTION" in done.stdout  # the login session, reported not kept
    assert worker["start_seconds"] == "10s" and worker["give_up_after"] == 10
    assert "pm2's runtime state, not settings" in done.stdout
    gateway = unit(d.units, "openclaw-gateway")
    assert gateway["autostart"] is False  # stopped in pm2: pm2 resurrect leaves it stopped
    assert gateway["max_memory"] == 314572800
    assert gateway["command"][:2] == ["node", "--max-old-space-size=512"]
    assert gateway["env"]["NODE_ENV"] == "production"
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_pm2_interpreter_rule_for_py_python_else_python3(d: DaemonProcess, tmp_path: Path) -> None:
    apps = json.dumps([{"name": "job", "script": "job.py"}])
    out = tmp_path / "out"
    with_python3 = hv_import(d, "-", stdin=apps, out=out,
                             path=stand_ins(tmp_path / "a", "python3"))  # fmt: skip
    assert with_python3.returncode == 0, with_python3.stderr
    assert unit(out, "job")["command"] == ["python3", "job.py"]
    assert "workdir" not in unit(out, "job")  # standard input: no folder to take
    both = hv_import(d, "-", "--force", stdin=apps, out=out,
                     path=stand_ins(tmp_path / "b", "python", "python3"))  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert unit(out, "job")["command"] == ["python", "job.py"]
    assert "(pm2's interpreter for .py) -> command: python" in both.stdout


def test_what_cannot_be_imported_exits_1_saying_why(d: DaemonProcess, tmp_path: Path) -> None:
    module = json.loads((SOURCES / "jlist.json").read_text())[:1]  # pm2-logrotate alone
    cases = {
        "ecosystem.config.js": ("module.exports = {\n  apps: [{ script: 'app.js' }]\n}\n",
                                "is JavaScript, which hostvisor import does not run"),
        "broken.json": ('{"apps": [\n  {"script": "a.js",}\n  {"script": "b.js"}\n]}\n',
                        "line 3: not JSON"),
        "empty.json": ('{"apps": []}', "no app found"),
        "noscript.json": ('{"apps": [{"name": "x"}]}', "app 0: no script"),
        "modules.json": (json.dumps(module), "no app found (only pm2 modules)"),
        "memory.json": ('[{"script": "a.js", "max_memory_restart": "lots"}]',
                        "max_memory_restart: 'lots' is not a size"),
        "other.json": ('{"name": "x"}', 'expected {"apps": [...]}'),
        "digits.json": ('{"apps":[{"name":"a","script":"/bin/true","restart_delay":'
                        + "9" * 5000 + "}]}", "not JSON import can read: a number too long"),
        "deep.json": ('{"apps":' + "[" * 100_000 + "]" * 100_000 + "}",
                      "not JSON import can read: nested too deeply"),
        "deep.yml": ("apps: " + "[" * 100_000 + "]" * 100_000 + "\n",
                     "not YAML import can read: nested too deeply"),
        "delay.json": ('[{"script": "a.js", "restart_delay": ' + "9" * 4000 + "}]",
                       "restart_delay: 99999999999999999999 ms is more than 365 days"),
        "inf.json": ('[{"script": "a.js", "kill_timeout": Infinity}]',
                     "kill_timeout: inf ms is more than 365 days"),
        "uptime.json": ('[{"script": "a.js", "min_uptime": "99999999999h"}]',
                        "min_uptime: '99999999999h' is more than 365 days"),
        "restarts.json": ('[{"script": "a.js", "max_restarts": 1e400}]',
                          "max_restarts: expected a whole number from 0 to"),
        "huge.json": ('[{"script": "a.js", "max_memory_restart": "' + "9" * 400 + 'G"}]',
                      "max_memory_restart: 99999999999999999999 is more than 1 PiB"),
    }  # fmt: skip
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        done = hv_import(d, path, out=tmp_path / "out", path="/usr/bin:/bin")
        assert done.returncode == 1, (name, done.stdout)
        assert message in done.stderr, (name, done.stderr)
    assert not (tmp_path / "out").exists()


APP = """\
import json, os, pathlib, signal, sys, time
def stop(signum, frame):
    pathlib.Path("stopped-by").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
info = {"cwd": os.getcwd(), "argv": sys.argv[1:], "greeting": os.environ.get("GREETING"),
        "unbuffered": os.environ.get("PYTHONUNBUFFERED")}
pathlib.Path("started.json").write_text(json.dumps(info))
while True:
    time.sleep(3600)
"""


def test_round_trip_an_ecosystem_python_app_runs_and_stops_with_sigint(
    d: DaemonProcess, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "svc.py").write_text(APP)
    ecosystem = app / "ecosystem.config.json"
    ecosystem.write_text(json.dumps({"apps": [{
        "name": "py-svc", "script": "svc.py", "interpreter": sys.executable,
        "args": "--name py-svc", "env": {"GREETING": "hi from pm2"}, "min_uptime": "1s",
        "kill_timeout": 3000,
    }]}))  # fmt: skip
    done = hv_import(d, ecosystem, path="/usr/bin:/bin")
    assert done.returncode == 0, done.stderr
    assert unit(d.units, "py-svc")["workdir"] == str(app)  # no cwd: the ecosystem's folder
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    d.start()
    d.wait_state("py-svc", "running")
    started = json.loads((app / "started.json").read_text())
    assert started == {"cwd": str(app), "argv": ["--name", "py-svc"], "greeting": "hi from pm2",
                       "unbuffered": "1"}  # fmt: skip
    stop = d.cli("stop", "py-svc")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    d.wait_state("py-svc", "stopped")
    assert (app / "stopped-by").read_text() == "SIGINT"
