"""The syntax of systemd unit files, for ``hostvisor import systemd``.

- :class:`UnitFile`: sections and keys as systemd.syntax(7) reads them: ``[Section]``,
  ``Key=value`` (whitespace around both stripped), ``#`` and ``;`` comment lines (also
  inside a continuation), a line ending in ``\\`` continued on the next (the backslash
  becomes a space), repeated keys accumulate, an empty assignment resets the list.
- :class:`UnitName` and :class:`Specifiers`: a unit's name parts and the systemd.unit(5)
  specifiers import can resolve (``%h %u %U %i %I %n %N %p %P %j %J %f %t %S %C %E %L
  %D %T %V %y %Y %g %G %s %%``); the ones that are host or boot state (``%b %m %H``...)
  are refused, as is ``%i`` of a template file without an instance.
- :func:`split_words` and :func:`parse_command`: systemd's quoting (systemd.service(5)
  "Command lines", ``extract_first_word()``): words split at whitespace, ``"..."`` and
  ``'...'`` anywhere in a word, C escapes (``\\n \\t \\s \\xNN \\uNNNN`` ...) inside
  quotes too, an unknown escape kept as written; the prefixes ``- @ : + ! !!``.
- :func:`expand_variables`: ``$NAME``/``${NAME}`` of a command line (systemd.service(5)),
  substituted from ``Environment=``, or left to a ``/bin/sh`` at run time.
- :func:`memory_size`: a ``MemoryMax=`` size (``4G``: powers of 1024) as hostvisor's.
- :func:`reason_for`: why a key that import does not map is not mapped.
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.importers import ImportContext, ImportFailed, read_source, unit_name

__all__ = [
    "Command",
    "NoInstance",
    "Specifiers",
    "UnitFile",
    "UnitName",
    "Unresolved",
    "expand_variables",
    "memory_size",
    "parse_command",
    "read_unit",
    "reason_for",
    "split_name",
    "split_words",
]

_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}
_HEX = {"x": 2, "u": 4, "U": 8}
_WHOLE_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_BRACED_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Unresolved(ValueError):
    """A specifier import cannot resolve (or a value it cannot read); says why."""


class NoInstance(Unresolved):
    """``%i`` (``%I``, ``%f``) of a template file that has no instance."""


# ---------------------------------------------------------------- the file


@dataclass(slots=True)
class Key:
    """One key of a section: its values after resets, the line of its last assignment,
    how many assignments there were."""

    values: list[str]
    line: int
    count: int = 1


class UnitFile:
    """The sections of a unit file and its drop-ins (module docstring); ``stray`` holds
    the lines systemd ignores (``(where, why)``)."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Key]] = {}
        self.stray: list[tuple[str, str]] = []

    def feed(self, text: str, where: str = "") -> None:
        """Read one file's text; a later file's assignments come after (drop-ins).

        Raises:
            ImportFailed: a section header that is not ``[Name]`` (the line).
        """
        section: str | None = None
        pending, first = "", 0
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if (not line and not pending) or line[:1] in ("#", ";"):
                continue
            if line.endswith("\\"):
                pending, first = pending + line[:-1] + " ", first or number
                continue
            line, pending, at, first = pending + line, "", first or number, 0
            if line.startswith("["):
                if not line.endswith("]") or len(line) < 3:
                    raise ImportFailed(f"{where}line {at}: a section header must be [Name]")
                section = line[1:-1]
                self.sections.setdefault(section, {})
                continue
            key, sep, value = line.partition("=")
            if not sep or section is None:
                why = "not a Key=value line" if not sep else "an assignment outside a section"
                self.stray.append((f"{where}line {at}", f"{why}; systemd ignores it too"))
                continue
            self._assign(section, key.strip(), value.strip(), at)

    def _assign(self, section: str, key: str, value: str, line: int) -> None:
        keys = self.sections[section]
        if key not in keys:
            keys[key] = Key([value] if value else [], line)
            return
        entry = keys[key]
        entry.values = [*entry.values, value] if value else []
        entry.line, entry.count = line, entry.count + 1

    def all(self, section: str, key: str) -> list[str]:
        """Every value of a list setting (after resets)."""
        entry = self.sections.get(section, {}).get(key)
        return list(entry.values) if entry else []

    def last(self, section: str, key: str) -> str | None:
        """The value of a single-valued setting (the last assignment wins), or None."""
        values = self.all(section, key)
        return values[-1] if values else None


