"""Faults of issue 9, items 1 and 11 (daemon side): a hostile config at reload never kills
the daemon, and a reload stops changed units dependents first."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.daemon_harness import daemon, py_cmd

SLEEP = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\n'

HOSTILE = {
    "huge int": "port = " + "1" * 5000 + "\n",
    "deep arrays": "env_files = " + "[" * 1000 + "]" * 1000 + "\n",
    "NUL in env": 'env = { A = "x\\u0000y" }\n',
    "NUL in env_files": 'env_files = ["a\\u0000b"]\n',
    "invalid UTF-8": b"\xff\xfe = 1\n".decode("latin-1"),
    "interval 1e308": '[health]\ntcp = "127.0.0.1:1"\ninterval = 1e308\n',
}


class TestHostileReload:
    @pytest.mark.parametrize("what", list(HOSTILE))
    def test_sighup_with_a_hostile_unit_keeps_the_daemon_and_its_services(
        self, tmp_path: Path, what: str
    ) -> None:
        """SIGHUP with a hostile unit: the reload is rejected with an event naming the
        file, the running config stays in force, same pid, and the daemon lives on
        (0.1: a 5,000-digit port raised ValueError and killed the daemon)."""
        with daemon(tmp_path, units={"keep": SLEEP}) as d:
            before = d.wait_state("keep", "running")
            bad = d.units / "bad.toml"
            bad.write_bytes((SLEEP + HOSTILE[what]).encode("latin-1"))
            bad.chmod(0o644)
            seq = d.last_seq()
            d.signal(signal.SIGHUP)
            rejected = d.wait_event("hostvisor.config.rejected", after=seq, timeout=20)
            assert "bad.toml" in rejected["message"]
            assert d.proc is not None and d.proc.poll() is None
            after = d.status("keep")
            assert after["state"] == "running" and after["pid"] == before["pid"]
            result = d.cli("reload")
            assert result.returncode == 1 and "bad.toml" in result.stderr
            assert "Traceback" not in result.stderr
            assert d.cli("status").returncode in (0, 3)
