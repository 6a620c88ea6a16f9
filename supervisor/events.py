"""Event records and the in-process event bus.

An event is the object of contract section 6::

    {"seq": 7, "time": "2026-11-21T10:00:00.123456Z", "event": "hostvisor.service.exited",
     "service": "api", "message": "exit code 1", "attributes": {"process.exit.code": 1}}

The :class:`EventBus` numbers events, keeps the last ``history`` of them for
``hostvisor events``, and fans each one out to subscribers through bounded
memory streams. A publisher never blocks: a subscriber that falls behind loses
events (counted in :attr:`EventBus.dropped`), and the supervision that
publishes is never slowed by a slow sink.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "EVENT_NAMES",
    "LOGS_DROPPED",
    "LOGS_DROPPED_BYTES",
    "LOGS_DROPPED_LINES",
    "SEVERITY",
    "SHORT_SECRET",
    "Event",
    "EventBus",
    "Redactor",
    "rfc3339",
]

#: Every event name of contract section 6.
DAEMON_STARTED: Final = "hostvisor.daemon.started"
DAEMON_STOPPING: Final = "hostvisor.daemon.stopping"
DAEMON_RELOADED: Final = "hostvisor.daemon.reloaded"
CONFIG_REJECTED: Final = "hostvisor.config.rejected"
SERVICE_STARTING: Final = "hostvisor.service.starting"
SERVICE_RUNNING: Final = "hostvisor.service.running"
SERVICE_STOPPED: Final = "hostvisor.service.stopped"
SERVICE_EXITED: Final = "hostvisor.service.exited"
SERVICE_BACKOFF: Final = "hostvisor.service.backoff"
SERVICE_FATAL: Final = "hostvisor.service.fatal"
SERVICE_ADOPTED: Final = "hostvisor.service.adopted"
PREFLIGHT_FAILED: Final = "hostvisor.preflight.failed"
HEALTH_CHANGED: Final = "hostvisor.health.changed"
HEALTH_CHECK_RESTART: Final = "hostvisor.health_check.restart"
PORT_RECLAIMED: Final = "hostvisor.port.reclaimed"
PORT_BLOCKED: Final = "hostvisor.port.blocked"
POST_START_FAILED: Final = "hostvisor.post_start.failed"
DOCKER_DISCONNECTED: Final = "hostvisor.docker.disconnected"
DOCKER_RECONNECTED: Final = "hostvisor.docker.reconnected"
LOGS_DROPPED: Final = "hostvisor.logs.dropped"
MEMORY_EXCEEDED: Final = "hostvisor.service.memory_exceeded"
JOB_TRIGGERED: Final = "hostvisor.job.triggered"
JOB_SKIPPED: Final = "hostvisor.job.skipped"
JOB_SUCCEEDED: Final = "hostvisor.job.succeeded"
JOB_FAILED: Final = "hostvisor.job.failed"
JOB_TIMED_OUT: Final = "hostvisor.job.timed_out"
#: The ``[on_failure]`` hook itself failed (it never triggers another hook).
ON_FAILURE_FAILED: Final = "hostvisor.on_failure.failed"

#: Attributes of ``hostvisor.logs.dropped`` (see :class:`supervisor.logfiles.DropReport`):
#: bytes and lines dropped since the previous report of the same log.
LOGS_DROPPED_BYTES: Final = "hostvisor.logs.dropped_bytes"
LOGS_DROPPED_LINES: Final = "hostvisor.logs.dropped_lines"

#: Severity of each event (OpenTelemetry severity text; the daemon log's ``level``).
SEVERITY: Final[Mapping[str, str]] = {
    DAEMON_STARTED: "INFO",
    DAEMON_STOPPING: "INFO",
    DAEMON_RELOADED: "INFO",
    CONFIG_REJECTED: "ERROR",
    SERVICE_STARTING: "INFO",
    SERVICE_RUNNING: "INFO",
    SERVICE_STOPPED: "INFO",
    SERVICE_EXITED: "WARN",
    SERVICE_BACKOFF: "WARN",
    SERVICE_FATAL: "ERROR",
    SERVICE_ADOPTED: "INFO",
    PREFLIGHT_FAILED: "WARN",
    HEALTH_CHANGED: "WARN",
    HEALTH_CHECK_RESTART: "WARN",
    PORT_RECLAIMED: "WARN",
    PORT_BLOCKED: "WARN",
    POST_START_FAILED: "WARN",
    DOCKER_DISCONNECTED: "ERROR",
    DOCKER_RECONNECTED: "INFO",
    LOGS_DROPPED: "WARN",
    MEMORY_EXCEEDED: "WARN",
    JOB_TRIGGERED: "INFO",
    JOB_SKIPPED: "WARN",
    JOB_SUCCEEDED: "INFO",
    JOB_FAILED: "ERROR",
    JOB_TIMED_OUT: "ERROR",
    ON_FAILURE_FAILED: "ERROR",
}

EVENT_NAMES: Final[frozenset[str]] = frozenset(SEVERITY)

#: Secrets of at least this many characters are redacted wherever they occur;
#: shorter ones only as whole tokens (see :class:`Redactor`).
SHORT_SECRET: Final = 8
#: Secrets shorter than this are not redacted at all (see :class:`Redactor`).
_TINY_SECRET: Final = 3

AttributeValue = str | int | float | bool | list[str] | None


def rfc3339(moment: datetime) -> str:
    """``moment`` as an RFC 3339 UTC time with microseconds: ``2026-12-02T01:30:00.000000Z``
    (the ``time`` of events; the job status fields)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_rfc3339 = rfc3339


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One event (contract section 6). ``time`` is wall-clock UTC, for people and collectors."""

    seq: int
    time: datetime
    event: str
    service: str | None
    message: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        """``INFO``, ``WARN`` or ``ERROR`` (see :data:`SEVERITY`)."""
        return SEVERITY.get(self.event, "INFO")

    def as_json(self) -> dict[str, Any]:
        """The JSON object of contract section 6, with ``time`` as RFC 3339."""
        return {
            "seq": self.seq,
            "time": _rfc3339(self.time),
            "event": self.event,
            "service": self.service,
            "message": self.message,
            "attributes": dict(self.attributes),
        }


class Redactor:
    """Replaces secret values (from ``env`` and ``env_files``) with ``***``.

    A value of :data:`SHORT_SECRET` characters or more is replaced wherever it
    occurs. A shorter one (``PIN=4821``, ``MYSQL_PWD=hunter2``) only where it is a
    whole token, not next to a letter, digit or ``_``: ``pin 4821`` becomes
    ``pin ***`` but pid ``14821`` stays. Values of one or two characters are
    never redacted: they cannot be secret (at most a few thousand guesses), and
    hiding ``1`` would hide every exit code. Which values are secret is
    :meth:`supervisor.spec.ServiceSpec.secret_values`'s choice.

    The set of secrets is replaced wholesale at every (re)load, so a value that
    is no longer configured is no longer hidden.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self._short: re.Pattern[str] | None = None
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        """Set the secrets; longest first so that no partial secret is left behind."""
        kept = sorted({s for s in secrets if len(s) >= _TINY_SECRET}, key=len, reverse=True)
        self._secrets = tuple(s for s in kept if len(s) >= SHORT_SECRET)
        short = [re.escape(s) for s in kept if len(s) < SHORT_SECRET]
        self._short = re.compile(rf"(?<!\w)(?:{'|'.join(short)})(?!\w)") if short else None

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        if self._short is not None:
            text = self._short.sub("***", text)
        return text

    def value(self, value: AttributeValue) -> AttributeValue:
        """Redact an attribute value (strings and lists of strings)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value


class EventBus:
    """Numbers, keeps and fans out events; never blocks a publisher.

    Args:
        history: how many recent events to keep for ``events`` (default 1000).
        redactor: applied to every message and attribute before anyone sees it.
    """

    def __init__(self, *, history: int = 1000, redactor: Redactor | None = None) -> None:
        self._seq = 0
        self._history: deque[Event] = deque(maxlen=history)
        self._subscribers: set[MemoryObjectSendStream[Event]] = set()
        self.redactor = redactor or Redactor()
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<EventBus seq={self._seq} subscribers={len(self._subscribers)}>"

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last event published (0 before the first)."""
        return self._seq

    def continue_from(self, seq: int) -> None:
        """Number the next event ``seq + 1`` (after a re-exec: ``events --since`` goes on)."""
        self._seq = max(self._seq, seq)

    def publish(
        self,
        name: str,
        *,
        service: str | None = None,
        message: str = "",
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Event:
        """Record an event and hand it to every subscriber; returns the event.

        Raises:
            ValueError: ``name`` is not an event of contract section 6.
        """
        if name not in EVENT_NAMES:
            raise ValueError(f"unknown event name {name!r}")
        self._seq += 1
        attrs: dict[str, AttributeValue] = {}
        if service is not None:
            attrs["hostvisor.service.name"] = service
        for key, value in (attributes or {}).items():
            attrs[key] = self.redactor.value(value)
        event = Event(
            seq=self._seq,
            time=datetime.now(UTC),
            event=name,
            service=service,
            message=self.redactor(message),
            attributes=attrs,
        )
        self._history.append(event)
        for stream in tuple(self._subscribers):
            try:
                stream.send_nowait(event)
            except anyio.WouldBlock:
                self.dropped += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(stream)
        return event

    def recent(self, *, since: int | None = None, limit: int | None = None) -> list[Event]:
        """Kept events with ``seq > since`` (all kept when ``since`` is None), oldest first."""
        events = [e for e in self._history if since is None or e.seq > since]
        if limit is not None:
            events = events[-limit:]
        return events

    @asynccontextmanager
    async def subscribe(
        self, *, buffer: int = 1024
    ) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        """Receive every event published while the context is open.

        Args:
            buffer: events held for a slow reader before new ones are dropped.
        """
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        self._subscribers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
