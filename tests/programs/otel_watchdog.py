"""Runs Notifier.run_watchdog from the environment until killed (for test_notify)."""

import anyio

from supervisor.notify import Notifier


async def main() -> None:
    notifier = Notifier.from_environ()
    notifier.ready()
    await notifier.run_watchdog()
    await anyio.sleep_forever()


anyio.run(main)
