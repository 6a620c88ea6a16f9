"""A fake daemon for control-socket tests: a ControlTarget without processes.

Imported by tests (``FakeTarget``) and run as a program to serve it on a real
socket for CLI tests and for timing ``hostvisor status``::

    python ctl_fake_daemon.py SOCKET [--services N] [--stopped NAME]... [--fatal NAME]...
                              [--log-dir DIR] [--reject-reload]

Prints ``ready`` on stdout once the socket accepts connections, and serves
until killed. Services are ``svc000``, ``svc001``, ... and all run unless
named with ``--stopped``; a ``--fatal`` service ends ``fatal`` when started.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anyio

from supervisor.errors import ConfigRejected, ControlError, UnknownService
from supervisor.events import EventBus
from supervisor.logfiles import LogHub

Names = Sequence[str] | Literal["all"]


class FakeTarget:
    """Keeps a state per service; actions move it at once (wait or not)."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        log_dir: Path,
        stopped: Sequence[str] = (),
        fatal: Sequence[str] = (),
        reject_reload: bool = False,
    ) -> None:
        self.state = {n: ("stopped" if n in stopped else "running") for n in names}
        self.fatal = set(fatal)
        self.log_dir = log_dir
        self.reject_reload = reject_reload
        self.calls: list[tuple[str, Any]] = []
        self._hub = LogHub()
        self._bus = EventBus()

    @property
    def loghub(self) -> LogHub:
        return self._hub

    @property
    def bus(self) -> EventBus:
        return self._bus

    def _check(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return list(self.state)
        for name in names:
            if name not in self.state:
                raise UnknownService(f"unknown service: {name}")
        return list(names)

    def _entry(self, name: str) -> dict[str, Any]:
        running = self.state[name] == "running"
        return {
            "name": name,
            "kind": "process",
            "state": self.state[name],
            "health": "none",
            "pid": 10000 + sorted(self.state).index(name) if running else None,
            "container_id": None,
            "restarts": 0,
            "uptime_seconds": 125.0 if running else None,
            "last_exit": None if running else {"code": 0, "signal": None},
            "message": "gave up" if self.state[name] == "fatal" else "",
            "port": None,
        }

    def status(self, names: Sequence[str] | None) -> dict[str, Any]:
        self.calls.append(("status", names))
        daemon = {"pid": os.getpid(), "version": "0.1.0", "uptime_seconds": 1.0, "config": "/x"}
        return {"daemon": daemon, "services": [self._entry(n) for n in self._check(names)]}

    async def _act(self, verb: str, names: Names, wait: bool, timeout: float) -> dict[str, Any]:
        self.calls.append((verb, (names, wait, timeout)))
        chosen = self._check(None if names == "all" else names)
        for name in chosen:
            if verb == "stop":
                self.state[name] = "stopped"
            elif name in self.fatal:
                self.state[name] = "fatal" if wait else "starting"
            else:
                self.state[name] = "running" if wait else "starting"
            self._bus.publish(f"hostvisor.service.{self.state[name]}", service=name)
        return {"services": [self._entry(n) for n in chosen]}

    async def start(self, names: Names, *, wait: bool, timeout: float) -> dict[str, Any]:
        return await self._act("start", names, wait, timeout)

    async def stop(self, names: Names, *, wait: bool, timeout: float) -> dict[str, Any]:
        return await self._act("stop", names, wait, timeout)

    async def restart(self, names: Names, *, wait: bool, timeout: float) -> dict[str, Any]:
        return await self._act("restart", names, wait, timeout)

    async def signal(self, names: Sequence[str], sig: int, *, group: bool) -> dict[str, Any]:
        self.calls.append(("signal", (list(names), sig, group)))
        return {"services": [{**self._entry(n), "signalled": True} for n in self._check(names)]}

    async def refresh_resources(self, max_age: float) -> None:
        self.calls.append(("refresh_resources", max_age))

    def resources(self, names: Sequence[str] | None) -> dict[str, Any]:
        figures = {"cpu_percent": None, "memory_bytes": None, "processes": None}
        return {
            "time": "2026-01-01T00:00:00Z",
            "services": {n: dict(figures) for n in self._check(names)},
        }

    async def reload(self) -> dict[str, Any]:
        self.calls.append(("reload", None))
        if self.reject_reload:
            raise ConfigRejected(
                "config rejected",
                data=["units/web.toml: health.intervall: unknown key", "config.toml: bad"],
            )
        return {"added": ["new"], "removed": [], "changed": ["svc000"], "unchanged": ["svc001"]}

    async def reexec(self, connection: Any, request_id: Any) -> dict[str, Any]:
        """A fake cannot exec: it refuses, as a daemon whose installed code is broken."""
        self.calls.append(("reexec", None))
        raise ControlError("reexec refused: the installed hostvisor cannot start (fake)")

    def log_path(self, service: str | None) -> Path:
        if service is not None:
            self._check([service])
        return self.log_dir / f"{service or 'hostvisor'}.log"


def main(argv: Sequence[str]) -> None:
    from supervisor.control.server import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("socket", type=Path)
    parser.add_argument("--services", type=int, default=3)
    parser.add_argument("--stopped", action="append", default=[])
    parser.add_argument("--fatal", action="append", default=[])
    parser.add_argument("--log-dir", type=Path, default=Path("."))
    parser.add_argument("--reject-reload", action="store_true")
    args = parser.parse_args(argv)
    target = FakeTarget(
        [f"svc{i:03d}" for i in range(args.services)],
        log_dir=args.log_dir,
        stopped=args.stopped,
        fatal=args.fatal,
        reject_reload=args.reject_reload,
    )

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: serve(
                    target, args.socket, allow_uids=(), task_status=task_status
                )
            )
            print("ready", flush=True)

    anyio.run(run)


if __name__ == "__main__":
    main(sys.argv[1:])
