"""``hostvisor export k8s``: the real CLI on real unit files, its YAML parsed, every
field the units imply asserted, and every object validated offline with
kubernetes-validate in strict mode against the newest Kubernetes it knows (issue 13).

The units are tests/export/units, one per mapping. Container units read their image,
command, environment and published ports from the session's private Docker engine
(tests/docker_engine.py).
"""

from __future__ import annotations

import json
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli_export import check_manifests
from tests.docker_engine import DockerEngine
from tests.export import (
    K8S_VERSION,
    export,
    find,
    main_container,
    parse,
    pod_of,
    project,
    validate,
    warnings_of,
    write,
)

#: The secret values of tests/export (units/web.api.toml, web.env, pin.env): they must
#: never reach the output without --include-secrets.
TOKEN, PASSWORD, PIN = "tok-7f3a9c21", "hunter2-correct-horse", "4821"


@pytest.fixture
def full(tmp_path: Path) -> Path:
    """The units of tests/export/units (one per mapping) and their env files."""
    return project(tmp_path)


@pytest.fixture
def exported(full: Path) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    done = export(full, "--image", "db=postgres:16")
    assert done.returncode == 0, done.stderr
    docs = parse(done.stdout)
    validate(docs)
    return docs, done


# ---------------------------------------------------------------------------- the mapping


class TestObjects:
    def test_each_unit_gets_its_kind_in_helm_order(self, exported: Any) -> None:
        """Services -> Deployment (+ Service with a port, + Secret with secrets), a
        scheduled unit -> CronJob, a one-shot -> Job; Secrets, Services, Deployments,
        Jobs, CronJobs, by name within a kind."""
        docs, _ = exported
        assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
            ("Secret", "web-api-env"), ("Service", "db"), ("Service", "web-api"),
            ("Deployment", "db"), ("Deployment", "queue"), ("Deployment", "web-api"),
            ("Deployment", "worker"), ("Job", "migrate"), ("CronJob", "report"),
            ("CronJob", "sweep"),
        ]  # fmt: skip
        assert {(d["apiVersion"], d["kind"]) for d in docs} == {
            ("v1", "Secret"), ("v1", "Service"), ("apps/v1", "Deployment"),
            ("batch/v1", "Job"), ("batch/v1", "CronJob"),
        }  # fmt: skip

    def test_labels_on_every_object_and_pod_template(self, exported: Any) -> None:
        """app.kubernetes.io/name (the selectors use it) and managed-by=hostvisor."""
        docs, _ = exported
        for doc in docs:
            owner = doc["metadata"]["name"].removesuffix("-env")
            labels = {"app.kubernetes.io/name": owner, "app.kubernetes.io/managed-by": "hostvisor"}
            assert doc["metadata"]["labels"] == labels
            assert "namespace" not in doc["metadata"]
            if doc["kind"] == "Deployment":
                assert doc["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": owner}}
                assert doc["spec"]["template"]["metadata"]["labels"] == labels
            if doc["kind"] == "CronJob":
                job = doc["spec"]["jobTemplate"]
                assert job["metadata"]["labels"] == job["spec"]["template"]["metadata"]["labels"]
                assert job["metadata"]["labels"] == labels
            if doc["kind"] == "Service":
                assert doc["spec"]["selector"] == {"app.kubernetes.io/name": owner}

    def test_a_dotted_name_becomes_a_label_with_a_warning(self, exported: Any) -> None:
        """web.api -> web-api, and the warning names both."""
        docs, done = exported
        assert find(docs, "Deployment", "web-api")["metadata"]["annotations"] == {
            "kubernetes.io/description": "Public API"
        }
        assert any("web.api: named web-api in Kubernetes" in w for w in warnings_of(done.stderr))

    def test_namespace_everywhere(self, full: Path) -> None:
        """--namespace sets metadata.namespace on every object."""
        done = export(full, "--image", "db=postgres:16", "--namespace", "joelclaw")
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        assert {d["metadata"].get("namespace") for d in docs} == {"joelclaw"}

    def test_a_bad_namespace_is_an_error(self, full: Path) -> None:
        done = export(full, "--image", "db=postgres:16", "--namespace", "Joel_Claw")
        assert done.returncode == 1
        assert "--namespace 'Joel_Claw': not a namespace name" in done.stderr
        assert done.stdout == ""


