"""``hostvisor top`` (issue 12) driven by textual's own harness (``App.run_test()`` and its
Pilot) against a real ``hostvisor run`` on a real socket.

Waits go through ``TopApp.wait_for``, which re-checks its condition each time the app
redraws something, under a deadline. As a person would see it, in tmux:
tests/test_top_tmux.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.text import Text
from textual.widgets import DataTable, Static

from supervisor.cli import execute
from supervisor.errors import ControlError
from supervisor.top import TopApp
from supervisor.top_client import AsyncControl
from supervisor.top_model import Board, human_bytes, percent_text
from supervisor.top_screens import ConfirmScreen, HelpScreen, LogScreen
from tests.daemon_harness import PY, DaemonProcess, daemon
from tests.test_cli import _clean_environment  # noqa: F401  (autouse: no socket or config leaks in)

#: Prints ``tick N pid P`` every 0.2 s, unbuffered.
TICKER = "import os,time\nn=0\nwhile True:\n    print('tick', n, 'pid', os.getpid(), flush=True); n+=1; time.sleep(0.2)\n"
#: Keeps one core busy.
BUSY = "while True:\n    pass\n"


def unit(code: str) -> str:
    return f'command = {json.dumps([PY, "-u", "-c", code])}\nstart_seconds = "0.2s"\nstop_timeout = "5s"\n'


@pytest.fixture
def two(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon running ``api`` and ``worker`` (both tickers)."""
    with daemon(tmp_path, units={"api": unit(TICKER), "worker": unit(TICKER)}) as d:
        d.wait_state("api", "running")
        d.wait_state("worker", "running")
        yield d


def pid_cell(app: TopApp, name: str) -> str:
    try:
        return app.cells(name)[4]
    except Exception:  # not shown (yet)
        return ""


async def shown(app: TopApp, d: DaemonProcess, *names: str) -> None:
    """Wait until each of ``names`` shows as running with the pid the daemon reports."""
    pids = {name: str(d.status(name)["pid"]) for name in names}

    def ready() -> bool:
        return all(
            pid_cell(app, n) == pid and app.cells(n)[2] == "running" for n, pid in pids.items()
        )

    await app.wait_for(ready)


