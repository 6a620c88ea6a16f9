"""``hostvisor import compose``: a Compose file (``docker-compose.yml``, ``compose.yaml``).

Each service becomes a container unit named after the container Compose gives it
(:mod:`supervisor.importers.compose_file`: ``PROJECT-SERVICE-1`` for Compose v2,
``PROJECT_SERVICE_1`` for v1, or ``container_name``; unique on an engine, unlike a service
name such as ``db``). The unit keeps that container up and, when it is missing, recreates
it from the file: ``recreate_command = [COMPOSE..., "-p", PROJECT, "-f", FILE, "up", "-d",
"--no-deps", SERVICE]`` in the file's folder (``--no-deps``: each container of the stack is
its own unit, recreated by it in dependency order, so one recreate never touches
another), with the Compose the host has (``docker compose``, or ``docker-compose`` where
only v1 exists; ``HOSTVISOR_COMPOSE=v1|v2`` decides for another host).

Mapped: ``container_name``, ``depends_on`` (list, or ``condition: service_started |
service_healthy``; ``links``/``volumes_from``/``network_mode: service:x`` order starts
too), ``healthcheck`` (``[health] docker = true``, Compose's ``interval``), the first
published TCP port of ``ports``, ``restart`` / ``deploy.restart_policy.condition``,
``stop_grace_period``, ``profiles`` and 0 replicas (``autostart = false``). What Compose
keeps in the file (image, command, environment, volumes, networks ...) is not copied: the
container has it, and ``recreate_command`` recreates it from the file. Every other key is
reported with the reason. The file is read, never run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from supervisor.importers import Converted, FileResult, ImportContext, ImportFailed, Source
from supervisor.importers import compose_file as cf
from supervisor.importers import unit_name as valid_name

__all__ = ["convert"]

KEPT = "Compose keeps it: recreate_command recreates the container from the file"
#: The Compose Specification's service keys that stay with the container.
_KEPT_KEYS = frozenset(
    """
    annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs
    cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus
    cpuset credential_spec develop device_cgroup_rules devices dns dns_opt dns_search domainname
    entrypoint env_file environment expose external_links extra_hosts gpus group_add hostname
    image init ipc isolation label_file labels links logging mac_address mem_limit
    mem_reservation mem_swappiness memswap_limit models network_mode networks oom_kill_disable
    oom_score_adj pid pids_limit platform post_start pre_stop privileged provider pull_policy
    read_only runtime secrets security_opt shm_size stdin_open storage_opt sysctls tmpfs tty
    ulimits use_api_socket user userns_mode uts volumes volumes_from working_dir
    """.split()  # noqa: SIM905 -- a word list reads better than 80 quoted strings
)
#: Service keys this module maps (or reports itself).
_HANDLED = frozenset(
    {"container_name", "depends_on", "healthcheck", "ports", "restart", "stop_signal"}
    | {"stop_grace_period", "scale", "deploy", "profiles", "extends"}
)
#: Keys whose value the report shows (others may hold a command line or a secret).
_SHOWN = frozenset({"image", "network_mode", "platform", "pull_policy", "user"})
_FILE_KEYS = {
    "version": "informational only (the Compose Specification ignores it)",
    "networks": "file-level: Compose creates them when it recreates a container",
    "volumes": "file-level: Compose creates them when it recreates a container",
    "secrets": "file-level: Compose mounts them when it recreates a container",
    "configs": "file-level: Compose mounts them when it recreates a container",
    "include": "the included files' services are not imported: import those files too",
    "models": "file-level: Compose runs them; hostvisor has no model units",
}
_EXTENSION = "an extension (x-), ignored by Compose too"
_UNKNOWN = "not known to hostvisor import"
_RESTART = {"always": "always", "unless-stopped": "always", "on-failure": "on-failure", "no": "no"}
_CONDITION_RESTART = {"none": "no", "on-failure": "on-failure", "any": "always"}
_CONDITIONS = {"service_started": "started", "service_healthy": "healthy"}
_COMPLETED = "service_completed_successfully"
_HEALTH_OWN = ("test", "timeout", "retries", "start_period", "start_interval")


def convert(source: Source, ctx: ImportContext) -> FileResult:
    """Every service of the Compose file ``source`` as a container unit (module docstring).

    Raises:
        ImportFailed: not YAML (the line), not a mapping, no ``services`` or none in it, a
            service that is not a mapping (its key), no project name, or a bad
            ``HOSTVISOR_COMPOSE``.
    """
    doc = cf.load(source.text)
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        raise ImportFailed("no `services:` with at least one service (is it a Compose file?)")
    for key, body in services.items():
        if body is not None and not isinstance(body, dict):
            raise ImportFailed(f"services.{key}: expected a mapping, got {type(body).__name__}")
    stdin = source.label == "<stdin>"
    path = os.path.abspath(source.path)
    folder = os.getcwd() if stdin else os.path.dirname(path)  # Compose's project directory
    dotenv = cf.read_dotenv(os.path.join(folder, ".env"))
    env = {**dotenv, **ctx.environ}  # the environment wins over .env, as in Compose
    result = FileResult()
    shell = {key for key, value in ctx.environ.items() if dotenv.get(key) != value}
    doc = _interpolated(doc, env, result, shell=shell)
    services = doc["services"]
    version, command, how = cf.detect_compose(ctx.environ)
    project, why, unused = cf.project_name(doc, version, env, folder)
    result.unmapped += unused
    sep = "-" if version == "v2" else "_"
    result.notes.append(
        f"Compose {version} ({how}): project {project!r} ({why}); containers are named "
        f"{project.lstrip('-_')}{sep}SERVICE{sep}1 unless container_name is set"
    )
    for key in doc:
        if key not in ("services", "name"):
            fallback = _EXTENSION if str(key).startswith("x-") else _UNKNOWN
            result.unmapped.append((str(key), _FILE_KEYS.get(key, fallback)))
    recreate = None if stdin else [*command, "-p", project, "-f", path]
    if recreate is None:
        result.notes.append(
            "read from standard input: no recreate_command (the file's path is unknown); "
            "pass the file's path to get one"
        )
    elif (override := cf.override_file(path)) is not None:
        recreate += ["-f", override]
        result.notes.append(
            f"{os.path.basename(override)} beside it is read by a plain `up`: recreate_command "
            "names it too, but its settings were not imported (import the merged file of "
            "`docker compose config` to see them)"
        )
    bodies: dict[str, dict[str, Any]] = {str(k): v or {} for k, v in services.items()}
    containers = {n: cf.container_name(project, n, b, version) for n, b in bodies.items()}
    units = {name: valid_name(container) for name, container in containers.items()}
    awaited = {d for b in bodies.values() for d, c in _deps(b).items() if c == _COMPLETED}
    profiles = env.get("COMPOSE_PROFILES", "")
    active = {p.strip() for p in profiles.split(",") if p.strip()}
    for name, body in bodies.items():
        unit = Converted(original=name, name=units[name], table={})
        unit.table["description"] = f"{name} of the Compose project {project}"
        unit.table["container"] = containers[name]
        _container(unit, name, body)
        if recreate is not None:
            unit.table["recreate_command"] = [*recreate, "up", "-d", "--no-deps", name]
            unit.table["workdir"] = folder
            unit.map("(the file, its project and the service)", "recreate_command, workdir")
        _service(unit, name, body, bodies, units)
        _restart(unit, body, awaited=name in awaited)
        _profiles(unit, body.get("profiles"), active)
        result.units.append(unit)
    return result


def _interpolated(
    doc: dict[str, Any], env: Mapping[str, str], result: FileResult, *, shell: set[str]
) -> dict[str, Any]:
    """``doc`` interpolated (:func:`compose_file.interpolate`), with notes on variables."""
    out, used, missing, required = cf.interpolate(doc, env)
    if missing:
        names = ", ".join(sorted(missing))
        result.notes.append(f"variables not set, read as empty (as Compose does): {names}")
    if required:
        result.notes.append(
            f"Compose refuses the file while these are unset: {', '.join(required)}"
        )
    if used & shell:
        result.notes.append(
            f"the file reads {', '.join(sorted(used & shell))} from this environment: "
            "recreate_command runs Compose with the daemon's environment and the .env file"
        )
    return dict(out)


def _container(unit: Converted, name: str, body: Mapping[str, Any]) -> None:
    given = body.get("container_name")
    if isinstance(given, str) and given:
        unit.map(f"container_name: {given}", "container")
        return
    if given is not None:
        unit.skip("container_name", "not a name: Compose's own name is used")
    unit.map(f"(Compose's name for {name})", "container")


def _service(
    unit: Converted,
    name: str,
    body: dict[str, Any],
    bodies: Mapping[str, Mapping[str, Any]],
    units: Mapping[str, str],
) -> None:
    """Map the keys of the service ``body`` onto ``unit``: every key mapped or skipped."""
    for key, value in body.items():
        key = str(key)
        if key in _KEPT_KEYS:
            unit.skip(_shown(key, value), KEPT)
        elif key.startswith("x-"):
            unit.skip(key, _EXTENSION)
        elif key not in _HANDLED:
            unit.skip(_shown(key, value), _UNKNOWN)
    _depends_on(unit, name, body, bodies, units)
    _health(unit, body.get("healthcheck"))
    _ports(unit, body.get("ports"))
    _stop(unit, body)
    _replicas(unit, body)
    if "extends" in body:
        unit.skip(
            "extends",
            "not followed: what the base service sets (healthcheck, ports, depends_on ...) is "
            "not imported; Compose still applies it",
        )


def _shown(key: str, value: object) -> str:
    if key in _SHOWN and isinstance(value, str | int | float):
        return f"{key}: {value}"
    if isinstance(value, list | dict):
        return f"{key} ({len(value)} {'entry' if len(value) == 1 else 'entries'})"
    return key


def _deps(body: Mapping[str, Any]) -> dict[str, str]:
    """``depends_on`` as service -> Compose condition (the list form: service_started)."""
    raw = body.get("depends_on")
    if isinstance(raw, list):
        return {str(dep): "service_started" for dep in raw}
    if not isinstance(raw, dict):
        return {}
    found: dict[str, str] = {}
    for dep, value in raw.items():
        value = value if isinstance(value, dict) else {}
        found[str(dep)] = str(value.get("condition", "service_started"))
    return found


def _depends_on(
    unit: Converted,
    name: str,
    body: Mapping[str, Any],
    bodies: Mapping[str, Mapping[str, Any]],
    units: Mapping[str, str],
) -> None:
    deps: dict[str, str] = {}
    raw = body.get("depends_on")
    if raw is not None and not isinstance(raw, list | dict):
        unit.skip("depends_on", "not a list or a mapping of services")
    for dep, condition in _deps(body).items():
        setting = f"depends_on.{dep}: {condition}"
        if dep not in units:
            unit.skip(setting, "not a service of this file")
        elif condition == _COMPLETED:
            unit.skip(
                setting,
                'hostvisor\'s "completed" waits for a one-shot process unit, and a container '
                f"unit is never one (Compose's `up` still waits for {dep} to complete)",
            )
        elif condition not in _CONDITIONS:
            unit.skip(setting, "not a Compose condition")
        else:
            deps[units[dep]] = _CONDITIONS[condition]
            unit.map(setting, f"depends_on.{units[dep]} = {_CONDITIONS[condition]}")
            if condition == "service_healthy" and not _health_of(bodies[dep]):
                unit.notes.append(
                    f"waits for {dep} healthy, but {dep} has no healthcheck in the file (Compose "
                    f"waits for its image's HEALTHCHECK): add [health] docker = true to "
                    f"{units[dep]} if the image has one; until then hostvisor waits for it to run"
                )
        extra = raw.get(dep) if isinstance(raw, dict) else None
        for key in extra if isinstance(extra, dict) else ():
            if key == "restart":
                why = "hostvisor does not restart a unit when its dependency restarts"
            elif key == "required":
                why = "a hostvisor dependency is always required"
            else:
                why = "" if key == "condition" else _UNKNOWN
            if why:
                unit.skip(f"depends_on.{dep}.{key}", why)
    for key in ("links", "volumes_from", "network_mode"):
        for dep in _implied(body.get(key)):
            if dep in units and units[dep] not in deps and dep != name:
                deps[units[dep]] = "started"
                unit.map(f"{key} ({dep}, started first by Compose)", f"depends_on.{units[dep]}")
    if not deps:
        return
    simple = all(condition == "started" for condition in deps.values())
    unit.table["depends_on"] = list(deps) if simple else deps


def _implied(value: object) -> list[str]:
    """Services a ``links`` / ``volumes_from`` / ``network_mode`` value makes Compose
    start first (``db``, ``db:alias``, ``service:db``; not ``container:x``)."""
    if isinstance(value, str):
        return [value.removeprefix("service:")] if value.startswith("service:") else []
    if not isinstance(value, list):
        return []
    return [
        str(v).removeprefix("service:").split(":")[0]
        for v in value
        if not str(v).startswith("container:")
    ]


def _health_of(body: Mapping[str, Any]) -> bool:
    """True if the service's own healthcheck runs (set, and not disabled)."""
    check = body.get("healthcheck")
    return isinstance(check, dict) and not _disabled(check)


