"""Serving one gRPC service on a listening Unix socket.

Modelled on Trio's ``serve_listeners``: ``started()`` fires once the socket is
being served, and only capacity errors of ``accept`` (EMFILE, ENFILE, ENOMEM,
ENOBUFS) are retried, with a capped backoff; any other error ends the server.

Each connection is checked (peer credentials) before a byte is read, must finish
its HTTP/2 handshake within :data:`HANDSHAKE_TIMEOUT` and is closed after
:data:`IDLE_TIMEOUT` without a call open. At most :data:`MAX_CONNECTIONS` are
served at once; a new one beyond that takes the place of the longest-idle
connection, so idle clients can never lock the others out.

Each call runs its handler in its own cancel scope, cancelled when the client
resets the call (RST_STREAM), when the connection ends, or when the client's
deadline (``grpc-timeout``) passes. A handler's :class:`~vmcache.errors.VmcacheError`
becomes a real status code; anything else is INTERNAL and logged, and the
daemon keeps serving.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

import attrs
import trio
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from ..backoff import Backoff
from ..errors import BadRequestError, LifecycleError, VmcacheError, unwrap_group
from ..security import PeerCredentials, peer_credentials
from .status import status_for
from .transport import (
    CallExpiredError,
    CallResetError,
    Code,
    Connection,
    RpcStatus,
    ServerCall,
    TransportError,
)

log = logging.getLogger("vmcache.rpc")

#: Connections served at once.
MAX_CONNECTIONS = 512
#: A new connection must complete its HTTP/2 preface within this many seconds.
HANDSHAKE_TIMEOUT = 5.0
#: A connection with no call open is closed after this many seconds of silence.
IDLE_TIMEOUT = 60.0
#: How long a refused peer gets PERMISSION_DENIED answers, after its first one, before we hang up.
REFUSED_GRACE = 1.0
#: A reply that gives something away (a VM) is not written when less than this is left of the
#: client's deadline: its clock started before ours, and it must still read the reply in time.
REPLY_MARGIN = 0.005
#: A refused peer that asks nothing within this many seconds is hung up on.
REFUSED_FIRST_CALL_TIMEOUT = HANDSHAKE_TIMEOUT
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

RequestT = TypeVar("RequestT", bound=ProtoMessage)
OK = RpcStatus(Code.OK)


class CallGone(Exception):
    """The client reset the call or went away: what we send cannot reach it."""


class CallExpired(CallGone):
    """The client's deadline passed before the reply could be written: it no longer waits."""


class RpcCall(Generic[RequestT]):
    """One call as a handler sees it: typed messages in, messages out, who is calling."""

    def __init__(self, call: ServerCall, request_type: type[RequestT], peer: PeerCredentials) -> None:
        self._call = call
        self._request_type = request_type
        self.method = call.method
        self.peer = peer
        #: Seconds the client allowed the call (inf: no deadline).
        self.timeout = call.timeout
        #: trio.current_time() when the request's bytes were read (before they were parsed).
        self.arrived_at = call.arrived_at
        #: trio.current_time() when the client gives up: ``timeout`` after ``arrived_at``.
        self.deadline = call.deadline
        self.finished = False

    @property
    def client_gone(self) -> bool:
        return self._call.reset

    async def receive(self) -> RequestT | None:
        """The client's next message, or None when it has sent its last."""
        try:
            data = await self._call.receive()
        except TransportError as error:
            raise CallGone(str(error)) from None
        if data is None:
            return None
        message = self._request_type()
        try:
            message.ParseFromString(data)
        except DecodeError:
            raise BadRequestError(f"{self.method}: the request is not valid protobuf (build the "
                                  "client from protos/cache.proto)") from None
        return message

    async def receive_one(self) -> RequestT:
        message = await self.receive()
        if message is None:
            raise BadRequestError(f"{self.method}: the call carried no request message; send one")
        return message

    async def send(self, message: ProtoMessage, *, last: bool = False) -> None:
        """Send one message; ``last``: :meth:`finish` comes next and may write both at once."""
        try:
            await self._call.send(message.SerializeToString(), last=last)
        except TransportError as error:
            raise CallGone(str(error)) from None

    async def reply(self, message: ProtoMessage) -> None:
        """A unary call's response and OK status in one write, only while the client still
        waits for it (see :meth:`ServerCall.reply`): its reset or its deadline (less than
        ``REPLY_MARGIN`` s away) raises :class:`CallGone` (:class:`CallExpired`), and then
        nothing of the reply was written. For a reply that gives something away (a VM)."""
        self.finished = True
        try:
            await self._call.reply(message.SerializeToString(), margin=REPLY_MARGIN)
        except CallExpiredError as error:
            self.finished = False  # the client is told DEADLINE_EXCEEDED
            raise CallExpired(str(error)) from None
        except TransportError as error:
            raise CallGone(str(error)) from None

    async def finish(self, status: RpcStatus = OK) -> None:
        """End the call; returns once the status is written to the socket, else CallGone."""
        self.finished = True
        try:
            await self._call.finish(status)
        except TransportError as error:
            raise CallGone(str(error)) from None


