"""Faults of issue 9, items 1 and 11 (daemon side): a hostile config at reload never kills
the daemon, and a reload stops changed units dependents first."""

from __future__ import annotations

from pathlib import Path

from tests.daemon_harness import daemon, dependency_chain, py_cmd

SLEEP = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\n'


class TestReloadOrder:
    def test_reload_stops_changed_units_dependents_first(self, tmp_path: Path) -> None:
        """db <- api <- web all change at a reload: stopped web, then api, then db, as
        at shutdown (0.1 stopped them all at once)."""
        units = dependency_chain(SLEEP)
        with daemon(tmp_path, units=units) as d:
            for name in units:
                d.wait_state(name, "running")
            for name, text in units.items():
                d.write_unit(name, text + 'stop_timeout = "3s"\n')
            seq = d.last_seq()
            assert d.cli("reload").returncode == 0
            d.wait_event("hostvisor.daemon.reloaded", after=seq, timeout=30)
            stopped = [
                e["service"]
                for e in d.events
                if e["seq"] > seq and e["event"] == "hostvisor.service.stopped"
            ]
            assert stopped == ["web", "api", "db"]
