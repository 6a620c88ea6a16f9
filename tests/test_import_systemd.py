"""``hostvisor import systemd``: seed 000's ``systemd --user`` units, read by the real CLI.

The fixtures in tests/import_sources/systemd/user/ are copied into a test HOME's
``~/.config/systemd/user`` (``%h`` resolves to it); each test runs ``python -m supervisor
import systemd ...`` as a user would, then reads the unit files written. The round trips
import a unit running a real program, ``check`` it, and run it under a real daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.importers import ImportContext, ImportFailed, Source
from supervisor.importers.systemd import convert
from supervisor.importers.systemd_calendar import calendar_to_cron, parse_span, span_text
from supervisor.importers.systemd_syntax import UnitFile, parse_command, split_words
from tests.daemon_harness import DaemonProcess
from tests.support import free_port

FIXTURES = Path(__file__).parent / "import_sources" / "systemd" / "user"
PY = sys.executable


@dataclass
class Host:
    """A test HOME with the fixtures in ~/.config/systemd/user and a config whose
    units_dir is ``units``."""

    root: Path
    home: Path
    user_units: Path
    config: Path
    units: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTVISOR_", "XDG_"))}
        env["HOME"] = str(self.home)
        return env

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "supervisor", *args, "-c", str(self.config)],
            capture_output=True, text=True, env=self.env(), cwd=self.root, input=stdin,
            timeout=60,
        )  # fmt: skip

    def imports(self, *names: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        files = [n if n == "-" else str(self.user_units / n) for n in names]
        return self.run("import", "systemd", *files, stdin=stdin)

    def unit(self, name: str) -> dict[str, Any]:
        return tomllib.loads((self.units / f"{name}.toml").read_text())


@pytest.fixture
def host(tmp_path: Path) -> Host:
    home = tmp_path / "home"
    user_units = home / ".config" / "systemd" / "user"
    shutil.copytree(FIXTURES, user_units)
    llama = home / ".config" / "llama"
    llama.mkdir(parents=True)
    for name, port in (("coder", 11439), ("qwen", 11437)):
        env_file = llama / f"{name}.env"
        env_file.write_text(f"LLAMA_MODEL={home}/models/{name}.gguf\nLLAMA_PORT={port}\n")
        env_file.chmod(0o600)
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nunits_dir = "units"\n')
    return Host(tmp_path, home, user_units, config, tmp_path / "units")


class TestSeedUnits:
    """Seed 000's units: the llama-server user units and the OpenClaw gateway."""

    def test_llama_user_unit_resolves_h_and_keeps_its_env_file(self, host: Host) -> None:
        """%h is the importing user's home; EnvironmentFile= becomes env_files; Restart=,
        RestartSec= and TimeoutStopSec= map; LimitNOFILE= is reported with its reason;
        `check` passes on what was written."""
        done = host.imports("llama-coder-next.service")
        assert done.returncode == 0, done.stderr
        unit = host.unit("llama-coder-next")
        home = str(host.home)
        assert unit["command"] == [
            f"{home}/llama.cpp/build/bin/llama-server", "-m",
            f"{home}/models/Qwen3-Coder-Next-Q5_K_M.gguf", "--host", "127.0.0.1", "--port", "11439",
        ]  # fmt: skip
        assert unit["env_files"] == [f"{home}/.config/llama/coder.env"]
        assert unit["env"] == {"CUDA_VISIBLE_DEVICES": "0", "LLAMA_ARG_N_GPU_LAYERS": "99"}
        assert unit["restart"] == "on-failure"
        assert unit["backoff"] == {"initial": "5s", "max": "5s", "multiplier": 1.0}
        assert unit["stop_timeout"] == "30s"
        assert unit["workdir"] == "~"
        assert "LimitNOFILE=65536: hostvisor sets no rlimits" in done.stdout
        assert "After=network-online.target: a target unit" in done.stdout
        assert host.run("check").returncode == 0

    def test_a_template_without_instance_is_refused_naming_the_specifier(self, host: Host) -> None:
        """llama-server@.service uses %i (its env file, its description): without an
        instance the import fails with the reason, and writes nothing."""
        done = host.imports("llama-server@.service")
        assert done.returncode == 1
        assert "%i is the instance, and a template file has none" in done.stderr
        assert not host.units.exists()

    def test_an_instance_link_resolves_i_and_names_the_unit(self, host: Host) -> None:
        """llama-server@coder.service (the link `systemctl enable` makes) resolves %i =
        coder; the unit is llama-server-coder, printed beside the systemd name; the
        variables only the env file sets are left to /bin/sh at run time, the one
        Environment= sets is substituted; RestartSteps= gives the multiplier."""
        (host.user_units / "llama-server@coder.service").symlink_to("llama-server@.service")
        done = host.imports("llama-server@coder.service")
        assert done.returncode == 0, done.stderr
        assert "llama-server-coder (from llama-server@coder.service)" in done.stdout
        unit = host.unit("llama-server-coder")
        assert unit["description"] == "llama.cpp server (coder)"
        assert unit["env_files"] == [f"{host.home}/.config/llama/coder.env"]
        assert unit["command"] == [
            "/bin/sh", "-c",
            f'exec {host.home}/llama.cpp/build/bin/llama-server -m "${{LLAMA_MODEL}}" --host '
            '127.0.0.1 --port "${LLAMA_PORT}" --ctx-size 65536 -ngl 99',
        ]  # fmt: skip
        assert unit["backoff"] == {"initial": "2s", "max": "1m4s", "multiplier": 2.0}
        assert "$LLAMA_MODEL, $LLAMA_PORT, which Environment= does not set" in done.stdout
        assert host.run("check").returncode == 0

    def test_gateway_depends_on_the_model_imported_with_it(self, host: Host) -> None:
        """After=/Wants= of another imported service become depends_on (by its unit name);
        targets are not mapped; the `-` ExecStartPre= becomes a preflight whose failure
        is ignored; ${OPENCLAW_GATEWAY_PORT} from Environment= is substituted."""
        done = host.imports("openclaw-gateway.service", "llama-coder-next.service")
        assert done.returncode == 0, done.stderr
        unit = host.unit("openclaw-gateway")
        assert unit["depends_on"] == ["llama-coder-next"]
        assert unit["command"][-2:] == ["--port", "18789"]
        assert unit["preflight"] == {
            "command": ["/bin/sh", "-c", f"/usr/bin/mkdir -p {host.home}/.openclaw/state || true"],
            "timeout": "1m30s",
        }
        assert unit["workdir"] == f"{host.home}/.openclaw"
        assert (unit["restart"], unit["stop_signal"], unit["stop_timeout"]) == (
            "always", "SIGINT", "20s")  # fmt: skip
        assert unit["max_memory"] == "4GiB"
        assert "KillMode=process: hostvisor sends stop_signal" in done.stdout
        assert "StandardOutput=journal: hostvisor writes stdout and stderr" in done.stdout


