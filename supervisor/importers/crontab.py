"""``hostvisor import crontab``: a crontab as ``crontab -l`` prints it (crontab(5)), or a
system crontab (``/etc/crontab``, ``/etc/cron.d/*``, with a user column).

Each job line is a scheduled unit: ``schedule`` is the five time fields as written, or
the macro (``@hourly`` ... ``@annually``); ``@reboot`` is a one-shot (``restart = "no"``,
run once at every daemon start). The command is read as cron reads it:

- ``%`` (crontab(5)): the first unescaped ``%`` ends the command, the rest is its
  standard input with each further ``%`` a newline; ``\\%`` is a literal ``%``. Standard
  input is fed through the shell (``printf %s DATA | ( CMD )``) and the report says so.
- A leading ``cd DIR &&`` is ``workdir`` (DIR split as the shell does; a relative DIR is
  under ``$HOME``, where cron runs jobs); without one, ``workdir`` is the crontab's
  ``HOME``, else ``~``: cron starts every job in the home folder.
- A trailing output redirection to ``/dev/null`` or to a log file (``>> x.log 2>&1``) is
  dropped: hostvisor keeps each job's stdout and stderr in ``logs/<unit>.log``. One to
  any other file (``> /backups/db.sql``) may be the job's product: it is kept.
- The rest is split into argv (:func:`~supervisor.importers.command_argv`): no shell
  unless the command needs one, then ``[SHELL, "-c", CMD]`` (``SHELL`` from the crontab,
  else ``/bin/sh`` as cron uses) and a note saying why.

Environment lines (``NAME = value``, a value in matching quotes keeps its blanks; no
expansion, as cron does none) apply to the jobs after them: most go to ``env``;
``SHELL`` is also the shell used; ``CRON_TZ`` (cronie) is ``schedule_timezone``, while
``TZ`` stays the jobs' environment (cronie and Vixie cron schedule in the host's zone);
``RANDOM_DELAY`` (cronie, minutes) is ``random_delay``; ``MAILTO``/``MAILFROM`` are not
mapped (hostvisor sends no mail; ``[on_failure]`` runs a command on a failed run).

Unit names come from the command: a script's stem (``python scripts/claim-task.py`` ->
``claim-task``), a ``-m`` module, else the program's basename.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

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

_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_ENV_LINE = re.compile(r"""^\s*("[^"]*"|'[^']*'|[^\s="']+)\s*=(.*)$""")
_NOT_NAME = re.compile(r"[\d*@-]")
_COMMENTED_OUT = re.compile(r"^([\d*@]|[A-Za-z_]\w*\s*=)")
#: A leading ``cd DIR &&``: DIR is one shell word (quotes and backslashes allowed).
_CD = re.compile(
    r"""^\s*cd\s+((?:[^\s'"\\;&|<>()]|\\.|'[^']*'|"(?:[^"\\]|\\.)*")+)\s*&&\s*(.*)$""",
    re.DOTALL,
)
#: One output redirection: ``[fd|&]>[>] target``; target a dup (``&1``) or one plain word.
_REDIRECT = re.compile(
    r"""\s*(?P<fd>[12&]?)(?P<op>>>?)\s*(?P<target>&[12]|'[^']*'|"[^"\\$`]*"|[^\s'"\\;&|<>()$`*?{}]+)"""
)
_INTERPRETER = re.compile(
    r"^(python[\d.]*|pypy[\d.]*|node|nodejs|bun|deno|ruby|perl|php[\d.]*|bash|sh|dash|zsh|"
    r"ksh|lua[\d.]*|Rscript|tclsh)$"
)
_SCRIPT_SUFFIXES = frozenset(
    {".py", ".sh", ".bash", ".zsh", ".rb", ".pl", ".js", ".mjs", ".cjs", ".ts", ".php", ".lua"}
)
#: Shell words that start a segment but name nothing (``cd /x && ...``).
_NOT_THE_JOB = frozenset(
    {"cd", "source", ".", "export", "set", "test", "[", "true", ":", "umask", "sleep"}
)
_WRAPPERS = frozenset({"exec", "nice", "nohup", "time", "env", "ionice", "chronic"})
_NOT_MAPPED_VARS = {
    "MAILTO": "hostvisor sends no mail: a failed run is a hostvisor.job.failed event; set "
    "[on_failure] command to be told (e.g. a script that mails), output is in logs/<unit>.log",
    "MAILFROM": "hostvisor sends no mail (see MAILTO)",
    "CONTENT_TYPE": "hostvisor sends no mail (see MAILTO)",
    "CONTENT_TRANSFER_ENCODING": "hostvisor sends no mail (see MAILTO)",
}


