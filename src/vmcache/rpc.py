"""Every purerpc detail lives here: gRPC over a Unix socket, both ends.

purerpc 0.8.0 (pinned exactly) only listens on and dials TCP. Its HTTP/2 and
gRPC framing (``GRPCProtoSocket``) works over any anyio byte stream, except
that it sets TCP socket options unconditionally, which fails with EOPNOTSUPP on
``AF_UNIX``; :class:`_UnixGRPCSocket` skips that. Its ``Server`` also catches
everything with bare ``except:`` and turns any exception into ``CANCELLED`` with
a repr, swallowing Trio's cancellation; so the server side here has its own
connection handler that

* maps our errors to real status codes (UNAVAILABLE, DEADLINE_EXCEEDED, ...),
* honours the client's ``grpc-timeout`` as a deadline on the handler,
* cancels a connection's pending requests when the client goes away, and
* lets a handler learn whether its reply was handed to the connection
  (:class:`Reply`), which is how a VM's ownership moves only with a sent reply.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import h2.errors
import h2.exceptions
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import SocketWrapper
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import RequestReceived
from purerpc.grpclib.exceptions import GRPCError, RpcFailedError
from purerpc.grpclib.status import Status, StatusCode
from purerpc.wrappers import (
    extract_message_from_singleton_stream,
    send_single_message_client,
    stream_to_async_iterator,
)

from ._proto import cache_grpc, cache_pb2
from .errors import (
    CacheError,
    CacheUnavailableError,
    DaemonNotRunningError,
    DeadlineExceededError,
    VmcacheError,
)

log = logging.getLogger("vmcache.rpc")

SERVICE = "cache.CacheService"
#: Connections served at once; more are closed at once (a flood must not exhaust fds).
MAX_CONNECTIONS = 512
#: Extra time the client waits beyond the deadline it sends, for the server's answer.
CLIENT_GRACE = 2.0


# ------------------------------------------------------------ transport


class _UnixSocketWrapper(SocketWrapper):  # type: ignore[misc]
    @staticmethod
    def _set_socket_options(stream: Any) -> None:
        """TCP keepalive and NODELAY do not apply to a Unix socket."""


class _ResetAwareConnection(GRPCConnection):  # type: ignore[misc]
    """purerpc drops RST_STREAM; we need it: a client that cancels one call (grpcio does
    this when its deadline passes) must stop that call's handler, or a VM is handed to
    nobody."""

    on_reset: Callable[[int], None] | None = None

    def _stream_reset(self, event: Any) -> list[Any]:
        if self.on_reset is not None:
            self.on_reset(event.stream_id)
        return []


class _UnixGRPCSocket(GRPCProtoSocket):  # type: ignore[misc]
    """purerpc's gRPC-over-HTTP/2 socket on any anyio stream, Unix sockets included."""

    def __init__(self, config: GRPCConfiguration, sock: Any,
                 receive_buffer_size: int = 1024 * 1024) -> None:
        AsyncExitStack.__init__(self)
        self._grpc_connection = _ResetAwareConnection(config=config)
        self._socket = _UnixSocketWrapper(self._grpc_connection, sock)
        self._receive_buffer_size = receive_buffer_size
        self._streams: dict[int, Any] = {}


_STREAM_ERRORS = (
    GRPCError,
    h2.exceptions.ProtocolError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)


# ------------------------------------------------------------ server


@attrs.frozen
class Reply:
    """A response plus what to do once it is, or is not, handed to the connection."""

    message: ProtoMessage
    delivered: Callable[[], Awaitable[None]]
    undelivered: Callable[[], Awaitable[None]]


Handler = Callable[[ProtoMessage], Awaitable["ProtoMessage | Reply | AsyncIterator[ProtoMessage]"]]


