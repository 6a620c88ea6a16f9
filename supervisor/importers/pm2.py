"""``hostvisor import pm2``: an ``ecosystem.config.json`` (``{"apps": [...]}``, a bare
list of apps, or one app), or what ``pm2 jlist`` prints (a list of processes, each with
``name`` and ``pm2_env``, pm2's resolved options). pm2's docs, "Ecosystem File" /
"Attributes available", and its code (lib/Common.js, lib/God.js) are the reference.

An ``ecosystem.config.js`` is JavaScript, which an import does not run: ImportFailed
says to use ``pm2 jlist`` or the JSON form. pm2 evaluates a ``.json`` ecosystem as
JavaScript, so ``//`` and ``/* */`` comments and trailing commas are accepted.

Each app is a service. Its command is pm2's: ``interpreter interpreter_args script
args``; without ``interpreter``, pm2's rule by extension (lib/API/interpreter.json:
``.js`` node, ``.py`` python, or python3 where no ``python`` is on PATH, ``.sh`` bash,
``.rb`` ruby, ``.php`` php, ``.pl`` perl, ``.ts``/``.tsx`` bun), else the script itself
when it is a binary, else node; ``interpreter: "none"`` runs the script itself. A script
with a space in it is run by ``bash -c``, as pm2 does (split without a shell when it
needs none). pm2's defaults that differ from hostvisor's are written out: pm2 stops an
app with SIGINT and SIGKILLs it after ``kill_timeout`` (1600 ms), and gives up after
``max_restarts`` (16) unstable restarts (exits within ``min_uptime``, 1 s). Durations
in ms (numbers) or ``"1s"``/``"2m"``/``"1h"``; sizes ``"300M"`` (K, M, G are 1024).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from supervisor.importers import (
    Converted,
    FileResult,
    ImportContext,
    ImportFailed,
    Source,
    command_argv,
    unit_name,
)

__all__ = ["convert"]

#: pm2's lib/API/interpreter.json.
_BY_EXTENSION = {
    ".sh": "bash", ".py": "python", ".rb": "ruby", ".php": "php", ".pl": "perl",
    ".js": "node", ".coffee": "coffee", ".ls": "lsc", ".ts": "bun", ".tsx": "bun",
}  # fmt: skip
_ALIASES = {
    "exec": "script", "cmd": "script", "command": "script", "interpreter": "exec_interpreter",
    "interpreterArgs": "node_args", "interpreter_args": "node_args", "out": "out_file",
    "output": "out_file", "out_log": "out_file", "error": "error_file", "err": "error_file",
    "err_file": "error_file", "err_log": "error_file", "log": "log_file", "pid": "pid_file",
    "cron": "cron_restart", "combine_logs": "merge_logs", "user": "uid",
}  # fmt: skip
#: pm2 lib/tools/Config.js "sbyte": K, M, G are binary.
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)$")
_TIME = re.compile(r"^(\d+)([hms]?)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
#: The longest time taken (ms): hostvisor's durations end at 365 days.
_MAX_MS = 365 * 86_400_000
#: The most restarts or bytes taken: past these a value is a typo, not a setting.
_MAX_COUNT = 2**31 - 1
_MAX_BYTES = 1024**5
#: pm2's lib/tools/Config.js splitting of a string where an array is expected.
_WORDS = re.compile(r"""[^\s"'=]+="[^"]*"|[^\s"'=]+='[^']*'|"([^"]*)"|'([^']*)'|\S+""")
#: Why an option is not mapped -> the options (pm2's schema.json names).
_WHY = {
    "hostvisor writes stdout and stderr to logs/<unit>.log ([logs] rotates it)":
        "out_file error_file log_file merge_logs log_date_format time log_type disable_logs",
    "hostvisor writes no pid files: `hostvisor status NAME` shows the pid": "pid_file",
    "hostvisor does not restart on file changes: `hostvisor restart NAME` after a deploy":
        "watch ignore_watch watch_options watch_delay",
    "a restart at a time of day, not a job: a scheduled unit running `hostvisor restart "
    "NAME` does it": "cron_restart",
    "hostvisor runs every unit as its own user": "uid gid",
    "hostvisor does not wait for process.send('ready'): a [health] probe (http, tcp, with "
    "start_period) decides when the app is up": "wait_ready listen_timeout",
    "hostvisor stops with a signal (stop_signal), not an IPC message": "shutdown_with_message",
    "a node option of pm2's wrapper": "source_map_support disable_source_map_support",
    "hostvisor sets no instance variable (one process per unit)": "instance_var increment_var",
    "hostvisor passes the daemon's environment, then env": "filter_env",
    "hostvisor has no namespaces, prefixes or --env: name the units":
        "namespace name_prefix append_env_to_name",
    "a pm2 CLI or deployment option": "force post_update install_url",
    "Windows only": "windowsHide", "pm2's kill polling": "kill_retry_time",
    "pm2's monitoring (PMX, Keymetrics): hostvisor reports through events and OpenTelemetry":
        "pmx automation vizion trace disable_trace v8 event_loop_inspector deep_monitoring "
        "io axm_options",
}  # fmt: skip
_NOT_MAPPED = {key: why for why, keys in _WHY.items() for key in keys.split()}
_UNKNOWN = "not known to hostvisor import"
#: A jlist's pm2_env keys that are pm2's runtime state, not an app's settings.
_STATE = frozenset({
    "status", "pm_uptime", "created_at", "restart_time", "unstable_restarts", "pm_id",
    "axm_actions", "axm_monitor", "axm_dynamic", "versioning", "version", "_pm2_version",
    "km_link", "vizion_running", "username", "exit_code", "prev_restart_delay",
    "pm_out_log_path", "pm_err_log_path", "pm_pid_path", "unique_id", "NODE_APP_INSTANCE",
    "pm_exec_path", "pm_cwd", "env", "pmx_module", "treekill", "instance_var", "node_version",
})  # fmt: skip
#: The login session's variables a jlist's env carries from the shell that ran pm2.
_SESSION = frozenset({
    "_", "OLDPWD", "PWD", "SHLVL", "TERM", "TERM_PROGRAM", "TERM_PROGRAM_VERSION",
    "COLORTERM", "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "SSH_AUTH_SOCK", "XDG_SESSION_ID",
    "XDG_SESSION_TYPE", "XDG_SESSION_CLASS", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS",
    "MOTD_SHOWN", "MAIL", "LS_COLORS", "DISPLAY", "WINDOWID", "TMUX", "TMUX_PANE", "STY",
    "LESSOPEN", "LESSCLOSE", "SUDO_USER", "SUDO_UID", "SUDO_GID", "SUDO_COMMAND",
})  # fmt: skip


def convert(source: Source, ctx: ImportContext) -> FileResult:
    """Every app of the pm2 file ``source`` (module docstring).

    Raises:
        ImportFailed: JavaScript, not JSON (the line), no app, or an app without a script.
    """
    data, note = _load(source)
    result = FileResult()
    if note:
        result.notes.append(note)
    jlist = False
    if isinstance(data, dict) and "apps" in data:
        apps = data["apps"]
        for key in data:
            if key != "apps":
                why = "pm2 deploy (git pull over ssh): not a service"
                result.unmapped.append((key, why if key == "deploy" else _UNKNOWN))
    elif isinstance(data, list):
        apps = data
        jlist = any(isinstance(app, dict) and "pm2_env" in app for app in data)
    elif isinstance(data, dict) and ("script" in data or "pm2_env" in data):
        apps = [data]
        jlist = "pm2_env" in data
    else:
        raise ImportFailed('expected {"apps": [...]}, a list of apps or `pm2 jlist` output')
    if not isinstance(apps, list):
        raise ImportFailed('"apps" is not a list')
    here = None if source.label == "<stdin>" else os.path.dirname(os.path.abspath(source.path))
    for index, app in enumerate(apps):
        if not isinstance(app, dict):
            raise ImportFailed(f"app {index}: not an object")
        if jlist:
            env = app.get("pm2_env")
            if not isinstance(env, dict):
                raise ImportFailed(f"process {index}: no pm2_env object")
            if env.get("pmx_module"):
                name = app.get("name", env.get("name", index))
                result.notes.append(
                    f"{name}: a pm2 module (pm2's own extension, e.g. log rotation), not an "
                    "app: left out; hostvisor rotates logs itself ([logs])"
                )
                continue
            reader = _App(index, env, ctx, jlist=True, here=None)
        else:
            reader = _App(index, app, ctx, jlist=False, here=here)
        result.units.append(reader.convert())
        result.notes += [note for note in reader.generic if note not in result.notes]
    if not result.units:
        raise ImportFailed("no app found" + (" (only pm2 modules)" if result.notes else ""))
    return result


def _load(source: Source) -> tuple[Any, str]:
    """The JSON (or YAML, for a .yml ecosystem) of ``source`` and how it was read;
    ImportFailed with the line."""
    label = source.label.lower()
    text = source.text
    if label.endswith((".js", ".cjs", ".mjs")) or re.search(
        r"module\.exports|^\s*(const|let|var)\s", text, re.M
    ):
        raise ImportFailed(
            "an ecosystem.config.js is JavaScript, which hostvisor import does not run: "
            "import what pm2 runs (`pm2 jlist > pm2.json`), or write the apps as "
            "ecosystem.config.json"
        )
    if label.endswith((".yml", ".yaml")):
        import yaml

        try:
            return yaml.safe_load(text), ""
        except yaml.YAMLError as exc:
            raise ImportFailed(f"not YAML: {exc}") from None
        except (ValueError, RecursionError) as exc:  # a number past int's digits, nesting
            raise ImportFailed(f"not YAML import can read: {_unreadable(exc)}") from None
    try:
        return json.loads(text), ""
    except json.JSONDecodeError:
        pass
    except (ValueError, RecursionError) as exc:
        raise ImportFailed(f"not JSON import can read: {_unreadable(exc)}") from None
    try:
        data = json.loads(_strip_js(text))
    except json.JSONDecodeError as exc:
        raise ImportFailed(f"line {exc.lineno}: not JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        raise ImportFailed(f"not JSON import can read: {_unreadable(exc)}") from None
    return data, "read without its comments and trailing commas (pm2 reads .json as JavaScript)"


def _unreadable(exc: Exception) -> str:
    """Why json/yaml gave up on a file that parses: nesting, or a number too long."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"a number too long ({exc})"


def _strip_js(text: str) -> str:
    """JSON with JavaScript's comments and trailing commas removed (strings and line
    numbers kept)."""
    out = re.sub(
        r'"(?:[^"\\]|\\.)*"|//[^\n]*|/\*.*?\*/',
        lambda m: m.group(0) if m.group(0).startswith('"') else "\n" * m.group(0).count("\n"),
        text,
        flags=re.S,
    )
    return re.sub(r",(\s*[}\]])", r"\1", out)


def _words(value: Any, where: str) -> list[str]:
    """An array option (args, node_args): a list as is, a string split as pm2 does."""
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        words = []
        for match in _WORDS.finditer(value):
            word = match.group(0)
            if len(word) >= 2 and word[0] == word[-1] and word[0] in "\"'":
                word = word[1:-1]
            if word.strip():
                words.append(word)
        return words
    raise ImportFailed(f"{where}: expected a list or a string")


def _ms(value: Any, where: str) -> str:
    """A pm2 time (ms as a number, or ``"5s"``, ``"2m"``, ``"1h"``) as a duration string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ImportFailed(f'{where}: expected milliseconds or a string like "5s"')
    if isinstance(value, (int, float)):
        if value < 0:
            raise ImportFailed(f"{where}: must not be negative")
        if not value <= _MAX_MS:  # NaN, Infinity, a number of 4000 digits
            raise ImportFailed(f"{where}: {str(value)[:20]} ms is more than 365 days")
        return f"{value / 1000:g}s" if value % 1000 == 0 else f"{value:g}ms"
    match = _TIME.match(value.strip())
    if match is None:
        raise ImportFailed(f"{where}: {value!r} is not a time (ms, or 5s, 2m, 1h)")
    number, unit = match.group(1), match.group(2) or "ms"
    if len(number) > 15 or int(number) * _UNIT_MS[unit] > _MAX_MS:
        raise ImportFailed(f"{where}: {value[:20]!r} is more than 365 days")
    return f"{number}{unit}"


class _App:
    """One app: its options (an ecosystem app, or a jlist process's ``pm2_env``)."""

    def __init__(
        self,
        index: int,
        options: dict[str, Any],
        ctx: ImportContext,
        *,
        jlist: bool,
        here: str | None,
    ) -> None:
        self.options = {_ALIASES.get(k, k): v for k, v in options.items()}
        self.ctx = ctx
        self.jlist = jlist
        self.here = here
        self.done: set[str] = set()
        #: Notes that hold for every app of the file: said once, in the file's notes.
        self.generic: list[str] = []
        script = self.options.get("pm_exec_path" if jlist else "script")
        if not isinstance(script, str) or not script.strip():
            what = "pm2_env.pm_exec_path" if jlist else "script"
            raise ImportFailed(f"app {index}: no {what}")
        self.script = script
        name = self.options.get("name")
        if not isinstance(name, str) or not name:
            base = os.path.basename(script.split()[0] if " " in script else script)
            name = os.path.splitext(base)[0] or f"app-{index}"
        self.where = f"app {name!r}"
        self.unit = Converted(original=name, name=unit_name(name), table={})

    def take(self, key: str) -> Any:
        self.done.add(key)
        return self.options.get(key)

    def convert(self) -> Converted:
        unit, table = self.unit, self.unit.table
        table["description"] = f"{unit.original} (pm2)"
        self.take("name")
        self.take("script")
        self.done.add("pm_exec_path")
        self._workdir()
        self._command()
        self._env()
        self._restart()
        self._stop()
        self._memory()
        self._scale()
        self._rest()
        return unit

    def _workdir(self) -> None:
        cwd = self.take("pm_cwd" if self.jlist else "cwd")
        if self.jlist:
            self.take("cwd")  # pm2 keeps the cwd given; pm_cwd is the one it used
            if isinstance(cwd, str) and cwd:
                self.unit.table["workdir"] = cwd
                self.unit.map("pm2_env.pm_cwd", "workdir")
            return
        if isinstance(cwd, str) and cwd:
            if not os.path.isabs(cwd) and not cwd.startswith("~") and self.here is not None:
                self.unit.notes.append(
                    "cwd is relative: pm2 takes it from the folder "
                    "`pm2 start` ran in, here the ecosystem file's"
                )
                cwd = os.path.join(self.here, cwd)
            self.unit.table["workdir"] = cwd
            self.unit.map("cwd", "workdir")
        elif self.here is not None:
            self.unit.table["workdir"] = self.here
            self.unit.map(
                "(no cwd: the folder of `pm2 start`, here the ecosystem file's)", "workdir"
            )

    def _command(self) -> None:
        unit, script = self.unit, self.script
        args = _words(self.take("args"), f"{self.where} args")
        node_args = _words(self.take("node_args"), f"{self.where} interpreter_args")
        interpreter = self.take("exec_interpreter")
        if not self.jlist and " " in script.strip() and not interpreter:
            argv, why = command_argv(script)
            unit.table["command"] = argv if why is None else ["bash", "-c", script]
            unit.map("script (a command line)", "command")
            if why is not None:
                unit.notes.append(
                    f"runs through bash -c, as pm2 runs a script with a space: it {why}"
                )
            if args:
                unit.skip(f"args={args}", "pm2 ignores args when script is a command line")
            return
        path = script
        if not isinstance(interpreter, str) or not interpreter:
            interpreter, path = self._interpreter()
        elif not self.jlist:
            unit.map("interpreter", "command")
        if interpreter == "none" and "/" not in path and self._workdir_file(path):
            path = f"./{path}"  # pm2 looks in cwd first, then PATH
        if interpreter == "none":
            unit.table["command"] = [path, *args]
        else:
            unit.table["command"] = [interpreter, *node_args, path, *args]
            if "python" in os.path.basename(interpreter):
                env = unit.table.setdefault("env", {})
                env.setdefault("PYTHONUNBUFFERED", "1")
                unit.map("(pm2 sets it for a python interpreter)", "env.PYTHONUNBUFFERED")
        unit.map("pm2_env.pm_exec_path" if self.jlist else "script", "command")
        if args:
            unit.map("args", "command")
        if node_args:
            unit.map("interpreter_args", "command")
        if os.path.basename(interpreter) in ("coffee", "lsc"):
            unit.notes.append(
                f"pm2 runs {interpreter} from its own node_modules: install it or set the full path"
            )

    def _workdir_file(self, name: str) -> str | None:
        folder = self.unit.table.get("workdir")
        path = os.path.join(os.path.expanduser(folder), name) if folder else None
        return path if path and os.path.isfile(path) else None

    def _interpreter(self) -> tuple[str, str]:
        """pm2's Common.sink.resolveInterpreter: ``(interpreter, script)``, mapped or noted."""
        unit, script = self.unit, self.script
        extension = os.path.splitext(script)[1]
        found = _BY_EXTENSION.get(extension)
        path = self.ctx.environ.get("PATH", os.defpath)
        if found == "python" and shutil.which("python", path=path) is None:
            found = "python3" if shutil.which("python3", path=path) else found
        if found is not None:
            unit.map(f"(pm2's interpreter for {extension})", f"command: {found}")
            return found, script
        file = script if os.path.isabs(script) else self._workdir_file(script)
        if file is None and "/" not in script:
            file = shutil.which(script, path=path)
        try:
            with open(file or "", "rb") as stream:
                head = stream.read(4096)
        except OSError:
            unit.notes.append(
                "pm2 runs a script without a known extension with node unless "
                "it is a binary; not found on this host: run directly"
            )
            return "none", script
        if b"\0" in head:
            unit.map("(a binary: pm2 runs it directly)", "command")
            return "none", script
        if head.startswith(b"#!"):
            unit.notes.append(
                "pm2 runs a text script without a known extension with node; "
                "this one has a #! line: run directly"
            )
            return "none", script
        unit.notes.append("pm2 runs a text script without a known extension with node: kept")
        return "node", file or script

    def _env(self) -> None:
        unit, table = self.unit, self.unit.table
        env = table.setdefault("env", {})
        raw = self.take("env")
        if isinstance(raw, dict):
            if self.jlist:
                self._jlist_env(raw, env)
            else:
                for key, value in raw.items():
                    if value is None:
                        unit.skip(f"env.{key}=null", "pm2 passes no variable set to null")
                    elif isinstance(value, (dict, list, bool)):
                        env[str(key)] = json.dumps(value, separators=(",", ":"))  # JSON.stringify
                    else:
                        env[str(key)] = str(value)
                if raw:
                    unit.map("env", "env")
        elif raw is not None:
            unit.skip(f"env={raw!r}", "not an object")
        for key in [k for k in self.options if k.startswith("env_")]:
            self.take(key)
            names = ", ".join(self.options[key]) if isinstance(self.options[key], dict) else ""
            unit.skip(
                f"{key} ({names})",
                f"pm2 applies it with `pm2 start --env {key[4:]}`: "
                "copy the variables of the environment you run into env",
            )
        port = self.take("port")
        if port is not None:
            env["PORT"] = str(port)
            table["port"] = port
            unit.map("port", "port, env.PORT")
        if not env:
            del table["env"]

    def _jlist_env(self, raw: dict[str, Any], env: dict[str, str]) -> None:
        """A jlist's env is the whole environment of the shell that ran ``pm2 start`` plus
        the app's: keep what is neither pm2's, the login session's, nor the same here."""
        pm2, session, same = [], [], []
        for key, value in raw.items():
            text = value if isinstance(value, str) else json.dumps(value)
            if (
                key.startswith(("PM2_", "pm2_", "axm_"))
                or key in _STATE
                or key == self.unit.original
            ):
                pm2.append(key)
            elif key in _SESSION:
                session.append(key)
            elif self.ctx.environ.get(key) == text:
                same.append(key)
            else:
                env[key] = text
        for names, why in (
            (pm2, "pm2's own variables"),
            (session, "the login session of the shell that ran `pm2 start`"),
            (
                same,
                "inherited from the shell that ran `pm2 start`, the same in this one: "
                "the daemon passes its own environment",
            ),
        ):
            if names:
                self.unit.skip(f"env {', '.join(sorted(names))}", why)
        if env:
            self.unit.map("pm2_env.env (what differs from this shell)", "env")
            self.unit.notes.append(
                "pm2 froze the environment of the shell that ran `pm2 start`: env keeps what "
                "is not in this shell's, or differs here; review it"
            )

    def _restart(self) -> None:
        unit, table = self.unit, self.unit.table
        autorestart = self.take("autorestart")
        codes = self.take("stop_exit_codes")
        if autorestart is False or autorestart == "false":
            table["restart"] = "no"
            unit.map("autorestart: false", 'restart = "no"')
            unit.notes.append(
                'restart = "no" makes a one-shot in hostvisor: it runs once per '
                "daemon start (and on hostvisor start), and is exited after"
            )
        elif codes is not None:
            listed = codes if isinstance(codes, list) else [codes]
            if [int(str(c)) for c in listed if str(c).strip().lstrip("-").isdigit()] == [0]:
                table["restart"] = "on-failure"
                unit.map("stop_exit_codes: [0]", 'restart = "on-failure"')
            else:
                unit.skip(
                    f"stop_exit_codes={codes}",
                    'hostvisor\'s "on-failure" stops on exit 0 alone; other codes are restarted',
                )
        elif autorestart is not None:
            unit.map("autorestart", 'restart = "always" (the default)')
        if "autostart" in self.options:
            table["autostart"] = bool(self.take("autostart"))
            unit.map("autostart", "autostart")
        if self.jlist and self.options.get("status") == "stopped":
            table["autostart"] = False
            unit.map("status: stopped", "autostart = false (pm2 resurrect leaves it stopped)")
        restarts = self.take("max_restarts")
        count = 16 if restarts is None else restarts
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= _MAX_COUNT:
            raise ImportFailed(
                f"{self.where} max_restarts: expected a whole number from 0 to {_MAX_COUNT}"
            )
        table["give_up_after"] = max(count, 1)
        unit.map(
            "max_restarts" if restarts is not None else "(pm2's default max_restarts: 16)",
            "give_up_after",
        )
        self.generic.append(
            "pm2 counts unstable restarts (exits within min_uptime) soon after the "
            "start; give_up_after counts failed starts in a row"
        )
        uptime = self.take("min_uptime")
        if uptime is not None:
            table["start_seconds"] = _ms(uptime, f"{self.where} min_uptime")
            unit.map("min_uptime", "start_seconds")
        delay = self.take("restart_delay")
        exp = self.take("exp_backoff_restart_delay")
        if exp is not None:
            initial = _ms(exp, f"{self.where} exp_backoff_restart_delay")
            table["backoff"] = {
                "initial": initial,
                "max": initial if isinstance(exp, (int, float)) and exp > 15000 else "15s",
                "multiplier": 1.5,
                "jitter": 0.0,
                "reset_after": "30s",
            }
            unit.map(
                "exp_backoff_restart_delay", "backoff (pm2: x1.5 up to 15 s, reset after 30 s up)"
            )
            if delay is not None:
                unit.skip(f"restart_delay={delay}", "exp_backoff_restart_delay wins, as in pm2")
        elif delay is not None:
            fixed = _ms(delay, f"{self.where} restart_delay")
            table["backoff"] = {"initial": fixed, "max": fixed, "multiplier": 1.0, "jitter": 0.0}
            unit.map("restart_delay", "backoff (a fixed delay)")
        else:
            self.generic.append(
                "pm2 restarts an app without restart_delay at once; hostvisor waits "
                "[backoff] (1 s doubling to 30 s) before each restart"
            )

    def _stop(self) -> None:
        unit, table = self.unit, self.unit.table
        table["stop_signal"] = "SIGINT"
        unit.map("(pm2 stops apps with SIGINT)", "stop_signal")
        timeout = self.take("kill_timeout")
        table["stop_timeout"] = _ms(
            1600 if timeout is None else timeout, f"{self.where} kill_timeout"
        )
        unit.map(
            "kill_timeout" if timeout is not None else "(pm2's default kill_timeout: 1600 ms)",
            "stop_timeout",
        )
        if "treekill" in self.options and not self.jlist:
            if self.take("treekill") is False:
                unit.skip("treekill: false", "hostvisor signals the whole process group")
            else:
                unit.map("treekill", "(hostvisor signals the whole process group)")

    def _memory(self) -> None:
        value = self.take("max_memory_restart")
        if value is None:
            return
        text = str(value).strip()
        match = _SIZE.match(text)
        if match is None or isinstance(value, bool):
            raise ImportFailed(f"{self.where} max_memory_restart: {value!r} is not a size (300M)")
        number, suffix = match.groups()
        if float(number) * 1024 ** " KMG".index(suffix or " ") > _MAX_BYTES:
            raise ImportFailed(f"{self.where} max_memory_restart: {text[:20]} is more than 1 PiB")
        size: Any = f"{number}{suffix}iB" if suffix else int(float(number))
        self.unit.table["max_memory"] = size
        self.unit.map("max_memory_restart", "max_memory (K, M, G: 1024, as pm2)")

    def _scale(self) -> None:
        instances = self.take("instances")
        mode = self.take("exec_mode")
        if instances not in (None, 1, "1"):
            self.unit.skip(
                f"instances={instances}",
                "hostvisor runs one process per unit: copy "
                "the unit per instance, each with its own port",
            )
        if isinstance(mode, str) and mode.startswith("cluster"):
            self.unit.skip(
                f"exec_mode={mode}",
                "pm2's cluster mode shares one port among node "
                "workers through pm2; hostvisor has no such balancer: use node:cluster "
                "in the app, or one unit per instance on its own port",
            )

    def _rest(self) -> None:
        """Every option not read yet: not mapped, one line per reason."""
        by_reason: dict[str, list[str]] = {}
        state = []
        env = self.options.get("env")
        for key, value in self.options.items():
            if key in self.done:
                continue
            if self.jlist and (key in _STATE or key.startswith(("axm_", "_"))):
                state.append(key)
            elif self.jlist and isinstance(env, dict) and key in env:
                continue  # pm2 copies the env into pm2_env: read from pm2_env.env
            else:
                why = _NOT_MAPPED.get(key, _UNKNOWN)
                by_reason.setdefault(why, []).append(f"{key}={json.dumps(value)[:60]}")
        for why, settings in by_reason.items():
            self.unit.skip(", ".join(settings), why)
        if state:
            self.unit.skip(
                f"pm2_env {', '.join(sorted(state))}", "pm2's runtime state, not settings"
            )
