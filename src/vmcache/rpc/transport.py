"""gRPC calls over one HTTP/2 connection on a Trio stream: the only module that touches purerpc.

purerpc 0.8.0 comes in two layers. Its lower one, ``purerpc.grpclib``, is a sans-I/O
gRPC-over-HTTP/2 protocol in the style of h11 (headers, trailers, message framing,
status codes, built on h2). Its upper one drives that over anyio sockets, and is what
we cannot use: it only speaks TCP, drops RST_STREAM, never forgets a reset stream,
and cannot tell a caller when its bytes have left. So this module keeps the lower
layer and drives it with Trio itself:

* :class:`Connection` owns the byte stream and the protocol state. Whoever reads
  runs :meth:`Connection.receive_loop`; writes go out under one lock, so that when
  :meth:`flush` returns every frame queued before it is in the kernel's socket
  buffer. That is what "the reply was written" means for a hand-out.
* :meth:`ServerCall.reply` writes a unary call's one response only while the client
  still waits for it: before its deadline (``grpc-timeout``, counted from the bytes
  read) and with no RST_STREAM from it, the frames already on the socket read first.
  A hand-out whose reply is refused keeps its VM.
* A call is a :class:`ServerCall` or a :class:`ClientCall`: messages in both
  directions (unary, server-streaming and bidirectional rpcs alike), a status at the
  end, and a reset (RST_STREAM) from the peer cancels the server's handler through
  :attr:`ServerCall.cancel_scope` even when it arrives in the same read as the
  request's headers.
* Received data is acknowledged (HTTP/2 flow control) only as the call's reader
  takes it, and windows are small: a peer that sends without being read fills a
  window of its own and stops, and it cannot make us buffer more.

The layers above (:mod:`vmcache.rpc.server`, :mod:`vmcache.rpc.client`) see bytes,
:class:`Code` and :class:`RpcStatus`, never a purerpc type.
"""

from __future__ import annotations

import datetime
import enum
import fcntl
import math
import os
import struct
import termios
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.settings import SettingCodes
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    ResponseReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import GRPCError
from purerpc.grpclib.status import Status

#: Calls open at once on one connection; the peer learns it from our SETTINGS.
MAX_CONCURRENT_CALLS = 64
#: Per-call receive window (HTTP/2 INITIAL_WINDOW_SIZE): at least the largest message.
CALL_WINDOW = 8 << 20
#: What the whole connection may have in flight towards us beyond the 64 KiB default.
CONNECTION_WINDOW_EXTRA = 16 << 20
READ_SIZE = 1 << 16


