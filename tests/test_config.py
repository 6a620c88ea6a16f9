"""config.toml and units/*.toml to specs, and every error they can hold (contract sections 2-4)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from supervisor.config import check, load, parse_duration, parse_size, read_env_file
from supervisor.errors import ConfigError, ConfigIssue
from supervisor.spec import (
    BackoffSpec,
    ContainerSpec,
    HealthCheckSpec,
    Loaded,
    LogSpec,
    PortSpec,
    PostStartSpec,
    PreflightSpec,
    ProcessSpec,
)
from supervisor.states import DependencyCondition, Restart

CONTRACT_UNIT = """
description = "Host worker"
command = ["bun", "run", "src/serve.ts"]
workdir = "~/Code/worker"
env = { WORKER_ROLE = "host" }
env_files = ["~/.config/worker.env", "-~/.config/optional.env"]
autostart = true
restart = "always"
depends_on = ["redis"]
port = 3111
reclaim_port = "own"
stop_signal = "SIGTERM"
stop_timeout = "10s"
start_seconds = "1s"
give_up_after = 0

[preflight]
command = ["bun", "--eval", "await import('./src/index.ts')"]
timeout = "30s"

[health]
http = "http://127.0.0.1:3111/api/inngest"
interval = "10s"
timeout = "5s"
start_period = "0s"
failure_threshold = 3
success_threshold = 1

[backoff]
initial = "1s"
max = "30s"
multiplier = 2.0
jitter = 0.1
reset_after = "60s"

[post_start]
http = "http://127.0.0.1:3111/api/inngest"
method = "PUT"
timeout = "10s"

