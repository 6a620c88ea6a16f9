"""Kubernetes manifests of hostvisor units (``hostvisor export k8s``, issue 13).

Pure: :class:`~supervisor.spec.ServiceSpec` values and a
:class:`~supervisor.k8s_target.Target` per unit (the image and what
:mod:`supervisor.cli_export` read from env files or the engine) in,
manifests as plain dicts and warnings out. :mod:`supervisor.k8s_probes` maps
``[health]`` and ``[post_start]``, :mod:`supervisor.k8s_cron` the schedules.

What a unit becomes:

- a service -> a ``Deployment`` (apps/v1, ``replicas`` 1, 0 with ``autostart =
  false``); a scheduled unit -> a ``CronJob`` (batch/v1); a one-shot -> a ``Job``;
- ``port`` -> ``containerPort`` and a ``ClusterIP`` ``Service`` (``port`` = the unit's
  port, ``targetPort`` = the container's: they differ for a container unit whose port
  Docker publishes elsewhere);
- variables from ``env_files`` and ``secret_env_files``, and every value hostvisor
  treats as secret (:meth:`~supervisor.spec.ServiceSpec.secret_values`) -> one
  ``Secret`` ``<name>-env`` referenced with ``envFrom`` (values only with
  ``include_secrets``; otherwise the keys with empty values, and a warning); the rest
  of ``env`` -> ``env``. A secret value inside a command becomes ``$(VAR)``, which
  Kubernetes expands from the container's environment; every other ``$`` that
  Kubernetes would read as a reference is doubled (``$$``), so commands and values run
  exactly as written;
- ``preflight`` -> an init container running its command in the same image;
  ``depends_on`` -> an init container per dependency (before the preflight) that waits
  until the dependency's Service accepts TCP connections.

Object names are DNS-1035 labels (a Service's rule; every object of a unit shares the
name): lower case, ``.`` and ``_`` become ``-``, a name not starting with a letter gets
``hv-``, at most 63 characters (52 for a CronJob, whose Jobs add 11). Every object and
pod template carries ``app.kubernetes.io/name`` (the selectors use it) and
``app.kubernetes.io/managed-by: hostvisor``. Objects come in Helm's install order
(Secrets, Services, Deployments, Jobs, CronJobs), by name within a kind.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from supervisor.k8s_cron import ScheduleNotMappable, cron_schedule
from supervisor.k8s_probes import Warn, post_start_hook, probes, seconds_text, whole_seconds
from supervisor.k8s_target import ExportError, Target, leaks, sensitive
from supervisor.spec import BackoffSpec, LogSpec, ServiceSpec
from supervisor.states import DependencyCondition, Restart

__all__ = [
    "KIND_ORDER",
    "LABEL_MANAGED",
    "LABEL_NAME",
    "WAIT_IMAGE",
    "Export",
    "build",
    "object_name",
]

LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
#: The image of the init containers that wait for a dependency (its ``nc -z``).
WAIT_IMAGE = "busybox:1.36"
#: Helm's install order for the kinds made here.
KIND_ORDER = ("Secret", "Service", "Deployment", "Job", "CronJob")
#: The seconds a missed trigger may be late and still run under ``catch_up = "none"``
#: (the daemon's :data:`supervisor.schedule.GRACE`).
LATE_OK = 60
_NAME_LIMIT, _CRONJOB_LIMIT = 63, 52
_SIGTERM = 15
_REFERENCE = re.compile(r"\$(?=[($])")


@dataclass(slots=True)
class Export:
    """The result of :func:`build`: ``objects`` (manifests, in order), ``warnings`` and
    ``errors`` (``"NAME: message"`` lines; no object should be used if there are any)."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def object_name(unit: str, *, limit: int = _NAME_LIMIT) -> str:
    """The Kubernetes name of unit ``unit``: a DNS-1035 label of at most ``limit``
    characters (module docstring)."""
    name = re.sub(r"[^a-z0-9-]", "-", unit.lower()).strip("-")
    if not name[:1].isalpha():
        name = f"hv-{name}"
    return name[:limit].rstrip("-")