class TestDeployment:
    def test_container(self, exported: Any) -> None:
        """command (the argv, replacing ENTRYPOINT), workingDir, containerPort, env,
        envFrom the Secret, memory limit, grace period rounded up, replicas 1."""
        docs, done = exported
        deployment = find(docs, "Deployment", "web-api")
        assert deployment["spec"]["replicas"] == 1
        assert "minReadySeconds" not in deployment["spec"]  # it has a probe
        pod = pod_of(deployment)
        assert pod["restartPolicy"] == "Always"
        assert pod["terminationGracePeriodSeconds"] == 3
        container = main_container(deployment)
        assert container["name"] == "web-api"
        assert container["image"] == "registry.example/web-api:1.4"
        # the secret value is referenced, not written; $( and $$ are escaped
        assert container["command"] == [
            "serve", "--token", "$(API_TOKEN)", "--price", "$$(cheap)", "$$$",
        ]  # fmt: skip
        assert "args" not in container
        assert container["workingDir"] == "/srv/api"
        assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
        assert container["env"] == [{"name": "MODE", "value": "prod"}]  # LOG_LEVEL: env_files
        assert container["envFrom"] == [{"secretRef": {"name": "web-api-env"}}]
        assert container["resources"] == {"limits": {"memory": "512Mi"}}
        assert container["lifecycle"] == {"postStart": {"exec": {"command": ["warm-cache"]}}}
        warnings = warnings_of(done.stderr)
        assert any("web.api: stop_timeout 2.5s -> 3s" in w for w in warnings)
        assert any("web.api: workdir: /srv/api is a host path" in w for w in warnings)
        assert any("web.api: post_start: Kubernetes runs it as soon as the container is created"
                   in w for w in warnings)  # fmt: skip

    def test_service(self, exported: Any) -> None:
        """port -> a ClusterIP Service, port and targetPort."""
        docs, _ = exported
        service = find(docs, "Service", "web-api")
        assert service["spec"] == {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": "web-api"},
            "ports": [{"port": 8080, "targetPort": 8080, "protocol": "TCP"}],
        }

    def test_init_containers_wait_then_preflight(self, exported: Any) -> None:
        """depends_on -> a busybox init container waiting for the Service; preflight -> an
        init container running its command in the same image with the same env."""
        docs, done = exported
        wait, preflight = pod_of(find(docs, "Deployment", "web-api"))["initContainers"]
        assert (wait["name"], wait["image"], wait["command"][:2]) == ("wait-db", "busybox:1.36", ["sh", "-c"])  # fmt: skip
        assert "until nc -z -w 2 db 5432; do" in wait["command"][2]
        assert preflight["name"] == "preflight"
        assert preflight["image"] == "registry.example/web-api:1.4"
        assert preflight["command"] == ["serve", "--check-config"]
        assert preflight["workingDir"] == "/srv/api"
        assert preflight["envFrom"] == [{"secretRef": {"name": "web-api-env"}}]
        assert any('web.api: depends_on db ("healthy"): becomes "Service db:5432 is reachable"'
                   in w for w in warnings_of(done.stderr))  # fmt: skip

    def test_dependencies_that_do_not_map_are_warned(self, exported: Any) -> None:
        """No port -> no Service to wait for; "completed" -> no Kubernetes ordering."""
        docs, done = exported
        inits = pod_of(find(docs, "Deployment", "worker"))["initContainers"]
        assert [i["name"] for i in inits] == ["wait-db"]
        warnings = warnings_of(done.stderr)
        assert any("worker: depends_on queue: not carried: queue has no port" in w for w in warnings)  # fmt: skip
        assert any('worker: depends_on migrate ("completed"): not carried' in w for w in warnings)

    def test_process_unit_without_probe(self, exported: Any) -> None:
        """start_seconds -> minReadySeconds; autostart = false -> replicas 0."""
        docs, done = exported
        queue = find(docs, "Deployment", "queue")
        assert queue["spec"]["replicas"] == 0
        assert queue["spec"]["minReadySeconds"] == 2
        container = main_container(queue)
        assert not {"livenessProbe", "readinessProbe", "startupProbe", "workingDir"} & set(container)  # fmt: skip
        assert any("queue: autostart = false: replicas 0" in w for w in warnings_of(done.stderr))

    def test_what_a_deployment_cannot_hold_is_warned(self, exported: Any) -> None:
        """on-failure, give_up_after, backoff, stop_signal: warnings, never silence."""
        docs, done = exported
        assert pod_of(find(docs, "Deployment", "worker"))["restartPolicy"] == "Always"
        warnings = [w for w in warnings_of(done.stderr) if w.startswith("warning: worker: ")]
        for part in ('restart "on-failure"', "give_up_after 3: not carried",
                     "backoff: not carried", "stop_signal SIGINT: not carried"):  # fmt: skip
            assert any(part in w for w in warnings), (part, warnings)


