"""Health probes (http, tcp, exec, docker) and the threshold counting around them.

The terms are Kubernetes' (``kubernetes.io/docs/concepts/configuration/
liveness-readiness-startup-probes``): a probe runs every ``interval`` and must
answer within ``timeout``; ``failure_threshold`` failures in a row make the
service unhealthy, ``success_threshold`` successes in a row healthy; failures
within ``start_period`` after the spawn do not count (Docker's ``--health-start-period``).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import select
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from supervisor.spec import HealthCheckSpec
from supervisor.states import Health

__all__ = [
    "CommandRunner",
    "HealthCounter",
    "Probe",
    "ProbeResult",
    "open_probe",
    "probe_tcp",
    "tls_context",
]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's answer: ``ok``, a short ``detail`` for messages, ``None`` ok = not yet known."""

    ok: bool | None
    detail: str = ""
    duration: float = 0.0


class Probe(Protocol):
    """Runs one check; never raises for a failing service, answers a :class:`ProbeResult`."""

    async def __call__(self) -> ProbeResult: ...


class CommandRunner(Protocol):
    """``ProcessDriver.run_command``: runs argv in its own group, killed at ``timeout``."""

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        service: str,
        timeout: float,
    ) -> Any: ...


def _split_host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


#: ``SO_LINGER`` on, 0 s: close with a reset. A probe needs no orderly FIN exchange, and
#: a reset leaves no TIME_WAIT socket behind (HAProxy's TCP checks do the same).
_LINGER_RESET = struct.pack("ii", 1, 0)


def _ip_literal(host: str) -> socket.AddressFamily | None:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def probe_tcp(
    host: str, port: int, *, timeout: float, family: socket.AddressFamily | None = None
) -> None:
    """Connect to ``host:port`` and close; raises OSError when nothing accepts.

    Args:
        host, port: the target.
        timeout: seconds for name resolution and for the connect.
        family: the address family when ``host`` is known to be an IP literal
            (skips parsing it again on every probe).

    Raises:
        OSError: refused, unreachable, or no answer within ``timeout`` seconds
            (``TimeoutError`` is an OSError).

    Cheap on purpose (200 services probed every second must cost little CPU): an
    IP literal skips name resolution, and a connect that has already completed when
    ``poll(0)`` looks (loopback nearly always) never registers with the event loop.
    """
    family = family or _ip_literal(host)
    address: tuple[str, int] = (host, port)
    if family is None:
        with anyio.fail_after(timeout):
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        address = (str(sockaddr[0]), int(sockaddr[1]))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(0):
                with anyio.fail_after(timeout):
                    await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    finally:
        sock.close()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context of every HTTP probe and hook, built once (the first build costs
    ~20 ms of CPU on the event loop; afterwards an httpx client costs ~0.4 ms).
    Read-only once built, so sharing it is safe: certifi's CA bundle, as httpx uses."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


@asynccontextmanager
async def open_probe(
    spec: HealthCheckSpec,
    *,
    service: str,
    workdir: Path,
    env: Mapping[str, str],
    run_command: CommandRunner | None = None,
    docker_status: Callable[[], Awaitable[str | None]] | None = None,
) -> AsyncIterator[Probe]:
    """Acquire the probe of ``spec``; each call runs one check bounded by ``spec.timeout`` s.

    An ``http`` probe keeps one client for its whole life: building an httpx client
    (its TLS context) costs ~20 ms of CPU, far more than the request. Keep-alive is off,
    so every check still opens a fresh connection, as a Kubernetes probe does.

    Args:
        spec: the ``[health]`` table.
        service, workdir, env: for ``exec`` probes.
        run_command: runs ``exec`` probes (required for them).
        docker_status: returns the container's HEALTHCHECK status (required for ``docker``).
    """
    client: Any = None
    if spec.http is not None:
        import httpx

        client = httpx.AsyncClient(
            timeout=spec.timeout,
            follow_redirects=False,
            trust_env=False,
            verify=tls_context(),
            limits=httpx.Limits(max_keepalive_connections=0),
        )
    try:
        yield _build_probe(spec, service, workdir, env, run_command, docker_status, client)
    finally:
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()


