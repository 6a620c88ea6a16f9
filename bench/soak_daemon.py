"""`hostvisor run` for bench_soak.py, plus a thread that writes the event loop's task count
to ``<state>/tasks`` every 0.5 s (not a feature of hostvisor: a probe for the benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from pathlib import Path

from supervisor import config, daemon, rundaemon

_real_main = daemon.Daemon.main


async def _main(self: daemon.Daemon) -> None:
    loop = asyncio.get_running_loop()
    path = self.state_dir / "tasks"

    def count() -> None:
        while True:
            with contextlib.suppress(RuntimeError):  # the set changed while read here
                path.write_text(str(len(asyncio.all_tasks(loop))))
            time.sleep(0.5)

    threading.Thread(target=count, daemon=True).start()
    await _real_main(self)


daemon.Daemon.main = _main  # type: ignore[method-assign]
del config
sys.exit(rundaemon.run_daemon(config_path=Path(sys.argv[1])))
