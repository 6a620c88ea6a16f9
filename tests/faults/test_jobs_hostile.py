"""Hostile review of issue 11 (scheduled and one-shot units), through a real
``hostvisor run``: what a hostile host leaves in the state folder, what a hostile user
does to a job. Each test failed before its fix unless its docstring says it is a guard
or it is marked ``xfail`` (a fault outside the jobs modules; the report says the fix).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.daemon_harness import DaemonProcess

TICK = 'command = ["/bin/sh", "-c", "echo tick"]\nevery = "1s"\n'
SERVICE = 'command = ["sleep", "600"]\n'


def _ledger(d: DaemonProcess) -> Path:
    d.state.mkdir(parents=True, exist_ok=True)
    return d.state / "jobs.json"


def _far_future(path: Path) -> None:
    # Epoch 1e12 is the year 33658: a float that passed the old "< 2**40" bound.
    entry = {
        "last_trigger": 1e12,
        "runs": 3,
        "last_run": {"number": 3, "trigger": "schedule", "started": 1e12, "duration": 1e12},
    }
    path.write_text(json.dumps({"format": 1, "jobs": {"tick": entry}}))


def _deeply_nested(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # nobody ever writes: open() for reading blocked for good


def _symlink_to_a_fifo(path: Path) -> None:
    fifo = path.with_name("elsewhere")
    os.mkfifo(fifo)
    path.symlink_to(fifo)


def _wrong_types(path: Path) -> None:
    entry = {
        "last_trigger": "yesterday",
        "runs": True,
        "last_run": {
            "number": 10**40,
            "trigger": {"x": 1},
            "started": 5,
            "outcome": ["x" * 10_000],
            "exit": {"code": 10**30, "signal": "KILL"},
        },
    }
    path.write_text(json.dumps({"format": 1, "jobs": {"tick": entry, "other": []}}))


HOSTILE = {
    "far_future_stamps": _far_future,
    "nested_100000_deep": _deeply_nested,
    "fifo": _fifo,
    "symlink_to_a_fifo": _symlink_to_a_fifo,
    "wrong_types": _wrong_types,
}


class TestHostileLedger:
    @pytest.mark.parametrize("make", HOSTILE.values(), ids=list(HOSTILE))
    def test_a_hostile_jobs_json_never_stops_the_daemon_or_its_jobs(
        self, d: DaemonProcess, make: Any
    ) -> None:
        """0.1.x (issue 11): a stamp past the year 9999 (ValueError) or nesting 100,000
        deep (RecursionError) made the daemon exit 70 at start; a FIFO hung it before
        its first service, deaf to SIGTERM. ``wrong_types`` is a guard."""
        make(_ledger(d))
        d.write_unit("tick", TICK)
        d.write_unit("svc", SERVICE)
        d.start(timeout=15)
        ran = d.wait_event("hostvisor.job.succeeded", "tick", timeout=15)
        entry = d.status("tick")
        assert entry["last_run"] is not None and entry["last_run"]["outcome"] in (
            "running",
            "succeeded",
        )
        assert entry["last_run"]["started"].startswith("20")
        assert ran["attributes"]["hostvisor.job.run"] < 2**53
        assert d.status("svc")["state"] == "running"
        assert d.cli("status").returncode in (0, 3)
        d.signal(signal.SIGTERM)
        assert d.stop() == 0
        # The file is a history again, readable by the next start.
        doc = json.loads((d.state / "jobs.json").read_text())
        assert doc["jobs"]["tick"]["runs"] >= 1


def _headers(d: DaemonProcess, name: str) -> list[int]:
    path = d.state / "logs" / f"{name}.log"
    if not path.exists():
        return []
    marker = f"--- hostvisor: {name} run "
    return [
        int(line[len(marker) :].split()[0])
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith(marker)
    ]


def _ledger_entry(d: DaemonProcess, name: str) -> dict[str, Any]:
    try:
        doc = json.loads((d.state / "jobs.json").read_text())
        return dict(doc["jobs"][name])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class TestRunNumbers:
    def test_reexec_with_two_runs_going_never_gives_a_number_twice(self, d: DaemonProcess) -> None:
        """0.1.x (issue 11): jobs.json was written before a run took its number, so after
        ``reexec`` the next run got the number of a carried run still going: two runs
        marked HOSTVISOR_RUN=2 at once, the one thing the markers are for."""
        d.write_unit(
            "overlap",
            'command = ["/bin/sh", "-c", "sleep 2.5"]\nevery = "1s"\nconcurrency = "allow"\n',
        )
        d.start()
        d.wait_for(lambda: len(_headers(d, "overlap")) >= 2, 15, "two runs going")
        result = d.cli("reexec")
        assert result.returncode == 0, result.stderr
        before = len(_headers(d, "overlap"))
        d.wait_for(lambda: len(_headers(d, "overlap")) >= before + 3, 20, "three runs after")
        numbers = _headers(d, "overlap")
        assert len(numbers) == len(set(numbers)), numbers

    def test_a_run_the_daemon_died_in_keeps_its_number(self, d: DaemonProcess) -> None:
        """0.1.x (issue 11): a one-shot's run was written to jobs.json only when it ended,
        so after a kill -9 of the daemon its run took the dead run's number again, and
        the "running means the daemon died: failed" rule of the history never applied.
        The dead run's process being stopped is a guard (takeover.py, kind "job")."""
        d.write_unit("long", 'command = ["sleep", "60"]\nrestart = "no"\n')
        d.start()
        d.wait_event("hostvisor.job.triggered", "long")
        pid = d.wait_state("long", "running")["pid"]
        d.wait_for(
            lambda: (_ledger_entry(d, "long").get("last_run") or {}).get("number") == 1,
            10,
            "run 1 in jobs.json",
        )
        assert _ledger_entry(d, "long")["last_run"]["outcome"] == "running"
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        d.events, d.stderr = [], []
        d.start()
        again = d.wait_event("hostvisor.job.triggered", "long")
        assert again["attributes"]["hostvisor.job.run"] == 2
        d.wait_for(lambda: not psutil.pid_exists(pid), 15, "the dead run's process stopped")
