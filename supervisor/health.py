"""Health probes (http, tcp, exec, docker) and the threshold counting around them.

The terms are Kubernetes' (``kubernetes.io/docs/concepts/configuration/
liveness-readiness-startup-probes``): a probe runs every ``interval`` and must
answer within ``timeout``; ``failure_threshold`` failures in a row make the
service unhealthy, ``success_threshold`` successes in a row healthy; failures
within ``start_period`` after the spawn do not count (Docker's ``--health-start-period``).

Two rules beyond Kubernetes':

- An HTTP probe (and the ``post_start`` HTTP hook, through :func:`http_status`) reads
  at most :data:`BODY_LIMIT` bytes of a response body, for at most :data:`BODY_GRACE`
  seconds, then closes the connection: the verdict is the status code, so an
  endless event stream or a 100 MiB ``/metrics`` page costs the daemon nothing.
- A check that could not run because the *daemon* is short of a resource (EMFILE,
  ENFILE, ENOMEM, ENOBUFS: no socket, pipe or process for the probe) has no verdict
  (``ok is None``, ``daemon_side``): it is the daemon's trouble, never counted as
  the service's failed check, and is retried at the next probe.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import os
import select
import socket
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio

if TYPE_CHECKING:  # httpx and ssl are imported when a unit has an HTTP probe or hook
    import ssl

    import httpx

from supervisor.spec import HealthCheckSpec
from supervisor.states import Health

__all__ = [
    "BODY_GRACE",
    "BODY_LIMIT",
    "MAX_WAIT",
    "CommandRunner",
    "HealthCounter",
    "Probe",
    "ProbeResult",
    "bounded_seconds",
    "daemon_fault",
    "http_status",
    "next_probe_at",
    "open_probe",
    "probe_tcp",
    "tls_context",
]

#: Bytes of a response body that an HTTP probe or hook reads at most before it closes
#: the connection (Kubernetes' prober reads 10 KiB; the status code is the verdict).
BODY_LIMIT = 64 * 1024
#: Seconds an HTTP probe or hook goes on reading a body once the status line is in
#: (never past its timeout); a body still streaming then is not a failure.
BODY_GRACE = 1.0
#: The longest wait, in seconds (~31.7 years), that a probe or its scheduler computes:
#: longer or non-finite durations are clamped to it, so that deadline arithmetic never
#: overflows (``math.ceil(inf)``) whatever the config says.
MAX_WAIT = 1e9


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's answer.

    Attributes:
        ok: True healthy, False failed, ``None`` no verdict (not counted either way):
            the container is still ``starting``, or the daemon could not run the
            check (``daemon_side``).
        detail: a short reason for messages (``GET http://...: HTTP 503``).
        duration: seconds the check took.
        daemon_side: True when the check could not run for want of a daemon
            resource (see :func:`daemon_fault`); ``ok`` is then ``None`` and
            ``detail`` starts with ``daemon out of ...``.
    """

    ok: bool | None
    detail: str = ""
    duration: float = 0.0
    daemon_side: bool = False


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


def bounded_seconds(value: float) -> float:
    """``value`` seconds clamped to ``[0, MAX_WAIT]``; NaN counts as :data:`MAX_WAIT`.

    Config validation rejects such values; this keeps the arithmetic of a running
    probe safe whatever reaches it (``1e308``, ``inf``, a negative number).
    """
    if math.isnan(value):
        return MAX_WAIT
    return min(max(value, 0.0), MAX_WAIT)


def next_probe_at(now: float, interval: float) -> float:
    """The monotonic time of the next probe: ``now + interval``, rounded up to a grid
    of ``interval / 20`` (at most 50 ms, at least 1 ms) so that many services' probes
    share one event-loop wakeup (timer coalescing, as systemd's ``AccuracySec=``).

    Args:
        now: the current ``anyio.current_time()``, seconds.
        interval: the probe interval, seconds; clamped by :func:`bounded_seconds`.

    Returns:
        A finite time in ``[now + interval, now + interval + 50 ms]``; never raises.
    """
    interval = bounded_seconds(interval)
    due = now + interval
    slack = min(0.05, interval / 20)
    if slack < 0.001 or not math.isfinite(due / slack):
        return due
    return max(due, math.ceil(due / slack) * slack)