CallHandler = Callable[[RpcCall[ProtoMessage]], Awaitable[None]]


@attrs.frozen
class Method:
    """One rpc: its request type and the handler that serves a call of it."""

    request_type: type[ProtoMessage]
    handler: CallHandler


def unary(handler: Callable[[ProtoMessage], Awaitable[ProtoMessage]]) -> CallHandler:
    """A handler for a unary rpc: one request in, one response out."""

    async def serve(call: RpcCall[ProtoMessage]) -> None:
        request = await call.receive_one()
        reply = await handler(request)
        await call.send(reply, last=True)
        await call.finish()

    return serve


def unary_with_peer(
    handler: Callable[[ProtoMessage, PeerCredentials], Awaitable[ProtoMessage]],
) -> CallHandler:
    """A handler for a unary rpc that needs to know who calls (SO_PEERCRED of the connection)."""

    async def serve(call: RpcCall[ProtoMessage]) -> None:
        request = await call.receive_one()
        reply = await handler(request, call.peer)
        await call.send(reply, last=True)
        await call.finish()

    return serve


def server_streaming(
    handler: Callable[[ProtoMessage], Awaitable[AsyncIterator[ProtoMessage]]],
) -> CallHandler:
    """A handler for a server-streaming rpc: one request in, messages out until it ends."""

    async def serve(call: RpcCall[ProtoMessage]) -> None:
        request = await call.receive_one()
        async for message in await handler(request):
            await call.send(message)
        await call.finish()

    return serve


PeerCheck = Callable[[PeerCredentials], Awaitable["str | None"]]


@attrs.define(eq=False)
class _Served:
    """A connection being served, for the idle timeout and eviction."""

    connection: Connection
    scope: trio.CancelScope