class TestProbes:
    def test_http_with_start_period(self, exported: Any) -> None:
        """http -> httpGet (path with the query, port, scheme; no host for 127.0.0.1);
        period rounded up; successThreshold 1 for liveness and startup, the unit's for
        readiness; the startup probe covers start_period then failure_threshold periods."""
        docs, done = exported
        container = main_container(find(docs, "Deployment", "web-api"))
        get = {"path": "/healthz?full=1", "port": 8080, "scheme": "HTTP"}
        timing = {"periodSeconds": 3, "timeoutSeconds": 1}
        assert container["livenessProbe"] == {"httpGet": get, **timing, "successThreshold": 1,
                                              "failureThreshold": 4}  # fmt: skip
        assert container["readinessProbe"] == {"httpGet": get, **timing, "successThreshold": 2,
                                               "failureThreshold": 4}  # fmt: skip
        # ceil(30 / 3) = 10 periods of start_period, then the 4 failures that count
        assert container["startupProbe"] == {"httpGet": get, **timing, "successThreshold": 1,
                                             "failureThreshold": 14}  # fmt: skip
        assert any("web.api: health.interval 2.5s -> 3s (Kubernetes counts whole seconds)" in w
                   for w in warnings_of(done.stderr))  # fmt: skip

    def test_tcp_and_exec(self, exported: Any) -> None:
        """tcp -> tcpSocket (no host for localhost); exec -> exec.command; no start_period,
        no startupProbe."""
        docs, _ = exported
        db = main_container(find(docs, "Deployment", "db"))
        assert db["image"] == "postgres:16"
        assert db["livenessProbe"] == {"tcpSocket": {"port": 5432}, "periodSeconds": 5,
                                       "timeoutSeconds": 5, "successThreshold": 1,
                                       "failureThreshold": 3}  # fmt: skip
        assert "startupProbe" not in db
        worker = main_container(find(docs, "Deployment", "worker"))
        assert worker["readinessProbe"]["exec"] == {"command": ["worker", "ping"]}
        assert worker["livenessProbe"]["periodSeconds"] == 10

    def test_docker_probe_other_host_and_put(self, tmp_path: Path) -> None:
        """docker = true: no probe; a non-loopback host: dropped; a PUT post_start: not
        carried; each a warning."""
        config = project(tmp_path, {
            "edge": '''command = ["edge"]
port = 9000
[health]
http = "https://edge.internal:9443/ready"
[post_start]
http = "http://127.0.0.1:9000/sync"
method = "PUT"
[k8s]
image = "edge:1"
''',
        })  # fmt: skip
        done = export(config)
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        container = main_container(find(docs, "Deployment", "edge"))
        assert container["livenessProbe"]["httpGet"] == {"path": "/ready", "port": 9443,
                                                         "scheme": "HTTPS"}  # fmt: skip
        assert "lifecycle" not in container
        warnings = warnings_of(done.stderr)
        assert any("edge: health.http: host edge.internal dropped" in w for w in warnings)
        assert any("edge: post_start: the PUT request is not carried" in w for w in warnings)


