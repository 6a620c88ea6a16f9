"""``hostvisor import launchd``: seed 001's LaunchAgents, read by the real CLI.

The fixtures in tests/import_sources/launchd/ are the gateway daemon, the sandbox janitor
and the k8s heal job of ``~/Library/LaunchAgents/com.joel.*.plist``. Each test runs
``python -m supervisor import launchd ...`` and reads the unit files written; the round
trips import plists running real programs, ``check`` them and run them under a daemon.
"""

from __future__ import annotations

import plistlib
import subprocess
import sys
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.importers import ImportContext, ImportFailed, Source
from supervisor.importers.launchd import convert, convert_plist
from tests.daemon_harness import DaemonProcess
from tests.support import free_port

FIXTURES = Path(__file__).parent / "import_sources" / "launchd"
PY = sys.executable


@dataclass
class Folder:
    root: Path
    config: Path
    units: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "supervisor", *args, "-c", str(self.config)],
            capture_output=True, text=True, cwd=self.root, timeout=60,
        )  # fmt: skip

    def imports(self, *paths: Path, to: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("import", "launchd", *map(str, paths), "-o", str(to or self.units))

    def unit(self, name: str) -> dict[str, Any]:
        return tomllib.loads((self.units / f"{name}.toml").read_text())


@pytest.fixture
def folder(tmp_path: Path) -> Folder:
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nunits_dir = "units"\n')
    return Folder(tmp_path, config, tmp_path / "units")


def _unit(root: dict[str, Any]) -> Any:
    return convert_plist(root, root["Label"], ImportContext()).units[0]


class TestSeedPlists:
    """Seed 001's agents."""

    def test_gateway_is_a_service_kept_alive(self, folder: Folder) -> None:
        """com.joel.gateway -> gateway (the label beside it): ProgramArguments, its folder
        and environment; KeepAlive -> always; ThrottleInterval 30 -> a constant 30 s
        backoff; launchd's 20 s ExitTimeOut; the log paths are reported with why."""
        done = folder.imports(FIXTURES / "com.joel.gateway.plist")
        assert done.returncode == 0, done.stderr
        assert "gateway (from com.joel.gateway)" in done.stdout
        unit = folder.unit("gateway")
        assert unit["command"] == [
            "/Users/joel/.bun/bin/bun",
            "run",
            "packages/gateway/src/daemon.ts",
        ]
        assert unit["workdir"] == "/Users/joel/Code/joelhooks/joelclaw"
        assert unit["env"]["GATEWAY_WS_PORT"] == "3018"
        assert unit["restart"] == "always"
        assert "autostart" not in unit
        assert unit["backoff"] == {"initial": "30s", "max": "30s", "multiplier": 1.0}
        assert unit["stop_timeout"] == "20s"
        assert (
            "StandardOutPath=/Users/joel/.joelclaw/logs/gateway.log: hostvisor writes stdout "
            "and stderr to <state>/logs/<name>.log" in done.stdout
        )
        assert "ProcessType=Interactive: hostvisor sets no scheduling class" in done.stdout
        assert folder.run("check").returncode == 0

    def test_janitor_is_a_job_every_start_interval(self, folder: Folder) -> None:
        """StartInterval 1800 -> every 30m, no catch_up (launchd loses a run missed in
        sleep); RunAtLoad on a scheduled job is reported; check accepts the job."""
        done = folder.imports(FIXTURES / "com.joel.local-sandbox-janitor.plist")
        assert done.returncode == 0, done.stderr
        unit = folder.unit("local-sandbox-janitor")
        assert unit["every"] == "30m"
        assert unit["command"] == ["/bin/bash", "scripts/local-sandbox-janitor.sh"]
        assert unit["restart"] == "no"
        assert "catch_up" not in unit
        assert "RunAtLoad=true: a scheduled unit runs at its triggers only" in done.stdout
        assert "StandardErrorPath=/tmp/joelclaw/local-sandbox-janitor.err" in done.stdout
        assert folder.run("check").returncode == 0

    def test_calendar_intervals_become_one_cron_line(self, folder: Folder) -> None:
        """Two StartCalendarInterval dicts (:00 and :30) -> "0,30 * * * *", catch_up
        once (launchd coalesces runs missed in sleep into one); KeepAlive SuccessfulExit
        false -> on-failure; no WorkingDirectory -> launchd's /; UserName reported."""
        done = folder.imports(FIXTURES / "com.joel.k8s-reboot-heal.plist")
        assert done.returncode == 0, done.stderr
        unit = folder.unit("k8s-reboot-heal")
        assert (unit["schedule"], unit["catch_up"], unit["restart"]) == (
            "0,30 * * * *", "once", "on-failure")  # fmt: skip
        assert unit["workdir"] == "/"
        assert unit["stop_timeout"] == "1m"
        assert "UserName=joel: hostvisor runs every unit as the daemon's own user" in done.stdout
        assert folder.run("check").returncode == 0


class TestMapping:
    """launchd.plist(5)'s rules, on parsed plists."""

    def test_program_is_the_executable_and_argv0_is_reported(self) -> None:
        unit = _unit({"Label": "a.b.c", "Program": "/bin/echo", "ProgramArguments": ["echo", "hi"]})
        assert unit.table["command"] == ["/bin/echo", "hi"]
        assert unit.unmapped[0][0] == "ProgramArguments[0]=echo"

    def test_an_on_demand_job_does_not_autostart(self) -> None:
        """No KeepAlive, no RunAtLoad, no schedule: launchd waits for a kickstart."""
        unit = _unit({"Label": "com.x.tool", "ProgramArguments": ["/bin/true"]})
        assert (unit.table["autostart"], unit.table["restart"]) == (False, "no")

    def test_keep_alive_conditions(self) -> None:
        crashed = _unit({"Label": "x", "Program": "/bin/true", "KeepAlive": {"Crashed": True}})
        assert crashed.table["restart"] == "on-failure"
        assert crashed.table["autostart"] is False  # Crashed alone does not imply RunAtLoad
        path = _unit({"Label": "x", "Program": "/bin/true", "RunAtLoad": True,
                      "KeepAlive": {"PathState": {"/tmp/go": True}}})  # fmt: skip
        assert path.table["restart"] == "no"
        assert path.unmapped[0][0].startswith("KeepAlive.PathState=")

    @pytest.mark.parametrize(
        ("calendar", "cron"),
        [
            ({"Hour": 3, "Minute": 15}, "15 3 * * *"),
            ({"Weekday": 7, "Hour": 9, "Minute": 0}, "0 9 * * 0"),
            ([{"Weekday": d, "Hour": 9, "Minute": 0} for d in range(1, 6)], "0 9 * * 1-5"),
            ({"Day": 1, "Hour": 0, "Minute": 0}, "0 0 1 * *"),
            ({"Hour": 3}, "* 3 * * *"),
        ],
    )
    def test_start_calendar_interval(self, calendar: Any, cron: str) -> None:
        unit = _unit({"Label": "x", "Program": "/bin/true", "StartCalendarInterval": calendar})
        assert unit.table["schedule"] == cron

    def test_calendars_no_cron_line_joins_are_not_mapped(self) -> None:
        """Mon 09:00 and Fri 17:30 differ in two fields: not mapped, the job waits."""
        unit = _unit({"Label": "x", "Program": "/bin/true", "StartCalendarInterval": [
            {"Weekday": 1, "Hour": 9, "Minute": 0}, {"Weekday": 5, "Hour": 17, "Minute": 30}]})  # fmt: skip
        assert "schedule" not in unit.table
        assert "differ in more than one field" in unit.unmapped[0][1]
        assert unit.table["autostart"] is False

    def test_a_binary_plist_is_read_from_its_bytes(self, tmp_path: Path) -> None:
        """A source that carries its bytes (``data``) may be a bplist00."""
        from dataclasses import dataclass

        @dataclass(frozen=True, slots=True, kw_only=True)
        class WithBytes(Source):
            data: bytes

        data = plistlib.dumps({"Label": "com.joel.bin", "Program": "/bin/true",
                               "KeepAlive": True}, fmt=plistlib.FMT_BINARY)  # fmt: skip
        result = convert(WithBytes(path=tmp_path / "b.plist", text="", data=data), ImportContext())
        assert (result.units[0].name, result.units[0].table["restart"]) == ("bin", "always")


class TestFailures:
    def test_not_a_plist_a_list_and_no_program_fail_naming_why(self, folder: Folder) -> None:
        bad = folder.root / "bad.plist"
        bad.write_text("<plist><dict><key>Label</key></plist>")
        listed = folder.root / "list.plist"
        listed.write_bytes(plistlib.dumps(["a"]))
        empty = folder.root / "empty.plist"
        empty.write_bytes(plistlib.dumps({"Label": "com.joel.empty"}))
        done = folder.imports(bad, listed, empty)
        assert done.returncode == 1
        assert f"{bad}: not a property list" in done.stderr
        assert f"{listed}: the plist's root is a list" in done.stderr
        assert f"{empty}: no Program or ProgramArguments" in done.stderr

    def test_absurd_numbers_and_deep_nesting_are_reported_not_raised(self, folder: Folder) -> None:
        """A StartInterval of 401 digits is not mapped, with the key (float() of it
        overflowed); a binary plist nested past the recursion limit fails, named."""
        path = folder.root / "com.joel.big.plist"
        path.write_text(
            '<?xml version="1.0"?><plist version="1.0"><dict><key>Label</key>'
            "<string>com.joel.big</string><key>Program</key><string>/bin/true</string>"
            "<key>StartInterval</key><integer>1" + "0" * 400 + "</integer></dict></plist>"
        )
        deep: Any = "x"
        for _ in range(3000):
            deep = [deep]
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(20000)
        try:
            data = plistlib.dumps({"Label": "com.joel.deep", "Program": "/bin/true",
                                   "Nested": deep}, fmt=plistlib.FMT_BINARY)  # fmt: skip
        finally:
            sys.setrecursionlimit(limit)
        nested = folder.root / "com.joel.deep.plist"
        nested.write_bytes(data)
        done = folder.imports(path, nested)
        assert done.returncode == 1, done.stdout
        assert "StartInterval=1000000" in done.stdout and "more than 365 days" in done.stdout
        assert f"{nested}: not a property list import can read: nested too deeply" in (done.stderr)
        assert "internal error" not in done.stderr, done.stderr

    @pytest.mark.parametrize(
        "text",
        ['<?xml version="1.0" encoding="ULTF-8"?><plist><dict/></plist>',
         "<plist><key>Label</key></plist>"],
    )  # fmt: skip
    def test_what_plistlib_trips_on_is_not_a_property_list(self, text: str) -> None:
        """Found by fuzzing: plistlib raises LookupError (an unknown encoding) and
        IndexError (a <key> outside a <dict>) rather than its InvalidFileException."""
        with pytest.raises(ImportFailed, match="not a property list"):
            convert(Source(path=Path("x.plist"), text=text), ImportContext())

    def test_a_plist_without_label_is_named_by_its_file(self, tmp_path: Path) -> None:
        path = tmp_path / "com.joel.voice-agent.plist"
        text = plistlib.dumps({"ProgramArguments": ["/bin/true"], "KeepAlive": True}).decode()
        assert convert(Source(path=path, text=text), ImportContext()).units[0].name == "voice-agent"

    def test_a_binary_plist_through_the_cli(self, folder: Folder) -> None:
        path = folder.root / "com.joel.caddy.plist"
        path.write_bytes(plistlib.dumps({"Label": "com.joel.caddy", "Program": "/bin/true",
                                         "KeepAlive": True}, fmt=plistlib.FMT_BINARY))  # fmt: skip
        done = folder.imports(path)
        assert done.returncode == 0, done.stderr
        assert "caddy (from com.joel.caddy)" in done.stdout


class TestRoundTrip:
    """Import, check, run."""

    def test_a_kept_alive_agent_runs(self, folder: Folder, d: DaemonProcess) -> None:
        port = free_port()
        (folder.root / "site").mkdir()
        (folder.root / "site" / "up.txt").write_text("gateway up\n")
        path = folder.root / "com.joel.static.plist"
        path.write_bytes(plistlib.dumps({
            "Label": "com.joel.static",
            "ProgramArguments": [PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            "WorkingDirectory": str(folder.root / "site"),
            "KeepAlive": True, "RunAtLoad": True, "ThrottleInterval": 2,
            "StandardOutPath": "/tmp/joelclaw/static.log",
        }))  # fmt: skip
        done = folder.imports(path, to=d.units)
        assert done.returncode == 0, done.stderr
        assert d.cli("check").returncode == 0
        d.start()
        d.wait_state("static", "running")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/up.txt", timeout=5) as page:
            assert page.read() == b"gateway up\n"

    def test_the_janitor_job_runs_when_started(self, folder: Folder, d: DaemonProcess) -> None:
        """The janitor's StartInterval job waits; `hostvisor start` runs it to its end."""
        work = folder.root / "joelclaw"
        (work / "scripts").mkdir(parents=True)
        script = work / "scripts" / "local-sandbox-janitor.sh"
        script.write_text("#!/bin/sh\necho swept > swept.txt\n")
        root = plistlib.loads((FIXTURES / "com.joel.local-sandbox-janitor.plist").read_bytes())
        root["WorkingDirectory"] = str(work)
        path = folder.root / "com.joel.local-sandbox-janitor.plist"
        path.write_bytes(plistlib.dumps(root))
        done = folder.imports(path, to=d.units)
        assert done.returncode == 0, done.stderr
        assert d.cli("check").returncode == 0
        d.start()
        d.wait_state("local-sandbox-janitor", "waiting")
        run = d.cli("start", "local-sandbox-janitor")
        assert run.returncode == 0, run.stdout + run.stderr
        assert (work / "swept.txt").read_text() == "swept\n"
