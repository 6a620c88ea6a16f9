"""``hostvisor check`` and ``hostvisor run`` on hostile configs, as real processes (issue 9,
item 1): exit 1, every issue one ``file: key: message`` line on stderr, never a traceback.

On 0.1.0 each of these configs made ``check`` and ``run`` die with a traceback (ValueError,
RecursionError), or passed ``check`` and then broke the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DIGITS = "1" * 5000
HOSTILE = {
    "huge-port": ("units/web.toml", f'command = "x"\nport = {DIGITS}\n', "port"),
    "deep-arrays": ("units/web.toml", 'command = "x"\nenv = ' + "[" * 1000 + "]" * 1000, "line 2"),
    "nul-in-argv": ("units/web.toml", 'command = ["x", "a\\u0000b"]\n', "command"),
    "nul-in-env-file-path": ("units/web.toml", 'command = "x"\nenv_files = ["-a\\u0000"]\n',
                             "env_files"),
    "interval-1e308": ("units/web.toml", 'command = "x"\n[health]\ntcp = "a:1"\ninterval = 1e308\n',
                       "health.interval"),
    "huge-shutdown-timeout": ("config.toml", f"[daemon]\nshutdown_timeout = {DIGITS}\n",
                              "daemon.shutdown_timeout"),
    "deep-config": ("config.toml", "[daemon]\nallow_uids = " + "[" * 2000 + "]" * 2000, "line 2"),
}  # fmt: skip


def hostvisor(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTVISOR_", "XDG_"))}
    env |= {"XDG_STATE_HOME": str(cwd / "state"), "XDG_RUNTIME_DIR": str(cwd / "run")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *argv],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
    )  # fmt: skip


def tree(root: Path, relative: str, text: str) -> Path:
    (root / "units").mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text("")
    (root / relative).write_text(text)
    for path in (config, root / relative):
        path.chmod(0o644)
    return config


def assert_issue_lines(stderr: str, root: Path, file: Path, key: str) -> None:
    """No traceback; one line per issue, each starting with a file of the project."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    assert any(line.startswith(f"{file}: {key}: ") for line in lines), stderr
    assert all(line.startswith(f"{root}/") for line in lines), stderr


@pytest.mark.parametrize("case", list(HOSTILE))
def test_check_reports_file_and_key_and_exits_1(tmp_path: Path, case: str) -> None:
    relative, text, key = HOSTILE[case]
    config = tree(tmp_path, relative, text)
    result = hostvisor("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1, result
    assert_issue_lines(result.stderr, tmp_path, tmp_path / relative, key)


@pytest.mark.parametrize("case", ["huge-port", "deep-arrays", "huge-shutdown-timeout"])
def test_run_refuses_to_start_with_the_same_lines(tmp_path: Path, case: str) -> None:
    relative, text, key = HOSTILE[case]
    config = tree(tmp_path, relative, text)
    result = hostvisor("run", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1, result
    assert_issue_lines(result.stderr, tmp_path, tmp_path / relative, key)


def test_a_client_verb_with_a_deeply_nested_config_has_no_traceback(tmp_path: Path) -> None:
    relative, text, _ = HOSTILE["deep-config"]
    config = tree(tmp_path, relative, text)
    result = hostvisor("status", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