class TestJobs:
    def test_cronjob_with_a_time_zone(self, exported: Any) -> None:
        """schedule, timeZone, concurrencyPolicy, catch_up once (no deadline: the
        controller starts the latest missed run once), run_timeout ->
        activeDeadlineSeconds, on-failure -> OnFailure with backoffLimit = give_up_after
        - 1 retries."""
        docs, done = exported
        cron = find(docs, "CronJob", "report")
        spec = cron["spec"]
        assert spec["schedule"] == "15 4 * * 1-5"
        assert spec["timeZone"] == "Europe/Berlin"
        assert spec["concurrencyPolicy"] == "Replace"
        assert "startingDeadlineSeconds" not in spec
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 3
        assert job["activeDeadlineSeconds"] == 90
        assert pod_of(cron)["restartPolicy"] == "OnFailure"
        assert main_container(cron)["command"] == ["report", "--daily"]
        warnings = warnings_of(done.stderr)
        assert any("report: random_delay 30s: not carried" in w for w in warnings)
        assert any("report: on_failure: not carried" in w for w in warnings)

    def test_every_becomes_a_cron_step(self, exported: Any) -> None:
        """every = 10m -> */10; catch_up none -> startingDeadlineSeconds 60 (the daemon's
        grace); restart no -> Never, backoffLimit 0."""
        docs, done = exported
        cron = find(docs, "CronJob", "sweep")
        assert cron["spec"]["schedule"] == "*/10 * * * *"
        assert cron["spec"]["startingDeadlineSeconds"] == 60
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        assert "timeZone" not in cron["spec"]
        assert cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
        assert pod_of(cron)["restartPolicy"] == "Never"
        assert any("sweep: every 10m: runs on the clock" in w for w in warnings_of(done.stderr))

    def test_one_shot_is_a_job(self, exported: Any) -> None:
        docs, _ = exported
        job = find(docs, "Job", "migrate")
        assert job["spec"]["backoffLimit"] == 0
        assert job["spec"]["activeDeadlineSeconds"] == 300
        assert pod_of(job)["restartPolicy"] == "Never"
        assert main_container(job)["command"] == ["migrate", "up"]

    @pytest.mark.parametrize(
        ("every", "cron"),
        [("1m", "* * * * *"), ("5m", "*/5 * * * *"), ("1h", "0 * * * *"),
         ("2h", "0 */2 * * *"), ("1d", "0 0 * * *"), ("7d", "0 0 * * 0")],
    )  # fmt: skip
    def test_whole_steps(self, every: str, cron: str) -> None:
        from supervisor.k8s_cron import cron_schedule
        from supervisor.spec import ScheduleSpec

        seconds = {"m": 60, "h": 3600, "d": 86400}[every[-1]] * int(every[:-1])
        assert cron_schedule(ScheduleSpec(every=seconds, every_text=every)) == cron

    @pytest.mark.parametrize(
        ("schedule", "message"),
        [("0 0 L * *", "no L (last), W (weekday) or # (n-th weekday)"),
         ("0 0 * * 1#2", "no L (last), W (weekday) or # (n-th weekday)"),
         ("0 0 * * 5-7", "7 is outside 0-6 (write Sunday as 0)")],
    )  # fmt: skip
    def test_cron_kubernetes_cannot_read(self, schedule: str, message: str) -> None:
        from supervisor.k8s_cron import ScheduleNotMappable, cron_schedule
        from supervisor.spec import ScheduleSpec

        with pytest.raises(
            ScheduleNotMappable, match=message.replace("(", r"\(").replace(")", r"\)")
        ):
            cron_schedule(ScheduleSpec(cron=schedule))
        assert cron_schedule(ScheduleSpec(cron="0 9 * jan-mar mon-fri")) == "0 9 * jan-mar mon-fri"
        assert cron_schedule(ScheduleSpec(cron="@hourly")) == "@hourly"


