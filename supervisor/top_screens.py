"""The screens ``hostvisor top`` opens over its table: a y/n question, the keys, a log tail."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Log, Static

from supervisor.errors import ControlError, DaemonUnreachable, UnknownService
from supervisor.top_model import printable

if TYPE_CHECKING:
    from supervisor.top_client import AsyncControl

__all__ = ["KEYS", "ConfirmScreen", "HelpScreen", "LogScreen"]

#: What ``?`` lists: key, what it does.
KEYS = (
    ("up/down", "select a service"),
    ("enter", "follow the selected service's log (escape or q: back)"),
    ("s", "start the selected service (asks y/n)"),
    ("x", "stop the selected service (asks y/n)"),
    ("r", "restart the selected service (asks y/n)"),
    ("/", "filter by name (enter: keep, escape: clear)"),
    ("?", "this list"),
    ("q", "quit"),
)
#: Lines of the log shown before following it.
LOG_LINES = 200
#: Seconds between attempts to reach a daemon that went away.
RETRY = 1.0


class ConfirmScreen(ModalScreen[bool]):
    """``restart api? y/n``: dismissed with True on ``y``, False on any other key."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Static { width: auto; padding: 1 3; border: round $warning; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        yield Static(self.question, id="question", markup=False)

    def on_key(self, event: events.Key) -> None:
        event.stop()
        event.prevent_default()
        self.dismiss(event.key == "y")


class HelpScreen(ModalScreen[None]):
    """The keys; any key closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: auto; padding: 1 3; border: round $primary; }
    """

    def compose(self) -> ComposeResult:
        width = max(len(key) for key, _ in KEYS)
        lines = [f"{key:<{width}}  {what}" for key, what in KEYS]
        yield Static("\n".join(["keys", "", *lines, "", "any key: close"]), markup=False)

    def on_key(self, event: events.Key) -> None:
        event.stop()
        event.prevent_default()
        self.dismiss(None)


class LogScreen(Screen[None]):
    """The last :data:`LOG_LINES` lines of one service's log, then new ones as they come
    (the ``logs`` method with ``follow``); reconnects when the daemon comes back."""

    BINDINGS = [
        Binding("escape", "back", "back"),
        Binding("q", "back", "back", show=False),
    ]
    DEFAULT_CSS = """
    LogScreen > Vertical > #title { height: 1; background: $panel; }
    LogScreen > Vertical > #log-status { height: 1; color: $warning; }
    LogScreen Log { height: 1fr; }
    """

    def __init__(self, control: AsyncControl, service: str, changed: Any) -> None:
        super().__init__()
        self.control = control
        self.service = service
        self._changed = changed

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"log of {self.service} (escape or q: back)", id="title", markup=False)
            yield Static("", id="log-status", markup=False)
            yield Log(max_lines=10_000, auto_scroll=True)

    def on_mount(self) -> None:
        self.run_worker(self._follow(), name=f"logs {self.service}", exit_on_error=False)

    @property
    def lines(self) -> list[str]:
        """The lines shown so far."""
        return list(self.query_one(Log).lines)

    def action_back(self) -> None:
        self.dismiss(None)

    async def _follow(self) -> None:
        log, status = self.query_one(Log), self.query_one("#log-status", Static)
        params = {"service": self.service, "lines": LOG_LINES}
        while True:
            try:
                async with self.control.follow("logs", params) as feed:
                    status.update("")
                    log.clear()
                    log.write_lines([printable(str(x)) for x in feed.result.get("lines", [])])
                    self._changed()
                    async for item in feed:
                        line = item.get("line", "") if isinstance(item, dict) else ""
                        log.write_line(printable(str(line)))
                        self._changed()
            except UnknownService as exc:
                status.update(str(exc))
                self._changed()
                return
            except DaemonUnreachable:
                status.update("daemon unreachable, retrying")
            except ControlError as exc:
                status.update(f"the daemon answered: {exc}")
            self._changed()
            await asyncio.sleep(RETRY)  # the retry cadence, not a synchronisation