[logs]
max_size = "10MiB"
backups = 5
"""


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` with an explicit mode (the loader refuses 0664)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


@dataclass
class Project:
    """A config folder in tmp_path: config.toml, units/ and a fake $HOME."""

    root: Path
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    def config(self, text: str = "", mode: int = 0o644) -> Path:
        return write(self.config_path, text, mode)

    def unit(self, name: str, text: str, mode: int = 0o644) -> Path:
        return write(self.root / "units" / f"{name}.toml", text, mode)

    def load(self) -> Loaded:
        return load(self.config_path, environ=self.environ)

    def issues(self) -> list[ConfigIssue]:
        found = check(self.config_path, environ=self.environ)
        assert found, "expected the configuration to be invalid"
        return found

    def lines(self) -> list[str]:
        return [str(i) for i in self.issues()]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "proj"
    (root / "units").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    proj = Project(root, {"HOME": str(home), "APP": "myapp"})
    proj.config()
    return proj


def issue_for(issues: list[ConfigIssue], key: str) -> ConfigIssue:
    matches = [i for i in issues if i.key == key]
    assert matches, f"no issue for {key!r} in {[str(i) for i in issues]}"
    return matches[0]


class TestContractExample:
    def test_the_contract_unit_parses_to_the_documented_values(self, project: Project) -> None:
        """Every key of the contract's example unit lands in the spec, in the spec's units."""
        home = Path(project.environ["HOME"])
        write(home / ".config/worker.env", "SECRET=s3cr3t-value\nWORKER_ROLE=overridden\n")
        project.unit("redis", 'command = "redis-server"')
        source = project.unit("worker", CONTRACT_UNIT)

        spec = project.load().services["worker"]

        assert spec.name == "worker"
        assert spec.source == source
        assert spec.description == "Host worker"
        assert spec.target == ProcessSpec(command=("bun", "run", "src/serve.ts"))
        assert spec.kind == "process"
        assert spec.workdir == home / "Code/worker"
        assert spec.env == {"SECRET": "s3cr3t-value", "WORKER_ROLE": "host"}
        assert spec.env_files == ("~/.config/worker.env", "-~/.config/optional.env")
        assert spec.autostart is True
        assert spec.restart is Restart.ALWAYS
        assert spec.depends_on == {"redis": DependencyCondition.STARTED}
        assert spec.port == PortSpec(number=3111, reclaim="own")
        assert spec.stop.signal == signal.SIGTERM
        assert spec.stop.timeout == 10.0
        assert spec.start_seconds == 1.0
        assert spec.give_up_after == 0
        assert spec.preflight == PreflightSpec(
            command=("bun", "--eval", "await import('./src/index.ts')"), timeout=30.0
        )
        assert spec.health == HealthCheckSpec(
            http="http://127.0.0.1:3111/api/inngest",
            interval=10.0,
            timeout=5.0,
            start_period=0.0,
            failure_threshold=3,
            success_threshold=1,
        )
        assert spec.backoff == BackoffSpec(
            initial=1.0, max=30.0, multiplier=2.0, jitter=0.1, reset_after=60.0
        )
        assert spec.post_start == PostStartSpec(
            http="http://127.0.0.1:3111/api/inngest", method="PUT", timeout=10.0
        )
        assert spec.logs == LogSpec(max_size=10 * 1024 * 1024, backups=5)

    def test_a_minimal_unit_gets_the_documented_defaults(self, project: Project) -> None:
        """Only `command` set: workdir is the config folder, no probe, default backoff and logs."""
        project.unit("web", 'command = "python3 -m http.server 8000"')
        spec = project.load().services["web"]
        assert spec.target == ProcessSpec(command=("python3", "-m", "http.server", "8000"))
        assert spec.workdir == project.root
        assert spec.restart is Restart.ALWAYS
        assert spec.health is None and spec.preflight is None and spec.post_start is None
        assert spec.port is None
        assert spec.backoff == BackoffSpec()
        assert spec.logs == LogSpec()
        assert spec.post_start is None

    def test_a_container_unit_is_parsed(self, project: Project) -> None:
        """container + recreate_command + a docker probe make a ContainerSpec."""
        project.unit(
            "qdrant",
            'container = "qdrant"\n'
            'recreate_command = "docker compose -p qdrant up -d"\n'
            "[health]\ndocker = true\n",
        )
        spec = project.load().services["qdrant"]
        assert spec.kind == "container"
        assert spec.target == ContainerSpec(
            name="qdrant", recreate_command=("docker", "compose", "-p", "qdrant", "up", "-d")
        )
        assert spec.health is not None and spec.health.kind == "docker"

    def test_services_are_sorted_by_name(self, project: Project) -> None:
        """The services mapping iterates in name order whatever the directory order."""
        for name in ("zeta", "alpha", "mid"):
            project.unit(name, 'command = "true"')
        assert list(project.load().services) == ["alpha", "mid", "zeta"]

    def test_depends_on_as_a_table_with_conditions(self, project: Project) -> None:
        """A table maps each dependency to "started" or "healthy"."""
        project.unit("db", 'command = "db"')
        project.unit("cache", 'command = "cache"')
        project.unit("api", 'command = "api"\ndepends_on = { db = "healthy", cache = "started" }')
        assert project.load().services["api"].depends_on == {
            "db": DependencyCondition.HEALTHY,
            "cache": DependencyCondition.STARTED,
        }

    def test_odd_but_valid_values(self, project: Project) -> None:
        """Signals by short name or number, lowercase methods, tcp and exec probes."""
        project.unit(
            "a",
            'command = ["a"]\nstop_signal = "INT"\n[health]\ntcp = "[::1]:6379"\n'
            '[post_start]\nhttp = "http://localhost/x"\nmethod = "post"\n',
        )
        project.unit("b", 'command = ["b"]\nstop_signal = 1\n[health]\nexec = "redis-cli ping"\n')
        services = project.load().services
        assert services["a"].stop.signal == signal.SIGINT
        assert services["a"].health == HealthCheckSpec(tcp="[::1]:6379")
        assert services["a"].post_start is not None
        assert services["a"].post_start.method == "POST"
        assert services["b"].stop.signal == signal.SIGHUP
        assert services["b"].health == HealthCheckSpec(exec=("redis-cli", "ping"))


class TestDaemonTable:
    def test_defaults_without_any_daemon_table(self, project: Project) -> None:
        """An empty config.toml: units next to it, default socket and state, 30s shutdown."""
        daemon = project.load().daemon
        assert daemon.config_path == project.config_path
        assert daemon.units_dir == project.root / "units"
        assert daemon.socket is None and daemon.state_dir is None
        assert daemon.shutdown_timeout == 30.0
        assert daemon.log_level == "info"
        assert daemon.allow_uids == ()
        assert daemon.orphans == "adopt"
        assert daemon.telemetry.enabled is False and daemon.telemetry.protocol == ""

    def test_every_daemon_and_telemetry_key(self, project: Project) -> None:
        """Paths are relative to the config folder (or ~-expanded); the rest as written."""
        (project.root / "services").mkdir()
        project.config(
            '[daemon]\nunits_dir = "services"\nsocket = "run/h.sock"\n'
            'state_dir = "~/state"\nshutdown_timeout = "1m"\nlog_level = "debug"\n'
            'allow_uids = [1001, 1002]\norphans = "stop"\n'
            '[telemetry]\nenabled = true\nendpoint = "http://otel:4318"\n'
            'protocol = "grpc"\nexport_timeout = "250ms"\n'
        )
        daemon = project.load().daemon
        assert daemon.units_dir == project.root / "services"
        assert daemon.socket == project.root / "run/h.sock"
        assert daemon.state_dir == Path(project.environ["HOME"]) / "state"
        assert daemon.shutdown_timeout == 60.0
        assert daemon.log_level == "debug"
        assert daemon.allow_uids == (1001, 1002)
        assert daemon.orphans == "stop"
        assert daemon.telemetry.enabled is True
        assert daemon.telemetry.endpoint == "http://otel:4318"
        assert daemon.telemetry.protocol == "grpc"
        assert daemon.telemetry.export_timeout == 0.25

    def test_orphans_takes_adopt_or_stop_only(self, project: Project) -> None:
        """``[daemon] orphans``: anything but "adopt" or "stop" names the key and the choices."""
        project.config('[daemon]\norphans = "kill"\n')
        with pytest.raises(ConfigError) as caught:
            project.load()
        issue = issue_for(caught.value.issues, "daemon.orphans")
        assert "adopt" in issue.message and "stop" in issue.message

    def test_a_relative_config_path_is_made_absolute(
        self, project: Project, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`-c config.toml` from its folder gives absolute paths everywhere."""
        monkeypatch.chdir(project.root)
        project.unit("web", 'command = "w"')
        loaded = load(Path("config.toml"), environ=project.environ)
        assert loaded.daemon.config_path == project.config_path
        assert loaded.services["web"].workdir == project.root