class TestSecrets:
    def test_values_absent_without_include_secrets(self, exported: Any) -> None:
        """env_files, secret_env_files and secret-looking env values -> the Secret, keys
        with empty values; no secret value anywhere in the output; a warning says so."""
        docs, done = exported
        secret = find(docs, "Secret", "web-api-env")
        assert secret["type"] == "Opaque"
        assert secret["stringData"] == {
            "DB_PASSWORD": "",
            "LOG_LEVEL": "",
            "PIN": "",
            "API_TOKEN": "",
        }
        for value in (TOKEN, PASSWORD, PIN):
            assert value not in done.stdout
            assert value not in done.stderr
        assert any("web.api: Secret web-api-env: 4 keys (DB_PASSWORD, LOG_LEVEL, PIN, API_TOKEN) with "
                   "empty values" in w for w in warnings_of(done.stderr))  # fmt: skip

    def test_values_present_with_include_secrets(self, full: Path) -> None:
        done = export(full, "--image", "db=postgres:16", "--include-secrets")
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        assert find(docs, "Secret", "web-api-env")["stringData"] == {
            "DB_PASSWORD": PASSWORD, "LOG_LEVEL": "debug", "PIN": PIN, "API_TOKEN": TOKEN,
        }  # fmt: skip
        # still referenced from the command: the value lives in the Secret only
        assert main_container(find(docs, "Deployment", "web-api"))["command"][2] == "$(API_TOKEN)"
        assert "with empty values" not in done.stderr

    def test_a_secret_where_kubernetes_cannot_reference_it_is_an_error(
        self, tmp_path: Path
    ) -> None:
        config = project(tmp_path, {"probe": f'''command = ["app"]
env = {{ API_TOKEN = "{TOKEN}" }}
[health]
exec = ["check", "--token", "{TOKEN}"]
[k8s]
image = "app:1"
'''})  # fmt: skip
        done = export(config)
        assert done.returncode == 1
        assert (
            "probe: the value of API_TOKEN, a secret, appears in the container's liv" in done.stderr
        )
        assert TOKEN not in done.stdout + done.stderr
        assert export(config, "--include-secrets").returncode == 0

    def test_only_secrets_by_name_or_urls_with_a_password_leave_env(self, tmp_path: Path) -> None:
        """hostvisor's redaction rule (every value of 8 characters or more) would empty PATH
        or NODE_ENV in the cluster: a unit's env goes to the Secret only for a secret name or a
        URL with a password; PATH and HOME stay, with a warning."""
        config = project(tmp_path, {"app": '''command = ["app"]
workdir = "/srv/app-home"
env = { APP_HOME = "/srv/app-home", NODE_ENV = "production", PATH = "/opt/app/bin:/usr/bin", API_TOKEN = "tok-123456", CACHE_URL = "redis://:hunter22@cache:6379/0" }
[k8s]
image = "app:1"
'''})  # fmt: skip
        done = export(config)
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        container = main_container(find(docs, "Deployment", "app"))
        assert container["workingDir"] == "/srv/app-home"
        plain = {e["name"]: e["value"] for e in container["env"]}
        assert plain == {
            "APP_HOME": "/srv/app-home", "NODE_ENV": "production", "PATH": "/opt/app/bin:/usr/bin",
        }  # fmt: skip
        assert find(docs, "Secret", "app-env")["stringData"] == {"API_TOKEN": "", "CACHE_URL": ""}
        assert "hunter22" not in done.stdout and "tok-123456" not in done.stdout
        assert "warning: app: env PATH: the host's search path" in done.stderr