@dataclass(slots=True)
class _Env:
    """The environment lines read so far (they apply to the jobs after them)."""

    env: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (line, value)
    shell: tuple[int, str] | None = None
    timezone: tuple[int, str] | None = None
    bad_timezone: tuple[int, str, str] | None = None  # line, value, why
    random_delay: tuple[int, str] | None = None


def convert(source: Source, ctx: ImportContext) -> FileResult:
    """Every job line of the crontab ``source`` (module docstring).

    Raises:
        ImportFailed: no job line could be converted (the lines not mapped say why).
    """
    result = FileResult()
    lines = source.text.splitlines()
    system = _is_system(source, lines)
    if system:
        result.notes.append(
            "a system crontab (a user column): hostvisor runs every unit as its own user "
            f"({ctx.user}); the user of each line is reported per unit"
        )
    state = _Env()
    comment = ""
    jobs = 0
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            comment = ""
            continue
        if line.startswith("#"):
            comment = line.lstrip("#").strip()
            if _COMMENTED_OUT.match(comment):
                comment = ""  # a job or setting commented out, or a column legend
            continue
        setting = _env_line(line)
        if setting is not None:
            _apply_env(number, *setting, state, result)
            comment = ""
            continue
        jobs += 1
        try:
            unit = _job(number, line, comment, state, ctx, system=system)
        except ImportFailed as exc:
            result.unmapped.append((f"line {number}", str(exc)))
        else:
            result.units.append(unit)
        comment = ""
    if not result.units:
        why = "no job line found" if not jobs else "no job line could be converted"
        details = "; ".join(f"{where}: {reason}" for where, reason in result.unmapped[-3:])
        raise ImportFailed(f"{why}{f' ({details})' if details and jobs else ''}")
    result.notes.append(
        "cron starts a run even while the previous one still runs; the units keep hostvisor's "
        'concurrency = "forbid" (a trigger during a run is skipped, a hostvisor.job.skipped '
        'event): set concurrency = "allow" for cron\'s behaviour'
    )
    if not any("PATH" in unit.table.get("env", {}) for unit in result.units):
        result.notes.append(
            "cron runs jobs with PATH=/usr/bin:/bin unless the crontab sets PATH; hostvisor "
            "passes the daemon's environment (its PATH) to each run"
        )
    return result


def _is_system(source: Source, lines: list[str]) -> bool:
    """``/etc/crontab`` or ``/etc/cron.d/*``, or every job line's sixth field a user of
    this host (and the command after it)."""
    if source.label != "<stdin>":
        path = os.path.abspath(source.path)
        if path == "/etc/crontab" or path.startswith("/etc/cron.d/"):
            return True
    import pwd

    users = 0
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#") or _env_line(line) is not None:
            continue
        words = line.split()
        at = 1 if words[0].startswith("@") else 5
        if len(words) <= at + 1:
            return False
        try:
            pwd.getpwnam(words[at])
        except (KeyError, ValueError):  # ValueError: a NUL in the word
            return False
        users += 1
    return users > 0


def _env_line(line: str) -> tuple[str, str] | None:
    """``(name, value)`` of an environment line (crontab(5): ``name = value``, either in
    matching quotes), or None for a job line."""
    match = _ENV_LINE.match(line)
    if match is None:
        return None
    name, value = match.group(1), match.group(2).strip()
    if name[:1] in "\"'":
        name = name[1:-1]
    elif _NOT_NAME.match(name):
        return None  # "*/5" or "0" starts a job line, never a name
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return name, value


def _apply_env(number: int, name: str, value: str, state: _Env, result: FileResult) -> None:
    where = f"line {number} {name}={value}"
    if name in _NOT_MAPPED_VARS:
        result.unmapped.append((where, _NOT_MAPPED_VARS[name]))
        return
    if name == "CRON_TZ":
        from supervisor.schedule import ScheduleError, check_timezone

        try:
            state.timezone, state.bad_timezone = (number, check_timezone(value)), None
        except ScheduleError as exc:
            state.timezone, state.bad_timezone = None, (number, value, str(exc))
            result.unmapped.append((where, f"{exc}; the jobs after it use the host's zone"))
        return
    if name == "RANDOM_DELAY":
        if not value.isdigit():
            result.unmapped.append((where, "not a whole number of minutes (cronie)"))
            return
        state.random_delay = (number, f"{int(value)}m")
        return
    if name == "SHELL":
        state.shell = (number, value)
    state.env[name] = (number, value)