# ---------------------------------------------------------------------------- build


@dataclass(slots=True)
class _Build:
    names: dict[str, str]
    selected: frozenset[str]
    config: Mapping[str, ServiceSpec]
    namespace: str | None
    include_secrets: bool
    out: Export
    #: ``id`` of each generated init container that waits for a dependency (only
    #: object names and ports: not searched for secret values).
    waits: set[int] = field(default_factory=set)


def build(
    units: Sequence[ServiceSpec],
    targets: Mapping[str, Target],
    *,
    config: Mapping[str, ServiceSpec],
    namespace: str | None = None,
    include_secrets: bool = False,
) -> Export:
    """The manifests of ``units`` (module docstring).

    Args:
        units: the units to export.
        targets: unit name -> its :class:`Target`, for each of ``units``.
        config: every unit of the config by name (the dependencies of ``units``).
        namespace: ``metadata.namespace`` of every object, or ``None``.
        include_secrets: put the Secret values in (``stringData``).

    Returns:
        An :class:`Export`; with ``errors`` its objects are incomplete.
    """
    out = Export()
    if namespace is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
                                                  namespace):  # fmt: skip
        out.errors.append(f"--namespace {namespace!r}: not a namespace name (a DNS-1123 "
                          "label: a-z, 0-9 and -, at most 63 characters)")  # fmt: skip
    names = {
        name: object_name(name, limit=_CRONJOB_LIMIT if spec.schedule else _NAME_LIMIT)
        for name, spec in config.items()
    }
    ctx = _Build(names, frozenset(u.name for u in units), config, namespace,
                 include_secrets, out)  # fmt: skip
    taken: dict[str, str] = {}
    for spec in units:
        other = taken.setdefault(names[spec.name], spec.name)
        if other != spec.name:
            out.errors.append(f"{spec.name}: its Kubernetes name {names[spec.name]} is also "
                              f"the name of {other}: rename one of the units")  # fmt: skip
    for spec in units:
        try:
            out.objects.extend(_unit_objects(spec, targets[spec.name], ctx))
        except ExportError as exc:
            out.errors.append(f"{spec.name}: {exc}")
    out.objects.sort(key=lambda o: (KIND_ORDER.index(o["kind"]), o["metadata"]["name"]))
    return out


def _unit_objects(spec: ServiceSpec, target: Target, ctx: _Build) -> list[dict[str, Any]]:
    def warn(message: str) -> None:
        ctx.out.warnings.append(f"{spec.name}: {message}")

    name = ctx.names[spec.name]
    if name != spec.name:
        limit = _CRONJOB_LIMIT if spec.schedule is not None else _NAME_LIMIT
        warn(f"named {name} in Kubernetes (object names are DNS-1035 labels: a-z, 0-9 and -, "
             f"starting with a letter, at most {limit} characters)")  # fmt: skip
    for note in target.notes:
        warn(note)
    schedule: str | None = None
    if spec.schedule is not None:
        try:
            schedule = cron_schedule(spec.schedule)
        except ScheduleNotMappable as exc:
            raise ExportError(str(exc)) from None
    objects: list[dict[str, Any]] = []
    secret = _secret(spec, target, ctx, warn)
    if secret is not None:
        objects.append(secret)
    container = _container(spec, target, ctx, warn, secret=secret is not None)
    pod = _pod(spec, target, container, ctx, warn)
    _common_warnings(spec, warn)
    if schedule is not None:
        objects.append(_cronjob(spec, name, pod, ctx, warn, schedule=schedule))
    elif spec.is_job:
        body = {"spec": _job_spec(spec, name, pod, ctx, warn)}
        objects.append(_object("batch/v1", "Job", name, ctx, body, description=spec.description))
    else:
        objects.append(_deployment(spec, name, pod, ctx, warn))
        if spec.port is not None:
            objects.append(_service(spec, target, name, ctx))
    if not ctx.include_secrets:
        _check_leaks(spec, objects, target, ctx, warn)
    return objects


