"""An asyncio client of the control socket, for ``hostvisor top`` (contract section 8).

textual runs on asyncio, so ``top`` talks to the daemon with
:func:`asyncio.open_unix_connection` instead of the blocking
:class:`~supervisor.control.client.ControlClient`: a daemon that does not answer
then delays one task, never the screen. Messages are the same JSON-RPC 2.0 lines, built,
validated and read by the blocking client's own functions
(:func:`~supervisor.control.client.new_request`, ``parse_message``, ``result_of``);
only the transport differs.

Example::

    control = AsyncControl(Path("/run/user/1000/hostvisor/hostvisor.sock"))
    doc = await control.call("status", {"services": ["api"]})
    async with control.follow("events", {}) as feed:
        async for event in feed:  # the params of each "event" notification
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from supervisor.control.client import NOT_YET, new_request, parse_message, result_of
from supervisor.control.protocol import MAX_LINE, METHODS, encode
from supervisor.control.socketfile import unsafe_socket_folder
from supervisor.errors import ControlError, DaemonUnreachable

__all__ = ["AsyncControl", "Feed"]

#: The longest line accepted from the daemon, bytes (as the blocking client).
_LIMIT = 16 * MAX_LINE


class Feed:
    """A followed ``logs``/``events`` call: ``result``, then notification params.

    ``async for params in feed`` yields the params of each notification named
    ``notification`` until the daemon closes the connection, which raises
    :class:`DaemonUnreachable`.
    """

    def __init__(self, reader: asyncio.StreamReader, result: Any, notification: str) -> None:
        self._reader = reader
        self._notification = notification
        self.result = result

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            message = await _receive(self._reader)
            if message.get("method") == self._notification:
                yield message.get("params")


class AsyncControl:
    """Calls control methods on the socket at ``path``; one connection per call.

    Raises (from every method):
        DaemonUnreachable: no socket, nobody listening, no answer within ``timeout``
            seconds, the connection closed, or a socket folder writable by others.
        UnknownService, PeerNotAllowed, ControlError: the daemon answered with an error
            (-32601 for a method the daemon does not have).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._next_id = 0
        #: The connection kept for :meth:`sample` (None until the first, or after a failure).
        self._kept: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def __repr__(self) -> str:
        return f"<AsyncControl {self.path}>"

    async def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float = 10.0
    ) -> Any:
        """Send one request; return its ``result`` within ``timeout`` seconds."""
        rid, message = self._request(method, params)
        reader, writer = await self._open(timeout)
        try:
            async with asyncio.timeout(timeout):
                writer.write(encode(message))
                await writer.drain()
                return await _response(reader, rid)
        except (TimeoutError, OSError) as exc:
            raise DaemonUnreachable(_lost(self.path, exc)) from None
        finally:
            writer.close()

    async def sample(self, params: Mapping[str, Any], *, timeout: float = 10.0) -> Any:
        """``resources`` on one connection kept from call to call (what ``top`` asks each
        second: no connect, credential check and teardown on the daemon's side each
        time). A kept connection that fails (the daemon restarted, or closed it after its
        idle timeout) is replaced once; the method is a read, so asking again is safe."""
        for attempt in (0, 1):
            fresh = self._kept is None
            if self._kept is None:
                self._kept = await self._open(timeout)
            reader, writer = self._kept
            rid, message = self._request("resources", params)
            try:
                async with asyncio.timeout(timeout):
                    writer.write(encode(message))
                    await writer.drain()
                    return await _response(reader, rid)
            except (TimeoutError, OSError, DaemonUnreachable) as exc:
                self.close()
                if fresh or attempt:
                    if isinstance(exc, DaemonUnreachable):
                        raise
                    raise DaemonUnreachable(_lost(self.path, exc)) from None
        raise AssertionError("not reached")

    def close(self) -> None:
        """Close the kept connection, if any."""
        if self._kept is not None:
            self._kept[1].close()
            self._kept = None

    @contextlib.asynccontextmanager
    async def follow(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float = 10.0
    ) -> AsyncIterator[Feed]:
        """``method`` with ``"follow": true``: the :class:`Feed`; closed on exit.

        ``timeout`` bounds the wait for the first answer (seconds) only.
        """
        spec = METHODS.get(method)
        if spec is None or not spec.streams:
            raise ValueError(f"{method!r} cannot be followed")
        rid, message = self._request(method, {**(params or {}), "follow": True})
        reader, writer = await self._open(timeout)
        try:
            try:
                async with asyncio.timeout(timeout):
                    writer.write(encode(message))
                    await writer.drain()
                    result = await _response(reader, rid)
            except (TimeoutError, OSError) as exc:
                raise DaemonUnreachable(_lost(self.path, exc)) from None
            yield Feed(reader, result, spec.notification)
        finally:
            writer.close()

    def _request(self, method: str, params: Mapping[str, Any] | None) -> tuple[int, dict[str, Any]]:
        self._next_id += 1
        return self._next_id, new_request(self._next_id, method, params)

    async def _open(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        problem = unsafe_socket_folder(self.path)
        if problem is not None:
            raise DaemonUnreachable(problem)
        try:
            async with asyncio.timeout(min(timeout, 5.0)):
                return await asyncio.open_unix_connection(str(self.path), limit=_LIMIT)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise DaemonUnreachable(f"no daemon at {self.path}") from None
        except TimeoutError:
            raise DaemonUnreachable(f"no daemon answers at {self.path} (timed out)") from None
        except OSError as exc:
            raise DaemonUnreachable(f"cannot connect to {self.path}: {exc.strerror}") from None


def _lost(path: Path, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer from the daemon at {path}"
    return f"lost the daemon at {path}: {getattr(exc, 'strerror', None) or exc}"


async def _receive(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next message; DaemonUnreachable at EOF, ControlError for garbage."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise DaemonUnreachable("the daemon closed the connection") from None
    except asyncio.LimitOverrunError:
        raise ControlError("the daemon sent an over-long line") from None
    except OSError as exc:
        raise DaemonUnreachable(f"lost the daemon: {exc.strerror or exc}") from None
    return parse_message(line, Path("the control socket"))


async def _response(reader: asyncio.StreamReader, rid: int) -> Any:
    """The result of request ``rid``; notifications before it are skipped."""
    while (found := result_of(await _receive(reader), rid)) is NOT_YET:
        pass
    return found
