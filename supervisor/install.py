"""``hostvisor install`` / ``uninstall``: a systemd user unit or a launchd agent.

Both files are rendered from the templates in ``packaging/`` (shipped inside the
package as ``supervisor/packaging``), so the repository and an installed hostvisor
render the same text:

- systemd (default on Linux): ``$XDG_CONFIG_HOME/systemd/user/hostvisor.service``
  (default ``~/.config``), then ``systemctl --user daemon-reload`` and
  ``enable --now``. Linger is checked with ``loginctl show-user``.
- launchd (default on macOS): ``~/Library/LaunchAgents/dev.hostvisor.hostvisor.plist``,
  written with :mod:`plistlib`, then ``launchctl bootstrap gui/$UID``. The agent's
  stdout and stderr go to ``~/Library/Logs/hostvisor/hostvisor.log``.

Exit codes: 0 when the file is in place, even when the service manager is missing
or unreachable (CI, containers, ``sudo`` shells): a ``warning:`` line on ``err``
then names what was not done and the command to run. 1 when the config is missing
or invalid (nothing is written), a file cannot be written or removed, or the
manager refuses to start the service.
"""

from __future__ import annotations

import math
import os
import plistlib
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, TextIO

from supervisor.errors import ConfigError
from supervisor.paths import environ_or_os, home_dir

__all__ = [
    "LAUNCHD_LABEL",
    "STOP_MARGIN",
    "UNIT_NAME",
    "Manager",
    "default_manager",
    "install",
    "launchd_log_dir",
    "launchd_plist_path",
    "program_argv",
    "render_launchd_plist",
    "render_systemd_unit",
    "stop_timeout",
    "systemd_quote",
    "systemd_unit_path",
    "uninstall",
]

Manager = Literal["systemd", "launchd"]
WriteStatus = Literal["created", "updated", "unchanged"]

UNIT_NAME = "hostvisor.service"
LAUNCHD_LABEL = "dev.hostvisor.hostvisor"
#: Seconds the service manager waits beyond ``[daemon] shutdown_timeout`` before SIGKILL.
STOP_MARGIN = 15
_FILE_MODE = 0o644
_ENABLE = f"systemctl --user enable --now {UNIT_NAME}"
_RELOAD = "systemctl --user daemon-reload"


# --- where things go -------------------------------------------------------------------


def default_manager() -> Manager:
    """``"launchd"`` on macOS, ``"systemd"`` everywhere else."""
    return "launchd" if sys.platform == "darwin" else "systemd"


def systemd_unit_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user/hostvisor.service`` (default ``~/.config``)."""
    env = environ_or_os(environ)
    base = env.get("XDG_CONFIG_HOME") or str(home_dir(env) / ".config")
    return Path(base) / "systemd" / "user" / UNIT_NAME


def launchd_plist_path(environ: Mapping[str, str] | None = None) -> Path:
    """``~/Library/LaunchAgents/dev.hostvisor.hostvisor.plist``."""
    return home_dir(environ_or_os(environ)) / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


def launchd_log_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``~/Library/Logs/hostvisor``: the agent's stdout and stderr (launchd does not rotate it)."""
    return home_dir(environ_or_os(environ)) / "Library" / "Logs" / "hostvisor"