def _job(
    number: int, line: str, comment: str, state: _Env, ctx: ImportContext, *, system: bool
) -> Converted:
    """The unit of one job line; ImportFailed (the reason) if it cannot be one."""
    if line.startswith("@"):
        schedule, *more = line.split(None, 1)
        rest = more[0] if more else ""
        if schedule != "@reboot" and schedule not in _MACROS:
            known = ", ".join(("@reboot", *_MACROS))
            raise ImportFailed(f"unknown macro {schedule!r} (crontab(5) knows {known})")
    else:
        fields = line.split(None, 5)
        if len(fields) < 6:
            raise ImportFailed("not a job line (five time fields and a command) nor NAME=value")
        schedule, rest = " ".join(fields[:5]), fields[5]
    if not rest.strip():
        raise ImportFailed(f"{schedule} has no command")
    user = None
    if system:
        split = rest.split(None, 1)
        if len(split) < 2:
            raise ImportFailed("a system crontab line needs a user and a command")
        user, rest = split
    text, stdin = _split_percent(rest)
    unit = Converted(original=f"line {number}", name="cron-job", table={})
    table = unit.table
    table["description"] = (comment or f"{text.strip()} (crontab)")[:200]
    if schedule == "@reboot":
        table["restart"] = "no"
        table["autostart"] = True
        unit.map("@reboot", 'restart = "no", autostart (a one-shot)')
        unit.notes.append(
            "@reboot runs when cron starts (at boot); this one-shot runs once at every "
            "daemon start, and on `hostvisor start`; if the command stays up (a server), "
            'make it a service instead: remove restart = "no" (it is then kept up)'
        )
    else:
        from supervisor.schedule import ScheduleError, check_cron

        try:
            table["schedule"] = check_cron(schedule)
        except ScheduleError as exc:
            raise ImportFailed(f"the schedule {schedule!r}: {exc}") from None
        unit.map(f"`{schedule}`", "schedule")
        _schedule_keys(unit, state)
    if user is not None:
        unit.skip(
            f"user {user}",
            f"hostvisor runs every unit as its own user ({ctx.user})"
            + ("" if user == ctx.user else f"; run this job under a hostvisor of {user}"),
        )
    workdir, text = _workdir(unit, text, state)
    table["workdir"] = workdir
    text = _redirections(unit, text)
    _command(unit, text, stdin, state)
    env = {name: value for name, (_, value) in state.env.items()}
    if env:
        table["env"] = env
        for name, (line_no, _) in state.env.items():
            unit.map(f"line {line_no} {name}=", f"env.{name}")
        if "TZ" in env and "schedule_timezone" not in table and "schedule" in table:
            unit.notes.append(
                f"TZ={env['TZ']} is the job's environment: cronie and Vixie cron read the "
                "schedule in the host's zone (or CRON_TZ's), and so does this unit; if your "
                f'cron read TZ for the schedule too, set schedule_timezone = "{env["TZ"]}"'
            )
        if any("$" in value for value in env.values()):
            unit.notes.append(
                "an environment line holds a '$': cron does not expand it, nor does hostvisor "
                "(the value is set as written)"
            )
    return unit


def _schedule_keys(unit: Converted, state: _Env) -> None:
    if state.timezone is not None:
        line_no, zone = state.timezone
        unit.table["schedule_timezone"] = zone
        unit.map(f"line {line_no} CRON_TZ=", "schedule_timezone")
    elif state.bad_timezone is not None:
        line_no, zone, _ = state.bad_timezone
        unit.notes.append(f"CRON_TZ={zone} (line {line_no}) is not a known zone: scheduled "
                          "in the host's zone")  # fmt: skip
    if state.random_delay is not None:
        line_no, delay = state.random_delay
        unit.table["random_delay"] = delay
        unit.map(f"line {line_no} RANDOM_DELAY=", "random_delay")
        unit.notes.append(
            "cronie picks one RANDOM_DELAY offset per daemon start; hostvisor draws a new "
            "random delay (0 .. random_delay) for each trigger"
        )


