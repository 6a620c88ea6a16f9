"""`hostvisor install` / `uninstall`: the systemd user unit and the launchd agent (issue 6).

Nothing here touches the real service manager: every install gets a temporary HOME and a
PATH that holds either nothing or the recording stand-in ``tests/programs/install_fake_manager.py``.
"""

from __future__ import annotations

import configparser
import io
import os
import plistlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import install as inst

PROGRAMS = Path(__file__).parent / "programs"
PACKAGING = Path(__file__).parent.parent / "packaging"
#: A config path that needs every kind of escaping systemd has.
ODD_CONFIG = Path('/tmp/my "odd" dir/100%h $HOME\\x/config.toml')


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def systemd_words(line: str) -> list[str]:
    """Split an ExecStart= value like systemd, for lines without C escapes.

    An unescaped specifier (``%h``) or variable (``$HOME``) comes back as ``<%h>``/``<$HOME>``
    so that a word systemd would rewrite never compares equal to the intended one.
    """
    specifier = re.compile(r"%(.)")
    variable = re.compile(r"\$(\$|\{\w+\}|\w+)")
    words = []
    for i, word in enumerate(shlex.split(line)):
        word = specifier.sub(lambda m: "%" if m[1] == "%" else f"<%{m[1]}>", word)
        if i > 0:  # the executable path is not variable-expanded
            word = variable.sub(lambda m: "$" if m[1] == "$" else f"<${m[1]}>", word)
        words.append(word)
    return words


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    home = tmp_path / "verify-home"
    home.mkdir(exist_ok=True)
    # A short runtime folder: the user units Debian ships put sockets there (gpg-agent's
    # S.gpg-agent.browser), and under pytest-xdist tmp_path is long enough for
    # systemd-analyze to refuse those paths (108 bytes), which is not the unit's fault.
    runtime = Path(tempfile.mkdtemp(prefix="hvv-", dir="/tmp"))
    unit = tmp_path / inst.UNIT_NAME
    unit.write_text(unit_text)
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime), "PATH": os.defpath}
    try:
        return subprocess.run(
            [analyze, "verify", "--user", str(unit)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


class TestSystemdUnit:
    def test_passes_systemd_analyze_verify_with_empty_stderr(self, tmp_path: Path) -> None:
        """The rendered unit is one systemd accepts without a single complaint."""
        text = inst.render_systemd_unit(
            argv=inst.program_argv(),
            config_path=ODD_CONFIG,
            shutdown_timeout=30,
            path_env="/usr/bin:/bin",
        )
        result = verify(text, tmp_path)
        assert (result.returncode, result.stderr) == (0, "")
        service = parse_unit(text)["Service"]
        assert service["KillMode"] == "process"
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"

    def test_verify_parses_the_kill_and_oom_policies(self, tmp_path: Path) -> None:
        """The empty stderr above means something: a misspelt KillMode= or OOMPolicy= is reported."""
        text = inst.render_systemd_unit(
            argv=inst.program_argv(), config_path=ODD_CONFIG, shutdown_timeout=1, path_env="/bin"
        )
        for good, bad, complaint in [
            ("KillMode=process", "KillMode=proces", "kill mode"),
            ("OOMPolicy=continue", "OOMPolicy=carry-on", "OOM policy"),
        ]:
            assert good in text.splitlines()
            assert complaint in verify(text.replace(good, bad), tmp_path).stderr

    def test_verify_finds_an_executable_whose_path_needs_quoting(self, tmp_path: Path) -> None:
        """systemd finds the real file at the quoted path (it reports one it cannot run)."""
        odd = tmp_path / "a b 50%"
        odd.mkdir()
        (odd / "python").symlink_to(sys.executable)
        argv = [str(odd / "python"), "-m", "supervisor"]
        text = inst.render_systemd_unit(
            argv=argv, config_path=ODD_CONFIG, shutdown_timeout=1, path_env="/bin"
        )
        assert verify(text, tmp_path).stderr == ""
        (odd / "python").unlink()
        assert f"Command {odd}/python is not executable" in verify(text, tmp_path).stderr

    def test_an_executable_path_systemd_refuses_runs_through_env(self, tmp_path: Path) -> None:
        """Quotes or a backslash in the program's path: ``/usr/bin/env <path>``, still verified."""
        odd = tmp_path / 'it\'s \\ "odd"'
        odd.mkdir()
        (odd / "python").symlink_to(sys.executable)
        argv = [str(odd / "python"), "-m", "supervisor"]
        text = inst.render_systemd_unit(
            argv=argv, config_path=ODD_CONFIG, shutdown_timeout=1, path_env="/bin"
        )
        assert verify(text, tmp_path).stderr == ""
        words = systemd_words(parse_unit(text)["Service"]["ExecStart"])
        assert words == ["/usr/bin/env", *argv, "run", "-c", str(ODD_CONFIG)]

    def test_exec_start_runs_hostvisor_run_with_the_absolute_config(self) -> None:
        """ExecStart= splits back into the program, ``run``, ``-c`` and the config, verbatim."""
        argv = ["/opt/hv env/bin/python", "-m", "supervisor"]
        text = inst.render_systemd_unit(
            argv=argv, config_path=ODD_CONFIG, shutdown_timeout=1, path_env="/bin"
        )
        exec_start = parse_unit(text)["Service"]["ExecStart"]
        assert systemd_words(exec_start) == [*argv, "run", "-c", str(ODD_CONFIG)]

    def test_has_the_directives_of_the_issue(self) -> None:
        """notify + watchdog, SIGHUP reload, restart on failure, process kill, stop timeout, PATH.

        KillMode=process and OOMPolicy=continue (issue 10): the daemon alone is signalled, so that
        the services outlive it and the next daemon adopts them.
        """
        text = inst.render_systemd_unit(
            argv=["/usr/bin/hostvisor"],
            config_path=Path("/c.toml"),
            shutdown_timeout=30.2,
            path_env="/a b:/c%d",
        )
        service, install = parse_unit(text)["Service"], parse_unit(text)["Install"]
        assert service["Type"] == "notify"
        assert service["NotifyAccess"] == "main"
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert int(service["WatchdogSec"]) > 0
        assert service["Restart"] == "on-failure"
        assert service["KillMode"] == "process"
        assert service["OOMPolicy"] == "continue"
        assert "SendSIGKILL" not in service  # a hung daemon is still killed at TimeoutStopSec
        assert service["TimeoutStopSec"] == f"{31 + inst.STOP_MARGIN}s"
        assert shlex.split(service["Environment"]) == ["PATH=/a b:/c%%d"]
        assert install["WantedBy"] == "default.target"
        assert "After" not in parse_unit(text)["Unit"]

    def test_a_lone_semicolon_is_an_argument_not_a_separator(self) -> None:
        """systemd.service(5): a lone ``;`` is written ``\\;``; other words quote as needed."""
        assert inst.systemd_quote(";") == "\\;"
        assert inst.systemd_quote("plain/path-1.0") == "plain/path-1.0"
        assert inst.systemd_quote("a\nb\tc") == '"a\\nb\\x09c"'
        assert inst.systemd_quote("$X", dollar=False) == "$X"


class TestLaunchdPlist:
    def test_round_trips_through_plistlib_with_the_keys_of_the_issue(self, tmp_path: Path) -> None:
        """Label, absolute ProgramArguments, RunAtLoad, KeepAlive on crash, logs, PATH, timeouts."""
        data = inst.render_launchd_plist(
            argv=["/usr/local/bin/hostvisor"],
            config_path=ODD_CONFIG,
            shutdown_timeout=30,
            path_env="/opt/homebrew/bin:/usr/bin",
            log_dir=tmp_path / "Library/Logs/hostvisor",
        )
        plist = plistlib.loads(data)
        assert plist["Label"] == inst.LAUNCHD_LABEL
        assert plist["ProgramArguments"] == [
            "/usr/local/bin/hostvisor",
            "run",
            "-c",
            str(ODD_CONFIG),
        ]
        assert plist["RunAtLoad"] is True
        assert plist["KeepAlive"] == {"SuccessfulExit": False}
        log = str(tmp_path / "Library/Logs/hostvisor/hostvisor.log")
        assert (plist["StandardOutPath"], plist["StandardErrorPath"]) == (log, log)
        assert plist["EnvironmentVariables"] == {"PATH": "/opt/homebrew/bin:/usr/bin"}
        assert plist["ProcessType"] in {"Standard", "Background", "Adaptive", "Interactive"}
        assert plist["ExitTimeOut"] > 30
        assert plist["AbandonProcessGroup"] is True
        assert plistlib.loads(plistlib.dumps(plist)) == plist

    def test_the_template_abandons_the_process_group_and_keeps_its_other_keys(self) -> None:
        """launchd.plist(5): AbandonProcessGroup true, so launchd leaves the daemon's group alone
        when the daemon dies; the template's other keys are the ones install fills or copies."""
        template = plistlib.loads((PACKAGING / "launchd/hostvisor.plist").read_bytes())
        assert template == {
            "Label": inst.LAUNCHD_LABEL,
            "ProgramArguments": [],
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "ProcessType": "Standard",
            "AbandonProcessGroup": True,
            "EnvironmentVariables": {},
            "StandardOutPath": "",
            "StandardErrorPath": "",
            "ExitTimeOut": 0,
        }


class TestTemplates:
    def test_the_package_ships_the_templates_of_packaging(self) -> None:
        """``supervisor/packaging`` is the repository's ``packaging/``: one source, same bytes."""
        from importlib import resources

        shipped = resources.files("supervisor") / "packaging"
        for relative in ("systemd/hostvisor.service", "launchd/hostvisor.plist"):
            assert (shipped / relative).read_bytes() == (PACKAGING / relative).read_bytes()


class TestProgramArgv:
    def test_the_running_hostvisor_script_is_used_by_absolute_path(self, tmp_path: Path) -> None:
        """When started as the ``hostvisor`` script, that script (not its interpreter) is run."""
        script = tmp_path / "bin" / "hostvisor"
        script.parent.mkdir()
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
        assert inst.program_argv(str(script), sys.executable) == [str(script)]

    def test_without_a_script_the_interpreter_runs_the_module(self, tmp_path: Path) -> None:
        """``python -m supervisor`` from an environment with no ``hostvisor`` script."""
        python = tmp_path / "python3"
        python.symlink_to(sys.executable)
        assert inst.program_argv("-m", str(python)) == [str(python), "-m", "supervisor"]

    def test_the_default_is_an_existing_executable(self) -> None:
        """Whatever runs the tests, the command starts with a real executable file."""
        first = inst.program_argv()[0]
        assert os.path.isabs(first) and os.access(first, os.X_OK)


@dataclass
class Box:
    """A temporary HOME, a PATH of stand-ins, and what install/uninstall said."""

    tmp: Path
    env: dict[str, str]
    config: Path
    out: io.StringIO
    err: io.StringIO

    @property
    def unit(self) -> Path:
        return self.tmp / "home/.config/systemd/user/hostvisor.service"

    @property
    def plist(self) -> Path:
        return self.tmp / f"home/Library/LaunchAgents/{inst.LAUNCHD_LABEL}.plist"

    def fake(self, *tools: str) -> None:
        """Put recording stand-ins for these tools on PATH."""
        for tool in tools:
            wrapper = self.tmp / "bin" / tool
            program = PROGRAMS / "install_fake_manager.py"
            command = shlex.join([sys.executable, str(program), tool])
            wrapper.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
            wrapper.chmod(0o755)

    def calls(self) -> list[str]:
        log = Path(self.env["FAKE_MANAGER_LOG"])
        return log.read_text().splitlines() if log.exists() else []

    def install(
        self,
        manager: inst.Manager = "systemd",
        *,
        config_path: Path | None = None,
        print_only: bool = False,
        start: bool = True,
    ) -> int:
        self.out, self.err = io.StringIO(), io.StringIO()
        return inst.install(
            manager=manager,
            config_path=config_path or self.config,
            print_only=print_only,
            start=start,
            out=self.out,
            err=self.err,
            environ=self.env,
        )

    def uninstall(self, manager: inst.Manager = "systemd") -> int:
        self.out, self.err = io.StringIO(), io.StringIO()
        return inst.uninstall(manager=manager, out=self.out, err=self.err, environ=self.env)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    pytest.importorskip("supervisor.config")
    (tmp_path / "home").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "units").mkdir()
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nshutdown_timeout = "20s"\n')
    env = {
        "HOME": str(tmp_path / "home"),
        "PATH": str(tmp_path / "bin"),
        "USER": "tester",
        "FAKE_MANAGER_LOG": str(tmp_path / "calls.log"),
    }
    old = os.umask(0o077)  # the files must be 0644 whatever the umask
    try:
        yield Box(tmp_path, env, config, io.StringIO(), io.StringIO())
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class TestInstallWithoutAManager:
    def test_no_start_writes_the_unit_0644_and_uninstall_removes_it(self, box: Box) -> None:
        """--no-start into a temporary HOME: the unit is there, mode 0644; uninstall removes it."""
        assert box.install(start=False) == 0
        assert mode(box.unit) == 0o644
        assert f"run -c {box.config}" in box.unit.read_text()
        assert box.uninstall() == 0
        assert not box.unit.exists()
        assert "systemctl not found" in box.err.getvalue()

    def test_launchd_no_start_writes_the_agent_and_its_log_folder(self, box: Box) -> None:
        """The launchd path works on any OS: plist 0644, log folder made; uninstall removes it."""
        assert box.install("launchd", start=False) == 0
        assert mode(box.plist) == 0o644
        assert plistlib.loads(box.plist.read_bytes())["ProgramArguments"][-1] == str(box.config)
        assert (box.tmp / "home/Library/Logs/hostvisor").is_dir()
        assert box.uninstall("launchd") == 0
        assert not box.plist.exists()

    def test_a_missing_systemctl_is_said_with_the_command_to_run(self, box: Box) -> None:
        """As on CI: the unit is written, exit 0, stderr says what was not done and how to do it."""
        assert box.install() == 0
        assert box.unit.exists()
        assert "systemctl not found" in box.err.getvalue()
        assert "systemctl --user enable --now hostvisor.service" in box.err.getvalue()
        assert "loginctl enable-linger tester" in box.err.getvalue()

    def test_a_missing_launchctl_is_said_with_the_command_to_run(self, box: Box) -> None:
        """The agent is written; stderr gives the exact bootstrap command."""
        assert box.install("launchd") == 0
        assert f"launchctl bootstrap gui/{os.getuid()} {box.plist}" in box.err.getvalue()

    def test_print_writes_only_to_out(self, box: Box) -> None:
        """--print: the rendered file on stdout, nothing on disk, nothing else said."""
        for manager in ("systemd", "launchd"):
            assert box.install(manager, print_only=True) == 0
            assert box.err.getvalue() == ""
            assert "[Service]" in box.out.getvalue() or "<plist" in box.out.getvalue()
        assert list((box.tmp / "home").iterdir()) == []

    def test_socket_is_passed_on_to_run(self, box: Box) -> None:
        """install --socket PATH: the service runs `hostvisor run -c CONFIG --socket PATH`."""
        box.out, box.err = io.StringIO(), io.StringIO()
        sock = box.tmp / "hv.sock"
        for manager in ("systemd", "launchd"):
            assert (
                inst.install(
                    manager=manager,
                    config_path=box.config,
                    print_only=True,
                    start=False,
                    out=box.out,
                    err=box.err,
                    environ=box.env,
                    socket=sock,
                )
                == 0
            )
        text = box.out.getvalue()
        assert f"run -c {box.config} --socket {sock}" in text
        assert f"<string>--socket</string>\n\t\t<string>{sock}</string>" in text

    def test_an_invalid_config_is_reported_before_anything_is_written(self, box: Box) -> None:
        """Exit 1, the issue as ``file: key: message``, an empty HOME."""
        box.config.write_text('[daemon]\nshutdown_timout = "20s"\n')
        assert box.install() == 1
        assert f"{box.config}: daemon.shutdown_timout:" in box.err.getvalue()
        assert list((box.tmp / "home").iterdir()) == []

    def test_a_missing_config_is_reported_before_anything_is_written(self, box: Box) -> None:
        """Exit 1 naming the file; nothing written, not even with --print."""
        box.config.unlink()
        assert box.install(print_only=True) == 1
        assert f"{box.config}: config file not found" in box.err.getvalue()
        assert box.out.getvalue() == ""
        assert list((box.tmp / "home").iterdir()) == []

    def test_uninstall_with_nothing_installed_is_harmless(self, box: Box) -> None:
        """Exit 0 and say so."""
        assert box.uninstall() == 0
        assert "nothing to remove" in box.out.getvalue()


class TestInstallWithSystemd:
    def test_reloads_enables_and_starts(self, box: Box) -> None:
        """daemon-reload, then enable --now; linger off is said with the command to turn it on."""
        box.fake("systemctl", "loginctl")
        assert box.install() == 0
        assert box.calls() == [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now hostvisor.service",
            "loginctl show-user tester --property=Linger",
        ]
        assert "linger is off for tester" in box.err.getvalue()
        assert "loginctl enable-linger tester" in box.err.getvalue()

    def test_no_start_enables_for_the_next_login_without_starting(self, box: Box) -> None:
        """--no-start: daemon-reload and enable, never --now, start or restart."""
        box.fake("systemctl")
        assert box.install(start=False) == 0
        assert box.calls() == [
            "systemctl --user daemon-reload",
            "systemctl --user enable hostvisor.service",
        ]
        assert "systemctl --user start hostvisor.service" in box.out.getvalue()

    def test_installing_twice_changes_nothing_but_still_reloads(self, box: Box) -> None:
        """Same content: the file is untouched (same inode); daemon-reload again; no restart."""
        box.fake("systemctl", "loginctl")
        box.env["FAKE_LINGER"] = "yes"
        assert box.install() == 0
        inode = box.unit.stat().st_ino
        assert box.install() == 0
        assert box.unit.stat().st_ino == inode
        assert "unchanged" in box.out.getvalue()
        assert box.calls().count("systemctl --user daemon-reload") == 2
        assert not any("restart" in c for c in box.calls())
        assert "linger is on" in box.out.getvalue()

    def test_a_changed_unit_restarts_the_running_daemon(self, box: Box) -> None:
        """Another config: the unit is updated and the service restarted on the new command."""
        box.fake("systemctl", "loginctl")
        assert box.install() == 0
        other = box.tmp / "other.toml"
        other.write_text("[daemon]\n")
        assert box.install(config_path=other) == 0
        assert box.calls()[-2] == "systemctl --user restart hostvisor.service"
        assert f"run -c {other}" in box.unit.read_text()

    def test_an_unreachable_user_manager_is_a_warning(self, box: Box) -> None:
        """daemon-reload fails (no user bus): the unit stays, exit 0, stderr says what to run."""
        box.fake("systemctl")
        box.env["FAKE_MANAGER_FAIL"] = "daemon-reload"
        assert box.install() == 0
        assert box.unit.exists()
        assert "not reachable" in box.err.getvalue()
        assert "enable --now" not in "".join(box.calls())

    def test_a_service_that_fails_to_start_is_exit_1(self, box: Box) -> None:
        """enable --now fails: exit 1, with systemctl's message and where to look."""
        box.fake("systemctl")
        box.env["FAKE_MANAGER_FAIL"] = "enable"
        assert box.install() == 1
        assert "Job for hostvisor.service failed" in box.err.getvalue()
        assert "journalctl --user -u hostvisor" in box.err.getvalue()

    def test_uninstall_stops_disables_and_removes(self, box: Box) -> None:
        """disable --now, the unit and its wants link removed, daemon-reload."""
        box.fake("systemctl", "loginctl")
        assert box.install() == 0
        wants = box.unit.parent / "default.target.wants" / inst.UNIT_NAME
        wants.parent.mkdir()
        wants.symlink_to(box.unit)  # what a real `enable` makes
        assert box.uninstall() == 0
        assert box.calls()[-2:] == [
            "systemctl --user disable --now hostvisor.service",
            "systemctl --user daemon-reload",
        ]
        assert not box.unit.exists() and not wants.is_symlink()


class TestInstallWithLaunchd:
    def test_bootstraps_an_agent_that_is_not_loaded(self, box: Box) -> None:
        """launchctl bootstrap gui/$UID <plist>."""
        box.fake("launchctl")
        assert box.install("launchd") == 0
        uid = os.getuid()
        assert box.calls() == [
            f"launchctl print gui/{uid}/{inst.LAUNCHD_LABEL}",
            f"launchctl bootstrap gui/{uid} {box.plist}",
        ]

    def test_a_loaded_agent_is_kickstarted_or_reloaded(self, box: Box) -> None:
        """Same plist: kickstart (harmless); changed plist: bootout, then bootstrap the new one."""
        box.fake("launchctl")
        assert box.install("launchd") == 0
        box.env["FAKE_LOADED"] = "1"
        service = f"gui/{os.getuid()}/{inst.LAUNCHD_LABEL}"
        assert box.install("launchd") == 0
        assert box.calls()[-1] == f"launchctl kickstart {service}"
        box.config.write_text('[daemon]\nshutdown_timeout = "90s"\n')
        assert box.install("launchd") == 0
        assert box.calls()[-2:] == [
            f"launchctl bootout {service}",
            f"launchctl bootstrap gui/{os.getuid()} {box.plist}",
        ]
        assert plistlib.loads(box.plist.read_bytes())["ExitTimeOut"] == 90 + inst.STOP_MARGIN

    def test_uninstall_boots_out_and_removes_but_keeps_the_logs(self, box: Box) -> None:
        """bootout gui/$UID/<label>, the plist removed, the log folder left."""
        box.fake("launchctl")
        assert box.install("launchd") == 0
        box.env["FAKE_LOADED"] = "1"
        assert box.uninstall("launchd") == 0
        assert box.calls()[-1] == f"launchctl bootout gui/{os.getuid()}/{inst.LAUNCHD_LABEL}"
        assert not box.plist.exists()
        assert (box.tmp / "home/Library/Logs/hostvisor").is_dir()
