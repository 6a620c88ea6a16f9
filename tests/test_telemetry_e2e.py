"""Telemetry end to end: a real ``hostvisor run`` exporting to real OTLP receivers.

The receivers (``tests/otlp_receivers.py``) decode real OTLP/gRPC and
OTLP/HTTP-protobuf exports. A black hole (accepts, never answers) and a closed
port show that a broken collector leaves supervision, the control socket and
shutdown alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import __version__
from supervisor.control.client import ControlClient
from tests.daemon_harness import PY, DaemonProcess, daemon, py_cmd
from tests.otlp_receivers import BlackHole, GrpcReceiver, HttpReceiver, Receiver, closed_port
from tests.support import free_port

#: Batches every 50 ms and metrics every 200 ms, so exports arrive within a second.
FAST = {"OTEL_BLRP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "200"}
FALSE = shutil.which("false") or "/bin/false"
SERVICE_EVENTS = (
    "hostvisor.service.starting",
    "hostvisor.service.running",
    "hostvisor.service.exited",
    "hostvisor.service.backoff",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon inherits our environment: a developer's OTEL_* must not redirect it.
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def wait(receiver: Receiver, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    anyio.run(receiver.wait, predicate, timeout)


def telemetry_config(endpoint: str = "", protocol: str = "", timeout: str = "1s") -> str:
    text = f'[telemetry]\nenabled = true\nexport_timeout = "{timeout}"\n'
    if endpoint:
        text += f'endpoint = "{endpoint}"\n'
    if protocol:
        text += f'protocol = "{protocol}"\n'
    return text


class Secrets:
    """A token in an env file and a password in ``env``, and units that try to leak them."""

    def __init__(self, root: Path) -> None:
        self.token = f"tok-{uuid.uuid4().hex}"
        self.password = f"pw-{uuid.uuid4().hex}"
        self.file = root / "secrets.env"
        self.file.write_text(f"API_TOKEN={self.token}\n")
        self.file.chmod(0o600)

    def units(self) -> dict[str, str]:
        port = free_port()
        env = f'env_files = ["{self.file}"]\nenv = {{ DB_PASSWORD = "{self.password}" }}\n'
        # Prints both secrets to stderr and fails: the output tail lands in an event.
        leak = json.dumps(
            [
                PY,
                "-c",
                "import os,sys; print('token', os.environ['API_TOKEN'], "
                "os.environ['DB_PASSWORD'], file=sys.stderr); sys.exit(2)",
            ]
        )
        return {
            "crash": (
                f"command = {py_cmd('svc_exit', '--after', '0.3', '--code', '3')}\n{env}"
                'start_seconds = "0.1s"\nstop_timeout = "1s"\n'
                '[backoff]\ninitial = "0.2s"\njitter = 0.0\n'
            ),
            "web": (
                f'command = {py_cmd("svc_serve", "--port", port)}\n{env}stop_timeout = "1s"\n'
                f'[health]\nhttp = "http://127.0.0.1:{port}/"\ninterval = "0.2s"\n'
                f"[post_start]\ncommand = {leak}\n"
            ),
            "pre": (
                f"command = {py_cmd('svc_sleep')}\n{env}[preflight]\ncommand = {leak}\n"
                '[backoff]\ninitial = "0.5s"\n'
            ),
        }

    def assert_absent(self, receiver: Receiver) -> None:
        """Neither secret is in any byte of any export (attributes, bodies, resource)."""
        for request in [*receiver.logs, *receiver.metrics]:
            raw = request.SerializeToString()
            assert self.token.encode() not in raw
            assert self.password.encode() not in raw


def records(receiver: Receiver, name: str, service: str | None = None) -> list[Any]:
    return [
        r
        for r in receiver.log_records()
        if r.event_name == name
        and (service is None or r.attributes.get("hostvisor.service.name") == service)
    ]


class TestExport:
    @pytest.mark.parametrize(
        ("protocol", "via"),
        [("grpc", "config"), ("http/protobuf", "config"), ("grpc", "OTEL_* environment")],
    )
    def test_a_crashing_unit_is_seen_by_the_collector(
        self, tmp_path: Path, protocol: str, via: str
    ) -> None:
        """Events of a crashing unit arrive as log records with the contract's attributes,
        under hostvisor's resource; metric names arrive; no secret is ever exported; the
        last event (daemon.stopping) is flushed at shutdown."""
        secrets = Secrets(tmp_path)
        with (GrpcReceiver if protocol == "grpc" else HttpReceiver)() as receiver:
            env = dict(FAST)
            if via == "config":
                config = telemetry_config(receiver.endpoint, protocol)
            else:
                config = telemetry_config()
                env |= {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                    "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                    "OTEL_SERVICE_NAME": "edge-e2e",
                    "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e",
                }
            with daemon(tmp_path, config=config, env=env, units=secrets.units()) as d:
                wait(
                    receiver,
                    lambda: (
                        all(records(receiver, n, "crash") for n in SERVICE_EVENTS)
                        and len(records(receiver, "hostvisor.service.starting", "crash")) >= 2
                        and bool(records(receiver, "hostvisor.preflight.failed", "pre"))
                        and bool(records(receiver, "hostvisor.post_start.failed", "web"))
                    ),
                )
                wanted = {
                    "hostvisor.service.restarts",
                    "hostvisor.service.exits",
                    "hostvisor.service.up",
                    "hostvisor.service.state",
                    "hostvisor.health_check.duration",
                }
                wait(receiver, lambda: wanted <= receiver.metric_names())
                wait(receiver, lambda: any(v >= 1 for _, v in self._up(receiver, "web")))
                assert d.stop() == 0
            assert records(receiver, "hostvisor.daemon.stopping")

        exited = records(receiver, "hostvisor.service.exited", "crash")[0]
        assert exited.attributes["process.exit.code"] == 3
        assert isinstance(exited.attributes["process.pid"], int)
        assert exited.severity_text == "WARN"
        assert exited.body == "exit code 3"
        backoff = records(receiver, "hostvisor.service.backoff", "crash")[0].attributes
        assert backoff["hostvisor.backoff.delay_s"] == pytest.approx(0.2)
        assert "hostvisor.backoff.attempt" in backoff
        starting = records(receiver, "hostvisor.service.starting", "crash")
        assert [r.attributes["hostvisor.restart.count"] for r in starting[:2]] == [0, 1]
        running = records(receiver, "hostvisor.service.running", "crash")[0]
        assert isinstance(running.attributes["process.pid"], int)
        leaked = records(receiver, "hostvisor.preflight.failed", "pre")[0]
        assert "***" in leaked.attributes["hostvisor.preflight.stderr"]
        assert "***" in records(receiver, "hostvisor.post_start.failed", "web")[0].body

        resource = exited.resource
        assert resource["service.name"] == ("edge-e2e" if via != "config" else "hostvisor")
        assert resource["service.version"] == __version__
        assert str(uuid.UUID(resource["service.instance.id"])) == resource["service.instance.id"]
        assert resource["host.name"] == socket.gethostname()
        if via != "config":
            assert resource["deployment.environment.name"] == "e2e"

        restarts = receiver.points("hostvisor.service.restarts")
        assert any(a == {"hostvisor.service.name": "crash"} and v >= 1 for a, v in restarts)
        exits = receiver.points("hostvisor.service.exits")
        assert any(
            a == {"hostvisor.service.name": "crash", "process.exit.code": 3} for a, _ in exits
        )
        probes = receiver.points("hostvisor.health_check.duration")
        assert any(a["hostvisor.service.name"] == "web" and n >= 1 for a, (n, _) in probes)
        assert receiver.unit("hostvisor.health_check.duration") == "s"
        secrets.assert_absent(receiver)

    @staticmethod
    def _up(receiver: Receiver, service: str) -> list[tuple[dict[str, Any], Any]]:
        return [
            (a, v)
            for a, v in receiver.points("hostvisor.service.up")
            if a["hostvisor.service.name"] == service
        ]


# ------------------------------------------------------------------ never in the way

#: Fails at once, restarts every 0.25 s: the rate a stalled loop would visibly slow.
CRASHER = (
    f'command = ["{FALSE}"]\nstart_seconds = "1s"\nstop_timeout = "1s"\n'
    '[backoff]\ninitial = "0.25s"\nmultiplier = 1.0\njitter = 0.0\n'
)
WINDOW = 3.0  # seconds over which restarts are counted
EXPORT_TIMEOUT = 1.0


class Probe:
    """Counts a daemon's restarts over the window and times its status answers."""

    def __init__(self, d: DaemonProcess) -> None:
        self.d = d
        self.latencies: list[float] = []
        self.restarts = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        client = ControlClient(self.d.socket)
        try:
            first = self._restarts(client)
            end = time.monotonic() + WINDOW
            while time.monotonic() < end:
                first_call = time.monotonic()
                client.call("status", {}, timeout=5)
                self.latencies.append(time.monotonic() - first_call)
                time.sleep(0.05)  # spacing of the status calls, not a synchronisation
            self.restarts = self._restarts(client) - first
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def _restarts(self, client: ControlClient) -> int:
        doc = client.call("status", {"services": ["crash"]}, timeout=5)
        return int(doc["services"][0]["restarts"])