class TestTimers:
    """A .timer and its service become one scheduled unit."""

    def test_calendar_timer_and_its_service_make_one_job(self, host: Host) -> None:
        """OnCalendar= -> schedule, Persistent=true -> catch_up once, RandomizedDelaySec=
        -> random_delay, AccuracySec= not mapped; the service given too is not imported
        twice (a file-level note says why)."""
        done = host.imports("openclaw-backup.service", "openclaw-backup.timer")
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in host.units.iterdir()) == ["openclaw-backup.toml"]
        assert "taken with its timer" in done.stdout
        unit = host.unit("openclaw-backup")
        assert (unit["schedule"], unit["catch_up"], unit["random_delay"]) == (
            "0 3 * * *", "once", "10m")  # fmt: skip
        assert unit["command"][0] == "/usr/bin/tar"
        assert "timer AccuracySec=1min: systemd may delay a trigger" in done.stdout
        assert host.run("check").returncode == 0

    def test_monotonic_timer_found_beside_becomes_every(self, host: Host) -> None:
        """OnUnitActiveSec= -> every; OnBootSec= beside it is not mapped (with why); the
        service is found beside the timer; its three ExecStart= run as one /bin/sh chain,
        the `-` one with its failure ignored."""
        done = host.imports("stacks-heal.timer")
        assert done.returncode == 0, done.stderr
        unit = host.unit("stacks-heal")
        assert unit["every"] == "5m"
        assert unit["command"][:2] == ["/bin/sh", "-c"]
        assert unit["command"][2].endswith("&& { /usr/bin/docker start qdrant || true; }")
        assert "OnBootSec=2min: a delay before the first run" in done.stdout

    def test_a_timer_whose_service_is_missing_fails(self, host: Host) -> None:
        """The timer's service is neither among the files nor beside it: exit 1, named."""
        (host.user_units / "stacks-heal.service").unlink()
        done = host.imports("stacks-heal.timer")
        assert done.returncode == 1
        assert "its service stacks-heal.service is not among the files" in done.stderr

    def test_an_untranslatable_calendar_fails_naming_it(self, host: Host) -> None:
        """`Mon *-*-1..7` (the first Monday) has no cron form: cron ORs the day fields.
        The timer fails (exit 1); its service, given too, is imported on its own."""
        timer = host.user_units / "openclaw-backup.timer"
        timer.write_text(timer.read_text().replace("*-*-* 03:00:00", "Mon *-*-1..7 03:00"))
        done = host.imports("openclaw-backup.timer", "openclaw-backup.service")
        assert done.returncode == 1
        assert "OnCalendar=Mon *-*-1..7 03:00: no cron expression says the same" in done.stderr
        assert "cron on days matching either" in done.stderr
        assert "could not be imported: imported on its own" in done.stdout
        assert host.unit("openclaw-backup")["restart"] == "no"