class RpcServer:
    """Serves ``service`` (its ``methods`` by name) on a listening Unix socket.

    ``check_peer`` sees each connection's peer credentials before any byte is read;
    it returns None to admit the peer or a reason to refuse it.
    """

    def __init__(self, service: str, methods: dict[str, Method],
                 check_peer: PeerCheck | None = None) -> None:
        self.service = service
        self._methods = methods
        self._check_peer = check_peer
        self._served: set[_Served] = set()
        self.evicted = 0
        self.refused_over_cap = 0
        self.active_calls = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def connections(self) -> int:
        return len(self._served)

    async def serve(self, sock: socket.socket, *, task_status: trio.TaskStatus[None]) -> None:
        """Accept connections on the listening ``sock`` until cancelled."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await self.serve_listener(listener, task_status=task_status)

    async def serve_listener(self, listener: trio.abc.Listener[trio.SocketStream], *,
                             task_status: trio.TaskStatus[None]) -> None:
        """Accept connections from ``listener`` until cancelled (or an error that is not
        about capacity: those end the server, as they do Trio's ``serve_listeners``)."""
        backoff = Backoff(0.01, 1.0)
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as error:
                    if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    delay = backoff.next()
                    log.warning("accept failed: %s; retrying in %.2f s", error.strerror, delay)
                    await trio.sleep(delay)
                    continue
                backoff.reset()
                if len(self._served) >= MAX_CONNECTIONS and not self._evict_one():
                    self.refused_over_cap += 1
                    if self.refused_over_cap in (1, 10, 100) or self.refused_over_cap % 1000 == 0:
                        log.warning("%d connections busy; closed %d new ones",
                                    len(self._served), self.refused_over_cap)
                    await trio.aclose_forcefully(stream)
                    continue
                served = _Served(Connection(stream, client_side=False), trio.CancelScope())
                self._served.add(served)
                nursery.start_soon(self._connection, stream, served)

    def _evict_one(self) -> bool:
        """Close the longest-idle connection (no call open) to make room; False if none is."""
        idle = [served for served in self._served if served.connection.open_calls == 0]
        if not idle:
            return False
        oldest = min(idle, key=lambda served: served.connection.last_activity)
        self._served.discard(oldest)
        oldest.scope.cancel()
        self.evicted += 1
        if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
            log.warning("%d connections open: closed the longest-idle one (%d so far)",
                        MAX_CONNECTIONS, self.evicted)
        return True

    async def wait_idle(self) -> None:
        """Wait until no call is being handled."""
        while self.active_calls:
            self._idle = trio.Event()
            await self._idle.wait()

    async def _connection(self, stream: trio.SocketStream, served: _Served) -> None:
        connection = served.connection
        try:
            with served.scope:
                try:
                    peer = peer_credentials(stream.socket)
                except OSError as error:
                    log.warning("refused a connection: cannot read its credentials: %s", error.strerror)
                    return
                refusal = await self._check_peer(peer) if self._check_peer is not None else None
                refused_answered = trio.Event()
                if refusal is not None:
                    log.warning("refused a connection: %s", refusal)
                async with trio.open_nursery() as calls:
                    calls.start_soon(connection.flush_loop)
                    if refusal is None:
                        calls.start_soon(self._watch_timeouts, connection, served.scope)
                    else:
                        calls.start_soon(self._end_refused, served.scope, refused_answered)
                    await connection.start()

                    def on_request(call: ServerCall) -> None:
                        calls.start_soon(self._call, call, peer, refusal, refused_answered)

                    await connection.receive_loop(on_request)
                    calls.cancel_scope.cancel()  # the client hung up: nobody waits for these
        except* TransportError as group:
            # A peer that never spoke (a probe: is anyone listening?) is not news.
            level = logging.INFO if connection.handshaken.is_set() else logging.DEBUG
            log.log(level, "closed a client connection: %s", unwrap_group(group))
        except* Exception as group:  # never let one connection take the daemon down
            what = unwrap_group(group)  # one error, or the group of several
            log.warning("closed a client connection after an error: %s: %s", type(what).__name__, what)
            log.debug("details", exc_info=group)
        finally:
            self._served.discard(served)
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await connection.close()

    @staticmethod
    async def _end_refused(scope: trio.CancelScope, refused_answered: trio.Event) -> None:
        """Hang up on a refused peer shortly after it has read why, or when it asks nothing.

        The grace counts from the first refusal sent, not from the accept: a client
        that is slow to start (a loaded host) still learns why instead of seeing a
        broken connection.
        """
        with trio.move_on_after(REFUSED_FIRST_CALL_TIMEOUT):
            await refused_answered.wait()
            await trio.sleep(REFUSED_GRACE)
        scope.cancel()

    async def _watch_timeouts(self, connection: Connection, scope: trio.CancelScope) -> None:
        """Close the connection if its handshake is late or when idle too long."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await connection.handshaken.wait()
        if not connection.handshaken.is_set():
            log.info("closed a connection that sent no HTTP/2 preface within %g s", HANDSHAKE_TIMEOUT)
            scope.cancel()
            return
        while True:
            idle_since = connection.last_activity
            await trio.sleep_until(idle_since + IDLE_TIMEOUT)
            if connection.open_calls == 0 and connection.last_activity == idle_since:
                log.debug("closed a connection idle for %g s", IDLE_TIMEOUT)
                scope.cancel()
                return

    async def _call(self, call: ServerCall, peer: PeerCredentials, refusal: str | None,
                    refused_answered: trio.Event) -> None:
        self.active_calls += 1
        try:
            with call.cancel_scope:
                await self._respond(call, peer, refusal)
                if refusal is not None:
                    refused_answered.set()
        except (CallGone, TransportError) as error:
            log.debug("could not answer a client on %s: %s", call.method, error)
        finally:
            call.abandon()
            self.active_calls -= 1
            if not self.active_calls:
                self._idle.set()

    async def _respond(self, call: ServerCall, peer: PeerCredentials, refusal: str | None) -> None:
        if refusal is not None:
            await call.finish(RpcStatus(Code.PERMISSION_DENIED, refusal))
            return
        method = self._methods.get(call.method) if call.service == self.service else None
        if method is None:
            await call.finish(RpcStatus(Code.UNIMPLEMENTED, f"no method {call.service}/{call.method}"))
            return
        rpc_call = RpcCall(call, method.request_type, peer)
        status: RpcStatus | None = None
        # The client's time counts from its request's bytes read, not from this task's start.
        with trio.move_on_at(call.deadline if call.timeout > 0 else math.inf) as deadline:
            try:
                await method.handler(rpc_call)
            except LifecycleError as error:  # a VM moved where it may not go: a bug of ours
                log.exception("%s failed", call.method)
                status = RpcStatus(Code.INTERNAL, f"a bug in vmcache: {error}")
            except VmcacheError as error:
                status = status_for(error)
            except CallResetError:
                raise CallGone("the client reset the call") from None
            except CallExpired:
                status = RpcStatus(Code.DEADLINE_EXCEEDED, "deadline passed")
            except CallGone:
                raise
            except Exception as error:  # a bug: answer INTERNAL, keep serving, log it
                log.exception("%s failed", call.method)
                status = status_for(error)
        if deadline.cancelled_caught and not rpc_call.finished:
            status = RpcStatus(Code.DEADLINE_EXCEEDED, "deadline passed")
        if status is not None and not rpc_call.finished:
            await rpc_call.finish(status)
        elif not rpc_call.finished:
            await rpc_call.finish()
