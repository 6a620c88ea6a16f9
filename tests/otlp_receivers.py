"""Real OTLP receivers for tests: gRPC and HTTP/protobuf, a black hole, a closed port.

Each receiver is a context manager that listens on 127.0.0.1 and collects the
export requests it decodes (``opentelemetry-proto`` messages), with the request
headers. ``unavailable = True`` makes it refuse every export (gRPC
``UNAVAILABLE``, HTTP 503), as a collector under pressure does.
"""

from __future__ import annotations

import gzip
import socket
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

import anyio
import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

ExportLogs = logs_service_pb2.ExportLogsServiceRequest
ExportMetrics = metrics_service_pb2.ExportMetricsServiceRequest


def any_value(value: Any) -> Any:
    """An ``AnyValue`` as plain Python."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def attributes(pairs: Iterable[Any]) -> dict[str, Any]:
    """``KeyValue`` pairs as a dict."""
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass
class LogView:
    """One received log record, flattened."""

    event_name: str
    severity_text: str
    severity_number: int
    body: Any
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str


@dataclass
class Receiver:
    """What every receiver collects; thread-safe, with waiting helpers."""

    logs: list[Any] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    unavailable: bool = False
    protocol: str = ""
    endpoint: str = ""

    def __post_init__(self) -> None:
        self._cond = threading.Condition()

    def add(self, kind: str, request: Any, headers: dict[str, str]) -> None:
        with self._cond:
            (self.logs if kind == "logs" else self.metrics).append(request)
            self.headers.append(headers)
            self._cond.notify_all()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (in a thread) until ``predicate()`` holds; raise TimeoutError if not in time."""

        def block() -> bool:
            with self._cond:
                return self._cond.wait_for(predicate, timeout)

        if not await anyio.to_thread.run_sync(block):
            raise TimeoutError(f"receiver: condition not met in {timeout}s")

    def log_records(self) -> list[LogView]:
        views = []
        for request in list(self.logs):
            for rl in request.resource_logs:
                resource = attributes(rl.resource.attributes)
                for sl in rl.scope_logs:
                    for r in sl.log_records:
                        views.append(
                            LogView(
                                event_name=r.event_name,
                                severity_text=r.severity_text,
                                severity_number=r.severity_number,
                                body=any_value(r.body),
                                attributes=attributes(r.attributes),
                                resource=resource,
                                scope=sl.scope.name,
                            )
                        )
        return views

    def metric_names(self) -> set[str]:
        return {m.name for m in self._metrics()}

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """Data points of metric ``name`` in the latest export that has it.

        Values: numbers for sums and gauges, ``(count, sum)`` for histograms.
        """
        found = [m for m in self._metrics() if m.name == name]
        if not found:
            return []
        metric = found[-1]
        kind = metric.WhichOneof("data")
        result = []
        for p in getattr(metric, kind).data_points:
            attrs = attributes(p.attributes)
            if kind == "histogram":
                result.append((attrs, (p.count, p.sum)))
            else:
                result.append((attrs, getattr(p, p.WhichOneof("value"))))
        return result

    def unit(self, name: str) -> str:
        return next(m.unit for m in self._metrics() if m.name == name)

    def _metrics(self) -> list[Any]:
        return [
            m
            for request in list(self.metrics)
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        ]


class GrpcReceiver(Receiver):
    """An OTLP/gRPC collector built from the collector service stubs."""

    def __enter__(self) -> Self:
        receiver = self

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                return receiver._export("logs", request, context)

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                return receiver._export("metrics", request, context)

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.protocol = "grpc"
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    def _export(self, kind: str, request: Any, context: Any) -> Any:
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "collector busy")
        self.add(kind, request, dict(context.invocation_metadata()))
        if kind == "logs":
            return logs_service_pb2.ExportLogsServiceResponse()
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None).wait(5)


class HttpReceiver(Receiver):
    """An OTLP/HTTP collector: protobuf bodies on /v1/logs and /v1/metrics."""

    def __enter__(self) -> Self:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if receiver.unavailable:
                    self._answer(503, b"")
                    return
                kinds = {
                    "/v1/logs": ("logs", ExportLogs),
                    "/v1/metrics": ("metrics", ExportMetrics),
                }
                if self.path not in kinds:
                    self._answer(404, b"")
                    return
                kind, message = kinds[self.path]
                receiver.add(
                    kind, message.FromString(body), {k.lower(): v for k, v in self.headers.items()}
                )
                self._answer(200, b"")  # an empty Export*ServiceResponse

            def _answer(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.protocol = "http/protobuf"
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class BlackHole:
    """A collector that accepts TCP connections and never answers a byte."""

    def __enter__(self) -> Self:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read, never answered

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


def closed_port() -> int:
    """A local TCP port that nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