def _disabled(check: Mapping[str, Any]) -> bool:
    return check.get("disable") is True or check.get("test") in (["NONE"], "NONE")


def _health(unit: Converted, check: object) -> None:
    if check is None:
        return
    if not isinstance(check, dict):
        unit.skip("healthcheck", "not a mapping")
        return
    if _disabled(check):
        unit.skip("healthcheck (disabled)", "the container runs no health check: no [health]")
        return
    health: dict[str, Any] = {"docker": True}
    unit.map("healthcheck", "health.docker = true")
    interval = check.get("interval")
    every = cf.seconds(interval) if interval is not None else None
    if every:
        health["interval"] = cf.duration_text(every)
        unit.map(f"healthcheck.interval: {interval}", "health.interval")
    elif interval is not None:
        unit.skip(f"healthcheck.interval: {interval}", "not a Compose duration above 0")
    health["failure_threshold"] = 1
    for key in check:
        if key in _HEALTH_OWN:
            unit.skip(f"healthcheck.{key}", "the container's own: Docker runs the test with it")
        elif key not in ("interval", "disable"):
            unit.skip(f"healthcheck.{key}", _UNKNOWN)
    unit.notes.append(
        "[health] reads Docker's health status every health.interval (Docker runs the test, "
        "with its retries and start_period) and restarts the container the first time it is "
        "unhealthy (failure_threshold = 1), which Docker never does"
    )
    unit.table["health"] = health


