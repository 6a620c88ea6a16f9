"""Review of issue 12 (``hostvisor top``): what a hostile service can put on the screen."""

from __future__ import annotations

import json
from pathlib import Path

from supervisor.top import TopApp
from supervisor.top_screens import LogScreen
from tests.daemon_harness import PY, daemon

#: Prints a line full of terminal escapes (clear screen, window title, cursor move,
#: colour, 8-bit CSI, BEL, a carriage return) every 0.2 s.
HOSTILE = (
    "import time\n"
    "while True:\n"
    "    print('A\\x1b[2J\\x1b]0;pwned\\x07 \\x1b[31mred\\x1b[0m \\x1b[10;10HJUMP"
    "\\x9b2J\\tTAB\\rCR\\x1b]52;c;cHduZWQ=\\x1b\\\\END', flush=True)\n"
    "    time.sleep(0.2)\n"
)


async def test_log_tail_never_passes_terminal_escapes(tmp_path: Path) -> None:
    """A log line's escape sequences and control characters are not written to the
    terminal (they would clear it, retitle it, move the cursor, set the clipboard);
    the text around them stays readable."""
    text = f'command = {json.dumps([PY, "-u", "-c", HOSTILE])}\nstop_timeout = "5s"\n'
    with daemon(tmp_path, units={"evil": text}) as d:
        d.wait_state("evil", "running")
        app = TopApp(d.socket)
        async with app.run_test(size=(160, 40)) as pilot:
            await app.wait_for(lambda: app.selected == "evil")
            await pilot.press("enter")
            await app.wait_for(lambda: isinstance(app.screen, LogScreen))
            screen = app.screen
            assert isinstance(screen, LogScreen)
            await app.wait_for(lambda: any("END" in line for line in screen.lines))
            shown = [line for line in screen.lines if "END" in line]
            for line in shown:
                bad = [c for c in line if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0]
                assert not bad, repr(line)
                assert "red" in line and "JUMP" in line and "TAB" in line
                assert "pwned" not in line and "cHduZWQ" not in line
