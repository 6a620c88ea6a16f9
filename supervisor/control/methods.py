"""The server side of the control methods (contract section 8): what each one asks of the daemon.

The daemon implements :class:`ControlTarget`; this module only translates a
parsed :class:`~supervisor.control.protocol.Request` into calls on it.
:func:`dispatch` answers a request that is not followed; :func:`open_feed`
opens what a ``logs``/``events`` request with ``follow`` streams from. Framing,
connections and the bounds on slow clients are :mod:`supervisor.control.server`.

Every answer fits in one line (:data:`~supervisor.control.protocol.MAX_LINE`):
a log line is cut to 64 Ki characters and a list of lines or events keeps its
newest items.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio
from anyio.abc import ObjectReceiveStream

from supervisor.control.protocol import (
    INTERNAL_ERROR,
    MAX_LINE,
    Request,
    error_response,
    notification,
    response,
)
from supervisor.errors import ControlError
from supervisor.events import Event, EventBus

__all__ = [
    "HANDLERS",
    "ControlTarget",
    "Feed",
    "LogFeed",
    "dispatch",
    "dispatch_reexec",
    "open_feed",
]

log = logging.getLogger(__name__)

#: A log line is cut to this many characters, so that any one fits in a message.
_MAX_LOG_CHARS = 64 * 1024


class LogFeed(Protocol):
    """What the server needs of :class:`supervisor.logfiles.LogHub`."""

    def subscribe(self, key: str | None) -> AbstractAsyncContextManager[ObjectReceiveStream[str]]:
        """Receive the lines of service ``key`` (``None``: the daemon log) from now on."""
        ...


class ControlTarget(Protocol):
    """What the daemon offers the control socket. Each method may raise UnknownService."""

    def status(self, names: Sequence[str] | None) -> dict[str, Any]:
        """Contract section 5 document. Raises UnknownService for an unknown name."""
        ...

    async def start(
        self, names: Sequence[str] | Literal["all"], *, wait: bool, timeout: float
    ) -> dict[str, Any]:
        """``{"services": [status entries]}`` once started (or timed out, with ``wait``)."""
        ...

    async def stop(
        self, names: Sequence[str] | Literal["all"], *, wait: bool, timeout: float
    ) -> dict[str, Any]:
        """``{"services": [status entries]}`` once stopped (or timed out, with ``wait``)."""
        ...

    async def restart(
        self, names: Sequence[str] | Literal["all"], *, wait: bool, timeout: float
    ) -> dict[str, Any]:
        """``{"services": [status entries]}`` once restarted (or timed out, with ``wait``)."""
        ...

    async def signal(self, names: Sequence[str], sig: int, *, group: bool) -> dict[str, Any]:
        """``{"services": [status entries, each with "signalled": bool]}`` once ``sig``
        was sent to each running instance's main process (or ``group``)."""
        ...

    async def reexec(self, connection: socket.socket, request_id: Any) -> dict[str, Any]:
        """Re-execute the daemon in place; the NEW code answers ``request_id`` on
        ``connection`` (kept across ``exec``), so this returns only on failure, raising
        ControlError (ConfigRejected when the new code rejects the config)."""
        ...

    async def reload(self) -> dict[str, Any]:
        """``{"added","removed","changed","unchanged"}``; raises ConfigRejected(data=[str])."""
        ...

    async def refresh_resources(self, max_age: float) -> None:
        """Sample CPU and memory unless the last sample is at most ``max_age`` s old."""
        ...

    def resources(self, names: Sequence[str] | None) -> dict[str, Any]:
        """``{"time", "services": {name: {cpu_percent, memory_bytes, processes}}}``."""
        ...

    def log_path(self, service: str | None) -> Path:
        """The log file of ``service``; ``None`` is the daemon log."""
        ...

    @property
    def loghub(self) -> LogFeed:
        """Live log lines by service."""
        ...

    @property
    def bus(self) -> EventBus:
        """The event bus: ``recent(since=)`` and ``subscribe()``."""
        ...


# --------------------------------------------------------------------------- one answer