class TestDefaults:
    def test_defaults_fill_missing_keys_and_tables_merge_one_level(self, project: Project) -> None:
        """defaults.backoff.max applies when the unit's [backoff] sets only initial."""
        project.config(
            '[defaults]\nrestart = "on-failure"\nstop_timeout = "3s"\n'
            'env = { A = "from-defaults", B = "from-defaults" }\n'
            '[defaults.backoff]\nmax = "5s"\nmultiplier = 3.0\n'
        )
        project.unit(
            "web",
            'command = "w"\nstop_timeout = "7s"\nenv = { B = "mine" }\n[backoff]\ninitial = "2s"\n',
        )
        spec = project.load().services["web"]
        assert spec.restart is Restart.ON_FAILURE
        assert spec.stop.timeout == 7.0
        assert spec.env == {"A": "from-defaults", "B": "mine"}
        assert spec.backoff.initial == 2.0
        assert spec.backoff.max == 5.0
        assert spec.backoff.multiplier == 3.0

    def test_health_tuning_applies_only_to_units_with_a_probe(self, project: Project) -> None:
        """[defaults.health] without a probe tunes units that have [health], adds none."""
        project.config('[defaults.health]\ninterval = "2s"\nfailure_threshold = 5\n')
        project.unit("probed", 'command = "p"\n[health]\ntcp = "127.0.0.1:1"\n')
        project.unit("plain", 'command = "q"')
        services = project.load().services
        assert services["probed"].health == HealthCheckSpec(
            tcp="127.0.0.1:1", interval=2.0, failure_threshold=5
        )
        assert services["plain"].health is None

    def test_a_units_probe_replaces_the_defaults_probe(self, project: Project) -> None:
        """Probes exclude each other, so the unit's tcp wins over the defaults' http."""
        project.config('[defaults.health]\nhttp = "http://127.0.0.1/health"\n')
        project.unit("tcp", 'command = "t"\n[health]\ntcp = "127.0.0.1:9"\n')
        project.unit("inherits", 'command = "i"')
        services = project.load().services
        assert services["tcp"].health == HealthCheckSpec(tcp="127.0.0.1:9")
        assert services["inherits"].health == HealthCheckSpec(http="http://127.0.0.1/health")

    def test_a_container_unit_ignores_a_default_command(self, project: Project) -> None:
        """command/container are one choice: the unit's container wins over defaults.command."""
        project.config('[defaults]\ncommand = "sleep 1"\n')
        project.unit("db", 'container = "pg"')
        project.unit("job", "")
        services = project.load().services
        assert services["db"].target == ContainerSpec(name="pg")
        assert services["job"].target == ProcessSpec(command=("sleep", "1"))

    def test_a_bad_default_is_reported_once_against_config_toml(self, project: Project) -> None:
        """Two units inheriting a bad default give one issue keyed defaults.<key>."""
        project.config('[defaults]\nstop_timeout = "soon"\n[defaults.health]\nintervall = "1s"\n')
        project.unit("a", 'command = "a"')
        project.unit("b", 'command = "b"\n[health]\ntcp = "localhost:1"\n')
        issues = project.issues()
        assert [(i.file, i.key) for i in issues] == [
            (str(project.config_path), "defaults.stop_timeout"),
            (str(project.config_path), "defaults.health.intervall"),
        ]
        assert 'did you mean "interval"' in issues[1].message

    def test_defaults_are_validated_without_any_unit(self, project: Project) -> None:
        """A typo in [defaults] is an error even when no unit uses it."""
        project.config('[defaults]\nrestart = "sometimes"\nautostrat = true\n')
        lines = project.lines()
        assert any("defaults.restart: expected" in line for line in lines)
        assert any('defaults.autostrat: unknown key (did you mean "autostart"?)' in line
                   for line in lines)  # fmt: skip


