"""The repository's own config.toml and units/ run as the README says (issue 2, point 12)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.daemon_harness import PY, DaemonProcess

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_checks_clean() -> None:
    """`hostvisor check -c config.toml` accepts the example."""
    result = subprocess.run(
        [PY, "-m", "supervisor", "check", "-c", str(ROOT / "config.toml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_the_example_runs(tmp_path: Path) -> None:
    """`hostvisor run -c config.toml` on the example units: web becomes healthy, the worker
    (preflight, env file, depends_on web healthy) runs and its post_start PUT reaches web."""
    d = DaemonProcess(tmp_path)
    d.config_path = ROOT / "config.toml"
    d.state = tmp_path / "xdg-state" / "hostvisor"
    d.extra_env = {"XDG_STATE_HOME": str(tmp_path / "xdg-state"), "HOSTVISOR_SOCKET": str(d.socket)}
    try:
        d.start()
        web = d.wait_state("web", "running", timeout=30)
        assert web["health"] == "healthy" and web["port"] == 18765
        d.wait_state("worker", "running", timeout=30)
        d.wait_for(
            lambda: "sync requested" in (d.state / "logs" / "web.log").read_text(),
            what="the worker's post_start PUT in web's log",
        )
        d.wait_for(
            lambda: "role=host queue=default" in (d.state / "logs" / "worker.log").read_text(),
            what="the worker's env from env_files and env",
        )
        assert d.cli("status").returncode == 0
        # The example job: `start` runs it now and waits for the run (issue 11).
        result = d.cli("start", "disk-report")
        assert result.returncode == 0, result
        assert "disk-report: run 1 succeeded" in result.stdout
        log = (d.state / "logs" / "disk-report.log").read_text()
        assert "--- hostvisor: disk-report run 1 (start)" in log and "%" in log  # df's line
        assert d.status("disk-report")["state"] == "waiting"
    finally:
        assert d.stop() == 0
        d.cleanup()