class TestNeverInTheWay:
    def test_black_holes_and_a_closed_port_leave_supervision_alone(self, tmp_path: Path) -> None:
        """Next to a daemon without telemetry, daemons exporting to a black hole (gRPC and
        HTTP) and to a closed port restart a crashing unit at the same rate, answer status
        at once, and exit 0 within export_timeout + 1 s of SIGTERM."""
        with ExitStack() as stack:
            hole = stack.enter_context(BlackHole())
            dead = f"http://127.0.0.1:{closed_port()}"
            configs = {
                "off": "",
                "black hole grpc": telemetry_config(hole.endpoint, "grpc", f"{EXPORT_TIMEOUT}s"),
                "black hole http": telemetry_config(
                    hole.endpoint, "http/protobuf", f"{EXPORT_TIMEOUT}s"
                ),
                "closed port": telemetry_config(dead, "http/protobuf", f"{EXPORT_TIMEOUT}s"),
            }
            daemons: dict[str, DaemonProcess] = {}
            for i, (name, config) in enumerate(configs.items()):
                root = tmp_path / f"d{i}"
                root.mkdir()
                daemons[name] = stack.enter_context(
                    daemon(root, config=config, env=FAST, units={"crash": CRASHER})
                )
            for d in daemons.values():
                d.wait_event("hostvisor.service.backoff", "crash")
            probes = {name: Probe(d) for name, d in daemons.items()}
            threads = [threading.Thread(target=p.run) for p in probes.values()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WINDOW + 30)
            for name, probe in probes.items():
                assert probe.error is None, (name, probe.error)
            assert hole.accepted, "the daemons never reached the black hole"

            cli = {name: d.cli("status", "--json") for name, d in daemons.items()}
            shutdown = self._stop_all(daemons)

        baseline = probes["off"].restarts
        assert baseline >= 0.5 * WINDOW / 0.25, probes["off"].restarts
        for name, probe in probes.items():
            assert abs(probe.restarts - baseline) <= max(3, 0.3 * baseline), (
                name,
                probe.restarts,
                baseline,
            )
            assert max(probe.latencies) < 0.8, (name, max(probe.latencies))
            assert statistics.median(probe.latencies) < 0.05, (name, probe.latencies)
            assert cli[name].returncode == 3, (name, cli[name].stderr)
            assert json.loads(cli[name].stdout)["services"][0]["name"] == "crash"
        for name, (code, seconds) in shutdown.items():
            assert code == 0, name
            # export_timeout + 1 s, plus the (instant) stop of a unit in backoff
            assert seconds <= EXPORT_TIMEOUT + 1.0 + 0.5, (name, seconds)

    @staticmethod
    def _stop_all(daemons: dict[str, DaemonProcess]) -> dict[str, tuple[int, float]]:
        """SIGTERM every daemon at once; exit code and seconds until each exited."""
        result: dict[str, tuple[int, float]] = {}

        def stop(name: str, d: DaemonProcess) -> None:
            assert d.proc is not None
            began = time.monotonic()
            d.signal(signal.SIGTERM)
            code = d.proc.wait(30)
            result[name] = (code, time.monotonic() - began)

        threads = [threading.Thread(target=stop, args=item) for item in daemons.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
        return result