class TestFiles:
    """Drop-ins, standard input, and what is not a unit."""

    def test_drop_ins_beside_the_unit_are_read(self, host: Host) -> None:
        """NAME.service.d/*.conf applies after the unit: a later value wins, an empty
        Environment= resets the list; the report names the folder."""
        folder = host.user_units / "llama-coder-next.service.d"
        folder.mkdir()
        (folder / "override.conf").write_text("[Service]\nRestartSec=10\nEnvironment=\n")
        done = host.imports("llama-coder-next.service")
        assert done.returncode == 0, done.stderr
        unit = host.unit("llama-coder-next")
        assert unit["backoff"]["initial"] == "10s"
        assert "env" not in unit
        assert "read the drop-ins in" in done.stdout

    def test_systemctl_cat_on_stdin_names_the_unit(self, host: Host) -> None:
        """`systemctl --user cat NAME | hostvisor import systemd -`: the first line names it."""
        text = (
            f"# {host.user_units}/openclaw-gateway.service\n"
            + (host.user_units / "openclaw-gateway.service").read_text()
        )
        done = host.imports("-", stdin=text)
        assert done.returncode == 0, done.stderr
        assert host.unit("openclaw-gateway")["description"] == "OpenClaw Gateway (v2026.2.6-3)"

    def test_stdin_without_a_name_and_other_unit_types_fail(self, host: Host) -> None:
        plain = host.imports("-", stdin="[Service]\nExecStart=/bin/true\n")
        assert plain.returncode == 1 and "cannot tell the unit's name" in plain.stderr
        (host.user_units / "x.socket").write_text("[Socket]\nListenStream=80\n")
        socket = host.imports("x.socket")
        assert socket.returncode == 1 and "is a .socket unit" in socket.stderr

    def test_restart_not_set_is_a_one_shot_and_says_so(self, tmp_path: Path) -> None:
        """Without Restart= systemd does not restart: restart = "no" (a one-shot), noted."""
        path = tmp_path / "sync.service"
        path.write_text("[Service]\nExecStart=/usr/bin/rsync -a src/ dst/\n")
        result = convert(Source(path=path, text=path.read_text()), ImportContext(paths=(path,)))
        unit = result.units[0]
        assert unit.table["restart"] == "no"
        assert any("makes it a one-shot" in note for note in unit.notes)
        assert any("no [Install] section" in note for note in unit.notes)

    @staticmethod
    def _one(path: Path, text: str, home: Path | None = None) -> Any:
        path.write_text(text)
        ctx = ImportContext(paths=(path,), **({"home": home} if home else {}))
        return convert(Source(path=path, text=text), ctx).units[0]

    def test_specifiers_resolve_after_the_split_one_word_each(self, tmp_path: Path) -> None:
        """systemd splits a command line, then resolves each word's specifiers: %I of
        `echo@a\x20b` is the one word "a b", an instance with a quote is no quoting
        error, and a HOME with a space and `;` stays inside its word (also in the
        /bin/sh form, quoted)."""
        unit = self._one(
            tmp_path / "echo@a\\x20b.service", "[Service]\nExecStart=/bin/echo %I\nRestart=always\n"
        )
        assert unit.table["command"] == ["/bin/echo", "a b"]
        unit = self._one(
            tmp_path / "q@it\\x27s.service",
            "[Service]\nExecStart=/bin/echo %I 'x y'\nRestart=always\n",
        )
        assert unit.table["command"] == ["/bin/echo", "it's", "x y"]
        home = tmp_path / "sp ace" / "h;x"
        text = (
            "[Service]\nEnvironment=A=%h/a B=2\nExecStart=%h/llama.cpp/server -m %h/m\n"
            "ExecStartPre=-%h/pre $B\nRestart=always\n[Unit]\nAfter=%p-db.service\n"
        )
        unit = self._one(tmp_path / "llama.service", text, home)
        assert unit.table["command"] == [f"{home}/llama.cpp/server", "-m", f"{home}/m"]
        assert unit.table["env"] == {"A": f"{home}/a", "B": "2"}
        shell = unit.table["preflight"]["command"]
        assert shell[:2] == ["/bin/sh", "-c"]
        assert subprocess.run(["/bin/sh", "-nc", shell[2]]).returncode == 0
        assert shell[2] == f"'{home}/pre' 2 || true"
        assert ("After=llama-db.service", "not among the imported files: import it in the "
                "same command to depend on it") in unit.unmapped  # fmt: skip