class Code(enum.IntEnum):
    """gRPC status codes (the ones this project uses)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


@attrs.frozen
class RpcStatus:
    """How a call ended: a code and a message for humans."""

    code: Code
    message: str = ""


class TransportError(Exception):
    """The connection broke, or the peer broke the protocol. Not a vmcache error:
    the rpc layers turn it into one."""


class CallResetError(TransportError):
    """The peer reset this call (RST_STREAM), or the connection ended under it."""


class CallExpiredError(TransportError):
    """The call's deadline (the client's ``grpc-timeout``) passed: the client no longer waits."""


def _code(value: int) -> Code:
    try:
        return Code(value)
    except ValueError:
        return Code.UNKNOWN


class _Protocol(GRPCConnection):  # type: ignore[misc]
    """purerpc's protocol with what we need on top: resets and GOAWAY as events, reset
    streams forgotten, and our own (small) windows."""

    def _set_h2_connection_local_settings(self) -> None:
        self.h2_connection.local_settings = h2.settings.Settings(
            client=self.config.client_side,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_CALLS,
                SettingCodes.INITIAL_WINDOW_SIZE: CALL_WINDOW,
                SettingCodes.MAX_FRAME_SIZE: 1 << 16,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.MAX_HEADER_LIST_SIZE,
            },
        )

    def initiate_connection(self) -> None:
        self.h2_connection.initiate_connection()
        self.h2_connection.increment_flow_control_window(CONNECTION_WINDOW_EXTRA)

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [_Reset(event.stream_id)]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Any]:
        return [_GoAway()]


@attrs.frozen
class _Reset:
    stream_id: int


@attrs.frozen
class _GoAway:
    pass


class _Call:
    """What both ends of one call share: its id, the messages received, how it ended."""

    def __init__(self, connection: Connection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._messages: deque[tuple[bytes, int]] = deque()
        self._changed = trio.Event()
        #: The peer sent its last message (END_STREAM).
        self.remote_done = False
        #: The peer reset the call, or the connection ended.
        self.reset = False
        self._local_done = False

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _deliver(self, data: bytes, flow_controlled: int) -> None:
        self._messages.append((data, flow_controlled))
        self._wake()

    def _end_remote(self) -> None:
        self.remote_done = True
        self._wake()

    def _on_reset(self) -> None:
        self.reset = True
        self._wake()

    async def receive(self) -> bytes | None:
        """The next message, or None once the peer has sent its last one.

        Raises :class:`CallResetError` if the call was reset or the connection broke.
        """
        while not self._messages:
            if self.reset:
                raise CallResetError(f"call {self.stream_id} was reset")
            if self.remote_done:
                return None
            await self._changed.wait()
        data, flow_controlled = self._messages.popleft()
        await self._connection._acknowledge(self.stream_id, flow_controlled)
        return data

    def _queue_message(self, data: bytes, *, last: bool = False) -> bool:
        """Queue one gRPC message for the next flush if the flow-control window takes it
        whole; False (nothing queued) if it does not. Every write wakes the peer, and
        on a small host each wake-up is a context switch that costs more than the
        bytes: what can go in one write should."""
        framed = struct.pack(">?I", False, len(data)) + data
        if self.reset or len(framed) > self._connection._window_for(self.stream_id):
            return False
        self._connection._send_data(self.stream_id, framed, last)
        if last:
            self._local_done = True
        return True

    async def _send_message(self, data: bytes, *, last: bool = False) -> None:
        """Send one gRPC message; with ``last`` it ends our side of the call too (END_STREAM)."""
        framed = memoryview(struct.pack(">?I", False, len(data)) + data)
        connection = self._connection
        while framed:
            if self.reset:
                raise CallResetError(f"call {self.stream_id} was reset")
            window = connection._window_for(self.stream_id)
            if window <= 0:
                await connection._window_changed_wait()
                continue
            chunk, framed = bytes(framed[:window]), framed[window:]
            end = last and not framed
            connection._send_data(self.stream_id, chunk, end)
            if end:
                self._local_done = True
            await connection.flush()

    def _forget(self) -> None:
        """The call is over here: drop what it never read, giving its window back."""
        unread = sum(length for _, length in self._messages)
        self._messages.clear()
        self._connection._calls.pop(self.stream_id, None)
        if unread:
            self._connection._acknowledge_nowait(self.stream_id, unread)


class ServerCall(_Call):
    """One incoming call. The handler reads with :meth:`receive`, answers with
    :meth:`send` and ends it with :meth:`finish`."""

    def __init__(self, connection: Connection, event: RequestReceived) -> None:
        super().__init__(connection, event.stream_id)
        self.service: str = event.service_name
        self.method: str = event.method_name
        timeout = event.timeout
        #: Seconds the client gave the call (grpc-timeout); inf without one.
        self.timeout: float = (timeout.total_seconds() if isinstance(timeout, datetime.timedelta)
                               else math.inf)
        #: trio.current_time() when the bytes carrying the request's headers were read: a
        #: server's own time for the call counts from here, its HTTP/2 parse included.
        self.arrived_at: float = connection.last_activity
        #: When the client gives up (trio time): ``timeout`` after the bytes were read. The
        #: client's clock started before it sent them, so its deadline comes a little sooner.
        self.deadline: float = self.arrived_at + self.timeout
        #: Cancelled when the client resets the call or the connection ends.
        self.cancel_scope = trio.CancelScope()
        self._started = False

    def _on_reset(self) -> None:
        super()._on_reset()
        self.cancel_scope.cancel()

    async def send(self, data: bytes, *, last: bool = False) -> None:
        """Send one response message (the response headers go first, once).

        ``last``: no message follows, :meth:`finish` comes next; the message may then
        wait for it, so that message and trailers go out in one write."""
        if not self._started:
            self._started = True
            self._connection._protocol_call(
                lambda: self._connection._protocol.start_response(self.stream_id, "+proto"))
        if last and self._queue_message(data):
            return
        await self._send_message(data)

    async def finish(self, status: RpcStatus) -> None:
        """End the call with ``status``; returns once the trailers are written to the socket.

        Raises :class:`TransportError` (or :class:`CallResetError`) when they could not be:
        the client cannot have seen the end of the call.
        """
        if self._local_done:
            return
        if self.reset:
            raise CallResetError(f"call {self.stream_id} was reset before it ended")
        self._local_done = True
        connection = self._connection
        grpc_status = Status(status.code.value, status.message)
        if self._started:
            connection._protocol_call(lambda: connection._protocol.end_response(self.stream_id, grpc_status))
        else:
            connection._protocol_call(
                lambda: connection._protocol.respond_status(self.stream_id, grpc_status, "+proto"))
        if not self.remote_done:
            # The client may still be sending: tell it we are done (as gRPC servers do),
            # which also lets the protocol forget the stream.
            connection.reset_call(self.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        self._forget()
        await connection.flush()

    async def reply(self, data: bytes, *, margin: float = 0.0) -> None:
        """Write the call's one response message and an OK status, in one write, but only
        while the client still waits for it: more than ``margin`` s before its deadline,
        not reset. What already arrived on the connection is read first, so that a reset
        the client sent before this write began is seen.

        Returns once the reply is in the socket buffer. Raises :class:`CallResetError`
        (reset, or the connection ended) or :class:`CallExpiredError` (the deadline is
        less than ``margin`` away) when it is not wanted any more: then nothing of it was
        written, and the caller still holds whatever the reply would have given away.
        """
        if self._started or self._local_done:
            raise TransportError(f"call {self.stream_id}: reply() is the whole response")
        framed = struct.pack(">?I", False, len(data)) + data
        connection = self._connection
        while True:
            await connection.read_pending()
            self._check_wanted(margin)
            if len(framed) > connection._window_for(self.stream_id):
                await connection._window_changed_wait()  # a client that reads nothing: the caller's bound
                continue
            async with connection._send_lock:
                # From these checks to the write nothing may yield: what they saw must still
                # hold when the bytes go (a send that does not block does not yield).
                if connection.pending_input():
                    continue  # more arrived while we waited for the lock: read it first
                self._check_wanted(margin)
                if trio.current_effective_deadline() <= trio.current_time():
                    await trio.lowlevel.checkpoint()  # cancelled (a deadline not yet processed)
                    continue
                self._started = self._local_done = True
                connection._protocol_call(
                    lambda: connection._protocol.start_response(self.stream_id, "+proto"))
                connection._send_data(self.stream_id, framed)
                connection._protocol_call(
                    lambda: connection._protocol.end_response(self.stream_id, Status(Code.OK.value, "")))
                if not self.remote_done:
                    connection.reset_call(self.stream_id, h2.errors.ErrorCodes.NO_ERROR)
                self._forget()
                await connection._write_queued()
                return

    def _check_wanted(self, margin: float) -> None:
        if self.reset or self._connection._broken is not None:
            raise CallResetError(f"call {self.stream_id} was reset before its reply was written")
        if trio.current_time() >= self.deadline - margin:
            raise CallExpiredError(f"call {self.stream_id}: the client's deadline has passed "
                                   f"(or is under {margin * 1000:g} ms away)")

    def abandon(self) -> None:
        """The handler is gone without finishing: reset the call so the client knows."""
        if not self._local_done and not self.reset:
            self._local_done = True
            self._connection.reset_call(self.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self._forget()


class ClientCall(_Call):
    """One outgoing call: :meth:`send` requests, :meth:`done_sending`, :meth:`receive`
    responses until None, then :attr:`status`."""

    def __init__(self, connection: Connection, stream_id: int) -> None:
        super().__init__(connection, stream_id)
        #: How the server ended the call; set when :meth:`receive` returned None.
        self.status: RpcStatus | None = None

    def _on_status(self, status: Status) -> None:
        self.status = RpcStatus(_code(status.int_value), status.status_message or "")
        self._end_remote()

    async def send(self, data: bytes, *, last: bool = False) -> None:
        """Send one request message; ``last`` half-closes with it (what unary calls do).
        The call's headers, if still queued, go out in the same write."""
        if self._queue_message(data, last=last):
            await self._connection.flush()
            return
        await self._send_message(data, last=last)

    async def done_sending(self) -> None:
        """Half-close: the server's next receive sees the end."""
        if self._local_done or self.reset:
            return
        self._local_done = True
        try:
            self._connection._protocol.end_request(self.stream_id)
        except (GRPCError, h2.exceptions.H2Error):
            return  # the server already ended the call: there is nobody to tell
        await self._connection.flush()

    def cancel(self) -> None:
        """Give up on the call: RST_STREAM(CANCEL) goes out with the next write."""
        if not (self.remote_done and self.status is not None) and not self.reset:
            self._connection.reset_call(self.stream_id, h2.errors.ErrorCodes.CANCEL)
        self.reset = True
        self._forget()