class TestOutput:
    def test_output_file(self, full: Path, tmp_path: Path) -> None:
        """-o FILE: the same stream, written atomically; 0644, 0600 with secrets."""
        target = tmp_path / "out" / "k8s.yaml"
        target.parent.mkdir()
        done = export(full, "--image", "db=postgres:16", "-o", str(target))
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"wrote {target}: 10 objects\n"
        assert parse(target.read_text()) == parse(export(full, "--image", "db=postgres:16").stdout)
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        done = export(full, "--image", "db=postgres:16", "-o", str(target), "--include-secrets")
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert PASSWORD in target.read_text()
        assert sorted(p.name for p in target.parent.iterdir()) == ["k8s.yaml"]

    def test_names_pick_units(self, full: Path) -> None:
        """NAME... exports those units only; a dependency left out is named."""
        done = export(full, "web.api")
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        assert {d["metadata"]["name"] for d in docs} == {"web-api", "web-api-env"}
        assert "db is not in this export" in done.stderr

    def test_check_passes(self, full: Path) -> None:
        done = export(full, "--image", "db=postgres:16", "--check")
        assert done.returncode == 0, done.stderr
        assert f"checked 10 objects against Kubernetes {K8S_VERSION}" in done.stderr
        validate(parse(done.stdout))

    def test_check_finds_an_invalid_object(self) -> None:
        """The validation --check runs, on a broken Deployment."""
        broken = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"replica": 1, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"spec": {"containers": [{"name": "web"}]}}},
        }  # fmt: skip
        version, problems = check_manifests([broken])
        assert version == K8S_VERSION
        assert len(problems) == 1
        assert problems[0].startswith("web Deployment: spec: Additional properties are not allowed")
        assert "'replica'" in problems[0]
        fixed = {**broken, "spec": {k: v for k, v in broken["spec"].items() if k != "replica"}}
        assert check_manifests([fixed]) == (version, [])

    def test_check_without_kubernetes_validate(self, full: Path, tmp_path: Path) -> None:
        """--check says how to install it, exit 1."""
        fake = write(tmp_path / "fake" / "kubernetes_validate" / "__init__.py",
                     'raise ImportError("no kubernetes_validate here")\n')  # fmt: skip
        done = export(full, "--image", "db=postgres:16", "--check",
                      env={"PYTHONPATH": str(fake.parent.parent)})  # fmt: skip
        assert done.returncode == 1
        assert "error: --check needs kubernetes-validate: pip install 'hostvisor[k8s]'" in done.stderr  # fmt: skip
        assert done.stdout == ""


class TestErrors:
    @pytest.mark.parametrize(
        ("unit", "message"),
        [
            ('command = ["app"]\n',
             "error: app: no image: pass --image app=IMAGE or set [k8s] image in units/app.toml"),
            ('command = ["app"]\nschedule = "0 */5 * * * *"\n[k8s]\nimage = "app:1"\n',
             "error: app: schedule '0 */5 * * * *' has a seconds field (the 6th)"),
            ('command = ["app"]\nevery = "7m"\n[k8s]\nimage = "app:1"\n',
             "error: app: every 7m is no whole cron step"),
            ('command = ["app"]\nevery = "90s"\n[k8s]\nimage = "app:1"\n',
             "error: app: every 90s is not a whole number of minutes"),
            ('command = ["app"]\n[k8s]\nimage = "App Image"\n',
             "error: app: [k8s] image 'App Image' is not an image reference"),
        ],
    )  # fmt: skip
    def test_unit_errors(self, tmp_path: Path, unit: str, message: str) -> None:
        done = export(project(tmp_path, {"app": unit}))
        assert done.returncode == 1
        assert message in done.stderr
        assert done.stdout == ""

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["nope"], "error: nope: no such unit (units: app, other)"),
            (["--image", "app"], "error: --image 'app': expected NAME=IMAGE"),
            (["--image", "=x:1"], "error: --image '=x:1': expected NAME=IMAGE"),
            (["--image", "nope=x:1"], "error: --image 'nope=x:1': no unit nope (units: app, other)"),
            (["--image", "app=Bad Image"], "error: --image 'app=Bad Image': 'Bad Image' is not an image reference"),
        ],
    )  # fmt: skip
    def test_argument_errors(self, tmp_path: Path, args: list[str], message: str) -> None:
        unit = 'command = ["app"]\n[k8s]\nimage = "app:1"\n'
        done = export(project(tmp_path, {"app": unit, "other": unit}), *args)
        assert done.returncode == 1
        assert message in done.stderr
        assert done.stdout == ""

    def test_bad_config(self, tmp_path: Path) -> None:
        done = export(project(tmp_path, {"app": 'command = ["app"]\nrestart = "sometimes"\n'}))
        assert done.returncode == 1
        assert "units/app.toml: restart:" in done.stderr

    def test_engine_unreachable(self, tmp_path: Path) -> None:
        """A container unit whose engine cannot be reached: an error suggesting --image;
        with --image, that image and a warning."""
        config = project(tmp_path, {"qdrant": 'container = "qdrant"\nport = 6333\n'})
        env = {"DOCKER_HOST": f"unix://{tmp_path}/no-such-engine.sock"}
        done = export(config, env=env)
        assert done.returncode == 1
        assert "error: qdrant: container qdrant: the Docker engine cannot be reached" in done.stderr
        assert "pass --image qdrant=IMAGE" in done.stderr
        done = export(config, "--image", "qdrant=qdrant/qdrant:v1.12.0", env=env)
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        qdrant = main_container(find(docs, "Deployment", "qdrant"))
        assert qdrant["image"] == "qdrant/qdrant:v1.12.0"
        assert "warning: qdrant: container qdrant: the Docker engine cannot be reached" in done.stderr  # fmt: skip