def _ports(unit: Converted, ports: object) -> None:
    if ports is None:
        return
    found: list[tuple[int, str]] = []
    for entry in ports if isinstance(ports, list) else [ports]:
        published = _published(entry)
        if isinstance(published, tuple):
            found.append(published)
        else:
            unit.skip(f"ports: {entry}", published)
    if not found:
        return
    port, text = found[0]
    unit.table["port"] = port
    unit.map(f"ports: {text}", "port")
    unit.notes.append(
        f"port = {port} is the host side of {text!r}, where the service is reached (hostvisor "
        "checks no other unit claims it; it reclaims ports for process units only)"
    )
    for _, other in found[1:]:
        unit.skip(f"ports: {other}", "a unit has one port, the first (Compose still publishes it)")


def _published(entry: object) -> tuple[int, str] | str:
    """The fixed host port of one ``ports`` entry and its text, or why there is none."""
    if isinstance(entry, dict):
        protocol = str(entry.get("protocol", "tcp")).lower()
        host = str(entry.get("published", ""))
        target = entry.get("target")
        text = f"{host}:{target}/{protocol}" if host else str(target)
    elif isinstance(entry, str | int) and not isinstance(entry, bool):
        text = str(entry)
        spec, _, protocol = text.partition("/")
        protocol = (protocol or "tcp").lower()
        parts = spec.rsplit(":", 2)  # [IP:]HOST:CONTAINER, IP may be "[::1]"
        host = parts[-2] if len(parts) >= 2 else ""
    else:
        return "not a port mapping"
    if protocol != "tcp":
        return f"a {protocol} port: a unit's port is a TCP port"
    if not host:
        return "no fixed host port (the engine picks one)"
    first, dash, _ = host.partition("-")
    if not first.isdigit() or not 1 <= int(first) <= 65535:
        return "not a port number from 1 to 65535"
    if dash:
        return f"a port range: a unit has one port (set port = {first} by hand if it fits)"
    return int(first), text