def _build_probe(  # noqa: PLR0917 (private; called once, from open_probe)
    spec: HealthCheckSpec,
    service: str,
    workdir: Path,
    env: Mapping[str, str],
    run_command: CommandRunner | None,
    docker_status: Callable[[], Awaitable[str | None]] | None,
    client: Any,
) -> Probe:
    kind = spec.kind

    async def check() -> ProbeResult:
        begin = time.perf_counter()
        ok: bool | None
        try:
            if kind == "tcp":  # bounds its own waits; skipping the scope saves CPU per probe
                ok, detail = await tcp()
            else:
                with anyio.fail_after(spec.timeout):
                    ok, detail = await _checks[kind]()
        except TimeoutError:
            ok, detail = False, f"{kind} probe timed out after {spec.timeout:g}s"
        except OSError as exc:
            ok, detail = False, f"{kind} probe: {exc.strerror or exc}"
        except Exception as exc:  # a probe never takes the supervisor down
            ok, detail = False, f"{kind} probe: {type(exc).__name__}: {exc}"
        return ProbeResult(ok, detail, time.perf_counter() - begin)

    async def http() -> tuple[bool | None, str]:
        import httpx

        assert spec.http is not None and client is not None
        try:
            response = await client.get(spec.http)
        except httpx.HTTPError as exc:
            return False, f"GET {spec.http}: {type(exc).__name__}: {exc}"
        code = response.status_code
        good = code in spec.expect_status if spec.expect_status else 200 <= code < 400
        return good, f"GET {spec.http}: HTTP {code}"

    if spec.tcp is not None:
        tcp_host, tcp_port = _split_host_port(spec.tcp)
        tcp_family = _ip_literal(tcp_host)

    async def tcp() -> tuple[bool | None, str]:
        await probe_tcp(tcp_host, tcp_port, timeout=spec.timeout, family=tcp_family)
        return True, f"tcp {spec.tcp} accepted"

    async def exec_() -> tuple[bool | None, str]:
        assert spec.exec is not None and run_command is not None
        result = await run_command(
            spec.exec, cwd=workdir, env=env, service=service, timeout=spec.timeout
        )
        if getattr(result, "timed_out", False):
            return False, f"exec probe timed out after {spec.timeout:g}s"
        code = getattr(result, "code", None)
        tail = result.tail(3) if hasattr(result, "tail") else ""
        return code == 0, f"exec probe exit {code}" + (f": {tail}" if tail and code else "")

    async def docker() -> tuple[bool | None, str]:
        assert docker_status is not None
        status = await docker_status()
        if status is None:
            return False, "container has no HEALTHCHECK (set docker = false and use another probe)"
        if status == "starting":
            return None, "container health: starting"
        return status == "healthy", f"container health: {status}"

    _checks: dict[str, Callable[[], Awaitable[tuple[bool | None, str]]]] = {
        "http": http,
        "tcp": tcp,
        "exec": exec_,
        "docker": docker,
    }
    return check


class HealthCounter:
    """Counts probe results in a row and says when health changes.

    Args:
        spec: thresholds and ``start_period`` (seconds).
        started_at: monotonic time of the spawn; failures before
            ``started_at + start_period`` do not count.
    """

    def __init__(self, spec: HealthCheckSpec, *, started_at: float) -> None:
        self.spec = spec
        self.started_at = started_at
        self.health = Health.UNKNOWN
        self.successes = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"<HealthCounter {self.health} ok={self.successes} fail={self.failures}>"

    def record(self, result: ProbeResult, *, now: float) -> Health:
        """Count one result; return the (possibly new) health."""
        if result.ok is None:
            return self.health
        if result.ok:
            self.failures = 0
            self.successes += 1
            if self.successes >= self.spec.success_threshold:
                self.health = Health.HEALTHY
        else:
            self.successes = 0
            if now < self.started_at + self.spec.start_period and self.health is not Health.HEALTHY:
                return self.health
            self.failures += 1
            if self.failures >= self.spec.failure_threshold:
                self.health = Health.UNHEALTHY
        return self.health