BAD_UNITS = [
    # (unit text, key, part of the message)
    ('command = "x"\nrestrat = "no"', "restrat", 'unknown key (did you mean "restart"?)'),
    ('command = "x"\n[health]\ntcp = "h:1"\nintervall = "1s"', "health.intervall",
     'did you mean "interval"'),
    ("command = 5", "command", "expected a string or a list of strings"),
    ("command = []", "command", "must name a program"),
    ('command = ["", "x"]', "command", "must name a program"),
    ("command = ['a', 1]", "command", "expected a string or a list of strings"),
    ("command = 'a \"unclosed'", "command", "No closing quotation"),
    ("description = 1\ncommand = 'x'", "description", "expected a string"),
    ("command = 'x'\nenv_files = 'a.env'", "env_files", "expected a list of paths"),
    ("command = 'x'\nenv = { A = [1] }", "env", "expected a string or a number"),
    ("command = 'x'\nautostart = 'yes'", "autostart", "expected true or false"),
    ("command = 'x'\nrestart = 'sometimes'", "restart", '"always" | "on-failure" | "no"'),
    ("command = 'x'\nreclaim_port = 'mine'", "reclaim_port", '"own" | "any" | "no"'),
    ("command = 'x'\nport = 0", "port", "between 1 and 65535"),
    ("command = 'x'\nport = 70000", "port", "between 1 and 65535"),
    ("command = 'x'\nport = '80'", "port", "expected an integer"),
    ("command = 'x'\nstop_signal = 'SIGFOO'", "stop_signal", "unknown signal"),
    ("command = 'x'\nstop_signal = 999", "stop_signal", "unknown signal number"),
    ("command = 'x'\nstop_timeout = '10 sec'", "stop_timeout", "expected a duration"),
    ("command = 'x'\nstart_seconds = -1", "start_seconds", "must not be negative"),
    ("command = 'x'\ngive_up_after = -1", "give_up_after", "between 0 and 1000000"),
    ("command = 'x'\ndepends_on = 'db'", "depends_on", "expected a list of names or a table"),
    ("command = 'x'\ndepends_on = { db = 'ready' }", "depends_on", '"started" | "healthy"'),
    ("command = 'x'\nhealth = 'http://x'", "health", "expected a table"),
    ("command = 'x'\n[health]\ninterval = '1s'", "health", "exactly one probe"),
    ("command = 'x'\n[health]\nhttp = 'http://a/'\ntcp = 'a:1'", "health",
     "has 2 (http, tcp)"),
    ("command = 'x'\n[health]\ndocker = true", "health.docker", "only for container units"),
    ("command = 'x'\n[health]\nhttp = 'ftp://a/'", "health.http", "http:// or https://"),
    ("command = 'x'\n[health]\ntcp = 'localhost'", "health.tcp", '"host:port"'),
    ("command = 'x'\n[health]\ntcp = 'a:1'\nexpect_status = [200]", None, None),
    ("command = 'x'\n[health]\nhttp = 'http://a/'\nexpect_status = ['200']",
     "health.expect_status", "expected a list of HTTP statuses"),
    ("command = 'x'\n[health]\ntcp = 'a:1'\nfailure_threshold = 0", "health.failure_threshold",
     "between 1 and 1000000"),
    ("command = 'x'\n[health]\ntcp = 'a:1'\nsuccess_threshold = 0", "health.success_threshold",
     "between 1 and 1000000"),
    ("command = 'x'\n[health]\ntcp = 'a:1'\ninterval = '0s'", "health.interval",
     "more than 0"),
    ("command = 'x'\n[backoff]\nmultiplier = 0.5", "backoff.multiplier", "between 1 and 100"),
    ("command = 'x'\n[backoff]\njitter = 1.0", "backoff.jitter", "[0, 1)"),
    ("command = 'x'\n[backoff]\njitter = -0.1", "backoff.jitter", "[0, 1)"),
    ("command = 'x'\n[backoff]\ninitial = '10s'\nmax = '1s'", "backoff.max", "at least initial"),
    ("command = 'x'\n[preflight]\ntimeout = '1s'", "preflight", "needs a command"),
    ("command = 'x'\n[post_start]\ntimeout = '1s'", "post_start", "exactly one of http or command"),
    ("command = 'x'\n[post_start]\nhttp = 'http://a/'\ncommand = 'x'", "post_start",
     "exactly one of http or command"),
    ("command = 'x'\n[post_start]\nhttp = 'http://a/'\nmethod = 'PU T'", "post_start.method",
     "HTTP method"),
    ("command = 'x'\n[logs]\nmax_size = '10 parsecs'", "logs.max_size", "expected a size"),
    ("command = 'x'\n[logs]\nmax_size = 0", "logs.max_size", "more than 0"),
    ("command = 'x'\n[logs]\nbackups = -1", "logs.backups", "between 0 and 1000"),
    ("description = 'nothing to run'", "command", "exactly one of command"),
    ("command = 'x'\ncontainer = 'y'", "command", "exactly one of command"),
    ("command = 'x'\nrecreate_command = 'up'", "recreate_command", "only for container units"),
    ("container = ''", "container", "must not be empty"),
    ("command = 'x'\ndepends_on = ['nosuch']", "depends_on", 'unknown service "nosuch"'),
    ("command = 'x'\nworkdir = 3", "workdir", "expected a string"),
]  # fmt: skip