def _restart(unit: Converted, body: Mapping[str, Any], *, awaited: bool) -> None:
    raw = body.get("restart")
    deploy = body.get("deploy")
    policy = deploy.get("restart_policy") if isinstance(deploy, dict) else None
    condition = policy.get("condition") if isinstance(policy, dict) else None
    if raw is None and condition is not None:
        setting = f"deploy.restart_policy.condition: {condition}"
        mapped = _CONDITION_RESTART.get(str(condition))
        if mapped is None:
            unit.skip(setting, "not a Compose restart condition")
        else:
            unit.table["restart"] = mapped
            unit.map(setting, f"restart = {mapped}")
        return
    if condition is not None:
        unit.skip("deploy.restart_policy.condition", "restart is set, and Compose uses it")
    if raw is None:
        if awaited:
            unit.table["restart"] = "no"
            unit.notes.append(
                f'restart = "no": other services wait for it to complete ({_COMPLETED}), so '
                "it is a one-shot, and Compose's default restart is no"
            )
        else:
            unit.notes.append(
                "no restart (Compose's default: no, Docker leaves it exited): the unit keeps "
                'hostvisor\'s restart = "always", which keeps it up; set "no" for a one-shot'
            )
        return
    text = str(raw)
    name, _, retries = text.partition(":")
    mapped = _RESTART.get(name)
    if mapped is None:
        unit.skip(f"restart: {text}", "not a Compose restart policy")
        return
    unit.table["restart"] = mapped
    why = " (`hostvisor stop` is what keeps it stopped)" if name == "unless-stopped" else ""
    unit.map(f"restart: {text}", f"restart = {mapped}{why}")
    if retries:
        unit.skip(
            f"restart: {text} (max retries {retries})",
            "Docker counts restarts, hostvisor's give_up_after failed starts in a row: "
            "set give_up_after by hand if wanted",
        )
    if mapped != "no":
        unit.notes.append(
            f"Docker's own restart policy ({text}) stays on the container: Docker may start "
            "it again first, and hostvisor then finds it running"
        )