def program_argv(argv0: str | None = None, executable: str | None = None) -> list[str]:
    """The absolute command that runs this hostvisor: its script, else its interpreter.

    Args:
        argv0: defaults to ``sys.argv[0]``; used when it is the ``hostvisor`` script
            (a bare name is looked up on ``PATH``, a symlink is kept as is so that a
            pipx or uv upgrade keeps working).
        executable: defaults to ``sys.executable``; its ``hostvisor`` sibling is the
            script of this environment, else ``[executable, "-m", "supervisor"]``.
            A venv's interpreter symlink is kept: resolving it would leave the venv.
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    if Path(argv0).name == "hostvisor":
        found = argv0 if os.sep in argv0 else shutil.which(argv0)
        if found and os.access(found, os.X_OK) and os.path.isfile(found):
            return [os.path.abspath(found)]
    sibling = Path(executable).parent / "hostvisor"
    if os.access(sibling, os.X_OK) and sibling.is_file():
        return [os.path.abspath(sibling)]
    return [os.path.abspath(executable), "-m", "supervisor"]


def stop_timeout(shutdown_timeout: float) -> int:
    """Whole seconds the manager waits for a stop: ``ceil(shutdown_timeout) + STOP_MARGIN``."""
    return math.ceil(shutdown_timeout) + STOP_MARGIN


# --- rendering -------------------------------------------------------------------------

_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%$+=:,./-]+")
_FIELD = re.compile(r"@([A-Z_]+)@")
#: What systemd's string_is_safe() rejects in ExecStart's executable: quotes, backslash, controls.
_UNSAFE_EXECUTABLE = re.compile(r"[\"'\\\x00-\x1f\x7f]")


def systemd_quote(word: str, *, dollar: bool = True) -> str:
    """One word of a unit file value, per systemd.syntax(7) and systemd.service(5).

    ``%`` becomes ``%%`` (specifiers are expanded everywhere); with ``dollar``,
    ``$`` becomes ``$$`` (Exec arguments expand variables; the executable path and
    ``Environment=`` do not). A word with anything beyond ``[A-Za-z0-9_@%$+=:,./-]``
    is double-quoted with C escapes for ``\\``, ``"`` and control characters; a lone
    ``;`` (a command separator) is written ``\\;``.
    """
    escaped = word.replace("%", "%%")
    if dollar:
        escaped = escaped.replace("$", "$$")
    if word == ";":
        return "\\;"
    if _SAFE_WORD.fullmatch(escaped):
        return escaped
    out = []
    for char in escaped:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _template(relative: str) -> bytes:
    return (resources.files("supervisor") / "packaging" / relative).read_bytes()


def _fill(template: str, fields: Mapping[str, str]) -> str:
    text = _FIELD.sub(lambda m: fields[m.group(1)], template)
    if missing := set(fields) - set(_FIELD.findall(template)):
        raise KeyError(f"template lacks fields: {sorted(missing)}")  # a packaging bug
    return text


def daemon_args(config_path: Path, socket: Path | None = None) -> list[str]:
    """``run -c <config>``, plus ``--socket <path>`` when one was given to ``install``."""
    return ["run", "-c", str(config_path), *(["--socket", str(socket)] if socket else [])]


def render_systemd_unit(
    *,
    argv: Sequence[str],
    config_path: Path,
    shutdown_timeout: float,
    path_env: str,
    socket: Path | None = None,
) -> str:
    """The unit text: ``ExecStart=<argv> run -c <config_path>``, ``Environment=PATH=...``.

    Args:
        argv: absolute command of :func:`program_argv`. An executable path that
            systemd refuses (quotes, backslash) is run through ``/usr/bin/env``.
        config_path: absolute config file.
        shutdown_timeout: ``[daemon] shutdown_timeout``, seconds.
        path_env: ``PATH`` of the installing user; services find their programs on it.
    """
    program = list(argv)
    if _UNSAFE_EXECUTABLE.search(program[0]):  # systemd refuses these in an executable path
        program.insert(0, "/usr/bin/env")
    words = [systemd_quote(program[0], dollar=False)]
    words += [systemd_quote(w) for w in [*program[1:], *daemon_args(config_path, socket)]]
    fields = {
        "EXEC_START": " ".join(words),
        "ENVIRONMENT": systemd_quote(f"PATH={path_env}", dollar=False),
        "TIMEOUT_STOP_SEC": f"{stop_timeout(shutdown_timeout)}s",
    }
    return _fill(_template("systemd/hostvisor.service").decode("utf-8"), fields)


def render_launchd_plist(
    *,
    argv: Sequence[str],
    config_path: Path,
    shutdown_timeout: float,
    path_env: str,
    log_dir: Path,
    socket: Path | None = None,
) -> bytes:
    """The agent's XML plist: the template's keys plus the ones computed here.

    Sets ``Label``, ``ProgramArguments`` (``<argv> run -c <config_path>``),
    ``EnvironmentVariables.PATH``, ``StandardOutPath`` and ``StandardErrorPath``
    (both ``<log_dir>/hostvisor.log``) and ``ExitTimeOut`` (:func:`stop_timeout`).
    """
    plist = plistlib.loads(_template("launchd/hostvisor.plist"))
    log = str(log_dir / "hostvisor.log")
    plist.update(
        Label=LAUNCHD_LABEL,
        ProgramArguments=[*argv, *daemon_args(config_path, socket)],
        EnvironmentVariables={**plist.get("EnvironmentVariables", {}), "PATH": path_env},
        StandardOutPath=log,
        StandardErrorPath=log,
        ExitTimeOut=stop_timeout(shutdown_timeout),
    )
    return plistlib.dumps(plist, sort_keys=False)


# --- side effects ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Report:
    out: TextIO
    err: TextIO

    def info(self, message: str) -> None:
        self.out.write(message + "\n")

    def warn(self, message: str) -> None:
        self.err.write(f"warning: {message}\n")

    def error(self, message: str) -> None:
        self.err.write(f"error: {message}\n")


@dataclass(frozen=True, slots=True)
class _Ran:
    ok: bool
    stdout: str
    detail: str  # what went wrong, on one line


class _Tool:
    """A command-line tool of the service manager, found on the installing user's PATH."""

    def __init__(self, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        self.env = dict(env)
        self.path = shutil.which(name, path=self.env.get("PATH", os.defpath))

    def run(self, *args: str) -> _Ran:
        """Run to completion; no timeout: systemd and launchd bound their own jobs."""
        try:
            proc = subprocess.run(
                [self.path or self.name, *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as exc:
            return _Ran(False, "", f"{self.name}: {exc.strerror or exc}")
        text = " ".join((proc.stderr or proc.stdout).split())
        return _Ran(proc.returncode == 0, proc.stdout, text or f"exit code {proc.returncode}")


def _write(path: Path, data: bytes) -> WriteStatus:
    """Atomically put ``data`` at ``path`` with mode 0644; same content is left alone."""
    try:
        old: bytes | None = path.read_bytes()
    except FileNotFoundError:
        old = None
    if old == data:
        if path.stat().st_mode & 0o777 != _FILE_MODE:
            path.chmod(_FILE_MODE)
        return "unchanged"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; the umask does not apply to chmod
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return "created" if old is None else "updated"


def _shutdown_timeout(config_path: Path, report: _Report) -> float | None:
    """``[daemon] shutdown_timeout`` of a valid config, else ``None`` after saying why."""
    from supervisor.config import load

    if not config_path.is_file():
        report.error(f"{config_path}: config file not found (pass -c PATH or create it)")
        return None
    try:
        return float(load(config_path).daemon.shutdown_timeout)
    except ConfigError as exc:
        for issue in exc.issues or [str(exc)]:
            report.err.write(f"{issue}\n")
    except OSError as exc:
        report.error(f"{config_path}: {exc.strerror or exc}")
    return None


def install(
    *,
    manager: Manager | None,
    config_path: Path,
    print_only: bool,
    start: bool,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str] | None = None,
    socket: Path | None = None,
) -> int:
    """Write, enable and start the service that runs ``hostvisor run -c <config_path>``.

    Args:
        manager: ``None`` picks :func:`default_manager`.
        config_path: validated with :func:`supervisor.config.load` before anything is
            written; made absolute.
        print_only: write the rendered file to ``out`` and do nothing else.
        start: ``False`` (``--no-start``): written and enabled (systemd) or left to
            load at the next login (launchd), but not started now.
        out, err: progress lines; ``warning:``/``error:`` lines and config issues.
        environ: defaults to ``os.environ``: ``HOME``, ``XDG_CONFIG_HOME``, ``PATH``
            (copied into the service, and where ``systemctl``/``launchctl`` are found).
        socket: ``--socket`` given to ``install``: passed on to ``hostvisor run``.

    Returns:
        The exit code, 0 or 1 (see the module docstring).
    """
    env = environ_or_os(environ)
    report = _Report(out, err)
    chosen = manager or default_manager()
    config = Path(os.path.abspath(os.path.expanduser(config_path)))
    timeout = _shutdown_timeout(config, report)
    if timeout is None:
        return 1
    argv, path_env = program_argv(), env.get("PATH") or os.defpath
    if chosen == "systemd":
        path = systemd_unit_path(env)
        data = render_systemd_unit(
            argv=argv,
            config_path=config,
            shutdown_timeout=timeout,
            path_env=path_env,
            socket=socket,
        ).encode("utf-8")
    else:
        path = launchd_plist_path(env)
        data = render_launchd_plist(
            argv=argv,
            config_path=config,
            shutdown_timeout=timeout,
            path_env=path_env,
            log_dir=launchd_log_dir(env),
            socket=socket,
        )
    if print_only:
        out.write(data.decode("utf-8"))
        return 0
    try:
        if chosen == "launchd":  # launchd does not create the folders of its log paths
            launchd_log_dir(env).mkdir(parents=True, exist_ok=True)
        status = _write(path, data)
    except OSError as exc:
        report.error(f"cannot write {exc.filename or path}: {exc.strerror or exc}")
        return 1
    report.info(f"{path}: {status} (mode 0644)" if status != "unchanged" else f"{path}: unchanged")
    if chosen == "systemd":
        code = _systemd_start(status, start=start, env=env, report=report)
        _check_linger(env, report)
        return code
    return _launchd_start(status, path, start=start, env=env, report=report)


def _systemd_start(
    status: WriteStatus, *, start: bool, env: Mapping[str, str], report: _Report
) -> int:
    systemctl = _Tool("systemctl", env)
    enable = _ENABLE if start else f"systemctl --user enable {UNIT_NAME}"
    todo = f"{_RELOAD} && {enable}"
    if systemctl.path is None:
        report.warn(f"systemctl not found on PATH: the unit is written but not loaded; run: {todo}")
        return 0
    reloaded = systemctl.run("--user", "daemon-reload")
    if not reloaded.ok:
        report.warn(
            f"the systemd user manager is not reachable ({reloaded.detail}): the unit is "
            f"written but not loaded; in your login session run: {todo}"
        )
        return 0
    report.info(f"ran: {_RELOAD}")
    steps: list[tuple[str, ...]] = [
        ("enable", "--now", UNIT_NAME) if start else ("enable", UNIT_NAME)
    ]
    if start and status == "updated":  # a running daemon keeps its old command until restarted
        steps.append(("restart", UNIT_NAME))
    for step in steps:
        ran = systemctl.run("--user", *step)
        if not ran.ok:
            report.error(f"systemctl --user {' '.join(step)} failed: {ran.detail}")
            report.error("see: journalctl --user -u hostvisor -e")
            return 1
        report.info(f"ran: systemctl --user {' '.join(step)}")
    if start:
        report.info("hostvisor is enabled and running; logs: journalctl --user -u hostvisor -f")
    else:
        report.info(
            "enabled, not started (--no-start): it starts at your next login, or now "
            f"with: systemctl --user start {UNIT_NAME}"
        )
    return 0


def _user_name(env: Mapping[str, str]) -> str:
    if user := env.get("USER"):
        return user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _check_linger(env: Mapping[str, str], report: _Report) -> None:
    """Say whether hostvisor outlives the login session (logind's ``Linger``)."""
    user = _user_name(env)
    enable = f"loginctl enable-linger {shlex.quote(user)}"
    loginctl = _Tool("loginctl", env)
    if loginctl.path is None:
        detail = "loginctl not found on PATH"
    else:
        ran = loginctl.run("show-user", user, "--property=Linger")
        value = ran.stdout.strip().removeprefix("Linger=")
        if ran.ok and value == "yes":
            report.info(f"linger is on for {user}: hostvisor keeps running after you log out")
            return
        if ran.ok and value == "no":
            report.warn(
                f"linger is off for {user}: hostvisor stops when you log out and starts at "
                f"your next login; to keep it running, run: {enable}"
            )
            return
        detail = ran.detail
    report.warn(
        f"could not check linger ({detail}); if hostvisor must keep running after you "
        f"log out, run: {enable}"
    )


def _launchd_start(
    status: WriteStatus, path: Path, *, start: bool, env: Mapping[str, str], report: _Report
) -> int:
    domain = f"gui/{os.getuid()}"
    service = f"{domain}/{LAUNCHD_LABEL}"
    bootstrap = f"launchctl bootstrap {domain} {shlex.quote(str(path))}"
    logs = launchd_log_dir(env) / "hostvisor.log"
    if not start:
        report.info(f"not loaded (--no-start); it loads at your next login, or run: {bootstrap}")
        return 0
    launchctl = _Tool("launchctl", env)
    if launchctl.path is None:
        report.warn(
            "launchctl not found on PATH: the agent is written but not loaded; it loads at "
            f"your next login, or run: {bootstrap}"
        )
        return 0
    loaded = launchctl.run("print", service).ok
    steps: list[tuple[str, ...]]
    if loaded and status == "unchanged":
        steps = [("kickstart", service)]  # starts it if stopped, leaves a running one alone
    elif loaded:  # kickstart -k would restart the old definition: reload the new one
        steps = [("bootout", service), ("bootstrap", domain, str(path))]
    else:
        steps = [("bootstrap", domain, str(path))]
    for step in steps:
        ran = launchctl.run(*step)
        if not ran.ok:
            report.error(f"{shlex.join(['launchctl', *step])} failed: {ran.detail}")
            report.error(f"see: launchctl print {service}; tail {shlex.quote(str(logs))}")
            return 1
        report.info(f"ran: {shlex.join(['launchctl', *step])}")
    report.info(f"hostvisor is loaded and running; logs: tail -f {shlex.quote(str(logs))}")
    return 0


def uninstall(
    *,
    manager: Manager | None,
    out: TextIO,
    err: TextIO,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Stop, disable and remove what :func:`install` made; logs are kept.

    A missing or unreachable service manager is a warning (the files are removed
    anyway); nothing installed is not an error.

    Returns:
        0, or 1 when a file could not be removed.
    """
    env = environ_or_os(environ)
    report = _Report(out, err)
    if (manager or default_manager()) == "systemd":
        unit = systemd_unit_path(env)
        files = [unit, unit.parent / "default.target.wants" / UNIT_NAME]
        stop: tuple[str, ...] = ("systemctl", "--user", "disable", "--now", UNIT_NAME)
    else:
        files = [launchd_plist_path(env)]
        stop = ("launchctl", "bootout", f"gui/{os.getuid()}/{LAUNCHD_LABEL}")
    if not any(f.exists() or f.is_symlink() for f in files):
        report.info(f"nothing to remove: {files[0]} does not exist")
        return 0
    tool = _Tool(stop[0], env)
    if tool.path is None:
        report.warn(f"{stop[0]} not found on PATH: could not run {shlex.join(stop)}")
    elif stop[0] == "launchctl" and not tool.run("print", stop[-1]).ok:
        report.info("the agent is not loaded")
    elif (ran := tool.run(*stop[1:])).ok:
        report.info(f"ran: {shlex.join(stop)}")
    else:
        report.warn(f"{shlex.join(stop)} failed ({ran.detail}); removing the files anyway")
    code = 0
    for file in files:
        try:
            file.unlink()
            report.info(f"removed {file}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            report.error(f"cannot remove {file}: {exc.strerror or exc}")
            code = 1
    if tool.path is not None and stop[0] == "systemctl" and tool.run("--user", "daemon-reload").ok:
        report.info(f"ran: {_RELOAD}")
    if stop[0] == "launchctl":
        report.info(f"logs kept in {launchd_log_dir(env)}")
    return code
