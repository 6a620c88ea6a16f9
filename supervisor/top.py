"""``hostvisor top``: a live terminal view of the daemon's services (issue 12), on textual.

One row per service (:data:`supervisor.top_model.COLUMNS`). What keeps it current,
without re-querying every service in a loop:

- the ``events`` stream, followed: an event naming a service fetches ``status`` of
  that service only (coalesced while a fetch is on its way); a full ``status`` runs
  after each (re)connect and after ``hostvisor.daemon.reloaded``;
- the ``resources`` method about once a second (``{"time", "services": {name:
  {"cpu_percent", "memory_bytes", "processes"}}}``), which feeds the CPU and memory
  columns and the selected service's sparklines (the last minute). A daemon without
  it (-32601) shows ``-`` there and is asked again only after a reconnect or reload;
- a local one-second tick for the uptimes.

Every call goes through :class:`~supervisor.top_client.AsyncControl` (asyncio), so a
daemon that does not answer never freezes the screen. When the daemon goes away the
view says ``daemon unreachable, retrying`` and reconnects every second.

Colour follows textual, which honours ``NO_COLOR`` (no-color.org); under it the state
and health cells are plain text as well.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Input, Sparkline, Static

from supervisor.control.protocol import METHOD_NOT_FOUND
from supervisor.errors import ControlError, DaemonUnreachable, UnknownService
from supervisor.top_client import AsyncControl
from supervisor.top_model import COLUMNS, STYLES, Board, human_bytes, percent_text
from supervisor.top_screens import RETRY, ConfirmScreen, HelpScreen, LogScreen

__all__ = ["TopApp", "run_top"]

#: Seconds between resource samples (and uptime ticks).
SAMPLE_EVERY = 1.0
#: Events after which every service is fetched again.
_FULL_REFRESH = frozenset({"hostvisor.daemon.reloaded", "hostvisor.daemon.started"})
#: Right-aligned columns, and fixed widths of those whose figures change (no jitter).
_RIGHT = frozenset({"PID", "CPU%", "MEM", "RESTARTS"})
_WIDTHS = {"PID": 12, "CPU%": 6, "MEM": 10, "UPTIME": 7, "RESTARTS": 8, "LAST-EXIT": 16}


class FilterInput(Input):
    """The ``/`` filter; escape clears it."""

    BINDINGS = [Binding("escape", "cancel", "clear filter")]

    def action_cancel(self) -> None:
        self.value = ""
        self.post_message(self.Submitted(self, ""))


class TopApp(App[int]):
    """The ``top`` screen. ``app.run()`` returns 0 when the user quits with ``q``."""

    TITLE = "hostvisor top"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit_top", "quit"),
        Binding("s", "act('start')", "start"),
        Binding("x", "act('stop')", "stop"),
        Binding("r", "act('restart')", "restart"),
        Binding("slash", "filter", "filter"),
        Binding("question_mark", "help", "keys"),
    ]
    CSS = """
    #title { height: 1; background: $panel; }
    #banner { height: 1; background: $error; color: $text; display: none; }
    #banner.shown { display: block; }
    DataTable { height: 1fr; }
    #detail { height: 1; }
    .spark { height: 2; }
    .spark > Static { width: 5; }
    .spark > Sparkline { height: 2; width: 1fr; }
    #filter { display: none; }
    #filter.shown { display: block; }
    """

    def __init__(self, socket: Path, *, initial: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.control = AsyncControl(socket)
        self.board = Board()
        self.needle = ""
        self.reachable = True
        self._initial = initial
        self._resources = True  # the daemon may have the method; False after -32601
        self._fetching: dict[str, bool] = {}  # name -> fetch again when this one ends
        self._shown: list[str] = []
        self._texts: dict[str, list[str]] = {}  # the cells shown, by name
        self._change = asyncio.Event()
        #: The actions sent this session, ``"restart api"``: for tests and scripts.
        self.sent: list[str] = []
        self.plain = self.no_color or os.environ.get("NO_COLOR", "") != ""
        # Kept, not queried: workers and messages may outlive the default screen at exit.
        self._banner = Static("daemon unreachable, retrying", id="banner", markup=False)
        self._table: DataTable[str | Text] = DataTable(cursor_type="row", zebra_stripes=False)
        self._detail = Static("", id="detail", markup=False)
        self._cpu = Sparkline([], id="cpu-spark")
        self._memory = Sparkline([], id="memory-spark")
        self._filter = FilterInput(placeholder="filter by name", id="filter")

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(f"hostvisor top  {self.control.path}", id="title", markup=False)
        yield self._banner
        for column in COLUMNS:
            label = Text(column, justify="right" if column in _RIGHT else "left")
            self._table.add_column(label, key=column, width=_WIDTHS.get(column))
        yield self._table
        yield self._detail
        with Horizontal(classes="spark"):
            yield Static("CPU", markup=False)
            yield self._cpu
        with Horizontal(classes="spark"):
            yield Static("MEM", markup=False)
            yield self._memory
        yield self._filter
        yield Footer()

    def on_mount(self) -> None:
        if self._initial is not None:
            self.board.replace(self._initial.get("services", []))
            self._show()
        self._table.focus()
        self.run_worker(self._follow_events(), name="events", exit_on_error=False)
        self.run_worker(self._sample_loop(), name="resources", exit_on_error=False)

    # ------------------------------------------------------------------ tests and scripts

    def changed(self) -> None:
        """Wake :meth:`wait_for` callers: something on screen may have changed."""
        self._change.set()
        self._change = asyncio.Event()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait until ``condition()`` holds, re-checked at each change; TimeoutError after
        ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                change = self._change
                if condition():
                    return
                await change.wait()

    def cells(self, name: str) -> list[str]:
        """The text of ``name``'s row as shown (KeyError if it is not shown)."""
        return [str(cell) for cell in self._table.get_row(name)]

    @property
    def selected(self) -> str | None:
        """The name of the selected row, None when no row is shown."""
        table = self._table
        if not self._shown or table.cursor_row < 0:
            return None
        return self._shown[min(table.cursor_row, len(self._shown) - 1)]

    # ------------------------------------------------------------------ drawing

    def _styled(self, column: str, text: str) -> str | Text:
        if column in _RIGHT:
            return Text(text, justify="right")
        if self.plain or column not in ("STATE", "HEALTH"):
            return text
        return Text(text, style=STYLES.get(text, ""))

    def _show(self) -> None:
        """Bring the table in line with the board (only changed cells are touched)."""
        table = self._table
        names = self.board.visible(self.needle)
        now, wall = time.monotonic(), time.time()
        if names != self._shown:
            keep = self.selected
            table.clear()
            self._texts = {}
            for name in names:
                cells = self._texts[name] = self.board.rows[name].cells(now, wall)
                styled = (self._styled(c, t) for c, t in zip(COLUMNS, cells, strict=True))
                table.add_row(*styled, key=name)
            self._shown = names
            if keep in names:
                table.move_cursor(row=names.index(keep))
        else:
            for name in names:
                new = self.board.rows[name].cells(now, wall)
                old = self._texts.get(name, [])
                for column, text, before in zip(COLUMNS, new, old, strict=True):
                    if text != before:  # fixed-width columns need no new layout
                        fit = column not in _WIDTHS
                        table.update_cell(
                            name, column, self._styled(column, text), update_width=fit
                        )
                self._texts[name] = new
        self._show_detail()
        self.changed()

    def _show_detail(self) -> None:
        name = self.selected
        detail, cpu, memory = self._detail, self._cpu, self._memory
        row = self.board.rows.get(name) if name else None
        if row is None:
            detail.update(f"no service matches {self.needle!r}" if self.needle else "no service")
            cpu.data, memory.data = [], []
            return
        filtered = f"  filter: {self.needle!r}" if self.needle else ""
        cpu_text = "-" if row.cpu is None else f"{percent_text(row.cpu)}%"
        detail.update(
            f"{row.name}: CPU {cpu_text}  MEM {human_bytes(row.memory)}"
            f"  (the last minute below){filtered}"
        )
        cpu.data, memory.data = list(row.cpu_history), list(row.memory_history)

    def _set_reachable(self, reachable: bool) -> None:
        self.reachable = reachable
        self._banner.set_class(not reachable, "shown")
        self.changed()

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_detail()

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.push_screen(LogScreen(self.control, event.row_key.value, self.changed))
            self.changed()

    # ------------------------------------------------------------------ the daemon

    async def _follow_events(self) -> None:
        while True:
            try:
                async with self.control.follow("events", {}) as feed:
                    await self._full_status()
                    self._set_reachable(True)
                    async for event in feed:
                        self._on_event(event)
            except DaemonUnreachable:
                pass
            except ControlError as exc:
                self.notify(f"events: {exc}", severity="error")
            self._set_reachable(False)
            await asyncio.sleep(RETRY)  # the reconnect cadence, not a synchronisation

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        if event.get("event") in _FULL_REFRESH:
            self._resources = True
            self.run_worker(self._full_status(), exit_on_error=False)
        elif isinstance(event.get("service"), str):
            self._fetch(event["service"])

    async def _full_status(self) -> None:
        doc = await self.control.call("status", {})
        self.board.replace(doc.get("services", []))
        self._resources = True
        self._show()

    def _fetch(self, name: str) -> None:
        """Fetch ``status`` of ``name``; while a fetch runs, the next waits for its end."""
        if name in self._fetching:
            self._fetching[name] = True
            return
        self._fetching[name] = False
        self.run_worker(self._fetch_one(name), exit_on_error=False)

    async def _fetch_one(self, name: str) -> None:
        try:
            while True:
                try:
                    doc = await self.control.call("status", {"services": [name]})
                except UnknownService:
                    self.board.remove(name)
                except ControlError:
                    return  # unreachable: the events worker reconnects and refreshes all
                else:
                    for entry in doc.get("services", []):
                        self.board.update(entry)
                self._show()
                if not self._fetching.get(name):
                    return
                self._fetching[name] = False
        finally:
            self._fetching.pop(name, None)

    async def _sample_loop(self) -> None:
        while True:
            if self.reachable:
                await self._sample()
                self._show()  # the uptimes tick; frozen while the daemon is away
            await asyncio.sleep(SAMPLE_EVERY)  # the sampling cadence, not a synchronisation

    async def _sample(self) -> None:
        if not self._resources:
            return
        try:
            result = await self.control.sample({"max_age": SAMPLE_EVERY})
        except ControlError as exc:
            if exc.code == METHOD_NOT_FOUND:  # an older daemon: "-" until a reconnect
                self._resources = False
        else:
            self.board.sample(result)

    # ------------------------------------------------------------------ keys

    def action_quit_top(self) -> None:
        self.exit(0)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(), lambda _: self.changed())
        self.changed()

    def action_filter(self) -> None:
        field = self._filter
        field.add_class("shown")
        field.focus()
        self.changed()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.needle = event.value.strip()
        self._show()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self.needle = event.value.strip()
        self._filter.remove_class("shown")
        self._table.focus()
        self._show()

    def action_act(self, verb: str) -> None:
        name = self.selected
        if name is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._send(verb, name), exit_on_error=False)
            self.changed()

        self.push_screen(ConfirmScreen(f"{verb} {name}? y/n"), answered)
        self.changed()

    async def _send(self, verb: str, name: str) -> None:
        self.sent.append(f"{verb} {name}")
        try:
            result = await self.control.call(verb, {"services": [name], "wait": False})
        except ControlError as exc:
            self.notify(f"{verb} {name}: {exc}", severity="error")
            return
        for entry in result.get("services", []):
            self.board.update(entry)
        self._show()


def run_top(socket: Path, initial: Mapping[str, Any] | None = None) -> int:
    """Run ``top`` on the terminal until ``q``; returns the exit code (0)."""
    code = TopApp(socket, initial=initial).run()
    return 0 if code is None else code