def status_for(error: BaseException) -> Status:
    """The gRPC status a client sees for an error raised by a handler."""
    if isinstance(error, CacheUnavailableError):
        code = StatusCode.UNAVAILABLE
    elif isinstance(error, DeadlineExceededError):
        code = StatusCode.DEADLINE_EXCEEDED
    elif isinstance(error, VmcacheError):
        code = StatusCode.FAILED_PRECONDITION
    else:
        return Status(StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")
    return Status(code, str(error))


def _timeout_seconds(event: RequestReceived) -> float:
    timeout = getattr(event, "timeout", None)
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else math.inf


class RpcServer:
    """Serves ``cache.CacheService`` on a listening Unix socket.

    ``handlers`` maps a method name (``"GetBaseVM"``) to an async function that
    takes the request message and returns the response (or a :class:`Reply`).
    ``check_peer`` sees each connection's socket before any byte is read; it
    returns None to admit it or a reason to refuse it.
    """

    def __init__(
        self,
        handlers: dict[str, Handler],
        check_peer: Callable[[socket.socket], str | None] | None = None,
    ) -> None:
        servicer = cache_grpc.CacheServiceServicer()
        methods = servicer.service.methods
        self._request_types: dict[str, type[ProtoMessage]] = {
            name: method.signature.request_type for name, method in methods.items()
        }
        unknown = set(handlers) - set(self._request_types)
        if unknown:
            raise ValueError(f"no such rpc in {SERVICE}: {', '.join(sorted(unknown))}")
        self._handlers = handlers
        self._check_peer = check_peer
        self.connections = 0
        self._refused_over_cap = 0
        self.active_requests = 0
        self._idle = trio.Event()
        self._idle.set()

    async def serve(self, sock: socket.socket, *, task_status: trio.TaskStatus[None]) -> None:
        """Accept connections on the listening ``sock`` until cancelled."""
        listener = await anyio.abc.SocketListener.from_socket(sock)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            backoff = 0.01
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:  # EMFILE and friends: wait, do not spin
                    log.warning("accept failed: %s; retrying in %.2f s", error, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.01
                if self.connections >= MAX_CONNECTIONS:
                    self._refused_over_cap += 1
                    if self._refused_over_cap in (1, 10, 100) or self._refused_over_cap % 1000 == 0:
                        log.warning("%d connections open already; closed %d new ones",
                                    self.connections, self._refused_over_cap)
                    await stream.aclose()
                    continue
                nursery.start_soon(self._connection, stream)

    async def wait_idle(self) -> None:
        """Wait until no request is being handled."""
        while self.active_requests:
            self._idle = trio.Event()
            await self._idle.wait()

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        try:
            await self._serve_connection(stream)
        finally:
            self.connections -= 1

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            if self._check_peer is not None and (reason := self._check_peer(raw)) is not None:
                await self._refuse(stream, reason)
                return
            try:
                config = GRPCConfiguration(client_side=False)
                scopes: dict[int, trio.CancelScope] = {}

                def cancel_request(stream_id: int) -> None:
                    if stream_id in scopes:
                        log.debug("client cancelled its request on stream %d", stream_id)
                        scopes[stream_id].cancel()

                async with _UnixGRPCSocket(config, stream) as grpc, trio.open_nursery() as requests:
                    grpc._grpc_connection.on_reset = cancel_request
                    async for grpc_stream in grpc.listen():
                        requests.start_soon(self._request, grpc_stream, scopes)
                    # The client closed the connection: nobody waits for these any more.
                    requests.cancel_scope.cancel()
            except* _STREAM_ERRORS as group:
                log.info("closed a broken client connection: %s", _first_line(group))
            except* Exception as group:  # never let one connection take the daemon down
                log.warning("closed a client connection after an error: %s", _first_line(group))
                log.debug("details", exc_info=group)

    async def _refuse(self, stream: anyio.abc.SocketStream, reason: str) -> None:
        """Answer every call on the connection with PERMISSION_DENIED, for at most a second.

        Hanging up right after answering would make the client's own writes fail before
        it reads the answer; so we wait for it to hang up first.
        """
        log.warning("refused a connection: %s", reason)
        with trio.move_on_after(1.0):
            try:
                async with _UnixGRPCSocket(GRPCConfiguration(client_side=False), stream) as grpc:
                    async for grpc_stream in grpc.listen():
                        await grpc_stream.start_response()
                        await grpc_stream.close(Status(StatusCode.PERMISSION_DENIED, reason))
            except* (*_STREAM_ERRORS, Exception):
                pass

    async def _request(self, stream: GRPCProtoStream, scopes: dict[int, trio.CancelScope]) -> None:
        self.active_requests += 1
        try:
            with trio.CancelScope() as scopes[stream.stream_id]:
                await self._respond(stream)
        except* _STREAM_ERRORS as group:
            log.info("could not answer a client: %s", _first_line(group))
        finally:
            scopes.pop(stream.stream_id, None)
            self.active_requests -= 1
            if not self.active_requests:
                self._idle.set()

    async def _respond(self, stream: GRPCProtoStream) -> None:
        await stream.start_response()
        event = await stream.receive_event()
        if not isinstance(event, RequestReceived):
            await stream.close(Status(StatusCode.INTERNAL, "expected request headers"))
            return
        if event.service_name != SERVICE or event.method_name not in self._handlers:
            await stream.close(Status(
                StatusCode.UNIMPLEMENTED, f"no method {event.service_name}/{event.method_name}"
            ))
            return
        stream.expect_message_type(self._request_types[event.method_name])
        handler = self._handlers[event.method_name]
        reply: ProtoMessage | Reply | AsyncIterator[ProtoMessage] | None = None
        delivered = False
        with trio.move_on_after(_timeout_seconds(event)) as deadline:
            try:
                request = await extract_message_from_singleton_stream(stream)
                reply = await handler(request)
                if isinstance(reply, Reply):
                    await stream.send_message(reply.message)
                elif isinstance(reply, ProtoMessage):
                    await stream.send_message(reply)
                else:
                    async for message in reply:
                        await stream.send_message(message)
                await stream.close(Status(StatusCode.OK))
                delivered = True
            except (VmcacheError, DecodeError, RpcFailedError) as error:
                status = (error.status if isinstance(error, RpcFailedError)
                          else status_for(error) if isinstance(error, VmcacheError)
                          else Status(StatusCode.INVALID_ARGUMENT, "request is not valid protobuf"))
                await stream.close(status)
            except Exception as error:  # a bug: answer INTERNAL, keep serving, log it
                log.exception("%s failed", event.method_name)
                await stream.close(status_for(error))
            finally:
                if isinstance(reply, Reply):
                    with trio.CancelScope(shield=True):
                        await (reply.delivered if delivered else reply.undelivered)()
        if deadline.cancelled_caught and not delivered:
            await stream.close(Status(StatusCode.DEADLINE_EXCEEDED, "deadline passed"))


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def _first_line(group: BaseExceptionGroup[BaseException]) -> str:
    """One line about the first real error inside a (nested) exception group."""
    return _one_line(_leaf(group))


def bind_unix_socket(path: Path, group_gid: int | None = None) -> socket.socket:
    """A listening socket at ``path``, mode 0600, replacing a stale socket file.

    With ``group_gid`` the socket is mode 0660 and belongs to that group, and its
    directory is 0710 (that group may traverse it, not list it).

    A socket file with a live server behind it is left alone: raises
    :class:`EndpointInUseError`.
    """
    from .errors import ConfigError, EndpointInUseError
    from .security import check_socket_directory

    check_socket_directory(path.parent)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the socket's directory {path.parent}: {error.strerror}") from None
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ConfigError(f"endpoint {path} exists and is not a socket; remove it or choose another")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(2.0)
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s (no server behind it)", path)
            path.unlink(missing_ok=True)
        except OSError as error:
            raise EndpointInUseError(f"cannot check endpoint {path}: {error.strerror}") from None
        else:
            raise EndpointInUseError(f"another vmcache daemon is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        if group_gid is not None:
            os.chown(path, -1, group_gid)
            os.chmod(path, 0o660)
            # The group must be able to reach the socket: let it traverse (not list) the directory.
            os.chown(path.parent, -1, group_gid)
            os.chmod(path.parent, 0o710)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {error.strerror}") from None
    return sock


# ------------------------------------------------------------ client


def _error_for(status: Status) -> CacheError:
    message = status.status_message or status.status_code.name
    if status.status_code == StatusCode.UNAVAILABLE:
        return CacheUnavailableError(f"daemon cannot hand out a VM: {message}")
    if status.status_code == StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(
            f"no VM ready before the deadline ({message}); retry, raise --timeout or enlarge the cache"
        )
    return CacheError(f"daemon answered {status.status_code.name}: {message}")


class Channel:
    """A gRPC connection to the daemon over its Unix socket."""

    def __init__(self, endpoint: Path, grpc: _UnixGRPCSocket) -> None:
        self.endpoint = endpoint
        self._grpc = grpc

    async def call(self, method: str, response_type: type[ProtoMessage],
                   timeout: float, request: ProtoMessage | None = None) -> Any:
        """One unary call, bounded by ``timeout`` (sent to the server as grpc-timeout)."""
        try:
            with trio.fail_after(timeout + CLIENT_GRACE):
                stream = await self._grpc.start_request(
                    "http", SERVICE, method, Empty.DESCRIPTOR.full_name,
                    authority="localhost", timeout=datetime.timedelta(seconds=timeout),
                )
                stream.expect_message_type(response_type)
                try:
                    await send_single_message_client(stream, request if request is not None else Empty())
                    return await extract_message_from_singleton_stream(stream)
                except BaseException:
                    self._reset(stream.stream_id)
                    raise
        except trio.TooSlowError:
            raise DeadlineExceededError(f"{method}: no answer from the daemon within {timeout:g} s") from None
        except RpcFailedError as error:
            raise _error_for(error.status) from None
        except _STREAM_ERRORS as error:
            raise CacheError(f"{method}: the connection to the daemon broke ({_one_line(error)})") from None


    def _reset(self, stream_id: int) -> None:
        """Tell the daemon we gave up on a call (RST_STREAM), so that it stops waiting on our
        behalf: a VM it found for us would otherwise go to a call nobody reads."""
        try:
            self._grpc._grpc_connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            self._grpc._socket._flush_event.set()
        except Exception:  # the stream or the connection is already closed: nothing to tell
            pass

    async def stream(self, method: str, response_type: type[ProtoMessage]) -> AsyncIterator[Any]:
        """A server-streaming call with no deadline: yields each message until the server ends."""
        try:
            stream = await self._grpc.start_request(
                "http", SERVICE, method, Empty.DESCRIPTOR.full_name, authority="localhost")
            stream.expect_message_type(response_type)
            await send_single_message_client(stream, Empty())
            async for message in stream_to_async_iterator(stream):
                yield message
        except RpcFailedError as error:
            raise _error_for(error.status) from None
        except _STREAM_ERRORS as error:
            raise CacheError(f"{method}: the connection to the daemon broke ({_one_line(error)})") from None


@asynccontextmanager
async def open_channel(endpoint: Path) -> AsyncIterator[Channel]:
    """Connect to the daemon at ``endpoint``; no daemon there is a DaemonNotRunningError."""
    try:
        with trio.fail_after(10):
            stream = await anyio.connect_unix(os.fspath(endpoint))
    except (FileNotFoundError, ConnectionRefusedError, trio.TooSlowError):
        raise DaemonNotRunningError(
            f"no vmcache daemon at {endpoint}: start one with `vmcache serve`"
        ) from None
    except PermissionError:
        raise DaemonNotRunningError(f"not allowed to connect to {endpoint} (permission denied)") from None
    try:
        async with stream, _UnixGRPCSocket(GRPCConfiguration(client_side=True), stream) as grpc:
            yield Channel(endpoint, grpc)
    except _STREAM_ERRORS as error:
        raise CacheError(f"the connection to the daemon broke ({_one_line(error)})") from None
    except BaseExceptionGroup as group:
        # purerpc's reader and writer run in a task group: unwrap to the error that matters.
        ours, others = group.split(VmcacheError)
        if ours is not None:
            raise _leaf(ours) from None
        broken, others = others.split(_STREAM_ERRORS) if others is not None else (None, None)
        if others is not None or broken is None:
            raise
        raise CacheError(f"the connection to the daemon broke ({_first_line(broken)})") from None


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


#: The response type of each rpc, for the client.
RESPONSE_TYPES: dict[str, type[ProtoMessage]] = {
    "Config": cache_pb2.GrpcVMConfig,
    "GetBaseVM": cache_pb2.GrpcVM,
    "Status": cache_pb2.GrpcStatus,
    "Quit": Empty,
    "Watch": cache_pb2.GrpcEvent,
}