#: errno -> what the daemon is short of; such an error is the daemon's, not the service's.
_DAEMON_ERRNOS = {
    errno.EMFILE: "daemon out of file descriptors",
    errno.ENFILE: "host out of file descriptors",
    errno.ENOMEM: "daemon out of memory",
    errno.ENOBUFS: "daemon out of socket buffers",
}


def daemon_fault(exc: BaseException) -> str | None:
    """What the daemon is short of, if ``exc`` comes from the daemon's own resources.

    Walks ``exc``, its ``__cause__`` and ``__context__`` chain and exception groups
    (httpx wraps an ``OSError`` in httpcore's and anyio's errors; a spawn's errno is
    ``SpawnError.errno``) for an errno of EMFILE, ENFILE, ENOMEM or ENOBUFS, or a
    ``MemoryError``.

    Returns:
        ``"daemon out of file descriptors: [EMFILE] Too many open files"`` and the
        like, or ``None`` when the failure is the service's (refused, timed out...).
    """
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack and len(seen) < 64:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        code = getattr(current, "errno", None)
        if isinstance(code, int) and code in _DAEMON_ERRNOS:
            name = errno.errorcode.get(code, str(code))
            return f"{_DAEMON_ERRNOS[code]}: [{name}] {os.strerror(code)}"
        if isinstance(current, MemoryError):
            return "daemon out of memory: MemoryError"
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


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
    timeout = bounded_seconds(timeout)
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
    Read-only once built, so sharing it is safe: certifi's CA bundle, as httpx uses.
    ``ssl`` is imported here, not at the top: a daemon with no HTTP check never loads it."""
    import ssl

    import certifi

    return ssl.create_default_context(cafile=certifi.where())


#: Seconds left between the end of the body read and an enclosing deadline, so that
#: the read ends first and the enclosing scope never sees a cancellation of its own.
_SCOPE_MARGIN = 0.01


async def http_status(
    client: httpx.AsyncClient, url: str, *, method: str = "GET", timeout: float
) -> int:
    """Send one request and return its status code, reading little of the body.

    The status line and headers must arrive within ``timeout`` seconds. Then at most
    :data:`BODY_LIMIT` bytes of the body are read, as they come off the wire (no
    decompression), for at most :data:`BODY_GRACE` seconds and never past
    ``timeout`` or an enclosing cancel scope's deadline; then the connection is
    closed. So an endless event stream or a 100 MiB page costs ~64 KiB and returns
    in time, and a body cut short does not matter: the status code is the verdict.
    Used by HTTP probes and by the ``post_start`` HTTP hook.

    Args:
        client: an ``httpx.AsyncClient`` (its own timeouts apply to each read too).
        url: the target.
        method: the HTTP method (``post_start.method``).
        timeout: seconds for the status line; clamped by :func:`bounded_seconds`.

    Raises:
        httpx.HTTPError: no status line (refused, reset, not HTTP...).
        TimeoutError: no status line within ``timeout`` seconds.
    """
    timeout = bounded_seconds(timeout)
    deadline = anyio.current_time() + timeout
    request = client.build_request(method, url)
    with anyio.fail_after(timeout):
        response = await client.send(request, stream=True)
    try:
        await _skim_body(response, deadline)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            await response.aclose()  # an unfinished response closes its connection
    return response.status_code


async def _skim_body(response: httpx.Response, deadline: float) -> None:
    import httpx

    now = anyio.current_time()
    end = min(now + BODY_GRACE, deadline, anyio.current_effective_deadline() - _SCOPE_MARGIN)
    if end <= now:
        return
    read = 0
    with anyio.move_on_after(end - now):
        try:
            # aiter_raw is an async generator: close it here, not in the garbage collector.
            raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
            async with aclosing(raw) as chunks:
                async for chunk in chunks:
                    read += len(chunk)
                    if read >= BODY_LIMIT:
                        return
        except httpx.HTTPError:
            return  # the body was cut short: the status line is what counts


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
    """Acquire the probe of ``spec``; each call runs one check bounded by ``spec.timeout`` s
    and answers a :class:`ProbeResult` (it never raises for a failing service or for a
    daemon short of descriptors: the latter is ``ok=None, daemon_side=True``).

    An ``http`` probe reads its response through :func:`http_status` (at most
    :data:`BODY_LIMIT` bytes of body) and keeps one client for its whole life: building
    an httpx client (its TLS context) costs ~20 ms of CPU, far more than the request.
    Keep-alive is off, so every check still opens a fresh connection, as a Kubernetes
    probe does.

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
            timeout=bounded_seconds(spec.timeout),
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
    timeout = bounded_seconds(spec.timeout)

    async def check() -> ProbeResult:
        begin = time.perf_counter()
        ok: bool | None
        daemon_side = False
        try:
            if kind in ("tcp", "http"):
                # Both bound their own waits: tcp skips a scope to save CPU per probe,
                # http bounds only the status line (the body read ends by itself).
                ok, detail = await _checks[kind]()
            else:
                with anyio.fail_after(timeout):
                    ok, detail = await _checks[kind]()
        except Exception as exc:  # a probe never takes the supervisor down
            ok, detail, daemon_side = _no_answer(kind, exc, timeout)
        return ProbeResult(ok, detail, time.perf_counter() - begin, daemon_side)

    async def http() -> tuple[bool | None, str]:
        import httpx

        assert spec.http is not None and client is not None
        try:
            code = await http_status(client, spec.http, timeout=timeout)
        except httpx.HTTPError as exc:
            if daemon_fault(exc) is not None:
                raise
            return False, f"GET {spec.http}: {type(exc).__name__}: {exc}"
        good = code in spec.expect_status if spec.expect_status else 200 <= code < 400
        return good, f"GET {spec.http}: HTTP {code}"

    if spec.tcp is not None:
        tcp_host, tcp_port = _split_host_port(spec.tcp)
        tcp_family = _ip_literal(tcp_host)

    async def tcp() -> tuple[bool | None, str]:
        await probe_tcp(tcp_host, tcp_port, timeout=timeout, family=tcp_family)
        return True, f"tcp {spec.tcp} accepted"

    async def exec_() -> tuple[bool | None, str]:
        assert spec.exec is not None and run_command is not None
        result = await run_command(
            spec.exec, cwd=workdir, env=env, service=service, timeout=timeout
        )
        if getattr(result, "timed_out", False):
            return False, f"exec probe timed out after {timeout:g}s"
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