class TestBadUnits:
    @pytest.mark.parametrize(("text", "key", "message"), BAD_UNITS)
    def test_each_bad_input_names_file_and_key(
        self, project: Project, text: str, key: str | None, message: str | None
    ) -> None:
        """Every wrong type, impossible value or missing choice is one `file: key: message`."""
        unit = project.unit("svc", text)
        if key is None:  # a valid control case in the table: expect_status with tcp is harmless
            project.load()
            return
        issue = issue_for(project.issues(), key)
        assert issue.file == str(unit)
        assert message in issue.message
        assert str(issue).startswith(f"{unit}: {key + ': ' if key else ''}")

    def test_several_errors_in_several_files_are_all_reported(self, project: Project) -> None:
        """One run reports every problem, not just the first, across config and units."""
        project.config('[daemon]\nlog_level = "loud"\nshutdown_timeout = "forever"\n')
        web = project.unit("web", 'command = 1\nrestart = "never"\n[health]\nintervall = "1s"\n')
        worker = project.unit("worker", 'comand = "w"\n')
        with pytest.raises(ConfigError) as raised:
            project.load()
        found = {(i.file, i.key) for i in raised.value.issues}
        config = str(project.config_path)
        assert found >= {
            (config, "daemon.log_level"),
            (config, "daemon.shutdown_timeout"),
            (str(web), "command"),
            (str(web), "restart"),
            (str(web), "health.intervall"),
            (str(web), "health"),
            (str(worker), "comand"),
            (str(worker), "command"),
        }
        assert str(raised.value).count("\n") == len(raised.value.issues) - 1

    def test_unknown_key_far_from_any_lists_the_expected_keys(self, project: Project) -> None:
        """With no close match the message lists what the table accepts."""
        project.unit("svc", 'command = "x"\n[logs]\nzzz = 1\n')
        assert (
            "expected one of: backups, max_size" in issue_for(project.issues(), "logs.zzz").message
        )

    def test_unknown_dependency_suggests_a_close_name(self, project: Project) -> None:
        """A misspelt dependency gets a did-you-mean among the unit names."""
        project.unit("redis", 'command = "r"')
        project.unit("api", 'command = "a"\ndepends_on = ["rediss"]')
        message = issue_for(project.issues(), "depends_on").message
        assert message == 'unknown service "rediss" (did you mean "redis"?)'


class TestDependencyCycles:
    def test_a_two_unit_cycle_is_named(self, project: Project) -> None:
        """a -> b -> a is reported once, starting from the smallest name."""
        a = project.unit("a", 'command = "a"\ndepends_on = ["b"]')
        project.unit("b", 'command = "b"\ndepends_on = { a = "healthy" }')
        issues = project.issues()
        assert [str(i) for i in issues] == [f"{a}: depends_on: dependency cycle: a -> b -> a"]

    def test_a_self_dependency_and_a_longer_cycle(self, project: Project) -> None:
        """Each distinct cycle is reported; units outside cycles are fine."""
        project.unit("self", 'command = "s"\ndepends_on = ["self"]')
        project.unit("x", 'command = "x"\ndepends_on = ["y"]')
        project.unit("y", 'command = "y"\ndepends_on = ["z"]')
        project.unit("z", 'command = "z"\ndepends_on = ["x", "ok"]')
        project.unit("ok", 'command = "ok"')
        messages = sorted(i.message for i in project.issues())
        assert messages == [
            "dependency cycle: self -> self",
            "dependency cycle: x -> y -> z -> x",
        ]


class TestFiles:
    def test_missing_config_is_one_issue(self, tmp_path: Path) -> None:
        """No config.toml: one issue that says how to fix it."""
        path = tmp_path / "nope.toml"
        assert [str(i) for i in check(path, environ={})] == [
            f"{path}: file not found (create it, or pass -c PATH)"
        ]

    def test_missing_units_folder(self, project: Project) -> None:
        """units_dir pointing nowhere is an issue on daemon.units_dir."""
        project.config('[daemon]\nunits_dir = "missing"\n')
        issue = issue_for(project.issues(), "daemon.units_dir")
        assert issue.message == f"folder {project.root / 'missing'} does not exist"

    def test_toml_syntax_error_gives_line_and_column(self, project: Project) -> None:
        """A syntax error names the file and tomllib's line and column."""
        unit = project.unit("web", 'command = "x"\nrestart = \n')
        issue = issue_for(project.issues(), "line 2")
        assert issue.file == str(unit)
        assert "invalid TOML" in issue.message and "line 2" in issue.message

    def test_bad_service_names(self, project: Project) -> None:
        """Stems must match [a-z0-9][a-z0-9_.-]{0,62}; "hostvisor" is reserved."""
        upper = project.unit("Web", 'command = "x"')
        reserved = project.unit("hostvisor", 'command = "x"')
        long_name = project.unit("a" * 64, 'command = "x"')
        project.unit("ok-1_a.b", 'command = "x"')
        messages = {i.file: i.message for i in project.issues()}
        assert set(messages) == {str(upper), str(reserved), str(long_name)}
        assert "must match" in messages[str(upper)]
        assert "reserved" in messages[str(reserved)]

    def test_units_dir_may_be_the_config_folder(self, project: Project) -> None:
        """With units_dir = "." config.toml itself is not taken for a unit."""
        project.config('[daemon]\nunits_dir = "."\n')
        write(project.root / "web.toml", 'command = "x"')
        assert list(project.load().services) == ["web"]

    def test_unknown_tables_in_config_toml(self, project: Project) -> None:
        """A misspelt [deamon] or [telemetry] key gets a did-you-mean too."""
        project.config('[deamon]\n[telemetry]\nenabeld = true\nprotocol = "udp"\n')
        lines = project.lines()
        config = project.config_path
        assert f'{config}: deamon: unknown key (did you mean "daemon"?)' in lines
        assert f'{config}: telemetry.enabeld: unknown key (did you mean "enabled"?)' in lines
        assert any(line.startswith(f"{config}: telemetry.protocol: expected") for line in lines)

    def test_hidden_and_non_toml_files_are_ignored(self, project: Project) -> None:
        """Editor lock files (.#web.toml) and other suffixes are not units."""
        project.unit("web", 'command = "x"')
        write(project.root / "units/.#web.toml", "garbage")
        write(project.root / "units/notes.txt", "garbage")
        assert list(project.load().services) == ["web"]


