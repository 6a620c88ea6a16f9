"""``hostvisor import compose``: Compose files to container units.

The seed files (tests/import_sources/compose/) are seed 000's stacks that sat `Exited (255)`
after the Docker engine restarted: lockn-auth (db -> api), qdrant (container_name) and
lockn-logger. The CLI runs as a subprocess; the Compose a host has is forced with
``HOSTVISOR_COMPOSE`` or faked on ``PATH``; the round trip runs Debian's docker-compose 1.29
against the private engine and a real daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.importers import ImportContext, ImportFailed, Source
from supervisor.importers import compose_file as cf
from supervisor.importers.compose import convert
from tests.daemon_harness import DaemonProcess
from tests.docker_engine import DockerEngine

SOURCES = Path(__file__).parent / "import_sources" / "compose"
AUTH = SOURCES / "lockn-auth" / "docker-compose.yml"
QDRANT = SOURCES / "qdrant" / "docker-compose.yml"
LOGGER = SOURCES / "lockn-logger" / "compose.yaml"


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``python -m supervisor ARGS`` with the test's environment (no HOSTVISOR_* leaking
    in from outside) plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTVISOR_", "COMPOSE_"))}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        input=stdin,
        cwd=cwd,
    )


def config_in(folder: Path) -> Path:
    """An empty config.toml (the units folder: ``folder/units``)."""
    path = folder / "config.toml"
    path.write_text("")
    path.chmod(0o644)
    return path


def units_of(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: tomllib.loads(p.read_text()) for p in sorted(folder.glob("*.toml"))}


def convert_text(
    text: str, tmp_path: Path, *, env: dict[str, str] | None = None, name: str = "compose.yaml"
) -> Any:
    """:func:`convert` of ``text`` written to ``tmp_path/stack/name`` (Compose v2 forced)."""
    folder = tmp_path / "stack"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    environ = {"HOSTVISOR_COMPOSE": "v2", **(env or {})}
    return convert(Source(path=path, text=text), ImportContext(paths=(path,), environ=environ))


def only(result: Any) -> Any:
    assert len(result.units) == 1, result.units
    return result.units[0]


# ---------------------------------------------------------------------------- seed 000


class TestSeedStacks:
    def test_auth_stack_v2_names_dependency_health_and_port(self, tmp_path: Path) -> None:
        """The auth stack under Compose v2: units lockn-auth-db-1 and lockn-auth-api-1 (the
        containers of the seed), api waits for db healthy, db reads Docker's pg_isready
        status, api's port is the host side of 3005:8080; `hostvisor check` passes."""
        config = config_in(tmp_path)
        out = run("import", "compose", str(AUTH), "-c", str(config),
                  env={"HOSTVISOR_COMPOSE": "v2"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        units = units_of(tmp_path / "units")
        assert set(units) == {"lockn-auth-db-1", "lockn-auth-api-1"}
        db, api = units["lockn-auth-db-1"], units["lockn-auth-api-1"]
        assert db["container"] == "lockn-auth-db-1" and api["container"] == "lockn-auth-api-1"
        assert db["recreate_command"] == [
            "docker", "compose", "-p", "lockn-auth", "-f", str(AUTH), "up", "-d", "--no-deps", "db",
        ]  # fmt: skip
        assert api["recreate_command"][-1] == "api"
        assert db["workdir"] == api["workdir"] == str(AUTH.parent)
        assert db["health"] == {"docker": True, "interval": "5s", "failure_threshold": 1}
        assert db["stop_timeout"] == "30s"
        assert api["depends_on"] == {"lockn-auth-db-1": "healthy"}
        assert api["port"] == 3005 and "health" not in api
        assert "restart" not in db and "restart" not in api  # hostvisor's always keeps them up
        for line in (
            "lockn-auth-db-1 (from db): wrote",
            "depends_on.db: service_healthy -> depends_on.lockn-auth-db-1 = healthy",
            "ports: 3005:8080 -> port",
            "healthcheck.retries: the container's own",
            "environment (2 entries): Compose keeps it: recreate_command recreates",
            "networks: file-level",
            "project 'lockn-auth' (the folder's name",
        ):
            assert line in out.stdout, line
        written = "".join(p.read_text() for p in (tmp_path / "units").glob("*.toml"))
        assert "change-me" not in out.stdout + written  # environment values are never shown
        check = run("check", "-c", str(config))
        assert check.returncode == 0, check.stdout + check.stderr

    def test_auth_stack_v1_names_with_underscores(self, tmp_path: Path) -> None:
        """Compose v1 (docker-compose 1.29): lockn-auth_db_1 (1.29 keeps '-' in a project
        name), recreated with `docker-compose`; the dependency follows the unit name."""
        out = run("import", "compose", str(AUTH), "-o", str(tmp_path),
                  env={"HOSTVISOR_COMPOSE": "v1"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        units = units_of(tmp_path)
        assert set(units) == {"lockn-auth_db_1", "lockn-auth_api_1"}
        api = units["lockn-auth_api_1"]
        assert api["container"] == "lockn-auth_api_1"
        assert api["recreate_command"][:3] == ["docker-compose", "-p", "lockn-auth"]
        assert api["depends_on"] == {"lockn-auth_db_1": "healthy"}

    def test_qdrant_container_name_and_first_port(self, tmp_path: Path) -> None:
        """container_name is the container and the unit; of two published ports the first is
        the unit's port, the other reported."""
        out = run("import", "compose", str(QDRANT), "-o", str(tmp_path),
                  env={"HOSTVISOR_COMPOSE": "v2"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        qdrant = units_of(tmp_path)["qdrant"]
        assert qdrant["container"] == "qdrant" and qdrant["port"] == 6333
        assert "qdrant: wrote" in out.stdout  # no "(from ...)": the names agree
        assert "ports: 6334:6334: a unit has one port" in out.stdout
        assert "version: informational only" in out.stdout
        assert "ulimits (1 entry): Compose keeps it" in out.stdout

    def test_logger_stack_name_anchors_one_shot_and_profile(self, tmp_path: Path) -> None:
        """lockn-logger: the top-level name is the project, merged anchors give restart, the
        migration awaited with service_completed_successfully is a one-shot (restart = "no")
        and not a dependency, a profile keeps pgadmin from starting, a disabled healthcheck
        gives no [health]; imported with the other two stacks, every unit passes check."""
        config = config_in(tmp_path)
        out = run("import", "compose", str(AUTH), str(QDRANT), str(LOGGER), "-c", str(config),
                  env={"HOSTVISOR_COMPOSE": "v2"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        units = units_of(tmp_path / "units")
        assert len(units) == 9
        api = units["lockn-logger-api-1"]
        assert api["restart"] == "always"
        assert api["depends_on"] == {
            "lockn-logger-postgres-1": "healthy",
            "lockn-logger-garnet-1": "started",
            "lockn-logger-seaweedfs-1": "started",
        }
        assert units["lockn-logger-migrate-1"]["restart"] == "no"
        assert units["lockn-logger-pgadmin-1"]["autostart"] is False
        assert "health" not in units["lockn-logger-garnet-1"]
        assert units["lockn-logger-garnet-1"]["port"] == 6379
        assert units["lockn-logger-seaweedfs-1"]["port"] == 9333
        for line in (
            "project 'lockn-logger' (the top-level name)",
            'depends_on.migrate: service_completed_successfully: hostvisor\'s "completed"',
            "depends_on.postgres.restart: hostvisor does not restart",
            "stop_signal: SIGINT: Compose sets it on the container",
            "ports: 8888:8888/tcp: a unit has one port",
            "restart: unless-stopped -> restart = always",
            "x-defaults: an extension",
            "deploy.resources: Compose keeps it",
        ):
            assert line in out.stdout, line
        check = run("check", "-c", str(config))
        assert check.returncode == 0, check.stdout + check.stderr


# ---------------------------------------------------------------------------- names


class TestNaming:
    @pytest.mark.parametrize(
        ("folder", "version", "project", "container"),
        [
            ("lockn-auth", "v2", "lockn-auth", "lockn-auth-db-1"),
            ("lockn-auth", "v1", "lockn-auth", "lockn-auth_db_1"),
            ("My.Stack_2", "v2", "mystack_2", "mystack_2-db-1"),
            ("My.Stack_2", "v1", "mystack_2", "mystack_2_db_1"),
            ("_Dev Stack", "v2", "devstack", "devstack-db-1"),  # leading _ stripped
            ("_Dev Stack", "v1", "_devstack", "devstack_db_1"),  # 1.29 strips it in names
        ],
    )
    def test_folder_name_normalised_as_each_compose_does(
        self, folder: str, version: str, project: str, container: str
    ) -> None:
        """v2: compose-go's NormalizeProjectName; v1: docker-compose 1.29's normalize_name and
        build_container_name."""
        name, why, unused = cf.project_name({}, version, {}, f"/home/joel/{folder}")
        assert (name, unused) == (project, [])
        assert why.startswith("the folder's name")
        assert cf.container_name(name, "db", {}, version) == container

    def test_v2_precedence_environment_then_top_level_name_then_folder(self) -> None:
        """docs.docker.com/compose/how-tos/project-name: COMPOSE_PROJECT_NAME beats name:,
        which beats the folder; the name not used is reported."""
        doc = {"name": "from-file"}
        name, why, unused = cf.project_name(doc, "v2", {"COMPOSE_PROJECT_NAME": "env"}, "/x/dir")
        assert (name, why) == ("env", "COMPOSE_PROJECT_NAME")
        assert unused == [("name: from-file", "COMPOSE_PROJECT_NAME takes precedence")]
        assert cf.project_name(doc, "v2", {}, "/x/dir")[:2] == ("from-file", "the top-level name")

    def test_v1_has_no_top_level_name(self) -> None:
        """docker-compose 1.29 refuses a top-level name: the folder names the project, and the
        report says recreate_command would fail."""
        name, _, unused = cf.project_name({"name": "auth"}, "v1", {}, "/x/lockn-auth")
        assert name == "lockn-auth"
        assert "1.29 refuses a top-level name" in unused[0][1]

    def test_invalid_v2_project_name_is_normalised_and_reported(self) -> None:
        name, _, unused = cf.project_name({}, "v2", {"COMPOSE_PROJECT_NAME": "Lockn.Auth"}, "/x")
        assert name == "locknauth"
        assert "not a valid v2 project name" in unused[0][1]

    def test_empty_project_name_fails(self) -> None:
        with pytest.raises(ImportFailed, match="empty once normalised"):
            cf.project_name({}, "v2", {}, "/x/__")

    def test_container_name_wins(self) -> None:
        assert cf.container_name("p", "vector", {"container_name": "qdrant"}, "v1") == "qdrant"

    def test_dotenv_names_the_project_and_the_environment_wins(self, tmp_path: Path) -> None:
        """COMPOSE_PROJECT_NAME in the .env beside the file names the project; the same
        variable in the environment wins (Compose's precedence)."""
        stack = tmp_path / "auth"
        stack.mkdir()
        (stack / "compose.yaml").write_text("services:\n  db:\n    image: postgres\n")
        (stack / ".env").write_text("# dev\nexport COMPOSE_PROJECT_NAME='auth-dev'\n")
        file = str(stack / "compose.yaml")
        out = run("import", "compose", file, "-o", str(tmp_path / "a"),
                  env={"HOSTVISOR_COMPOSE": "v2"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert units_of(tmp_path / "a")["auth-dev-db-1"]["recreate_command"][3] == "auth-dev"
        out = run("import", "compose", file, "-o", str(tmp_path / "b"),
                  env={"HOSTVISOR_COMPOSE": "v2", "COMPOSE_PROJECT_NAME": "auth-ci"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert list(units_of(tmp_path / "b")) == ["auth-ci-db-1"]


# ---------------------------------------------------------------------------- detection


def fake_bin(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


DOCKER_WITHOUT_PLUGIN = 'echo "docker: unknown command: docker compose" >&2; exit 125'


class TestDetection:
    @pytest.mark.parametrize(
        ("docker", "legacy", "version", "command", "how"),
        [
            ('[ "$1" = compose ] && echo 2.29.7 && exit 0; exit 1', None, "v2",
             ["docker", "compose"], "`docker compose version`: 2.29.7"),
            (DOCKER_WITHOUT_PLUGIN, "echo 1.29.2", "v1", ["docker-compose"],
             "`docker-compose version`: 1.29.2"),
            (DOCKER_WITHOUT_PLUGIN, "echo v2.20.2", "v2", ["docker-compose"],
             "a standalone v2"),
            (None, None, "v2", ["docker", "compose"], "neither `docker compose` nor"),
        ],
    )  # fmt: skip
    def test_the_host_s_compose_names_and_recreates(
        self, tmp_path: Path, docker: str | None, legacy: str | None, version: str,
        command: list[str], how: str,
    ) -> None:  # fmt: skip
        """`docker compose version` answering is v2; else `docker-compose version` tells 1.x
        (v1 names) from a standalone v2; neither: v2, said in the report."""
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        if docker is not None:
            fake_bin(bin_dir, "docker", docker)
        if legacy is not None:
            fake_bin(bin_dir, "docker-compose", legacy)
        out = run("import", "compose", str(AUTH), "-o", str(tmp_path / "u"),
                  env={"PATH": str(bin_dir)})  # fmt: skip
        assert out.returncode == 0, out.stderr
        sep = "-" if version == "v2" else "_"
        unit = units_of(tmp_path / "u")[f"lockn-auth{sep}db{sep}1"]
        assert unit["recreate_command"][: len(command)] == command
        assert f"Compose {version} (" in out.stdout and how in out.stdout

    def test_hostvisor_compose_forces_the_version(self, tmp_path: Path) -> None:
        """HOSTVISOR_COMPOSE=v1 wins over a docker compose plugin that answers."""
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake_bin(bin_dir, "docker", "echo 2.29.7")
        out = run("import", "compose", str(AUTH), "-o", str(tmp_path / "u"),
                  env={"PATH": str(bin_dir), "HOSTVISOR_COMPOSE": "v1"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "lockn-auth_db_1" in units_of(tmp_path / "u")

    def test_a_bad_hostvisor_compose_fails(self, tmp_path: Path) -> None:
        out = run("import", "compose", str(AUTH), "-o", str(tmp_path),
                  env={"HOSTVISOR_COMPOSE": "v3"})  # fmt: skip
        assert out.returncode == 1
        assert "HOSTVISOR_COMPOSE='v3': expected v1 or v2" in out.stderr
        assert not list(tmp_path.glob("*.toml"))


# ---------------------------------------------------------------------------- the file


#: A billion-laughs file (477 bytes): 9 aliases a level, 9^8 values used as ports.
BOMB = "\n".join(
    ["x0: &a0 [" + ",".join(['"1:1"'] * 9) + "]"]
    + [f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    + ["services:\n  web:\n    image: x\n    ports: *a8\n    environment: *a8\n"]
)


class TestFile:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("services:\n  db:\n    image: [postgres\n", "line 4: not valid YAML"),
            ("services:\n  db:\n    image: a\n  db:\n    image: b\n",
             "line 4: not valid YAML: the key 'db' is given twice"),
            ("version: '3'\nvolumes: {}\n", "no `services:` with at least one service"),
            ("- db\n- api\n", "the top level is not a mapping"),
            ("services:\n  db: postgres\n", "services.db: expected a mapping"),
            (BOMB, "line 6: its aliases expand to 597871 values (at most 100000"),
            ("services: " + "[" * 500 + "]" * 500 + "\n", "line 1: nested more than 64 deep"),
            ("x: &a [*a]\nservices: {}\n", "line 1: an alias inside the node it names"),
            ("services:\n  web:\n    image: x\n    container_name: ${B:-x}${\n",
             "services.web.container_name: '${B:-x}${': invalid interpolation format"),
        ],
    )  # fmt: skip
    def test_a_file_that_cannot_be_read_fails_with_where(
        self, tmp_path: Path, text: str, message: str
    ) -> None:
        path = tmp_path / "docker-compose.yml"
        path.write_text(text)
        out = run("import", "compose", str(path), "-o", str(tmp_path / "u"),
                  env={"HOSTVISOR_COMPOSE": "v2"})  # fmt: skip
        assert out.returncode == 1
        assert f"{path}: " in out.stderr and message in out.stderr, out.stderr

    def test_yaml_is_read_as_compose_v2_reads_it(self, tmp_path: Path) -> None:
        """YAML 1.2 as compose-go: unquoted `no` is the string "no", unquoted 22:22 is not
        the base-60 number 1342 (PyYAML's YAML 1.1 would give False and 1342)."""
        unit = only(convert_text("services:\n  sshd:\n    restart: no\n    ports:\n"
                                 "      - 22:22\n", tmp_path))  # fmt: skip
        assert unit.table["restart"] == "no" and unit.table["port"] == 22

    def test_interpolation_from_the_environment_then_dotenv(self, tmp_path: Path) -> None:
        """${VAR:-default} takes the environment, else .env, else the default; an unset
        ${VAR} is empty, with a note; a variable from the shell is noted."""
        text = (
            "services:\n  api:\n    container_name: ${STACK:-lockn}-api\n"
            "    ports: ['${API_PORT:-3005}:8080']\n    image: app:${TAG}\n"
        )
        result = convert_text(text, tmp_path)
        unit = only(result)
        assert (unit.table["container"], unit.table["port"]) == ("lockn-api", 3005)
        assert any("variables not set" in n and "TAG" in n for n in result.notes)
        (tmp_path / "stack" / ".env").write_text("API_PORT=4100\n")
        assert only(convert_text(text, tmp_path)).table["port"] == 4100
        result = convert_text(text, tmp_path, env={"API_PORT": "4000", "STACK": "x"})
        assert only(result).table["port"] == 4000 and only(result).name == "x-api"
        assert any("reads API_PORT, STACK from this environment" in n for n in result.notes)

    def test_standard_input_has_no_recreate_command(self, tmp_path: Path) -> None:
        """From stdin the file's path is unknown: no recreate_command, said in the report;
        the project is the current folder's name (Compose's project directory for -f -)."""
        cwd = tmp_path / "lockn-gen"
        cwd.mkdir()
        out = run("import", "compose", "-", "-o", str(tmp_path / "u"), cwd=cwd,
                  env={"HOSTVISOR_COMPOSE": "v2"}, stdin=AUTH.read_text())  # fmt: skip
        assert out.returncode == 0, out.stderr
        units = units_of(tmp_path / "u")
        assert set(units) == {"lockn-gen-db-1", "lockn-gen-api-1"}
        assert all("recreate_command" not in u and "workdir" not in u for u in units.values())
        assert "no recreate_command" in out.stdout

    def test_an_override_file_beside_it_is_named_too(self, tmp_path: Path) -> None:
        """`up` without -f also reads docker-compose.override.yml: recreate_command names it."""
        (tmp_path / "stack").mkdir()
        (tmp_path / "stack" / "docker-compose.override.yml").write_text("services: {}\n")
        result = convert_text("services:\n  db: {}\n", tmp_path, name="docker-compose.yml")
        override = str(tmp_path / "stack" / "docker-compose.override.yml")
        assert only(result).table["recreate_command"][6:10] == ["-f", override, "up", "-d"]
        assert any("docker-compose.override.yml beside it" in n for n in result.notes)


# ---------------------------------------------------------------------------- mapping


class TestMapping:
    def test_depends_on_forms(self, tmp_path: Path) -> None:
        """The list form and links are "started" (a list); an unknown service is reported."""
        text = (
            "services:\n  db: {}\n  cache: {}\n"
            "  api:\n    depends_on: [db, queue]\n    links: ['cache:redis']\n"
        )
        api = convert_text(text, tmp_path).units[2]
        assert api.table["depends_on"] == ["stack-db-1", "stack-cache-1"]
        assert ("depends_on.queue: service_started", "not a service of this file") in api.unmapped
        assert ("links (cache, started first by Compose)", "depends_on.stack-cache-1") in (
            api.mapped
        )

    def test_healthy_dependency_without_healthcheck_is_noted(self, tmp_path: Path) -> None:
        text = (
            "services:\n  db:\n    healthcheck: {test: [NONE]}\n"
            "  api:\n    depends_on: {db: {condition: service_healthy}}\n"
        )
        db, api = convert_text(text, tmp_path).units
        assert "health" not in db.table
        assert ("healthcheck (disabled)", "the container runs no health check: no [health]") in (
            db.unmapped
        )
        assert api.table["depends_on"] == {"stack-db-1": "healthy"}
        assert any("db has no healthcheck in the file" in n for n in api.notes)

    @pytest.mark.parametrize(
        ("ports", "port", "reason"),
        [
            (["8080"], None, "no fixed host port"),
            (["127.0.0.1::80"], None, "no fixed host port"),
            (["5353:53/udp", "8053:53"], 8053, "a udp port"),
            (["9000-9001:9000-9001"], None, "a port range"),
            ([{"target": 80, "published": 8081, "protocol": "tcp"}], 8081, None),
            (["[::1]:8443:443"], 8443, None),
        ],
    )
    def test_ports(self, tmp_path: Path, ports: list[Any], port: int | None,
                   reason: str | None) -> None:  # fmt: skip
        text = "services:\n  web:\n    ports: " + json.dumps(ports) + "\n"
        unit = only(convert_text(text, tmp_path))
        assert unit.table.get("port") == port
        if reason is not None:
            assert any(reason in why for _, why in unit.unmapped), unit.unmapped

    @pytest.mark.parametrize(
        ("service", "expected", "mapped"),
        [
            ({"restart": "always"}, {"restart": "always"}, "restart: always"),
            ({"restart": "on-failure:5"}, {"restart": "on-failure"}, "restart: on-failure:5"),
            ({"deploy": {"restart_policy": {"condition": "any", "delay": "5s"}}},
             {"restart": "always"}, "deploy.restart_policy.condition: any"),
            ({"stop_grace_period": "1m30s"}, {"stop_timeout": "90s"}, "stop_grace_period: 1m30s"),
            ({"healthcheck": {"test": "true", "interval": "500ms"}},
             {"health": {"docker": True, "interval": "500ms", "failure_threshold": 1}},
             "healthcheck.interval: 500ms"),
            ({"deploy": {"replicas": 0}}, {"autostart": False}, "deploy.replicas: 0"),
            ({"profiles": ["debug"]}, {"autostart": False}, "profiles: debug"),
        ],
    )  # fmt: skip
    def test_mapped_keys(
        self, tmp_path: Path, service: dict[str, Any], expected: dict[str, Any], mapped: str
    ) -> None:
        text = json.dumps({"services": {"web": service}})  # JSON is YAML
        unit = only(convert_text(text, tmp_path))
        assert {k: unit.table[k] for k in expected} == expected
        assert any(setting == mapped for setting, _ in unit.mapped), unit.mapped

    def test_reported_not_mapped(self, tmp_path: Path) -> None:
        """Retries, replicas past the first, unknown keys and extensions are reported."""
        service = {
            "restart": "on-failure:5",
            "scale": 3,
            "frobnicate": 1,
            "x-team": "auth",
            "deploy": {"restart_policy": {"condition": "any"}},
            "extends": "base",
        }
        unit = only(convert_text(json.dumps({"services": {"web": service}}), tmp_path))
        reasons = dict(unit.unmapped)
        assert "give_up_after" in reasons["restart: on-failure:5 (max retries 5)"]
        assert "only replica 1 (stack-web-1) is imported" in reasons["scale: 3"]
        assert reasons["frobnicate"] == "not known to hostvisor import"
        assert "ignored by Compose too" in reasons["x-team"]
        assert reasons["deploy.restart_policy.condition"] == "restart is set, and Compose uses it"
        assert reasons["extends"].startswith("not followed")

    def test_active_profile_starts_with_the_daemon(self, tmp_path: Path) -> None:
        text = "services:\n  pgadmin:\n    profiles: [debug]\n"
        unit = only(convert_text(text, tmp_path, env={"COMPOSE_PROFILES": "debug,ops"}))
        assert "autostart" not in unit.table


# ---------------------------------------------------------------------------- round trip


ROUND_TRIP = """\
services:
  db:
    image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]
    healthcheck:
      test: ["CMD", "true"]
      interval: 200ms
      retries: 2
    stop_grace_period: 2s
  api:
    image: {image}
    command: ["httpd", "-f", "-p", "8080"]
    ports:
      - "{port}:8080"
    depends_on:
      db:
        condition: service_healthy
    stop_grace_period: 1s
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def compose_project(engine: DockerEngine) -> Iterator[str]:
    """A unique project folder name; its containers and network are removed afterwards."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose (v1) is not installed (apt-get install docker-compose)")
    folder = f"Auth.Stack-{uuid.uuid4().hex[:8]}"
    yield folder
    project = folder.lower().replace(".", "")
    listing = engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
                            check=False)  # fmt: skip
    if ids := listing.stdout.split():
        engine.docker("rm", "-f", *ids, check=False)
    engine.docker("network", "rm", f"{project}_default", check=False)


@pytest.mark.docker
def test_round_trip_docker_compose_v1(
    tmp_path: Path, engine: DockerEngine, d: DaemonProcess, compose_project: str
) -> None:
    """docker-compose 1.29 -> `hostvisor import compose` (v1) -> check -> `docker-compose up
    -d` -> daemon: both units RUNNING (api after db is healthy); `docker rm -f` the api
    container and recreate_command brings it back from the file, port published."""
    stack = tmp_path / compose_project
    stack.mkdir()
    port = free_port()
    file = stack / "docker-compose.yml"
    file.write_text(ROUND_TRIP.format(image=engine.image, port=port))
    project = compose_project.lower().replace(".", "")  # 1.29: only [-_a-z0-9]
    db, api = f"{project}_db_1", f"{project}_api_1"

    out = run("import", "compose", str(file), "-c", str(d.config_path),
              env={"HOSTVISOR_COMPOSE": "v1"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert {p.stem for p in d.units.glob("*.toml")} == {db, api}
    check = d.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    up = subprocess.run(["docker-compose", "-f", str(file), "up", "-d"], cwd=stack,
                        env=engine.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert up.returncode == 0, up.stderr
    before = json.loads(engine.docker("inspect", api).stdout)[0]["Id"]

    d.extra_env["DOCKER_HOST"] = engine.host
    d.start()
    assert d.wait_state(db, "running", timeout=30)["health"] == "healthy"
    assert d.wait_state(api, "running", timeout=30)["container_id"] == before

    seq = d.last_seq()
    engine.docker("rm", "-f", api)
    # after the exit: the event stream may not have delivered the first "running" yet at last_seq
    exited = d.wait_event("hostvisor.service.exited", api, after=seq, timeout=30)
    d.wait_event("hostvisor.service.running", api, after=exited["seq"], timeout=60)
    info = json.loads(engine.docker("inspect", api).stdout)[0]
    assert info["Id"] != before and info["State"]["Running"]
    assert d.wait_state(api, "running")["container_id"] == info["Id"]
    assert info["Config"]["Labels"]["com.docker.compose.service"] == "api"
    assert info["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostPort"] == str(port)
    assert d.status(db)["container_id"] == json.loads(engine.docker("inspect", db).stdout)[0]["Id"]
