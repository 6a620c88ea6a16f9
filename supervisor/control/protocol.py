"""JSON-RPC 2.0 framing and the method table shared by the server and the client.

The wire format is contract section 8: one UTF-8 JSON object per line, at most
:data:`MAX_LINE` bytes a line, requests and responses (``jsonrpc.org/specification``).
Batches are not supported (answered with -32600).

:data:`METHODS` is the one definition of every method: its name, how its
params are validated and normalised, and whether it may be followed by
notifications. The server validates what it receives with it; the client
validates what it sends with it, so a mistake is caught before it travels.

This module is imported by ``hostvisor status``: it uses the standard library only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from supervisor.errors import (
    ConfigRejected,
    ControlError,
    DaemonUnreachable,
    PeerNotAllowed,
    UnknownService,
)
from supervisor.signals import SignalError, parse_signal

__all__ = [
    "CONFIG_REJECTED",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_DEPTH",
    "MAX_LINE",
    "METHODS",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "PEER_NOT_ALLOWED",
    "SERVER_BUSY",
    "SERVICE_NAME",
    "UNKNOWN_SERVICE",
    "Method",
    "ProtocolError",
    "Request",
    "decode",
    "encode",
    "error_from_object",
    "error_response",
    "notification",
    "parse_request",
    "request",
    "response",
]

#: Longest line either side may send, in bytes, without the newline (contract section 8).
MAX_LINE: Final = 1024 * 1024
#: Deepest nesting of arrays and objects accepted in a message.
MAX_DEPTH: Final = 64
#: Most service names in one request.
MAX_NAMES: Final = 4096
#: Most lines ``logs`` returns at once.
MAX_LOG_LINES: Final = 100_000
#: Longest wait a client may ask for, seconds (one day).
MAX_TIMEOUT: Final = 86_400.0
#: The wait used when a request does not name one, seconds.
DEFAULT_TIMEOUT: Final = 60.0

#: Implementation-defined server error: too many connections (a client sees DaemonUnreachable).
SERVER_BUSY: Final = -32000
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
UNKNOWN_SERVICE: Final = -32001
CONFIG_REJECTED: Final = -32002
PEER_NOT_ALLOWED: Final = -32003

#: A service name (contract section 4): the unit file's stem.
SERVICE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")

Id = str | int | None


class ProtocolError(Exception):
    """A request that cannot be served; becomes a JSON-RPC error response.

    Attributes:
        code: the JSON-RPC error code.
        id: the request's id when it could be read, else ``None``.
        fatal: the connection is closed after the error is sent.
    """

    def __init__(
        self, code: int, message: str, *, id: Id = None, fatal: bool = False, data: Any = None
    ) -> None:
        self.code = code
        self.id = id
        self.fatal = fatal
        self.data = data
        super().__init__(message)


# --------------------------------------------------------------------------- framing


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as a line: compact UTF-8 JSON and ``\\n``.

    Lone surrogates (from undecodable log bytes) become U+FFFD. Raises
    ``ValueError`` for NaN or infinity, which JSON cannot carry.
    """
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8", "replace") + b"\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_deep(value: Any, limit: int) -> bool:
    """True if ``value`` nests arrays/objects deeper than ``limit`` (iterative)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def decode(line: bytes) -> Any:
    """Parse one line (without its newline) into a JSON value.

    Raises:
        ProtocolError: -32700 for a line over :data:`MAX_LINE`, invalid UTF-8,
            invalid JSON, ``NaN``/``Infinity``, numbers too large to convert, or
            nesting deeper than :data:`MAX_DEPTH`.
    """
    if len(line) > MAX_LINE:
        raise ProtocolError(PARSE_ERROR, f"line longer than {MAX_LINE} bytes", fatal=True)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(PARSE_ERROR, f"invalid UTF-8 at byte {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError(PARSE_ERROR, f"nested deeper than {MAX_DEPTH}") from None
    except ValueError as exc:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
        raise ProtocolError(PARSE_ERROR, f"invalid JSON: {exc}") from None
    # Cheap test first: fewer opening brackets than the limit cannot nest deeper.
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and _too_deep(value, MAX_DEPTH):
        raise ProtocolError(PARSE_ERROR, f"nested deeper than {MAX_DEPTH}")
    return value


# --------------------------------------------------------------------------- messages


def request(id: Id, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A request object; ``id=None`` is still sent (use :func:`notification` for none)."""
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": dict(params)}