class TestFileSafety:
    @pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
    def test_writable_config_is_refused(self, project: Project, mode: int) -> None:
        """A config others can write is refused with the path, the mode and the fix."""
        project.config("", mode=mode)
        path = project.config_path
        assert project.lines() == [
            f"{path}: file is group/world-writable (mode {mode:04o}); run chmod go-w {path}"
        ]

    def test_writable_unit_and_env_file_are_refused(self, project: Project) -> None:
        """Unit and env files get the same check."""
        env = write(project.root / "app.env", "A=1\n", mode=0o664)
        unit = project.unit("web", 'command = "x"\nenv_files = ["app.env"]', mode=0o666)
        lines = project.lines()
        assert f"{unit}: file is group/world-writable (mode 0666); run chmod go-w {unit}" in lines
        assert f"{env}: file is group/world-writable (mode 0664); run chmod go-w {env}" in lines

    @pytest.mark.parametrize("mode", [0o644, 0o600, 0o400])
    def test_private_files_are_accepted(self, project: Project, mode: int) -> None:
        """0644, 0600 and 0400 are fine."""
        write(project.root / "app.env", "A=1\n", mode=mode)
        project.config("", mode=mode)
        project.unit("web", 'command = "x"\nenv_files = ["app.env"]', mode=mode)
        assert project.load().services["web"].env == {"A": "1"}

    def test_the_mode_of_a_symlinks_target_counts(self, project: Project) -> None:
        """Links are followed: a safe link to a writable file is refused."""
        target = write(project.root / "real.toml", 'command = "x"', mode=0o666)
        (project.root / "units/web.toml").symlink_to(target)
        assert any("mode 0666" in line for line in project.lines())

    @pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
    def test_a_file_owned_by_another_user_is_refused(self, project: Project) -> None:
        """Owner must be the daemon's uid or root."""
        unit = project.unit("web", 'command = "x"')
        os.chown(unit, 12345, -1)
        message = issue_for(project.issues(), "").message
        assert message.startswith("file is owned by uid 12345")


class TestWorkdirAndEnvFiles:
    def test_workdir_expansion(self, project: Project) -> None:
        """~ and $VARS are expanded; relative paths are taken from the config folder."""
        home = Path(project.environ["HOME"])
        project.unit("tilde", 'command = "x"\nworkdir = "~/code"')
        project.unit("var", 'command = "x"\nworkdir = "/srv/${APP}/$APP"')
        project.unit("rel", 'command = "x"\nworkdir = "sub/../dir"')
        project.unit("unset", 'command = "x"\nworkdir = "/srv/$NOPE"')
        services = project.load().services
        assert services["tilde"].workdir == home / "code"
        assert services["var"].workdir == Path("/srv/myapp/myapp")
        assert services["rel"].workdir == project.root / "dir"
        assert services["unset"].workdir == Path("/srv/$NOPE")
        assert not services["tilde"].workdir.exists()  # not a config error

    def test_env_files_merge_in_order_then_env_on_top(self, project: Project) -> None:
        """Later files win over earlier ones, `env` wins over all; the list is kept as given."""
        write(project.root / "base.env", "A=base\nB=base\nC=base\n")
        write(project.root / "conf/over.env", "B=over\nC=over\n")
        project.unit(
            "web",
            'command = "x"\nenv_files = ["base.env", "conf/over.env", "-absent.env"]\n'
            'env = { C = "unit", PORT = 8000 }',
        )
        spec = project.load().services["web"]
        assert spec.env == {"A": "base", "B": "over", "C": "unit", "PORT": "8000"}
        assert spec.env_files == ("base.env", "conf/over.env", "-absent.env")

    def test_a_missing_required_env_file_is_an_issue(self, project: Project) -> None:
        """Without the leading "-", a missing file names the file."""
        project.unit("web", 'command = "x"\nenv_files = ["~/secret.env"]')
        message = issue_for(project.issues(), "env_files").message
        assert str(Path(project.environ["HOME"]) / "secret.env") in message
        assert "not found" in message

    def test_an_unreadable_env_file_is_an_issue(self, project: Project) -> None:
        """A folder where a file should be cannot be read."""
        (project.root / "dir.env").mkdir()
        project.unit("web", 'command = "x"\nenv_files = ["dir.env"]')
        message = issue_for(project.issues(), "env_files").message
        assert message.startswith(f"cannot read env file {project.root / 'dir.env'}")

    def test_a_malformed_env_line_names_file_and_line(self, project: Project) -> None:
        """A line that is not KEY=VALUE is reported as `file: line N: ...`."""
        env = write(project.root / "bad.env", "# ok\nA=1\nnot a pair\nB='open\n")
        project.unit("web", 'command = "x"\nenv_files = ["bad.env"]')
        lines = project.lines()
        assert f"{env}: line 3: expected KEY=VALUE with KEY made of letters, digits and _" in lines
        assert f"{env}: line 4: unterminated ' quote" in lines