def read_unit(path: Path | None, name: UnitName, text: str, notes: list[str]) -> UnitFile:
    """The unit file's ``text``, then the drop-ins beside ``path`` (``NAME.d/*.conf``; for
    an instance, the template's ``prefix@.service.d`` first) in name order, as systemd
    reads them; a note for each folder read goes to ``notes``.

    Raises:
        ImportFailed: a drop-in that cannot be read, or a bad section header.
    """
    unit = UnitFile()
    unit.feed(text)
    if path is None:
        return unit
    folders = [path.parent / f"{name.full}.d"]
    if name.instance:
        folders.insert(0, path.parent / f"{name.prefix}@{name.suffix}.d")
    for folder in folders:
        try:
            confs = sorted(p for p in folder.iterdir() if p.suffix == ".conf")
        except OSError:
            continue
        for conf in confs:
            try:
                unit.feed(read_source(conf).text, f"{conf.name}: ")
            except ImportFailed as exc:
                raise ImportFailed(f"drop-in {conf}: {exc}") from None
        if confs:
            notes.append(f"read the drop-ins in {folder}: {', '.join(c.name for c in confs)}")
    return unit


# ---------------------------------------------------------------- names and specifiers


@dataclass(frozen=True, slots=True)
class UnitName:
    """``llama-server@coder.service``: prefix ``llama-server``, instance ``coder``
    (``""`` for a template without one, ``None`` for a plain unit), suffix ``.service``."""

    prefix: str
    instance: str | None
    suffix: str

    @property
    def full(self) -> str:
        """The unit name systemd uses."""
        middle = "" if self.instance is None else f"@{self.instance}"
        return f"{self.prefix}{middle}{self.suffix}"

    @property
    def unit(self) -> str:
        """The hostvisor name: ``llama-server-coder``; a bare template ``llama-server``."""
        return unit_name(f"{self.prefix}@{self.instance}" if self.instance else self.prefix)

    def with_suffix(self, suffix: str) -> UnitName:
        """The same name with another type (``.timer`` -> ``.service``)."""
        return UnitName(self.prefix, self.instance, suffix)


def split_name(full: str) -> UnitName:
    """A unit file name's parts; a name without a type is a ``.service``."""
    stem, dot, suffix = full.rpartition(".")
    if not dot or not stem:
        stem, suffix = full, "service"
    prefix, at, instance = stem.partition("@")
    return UnitName(prefix, instance if at else None, f".{suffix}")