def _split_percent(text: str) -> tuple[str, str | None]:
    """The command and its standard input, as cron splits a command at ``%``
    (crontab(5), Vixie cron's do_command.c): ``\\%`` is ``%`` in the command; the first
    other ``%`` ends it; in the input, ``%`` is a newline and ``\\%`` a ``%``."""
    command: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and text[i + 1 : i + 2] == "%":
            command.append("%")
            i += 2
            continue
        if char == "%":
            break
        command.append(char)
        i += 1
    else:
        return "".join(command), None
    data: list[str] = []
    escaped = False
    for char in text[i + 1 :]:
        if escaped:
            data.append(char if char == "%" else "\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            data.append("\n" if char == "%" else char)
    if escaped:
        data.append("\\")
    return "".join(command), "".join(data)


def _workdir(unit: Converted, text: str, state: _Env) -> tuple[str, str]:
    """``(workdir, the command after a leading cd DIR &&)``."""
    home = state.env.get("HOME")
    base = home[1] if home else "~"
    match = _CD.match(text)
    if match is not None:
        word, rest = match.groups()
        tilde = "~" if word.startswith("~") else ""
        try:
            argv, shell = command_argv(word[len(tilde) :]) if word != "~" else ([""], None)
        except ImportFailed:
            argv, shell = [], "cannot be split"
        if shell is None and len(argv) == 1 and rest.strip():
            folder = tilde + argv[0]
            if not folder.startswith(("/", "~")):
                folder = f"{base.rstrip('/')}/{folder}"
            unit.map(f"cd {word} &&", "workdir")
            return folder, rest
    what = "the crontab's HOME" if home else "the home folder"
    unit.map(f"(no cd: cron runs jobs in {what})", "workdir")
    return base, text


def _redirections(unit: Converted, text: str) -> str:
    """The command without a trailing redirection of its output to /dev/null or a log
    file (noted); kept (noted) when it writes to any other file."""
    start = _trailing_redirect(text)
    if start is None:
        return text
    command, tail = text[:start].rstrip(), text[start:].strip()
    targets = [m.group("target") for m in _REDIRECT.finditer(tail)]
    files = [t.strip("'\"") for t in targets if not t.startswith("&")]
    if all(_is_log(path) for path in files):
        written = [f for f in files if f != "/dev/null"]
        also = f"; {', '.join(written)} is no longer written" if written else ""
        unit.skip(
            f"`{tail}`",
            "hostvisor keeps each run's stdout and stderr in logs/<unit>.log (rotated, "
            f"[logs]){also}",
        )
        return command
    unit.notes.append(
        f"kept the redirection `{tail}`: it writes a file that may be the job's product, "
        "not its log"
    )
    return text


def _trailing_redirect(text: str) -> int | None:
    """Where the trailing run of output redirections starts (outside quotes), if any."""
    quote = ""
    escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
            continue
        if char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ">" or (char in "12&" and text[i + 1 : i + 2] == ">"):
            if i == 0 or not text[i - 1].isspace() or (char == ">" and text[i - 1] in "12&"):
                continue
            if re.fullmatch(rf"(?:{_REDIRECT.pattern})+\s*", text[i:]):
                return i
    return None


def _is_log(path: str) -> bool:
    if path == "/dev/null":
        return True
    parts = path.split("/")
    return (
        path.endswith((".log", ".err", ".out"))
        or path.startswith("/var/log/")
        or any(part in ("log", "logs") for part in parts[:-1])
    )


def _command(unit: Converted, text: str, stdin: str | None, state: _Env) -> None:
    shell_path = state.shell[1] if state.shell else "/bin/sh"
    shell_name = f"{shell_path} -c" + (f" (line {state.shell[0]} SHELL=)" if state.shell else "")
    text = text.strip()
    if not text:
        raise ImportFailed("empty command")
    argv, why = command_argv(text)
    if stdin is not None:
        import shlex

        script = f"printf %s {shlex.quote(stdin)} | (\n{text}\n)"
        unit.table["command"] = [shell_path, "-c", script]
        unit.map(f"{_short(text)} % ...", "command (the text after % as its standard input)")
        unit.notes.append(
            f"runs through {shell_name}: the text after '%' is the command's standard "
            "input (crontab(5)), fed with printf"
        )
        unit.name = unit_name(_name_from_shell(text))
        return
    unit.map(_short(text), "command")
    if why is None:
        unit.table["command"] = argv
        unit.name = unit_name(_name_from_argv(argv))
        return
    unit.table["command"] = [shell_path, "-c", text]
    unit.notes.append(f"runs through {shell_name}: the command {why}")
    unit.name = unit_name(_name_from_shell(text))


def _short(text: str) -> str:
    return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"


def _name_from_argv(argv: list[str]) -> str:
    """A script's stem, a ``-m`` module, else the program's basename."""
    words = list(argv)
    while words and (words[0] in _WRAPPERS or re.match(r"^[A-Za-z_]\w*=", words[0])):
        words.pop(0)
    if not words:
        return "cron-job"
    program = os.path.basename(words[0]) or "cron-job"
    if not _INTERPRETER.match(program):
        return _stem(program)
    rest = words[1:]
    for i, word in enumerate(rest):
        if word == "-m" and i + 1 < len(rest):
            return rest[i + 1]
        if word in ("-c", "-e", "--eval"):
            return program
        if not word.startswith("-"):
            return _stem(os.path.basename(word))
    return program


def _stem(name: str) -> str:
    stem, suffix = os.path.splitext(name)
    return stem if suffix in _SCRIPT_SUFFIXES and stem else name


def _name_from_shell(text: str) -> str:
    """The name of the first command of a shell line that is not a ``cd`` or the like."""
    import shlex

    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        return "cron-job"
    segment: list[str] = []
    for word in [*words, ";"]:
        if word and all(char in "();<>|&" for char in word):
            while segment and segment[0] in ("{", "}", "!"):
                segment.pop(0)
            if segment and segment[0] not in _NOT_THE_JOB:
                return _name_from_argv(segment)
            segment = []
            continue
        segment.append(word)
    return "cron-job"