def _stop(unit: Converted, body: Mapping[str, Any]) -> None:
    if "stop_signal" in body:
        unit.skip(
            f"stop_signal: {body['stop_signal']}",
            "Compose sets it on the container, and `docker stop` (how hostvisor stops a "
            "container) sends it: the unit's stop_signal is for processes",
        )
    grace = body.get("stop_grace_period")
    if grace is None:
        return
    value = cf.seconds(grace)
    if value is None:
        unit.skip(f"stop_grace_period: {grace}", "not a Compose duration")
        return
    unit.table["stop_timeout"] = cf.duration_text(value)
    unit.map(f"stop_grace_period: {grace}", "stop_timeout")


def _replicas(unit: Converted, body: Mapping[str, Any]) -> None:
    deploy = body.get("deploy")
    count, where = body.get("scale"), "scale"
    if deploy is not None and not isinstance(deploy, dict):
        unit.skip("deploy", "not a mapping")
    for key, value in deploy.items() if isinstance(deploy, dict) else ():
        if key == "replicas":
            count, where = (value, "deploy.replicas") if count is None else (count, where)
        elif key == "restart_policy" and isinstance(value, dict):
            for sub in value:
                if sub != "condition":
                    own = "hostvisor's [backoff] and give_up_after are its own"
                    unit.skip(f"deploy.restart_policy.{sub}", own)
        else:
            unit.skip(f"deploy.{key}", KEPT)
    if count is None:
        return
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        unit.skip(f"{where}: {count}", "not a number of replicas")
    elif count == 0:
        unit.table["autostart"] = False
        unit.map(f"{where}: 0", "autostart = false")
    elif count > 1:
        container = unit.table["container"]
        unit.skip(
            f"{where}: {count}",
            f"only replica 1 ({container}) is imported; Compose keeps replicas 2 to {count} "
            "(import each by hand)",
        )
    else:
        unit.map(f"{where}: 1", "(one container)")


def _profiles(unit: Converted, profiles: object, active: set[str]) -> None:
    if profiles is None:
        return
    if not isinstance(profiles, list) or not profiles:
        unit.skip("profiles", "not a list of profile names")
        return
    names = ", ".join(map(str, profiles))
    if "*" in active or active & {str(p) for p in profiles}:
        unit.map(f"profiles: {names}", "(enabled by COMPOSE_PROFILES: starts with the daemon)")
        return
    unit.table["autostart"] = False
    unit.map(f"profiles: {names}", "autostart = false")
    unit.notes.append(
        f"Compose starts it only with --profile {profiles[0]}, so it does not start with the "
        "daemon; `hostvisor start` runs it (`up -d SERVICE` enables its profile)"
    )
