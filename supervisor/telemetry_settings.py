"""Where and how telemetry is exported: ``[telemetry]`` and the ``OTEL_*`` variables.

Pure and free of ``opentelemetry`` imports (a disabled daemon never loads the
SDK): :func:`resolve_export` turns the ``[telemetry]`` table and the environment
into :class:`ExportSettings`, following the OTLP exporter specification
(https://opentelemetry.io/docs/specs/otel/protocol/exporter/) and the SDK
environment variables (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/).
:mod:`supervisor.telemetry` re-exports its public names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote

from supervisor.errors import ConfigError, ConfigIssue
from supervisor.spec import TelemetrySpec

__all__ = ["ExportSettings", "Signal", "Target", "resolve_export"]

Signal = Literal["logs", "metrics"]
_PROTOCOLS: Final = ("grpc", "http/protobuf")
_DEFAULT_BASE: Final = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where one signal is exported.

    Attributes:
        protocol: ``"grpc"`` or ``"http/protobuf"``.
        endpoint: for HTTP the full URL with the signal path (``.../v1/logs``);
            for gRPC the collector's URL (``http://`` = plaintext, ``https://`` = TLS).
        headers: extra request headers (``OTEL_EXPORTER_OTLP_[SIGNAL_]HEADERS``).
    """

    protocol: str
    endpoint: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportSettings:
    """The export configuration, resolved from ``[telemetry]`` and the ``OTEL_*`` variables.

    Attributes:
        logs: where events go.
        metrics: where metrics go.
        timeout: seconds any one export may take (``export_timeout``).
        metric_interval: seconds between metric exports (``OTEL_METRIC_EXPORT_INTERVAL``).
        schedule_delay: seconds between log batches (``OTEL_BLRP_SCHEDULE_DELAY``).
        max_queue: log records queued at most (``OTEL_BLRP_MAX_QUEUE_SIZE``).
        max_batch: log records per export (``OTEL_BLRP_MAX_EXPORT_BATCH_SIZE``).
        resource: resource attributes from ``OTEL_RESOURCE_ATTRIBUTES`` and
            ``OTEL_SERVICE_NAME`` (the latter wins for ``service.name``).
    """

    logs: Target
    metrics: Target
    timeout: float
    metric_interval: float = 60.0
    schedule_delay: float = 1.0
    max_queue: int = 2048
    max_batch: int = 512
    resource: Mapping[str, str] = field(default_factory=dict)


def _pairs(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values (W3C Baggage, as the OTEL_* variables)."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs[key.strip()] = unquote(value.strip())
    return pairs


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    """A positive number from ``environ``; the default when unset or invalid (as the SDK does)."""
    try:
        value = float(environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def _target(spec: TelemetrySpec, environ: Mapping[str, str], signal: Signal) -> Target:
    upper = signal.upper()
    keys = (f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    source, protocol = "telemetry.protocol", str(spec.protocol)
    for key in keys:
        if not protocol and environ.get(key, "").strip():
            source, protocol = key, environ[key].strip()
    protocol = protocol or "http/protobuf"
    if protocol not in _PROTOCOLS:
        where = "environment" if source.startswith("OTEL_") else "config.toml"
        message = f'expected "grpc" or "http/protobuf", got {protocol!r}'
        raise ConfigError([ConfigIssue(where, source, message)])
    per_signal = environ.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
    if per_signal and not spec.endpoint:
        endpoint = per_signal  # a per-signal URL is used as is (OTLP exporter spec)
    else:
        base = spec.endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        base = base or _DEFAULT_BASE[protocol]
        base = base if "://" in base else f"http://{base}"
        endpoint = f"{base.rstrip('/')}/v1/{signal}" if protocol == "http/protobuf" else base
    headers = environ.get(f"OTEL_EXPORTER_OTLP_{upper}_HEADERS") or environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    return Target(protocol=protocol, endpoint=endpoint, headers=_pairs(headers))


def resolve_export(spec: TelemetrySpec, environ: Mapping[str, str]) -> ExportSettings:
    """Resolve where and how to export, per the OTLP exporter specification.

    ``[telemetry]`` wins over the environment. Protocol: ``protocol``, else
    ``OTEL_EXPORTER_OTLP_{LOGS,METRICS}_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``,
    else ``http/protobuf``. Endpoint: ``endpoint`` (a base URL), else the
    per-signal ``OTEL_EXPORTER_OTLP_{LOGS,METRICS}_ENDPOINT`` (used as is), else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL), else ``localhost:4318`` (HTTP)
    or ``localhost:4317`` (gRPC). HTTP base URLs get ``/v1/logs`` and
    ``/v1/metrics`` appended; a URL without a scheme gets ``http://``.
    TLS files and compression are read by the SDK from the process environment.

    Raises:
        ConfigError: the protocol is neither ``grpc`` nor ``http/protobuf``.
    """
    resource = _pairs(environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    if name := environ.get("OTEL_SERVICE_NAME", "").strip():
        resource["service.name"] = name
    max_queue = int(_number(environ, "OTEL_BLRP_MAX_QUEUE_SIZE", 2048))
    return ExportSettings(
        logs=_target(spec, environ, "logs"),
        metrics=_target(spec, environ, "metrics"),
        timeout=spec.export_timeout,
        metric_interval=_number(environ, "OTEL_METRIC_EXPORT_INTERVAL", 60_000) / 1000,
        schedule_delay=_number(environ, "OTEL_BLRP_SCHEDULE_DELAY", 1000) / 1000,
        max_queue=max_queue,
        max_batch=min(max_queue, int(_number(environ, "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", 512))),
        resource=resource,
    )
