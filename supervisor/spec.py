"""Frozen, keyword-only specifications built by :mod:`supervisor.config`.

Specs are values: equality of two :class:`ServiceSpec` is exactly the reload
diff (a unit whose spec changed is restarted, one whose spec is equal is left
alone). Durations are float seconds, sizes int bytes, signals ints.
"""

from __future__ import annotations

import ipaddress
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from supervisor.states import DependencyCondition, Restart

__all__ = [
    "BackoffSpec",
    "CatchUp",
    "Concurrency",
    "ContainerSpec",
    "DaemonSpec",
    "HealthCheckSpec",
    "Loaded",
    "LogSpec",
    "OnFailureSpec",
    "PortSpec",
    "PostStartSpec",
    "PreflightSpec",
    "ProcessSpec",
    "ReclaimPort",
    "ScheduleSpec",
    "ServiceSpec",
    "StopSpec",
    "TelemetrySpec",
]

ReclaimPort = Literal["own", "any", "no"]
ProbeKind = Literal["http", "tcp", "exec", "docker"]
Protocol = Literal["grpc", "http/protobuf", ""]
#: Kubernetes CronJob's ``concurrencyPolicy``, in lower case.
Concurrency = Literal["forbid", "allow", "replace"]
#: A trigger missed while no daemon ran (or the machine slept): systemd's ``Persistent=``.
CatchUp = Literal["none", "once"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffSpec:
    """Delay before restart ``n`` (0-based): ``min(initial * multiplier**n, max)`` +/- jitter.

    Attributes:
        initial: first delay, seconds.
        max: cap, seconds.
        multiplier: growth factor (>= 1).
        jitter: fraction in [0, 1): each delay is scaled by a uniform factor in
            ``[1 - jitter, 1 + jitter]``, then capped at ``max``.
        reset_after: seconds RUNNING (and not unhealthy) after which the
            sequence starts again at ``initial``.
    """

    initial: float = 1.0
    max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1
    reset_after: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckSpec:
    """One probe (Kubernetes terms): exactly one of ``http``, ``tcp``, ``exec``, ``docker``.

    Attributes:
        http: URL; healthy is 2xx/3xx, or a status in ``expect_status``.
        tcp: ``host:port`` that must accept a connection.
        exec: argv run in the unit's workdir and env; exit 0 is healthy.
        docker: use the container's own HEALTHCHECK status.
        interval, timeout, start_period: seconds.
        failure_threshold: failures in a row that make the service unhealthy
            and restart it.
        success_threshold: successes in a row that make it healthy.
    """

    http: str | None = None
    tcp: str | None = None
    exec: tuple[str, ...] | None = None
    docker: bool = False
    expect_status: tuple[int, ...] = ()
    interval: float = 10.0
    timeout: float = 5.0
    start_period: float = 0.0
    failure_threshold: int = 3
    success_threshold: int = 1

    @property
    def kind(self) -> ProbeKind:
        """Which probe this is."""
        if self.http is not None:
            return "http"
        if self.tcp is not None:
            return "tcp"
        if self.exec is not None:
            return "exec"
        return "docker"


@dataclass(frozen=True, slots=True, kw_only=True)
class PreflightSpec:
    """A command run before every spawn; exit 0 lets the spawn go ahead.

    Attributes:
        command: argv, run in the unit's workdir with its env.
        timeout: seconds; its whole process group is killed then.
    """

    command: tuple[str, ...]
    timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PostStartSpec:
    """A hook run once per start, after RUNNING (healthy when there is a probe).

    Exactly one of ``http`` (with ``method``) and ``command`` is set.
    """

    http: str | None = None
    method: str = "GET"
    command: tuple[str, ...] | None = None
    timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSpec:
    """Rotation of ``<state>/logs/<service>.log``: ``max_size`` bytes, ``backups`` kept."""

    max_size: int = 10 * 1024 * 1024
    backups: int = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class StopSpec:
    """How to stop: ``signal`` to the process group, wait ``timeout`` seconds, then SIGKILL."""

    signal: int = int(signal.SIGTERM)
    timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PortSpec:
    """The TCP port a service listens on, and what to do with a stale holder before spawn."""

    number: int
    reclaim: ReclaimPort = "own"


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSpec:
    """When a scheduled unit (a job) runs: exactly one of ``cron`` and ``every``.

    Attributes:
        cron: a cron expression as written: 5 fields, a 6th (last) for seconds, or an
            ``@hourly``-style macro (croniter's syntax).
        every: a fixed interval, seconds.
        every_text: ``every`` as written (``"10m"``), for the status field.
        timezone: IANA name the cron fields are read in; ``""`` = the host's.
        concurrency: a trigger while a run is still going: skip it (``forbid``), run
            beside it (``allow``) or stop it first (``replace``).
        catch_up: a trigger missed while no daemon ran or the machine slept: skip it
            (``none``) or run once at start (``once``).
        random_delay: each run starts up to this many seconds after its trigger
            (uniform; systemd's ``RandomizedDelaySec=``).
    """

    cron: str | None = None
    every: float | None = None
    every_text: str = ""
    timezone: str = ""
    concurrency: Concurrency = "forbid"
    catch_up: CatchUp = "none"
    random_delay: float = 0.0

    def describe(self) -> str:
        """The ``schedule`` status field: the cron expression, or ``"every 10m"``."""
        return self.cron if self.cron is not None else f"every {self.every_text}"


@dataclass(frozen=True, slots=True, kw_only=True)
class OnFailureSpec:
    """``[on_failure]``: a command run when a job's run fails or times out, or a service
    goes FATAL (systemd's ``OnFailure=``).

    Attributes:
        command: argv, run in the unit's workdir with its env plus ``HOSTVISOR_SERVICE``,
            ``HOSTVISOR_EXIT_CODE``/``HOSTVISOR_EXIT_SIGNAL`` and ``HOSTVISOR_MESSAGE``.
        timeout: seconds; its process group is killed then.
    """

    command: tuple[str, ...]
    timeout: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessSpec:
    """A local process: ``command`` is the argv, never run by a shell."""

    command: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerSpec:
    """An existing Docker container, by name or id.

    Attributes:
        name: the container's name or id.
        recreate_command: argv run (in the unit's workdir) when the container
            does not exist, e.g. ``docker compose -p qdrant up -d``.
    """

    name: str
    recreate_command: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """Everything about one service, as loaded from ``units/<name>.toml`` over ``[defaults]``.

    More than the usual ten fields: each is one unit key (or group) of the
    contract, and flattening them further would only rename them.

    Attributes:
        name: the unit file's stem.
        target: a :class:`ProcessSpec` or a :class:`ContainerSpec`.
        workdir: absolute folder for the process, preflight, probes and hooks.
        env: ``env_files``, ``secret_env_files``, then ``env`` merged (later
            wins); never logged.
        env_files, secret_env_files: the paths as written in the unit.
        secret_env_names: the variables set by ``secret_env_files``: their
            values are secret whatever their names.
        depends_on: dependency name -> condition.
        restart: the restart policy.
        start_seconds: without a probe, seconds up that count as RUNNING.
        give_up_after: failed starts in a row before FATAL; 0 = never. For a job, the
            failed attempts of one run (``restart = "on-failure"``); 0 = until the next
            trigger.
        schedule: when it runs, for a scheduled unit (a job); ``None`` otherwise.
        run_timeout: seconds a run of a job (scheduled or one-shot) may take before it is
            stopped with ``stop``; ``None`` = no limit.
        on_failure: the hook run when a job's run fails or a service goes FATAL.
        max_memory: bytes of resident memory the instance's whole tree may hold for
            ``memory_grace`` seconds before it is restarted; ``None`` = no limit.
        k8s_image: ``[k8s] image``, the image ``hostvisor export k8s`` gives a process
            unit; not compared, so that a reload does not restart a unit for it.
    """

    name: str
    description: str = ""
    source: Path | None = None
    target: ProcessSpec | ContainerSpec
    workdir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    env_files: tuple[str, ...] = ()
    secret_env_files: tuple[str, ...] = ()
    secret_env_names: frozenset[str] = frozenset()
    autostart: bool = True
    restart: Restart = Restart.ALWAYS
    depends_on: Mapping[str, DependencyCondition] = field(default_factory=dict)
    port: PortSpec | None = None
    stop: StopSpec = StopSpec()
    start_seconds: float = 1.0
    give_up_after: int = 0
    preflight: PreflightSpec | None = None
    health: HealthCheckSpec | None = None
    backoff: BackoffSpec = BackoffSpec()
    post_start: PostStartSpec | None = None
    logs: LogSpec = LogSpec()
    schedule: ScheduleSpec | None = None
    run_timeout: float | None = None
    on_failure: OnFailureSpec | None = None
    max_memory: int | None = None
    memory_grace: float = 5.0
    k8s_image: str | None = field(default=None, compare=False)

    @property
    def is_job(self) -> bool:
        """A scheduled unit, or a one-shot (a process unit with ``restart = "no"`` and no
        schedule): runs that end, rather than an instance kept up. A container unit is
        never a job."""
        if not isinstance(self.target, ProcessSpec):
            return False
        return self.schedule is not None or self.restart is Restart.NO

    @property
    def kind(self) -> Literal["process", "container"]:
        """``"process"`` or ``"container"`` (the ``kind`` status field)."""
        return "container" if isinstance(self.target, ContainerSpec) else "process"

    def secret_values(self) -> frozenset[str]:
        """Values from ``env`` and the env files that must never appear in output.

        Every non-empty value of a variable in ``secret_env_names`` (set by
        ``secret_env_files``), however short (``PIN=4821``); every value of a
        key that names a secret (``*TOKEN*``, ``*PASSWORD*``, ``*SECRET*``,
        ``*KEY*`` ...) of 3 characters or more; and every other value of 8
        characters or more that is not a plain number or IP address. Redacting
        ``host`` or ``1`` everywhere would make every message unreadable: mark
        such a value secret only by putting it in a ``secret_env_files`` file.
        """
        return frozenset(
            v for k, v in self.env.items() if (k in self.secret_env_names and v) or is_secret(k, v)
        )


_SECRET_KEY = re.compile(
    r"TOKEN|SECRET|PASS|KEY|AUTH|CRED|PRIVATE|SESSION|COOKIE|DSN|SIGNATURE|CERT|SALT",
    re.IGNORECASE,
)


def is_secret_name(key: str) -> bool:
    """Whether the variable name ``key`` names a secret (``*TOKEN*``, ``*PASSWORD*`` ...)."""
    return bool(_SECRET_KEY.search(key))


def is_secret(key: str, value: str) -> bool:
    """Whether ``value`` of the variable ``key`` is kept out of every output (the rule of
    :meth:`ServiceSpec.secret_values`, for a variable not set by ``secret_env_files``)."""
    if _SECRET_KEY.search(key):
        return len(value) >= 3
    if len(value) < 8 or value.replace(".", "").replace(":", "").isdigit():
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return True
    return False


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetrySpec:
    """The ``[telemetry]`` table: OTLP export of events and metrics.

    Attributes:
        enabled: export at all.
        endpoint: collector URL; ``""`` = ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
            the protocol's default on localhost.
        protocol: ``"grpc"``, ``"http/protobuf"``, or ``""`` =
            ``OTEL_EXPORTER_OTLP_PROTOCOL``, else ``"http/protobuf"``.
        export_timeout: seconds any one export may take.
    """

    enabled: bool = False
    endpoint: str = ""
    protocol: Protocol = ""
    export_timeout: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSpec:
    """The ``[daemon]`` table, with paths made absolute.

    Attributes:
        config_path: the absolute path of config.toml.
        units_dir: absolute folder of the unit files.
        socket: the configured control socket, or ``None`` for the default.
        state_dir: the configured state folder, or ``None`` for the default.
        shutdown_timeout: seconds for all services to stop, then SIGKILL.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        allow_uids: uids besides the daemon's and root's allowed on the socket.
        orphans: processes with our marker that the state file does not name (it was
            lost): ``"adopt"`` (the only candidate of a unit; extras are stopped) or
            ``"stop"`` (pitchfork's ``orphan_policy``).
        status_page: the absolute path of the Markdown page the daemon keeps
            (:mod:`supervisor.statuspage`), or ``None`` for none.
    """

    config_path: Path
    units_dir: Path
    socket: Path | None = None
    state_dir: Path | None = None
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    allow_uids: tuple[int, ...] = ()
    orphans: str = "adopt"
    status_page: Path | None = None
    telemetry: TelemetrySpec = TelemetrySpec()


@dataclass(frozen=True, slots=True, kw_only=True)
class Loaded:
    """A whole, valid configuration: the daemon spec and the services by name."""

    daemon: DaemonSpec
    services: Mapping[str, ServiceSpec]