async def dispatch(target: ControlTarget, req: Request) -> dict[str, Any]:
    """The response to a request that is not followed: a result, or an error object.

    A :class:`~supervisor.errors.ControlError` becomes its own code and message;
    any other exception is logged and answered with -32603 (internal error).
    Cancellation propagates (the caller answers "shutting down").
    """
    try:
        result = await HANDLERS[req.method.name](target, req.params)
    except ControlError as exc:
        return error_response(req.id, exc.code, str(exc), exc.data)
    except Exception as exc:
        log.exception("control socket: %s failed", req.method.name)
        return error_response(req.id, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    return response(req.id, result)


async def dispatch_reexec(
    target: ControlTarget, req: Request, connection: socket.socket
) -> dict[str, Any]:
    """:func:`dispatch` for ``reexec``, which needs the connection it is asked on: the
    answer comes from the new code after ``exec``; what returns here is a failure."""
    try:
        result = await target.reexec(connection, req.id)
    except ControlError as exc:
        return error_response(req.id, exc.code, str(exc), exc.data)
    except Exception as exc:
        log.exception("control socket: reexec failed")
        return error_response(req.id, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    return response(req.id, result)


async def _status(target: ControlTarget, params: dict[str, Any]) -> Any:
    await target.refresh_resources(2.0)
    return target.status(params["services"])


async def _resources(target: ControlTarget, params: dict[str, Any]) -> Any:
    if params["services"]:  # an unknown name fails before any sample
        target.resources(params["services"])
    await target.refresh_resources(params["max_age"])
    return target.resources(params["services"])


async def _start(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.start(params["services"], wait=params["wait"], timeout=params["timeout"])


async def _stop(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.stop(params["services"], wait=params["wait"], timeout=params["timeout"])


async def _restart(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.restart(params["services"], wait=params["wait"], timeout=params["timeout"])


async def _signal(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.signal(params["services"], params["signal"], group=params["group"])


async def _reload(target: ControlTarget, params: dict[str, Any]) -> Any:
    return await target.reload()


async def _logs(target: ControlTarget, params: dict[str, Any]) -> Any:
    return {"lines": await _tail(target.log_path(params["service"]), params["lines"])}


async def _events(target: ControlTarget, params: dict[str, Any]) -> Any:
    return {"events": _fit([e.as_json() for e in target.bus.recent(since=params["since"])])}


#: The server side of :data:`supervisor.control.protocol.METHODS`.
HANDLERS: dict[str, Callable[[ControlTarget, dict[str, Any]], Awaitable[Any]]] = {
    "status": _status,
    "start": _start,
    "stop": _stop,
    "restart": _restart,
    "reload": _reload,
    "signal": _signal,
    "reexec": _reload,  # not reached: the server calls dispatch_reexec
    "logs": _logs,
    "events": _events,
    "resources": _resources,
}


# --------------------------------------------------------------------------- following


@dataclass(frozen=True, slots=True, kw_only=True)
class Feed:
    """What a followed request sends: ``first``, then ``messages`` as they come.

    ``marker(count)`` is the notification that stands for ``count`` messages a
    slow client missed (``None``: skipped messages are not marked).
    """

    first: dict[str, Any]
    messages: AsyncIterator[dict[str, Any]]
    marker: Callable[[int], dict[str, Any]] | None


@asynccontextmanager
async def open_feed(target: ControlTarget, req: Request) -> AsyncIterator[Feed]:
    """Subscribe for a ``logs``/``events`` request with ``follow``; unsubscribe on exit.

    The subscription is opened before the recent lines or events are read, so
    nothing falls between the result and the first notification.

    Raises:
        ControlError: ``logs`` of an unknown service (before anything is opened).
    """
    if req.method.name == "events":
        async with target.bus.subscribe() as events:
            since = req.params["since"]
            recent = target.bus.recent(since=since)
            after = recent[-1].seq if recent else (since or 0)
            first = response(req.id, {"events": _fit([e.as_json() for e in recent])})
            yield Feed(first=first, messages=_event_notifications(events, after), marker=None)
        return
    service = req.params["service"]
    path = target.log_path(service)
    async with target.loghub.subscribe(service) as lines:
        first = response(req.id, {"lines": await _tail(path, req.params["lines"])})
        yield Feed(
            first=first,
            messages=_log_notifications(lines, service),
            marker=partial(_skipped_lines, service),
        )


def _skipped_lines(service: str | None, count: int) -> dict[str, Any]:
    """The ``log`` notification that stands for ``count`` lines a slow client missed."""
    line = f"[hostvisor: {count} lines skipped: this client read too slowly]"
    return notification("log", {"service": service, "line": line})


async def _log_notifications(
    lines: ObjectReceiveStream[str], service: str | None
) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        yield notification("log", {"service": service, "line": line[:_MAX_LOG_CHARS]})


async def _event_notifications(
    events: ObjectReceiveStream[Event], after: int
) -> AsyncIterator[dict[str, Any]]:
    async for event in events:
        if event.seq > after:
            yield notification("event", event.as_json())


# --------------------------------------------------------------------------- fitting a line


def _fit(items: list[Any]) -> list[Any]:
    """The newest ``items`` whose JSON fits in one response line (oldest dropped first)."""
    budget = MAX_LINE - 4096
    kept: list[Any] = []
    for item in reversed(items):
        budget -= len(json.dumps(item, ensure_ascii=False).encode("utf-8", "replace")) + 1
        if budget < 0:
            break
        kept.append(item)
    kept.reverse()
    return kept


async def _tail(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of ``path`` (``[]`` if it does not exist), fitted to a line."""

    def read() -> list[str]:
        from supervisor.logfiles import tail

        try:
            lines = tail(path, count) if count else []
        except FileNotFoundError:
            return []
        return _fit([line[:_MAX_LOG_CHARS] for line in lines])

    return await anyio.to_thread.run_sync(read)
