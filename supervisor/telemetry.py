"""OpenTelemetry export of events (as log records) and metrics over OTLP.

The only module that imports ``opentelemetry``, and only inside
:func:`open_telemetry` when ``[telemetry] enabled = true``: a disabled daemon
never loads the SDK, and only the exporter of the protocol in use is imported.

Events. Every event of contract section 6 becomes one log record emitted with
``Logger.emit(event_name=...)`` (OpenTelemetry 1.44 removed the Events API):
``event_name`` is the event's name, severity ``INFO``/``WARN``/``ERROR``, the body
its message, the attributes its attributes plus ``hostvisor.event.seq``.

Metrics (names and units per the OpenTelemetry semantic-convention guidelines):

================================  ===============  ======================================
name (unit)                       instrument       attributes
================================  ===============  ======================================
hostvisor.service.restarts        counter          hostvisor.service.name; one per
({restart})                                        ``hostvisor.service.backoff`` event, i.e.
                                                   each automatic restart scheduled after a
                                                   crash, failed start or failing health
                                                   check (manual restarts are not counted)
hostvisor.service.exits ({exit})  counter          hostvisor.service.name, and
                                                   process.exit.code or hostvisor.exit.signal
hostvisor.service.up (1)          gauge            hostvisor.service.name; 1 when running and
                                                   not unhealthy, else 0
hostvisor.service.state (1)       gauge            hostvisor.service.name,
                                                   hostvisor.service.state; 1 for the current
                                                   state, 0 for the others (like hw.status)
hostvisor.health_check.duration   histogram        hostvisor.service.name,
(s)                                                hostvisor.health_check.success (bool)
hostvisor.logs.dropped (By)       counter          hostvisor.service.name (none for the
                                                   daemon's own log), error.type (ENOSPC,
                                                   EFBIG, EIO, backlog...); log bytes
                                                   dropped, from the
                                                   ``hostvisor.logs.dropped`` events
hostvisor.telemetry.dropped       counter          error.type: ``bus_overflow`` (the bus
({record})                                         dropped events for us), ``queue_full``,
                                                   ``export_failed``, ``emit_failed``
hostvisor.job.run.duration (s)    histogram        hostvisor.service.name,
                                                   hostvisor.job.outcome (``succeeded``,
                                                   ``failed``, ``timed_out``); the
                                                   ``hostvisor.job.duration_s`` of each
                                                   ``hostvisor.job.<outcome>`` event
hostvisor.job.runs ({run})        counter          the same; one per ended run
hostvisor.job.skipped             counter          hostvisor.service.name,
({trigger})                                        hostvisor.job.skip_reason (``running``
                                                   or ``missed``); one per
                                                   ``hostvisor.job.skipped`` event
process.cpu.utilization (1)       gauge            hostvisor.service.name; the tree's CPU
                                                   time delta / (elapsed x logical CPUs)
process.cpu.time (s)              observable       hostvisor.service.name, cpu.mode
                                  counter          (``user``, ``system``); accumulated over
                                                   every instance, so it only grows
process.memory.usage (By)         observable up-   hostvisor.service.name; resident memory
                                  down counter     summed over the tree
hostvisor.service.gpu.memory      observable up-   hostvisor.service.name; GPU memory of the
.usage (By)                       down counter     tree (only where NVML works)
================================  ===============  ======================================

The resource metrics (names and units of the semantic conventions' ``process.*``
metrics) report the last sample of :mod:`supervisor.resources`; the daemon samples at
the metric export interval while telemetry is on and hands the result over with
:meth:`Telemetry.update_resources`.

The job metrics never carry ``hostvisor.job.run`` (the run number): one time
series per run would grow without bound.

Resource: ``service.name`` (``OTEL_SERVICE_NAME``, else ``service.name`` in
``OTEL_RESOURCE_ATTRIBUTES``, else ``hostvisor``), ``service.version``,
``service.instance.id`` (a uuid4 per run), ``host.name``, and the rest of
``OTEL_RESOURCE_ATTRIBUTES``.

Never in the way: records go into the SDK's bounded batch queue (emitting is a
deque append on the event loop); the SDK's own threads export, each export
bounded by ``export_timeout``; when the queue is full a record is dropped and
counted. Leaving :func:`open_telemetry` flushes for at most
``export_timeout + 0.5`` seconds, then abandons the exporter threads (daemon
threads, so they never hold up the process's exit).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
from anyio.abc import ObjectReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream

from supervisor.events import (
    LOGS_DROPPED,
    LOGS_DROPPED_BYTES,
    SERVICE_BACKOFF,
    SERVICE_EXITED,
    Event,
    EventBus,
)
from supervisor.spec import TelemetrySpec
from supervisor.states import Health, ServiceState
from supervisor.telemetry_settings import ExportSettings, Signal, Target, resolve_export

if TYPE_CHECKING:
    from opentelemetry._logs import Logger
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk.metrics import MeterProvider

__all__ = [
    "SUBSCRIPTION_BUFFER",
    "ExportSettings",
    "Snapshot",
    "Target",
    "Telemetry",
    "open_telemetry",
    "resolve_export",
]

#: What the daemon reports for the gauges: service name -> (state, health).
Snapshot = Callable[[], Mapping[str, tuple[ServiceState, Health]]]

#: Events the bus holds for telemetry before it drops (counted as ``bus_overflow``).
SUBSCRIPTION_BUFFER: Final = 1024
#: Upper bound of the delay between a state change and the gauges seeing it,
#: when no event announces it (seconds).
_SAMPLE_EVERY: Final = 5.0
#: Histogram buckets for probe durations in seconds (the semantic conventions'
#: advice for ``http.client.request.duration``).
_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: Histogram buckets for job runs in seconds: from a sub-second script to an
#: hour-long backup, with the minute marks that ``run_timeout`` is usually set to.
_JOB_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

RESTARTS: Final = "hostvisor.service.restarts"
EXITS: Final = "hostvisor.service.exits"
UP: Final = "hostvisor.service.up"
STATE: Final = "hostvisor.service.state"
PROBE_DURATION: Final = "hostvisor.health_check.duration"
DROPPED: Final = "hostvisor.telemetry.dropped"
LOG_BYTES_DROPPED: Final = "hostvisor.logs.dropped"
JOB_RUN_DURATION: Final = "hostvisor.job.run.duration"
JOB_RUNS: Final = "hostvisor.job.runs"
JOB_SKIPS: Final = "hostvisor.job.skipped"
CPU_UTILIZATION: Final = "process.cpu.utilization"
CPU_TIME: Final = "process.cpu.time"
MEMORY_USAGE: Final = "process.memory.usage"
GPU_MEMORY_USAGE: Final = "hostvisor.service.gpu.memory.usage"
_SERVICE: Final = "hostvisor.service.name"
_OUTCOME: Final = "hostvisor.job.outcome"
_SKIP_REASON: Final = "hostvisor.job.skip_reason"
_DURATION: Final = "hostvisor.job.duration_s"
#: The job events that end a run (issue 11), with the outcome each one reports.
_OUTCOMES: Final = {
    "hostvisor.job.succeeded": "succeeded",
    "hostvisor.job.failed": "failed",
    "hostvisor.job.timed_out": "timed_out",
}
_JOB_SKIPPED: Final = "hostvisor.job.skipped"


class _CountingExporter:
    """Wraps the OTLP log exporter: counts records handed over and records lost.

    It runs in the SDK's export thread. ``handed`` lets :class:`Telemetry` keep
    its own count of what is still queued, so it drops (and counts) before the
    SDK's queue would drop silently.
    """

    def __init__(self, inner: Any, on_failed: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_failed = on_failed
        self.handed = 0  # written by the export thread only

    def export(self, batch: Sequence[Any]) -> Any:
        self.handed += len(batch)
        result = self._inner.export(batch)
        if getattr(result, "name", "") != "SUCCESS":
            self._on_failed(len(batch))
        return result

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
        self._inner.shutdown()


class Telemetry:
    """Turns events into log records and metrics; built by :func:`open_telemetry`.

    Attributes:
        emitted: log records handed to the SDK.
    """

    def __init__(self, *, logger: Logger, meter: Meter, snapshot: Snapshot, max_queue: int) -> None:
        from opentelemetry._logs import SeverityNumber
        from opentelemetry.metrics import Observation

        self._logger = logger
        self._snapshot = snapshot
        self._max_queue = max_queue
        self._observation = Observation
        self._severity = SeverityNumber  # members are named DEBUG, INFO, WARN, ERROR
        self._states: Mapping[str, tuple[ServiceState, Health]] = {}
        self._usage: Mapping[str, Any] = {}  # service -> daemon_resources.Usage
        #: Seconds between metric exports: the daemon samples resources this often.
        self.metric_interval = 60.0
        self._last_seq: int | None = None
        self._drops: Counter[str] = Counter()
        self._lock = threading.Lock()  # drops come from the loop and the export thread
        self._exporter: _CountingExporter | None = None
        self.emitted = 0
        self._restarts = meter.create_counter(RESTARTS, "{restart}", "Automatic restarts scheduled")
        self._exits = meter.create_counter(EXITS, "{exit}", "Process or container exits")
        self._probe = meter.create_histogram(
            PROBE_DURATION,
            "s",
            "Duration of health-check probes",
            explicit_bucket_boundaries_advisory=_BUCKETS,
        )
        self._dropped = meter.create_counter(DROPPED, "{record}", "Telemetry records dropped")
        self._log_drops = meter.create_counter(
            LOG_BYTES_DROPPED, "By", "Log bytes dropped (disk full, file size limit, hung disk)"
        )
        self._job_duration = meter.create_histogram(
            JOB_RUN_DURATION,
            "s",
            "Duration of job runs",
            explicit_bucket_boundaries_advisory=_JOB_BUCKETS,
        )
        self._job_runs = meter.create_counter(JOB_RUNS, "{run}", "Job runs by outcome")
        self._job_skips = meter.create_counter(JOB_SKIPS, "{trigger}", "Job triggers skipped")
        meter.create_observable_gauge(
            UP, [self._observe_up], "1", "1 when running and not unhealthy"
        )
        meter.create_observable_gauge(STATE, [self._observe_state], "1", "1 for the current state")
        self._cpus = os.cpu_count() or 1
        meter.create_observable_gauge(
            CPU_UTILIZATION, [self._observe_cpu], "1", "CPU time / (elapsed x logical CPUs)"
        )
        meter.create_observable_counter(CPU_TIME, [self._observe_cpu_time], "s", "CPU seconds")
        meter.create_observable_up_down_counter(
            MEMORY_USAGE, [self._observe_memory], "By", "Resident memory of the tree"
        )
        meter.create_observable_up_down_counter(
            GPU_MEMORY_USAGE, [self._observe_gpu], "By", "GPU memory of the tree"
        )

    def __repr__(self) -> str:
        return f"<Telemetry emitted={self.emitted} dropped={self.dropped}>"

    @property
    def dropped(self) -> int:
        """Log records lost for any reason (see ``hostvisor.telemetry.dropped``)."""
        with self._lock:
            return sum(self._drops.values())

    def drops(self) -> dict[str, int]:
        """Dropped records by reason (``bus_overflow``, ``queue_full``, ...)."""
        with self._lock:
            return dict(self._drops)

    def record_probe(self, service: str, seconds: float, ok: bool) -> None:
        """Record one health-check probe of ``seconds`` (``hostvisor.health_check.duration``)."""
        self._probe.record(seconds, {_SERVICE: service, "hostvisor.health_check.success": ok})

    def handle(self, event: Event) -> None:
        """Emit one event as a log record and update the counters; never raises."""
        if self._last_seq is not None and event.seq > self._last_seq + 1:
            self._drop("bus_overflow", event.seq - self._last_seq - 1)
        self._last_seq = event.seq
        try:
            self._count(event)
            self.refresh()
            queued = self.emitted - (self._exporter.handed if self._exporter else 0)
            if queued >= self._max_queue:
                self._drop("queue_full", 1)
                return
            attributes: dict[str, Any] = {
                k: v for k, v in event.attributes.items() if v is not None
            }
            attributes["hostvisor.event.seq"] = event.seq
            self._logger.emit(
                timestamp=int(event.time.timestamp() * 1_000_000) * 1000,
                severity_number=self._severity[event.severity],
                severity_text=event.severity,
                body=event.message,
                attributes=attributes,
                event_name=event.event,
            )
            self.emitted += 1
        except Exception:  # a telemetry bug must not stop supervision
            self._drop("emit_failed", 1)

    def refresh(self) -> None:
        """Re-read the snapshot that the gauges report (on the event loop)."""
        try:
            self._states = dict(self._snapshot())
        except Exception:  # the gauges keep the last good snapshot
            return

    def _count(self, event: Event) -> None:
        service = {_SERVICE: event.service} if event.service else {}
        if event.event == SERVICE_BACKOFF:
            self._restarts.add(1, service)
        elif event.event == SERVICE_EXITED:
            attributes: dict[str, Any] = dict(service)
            for key in ("process.exit.code", "hostvisor.exit.signal"):
                if event.attributes.get(key) is not None:
                    attributes[key] = event.attributes[key]
            self._exits.add(1, attributes)
        elif event.event == LOGS_DROPPED:
            size = event.attributes.get(LOGS_DROPPED_BYTES)
            if isinstance(size, int) and size > 0:
                kind = event.attributes.get("error.type")
                self._log_drops.add(size, {**service, "error.type": str(kind or "unknown")})
        elif event.event in _OUTCOMES or event.event == _JOB_SKIPPED:
            self._count_job(event, service)

    def _count_job(self, event: Event, service: dict[str, Any]) -> None:
        """A run's outcome and duration, or a skipped trigger; a bad duration is not recorded."""
        if event.event == _JOB_SKIPPED:
            reason = event.attributes.get(_SKIP_REASON)
            self._job_skips.add(1, {**service, _SKIP_REASON: str(reason or "unknown")})
            return
        attributes = {**service, _OUTCOME: _OUTCOMES[event.event]}
        self._job_runs.add(1, attributes)
        seconds = event.attributes.get(_DURATION)
        # The bus turns inf and NaN into strings; a bool is an int, not a duration.
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            self._job_duration.record(seconds, attributes)

    def _drop(self, reason: str, count: int) -> None:
        with self._lock:
            self._drops[reason] += count
        self._dropped.add(count, {"error.type": reason})

    # Gauge callbacks run in the SDK's metric thread: they only read the
    # snapshot that refresh() replaced wholesale on the event loop.
    def _observe_up(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(
                int(state == ServiceState.RUNNING and health != Health.UNHEALTHY),
                {_SERVICE: name},
            )
            for name, (state, health) in self._states.items()
        ]

    def update_resources(self, usage: Mapping[str, Any]) -> None:
        """Replace (on the event loop) what the resource metrics report: service ->
        :class:`supervisor.daemon_resources.Usage`."""
        self._usage = dict(usage)

    def _observe_cpu(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(u.figures.cpu_percent / 100 / self._cpus, {_SERVICE: name})
            for name, u in self._usage.items()
            if u.figures.cpu_percent is not None
        ]

    def _observe_cpu_time(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(seconds, {_SERVICE: name, "cpu.mode": mode})
            for name, u in self._usage.items()
            for mode, seconds in zip(("user", "system"), u.cpu_seconds, strict=True)
        ]

    def _observe_memory(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(u.figures.memory_bytes, {_SERVICE: name})
            for name, u in self._usage.items()
            if u.figures.memory_bytes is not None
        ]

    def _observe_gpu(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(u.figures.gpu_memory_bytes, {_SERVICE: name})
            for name, u in self._usage.items()
            if u.figures.gpu_memory_bytes is not None
        ]

    def _observe_state(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(
                int(state == each), {_SERVICE: name, "hostvisor.service.state": each.value}
            )
            for name, (state, _health) in self._states.items()
            for each in ServiceState
        ]