def _labels(name: str) -> dict[str, str]:
    return {LABEL_NAME: name, LABEL_MANAGED: "hostvisor"}


def _object(
    api: str, kind: str, name: str, ctx: _Build, body: dict[str, Any], *, description: str = ""
) -> dict[str, Any]:
    """An object: apiVersion, kind, metadata, then ``body``'s keys (``spec``, or a
    Secret's ``type`` and ``stringData``)."""
    meta: dict[str, Any] = {"name": name}
    if ctx.namespace is not None:
        meta["namespace"] = ctx.namespace
    meta["labels"] = _labels(name.removesuffix("-env") if kind == "Secret" else name)
    if description:
        meta["annotations"] = {"kubernetes.io/description": description}
    return {"apiVersion": api, "kind": kind, "metadata": meta, **body}


def _escape(text: str, hidden: Sequence[tuple[str, str]]) -> str:
    """``text`` as Kubernetes must get it in ``command``, ``args`` or an env ``value``:
    ``$`` before ``(`` or ``$`` doubled, each hidden value replaced by ``$(KEY)``."""
    escaped = _REFERENCE.sub("$$", text)
    for key, value in hidden:
        escaped = escaped.replace(_REFERENCE.sub("$$", value), f"$({key})")
    return escaped


def _hidden(target: Target) -> list[tuple[str, str]]:
    """(key, value) of the Secret's secret values, which commands reference, longest first."""
    pairs = [(k, v) for k, v in target.env.items() if k in target.secret_keys]
    return sorted(
        ((k, v) for k, v in pairs if v in target.secret_values), key=lambda kv: -len(kv[1])
    )


def _argv(argv: Sequence[str], target: Target) -> list[str]:
    hidden = _hidden(target)
    return [_escape(arg, hidden) for arg in argv]


def _secret(spec: ServiceSpec, target: Target, ctx: _Build, warn: Warn) -> dict[str, Any] | None:
    keys = [k for k in target.env if k in target.secret_keys]
    if not keys:
        return None
    name = f"{ctx.names[spec.name]}-env"
    data = {k: target.env[k] if ctx.include_secrets else "" for k in keys}
    if not ctx.include_secrets:
        warn(f"Secret {name}: {len(keys)} key{'s' if len(keys) > 1 else ''} "
             f"({', '.join(keys)}) with empty values: fill them in the cluster, or export "
             "with --include-secrets")  # fmt: skip
    return _object("v1", "Secret", name, ctx, {"type": "Opaque", "stringData": data})


def _container(
    spec: ServiceSpec, target: Target, ctx: _Build, warn: Warn, *, secret: bool
) -> dict[str, Any]:
    """The main container, its keys in the order kubectl shows them."""
    name = ctx.names[spec.name]
    container: dict[str, Any] = {"name": name, "image": target.image}
    if target.command is not None:
        container["command"] = _argv(target.command, target)
    if target.args is not None:
        container["args"] = _argv(target.args, target)
    if target.workdir:
        container["workingDir"] = target.workdir
    if spec.port is not None:
        inside = target.ports.get(spec.port.number, spec.port.number)
        container["ports"] = [{"containerPort": inside, "protocol": "TCP"}]
        if not target.ports_known:
            probed = " the probes' ports and" if spec.health is not None else ""
            warn(f"containerPort and targetPort {inside} are the host port: the container's "
                 f"port is unknown without the engine; edit them (and{probed} the Service's "
                 "targetPort) to the port the container listens on")  # fmt: skip
    plain = [(k, v) for k, v in target.env.items() if k not in target.secret_keys]
    if plain:
        hidden = _hidden(target)
        container["env"] = [{"name": k, "value": _escape(v, hidden)} for k, v in plain]
    if secret:
        container["envFrom"] = [{"secretRef": {"name": f"{name}-env"}}]
    if spec.max_memory is not None:
        container["resources"] = {"limits": {"memory": _quantity(spec.max_memory)}}
        warn(f"max_memory: the container is OOM-killed as soon as it passes the limit "
             f"(memory_grace {seconds_text(spec.memory_grace)} is not carried)")  # fmt: skip
    container_unit = spec.kind == "container"
    if spec.health is not None:
        container.update(probes(spec.health, target.ports, warn, container_unit=container_unit))
    if spec.post_start is not None:
        hook = post_start_hook(spec.post_start, target.ports, warn, container_unit=container_unit)
        if hook is not None:
            container["lifecycle"] = hook
    return container