class TestSyntax:
    """systemd's own rules for quoting, prefixes, continuations and time."""

    @pytest.mark.parametrize(
        ("text", "words"),
        [
            ('a "b c" d', ["a", "b c", "d"]),
            ("--x='1 2'", ["--x=1 2"]),
            (r'"a\"b" \x41\s\t', ['a"b', "A \t"]),
            (r"'it\'s'", ["it's"]),
            (r"\q", [r"\q"]),
            ('""', [""]),
        ],
    )
    def test_split_words(self, text: str, words: list[str]) -> None:
        assert split_words(text) == words

    def test_unbalanced_quotes_are_an_error(self) -> None:
        with pytest.raises(ValueError, match="unbalanced"):
            split_words('a "b')

    def test_prefixes(self) -> None:
        command = parse_command("-@/usr/bin/python3 python -m http.server")
        assert command.words == ["/usr/bin/python3", "-m", "http.server"]
        assert (command.ignore_failure, command.argv0) == (True, "python")
        assert parse_command(":/bin/echo $HOME").literal
        with pytest.raises(ValueError, match="prefixes"):
            parse_command("--/bin/true")

    def test_continuations_comments_and_resets(self) -> None:
        unit = UnitFile()
        unit.feed("[Service]\nExecStart=/bin/a \\\n# a comment\n  b\nEnvironment=A=1\n"
                  "Environment=\nEnvironment=B=2\n; done\n")  # fmt: skip
        assert unit.all("Service", "ExecStart") == ["/bin/a  b"]
        assert unit.all("Service", "Environment") == ["B=2"]

    def test_a_bad_section_header_fails_with_its_line(self) -> None:
        with pytest.raises(ImportFailed, match="line 2"):
            UnitFile().feed("# x\n[Service\n")

    @pytest.mark.parametrize(
        ("calendar", "cron"),
        [
            ("daily", "0 0 * * *"),
            ("hourly", "0 * * * *"),
            ("weekly", "0 0 * * 1"),
            ("monthly", "0 0 1 * *"),
            ("*-*-* 03:00:00", "0 3 * * *"),
            ("Mon..Fri *-*-* 09:00", "0 9 * * 1-5"),
            ("*:0/15", "*/15 * * * *"),
            ("Sat,Sun 10:30", "30 10 * * 0,6"),
            ("quarterly", "0 0 1 */3 *"),
            ("*-*~01", "0 0 L * *"),
            ("*:*:0/20", "* * * * * */20"),
            ("*-*-* 06,18:00:00", "0 6,18 * * *"),
        ],
    )
    def test_calendars_become_cron_expressions_croniter_reads(
        self, calendar: str, cron: str
    ) -> None:
        from supervisor.schedule import check_cron

        assert calendar_to_cron([calendar]) == (cron, "")
        check_cron(cron)

    def test_a_calendar_zone_and_several_calendars(self) -> None:
        assert calendar_to_cron(["Mon 12:00 Europe/Berlin"]) == ("0 12 * * 1", "Europe/Berlin")
        assert calendar_to_cron(["Mon 09:00", "Mon 17:00"]) == ("0 9,17 * * 1", "")
        with pytest.raises(ValueError, match="more than one field"):
            calendar_to_cron(["Mon 09:00", "Fri 17:00"])

    @pytest.mark.parametrize(
        ("calendar", "why"),
        [
            ("2026-01-01", "no year field"),
            ("03:17:05.5", "fraction of a second"),
            ("@1700000000", "one moment"),
            ("*-*~03", "only the last day"),
        ],
    )
    def test_what_cron_cannot_say_is_refused(self, calendar: str, why: str) -> None:
        with pytest.raises(ValueError, match=why):
            calendar_to_cron([calendar])

    def test_time_spans(self) -> None:
        assert [parse_span(t) for t in ("5min 20s", "1h30m", "90", "250ms", "2 days")] == [
            320, 5400, 90, 0.25, 172800]  # fmt: skip
        assert [span_text(s) for s in (5400, 0.1, 64, 0)] == ["1h30m", "100ms", "1m4s", "0s"]
        with pytest.raises(ValueError):
            parse_span("5 parsecs")


