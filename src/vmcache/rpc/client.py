"""Calling the daemon: one gRPC connection over its Unix socket, unary and streaming calls.

:func:`open_channel` is an async context manager that owns its nursery (the
connection's reader and writer run there), in the style of trio-websocket: an
exception raised by the caller's own code inside the block comes out as itself,
not wrapped in exception groups.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from ..errors import CacheError, DaemonNotRunningError, DeadlineExceededError, raise_unwrapped
from .status import error_for
from .transport import ClientCall, Code, Connection, TransportError

#: Extra time the client waits beyond the deadline it sends, for the server's answer.
CLIENT_GRACE = 2.0
CONNECT_TIMEOUT = 10.0

ResponseT = TypeVar("ResponseT", bound=ProtoMessage)


def _broken(what: str, error: BaseException) -> CacheError:
    return CacheError(f"{what}: the connection to the daemon broke ({error}); retry, and if it "
                      "persists check the daemon (`vmcache status`, its log)")


class Call:
    """A call in progress, with typed messages both ways (for streaming rpcs)."""

    def __init__(self, method: str, call: ClientCall, response_type: type[ProtoMessage]) -> None:
        self.method = method
        self._call = call
        self._response_type = response_type

    async def send(self, message: ProtoMessage, *, last: bool = False) -> None:
        """Send a request message; ``last`` also tells the daemon it was the last one."""
        try:
            await self._call.send(message.SerializeToString(), last=last)
        except TransportError as error:
            raise _broken(self.method, error) from None

    async def done_sending(self) -> None:
        try:
            await self._call.done_sending()
        except TransportError as error:
            raise _broken(self.method, error) from None

    async def receive(self) -> ProtoMessage | None:
        """The next response; None once the call ended OK; a CacheError if it did not."""
        try:
            data = await self._call.receive()
        except TransportError as error:
            raise _broken(self.method, error) from None
        if data is None:
            status = self._call.status
            if status is not None and status.code != Code.OK:
                raise error_for(status)
            return None
        message = self._response_type()
        try:
            message.ParseFromString(data)
        except DecodeError:
            raise CacheError(f"{self.method}: the daemon sent a reply that is not valid protobuf (a daemon "
                             "of another version? run client and daemon of one install)") from None
        return message

    def cancel(self) -> None:
        """Give up: the daemon learns at once (RST_STREAM) and stops working for us."""
        self._call.cancel()


class Channel:
    """A gRPC connection to the daemon over its Unix socket."""

    def __init__(self, endpoint: Path, service: str, connection: Connection) -> None:
        self.endpoint = endpoint
        self.service = service
        self._connection = connection

    async def unary(self, method: str, request: ProtoMessage, response_type: type[ResponseT],
                    timeout: float) -> ResponseT:
        """One request, one response, bounded by ``timeout`` (sent to the server too)."""
        try:
            with trio.fail_after(timeout + CLIENT_GRACE):
                async with self.open_call(method, response_type, timeout=timeout) as call:
                    await call.send(request, last=True)
                    reply = await call.receive()
                    if reply is None:
                        raise CacheError(f"{method}: the daemon ended the call without a reply (a daemon "
                                         "of another version?)")
                    if await call.receive() is not None:
                        raise CacheError(f"{method}: the daemon sent more than one reply (a daemon of "
                                         "another version?)")
        except trio.TooSlowError:
            raise DeadlineExceededError(f"{method}: no answer from the daemon within {timeout:g} s; "
                                        "retry, and check it is not stuck (`vmcache status`)") from None
        assert isinstance(reply, response_type)
        return reply

    async def server_stream(self, method: str, request: ProtoMessage,
                            response_type: type[ResponseT]) -> AsyncIterator[ResponseT]:
        """A server-streaming call with no deadline: yields each message until the server ends."""
        async with self.open_call(method, response_type) as call:
            await call.send(request, last=True)
            while (message := await call.receive()) is not None:
                assert isinstance(message, response_type)
                yield message

    @asynccontextmanager
    async def open_call(self, method: str, response_type: type[ProtoMessage],
                        timeout: float | None = None) -> AsyncIterator[Call]:
        """A call for the block's duration; leaving it early resets the call (RST_STREAM)."""
        try:
            raw = await self._connection.open_call(self.service, method, timeout)
        except TransportError as error:
            raise _broken(method, error) from None
        call = Call(method, raw, response_type)
        try:
            yield call
        finally:
            call.cancel()


@asynccontextmanager
async def open_channel(endpoint: Path, service: str) -> AsyncIterator[Channel]:
    """Connect to the daemon at ``endpoint``; no daemon there is a DaemonNotRunningError."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_unix_socket(os.fspath(endpoint))
    except (FileNotFoundError, ConnectionRefusedError, trio.TooSlowError):
        raise DaemonNotRunningError(
            f"no vmcache daemon at {endpoint}: start one with `vmcache serve`"
        ) from None
    except PermissionError:
        raise DaemonNotRunningError(f"not allowed to connect to {endpoint} (permission denied): ask "
                                    "for the daemon's socket_group") from None
    except OSError as error:
        raise DaemonNotRunningError(f"cannot connect to {endpoint}: {error.strerror}; check the path, "
                                    "or start a daemon there with `vmcache serve`") from None
    connection = Connection(stream, client_side=True)
    # The reader and the flusher serve the connection until the block is left, not until the
    # block is cancelled: a caller's shielded cleanup inside it (a lease released when a CLI
    # is stopped by a signal) still talks to the daemon, and hears its answer. Cancelled with
    # the block, they would mark the connection closed and reset every call at once: the
    # release could not go out, the daemon would learn nothing until this process closed
    # the socket, and the cleanup would fall back to a second connection (StopVM).
    serving = trio.CancelScope(shield=True)
    try:
        async with trio.open_nursery() as nursery:
            await connection.start()

            async def serve() -> None:
                with serving:
                    async with trio.open_nursery() as tasks:

                        async def read() -> None:
                            try:
                                await connection.receive_loop()
                            except TransportError:
                                pass  # every open call has been reset: their callers raise

                        tasks.start_soon(read)
                        tasks.start_soon(connection.flush_loop)

            nursery.start_soon(serve)
            try:
                yield Channel(endpoint, service, connection)
            finally:
                serving.cancel()
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await connection.close()
    except BaseExceptionGroup as group:
        raise_unwrapped(group)
