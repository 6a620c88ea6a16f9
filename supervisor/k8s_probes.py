"""``[health]`` as Kubernetes probes, ``[post_start]`` as a ``postStart`` hook.

Pure: values in, plain dicts out, and warnings through a callback (one line each,
without the unit name). Kubernetes' rules (core/v1 ``Probe``,
https://kubernetes.io/docs/concepts/configuration/liveness-readiness-startup-probes/):

- ``periodSeconds`` and ``timeoutSeconds`` are whole seconds, at least 1: a duration
  that is not is rounded up, with a warning.
- hostvisor's one probe both restarts (``failure_threshold`` failures in a row) and
  gates "healthy" (``success_threshold`` successes): it becomes a ``livenessProbe``
  (``successThreshold`` must be 1) and a ``readinessProbe`` (``successThreshold`` =
  ``success_threshold``) with the same handler and timing.
- ``start_period`` (failures in that window after the spawn do not count) becomes a
  ``startupProbe`` (it holds the other two back until its first success) with
  ``failureThreshold = ceil(start_period / period) + failure_threshold``: a container
  that never gets healthy is restarted after the same time as under hostvisor,
  ``start_period`` then ``failure_threshold`` periods.
- ``httpGet`` and ``tcpSocket`` never carry ``host`` for a loopback (or unspecified)
  address: the kubelet probes the pod's IP, where the app listens. Another host is
  dropped too, with a warning: a probe that checks some other machine says nothing
  about this pod.
- Ports go through ``ports`` (host port -> container port) for container units,
  whose probes address the port Docker published.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from supervisor.spec import HealthCheckSpec, PostStartSpec

__all__ = ["Warn", "post_start_hook", "probes", "seconds_text", "whole_seconds"]

#: Takes one warning (no unit name, no trailing period).
Warn = Callable[[str], None]
#: The status codes the kubelet counts as a success (``httpGet``).
_KUBELET_OK = range(200, 400)


def seconds_text(seconds: float) -> str:
    """``0.5`` -> ``"0.5s"``, ``10.0`` -> ``"10s"`` (for messages)."""
    return f"{seconds:g}s"


def whole_seconds(seconds: float, key: str, warn: Warn, *, minimum: int = 1) -> int:
    """``seconds`` rounded up to whole seconds, at least ``minimum``; warns naming ``key``
    (``health.interval``) when that changed the value. Returns an int (seconds)."""
    whole = max(minimum, math.ceil(round(seconds, 6)))
    if whole != seconds:
        low = f", at least {minimum}" if seconds < minimum else ""
        warn(f"{key} {seconds_text(seconds)} -> {whole}s (Kubernetes counts whole seconds{low})")
    return whole


def probes(
    health: HealthCheckSpec, ports: Mapping[int, int], warn: Warn, *, container_unit: bool
) -> dict[str, dict[str, Any]]:
    """The probes of a container spec for ``health`` (module docstring).

    Args:
        health: the unit's ``[health]``.
        ports: host port -> container port, for the probe's port.
        warn: takes each warning.
        container_unit: an exec probe ran on the host (hostvisor), not in the container.

    Returns:
        ``{"startupProbe": ..., "livenessProbe": ..., "readinessProbe": ...}`` (the first
        only with a ``start_period``), or ``{}`` for ``docker = true``.
    """
    handler = _probe_handler(health, ports, warn, container_unit=container_unit)
    if handler is None:
        return {}
    if health.expect_status and any(code not in _KUBELET_OK for code in health.expect_status):
        codes = ", ".join(str(c) for c in health.expect_status)
        warn(f"health.expect_status [{codes}]: not carried: the kubelet counts 200-399 as "
             "healthy and everything else as a failure")  # fmt: skip
    elif health.expect_status:
        warn("health.expect_status: the kubelet counts any 200-399 as healthy, not only "
             "the listed statuses")  # fmt: skip
    period = whole_seconds(health.interval, "health.interval", warn)
    timeout = whole_seconds(health.timeout, "health.timeout", warn)
    found: dict[str, dict[str, Any]] = {}
    if health.start_period > 0:
        window = max(1, math.ceil(round(health.start_period / period, 6)))
        found["startupProbe"] = _probe(
            handler, period, timeout, 1, window + health.failure_threshold
        )
    found["livenessProbe"] = _probe(handler, period, timeout, 1, health.failure_threshold)
    found["readinessProbe"] = _probe(
        handler, period, timeout, health.success_threshold, health.failure_threshold
    )
    return found


def _probe(
    handler: dict[str, Any], period: int, timeout: int, success: int, failure: int
) -> dict[str, Any]:
    return {
        **handler,
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "successThreshold": success,
        "failureThreshold": failure,
    }


def _probe_handler(
    health: HealthCheckSpec, ports: Mapping[int, int], warn: Warn, *, container_unit: bool
) -> dict[str, Any] | None:
    if health.http is not None:
        return {"httpGet": http_get(health.http, ports, warn, "health.http")}
    if health.tcp is not None:
        host, _, port_text = health.tcp.rpartition(":")
        _drop_host(host.strip("[]"), "health.tcp", warn)
        return {"tcpSocket": {"port": _port(int(port_text), ports)}}
    if health.exec is not None:
        if container_unit:
            warn("health.exec: hostvisor ran it on the host; the kubelet runs it inside the "
                 "container, where the command must exist")  # fmt: skip
        return {"exec": {"command": list(health.exec)}}
    warn("health.docker: no probe: the kubelet does not run the image's HEALTHCHECK; "
         "write the check as an exec, http or tcp probe")  # fmt: skip
    return None


def http_get(url: str, ports: Mapping[int, int], warn: Warn, key: str) -> dict[str, Any]:
    """An ``httpGet`` action (probe or hook) for ``url``: ``path`` (with the query),
    ``port`` (through ``ports``; 80/443 by default) and ``scheme``; never ``host``
    (module docstring). Credentials in the URL are dropped with a warning."""
    parts = urlsplit(url)
    scheme = parts.scheme.upper()
    _drop_host(parts.hostname or "", key, warn)
    if parts.username is not None or parts.password is not None:
        warn(f"{key}: the user and password of the URL are dropped (set an Authorization "
             "header in httpHeaders)")  # fmt: skip
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    port = parts.port or (443 if scheme == "HTTPS" else 80)
    return {"path": path, "port": _port(port, ports), "scheme": scheme}


def _port(port: int, ports: Mapping[int, int]) -> int:
    return ports.get(port, port)


def _drop_host(host: str, key: str, warn: Warn) -> None:
    if not host or host.lower() == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and (address.is_loopback or address.is_unspecified):
        return
    warn(f"{key}: host {host} dropped: the kubelet checks the pod's own IP")


def post_start_hook(
    hook: PostStartSpec, ports: Mapping[int, int], warn: Warn, *, container_unit: bool
) -> dict[str, Any] | None:
    """``lifecycle.postStart`` for ``[post_start]``: ``exec`` for a command, ``httpGet``
    for an http GET; ``None`` (with a warning) for another method, which postStart cannot
    send. Always warns what changes: Kubernetes runs the hook as soon as the container is
    created (beside its entrypoint, not once it is running or healthy), a failing hook
    kills the container (hostvisor only logs it), and the hook has no timeout."""
    if hook.command is not None:
        action: dict[str, Any] = {"exec": {"command": list(hook.command)}}
        if container_unit:
            warn("post_start.command: hostvisor ran it on the host; Kubernetes runs it inside "
                 "the container")  # fmt: skip
    elif hook.http is not None and hook.method == "GET":
        action = {"httpGet": http_get(hook.http, ports, warn, "post_start.http")}
    else:
        warn(f"post_start: the {hook.method} request is not carried: a postStart hook can "
             "only send a GET; make the call from the app, or from an exec hook with curl in "
             "the image")  # fmt: skip
        return None
    warn(
        "post_start: Kubernetes runs it as soon as the container is created (not once it "
        "is running or healthy), a failing hook kills the container (hostvisor logs it), "
        f"and its timeout ({seconds_text(hook.timeout)}) is not carried"
    )
    return {"postStart": action}