def _exporter(signal: Signal, target: Target, timeout: float) -> Any:
    """The OTLP exporter for one signal; imports only the module of its protocol."""
    headers = dict(target.headers) or None
    if target.protocol == "grpc":
        if signal == "logs":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

            return OTLPLogExporter(endpoint=target.endpoint, headers=headers, timeout=timeout)
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=target.endpoint, headers=headers, timeout=timeout)
    if signal == "logs":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (
            OTLPLogExporter as HTTPLogExporter,
        )

        return HTTPLogExporter(endpoint=target.endpoint, headers=headers, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HTTPMetricExporter,
    )

    return HTTPMetricExporter(endpoint=target.endpoint, headers=headers, timeout=timeout)


def _build(
    settings: ExportSettings, snapshot: Snapshot, version: str
) -> tuple[Telemetry, LoggerProvider, MeterProvider]:
    """Providers with our resource, bounded batching and counting; no global state."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(
        {
            "service.name": "hostvisor",
            "service.version": version,
            "service.instance.id": str(uuid.uuid4()),
            "host.name": socket.gethostname(),
            **settings.resource,
        }
    )
    timeout_ms = settings.timeout * 1000
    reader = PeriodicExportingMetricReader(
        _exporter("metrics", settings.metrics, settings.timeout),
        export_interval_millis=settings.metric_interval * 1000,
        export_timeout_millis=timeout_ms,
    )
    meters = MeterProvider(metric_readers=[reader], resource=resource, shutdown_on_exit=False)
    loggers = LoggerProvider(resource=resource, shutdown_on_exit=False, meter_provider=meters)
    telemetry = Telemetry(
        logger=loggers.get_logger("hostvisor", version),
        meter=meters.get_meter("hostvisor", version),
        snapshot=snapshot,
        max_queue=settings.max_queue,
    )
    exporter = _CountingExporter(
        _exporter("logs", settings.logs, settings.timeout),
        on_failed=lambda count: telemetry._drop("export_failed", count),
    )
    telemetry._exporter = exporter
    telemetry.metric_interval = settings.metric_interval
    processor = BatchLogRecordProcessor(
        exporter,  # type: ignore[arg-type]  # duck-typed LogRecordExporter
        schedule_delay_millis=settings.schedule_delay * 1000,
        max_export_batch_size=settings.max_batch,
        export_timeout_millis=timeout_ms,
        max_queue_size=settings.max_queue,
        meter_provider=meters,
    )
    loggers.add_log_record_processor(processor)
    return telemetry, loggers, meters


async def _forward(events: ObjectReceiveStream[Event], telemetry: Telemetry) -> None:
    async for event in events:
        telemetry.handle(event)


async def _sample(telemetry: Telemetry, every: float) -> None:
    # Gauges are samples: re-read the snapshot even when no event announced a change.
    while True:
        await anyio.sleep(every)
        telemetry.refresh()


def _drain(events: ObjectReceiveStream[Event], telemetry: Telemetry) -> None:
    """Emit what is still buffered (``hostvisor.daemon.stopping``) before the final flush."""
    while isinstance(events, MemoryObjectReceiveStream):
        try:
            telemetry.handle(events.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return


async def _close(closers: Sequence[Callable[[], object]], timeout: float) -> None:
    """Run the providers' shutdowns (final flush) in daemon threads, waiting ``timeout`` s.

    The SDK's shutdown can wait 30 s per provider on a collector that never
    answers; daemon threads are abandoned at the deadline and never hold up the
    interpreter's exit.
    """

    def run(closer: Callable[[], object]) -> None:
        try:
            closer()
        except Exception:
            logging.getLogger(__name__).warning("telemetry shutdown failed", exc_info=True)

    threads = [
        threading.Thread(target=run, args=(c,), name="hostvisor-otel-close", daemon=True)
        for c in closers
    ]
    for thread in threads:
        thread.start()

    def join() -> None:
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(join)


@asynccontextmanager
async def open_telemetry(
    spec: TelemetrySpec,
    *,
    bus: EventBus,
    snapshot: Snapshot,
    version: str,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[Telemetry | None]:
    """Export the bus's events and the services' metrics while the context is open.

    Args:
        spec: the ``[telemetry]`` table.
        bus: every event published while open becomes a log record.
        snapshot: returns ``{service: (state, health)}`` for the gauges; called on
            the event loop after each event and every few seconds.
        version: hostvisor's version (``service.version``).
        environ: the ``OTEL_*`` variables (default ``os.environ``); see
            :func:`resolve_export`.

    Yields:
        The :class:`Telemetry` (for :meth:`Telemetry.record_probe`), or None when
        ``spec.enabled`` is false or ``OTEL_SDK_DISABLED=true``; then nothing of
        ``opentelemetry`` is imported.

    Raises:
        ConfigError: an unsupported protocol.

    Leaving the context emits the events still buffered and flushes for at most
    ``spec.export_timeout + 0.5`` seconds.
    """
    env = os.environ if environ is None else environ
    if not spec.enabled or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        yield None
        return
    settings = resolve_export(spec, env)
    telemetry, loggers, meters = _build(settings, snapshot, version)
    telemetry.refresh()
    try:
        async with bus.subscribe(buffer=SUBSCRIPTION_BUFFER) as events:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_forward, events, telemetry)
                    tg.start_soon(_sample, telemetry, min(_SAMPLE_EVERY, settings.metric_interval))
                    try:
                        yield telemetry
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                _drain(events, telemetry)
    finally:
        await _close(
            [loggers.shutdown, lambda: meters.shutdown(timeout_millis=settings.timeout * 1000)],
            settings.timeout + 0.5,
        )