def notification(method: str, params: Any) -> dict[str, Any]:
    """A message without an id: the server's ``log``/``event`` stream items."""
    return {"jsonrpc": "2.0", "method": method, "params": params}


def response(id: Id, result: Any) -> dict[str, Any]:
    """A success response carrying the request's id."""
    return {"jsonrpc": "2.0", "id": id, "result": result}


def error_response(id: Id, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """An error response; ``data`` is left out when ``None``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": error}


def error_from_object(error: Any) -> ControlError:
    """The :class:`ControlError` subclass for a response's ``error`` member."""
    if not isinstance(error, dict):
        return ControlError(f"malformed error: {error!r}", code=INTERNAL_ERROR)
    code = error.get("code")
    message = str(error.get("message", ""))
    data = error.get("data")
    classes: dict[Any, type[ControlError]] = {
        UNKNOWN_SERVICE: UnknownService,
        CONFIG_REJECTED: ConfigRejected,
        PEER_NOT_ALLOWED: PeerNotAllowed,
    }
    cls = classes.get(code)
    if cls is not None:
        return cls(message, data=data)
    if code == SERVER_BUSY:
        return DaemonUnreachable(message)
    return ControlError(message, code=code if isinstance(code, int) else INTERNAL_ERROR, data=data)


# --------------------------------------------------------------------------- params


def _bad(message: str) -> ProtocolError:
    return ProtocolError(INVALID_PARAMS, message)


def _only(params: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for key in params:
        if key not in allowed:
            raise _bad(f"unknown param {key!r} (expected {', '.join(sorted(allowed)) or 'none'})")


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{key}: expected a service name (a string), got {type(value).__name__}")
    if SERVICE_NAME.fullmatch(value) is None:
        # No unit can have this name: it is an unknown service (-32001), checked before use.
        shown = value[:80]
        raise ProtocolError(
            UNKNOWN_SERVICE,
            f"unknown service: {shown!r} (service names match [a-z0-9][a-z0-9_.-]*)",
            data={"unknown": [shown]},
        )
    return value


def _names(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _bad(f"{key}: expected a non-empty list of service names")
    if len(value) > MAX_NAMES:
        raise _bad(f"{key}: more than {MAX_NAMES} names")
    return list(dict.fromkeys(_name(v, key) for v in value))


def _bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{key}: expected true or false")
    return value


def _int(params: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{key}: expected an integer from {low} to {high}")
    return value


def _status(params: Mapping[str, Any]) -> dict[str, Any]:
    _only(params, frozenset({"services"}))
    services = params.get("services")
    return {"services": None if services is None else _names(services, "services")}


def _resources(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"services": [names]?, "max_age": seconds?}``: max_age defaults to 1 and is
    clamped to 0.2 .. 60 seconds."""
    _only(params, frozenset({"services", "max_age"}))
    services = params.get("services")
    age = params.get("max_age", 1.0)
    if isinstance(age, bool) or not isinstance(age, int | float) or not math.isfinite(age):
        raise _bad("max_age: expected seconds (a number)")
    return {
        "services": None if services is None else _names(services, "services"),
        "max_age": min(60.0, max(0.2, float(age))),
    }


def _action(params: Mapping[str, Any]) -> dict[str, Any]:
    _only(params, frozenset({"services", "wait", "timeout"}))
    if "services" not in params:
        raise _bad('services: required: a list of service names or "all"')
    services = params["services"]
    timeout = params.get("timeout", DEFAULT_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise _bad(f"timeout: expected seconds, more than 0 and at most {MAX_TIMEOUT:g}")
    return {
        "services": "all" if services == "all" else _names(services, "services"),
        "wait": _bool(params, "wait", True),
        "timeout": float(timeout),
    }


def _signal(params: Mapping[str, Any]) -> dict[str, Any]:
    _only(params, frozenset({"services", "signal", "group"}))
    if "services" not in params or "signal" not in params:
        raise _bad("services and signal: required (a list of service names, a signal)")
    try:
        number = parse_signal(params["signal"])
    except SignalError as exc:
        raise _bad(str(exc)) from None
    services = _names(params["services"], "services")
    return {"services": services, "signal": number, "group": _bool(params, "group", False)}


def _reload(params: Mapping[str, Any]) -> dict[str, Any]:
    _only(params, frozenset())
    return {}


def _logs(params: Mapping[str, Any]) -> dict[str, Any]:
    _only(params, frozenset({"service", "lines", "follow"}))
    service = params.get("service")
    lines = _int(params, "lines", 0, MAX_LOG_LINES)
    return {
        "service": None if service is None else _name(service, "service"),
        "lines": 50 if lines is None else lines,
        "follow": _bool(params, "follow", False),
    }


def _events(params: Mapping[str, Any]) -> dict[str, Any]:
    _only(params, frozenset({"follow", "since"}))
    return {
        "follow": _bool(params, "follow", False),
        "since": _int(params, "since", 0, 2**63 - 1),
    }


@dataclass(frozen=True, slots=True)
class Method:
    """One method of contract section 8.

    Attributes:
        name: the method name on the wire.
        validate: checks a params object and returns it normalised (defaults
            filled in); raises :class:`ProtocolError` -32602.
        streams: with ``follow``, the response is followed by notifications
            named ``notification``.
    """

    name: str
    validate: Callable[[Mapping[str, Any]], dict[str, Any]]
    streams: bool = False
    notification: str = ""


#: Every method the control socket serves, by name.
METHODS: Final[Mapping[str, Method]] = {
    m.name: m
    for m in (
        Method("status", _status),
        Method("start", _action),
        Method("stop", _action),
        Method("restart", _action),
        Method("reload", _reload),
        Method("reexec", _reload),
        Method("signal", _signal),
        Method("logs", _logs, streams=True, notification="log"),
        Method("events", _events, streams=True, notification="event"),
        Method("resources", _resources),
    )
}


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request: ``id`` is absent for a notification (no response is sent)."""

    id: Id
    method: Method
    params: dict[str, Any]
    has_id: bool


def parse_request(value: Any) -> Request:
    """Validate a decoded message as a request to one of :data:`METHODS`.

    Raises:
        ProtocolError: -32600 for a batch, a non-object, a wrong ``jsonrpc``,
            ``id`` or ``method``; -32601 for an unknown method (names with a
            dot or a leading underscore are never methods); -32602 for params
            that are not an object or do not validate. ``id`` is set on the
            error when it could be read.
    """
    if isinstance(value, list):
        raise ProtocolError(INVALID_REQUEST, "batch requests are not supported")
    if not isinstance(value, dict):
        raise ProtocolError(INVALID_REQUEST, "a request must be a JSON object")
    has_id = "id" in value
    rid = value.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int | None):
        raise ProtocolError(INVALID_REQUEST, "id must be a string, an integer or null")
    if isinstance(rid, str) and len(rid) > 256:
        raise ProtocolError(INVALID_REQUEST, "id longer than 256 characters")
    if value.get("jsonrpc") != "2.0":
        raise ProtocolError(INVALID_REQUEST, 'jsonrpc must be "2.0"', id=rid)
    name = value.get("method")
    if not isinstance(name, str):
        raise ProtocolError(INVALID_REQUEST, "method must be a string", id=rid)
    method = METHODS.get(name)
    if method is None:
        raise ProtocolError(METHOD_NOT_FOUND, f"no such method: {name[:80]!r}", id=rid)
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError(INVALID_PARAMS, "params must be an object", id=rid)
    try:
        normalised = method.validate(params)
    except ProtocolError as exc:
        exc.id = rid
        raise
    return Request(id=rid, method=method, params=normalised, has_id=has_id)