# ---------------------------------------------------------------------------- container units


@pytest.fixture
def container(engine: DockerEngine, tmp_path: Path) -> Iterator[str]:
    """A container (created, not started) from the busybox test image that overrides the
    image's command, environment and working folder, publishes 18080 -> 8080 and mounts
    a folder."""
    name = f"hvk-{uuid.uuid4().hex[:10]}"
    data = tmp_path / "data"
    data.mkdir()
    engine.docker(
        "create", "--name", name, "-p", "18080:8080", "-e", f"API_TOKEN={TOKEN}",
        "-e", "MODE=demo", "-w", "/srv", "-v", f"{data}:/data", engine.image,
        "httpd", "-f", "-p", "8080",
    )  # fmt: skip
    try:
        yield name
    finally:
        engine.docker("rm", "-f", name, check=False)


@pytest.mark.docker
class TestContainerUnit:
    def test_image_and_settings_from_the_engine(
        self, engine: DockerEngine, container: str, tmp_path: Path
    ) -> None:
        """Config.Image from the engine; the container's command (args: the image has no
        CMD), env (a secret to the Secret), workingDir; the unit's published port 18080
        -> containerPort 8080, the Service 18080 -> 8080, the probe on 8080."""
        info = json.loads(engine.docker("inspect", container).stdout)[0]
        assert info["Config"]["Image"] == engine.image
        config = project(tmp_path, {"web": f'''container = "{container}"
port = 18080
[health]
http = "http://127.0.0.1:18080/"
'''})  # fmt: skip
        done = export(config, env={"DOCKER_HOST": engine.host})
        assert done.returncode == 0, done.stderr
        docs = parse(done.stdout)
        validate(docs)
        web = main_container(find(docs, "Deployment", "web"))
        assert web["image"] == engine.image
        assert "command" not in web
        assert web["args"] == ["httpd", "-f", "-p", "8080"]
        assert web["workingDir"] == "/srv"
        assert web["env"] == [{"name": "MODE", "value": "demo"}]
        assert web["envFrom"] == [{"secretRef": {"name": "web-env"}}]
        assert web["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
        assert web["livenessProbe"]["httpGet"] == {"path": "/", "port": 8080, "scheme": "HTTP"}
        assert find(docs, "Service", "web")["spec"]["ports"] == [
            {"port": 18080, "targetPort": 8080, "protocol": "TCP"}
        ]
        assert find(docs, "Secret", "web-env")["stringData"] == {"API_TOKEN": ""}
        assert TOKEN not in done.stdout
        assert any("web: the container's mounts" in w and ":/data" in w
                   for w in warnings_of(done.stderr))  # fmt: skip

    def test_image_option_wins(self, engine: DockerEngine, container: str, tmp_path: Path) -> None:
        config = project(tmp_path, {"web": f'container = "{container}"\n'})
        done = export(
            config, "--image", "web=registry.example/web:2", env={"DOCKER_HOST": engine.host}
        )
        assert done.returncode == 0, done.stderr
        web = main_container(find(parse(done.stdout), "Deployment", "web"))
        assert web["image"] == "registry.example/web:2"
        assert web["args"] == ["httpd", "-f", "-p", "8080"]

    def test_no_such_container(self, engine: DockerEngine, tmp_path: Path) -> None:
        config = project(tmp_path, {"gone": 'container = "hvk-no-such-container"\n'})
        done = export(config, env={"DOCKER_HOST": engine.host})
        assert done.returncode == 1
        assert ("error: gone: the Docker engine has no container hvk-no-such-container, so its "
                "image is unknown: pass --image gone=IMAGE") in done.stderr  # fmt: skip
