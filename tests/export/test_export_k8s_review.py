"""``hostvisor export k8s``: the findings of a hostile review, one class each: an
``-o`` target that is not a regular file, secret values outside the Secret, YAML scalars
another reader types differently, duplicate container names, the port of a container
unit whose engine is down. Real CLI, real unit files (tests/export's helpers)."""

from __future__ import annotations

import argparse
import io
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.export import (
    export,
    find,
    main_container,
    parse,
    pod_of,
    project,
    validate,
    write,
)

APP = 'command = ["app"]\n[k8s]\nimage = "app:1"\n'


class TestOutputTarget:
    """-o: atomic rename only for a missing or regular file; anything else written in
    place (a rename would replace a FIFO, a device or a link by a regular file)."""

    def test_a_fifo_is_written_into(self, tmp_path: Path) -> None:
        config = project(tmp_path, {"app": APP})
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
        reader.start()
        done = export(config, "-o", str(fifo))
        reader.join(timeout=30)
        assert done.returncode == 0, done.stderr
        assert not reader.is_alive(), "nothing was written into the FIFO"
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
        assert parse(got[0].decode()) == parse(export(config).stdout)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "pipe", "units"]

    def test_a_symlink_stays_a_link_and_its_file_gets_the_text(self, tmp_path: Path) -> None:
        config = project(tmp_path, {"app": APP})
        real = tmp_path / "real.yaml"
        real.write_text("old\n" * 1000)
        real.chmod(0o644)
        link = tmp_path / "k8s.yaml"
        link.symlink_to(real)
        done = export(config, "-o", str(link))
        assert done.returncode == 0, done.stderr
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert real.read_text() == export(config).stdout  # truncated, not appended
        done = export(config, "-o", str(link), "--include-secrets")
        assert done.returncode == 0, done.stderr
        assert link.is_symlink()
        assert stat.S_IMODE(real.stat().st_mode) == 0o600

    def test_a_regular_file_is_still_replaced_atomically(self, tmp_path: Path) -> None:
        config = project(tmp_path, {"app": APP})
        target = tmp_path / "k8s.yaml"
        target.write_text("old\n")
        before = target.stat().st_ino
        assert export(config, "-o", str(target)).returncode == 0
        assert target.stat().st_ino != before  # a new file renamed over it
        assert target.read_text() == export(config).stdout


CONN = "postgres://u:pw1234@h/db"


