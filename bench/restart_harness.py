"""The restart-latency loop shared by ``bench_supervise.py restart`` and
``bench_scale.py restart``: a real :class:`~supervisor.daemon.Daemon` in this process,
its process driver's ``start`` wrapped to timestamp the moment ``Popen`` returned (the
replacement has exec'd), then SIGKILL of one service's main process at a time.

It imports ``supervisor`` only when called, from whatever ``sys.path`` the caller set up
(``bench_scale.py`` runs it in a fresh interpreter per tree under test)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio


async def restart_latencies(
    cfg: Path, n: int, *, kills: int | None = None, settle: float = 0.0, pause: float = 0.0
) -> list[float]:
    """Seconds from each SIGKILL to its replacement's exec, for the daemon of ``cfg``
    (its ``n`` services; state under ``cfg``'s folder). ``kills``: how many, spread over the services in
    name order (default: each service once); ``settle``: seconds to wait once all run;
    ``pause``: seconds after each replacement is running again. Ends the daemon with
    SIGTERM to this process."""
    from supervisor import config
    from supervisor.daemon import Daemon
    from supervisor.states import ServiceState

    loaded = config.load(cfg)
    daemon = Daemon(loaded, state_dir=cfg.parent / "state", socket_path=loaded.daemon.socket)
    spawned: dict[str, float] = {}
    original = daemon.process_driver.start

    async def timed_start(spec: Any, *, task_group: Any) -> Any:
        handle = await original(spec, task_group=task_group)
        spawned[spec.name] = time.perf_counter()  # Popen returned: the child has exec'd
        daemon.changed.fire()
        return handle

    daemon.process_driver.start = timed_start  # type: ignore[method-assign]
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.main)
        with anyio.fail_after(120):
            while len(daemon.supervisors) < n or any(
                s.state is not ServiceState.RUNNING for s in daemon.supervisors.values()
            ):
                await daemon.changed.wait()
        if settle:
            await anyio.sleep(settle)
        names = sorted(daemon.supervisors)
        count = len(names) if kills is None else kills
        step = max(1, len(names) // count)
        for k in range(count):
            name = names[(k * step) % len(names)]
            sup = daemon.supervisors[name]
            assert sup.handle is not None and sup.handle.pid is not None
            begin = time.perf_counter()
            os.kill(sup.handle.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                while spawned[name] < begin:
                    await daemon.changed.wait()
            latencies.append(spawned[name] - begin)
            with anyio.fail_after(10):
                while sup.state is not ServiceState.RUNNING:
                    await daemon.changed.wait()
            if pause:
                await anyio.sleep(pause)
        os.kill(os.getpid(), signal.SIGTERM)
    return latencies