class TestRoundTrip:
    """Import, check, run: the service is RUNNING, the timer's job runs."""

    def test_a_user_unit_with_an_env_file_runs(self, host: Host, d: DaemonProcess) -> None:
        """The port comes from the unit's EnvironmentFile= only: the command runs through
        /bin/sh, which expands it; the daemon brings the server up and it answers."""
        port = free_port()
        (host.home / "www").mkdir()
        (host.home / "www" / "index.html").write_text("hello from %h\n")
        env_file = host.home / ".config" / "www.env"
        env_file.write_text(f"PORT={port}\n")
        env_file.chmod(0o600)
        (host.user_units / "www.service").write_text(
            "[Unit]\nDescription=static files\n[Service]\n"
            "EnvironmentFile=%h/.config/www.env\n"
            f"ExecStart={PY} -m http.server ${{PORT}} --bind 127.0.0.1 --directory %h/www\n"
            "Restart=on-failure\nRestartSec=1\n[Install]\nWantedBy=default.target\n"
        )
        done = host.run("import", "systemd", str(host.user_units / "www.service"), "-o",
                        str(d.units))  # fmt: skip
        assert done.returncode == 0, done.stderr
        d.extra_env["HOME"] = str(host.home)
        assert d.cli("check").returncode == 0
        d.start()
        d.wait_state("www", "running")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as page:
            assert page.read() == b"hello from %h\n"

    def test_a_timer_pair_runs_its_job(self, host: Host, d: DaemonProcess) -> None:
        """The imported scheduled unit waits for its trigger; `hostvisor start` runs it
        now and waits for the run, which wrote its file."""
        (host.user_units / "touch.timer").write_text(
            "[Timer]\nOnCalendar=*-*-* 03:00:00\nPersistent=true\n"
        )
        (host.user_units / "touch.service").write_text(
            "[Service]\nType=oneshot\n"
            f"ExecStart={PY} -c \"import pathlib; pathlib.Path('%h/ran').write_text('ok')\"\n"
        )
        files = [str(host.user_units / n) for n in ("touch.service", "touch.timer")]
        done = host.run("import", "systemd", *files, "-o", str(d.units))
        assert done.returncode == 0, done.stderr
        assert d.cli("check").returncode == 0
        d.start()
        d.wait_state("touch", "waiting")
        run = d.cli("start", "touch")
        assert run.returncode == 0, run.stdout + run.stderr
        assert (host.home / "ran").read_text() == "ok"