class TestReadEnvFile:
    def test_syntax(self, tmp_path: Path) -> None:
        """Comments, blanks, export, both quotes, escapes, inline comments, '=' in values."""
        path = write(
            tmp_path / "x.env",
            "# comment\n\n"
            "PLAIN=value\n"
            "export EXPORTED=yes\n"
            "SPACED = padded value  \n"
            'DOUBLE="a \\"quoted\\" line\\nnext"\n'
            "SINGLE='lit $HOME \\n'\n"
            "HASH=abc#def\n"
            "COMMENTED=abc # trailing\n"
            'QUOTED_COMMENT="x # y" # trailing\n'
            "URL=postgres://u:p@h/db?sslmode=require\n"
            "EMPTY=\n"
            "PLAIN=later wins\n",
        )
        assert read_env_file(path) == {
            "PLAIN": "later wins",
            "EXPORTED": "yes",
            "SPACED": "padded value",
            "DOUBLE": 'a "quoted" line\nnext',
            "SINGLE": "lit $HOME \\n",
            "HASH": "abc#def",
            "COMMENTED": "abc",
            "QUOTED_COMMENT": "x # y",
            "URL": "postgres://u:p@h/db?sslmode=require",
            "EMPTY": "",
        }

    def test_every_bad_line_is_reported(self, tmp_path: Path) -> None:
        """Bad names, missing '=', text after a closing quote: one issue per line."""
        path = write(tmp_path / "x.env", '1ABC=x\nNOEQUALS\nA="x" y\nOK=1\n')
        with pytest.raises(ConfigError) as raised:
            read_env_file(path)
        assert [i.key for i in raised.value.issues] == ["line 1", "line 2", "line 3"]

    def test_messages_never_echo_values(self, tmp_path: Path) -> None:
        """Env files hold secrets: a bad line's message shows neither its key nor its value."""
        path = write(tmp_path / "x.env", 'TOKEN="abc"hunter2\nhunter3\n')
        with pytest.raises(ConfigError) as raised:
            read_env_file(path)
        assert "hunter" not in str(raised.value)
        assert len(raised.value.issues) == 2

    def test_missing_file_raises_oserror(self, tmp_path: Path) -> None:
        """The caller decides whether a missing file matters."""
        with pytest.raises(FileNotFoundError):
            read_env_file(tmp_path / "absent.env")


class TestDurations:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5),
         ("1d", 86400.0), ("1m30s", 90.0), (" 2s ", 2.0), ("0s", 0.0), (10, 10.0), (0.5, 0.5),
         (0, 0.0)],
    )  # fmt: skip
    def test_valid(self, value: object, seconds: float) -> None:
        """Strings with a unit or numbers of seconds."""
        assert parse_duration(value) == pytest.approx(seconds)

    @pytest.mark.parametrize(
        ("value", "message"),
        [("30", "expected a duration"), ("10 sec", "expected a duration"),
         ("", "expected a duration"), ("s", "expected a duration"), ("1x", "expected a duration"),
         ("-1s", "must not be negative"), (-3, "must not be negative"),
         (True, "expected a duration"), ([1], "got a list"), (float("inf"), "expected a duration"),
         (float("nan"), "expected a duration")],
    )  # fmt: skip
    def test_invalid(self, value: object, message: str) -> None:
        """Anything else is a ValueError whose message says what is expected."""
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            parse_duration(value)


class TestSizes:
    @pytest.mark.parametrize(
        ("value", "size"),
        [("512B", 512), ("500KB", 500_000), ("10MiB", 10 * 1024**2), ("1GiB", 1024**3),
         ("1.5KiB", 1536), ("2MB", 2_000_000), ("1tib", 1024**4), ("10 MiB", 10 * 1024**2),
         (4096, 4096), (0, 0)],
    )  # fmt: skip
    def test_valid(self, value: object, size: int) -> None:
        """KB is 1000, KiB is 1024; a bare integer is bytes."""
        assert parse_size(value) == size

    @pytest.mark.parametrize(
        ("value", "message"),
        [("10", "expected a size"), ("10 parsecs", "expected a size"), ("MiB", "expected a size"),
         ("-1KiB", "must not be negative"), (-5, "must not be negative"), (1.5, "expected a size"),
         (False, "expected a size")],
    )  # fmt: skip
    def test_invalid(self, value: object, message: str) -> None:
        """Anything else is a ValueError whose message says what is expected."""
        with pytest.raises(ValueError, match=message):
            parse_size(value)