class TestSecretsOutsideTheSecret:
    """Every string of every object but the Secret's data is searched for the values of
    the Secret's variables (and a URL's password): the description annotation is dropped,
    anything else is an error naming the field; never the value in a message."""

    def test_a_url_in_the_description_and_the_probes(self, tmp_path: Path) -> None:
        config = project(tmp_path, {"app": f'''description = "app on {CONN}"
command = ["app", "--db", "{CONN}"]
env = {{ CONN = "{CONN}", SHOWN = "db {CONN}" }}
[health]
exec = ["pg_isready", "-d", "{CONN}"]
[k8s]
image = "app:1"
'''})  # fmt: skip
        done = export(config)
        assert done.returncode == 1
        assert done.stdout == ""
        assert "pw1234" not in done.stderr
        for probe in ("livenessProbe", "readinessProbe"):
            assert (f"error: app: the value of CONN, a secret, appears in the container's {probe} "
                    f"(Deployment spec.template.spec.containers[0].{probe}.exec.command[2])"
                    in done.stderr)  # fmt: skip
        done = export(config, "--include-secrets")
        assert done.returncode == 0, done.stderr

    def test_the_description_is_dropped_commands_and_env_reference(self, tmp_path: Path) -> None:
        config = project(tmp_path, {"app": f'''description = "app on {CONN}"
command = ["app", "--db", "{CONN}"]
env = {{ CONN = "{CONN}", SHOWN = "db {CONN}" }}
[k8s]
image = "app:1"
'''})  # fmt: skip
        done = export(config)
        assert done.returncode == 0, done.stderr
        assert "pw1234" not in done.stdout + done.stderr
        docs = parse(done.stdout)
        validate(docs)
        deployment = find(docs, "Deployment", "app")
        assert "annotations" not in deployment["metadata"]
        container = main_container(deployment)
        assert container["command"] == ["app", "--db", "$(CONN)"]
        assert container["env"] == [{"name": "SHOWN", "value": "db $(CONN)"}]
        assert ("warning: app: description: not exported (the kubernetes.io/description "
                "annotation): it holds the value of CONN, a secret") in done.stderr  # fmt: skip

    def test_a_password_alone_in_a_hook(self, tmp_path: Path) -> None:
        config = project(tmp_path, {"app": f'''command = ["app"]
env = {{ CONN = "{CONN}" }}
[post_start]
command = ["psql", "--password", "pw1234"]
[k8s]
image = "app:1"
'''})  # fmt: skip
        done = export(config)
        assert done.returncode == 1
        assert "pw1234" not in done.stderr
        assert (
            "app: the value of CONN, a secret, appears in the container's lifecycle" in done.stderr
        )

    def test_a_crontab_line_as_description(self, tmp_path: Path) -> None:
        """A crontab import's description is the job line, token included."""
        token = "tok-9c41e07bd2"
        config = project(tmp_path, {"cron-job": f'''description = "*/5 * * * * curl -H 'X-Token: {token}' https://api.example/ping (crontab)"
schedule = "*/5 * * * *"
restart = "no"
command = ["/bin/sh", "-c", "curl -H 'X-Token: {token}' https://api.example/ping"]
env = {{ API_TOKEN = "{token}" }}
[k8s]
image = "curl:8"
'''})  # fmt: skip
        done = export(config)
        assert done.returncode == 0, done.stderr
        assert token not in done.stdout + done.stderr
        cron = find(parse(done.stdout), "CronJob", "cron-job")
        assert "annotations" not in cron["metadata"]
        assert "$(API_TOKEN)" in main_container(cron)["command"][2]
        kept = export(config, "--include-secrets")
        assert kept.returncode == 0, kept.stderr
        assert (
            token
            in find(parse(kept.stdout), "CronJob", "cron-job")["metadata"]["annotations"][
                "kubernetes.io/description"
            ]
        )

    def test_short_values(self, tmp_path: Path) -> None:
        """A 1-character value (PIN=7 of a secret_env_files file) would match everywhere:
        not searched; a variable secret by its name is, from 3 characters."""
        config = project(tmp_path, {"app": '''description = "app 7"
command = ["app"]
secret_env_files = ["pin.env"]
[health]
exec = ["check", "7"]
[k8s]
image = "app:1"
'''})  # fmt: skip
        write(tmp_path / "pin.env", "PIN=7\n", 0o600)
        done = export(config)
        assert done.returncode == 0, done.stderr
        write(
            config.parent / "units" / "app.toml",
            """command = ["app"]
env = { API_KEY = "abc" }
[health]
exec = ["check", "abc"]
[k8s]
image = "app:1"
""",
        )
        done = export(config)
        assert done.returncode == 1
        assert (
            "app: the value of API_KEY, a secret, appears in the container's livenessProbe"
            in done.stderr
        )


AMBIGUOUS = ["1e3", "1.0e3", "1e+3", "0o17", "0x1F", "y", "n", "Y", "N", "yes", "off", "~",
             "null", "", ".inf", "1_000", "12:30", "-.5", "+12", "0b101", "True", "NO", "1.5"]  # fmt: skip


