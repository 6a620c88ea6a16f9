"""`hostvisor run` with a bug planted in the daemon itself: once every service is running,
the STATUS notifier task raises. Used to check the last line of defence (issue 9 item 2)."""

import sys
from pathlib import Path

from supervisor import daemon, rundaemon
from supervisor.states import ServiceState


async def _buggy_status(self: daemon.Daemon, notifier: object) -> None:
    while not self.supervisors or any(
        sup.state is not ServiceState.RUNNING for sup in self.supervisors.values()
    ):
        await self.changed.wait()
    raise RuntimeError("planted bug")


daemon.Daemon._notify_status = _buggy_status  # type: ignore[method-assign]
sys.exit(rundaemon.run_daemon(config_path=Path(sys.argv[1])))
