"""``hostvisor signal NAME... SIG [--group]``: which signal is meant, and sending it.

:func:`parse_signal` reads a signal the way ``kill(1)`` and ``systemctl kill
--signal=`` do (``"HUP"``, ``"SIGHUP"``, ``"sighup"``, ``"1"``, ``1``,
``"RTMIN+3"``); the CLI checks its argument with it before connecting and the
control method's params are validated with it, so both say the same thing about a
bad one. :func:`deliver` is the daemon's side of the ``signal`` method
(supervisorctl's ``signal``, ``systemctl kill``, ``docker kill --signal``): each
service's running instance is signalled through its handle
(:meth:`supervisor.drivers.base.Handle.send_signal`), which never reaches a reused
pid; a service with no instance is reported, not signalled.

Importing this module costs the standard library only (``hostvisor signal`` and the
protocol import it); :func:`deliver` imports nothing more.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.daemon import Daemon

__all__ = ["SignalError", "deliver", "parse_signal", "signal_name"]

_HINT = "expected a name like HUP, SIGTERM or USR1, or a number from 1 to {top}"
_REALTIME = re.compile(r"SIG(RTMIN|RTMAX)([+-]\d{1,3})?")


class SignalError(ValueError):
    """A signal that this platform does not have; the message names the argument."""


def _top() -> int:
    return int(getattr(signal, "SIGRTMAX", max(signal.valid_signals())))


def _valid(number: int) -> bool:
    return 1 <= number <= _top() and number in signal.valid_signals()


def parse_signal(value: object, *, what: str = "signal") -> int:
    """The signal number ``value`` names.

    Args:
        value: a name with or without ``SIG``, in any case (``"HUP"``, ``"SIGHUP"``,
            ``"sighup"``), ``"RTMIN+N"``/``"RTMAX-N"`` as ``kill(1)`` reads them, or a
            number (int or decimal string) from 1 to ``SIGRTMAX`` (64 on Linux) that
            this platform has (``signal.valid_signals()``); 0 (no signal) is refused.
        what: the argument's name in the error message (``"signal"``, ``"SIG"``).

    Returns:
        The signal number.

    Raises:
        SignalError: naming ``what`` and the value given, and what is expected.
    """
    hint = _HINT.format(top=_top())
    shown = repr(value)[:40]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SignalError(f"{what}: {hint}, got {shown}")
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and len(text) <= 4:
            value = int(text)
        else:
            number = _by_name(text.upper())
            if number is None:
                raise SignalError(f"{what}: unknown signal {shown} ({hint})")
            return number
    if not _valid(value):
        raise SignalError(f"{what}: unknown signal number {shown} ({hint})")
    return value


def _by_name(name: str) -> int | None:
    if not name.startswith("SIG"):
        name = "SIG" + name
    realtime = _REALTIME.fullmatch(name)
    if realtime is not None and hasattr(signal, "SIGRTMIN"):
        base = int(signal.SIGRTMIN if realtime.group(1) == "RTMIN" else signal.SIGRTMAX)
        number = base + int(realtime.group(2) or 0)
        ok = int(signal.SIGRTMIN) <= number <= int(signal.SIGRTMAX)
        return number if ok else None
    member = signal.Signals.__members__.get(name)
    return int(member) if member is not None and _valid(int(member)) else None


def signal_name(number: int) -> str:
    """``"SIGHUP"`` for 1; ``"SIGRTMIN+3"`` for a realtime signal; the number otherwise."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        low = getattr(signal, "SIGRTMIN", None)
        return f"SIGRTMIN+{number - low}" if low is not None and number > low else str(number)
    return name


async def deliver(daemon: Daemon, names: Sequence[str], sig: int, *, group: bool) -> dict[str, Any]:
    """Send ``sig`` to each named service's running instance: its main process, or with
    ``group`` its whole process group; a container through the engine (``docker kill
    --signal``, which reaches the container's main process, group or not). Every live
    run of a job is signalled.

    Returns:
        ``{"services": [status entries]}`` in the order named, each with ``"signalled"``:
        False when the service had no running instance (nothing was sent).

    Raises:
        UnknownService: a name the daemon does not know (nothing is sent then).
        ControlError: the daemon is shutting down or re-executing.
    """
    from supervisor.errors import DriverError

    daemon._refuse_when_stopping()
    async with daemon._reload_lock:  # never a supervisor that a reload is replacing
        daemon._refuse_when_stopping()
        chosen = daemon._resolve(list(names))
        sent: dict[str, bool] = {}
        for name in chosen:
            sent[name] = False
            for handle in daemon.supervisors[name].live_handles():
                try:
                    ok = await handle.send_signal(sig, group=group)
                except (DriverError, OSError) as exc:
                    daemon.log_line("warning", f"{name}: cannot send {signal_name(sig)}: {exc}")
                    continue
                sent[name] = sent[name] or ok
                if ok:
                    cid = handle.container_id
                    target = f"container {cid[:12]}" if cid else f"pid {handle.pid}"
                    whom = f"the process group of {target}" if group else target
                    daemon.log_line("info", f"{name}: sent {signal_name(sig)} to {whom}")
    entries = []
    for name in chosen:
        entry = daemon._entry(name)
        entry["signalled"] = sent[name]
        entries.append(entry)
    return {"services": entries}