class TestSecretEnvFiles:
    def test_every_value_of_a_secret_env_file_is_secret_whatever_its_name(
        self, project: Project
    ) -> None:
        """`PIN=4821` and `MYSQL_PWD=hunter2` leak through name-based redaction; marked files do not."""
        write(project.root / "plain.env", "PIN_HINT=4821-hint\nHOST=db.internal\n")
        write(project.root / "secret.env", "PIN=4821\nMYSQL_PWD=hunter2\nX=1\nEMPTY=\n")
        project.unit(
            "web",
            'command = "x"\nenv_files = ["plain.env"]\nsecret_env_files = ["secret.env", '
            '"-absent.env"]\nenv = { ROLE = "web" }',
        )
        spec = project.load().services["web"]
        assert spec.env == {"PIN_HINT": "4821-hint", "HOST": "db.internal", "PIN": "4821",
                            "MYSQL_PWD": "hunter2", "X": "1", "EMPTY": "", "ROLE": "web"}  # fmt: skip
        assert spec.secret_env_files == ("secret.env", "-absent.env")
        assert spec.secret_env_names == {"PIN", "MYSQL_PWD", "X", "EMPTY"}
        secrets = spec.secret_values()
        assert {"4821", "hunter2", "1"} <= secrets
        assert "" not in secrets  # an empty secret would make the redactor mark every gap
        assert "web" not in secrets and "db.internal" in secrets  # name rule: 8+ chars

    def test_the_redactor_hides_short_values_of_secret_files(self, project: Project) -> None:
        """What the daemon does with secret_values(): Redactor(...) over event text."""
        from supervisor.events import Redactor

        write(project.root / "secret.env", "PIN=4821\n")
        project.unit("web", 'command = "x"\nsecret_env_files = ["secret.env"]')
        redact = Redactor(project.load().services["web"].secret_values())
        assert redact("login with pin 4821 failed") == "login with pin *** failed"

    def test_env_overrides_a_secret_file_and_stays_secret(self, project: Project) -> None:
        """Order: env_files, secret_env_files, env; a name from a secret file stays secret."""
        write(project.root / "a.env", "PIN=1111\n")
        write(project.root / "secret.env", "PIN=2222\n")
        project.unit(
            "web",
            'command = "x"\nenv_files = ["a.env"]\nsecret_env_files = ["secret.env"]\n'
            'env = { PIN = "3333" }',
        )
        spec = project.load().services["web"]
        assert spec.env["PIN"] == "3333" and "3333" in spec.secret_values()

    def test_secret_env_files_follow_the_env_files_rules(self, project: Project) -> None:
        """Missing (without "-"), writable by others, malformed: the same issues as env_files."""
        write(project.root / "open.env", "A=1\n", mode=0o666)
        bad = write(project.root / "bad.env", "not a pair\n")
        project.unit("web", 'command = "x"\nsecret_env_files = ["nope.env", "open.env", "bad.env"]')
        lines = project.lines()
        assert any("secret_env_files: env file" in line and "not found" in line for line in lines)
        assert any("open.env: file is group/world-writable" in line for line in lines)
        assert f"{bad}: line 1: expected KEY=VALUE with KEY made of letters, digits and _" in lines

    def test_secret_env_files_from_defaults(self, project: Project) -> None:
        write(project.root / "secret.env", "PIN=4821\n")
        project.config('[defaults]\nsecret_env_files = ["secret.env"]\n')
        project.unit("web", 'command = "x"')
        assert "4821" in project.load().services["web"].secret_values()


class TestPorts:
    def test_two_units_with_one_port_are_an_error_naming_both(self, project: Project) -> None:
        """Issue 9, item 11: both would fight over the port at every start."""
        a = project.unit("api", 'command = "x"\nport = 8000')
        b = project.unit("web", 'command = "y"\nport = 8000')
        project.unit("db", 'command = "z"\nport = 5432')
        lines = project.lines()
        message = "port 8000 is set by 2 units (api, web); give each unit its own port"
        assert lines == [f"{a}: port: {message}", f"{b}: port: {message}"]

    def test_a_port_in_defaults_shared_by_units_is_reported_once(self, project: Project) -> None:
        project.config("[defaults]\nport = 80\n")
        project.unit("a", 'command = "x"')
        project.unit("b", 'command = "x"')
        project.unit("c", 'command = "x"\nport = 81')
        assert project.lines() == [
            f"{project.config_path}: defaults.port: port 80 is set by 2 units (a, b); "
            "give each unit its own port"
        ]