def _pod(
    spec: ServiceSpec, target: Target, container: dict[str, Any], ctx: _Build, warn: Warn
) -> dict[str, Any]:
    pod: dict[str, Any] = {"restartPolicy": _restart_policy(spec)}
    pod["terminationGracePeriodSeconds"] = whole_seconds(
        spec.stop.timeout, "stop_timeout", warn, minimum=0
    )
    init = _waits(spec, ctx, warn)
    if spec.preflight is not None:
        init.append(_preflight(spec, target, container, ctx, warn))
    taken = {container["name"]}
    for item in init:
        unique = _unique_name(item["name"], taken)
        if unique != item["name"]:
            warn(f"init container {item['name']} named {unique} (the names of a pod's "
                 "containers must differ)")  # fmt: skip
            item["name"] = unique
        taken.add(unique)
    if init:
        pod["initContainers"] = init
    pod["containers"] = [container]
    return pod


def _unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... (cut to fit 63 characters, a DNS-1123
    label) if ``taken`` has it."""
    unique, number = name, 1
    while unique in taken:
        number += 1
        suffix = f"-{number}"
        unique = name[: _NAME_LIMIT - len(suffix)].rstrip("-") + suffix
    return unique


def _check_leaks(
    spec: ServiceSpec, objects: list[dict[str, Any]], target: Target, ctx: _Build, warn: Warn
) -> None:
    """Secret values (:func:`~supervisor.k8s_target.sensitive`) outside the Secret,
    once commands, args and env values reference them as ``$(VAR)``: the description
    annotation is dropped, with a warning; anywhere else (probes, hooks, workingDir, an
    init container...) each is an error naming the field, as Kubernetes expands no
    ``$(VAR)`` there. No message holds the value."""
    secrets = sensitive(target)
    if not secrets:
        return
    skip = frozenset(ctx.waits)
    dropped: set[str] = set()
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        meta = obj["metadata"]
        for var, _ in leaks(meta.get("annotations") or {}, secrets):
            dropped.add(var)
            meta.pop("annotations", None)
        for var, path in leaks({k: v for k, v in obj.items() if k != "metadata"}, secrets, skip):
            ctx.out.errors.append(
                f"{spec.name}: the value of {var}, a secret, appears in {_field(obj, path)}, "
                "where Kubernetes cannot take it from the Secret: export with "
                "--include-secrets, or have the command read the variable"
            )
    if dropped:
        warn(f"description: not exported (the kubernetes.io/description annotation): it "
             f"holds the value of {', '.join(sorted(dropped))}, a secret")  # fmt: skip


def _field(obj: dict[str, Any], path: tuple[str | int, ...]) -> str:
    """``path`` in ``obj`` for a message: ``the container's livenessProbe
    (Deployment spec.template.spec.containers[0].livenessProbe.exec.command[2])``."""
    dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    where = f"the {obj['kind']}'s {path[0] if path else 'text'}"
    node: Any = obj
    for i, part in enumerate(path):
        node = node[part]
        if part in ("containers", "initContainers") and i + 2 < len(path):
            key, box = path[i + 2], node[path[i + 1]]
            where = ("the container's " if part == "containers"
                     else f"the init container {box['name']}'s ") + str(key)  # fmt: skip
            break
    return f"{where} ({obj['kind']} {dotted})"


def _preflight(
    spec: ServiceSpec, target: Target, container: dict[str, Any], ctx: _Build, warn: Warn
) -> dict[str, Any]:
    assert spec.preflight is not None
    init: dict[str, Any] = {"name": "preflight", "image": target.image}
    init["command"] = _argv(spec.preflight.command, target)
    for key in ("workingDir", "env", "envFrom"):
        if key in container:
            init[key] = copy.deepcopy(container[key])
    where = " (hostvisor ran it on the host)" if spec.kind == "container" else ""
    warn(f"preflight: an init container in the image{where}; it runs once per pod, not "
         f"before every restart, and its timeout ({seconds_text(spec.preflight.timeout)}) is "
         "not carried")  # fmt: skip
    return init


def _waits(spec: ServiceSpec, ctx: _Build, warn: Warn) -> list[dict[str, Any]]:
    waits: list[dict[str, Any]] = []
    for dep, condition in spec.depends_on.items():
        other = ctx.config.get(dep)
        outside = "" if dep in ctx.selected else f"; {dep} is not in this export"
        if other is None or other.is_job or condition is DependencyCondition.COMPLETED:
            warn(f'depends_on {dep} ("{condition}"): not carried: Kubernetes does not start a '
                 "pod after a Job; run the Job first (kubectl wait --for=condition=complete "
                 f"job/{ctx.names.get(dep, dep)}){outside}")  # fmt: skip
            continue
        if other.port is None:
            warn(f"depends_on {dep}: not carried: {dep} has no port, hence no Service to "
                 f"wait for{outside}")  # fmt: skip
            continue
        host, port = ctx.names[dep], other.port.number
        waits.append({
            "name": f"wait-{host}"[:_NAME_LIMIT].rstrip("-"),
            "image": WAIT_IMAGE,
            "command": ["sh", "-c", f"until nc -z -w 2 {host} {port}; do echo waiting for "
                        f"{host}:{port}; sleep 2; done"],
        })  # fmt: skip
        ctx.waits.add(id(waits[-1]))
        warn(f'depends_on {dep} ("{condition}"): becomes "Service {host}:{port} is '
             "reachable\", checked once before the pod starts (a ready pod, when "
             f"{dep} has a readinessProbe); not re-checked afterwards{outside}")  # fmt: skip
    return waits


def _restart_policy(spec: ServiceSpec) -> str:
    if not spec.is_job:
        return "Always"
    return "OnFailure" if spec.restart is Restart.ON_FAILURE else "Never"


def _common_warnings(spec: ServiceSpec, warn: Warn) -> None:
    if spec.stop.signal != _SIGTERM:
        import signal

        sig = signal.Signals(spec.stop.signal).name
        warn(f"stop_signal {sig}: not carried: Kubernetes sends the image's STOPSIGNAL "
             f"(SIGTERM by default): set STOPSIGNAL {sig} in the image (or "
             "lifecycle.stopSignal where the cluster has the ContainerStopSignals "
             "feature)")  # fmt: skip
    if spec.on_failure is not None:
        warn("on_failure: not carried: Kubernetes runs no command when a pod or Job fails; "
             "alert on its events or the Job's Failed condition")  # fmt: skip
    if spec.logs != LogSpec():
        warn("logs: rotation is not carried: the kubelet rotates container logs "
             "(containerLogMaxSize, containerLogMaxFiles)")  # fmt: skip
    if spec.port is not None and spec.port.reclaim != "own":
        warn(f'reclaim_port "{spec.port.reclaim}": not carried: a pod has its own network, '
             "no stale process holds its port")  # fmt: skip
    if spec.backoff != BackoffSpec() and spec.restart is not Restart.NO:
        warn("backoff: not carried: the kubelet waits 10s before a restart, doubling up to "
             "5m (a Job's pods: up to 6m)")  # fmt: skip


def _deployment(
    spec: ServiceSpec, name: str, pod: dict[str, Any], ctx: _Build, warn: Warn
) -> dict[str, Any]:
    if spec.restart is not Restart.ALWAYS:
        warn(f'restart "{spec.restart}": a Deployment restarts its containers whatever '
             "their exit status (restartPolicy Always)")  # fmt: skip
    if spec.give_up_after:
        warn(f"give_up_after {spec.give_up_after}: not carried: Kubernetes never gives up "
             "on a Deployment's pod (CrashLoopBackOff)")  # fmt: skip
    if not spec.autostart:
        warn("autostart = false: replicas 0 (kubectl scale --replicas=1 to start it)")
    body: dict[str, Any] = {
        "replicas": 1 if spec.autostart else 0,
        "selector": {"matchLabels": {LABEL_NAME: name}},
    }
    if spec.health is None:
        body["minReadySeconds"] = whole_seconds(
            spec.start_seconds, "start_seconds", warn, minimum=0
        )
    body["template"] = {"metadata": {"labels": _labels(name)}, "spec": pod}
    return _object("apps/v1", "Deployment", name, ctx, {"spec": body}, description=spec.description)


def _service(spec: ServiceSpec, target: Target, name: str, ctx: _Build) -> dict[str, Any]:
    assert spec.port is not None
    port = spec.port.number
    body = {
        "type": "ClusterIP",
        "selector": {LABEL_NAME: name},
        "ports": [{"port": port, "targetPort": target.ports.get(port, port), "protocol": "TCP"}],
    }
    return _object("v1", "Service", name, ctx, {"spec": body})


def _job_spec(
    spec: ServiceSpec, name: str, pod: dict[str, Any], ctx: _Build, warn: Warn
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if spec.restart is Restart.ON_FAILURE:
        if spec.give_up_after:
            body["backoffLimit"] = spec.give_up_after - 1
        else:
            until = "the next trigger" if spec.schedule is not None else "it succeeds"
            warn(f"give_up_after 0 (retry until {until}): Kubernetes retries a Job "
                 "backoffLimit times (default 6)")  # fmt: skip
    else:
        body["backoffLimit"] = 0
    if spec.run_timeout is not None:
        body["activeDeadlineSeconds"] = whole_seconds(spec.run_timeout, "run_timeout", warn)
    if not spec.autostart and spec.schedule is None:
        body["suspend"] = True
        warn("autostart = false: the Job is suspended (kubectl patch job "
             f"{name} -p '{{\"spec\":{{\"suspend\":false}}}}' runs it)")  # fmt: skip
    body["template"] = {"metadata": {"labels": _labels(name)}, "spec": pod}
    return body


def _cronjob(
    spec: ServiceSpec, name: str, pod: dict[str, Any], ctx: _Build, warn: Warn, *, schedule: str
) -> dict[str, Any]:
    sched = spec.schedule
    assert sched is not None
    body: dict[str, Any] = {"schedule": schedule}
    if sched.every is not None:
        warn(f"every {sched.every_text}: runs on the clock ({schedule!r}), not "
             f"{sched.every_text} after the last run")  # fmt: skip
    if sched.timezone:
        body["timeZone"] = sched.timezone
    elif sched.cron is not None:
        warn("schedule_timezone not set: the CronJob runs in the kube-controller-manager's "
             "time zone (often UTC), not this host's; set it to keep the host's")  # fmt: skip
    body["concurrencyPolicy"] = sched.concurrency.capitalize()
    if sched.catch_up == "none":
        body["startingDeadlineSeconds"] = LATE_OK
    if sched.random_delay > 0:
        warn(f"random_delay {seconds_text(sched.random_delay)}: not carried: a CronJob "
             "starts its Job on the trigger")  # fmt: skip
    if not spec.autostart:
        body["suspend"] = True
        warn("autostart = false: the CronJob is suspended (no trigger fires until "
             "spec.suspend is false)")  # fmt: skip
    job = _job_spec(spec, name, pod, ctx, warn)
    body["jobTemplate"] = {"metadata": {"labels": _labels(name)}, "spec": job}
    return _object("batch/v1", "CronJob", name, ctx, {"spec": body}, description=spec.description)


def _quantity(size: int) -> str:
    """Bytes as a Kubernetes quantity: ``2Gi``, ``500M``, else the number."""
    for suffix, unit in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024),
                         ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):  # fmt: skip
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