def _unescape_name(text: str) -> str:
    """systemd-escape(1) undone: ``-`` is ``/``, ``\\xNN`` a byte."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m[1], 16)), text.replace("-", "/"))


class Specifiers:
    """The specifiers of one unit (module docstring): from its name and file, and from
    the context (home, user, the XDG folders of ``ctx.environ``)."""

    def __init__(self, name: UnitName, path: Path | None, ctx: ImportContext) -> None:
        import pwd

        env, home = ctx.environ, str(ctx.home)
        try:
            record: Any = pwd.getpwnam(ctx.user)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            record = None
        state = env.get("XDG_STATE_HOME") or f"{home}/.local/state"
        uid = str(record.pw_uid) if record else None
        inst = name.instance
        tail = name.prefix.rpartition("-")[2]
        self.template = inst == ""
        self.values: dict[str, str | None] = {
            "n": name.full, "N": name.full.removesuffix(name.suffix), "p": name.prefix,
            "P": _unescape_name(name.prefix), "j": tail, "J": _unescape_name(tail),
            "i": inst or (None if self.template else ""),
            "I": _unescape_name(inst) if inst else (None if self.template else ""),
            "f": None if self.template else "/" + _unescape_name(inst or name.prefix),
            "h": home, "u": ctx.user, "U": uid, "g": _group(record),
            "G": str(record.pw_gid) if record else None, "s": record.pw_shell if record else None,
            "t": env.get("XDG_RUNTIME_DIR") or (f"/run/user/{uid}" if uid else None),
            "S": state, "L": f"{state}/log", "C": env.get("XDG_CACHE_HOME") or f"{home}/.cache",
            "E": env.get("XDG_CONFIG_HOME") or f"{home}/.config",
            "D": env.get("XDG_DATA_HOME") or f"{home}/.local/share",
            "T": env.get("TMPDIR") or "/tmp", "V": env.get("TMPDIR") or "/var/tmp",
            "H": socket.gethostname(), "l": socket.gethostname().split(".")[0],
            "y": str(path.absolute()) if path else None,
            "Y": str(path.absolute().parent) if path else None, "%": "%",
        }  # fmt: skip

    def expand(self, text: str) -> str:
        """``text`` with its specifiers resolved.

        Raises:
            Unresolved: a specifier import cannot resolve (the reason), or an unknown one.
        """

        def one(match: re.Match[str]) -> str:
            letter = match[1]
            value = self.values.get(letter)
            if value is not None:
                return value
            if letter in "iIf" and self.template:
                raise NoInstance(
                    f"%{letter} is the instance, and a template file has none: import an "
                    "instance (NAME@INSTANCE.service, such as its link in "
                    "default.target.wants/), or set DefaultInstance= in [Install]"
                )
            if letter in "abBmMoqvwAWd":
                raise Unresolved(
                    f"%{letter} is host or boot state that import does not "
                    "resolve; write the value out"
                )
            raise Unresolved(f"%{letter} is not a specifier import can resolve")

        if re.search(r"(?<!%)(%%)*%$", text):
            raise Unresolved("a lone % at the end (write %% for a %)")
        return re.sub(r"%(.)", one, text)


def _group(record: Any) -> str | None:
    import grp

    try:
        return grp.getgrgid(record.pw_gid).gr_name if record else None
    except KeyError:
        return None


# ---------------------------------------------------------------- command lines


def _escape(text: str, i: int) -> tuple[str, int]:
    """The character(s) of the escape at ``text[i]`` (a backslash) and the next index."""
    nxt = text[i + 1 : i + 2]
    if nxt in _ESCAPES:
        return _ESCAPES[nxt], i + 2
    if nxt in _HEX:
        digits = text[i + 2 : i + 2 + _HEX[nxt]]
        if len(digits) == _HEX[nxt] and all(c in "0123456789abcdefABCDEF" for c in digits):
            return chr(int(digits, 16)), i + 2 + len(digits)
    elif len(octal := text[i + 1 : i + 4]) == 3 and all(c in "01234567" for c in octal):
        return chr(int(octal, 8)), i + 4
    return "\\" + nxt, i + 1 + len(nxt)  # systemd keeps an unknown escape as written


def split_words(text: str) -> list[str]:
    """Words as systemd's ``extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)``
    splits them (module docstring).

    Raises:
        ValueError: an unbalanced quote.
    """
    words: list[str] = []
    word: str | None = None
    quote, i = "", 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            piece, i = _escape(text, i)
            word = (word or "") + piece
            continue
        if quote:
            word = (word or "") + ("" if char == quote else char)
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote, word = char, word or ""
        elif char.isspace():
            if word is not None:
                words.append(word)
            word = None
        else:
            word = (word or "") + char
        i += 1
    if quote:
        raise ValueError(f"unbalanced {quote} quote")
    if word is not None:
        words.append(word)
    return words


@dataclass(frozen=True, slots=True)
class Command:
    """One ``Exec*=`` command line.

    Attributes:
        words: the argv words, unquoted; variable references still in them.
        prefixes: the prefix characters, as written (``"-"``, ``"@"``, ``"!!"``...).
        argv0: with ``@``: the argv[0] the program was to see.
    """

    words: list[str]
    prefixes: str
    argv0: str | None

    @property
    def ignore_failure(self) -> bool:
        """``-``: a failure is recorded but counts as success."""
        return "-" in self.prefixes

    @property
    def literal(self) -> bool:
        """``:``: no environment variable substitution."""
        return ":" in self.prefixes

    def resolved(self, spec: Specifiers) -> Command:
        """The command with the specifiers of each word resolved, after the split, as
        systemd does (systemd.service(5) "Command lines"): a resolved value with spaces or
        quotes stays one word.

        Raises:
            Unresolved: a specifier import cannot resolve (:meth:`Specifiers.expand`).
        """
        argv0 = None if self.argv0 is None else spec.expand(self.argv0)
        return Command([spec.expand(w) for w in self.words], self.prefixes, argv0)


def parse_command(text: str) -> Command:
    """An ``Exec*=`` value as a :class:`Command`, split before its specifiers are
    resolved (:meth:`Command.resolved`), as systemd splits it.

    Raises:
        ValueError: unbalanced quotes, a repeated prefix, or no program.
    """
    words = split_words(text)
    if not words:
        raise ValueError("empty command")
    head = words[0]
    match = re.match(r"[-@:+!]*", head)
    prefixes = match[0] if match else ""
    counts = {c: prefixes.count(c) for c in set(prefixes)}
    if (
        any(n > 1 for c, n in counts.items() if c != "!")
        or counts.get("!", 0) > 2
        or ("+" in prefixes and "!" in prefixes)
    ):
        raise ValueError(f"the prefixes {prefixes!r}: each at most once, '+' or '!' or '!!'")
    rest = [head[len(prefixes) :], *words[1:]] if head[len(prefixes) :] else words[1:]
    argv0 = None
    if "@" in prefixes:
        if len(rest) < 2:
            raise ValueError("'@' needs the program and then its argv[0]")
        argv0 = rest.pop(1)
    if not rest:
        raise ValueError("no program after the prefixes")
    return Command(words=rest, prefixes=prefixes, argv0=argv0)


def expand_variables(
    command: Command, env: dict[str, str]
) -> tuple[list[str], str, set[str], set[str]]:
    """A command with its variables (systemd.service(5)): ``$NAME`` as a whole word is
    split at whitespace, ``${NAME}`` is one value, ``$$`` a ``$``; ``:`` substitutes none.

    Returns:
        ``(argv, shell words, names substituted from env, names left to the shell)``:
        ``argv`` is valid only when no name is left to the shell.
    """
    argv: list[str] = []
    shell: list[str] = []
    used: set[str] = set()
    later: set[str] = set()
    for word in command.words:
        whole = None if command.literal else _WHOLE_VAR.fullmatch(word)
        if whole and whole[1] in env:
            parts = split_words(env[whole[1]])
            argv += parts
            shell += [shlex.quote(p) for p in parts]
            used.add(whole[1])
            continue
        if whole:
            later.add(whole[1])
            shell.append(f"${whole[1]}")
            continue
        plain: list[str] = []
        quoted: list[str] = []
        position = 0
        for match in [] if command.literal else _BRACED_VAR.finditer(word):
            text = word[position : match.start()]
            plain.append(text)
            quoted.append(shlex.quote(text) if text else "")
            position = match.end()
            if match[0] == "$$":
                plain.append("$")
                quoted.append("'$'")
            elif match[1] in env:
                plain.append(env[match[1]])
                quoted.append(shlex.quote(env[match[1]]))
                used.add(match[1])
            else:
                later.add(match[1])
                quoted.append(f'"${{{match[1]}}}"')
        rest = word[position:]
        argv.append("".join(plain) + rest)
        shell.append("".join(quoted) + (shlex.quote(rest) if rest else "") or "''")
    return argv, " ".join(shell), used, later


def memory_size(text: str) -> str | int | None:
    """A systemd size (``2G``, ``512M``, bytes; K/M/G/T are powers of 1024) as
    hostvisor's (``"2GiB"``), or None for what hostvisor cannot take."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)", text.strip())
    if match is None:
        return None
    number, unit = int(match[1]), match[2]
    size = number * 1024 ** "_KMGT".index(unit or "_")
    if not 1024**2 <= size <= 1024**4:
        return None  # hostvisor's max_memory: 1 MiB to 1 TiB
    return f"{number}{unit}iB" if unit else number


