"""The exception tree of hostvisor.

Every message says what is wrong and, where it can, what to change. Library
code raises these; only :mod:`supervisor.cli` turns them into exit codes and
lines on stderr.

::

    HostvisorError
    ├── ConfigError                 config.toml, a unit or an env file is invalid
    │     (carries every ConfigIssue found, not just the first)
    ├── StateError
    │     └── IllegalTransition     a state change the table does not allow
    ├── SpawnError                  a process could not be started (errno, path)
    ├── DriverError
    │     └── DockerUnavailable     the Docker engine does not answer
    ├── DaemonError
    │     ├── AlreadyRunning        another daemon holds the state folder's lock
    │     └── SocketPathError       the control socket path cannot be used
    └── ControlError                an error answered over the control socket
          ├── DaemonUnreachable     nothing answers on the socket
          ├── UnknownService        a name that is not a configured service
          ├── ConfigRejected        a reload failed validation
          └── PeerNotAllowed        the peer's uid is not allowed
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AlreadyRunning",
    "ConfigError",
    "ConfigIssue",
    "ConfigRejected",
    "ControlError",
    "DaemonError",
    "DaemonUnreachable",
    "DockerUnavailable",
    "DriverError",
    "HostvisorError",
    "IllegalTransition",
    "PeerNotAllowed",
    "SocketPathError",
    "SpawnError",
    "StateError",
    "UnknownService",
]


class HostvisorError(Exception):
    """Base of every error hostvisor raises on purpose."""


#: Control characters, line and paragraph separators, lone surrogates (undecodable file names).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _printable(text: str) -> str:
    """``text`` with what would break a line or a terminal escaped (``\\n``, ``\\x1b``)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in one file: printed as ``file: key: message``, on one line.

    Control characters of a file name, a key or a message are printed escaped
    (``\\n``), so that one issue is always one line of a terminal.

    Attributes:
        file: the path as the user would recognise it.
        key: the dotted key (``health.interval``), or ``""`` for the whole file.
        message: what is wrong and what is expected.
    """

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        if self.key:
            return _printable(f"{self.file}: {self.key}: {self.message}")
        return _printable(f"{self.file}: {self.message}")


class ConfigError(HostvisorError):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid configuration")


class StateError(HostvisorError):
    """Base of state-machine errors."""


class IllegalTransition(StateError):
    """A move between two states that the transition table does not allow."""

    def __init__(self, service: str, source: object, target: object) -> None:
        self.service = service
        self.source = source
        self.target = target
        super().__init__(f"{service}: illegal state transition {source} -> {target}")


class SpawnError(HostvisorError):
    """A process could not be started.

    Attributes:
        errno: the OS error number, or ``None``.
        path: the file the OS complained about (the program or the workdir).
    """

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        self.errno = errno
        self.path = path
        super().__init__(message)

    @classmethod
    def from_oserror(cls, exc: OSError, *, argv: Sequence[str], workdir: str) -> SpawnError:
        """Build a message that names the errno, its meaning and the path involved."""
        path = exc.filename if isinstance(exc.filename, str) else (argv[0] if argv else workdir)
        name = _errno.errorcode.get(exc.errno or 0, "E?")
        return cls(
            f"spawn failed: [{name}] {exc.strerror or exc}: {path}", errno=exc.errno, path=path
        )


class DriverError(HostvisorError):
    """A driver could not do what was asked."""


class DockerUnavailable(DriverError):
    """The Docker engine did not answer in time."""


class DaemonError(HostvisorError):
    """The daemon could not start or keep running."""


class AlreadyRunning(DaemonError):
    """Another daemon holds the lock of the same state folder."""

    def __init__(self, pid: int | None, lock_path: str) -> None:
        self.pid = pid
        self.lock_path = lock_path
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"already running ({who}); lock {lock_path}")


class SocketPathError(DaemonError):
    """The control socket path is unusable (too long, or not a socket)."""


class ControlError(HostvisorError):
    """An error answered over the control socket (JSON-RPC ``error``).

    Attributes:
        code: the JSON-RPC error code (contract section 8).
        data: the ``data`` member, if any.
    """

    code: int = -32000

    def __init__(self, message: str, *, code: int | None = None, data: object = None) -> None:
        if code is not None:
            self.code = code
        self.data = data
        super().__init__(message)


class DaemonUnreachable(ControlError):
    """Nothing answers on the control socket."""

    code = -1


class UnknownService(ControlError):
    """A service name that is not configured (JSON-RPC -32001)."""

    code = -32001


class ConfigRejected(ControlError):
    """A reload failed validation (JSON-RPC -32002); ``data`` holds the errors."""

    code = -32002


class PeerNotAllowed(ControlError):
    """The peer's uid is not allowed on the control socket (JSON-RPC -32003)."""

    code = -32003