class Connection:
    """Both directions of one HTTP/2 connection carrying gRPC calls."""

    def __init__(self, stream: trio.abc.Stream, *, client_side: bool,
                 max_message: int = 4 << 20) -> None:
        self._stream = stream
        self.client_side = client_side
        self._protocol = _Protocol(GRPCConfiguration(client_side=client_side,
                                                     max_message_length=max_message))
        self._send_lock = trio.Lock()
        self._calls: dict[int, _Call] = {}
        self._window_changed = trio.Event()
        self._flush_wanted = trio.Event()
        self._broken: str | None = None
        #: trio.current_time() of the last byte received, for idle timeouts.
        self.last_activity = trio.current_time()
        #: Bytes read and dispatched so far, and an event set after each read is dispatched.
        self._bytes_read = 0
        self._read_done = trio.Event()
        #: Set once the peer's first frames (its preface and SETTINGS) arrived.
        self.handshaken = trio.Event()
        self.goaway = False

    @property
    def open_calls(self) -> int:
        return len(self._calls)

    # ------------------------------------------------------------ writing

    def _protocol_call(self, action: Callable[[], object]) -> None:
        """Run one protocol action; a protocol refusal means the call or connection is gone."""
        if self._broken is not None:
            raise TransportError(self._broken)
        try:
            action()
        except (GRPCError, h2.exceptions.H2Error) as error:
            raise CallResetError(f"the connection refused the action: {error!r}") from None

    def _send_data(self, stream_id: int, chunk: bytes, end: bool = False) -> None:
        self._protocol_call(lambda: self._protocol.send_data(stream_id, chunk, end_stream=end))

    async def flush(self) -> None:
        """Write everything queued so far; when this returns it is in the socket buffer.

        Raises :class:`TransportError` if the connection is broken (then nothing queued
        before can be known to have been written).
        """
        async with self._send_lock:
            await self._write_queued()

    async def _write_queued(self) -> None:
        """:meth:`flush`'s work, the send lock held. Until the first byte goes out it does
        not yield (unless cancelled): a caller's checks just before it still hold."""
        if self._broken is not None:
            raise TransportError(self._broken)
        data = self._protocol.data_to_send()
        if not data:
            return
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
            self._break(f"the connection broke while writing: {error!r}")
            raise TransportError(self._broken or "broken") from None
        except trio.Cancelled:
            # Part of a frame may be out: nothing after it can be trusted.
            self._break("a write was cancelled half-way")
            raise

    def pending_input(self) -> int:
        """Bytes that arrived on the socket and are not read yet (0 for a stream that is not a
        socket: nothing to tell)."""
        if not isinstance(self._stream, trio.SocketStream) or self._broken is not None:
            return 0
        buffer = bytearray(4)
        try:
            fcntl.ioctl(self._stream.socket.fileno(), termios.FIONREAD, buffer)
        except OSError:
            return 0
        count: int = struct.unpack("=i", buffer)[0]
        return count

    async def read_pending(self) -> None:
        """Return once what had arrived on the socket when called is read and dispatched (a
        reset among it has reached its call), or the connection ended. The reader is
        :meth:`receive_loop`; the caller bounds the wait (a reader held up by a peer that
        does not read its replies)."""
        target = self._bytes_read + self.pending_input()
        while self._bytes_read < target and self._broken is None:
            await self._read_done.wait()

    def request_flush(self) -> None:
        """Have :meth:`flush_loop` write what is queued (for callers that cannot await)."""
        self._flush_wanted.set()

    async def flush_loop(self) -> None:
        """Flush whenever :meth:`request_flush` asks, until the connection breaks."""
        while self._broken is None:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            try:
                await self.flush()
            except TransportError:
                return

    def reset_call(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        """Queue an RST_STREAM and forget the stream's buffers; :meth:`flush_loop` sends it."""
        try:
            self._protocol.reset_stream(stream_id, code)
        except (GRPCError, h2.exceptions.H2Error):
            pass  # already closed: nothing to tell the peer
        self._protocol.message_read_buffers.pop(stream_id, None)
        self.request_flush()

    async def _acknowledge(self, stream_id: int, length: int) -> None:
        self._acknowledge_nowait(stream_id, length)
        try:
            await self.flush()
        except TransportError:
            pass  # the reader learns of it too

    def _acknowledge_nowait(self, stream_id: int, length: int) -> None:
        if length and self._broken is None:
            try:
                self._protocol.acknowledge_received_data(stream_id, length)
            except (GRPCError, h2.exceptions.H2Error):
                pass  # the stream closed meanwhile

    def _window_for(self, stream_id: int) -> int:
        try:
            return int(self._protocol.flow_control_window(stream_id))
        except (GRPCError, h2.exceptions.H2Error) as error:
            raise CallResetError(f"call {stream_id} is closed: {error!r}") from None

    async def _window_changed_wait(self) -> None:
        await self._window_changed.wait()

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        for call in list(self._calls.values()):
            call._on_reset()
        self._calls.clear()
        self._window_changed.set()
        self._flush_wanted.set()
        self._read_done.set()

    # ------------------------------------------------------------ reading

    async def start(self) -> None:
        """Send our preface and SETTINGS."""
        self._protocol.initiate_connection()
        await self.flush()

    async def receive_loop(self, on_request: Callable[[ServerCall], None] | None = None) -> None:
        """Read and dispatch until the peer closes; every open call is reset at the end.

        A server passes ``on_request``, called (synchronously, in frame order) with each
        new call. Raises :class:`TransportError` when the peer breaks the protocol.
        """
        try:
            while True:
                try:
                    data = await self._read()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    raise TransportError(f"the connection broke: {error!r}") from None
                if not data:
                    return
                self.last_activity = trio.current_time()
                try:
                    events = self._protocol.receive_data(data)
                except (GRPCError, h2.exceptions.H2Error, KeyError, ValueError) as error:
                    raise TransportError(f"the peer broke the protocol: {error!r}") from None
                self.handshaken.set()
                for event in events:
                    self._dispatch(event, on_request)
                self._bytes_read += len(data)
                self._read_done.set()
                self._read_done = trio.Event()
                await self.flush()
        finally:
            self._break(self._broken or "the connection closed")

    async def _read(self) -> bytes:
        """The peer's next bytes (b"" at its end). From a socket they are read right after the
        wait, with no yield between the read and their dispatch: what :meth:`pending_input`
        counts plus what was dispatched is then all that has arrived."""
        if not isinstance(self._stream, trio.SocketStream):
            return bytes(await self._stream.receive_some(READ_SIZE))
        sock = self._stream.socket
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return os.read(sock.fileno(), READ_SIZE)
            except BlockingIOError:
                continue

    def _dispatch(self, event: object, on_request: Callable[[ServerCall], None] | None) -> None:
        if isinstance(event, WindowUpdated):
            self._window_changed.set()
            self._window_changed = trio.Event()
            return
        if isinstance(event, _GoAway):
            self.goaway = True
            return
        if isinstance(event, RequestReceived):
            call = ServerCall(self, event)
            if on_request is None:
                raise TransportError("the peer sent a request to a client")
            self._calls[call.stream_id] = call
            on_request(call)
            return
        stream_id = getattr(event, "stream_id", None)
        found = self._calls.get(stream_id) if isinstance(stream_id, int) else None
        if found is None:
            return  # a call we already forgot
        if isinstance(event, MessageReceived):
            found._deliver(event.data, event.flow_controlled_length)
        elif isinstance(event, RequestEnded):
            found._end_remote()
        elif isinstance(event, ResponseEnded) and isinstance(found, ClientCall):
            found._on_status(event.status)
            self._calls.pop(found.stream_id, None)
        elif isinstance(event, _Reset):
            found._on_reset()
            self._calls.pop(found.stream_id, None)
        elif isinstance(event, ResponseReceived):
            pass  # response headers: nothing we need

    # ------------------------------------------------------------ client side

    async def open_call(self, service: str, method: str, timeout: float | None) -> ClientCall:
        """Start a call: its headers (with grpc-timeout when ``timeout`` is given) are
        queued, and written with the first message or by :meth:`ClientCall.done_sending`."""
        if self._broken is not None:
            raise TransportError(self._broken)
        stream_id = self._protocol.get_next_available_stream_id()
        call = ClientCall(self, stream_id)
        self._calls[stream_id] = call
        deadline = datetime.timedelta(seconds=timeout) if timeout is not None else None
        self._protocol_call(lambda: self._protocol.start_request(
            stream_id, "http", service, method, None, "localhost", deadline, "+proto"))
        await trio.lowlevel.checkpoint()
        return call  # the headers go out with the first message (see ClientCall.send)

    async def close(self) -> None:
        """Say goodbye (GOAWAY) if we can, and close the stream."""
        if self._broken is None:
            try:
                self._protocol.h2_connection.close_connection()
                with trio.move_on_after(1.0):
                    await self.flush()
            except (TransportError, h2.exceptions.H2Error):
                pass
        self._break(self._broken or "closed")
        await trio.aclose_forcefully(self._stream)