# ---------------------------------------------------------------- what is not mapped


_OWN_USER = "hostvisor runs every unit as the daemon's own user"
_REASONS: tuple[tuple[str, str], ...] = (
    (r"User|Group|DynamicUser|SupplementaryGroups|PAMName", _OWN_USER),
    (r"Standard(Input|Output|Error)\w*|Syslog\w*|Log(LevelMax|ExtraFields|RateLimit\w*|"
     r"FilterPatterns|Namespace)|TTY\w*",
     "hostvisor writes stdout and stderr to <state>/logs/<name>.log (rotated); stdin is "
     "/dev/null"),
    (r"Limit[A-Z]+", "hostvisor sets no rlimits: a child gets the daemon's (RLIMIT_NOFILE: "
     "the soft limit the daemon started with)"),
    (r"Nice|CPUScheduling\w*|CPUAffinity|NUMA\w*|IOScheduling\w*|OOMScoreAdjust|"
     r"CoredumpFilter|TimerSlackNSec|Personality|UMask|Environment(Files)?FromCredential",
     "hostvisor sets no process attributes: a child inherits the daemon's"),
    (r"(Runtime|State|Cache|Logs|Configuration)Directory(Mode|Preserve)?",
     "hostvisor creates no folders for a unit: create it once yourself"),
    (r"Protect\w+|Private\w+|NoNewPrivileges|(ReadWrite|ReadOnly|Inaccessible|Exec|NoExec)"
     r"Paths|Capability\w*|AmbientCapabilities|SystemCall\w+|Restrict\w+|LockPersonality|"
     r"MemoryDenyWriteExecute|Root\w+|Bind(ReadOnly)?Paths|TemporaryFileSystem|MountAPIVFS|"
     r"MountFlags|KeyringMode|SecureBits|SELinuxContext\w*|AppArmorProfile|Smack\w+|"
     r"NetworkNamespacePath|IPCNamespacePath|RemoveIPC|DevicePolicy|DeviceAllow|ProcSubset|"
     r"MountImages|Extension\w+|IgnoreSIGPIPE|SetLoginEnvironment",
     "hostvisor applies no sandboxing"),
    (r"CPU(Quota\w*|Weight|Shares|Accounting)|StartupCPU\w*|Memory(High|Low|Min|Swap\w*|"
     r"Zswap\w*|Accounting|Pressure\w*)|StartupMemory\w*|IO\w+|StartupIO\w*|BlockIO\w*|"
     r"Tasks\w*|Slice|Delegate\w*|IPAddress\w*|IP(Ingress|Egress)\w*|ManagedOOM\w*|"
     r"(Startup)?Allowed(CPUs|MemoryNodes)|Socket(Bind)?\w*|DisableControllers|"
     r"DevicePolicy|CoredumpReceive",
     "hostvisor applies no cgroup resource control (max_memory restarts a service over a "
     "memory limit)"),
    (r"(Load|Set|Import)Credential\w*", "hostvisor has no credentials: put secrets in a "
     "secret_env_files file"),
    (r"PassEnvironment", "a child gets the daemon's whole environment anyway"),
    (r"UnsetEnvironment", "hostvisor unsets no inherited variable (but its own NOTIFY_SOCKET"
     " & co.)"),
    (r"ExecStop(Post)?", "hostvisor stops with stop_signal, then SIGKILL after stop_timeout; "
     "it runs no stop command"),
    (r"ExecReload|ReloadSignal", "hostvisor has no reload command: `hostvisor signal NAME "
     "HUP` sends a signal"),
    (r"ExecCondition", "hostvisor has no start condition; a [preflight] command (exit 0 = "
     "go) comes closest"),
    (r"PIDFile|GuessMainPID", "hostvisor supervises the process it spawns: it reads no PID "
     "file"),
    (r"BusName|NotifyAccess|FileDescriptorStore\w*|Sockets|USBFunction\w*|NonBlocking|"
     r"OpenFile", "hostvisor offers no sd_notify, D-Bus, socket or fd-store protocol to a "
     "child"),
    (r"Watchdog(Sec|Signal)", "hostvisor has no watchdog: a [health] probe restarts a stuck "
     "service"),
    (r"SuccessExitStatus|RestartPreventExitStatus|RestartForceExitStatus|RestartMode",
     "hostvisor counts exit 0 alone as a success"),
    (r"RemainAfterExit", 'a hostvisor one-shot stays `exited` after its run; depends_on = '
     '{ x = "completed" } waits for it'),
    (r"Timeout(Abort|StartFailureMode|StopFailureMode)|RuntimeRandomizedExtraSec|OOMPolicy|"
     r"ExitType|FinalKillSignal|SendSIGKILL|SendSIGHUP|RestartKillSignal|"
     r"SurviveFinalKillSignal", "hostvisor has no such setting: it stops with stop_signal, "
     "then SIGKILLs the process group after stop_timeout"),
    (r"StartLimit\w+", "hostvisor counts failed starts in a row (give_up_after), not starts "
     "per interval"),
    (r"Condition\w+|Assert\w+", "hostvisor checks no start condition; a [preflight] command "
     "(exit 0 = go) can"),
    (r"Documentation|SourcePath|Alias|Also", "for people and systemctl; not carried over"),
    (r"Before", "hostvisor orders by depends_on, set on the later unit: add it there"),
    (r"After|Requires|Wants|BindsTo|Requisite", "a timer's own dependencies: hostvisor "
     "orders the job by its service's depends_on"),
    (r"OnFailure|OnSuccess", "starts another unit; hostvisor's [on_failure] runs a command: "
     "set [on_failure] command to what that unit runs"),
    (r"Conflicts|PartOf|Upholds|PropagatesReloadTo|ReloadPropagatedFrom|PropagatesStopTo|"
     r"StopPropagatedFrom|JoinsNamespaceOf|RequiresMountsFor|WantsMountsFor|"
     r"(OnSuccess|OnFailure)JobMode|StopWhenUnneeded|RefuseManual(Start|Stop)|AllowIsolate|"
     r"IgnoreOnIsolate|DefaultDependencies|CollectMode|JobTimeout\w*|JobRunningTimeoutSec|"
     r"(Success|Failure)Action\w*|RebootArgument|UpheldBy",
     "hostvisor has no relation between units but depends_on"),
    (r"AccuracySec", "systemd may delay a trigger by up to this much to group wake-ups; "
     "hostvisor runs a job at its trigger time"),
    (r"FixedRandomDelay|OnClockChange|OnTimezoneChange|WakeSystem|RemainAfterElapse|"
     r"DeferReactivation", "hostvisor's scheduled units have no such setting"),
)  # fmt: skip
_COMPILED = tuple((re.compile(pattern), reason) for pattern, reason in _REASONS)


def reason_for(key: str) -> str:
    """Why the unit-file key ``key`` is not mapped (``"not known to hostvisor import"``
    for a key none of the tables above names)."""
    if key.startswith("X-"):
        return "an X- extension key; systemd ignores it too"
    for pattern, reason in _COMPILED:
        if pattern.fullmatch(key):
            return reason
    return "not known to hostvisor import"
