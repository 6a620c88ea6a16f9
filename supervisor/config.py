"""config.toml and units/*.toml to frozen specs (contract sections 2-4).

:func:`load` is pure and sync: it reads the files, validates every key by hand
(no pydantic, so that ``hostvisor check`` and a reload stay light) and either
returns a :class:`~supervisor.spec.Loaded` or raises
:class:`~supervisor.errors.ConfigError` listing *every* problem found, each as
``file: key: message`` with a dotted key (``health.interval``).

Choices where the contract is silent:

- ``[defaults]`` is merged under each unit; tables one level deep, key by key
  (``defaults.backoff.max`` applies when a unit's ``[backoff]`` sets only
  ``initial``). Mutually exclusive keys are not mixed: a unit that sets
  ``command`` or ``container`` takes none of ``command``/``container``/
  ``recreate_command`` from defaults, a unit's health probe replaces the
  defaults' probe, a unit's post_start ``http``/``command`` replaces the
  defaults' one. ``[defaults.health]``, ``[defaults.preflight]`` and
  ``[defaults.post_start]`` without a probe/command only tune units that have
  that table. A bad value that came from ``[defaults]`` is reported once,
  against config.toml as ``defaults.<key>``.
- Files whose name starts with ``.`` in the units folder are ignored (editor
  lock files such as ``.#web.toml``).
- Config, unit and env files are regular files of at most 1 MiB, not
  group/world-writable, owned by the daemon's user or root (links followed);
  :mod:`supervisor.configfiles` reads them.
- ``secret_env_files`` are read like ``env_files``, after them and before
  ``env``; every variable they set is secret whatever its name.
- Two units with the same ``port`` are an error naming both.
- Whatever the files hold, :func:`load` raises nothing but ``ConfigError``
  (issue 9); a failure the validation did not foresee becomes an issue too
  (``internal error ...``), so that a reload keeps the running config.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from supervisor import config_values as values
from supervisor.config_graph import check_dependencies, check_ports
from supervisor.config_jobs import JOB_KEYS, check_completed, command_table, parse_job_keys
from supervisor.config_values import (
    IssueSink,
    Key,
    TableReader,
    parse_duration,
    parse_signal,
    parse_size,
)
from supervisor.configfiles import read_env_file, read_env_files, read_toml
from supervisor.errors import ConfigError, ConfigIssue, SocketPathError
from supervisor.paths import check_socket_path
from supervisor.spec import (
    BackoffSpec,
    ContainerSpec,
    DaemonSpec,
    HealthCheckSpec,
    Loaded,
    LogSpec,
    PortSpec,
    PostStartSpec,
    PreflightSpec,
    ProcessSpec,
    ReclaimPort,
    ServiceSpec,
    StopSpec,
    TelemetrySpec,
)
from supervisor.states import DependencyCondition, Restart
from supervisor.statuspage import check_page_path

__all__ = [
    "SERVICE_NAME",
    "check",
    "check_units",
    "load",
    "parse_duration",
    "parse_size",
    "read_env_file",
    "resolve_path",
    "units_dir",
]

#: A service name, i.e. a unit file's stem (contract section 4).
SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
#: Reserved: ``<state>/logs/hostvisor.log`` is the daemon's own log.
_RESERVED_NAMES = frozenset({"hostvisor"})

Table = dict[str, Any]

_CONFIG_KEYS = ("daemon", "telemetry", "defaults")
_DAEMON_KEYS = (
    "units_dir",
    "socket",
    "state_dir",
    "shutdown_timeout",
    "log_level",
    "allow_uids",
    "orphans",
    "status_page",
)
_TELEMETRY_KEYS = ("enabled", "endpoint", "protocol", "export_timeout")
_UNIT_KEYS = (
    "description", "command", "container", "recreate_command", "workdir", "env", "env_files",
    "secret_env_files", "autostart", "restart", "depends_on", "port", "reclaim_port",
    "stop_signal", "stop_timeout", "start_seconds", "give_up_after", "preflight", "health",
    "backoff", "post_start", "logs", "max_memory", "memory_grace", "k8s", *JOB_KEYS,
)  # fmt: skip
_PREFLIGHT_KEYS = ("command", "timeout")
_PROBES = ("http", "tcp", "exec", "docker")
_HEALTH_KEYS = (*_PROBES, "expect_status", "interval", "timeout", "start_period",
                "failure_threshold", "success_threshold")  # fmt: skip
_BACKOFF_KEYS = ("initial", "max", "multiplier", "jitter", "reset_after")
_POST_START_KEYS = ("http", "method", "command", "timeout")
_LOGS_KEYS = ("max_size", "backups")
_K8S_KEYS = ("image",)

#: Keys of one group exclude each other: a unit setting one takes none from defaults.
_EXCLUSIVE: dict[Key, frozenset[str]] = {
    (): frozenset({"command", "container", "recreate_command"}),
    ("health",): frozenset(_PROBES),
    ("post_start",): frozenset({"http", "command"}),
}
#: Optional tables taken whole from defaults only when they hold one of these keys.
_ACTIVATING: dict[str, frozenset[str]] = {
    "health": frozenset(_PROBES),
    "preflight": frozenset({"command"}),
    "post_start": frozenset({"http", "command"}),
    "on_failure": frozenset({"command"}),
}
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")
#: Bounds of keys that are not durations, sizes or plain counts (docs-config.md).
_MAX_UID = 2**32 - 2  # uid_t; (uid_t) -1 means "no uid"
_MAX_BACKUPS = 1000  # each rotation renames every backup
_MAX_MULTIPLIER = 100.0
_MIN_MEMORY = 1024**2  # max_memory: a limit below 1 MiB is one no program can meet
_MAX_GRACE = 86400.0  # memory_grace: at most a day
#: A message for what the validation did not foresee (the fuzz test looks for it).
INTERNAL_ERROR = "internal error while loading"


# ---------------------------------------------------------------------------- public API


def load(path: Path, *, environ: Mapping[str, str] | None = None) -> Loaded:
    """Load ``config.toml`` and every unit of its units folder.

    Args:
        path: the config file; a relative path is taken from the working folder.
        environ: variables for ``$VAR`` and ``~`` expansion (default ``os.environ``).

    Returns:
        The daemon spec and the services, in a dict sorted by name.

    Raises:
        ConfigError: with every problem found, grouped by file (config.toml
            first, then the units by name, then dependency problems). Never
            anything else, whatever the files hold.
    """
    loaded, issues = _guarded_load(path, environ)
    if issues or loaded is None:
        raise ConfigError(issues)
    return loaded


def check(path: Path, *, environ: Mapping[str, str] | None = None) -> list[ConfigIssue]:
    """Validate like :func:`load`; return every problem found (``[]`` when valid)."""
    return _guarded_load(path, environ)[1]


def check_units(
    path: Path, folder: Path, *, environ: Mapping[str, str] | None = None
) -> list[ConfigIssue]:
    """Validate the units of ``folder`` as :func:`check` would if it were the units folder of
    the config ``path`` (its ``[defaults]``, its folder for relative paths); ``hostvisor
    import`` checks what it is about to write in a staging folder this way. A missing config
    file counts as an empty one. Returns every problem found, ``[]`` when valid."""
    return _guarded_load(path, environ, folder)[1]


def units_dir(path: Path, *, environ: Mapping[str, str] | None = None) -> Path:
    """The units folder the config ``path`` names (``[daemon] units_dir``, default ``units``
    beside it), whether or not it exists yet; a missing config file counts as an empty one.

    Raises:
        ConfigError: the config cannot be read, or its ``units_dir`` is not a string.
    """
    ctx = _Context(Path(os.path.abspath(path)), os.environ if environ is None else environ)
    data = read_toml(ctx.config, ctx.issues) if os.path.lexists(ctx.config) else {}
    daemon = data.get("daemon", {}) if data is not None else {}
    raw = daemon.get("units_dir", "units") if isinstance(daemon, dict) else "units"
    if data is None or not isinstance(raw, str) or not raw:
        message = "must be a folder name (a non-empty string)"
        raise ConfigError(ctx.issues or [ConfigIssue(str(ctx.config), "daemon.units_dir", message)])
    return ctx.path(raw)


def resolve_path(path: Path, raw: str, *, environ: Mapping[str, str] | None = None) -> Path:
    """``raw`` (a path of a unit or config key) made absolute the way the loader does: ``~``
    and ``$VARS`` expanded, relative to the folder of the config ``path``."""
    ctx = _Context(Path(os.path.abspath(path)), os.environ if environ is None else environ)
    return ctx.path(raw)


def _guarded_load(
    path: Path, environ: Mapping[str, str] | None, units: Path | None = None
) -> tuple[Loaded | None, list[ConfigIssue]]:
    """:func:`_load`, with any exception it did not foresee turned into an issue."""
    try:
        return _load(path, environ, units)
    except Exception as exc:  # the last line of defence: a reload must never kill the daemon
        what = f"{type(exc).__name__}: {exc}"[:300]
        message = f"{INTERNAL_ERROR} ({what}); please report this as a hostvisor bug"
        return None, [ConfigIssue(os.path.abspath(path), "", message)]


# ---------------------------------------------------------------------------- loading


@dataclass
class _Context:
    config: Path
    environ: Mapping[str, str]
    issues: list[ConfigIssue] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.config.parent

    def path(self, raw: str) -> Path:
        """``~`` and ``$VARS`` expanded, relative to the config folder, made absolute."""
        text = raw
        if text == "~" or text.startswith("~/"):
            text = (self.environ.get("HOME") or os.path.expanduser("~")) + text[1:]
        elif text.startswith("~"):
            text = os.path.expanduser(text)

        def variable(match: re.Match[str]) -> str:
            return self.environ.get(match.group(1).strip("{}"), match.group(0))

        text = _VARIABLE.sub(variable, text)
        return Path(os.path.abspath(self.folder / text))


def _load(
    path: Path, environ: Mapping[str, str] | None, units: Path | None = None
) -> tuple[Loaded | None, list[ConfigIssue]]:
    """Load ``path``; with ``units``, only its defaults and the units of that folder."""
    ctx = _Context(Path(os.path.abspath(path)), os.environ if environ is None else environ)
    missing = units is not None and not os.path.lexists(ctx.config)
    data = {} if missing else read_toml(
        ctx.config, ctx.issues, missing="file not found (create it, or pass -c PATH)")  # fmt: skip
    if data is None:
        return None, ctx.issues
    sink = IssueSink(ctx.issues, str(ctx.config))
    top = TableReader(sink, data, (), _CONFIG_KEYS)
    defaults: Table = {}
    if (defaults_table := top.sub("defaults", _UNIT_KEYS)) is not None:
        defaults = dict(defaults_table.data)
        _parse_unit(defaults_table, "defaults", ctx, partial=True)
    if units is not None:
        _load_units(units, defaults, ctx)
        return None, list(dict.fromkeys(ctx.issues))
    daemon, units_ok = _parse_daemon(top, ctx)
    services = _load_units(daemon.units_dir, defaults, ctx) if units_ok else {}
    issues = list(dict.fromkeys(ctx.issues))  # a bad default is reported once
    if len(issues) > values.MAX_ISSUES:
        issues = [*issues[: values.MAX_ISSUES], values.MORE_ISSUES]
    if issues:
        return None, issues
    return Loaded(daemon=daemon, services=services), []


def _parse_daemon(top: TableReader, ctx: _Context) -> tuple[DaemonSpec, bool]:
    """The ``[daemon]`` spec, and whether its units folder can be listed."""
    daemon = top.sub("daemon", _DAEMON_KEYS) or TableReader(top.sink, {}, ("daemon",), ())
    raw_units = daemon.get("units_dir", values.nonempty, None)
    units_dir = ctx.path(raw_units or "units")
    units_ok = raw_units is not None or "units_dir" not in daemon.data
    if units_ok and not units_dir.is_dir():
        exists = os.path.lexists(units_dir)
        why = "is not a folder (or a link to one)" if exists else "does not exist"
        daemon.fail("units_dir", f"folder {units_dir} {why}")
        units_ok = False
    optional: dict[str, Path | None] = {}
    for key in ("socket", "state_dir", "status_page"):
        raw = daemon.get(key, values.string, "")
        optional[key] = ctx.path(raw) if raw else None
    if optional["socket"] is not None:
        try:
            check_socket_path(optional["socket"])
        except SocketPathError as exc:
            daemon.fail("socket", str(exc))
    page = optional["status_page"]
    if page is not None and (problem := check_page_path(page)) is not None:
        daemon.fail("status_page", problem)
    spec = DaemonSpec(
        config_path=ctx.config,
        units_dir=units_dir,
        socket=optional["socket"],
        state_dir=optional["state_dir"],
        shutdown_timeout=daemon.get("shutdown_timeout", parse_duration, 30.0),
        log_level=daemon.get(
            "log_level", values.choice("debug", "info", "warning", "warn", "error"), "info"
        ),
        allow_uids=daemon.get(
            "allow_uids", values.list_of(values.integer(0, _MAX_UID), "uids (integers)"), ()
        ),
        orphans=daemon.get("orphans", values.choice("adopt", "stop"), "adopt"),
        status_page=optional["status_page"],
        telemetry=_parse_telemetry(top),
    )
    return spec, units_ok


def _parse_telemetry(top: TableReader) -> TelemetrySpec:
    table = top.sub("telemetry", _TELEMETRY_KEYS)
    if table is None:
        return TelemetrySpec()
    protocol = table.get("protocol", values.choice("", "grpc", "http/protobuf"), "")
    return TelemetrySpec(
        enabled=table.get("enabled", values.boolean, False),
        endpoint=table.get("endpoint", values.string, ""),
        protocol=cast(Any, protocol),
        export_timeout=table.get("export_timeout", values.positive_duration, 5.0),
    )


# ---------------------------------------------------------------------------- units


def _load_units(folder: Path, defaults: Table, ctx: _Context) -> dict[str, ServiceSpec]:
    """Every ``*.toml`` directly in ``folder`` (sorted), then dependencies across them."""
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.name.endswith(".toml")]
    except OSError as exc:
        ctx.issues.append(ConfigIssue(str(folder), "", f"cannot list: {exc.strerror or exc}"))
        return {}
    files = sorted(folder / n for n in names if not n.startswith(".") and folder / n != ctx.config)
    services: dict[str, ServiceSpec] = {}
    graph: dict[str, tuple[IssueSink, dict[str, DependencyCondition]]] = {}
    for path in files:
        name = path.stem
        if not SERVICE_NAME.fullmatch(name) or name in _RESERVED_NAMES:
            why = "is reserved for the daemon's own log" if name in _RESERVED_NAMES else (
                f"must match {SERVICE_NAME.pattern}")  # fmt: skip
            ctx.issues.append(ConfigIssue(str(path), "name", f'service name "{name}" {why}'))
            continue
        data = read_toml(path, ctx.issues)
        graph[name] = (IssueSink(ctx.issues, str(path)), {})
        if data is None:
            continue
        merged, inherited = _merge(defaults, data)
        sink = IssueSink(ctx.issues, str(path), inherited=inherited, defaults_file=str(ctx.config))
        spec, deps = _parse_unit(
            TableReader(sink, merged, (), _UNIT_KEYS), name, ctx, partial=False
        )
        graph[name] = (sink, deps)
        if spec is not None:
            services[name] = replace(spec, source=path)
    check_dependencies(graph)
    sinks = {name: sink for name, (sink, _) in graph.items()}
    check_ports(services, sinks)
    check_completed(services, sinks)
    return dict(sorted(services.items()))


def _merge(defaults: Table, unit: Table) -> tuple[Table, set[Key]]:
    """``unit`` over ``defaults`` (module docstring); also the keys taken from defaults."""
    merged, inherited = dict(unit), set[Key]()
    for key, value in defaults.items():
        if key in unit:
            own = unit[key]
            if isinstance(value, dict) and isinstance(own, dict):
                group = _EXCLUSIVE.get((key,), frozenset())
                skip = group if own.keys() & group else frozenset()
                taken = {k: v for k, v in value.items() if k not in own and k not in skip}
                merged[key] = {**own, **taken}
                inherited.update((key, k) for k in taken)
            continue
        if key in _EXCLUSIVE[()] and unit.keys() & _EXCLUSIVE[()]:
            continue
        if key in _ACTIVATING and isinstance(value, dict) and not value.keys() & _ACTIVATING[key]:
            continue
        merged[key] = value
        inherited.add((key,))
    return merged, inherited


def _parse_unit(
    unit: TableReader, name: str, ctx: _Context, *, partial: bool
) -> tuple[ServiceSpec | None, dict[str, DependencyCondition]]:
    """One unit's spec (``None`` if invalid) and its dependencies.

    With ``partial`` (the ``[defaults]`` table) only keys and values are
    checked, not the rules that need a whole unit.
    """
    before = unit.sink.count
    command = unit.get("command", values.argv, None)
    container = unit.get("container", values.nonempty, None)
    recreate = unit.get("recreate_command", values.argv, None)
    if not partial and ("command" in unit.data) == ("container" in unit.data):
        unit.fail(
            "command", "needs exactly one of command (a process) or container (a Docker container)"
        )
    if not partial and "recreate_command" in unit.data and "container" not in unit.data:
        unit.fail("recreate_command", "only for container units (set container)")
    env_files = unit.get("env_files", values.list_of(values.nonempty, "paths"), ())
    secret_files = unit.get("secret_env_files", values.list_of(values.nonempty, "paths"), ())
    env = read_env_files(env_files, unit, key="env_files", resolve=ctx.path, issues=ctx.issues)
    secret_env = read_env_files(
        secret_files, unit, key="secret_env_files", resolve=ctx.path, issues=ctx.issues
    )
    env.update(secret_env)
    env.update(unit.get("env", values.env_table, {}))
    deps = unit.get("depends_on", values.depends_on, {})
    port = unit.get("port", values.integer(1, 65535), None)
    reclaim = unit.get("reclaim_port", values.choice("own", "any", "no"), "own")
    fields: dict[str, Any] = {
        "description": unit.get("description", values.string, ""),
        "workdir": ctx.path(unit.get("workdir", values.nonempty, ".")),
        "env": env,
        "env_files": env_files,
        "secret_env_files": secret_files,
        "secret_env_names": frozenset(secret_env),
        "autostart": unit.get("autostart", values.boolean, True),
        "restart": Restart(
            unit.get("restart", values.choice("always", "on-failure", "no"), "always")
        ),
        "depends_on": deps,
        "port": PortSpec(number=port, reclaim=cast(ReclaimPort, reclaim)) if port else None,
        "stop": StopSpec(
            signal=unit.get("stop_signal", parse_signal, StopSpec().signal),
            timeout=unit.get("stop_timeout", parse_duration, StopSpec().timeout),
        ),
        "start_seconds": unit.get("start_seconds", parse_duration, 1.0),
        "give_up_after": unit.get("give_up_after", values.integer(0), 0),
        "preflight": _parse_preflight(unit, partial=partial),
        "health": _parse_health(unit, container is not None, partial=partial),
        "backoff": _parse_backoff(unit),
        "post_start": _parse_post_start(unit, partial=partial),
        "logs": _parse_logs(unit),
        "max_memory": unit.get("max_memory", _max_memory, None),
        "memory_grace": unit.get("memory_grace", _memory_grace, 5.0),
        "k8s_image": _parse_k8s(unit),
    }
    parse_job_keys(unit, fields, partial=partial)
    if partial or unit.sink.count > before or (command is None) == (container is None):
        return None, deps
    target = ProcessSpec(command=command) if command is not None else ContainerSpec(
        name=cast(str, container), recreate_command=recreate)  # fmt: skip
    return ServiceSpec(name=name, target=target, **fields), deps


def _parse_k8s(unit: TableReader) -> str | None:
    table = unit.sub("k8s", _K8S_KEYS)
    return None if table is None else table.get("image", values.nonempty, None)


def _max_memory(value: object) -> int:
    size = parse_size(value)
    if size < _MIN_MEMORY:
        raise ValueError(f"must be at least 1MiB, got {values.describe_value(value)}")
    return size


def _memory_grace(value: object) -> float:
    seconds = parse_duration(value)
    if seconds > _MAX_GRACE:
        raise ValueError(f"must be at most 1d, got {values.describe_value(value)}")
    return seconds


def _parse_preflight(unit: TableReader, *, partial: bool) -> PreflightSpec | None:
    found = command_table(unit, "preflight", _PREFLIGHT_KEYS, partial=partial)
    return PreflightSpec(command=found[0], timeout=found[1]) if found is not None else None


def _parse_health(unit: TableReader, container: bool, *, partial: bool) -> HealthCheckSpec | None:
    table = unit.sub("health", _HEALTH_KEYS)
    if table is None:
        return None
    probes = [p for p in _PROBES if p in table.data and table.data[p] is not False]
    if not partial and len(probes) != 1:
        found = f"has {len(probes)} ({', '.join(probes)})" if probes else "has none"
        table.fail("", f"needs exactly one probe of http, tcp, exec or docker; {found}")
    docker = table.get("docker", values.boolean, False)
    if docker and not container and not partial:
        table.fail("docker", "docker = true is only for container units")
    spec = HealthCheckSpec(
        http=table.get("http", values.http_url, None),
        tcp=table.get("tcp", values.host_port, None),
        exec=table.get("exec", values.argv, None),
        docker=docker,
        expect_status=table.get(
            "expect_status", values.list_of(values.integer(100, 599), "HTTP statuses"), ()
        ),
        interval=table.get("interval", values.positive_duration, 10.0),
        timeout=table.get("timeout", values.positive_duration, 5.0),
        start_period=table.get("start_period", parse_duration, 0.0),
        failure_threshold=table.get("failure_threshold", values.integer(1), 3),
        success_threshold=table.get("success_threshold", values.integer(1), 1),
    )
    return spec if len(probes) == 1 else None


def _parse_backoff(unit: TableReader) -> BackoffSpec:
    table = unit.sub("backoff", _BACKOFF_KEYS)
    if table is None:
        return BackoffSpec()
    default = BackoffSpec()
    spec = BackoffSpec(
        initial=table.get("initial", parse_duration, default.initial),
        max=table.get("max", parse_duration, default.max),
        multiplier=table.get("multiplier", values.number(1.0, _MAX_MULTIPLIER), default.multiplier),
        jitter=table.get("jitter", values.number(-math.inf, math.inf), default.jitter),
        reset_after=table.get("reset_after", parse_duration, default.reset_after),
    )
    if not 0 <= spec.jitter < 1:
        table.fail("jitter", f"must be in [0, 1) (a fraction of the delay), got {spec.jitter}")
    if spec.max < spec.initial:
        table.fail("max", f"must be at least initial ({spec.initial:g}s), got {spec.max:g}s")
    return spec


def _parse_post_start(unit: TableReader, *, partial: bool) -> PostStartSpec | None:
    table = unit.sub("post_start", _POST_START_KEYS)
    if table is None:
        return None
    http = table.get("http", values.http_url, None)
    command = table.get("command", values.argv, None)
    if not partial and ("http" in table.data) == ("command" in table.data):
        table.fail("", "needs exactly one of http or command")
    spec = PostStartSpec(
        http=http,
        method=table.get("method", values.http_method, "GET"),
        command=command,
        timeout=table.get("timeout", values.positive_duration, 10.0),
    )
    return spec if (http is None) != (command is None) else None


def _parse_logs(unit: TableReader) -> LogSpec:
    table = unit.sub("logs", _LOGS_KEYS)
    if table is None:
        return LogSpec()
    max_size = table.get("max_size", parse_size, LogSpec().max_size)
    if max_size == 0:
        table.fail("max_size", "must be more than 0 bytes")
    backups = table.get("backups", values.integer(0, _MAX_BACKUPS), LogSpec().backups)
    return LogSpec(max_size=max_size, backups=backups)
