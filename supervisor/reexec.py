"""``hostvisor reexec``: replace the daemon's code in place (same pid), keeping every service.

As systemd's ``daemon-reexec``: the daemon checks that the installed code can load
its config (``python -m supervisor check``, the new code in a child process), tells
systemd ``RELOADING=1``, stops every supervisor *without* stopping its instance
(a stop already under way finishes first), lets each log drain hand over its pipe
and the partial line it held (:class:`~supervisor.logfiles.Handover`), writes the
state file with the descriptors that must survive (the lock, the control socket's
listener, the connection that asked, every pipe), clears their close-on-exec flag,
and ``execve``s ``python -m supervisor`` with the same arguments. The new code
(:mod:`supervisor.takeover`) picks everything up and answers the request; systemd
gets ``READY=1`` from it and ``MAINPID`` never changes.

If ``execve`` itself fails, this daemon resumes its own services from the same
state and answers with the error. Between the upgrade and the re-exec nothing of the
new code is loaded into the old process (see :mod:`supervisor.upgrade`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from supervisor.carryover import snapshot
from supervisor.control.protocol import INTERNAL_ERROR
from supervisor.errors import ConfigRejected, ControlError
from supervisor.statefile import ReexecRecord, StateFile, state_path, write_state

if TYPE_CHECKING:
    from supervisor.daemon import Daemon

__all__ = ["ENV", "REEXEC_CHECK_TIMEOUT", "reexec"]

#: Set in the new code's environment: the path of the state file to resume from.
ENV = "HOSTVISOR_REEXEC"
#: The signals the daemon handles, held across ``execve`` (see :func:`hold_signals`).
HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
#: Seconds the installed code gets to load and check the config.
REEXEC_CHECK_TIMEOUT = 60.0


class ReexecFailed(ControlError):
    """The daemon could not re-execute itself; it goes on with its old code.

    Not the default -32000, which clients read as "the daemon is going away"
    (:class:`~supervisor.errors.DaemonUnreachable`): this daemon answered and runs on.
    """

    code = INTERNAL_ERROR


async def check_new_code(daemon: Daemon) -> None:
    """Run ``python -m supervisor check -c CONFIG`` with the installed code.

    Raises:
        ConfigRejected: it found errors in the config (its lines in ``data``).
        ReexecFailed: it could not run or import (its stderr in the message).
    """
    config = str(daemon.loaded.daemon.config_path)
    argv = [sys.executable, "-m", "supervisor", "check", "-c", config]
    result = await daemon.process_driver.run_command(
        argv, cwd=daemon.loaded.daemon.config_path.parent, env={}, service="hostvisor",
        timeout=REEXEC_CHECK_TIMEOUT,
    )  # fmt: skip
    if result.ok:
        return
    text = (result.stderr or result.stdout).strip()
    if result.code == 1 and text and "Traceback" not in text:
        errors = text.splitlines()[-100:]
        raise ConfigRejected("reexec refused: " + "; ".join(errors), data=errors)
    last = text.splitlines()[-1] if text else result.describe()
    raise ReexecFailed(f"reexec refused: the installed hostvisor cannot start: {last}")


async def reexec(daemon: Daemon, connection: socket.socket, request_id: Any) -> dict[str, Any]:
    """Re-execute the daemon; returns only when it failed (raising)."""
    if daemon.shutting_down:
        raise ReexecFailed("the daemon is shutting down")
    await check_new_code(daemon)
    daemon.log_line("info", "re-executing: handing every service over to the installed code")
    daemon.notifier_reloading()
    state = await quiesce(daemon)
    held = hold_signals()
    if daemon.shutting_down:  # SIGTERM while we quiesced: the stop wins, with this code
        release_signals(held)
        await _go_on(daemon, state)
        raise ReexecFailed("reexec abandoned: the daemon was asked to stop meanwhile")
    reply_fd = os.dup(connection.fileno())
    listener = daemon.listen_sock
    assert listener is not None and daemon.lock_fd is not None
    state.reexec = ReexecRecord(
        lock_fd=daemon.lock_fd,
        listener_fd=listener.fileno(),
        reply_fd=reply_fd,
        reply_id=request_id,
        started_wall=daemon.started_wall,
        event_seq=daemon.bus.last_seq,
    )
    keep = [daemon.lock_fd, listener.fileno(), reply_fd]
    for rec in state.services.values():
        for inst in rec.instances():
            keep.extend(inst.fds)
    path = state_path(daemon.state_dir)
    try:
        write_state(path, state)
        for fd in keep:
            os.set_inheritable(fd, True)
        daemon.before_exec()
        env = {**os.environ, ENV: str(path)}
        argv = [sys.executable, "-m", "supervisor", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        for fd in keep:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        os.close(reply_fd)
        release_signals(held)
        daemon.log_line("error", f"re-exec failed: {exc}; going on with the running code")
        state.reexec = None
        await _go_on(daemon, state)
        raise ReexecFailed(f"re-exec failed: {exc}; the daemon goes on with its old code") from None
    raise AssertionError("not reached")  # pragma: no cover


def hold_signals() -> dict[int, Any]:
    """Block the daemon's signals (SIGTERM, SIGINT, SIGHUP, SIGUSR1) in this, the main,
    thread until the new code listens (``_serve`` unblocks them): a signal pending at
    ``execve`` stays pending (execve(2)) instead of being lost with the event loop, or
    killing the new code before it has handlers. One that a worker thread takes meanwhile
    is sent again to this thread. Returns the handlers to put back on failure."""
    main = threading.main_thread().ident
    assert main is not None

    def again(signum: int, _frame: Any) -> None:
        signal.pthread_kill(main, signum)

    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    return {sig: signal.signal(sig, again) for sig in HELD_SIGNALS}


def release_signals(handlers: dict[int, Any]) -> None:
    """Undo :func:`hold_signals` (the exec did not happen): pending signals arrive now."""
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


async def _go_on(daemon: Daemon, state: StateFile) -> None:
    """Supervise again, with this code, what :func:`quiesce` left; keep the state file."""
    from supervisor.takeover import keep_state_file

    await daemon.resume_in_place(state)
    assert daemon._tg is not None
    daemon._tg.start_soon(keep_state_file, daemon)
    if daemon.notifier is not None and not daemon.shutting_down:
        daemon.notifier.ready()  # RELOADING=1 was sent: systemd waits for READY=1


async def quiesce(daemon: Daemon) -> StateFile:
    """Stop every supervisor, leaving its instance running and its pipes open; return the
    state to hand over. A stop under way finishes first (bounded by its stop_timeout)."""
    writer = daemon.state_writer
    if writer is not None:  # no older snapshot may land after ours
        writer.cancel()
        await daemon.state_writer_done.wait()
    sups = list(daemon.supervisors.values())
    for sup in sups:
        for handle in sup.live_handles():  # a job may run several
            if hasattr(handle, "handover"):
                handle.handover.requested = True
    await daemon.cancel_supervisors()
    daemon.flush_jobs()
    # What the cancelled drains did not hand over (a drain not started yet) is still open.
    services = {}
    for sup in sups:
        rec = snapshot(sup, logs_dropped_bytes=daemon.dropped_bytes(sup.name))
        handles = {h.pid: h for h in sup.live_handles() if hasattr(h, "handover")}
        for inst in rec.instances():
            owner = handles.get(inst.pid)
            if owner is not None:
                pending = owner.handover.pending
                held = [pending.get(fd, b"") for fd in inst.fds]
                inst.pending = [p.decode("latin-1") for p in held]
        services[sup.name] = rec
    return StateFile(pid=os.getpid(), services=services)