class TestYamlScalars:
    @pytest.mark.parametrize("text", AMBIGUOUS)
    def test_quoted_and_read_back_as_a_string(self, text: str) -> None:
        from supervisor.cli_export import dump_manifests

        stream = dump_manifests([{"value": text}])
        assert yaml.safe_load(stream) == {"value": text}
        assert f"value: '{text}'\n" in stream

    @pytest.mark.parametrize("text", ["web", "1.2.3", "v1", "prod", "8080/tcp", "e3", "0x"])
    def test_plain_strings_stay_plain(self, text: str) -> None:
        from supervisor.cli_export import dump_manifests

        assert f"value: {text}\n" in dump_manifests([{"value": text}])

    def test_env_values_from_a_unit(self, tmp_path: Path) -> None:
        config = project(tmp_path, {"app": '''command = ["app", "1e3"]
env = { RATE = "1e3", DEBUG = "y", PERM = "0o17" }
[k8s]
image = "app:1"
'''})  # fmt: skip
        done = export(config)
        assert done.returncode == 0, done.stderr
        for line in ("- '1e3'\n", "value: '1e3'\n", "value: 'y'\n", "value: '0o17'\n"):
            assert line in done.stdout
        validate(parse(done.stdout))

    def test_check_reads_the_text_written(self, tmp_path: Path, monkeypatch: Any) -> None:
        """--check validates what a reader gets back from the text, not the dicts: a
        writer that lost a string's quotes fails it."""
        import supervisor.cli_export as cli_export
        from supervisor.cli_porting import add_export_arguments

        config = project(tmp_path, {"app": 'command = ["app"]\nenv = { RATE = "1.5" }\n'
                                           '[k8s]\nimage = "app:1"\n'})  # fmt: skip
        real = cli_export.dump_manifests
        monkeypatch.setattr(cli_export, "dump_manifests",
                            lambda objs: real(objs).replace("'1.5'", "1.5"))  # fmt: skip
        parser = argparse.ArgumentParser()
        add_export_arguments(parser)
        parser.add_argument("-c", dest="config")
        out, err = io.StringIO(), io.StringIO()
        args = parser.parse_args(["k8s", "--check", "-c", str(config)])
        assert cli_export.export_verb(args, out=out, err=err) == 1
        assert (
            "error: app Deployment: spec.template.spec.containers.0.env.0.value" in err.getvalue()
        )
        assert out.getvalue() == ""


_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _names(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod.get("initContainers", []) + pod["containers"]]


class TestContainerNames:
    def test_unique_in_every_pod(self, tmp_path: Path) -> None:
        long_a, long_b = "a" * 57 + "-one", "a" * 57 + "-two"
        served = 'command = ["db"]\nport = {}\n[k8s]\nimage = "db:1"\n'
        config = project(tmp_path, {
            "db": served.format(5432),
            long_a: served.format(7001),
            long_b: served.format(7002),
            "preflight": 'command = ["pf"]\n[preflight]\ncommand = ["check"]\n[k8s]\nimage = "pf:1"\n',
            "wait-db": 'command = ["w"]\ndepends_on = ["db"]\n[k8s]\nimage = "w:1"\n',
            "both": f'command = ["b"]\ndepends_on = ["{long_a}", "{long_b}"]\n'
                    '[preflight]\ncommand = ["check"]\n[k8s]\nimage = "b:1"\n',
        })  # fmt: skip
        done = export(config)
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        for name in ("preflight", "wait-db", "both"):
            names = _names(pod_of(find(docs, "Deployment", name)))
            assert len(names) == len(set(names)), (name, names)
            assert all(len(n) <= 63 and _LABEL.fullmatch(n) for n in names), names
        assert _names(pod_of(find(docs, "Deployment", "preflight"))) == ["preflight-2", "preflight"]
        assert _names(pod_of(find(docs, "Deployment", "wait-db"))) == ["wait-db-2", "wait-db"]
        wait_a = ("wait-" + long_a)[:63].rstrip("-")  # 62: the "-" cut
        assert _names(pod_of(find(docs, "Deployment", "both"))) == [
            wait_a, wait_a[:61] + "-2", "preflight", "both",
        ]  # fmt: skip
        assert "warning: preflight: init container preflight named preflight-2" in done.stderr


class TestEngineDown:
    def test_the_host_port_is_said_to_be_a_guess(self, tmp_path: Path) -> None:
        """Compose's 3005:8080 with the engine down: the container's port is unknown; the
        host port is kept and a warning says to edit it."""
        config = project(tmp_path, {"web": 'container = "web"\nport = 3005\n'})
        env = {"DOCKER_HOST": f"unix://{tmp_path}/no-such-engine.sock"}
        done = export(config, "--image", "web=web:1", env=env)
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        assert find(docs, "Service", "web")["spec"]["ports"][0]["targetPort"] == 3005
        assert ("warning: web: containerPort and targetPort 3005 are the host port: the "
                "container's port is unknown without the engine; edit them") in done.stderr  # fmt: skip