class TestTable:
    """A row per service, kept current from events."""

    async def test_rows_show_states_and_pids(self, two: DaemonProcess) -> None:
        """Both services appear with their kind, state and pid; CPU and memory are figures or
        ``-``."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)):
            await shown(app, two, "api", "worker")
            cells = app.cells("api")
            assert cells[:3] == ["api", "process", "running"]
            assert cells[8] == "0"  # restarts
            assert app.query_one(DataTable).row_count == 2

    async def test_an_event_updates_only_that_row(self, two: DaemonProcess) -> None:
        """A restart from another client shows up as a new pid in that service's row."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)):
            await shown(app, two, "api", "worker")
            old = pid_cell(app, "worker")
            two.cli("restart", "worker")
            await app.wait_for(lambda: pid_cell(app, "worker") not in ("", "-", old))
            assert app.cells("worker")[8] == "1"

    async def test_state_colours_and_no_color(
        self, two: DaemonProcess, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """States are coloured cells; under NO_COLOR textual drops colour (``app.no_color``)
        and the state cells are plain text."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)):
            await shown(app, two, "api")
            state = app.query_one(DataTable).get_row("api")[2]
            assert isinstance(state, Text) and str(state.style) == "green"
        monkeypatch.setenv("NO_COLOR", "1")
        app = TopApp(two.socket)
        assert app.no_color and app.plain
        async with app.run_test(size=(160, 40)):
            await shown(app, two, "api")
            assert not isinstance(app.query_one(DataTable).get_row("api")[2], Text)


class TestKeys:
    """``r``/``s``/``x`` ask y/n; ``/`` filters; ``?`` lists; Enter follows the log; ``q``."""

    async def test_r_then_y_restarts_the_selected_service(self, two: DaemonProcess) -> None:
        """The second row selected, ``r`` asks ``restart worker? y/n``; ``y`` restarts it (a
        new pid in its row); ``api`` is left alone."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await shown(app, two, "api", "worker")
            api, worker = pid_cell(app, "api"), pid_cell(app, "worker")
            await pilot.press("down")
            await app.wait_for(lambda: app.selected == "worker")
            await pilot.press("r")
            await app.wait_for(lambda: isinstance(app.screen, ConfirmScreen))
            assert isinstance(app.screen, ConfirmScreen)
            assert app.screen.question == "restart worker? y/n"
            await pilot.press("y")
            await app.wait_for(
                lambda: (
                    pid_cell(app, "worker") not in ("", "-", worker)
                    and app.cells("worker")[2] == "running"
                )
            )
            assert app.sent == ["restart worker"]
            assert pid_cell(app, "api") == api
            assert two.status("worker")["pid"] == int(pid_cell(app, "worker"))

    async def test_r_then_n_does_nothing(self, two: DaemonProcess) -> None:
        """Any key but ``y`` cancels: nothing is sent, the pid stays."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await shown(app, two, "api", "worker")
            api = pid_cell(app, "api")
            for key in ("n", "escape"):
                await pilot.press("r")
                await app.wait_for(lambda: isinstance(app.screen, ConfirmScreen))
                await pilot.press(key)
                await app.wait_for(lambda: not isinstance(app.screen, ConfirmScreen))
            assert app.sent == []
            assert two.status("api")["pid"] == int(api)
            assert two.status("api")["restarts"] == 0

    async def test_x_then_y_stops_and_s_then_y_starts(self, two: DaemonProcess) -> None:
        """``x`` ``y`` stops the selected service, ``s`` ``y`` starts it again."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await shown(app, two, "api")
            for key, state in (("x", "stopped"), ("s", "running")):
                await pilot.press(key)
                await app.wait_for(lambda: isinstance(app.screen, ConfirmScreen))
                await pilot.press("y")
                await app.wait_for(lambda s=state: app.cells("api")[2] == s)  # type: ignore[misc]
            assert app.sent == ["stop api", "start api"]

    async def test_slash_filters_by_name(self, two: DaemonProcess) -> None:
        """``/`` then ``wor`` keeps only ``worker``; escape clears the filter."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await shown(app, two, "api", "worker")
            table = app.query_one(DataTable)
            await pilot.press("slash", "w", "o", "r")
            await app.wait_for(lambda: table.row_count == 1)
            assert pid_cell(app, "worker") and not pid_cell(app, "api")
            assert app.selected == "worker"
            await pilot.press("escape")
            await app.wait_for(lambda: table.row_count == 2)
            assert app.needle == ""

    async def test_question_mark_lists_the_keys(self, two: DaemonProcess) -> None:
        """``?`` opens the list of keys; any key closes it."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await shown(app, two, "api")
            await pilot.press("question_mark")
            await app.wait_for(lambda: isinstance(app.screen, HelpScreen))
            listed = str(app.screen.query_one(Static).content)
            for key in ("enter", "restart", "filter", "quit", "escape or q: back"):
                assert key in listed
            await pilot.press("a")
            await app.wait_for(lambda: not isinstance(app.screen, HelpScreen))

    async def test_enter_follows_the_log(self, two: DaemonProcess) -> None:
        """Enter on ``api`` shows the lines it printed and new ones as they come; escape goes
        back to the table."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await shown(app, two, "api")
            pid = pid_cell(app, "api")
            await pilot.press("enter")
            await app.wait_for(lambda: isinstance(app.screen, LogScreen))
            screen = app.screen
            assert isinstance(screen, LogScreen) and screen.service == "api"
            await app.wait_for(lambda: any(f"pid {pid}" in line for line in screen.lines))
            count = len([line for line in screen.lines if f"pid {pid}" in line])
            await app.wait_for(
                lambda: len([line for line in screen.lines if f"pid {pid}" in line]) > count
            )
            await pilot.press("q")  # back, not quit
            await app.wait_for(lambda: not isinstance(app.screen, LogScreen))
            assert app.is_running

    async def test_q_quits_with_0(self, two: DaemonProcess) -> None:
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await shown(app, two, "api")
            await pilot.press("q")
        assert app.return_value == 0


class TestDaemon:
    """The daemon behind the view."""

    async def test_daemon_away_and_back(self, two: DaemonProcess) -> None:
        """A daemon that stops shows ``daemon unreachable, retrying``; a new one is found and
        its services shown."""
        app = TopApp(two.socket)
        async with app.run_test(size=(160, 40)):
            await shown(app, two, "api")
            old = pid_cell(app, "api")
            assert two.stop() == 0
            await app.wait_for(lambda: not app.reachable)
            banner = app.query_one("#banner", Static)
            assert banner.has_class("shown") and banner.display
            assert "daemon unreachable, retrying" in str(banner.content)
            two.start()
            await app.wait_for(
                lambda: app.reachable and pid_cell(app, "api") not in ("", "-", old), timeout=30
            )
            assert not banner.has_class("shown")

    async def test_cpu_and_memory_from_resources(self, tmp_path: Path) -> None:
        """A busy service shows CPU % above zero, its memory in MiB, and a sparkline."""
        with daemon(tmp_path, units={"busy": unit(BUSY)}) as d:
            d.wait_state("busy", "running")
            try:
                await AsyncControl(d.socket).call("resources", {})
            except ControlError as exc:
                pytest.skip(f"this daemon has no resources method yet ({exc})")
            app = TopApp(d.socket)
            async with app.run_test(size=(160, 40)):
                await shown(app, d, "busy")

                def busy() -> bool:
                    cpu = app.cells("busy")[5]
                    return cpu != "-" and float(cpu) > 10.0

                await app.wait_for(busy, timeout=30)
                assert app.cells("busy")[6].endswith(("KiB", "MiB"))
                # The figures may first come with a status entry (the daemon samples for
                # status too); the sparkline's history comes from the resources samples.
                history = app.board.rows["busy"].cpu_history
                await app.wait_for(lambda: bool(history) and max(history) > 10.0, timeout=30)

    def test_no_daemon_is_4_with_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No daemon: exit 4 and cli.py's one line with the hint, before any screen opens."""
        config = tmp_path / "config.toml"
        code = execute(["top", "-c", str(config), "--socket", str(tmp_path / "no.sock")])
        err = capsys.readouterr().err
        assert code == 4
        assert err.splitlines() == [
            f"hostvisor: no daemon at {tmp_path / 'no.sock'} (start one with: hostvisor run -c {config})"
        ]

    def test_not_a_terminal_is_2(self, two: DaemonProcess) -> None:
        """Piped (no terminal), ``top`` says so in one line and exits 2 (a usage mistake)."""
        done = two.cli("top")
        assert done.returncode == 2
        assert done.stderr.splitlines() == [
            "hostvisor: top: needs a terminal (stdin and stdout); try: hostvisor status"
        ]

    def test_other_verbs_do_not_import_textual(self, tmp_path: Path) -> None:
        """textual is imported by ``top`` only: ``status`` stays fast."""
        code = (
            "import sys\nfrom supervisor.cli import execute\n"
            f"execute(['status', '--socket', {str(tmp_path / 'no.sock')!r}])\n"
            "print([m for m in sys.modules if m.split('.')[0] == 'textual' or m.startswith('supervisor.top')])\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.stdout.splitlines()[-1] == "[]"


class TestBoard:
    """The cells without a screen."""

    def test_units(self) -> None:
        assert [human_bytes(n) for n in (None, 512, 1536, 5 * 2**20, 3 * 2**30)] == [
            "-",
            "512 B",
            "1.5 KiB",
            "5.0 MiB",
            "3.0 GiB",
        ]
        assert [percent_text(v) for v in (None, 0.0, 250.06)] == ["-", "0.0", "250.1"]

    def test_uptime_ticks_locally_and_samples_fill_history(self) -> None:
        """Uptime grows from the entry's figure with the local clock; a sample sets CPU and
        memory and appends to the minute's history."""
        board = Board()
        board.replace([{"name": "api", "state": "running", "uptime_seconds": 10.0}], now=100.0)
        row = board.rows["api"]
        assert row.cells(now=165.0, wall=0.0)[7] == "1m15s"
        board.sample(
            {"time": "x", "services": {"api": {"cpu_percent": 12.5, "memory_bytes": 2**20}}}
        )
        assert row.cells(now=100.0, wall=0.0)[5:7] == ["12.5", "1.0 MiB"]
        assert list(row.cpu_history) == [12.5]

    def test_a_job_shows_its_next_run(self) -> None:
        """A job's last column is its next run (``next in 4m00s``)."""
        board = Board()
        entry = {"name": "nightly", "state": "waiting", "last_run": None}
        board.update({**entry, "next_run": "2026-01-01T00:04:00Z"}, now=0.0)
        wall = 1767225600.0  # 2026-01-01T00:00:00Z
        assert board.rows["nightly"].cells(0.0, wall)[9] == "next in 4m00s"