def _no_answer(kind: str, exc: Exception, timeout: float) -> tuple[bool | None, str, bool]:
    """``(ok, detail, daemon_side)`` for a check that raised ``exc``."""
    fault = daemon_fault(exc)
    if fault is not None:
        return None, f"{fault} ({kind} probe not run; not counted, retried)", True
    if isinstance(exc, TimeoutError):
        return False, f"{kind} probe timed out after {timeout:g}s", False
    if isinstance(exc, OSError):
        return False, f"{kind} probe: {exc.strerror or exc}", False
    return False, f"{kind} probe: {type(exc).__name__}: {exc}", False


class HealthCounter:
    """Counts probe results in a row and says when health changes.

    The counts saturate at their thresholds, so they stay small however long a
    service runs (and whatever the thresholds: a float or a huge count compares
    fine). A result with ``ok is None`` (no verdict) changes nothing: a streak
    of failures goes on across it.

    Args:
        spec: thresholds and ``start_period`` (seconds; clamped by
            :func:`bounded_seconds`).
        started_at: monotonic time of the spawn; failures before
            ``started_at + start_period`` do not count.
    """

    def __init__(self, spec: HealthCheckSpec, *, started_at: float) -> None:
        self.spec = spec
        self.started_at = started_at
        self.grace_until = started_at + bounded_seconds(spec.start_period)
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
            self.successes = min(self.successes + 1, max(self.spec.success_threshold, 1))
            if self.successes >= self.spec.success_threshold:
                self.health = Health.HEALTHY
        else:
            self.successes = 0
            if now < self.grace_until and self.health is not Health.HEALTHY:
                return self.health
            self.failures = min(self.failures + 1, max(self.spec.failure_threshold, 1))
            if self.failures >= self.spec.failure_threshold:
                self.health = Health.UNHEALTHY
        return self.health
