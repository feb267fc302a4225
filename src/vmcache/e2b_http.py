"""The HTTP/1.1 server of E2B's API: h11 driven on Trio streams, one task per connection.

E2B's SDKs speak plain HTTP/1.1 to a self-hosted endpoint (``http://`` URLs: no h2c), so this
is all the wire the control plane, envd's Connect calls, ``/files`` and the code interpreter
need. h11 parses and frames; this module moves bytes, bounds everything and turns a handler's
:class:`HttpResponse` into bytes:

- keep-alive (h11's cycle), ``Expect: 100-continue`` answered when the handler reads the body;
- a response body that is an async iterator goes out chunked, chunk by chunk as it yields; when
  the client goes away mid-stream (EOF or a broken socket, watched while the iterator waits)
  the iterator is cancelled and ``aclose()``\\ d at once, so a guest process's stream or a
  directory watch is let go;
- a client that goes away while a handler works on a request whose body was read whole is
  noticed too (EOF or a broken socket): the handler is cancelled, nothing is answered;
- bounded: the request head (:attr:`HttpLimits.max_header_bytes`, 431), the body
  (:attr:`HttpLimits.max_body_bytes` and a handler's own ``read_body(max_size)``, 413), the
  time a new connection has for its first request's head and any later head once started
  (:attr:`HttpLimits.header_timeout`), an idle keep-alive connection between requests
  (:attr:`HttpLimits.idle_timeout`), a silent body (:attr:`HttpLimits.body_timeout`, or the
  handler's own per-call bound), a client that does not read what we send
  (:attr:`HttpLimits.send_timeout`: the connection is dropped), and the connections served at
  once (:attr:`HttpLimits.max_connections`, and :attr:`HttpLimits.max_connections_per_peer`
  from any one non-loopback address; one more is answered 503 and closed).

A handler never sees a malformed request, and no exception of a handler reaches the client as a
traceback: :class:`HttpError` becomes its status with E2B's JSON error body ``{"code": status,
"message": ...}``; anything else is logged once and answered 500 the same way.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
import trio

log = logging.getLogger("vmcache.e2b.http")

#: How much one read from a socket asks for.
RECEIVE_SIZE = 64 * 1024

_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Content Too Large", 415: "Unsupported Media Type",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 499: "Client Closed Request",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 507: "Insufficient Storage",
}


class HttpError(Exception):
    """A request answered with ``status`` and E2B's JSON error ``{"code": status, "message"}``.

    Raised by handlers (and by :meth:`HttpRequest.read_body`) for anything a client got wrong;
    the server turns it into the response, so a handler never builds error bodies itself.
    ``headers`` go with it (``Should-Retry``, say). It derives from plain :class:`Exception`,
    not :class:`~vmcache.errors.VmcacheError`: it is an answer on the wire, not a daemon error.
    """

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)

    def response(self) -> HttpResponse:
        """The response that says this error."""
        return json_response(self.status, {"code": self.status, "message": self.message}, self.headers)


class Headers:
    """A request's headers, looked up case-insensitively (h11 gives names in lower case).

    Values are decoded as Latin-1 (what HTTP's bytes are); a repeated header's first value is
    what :meth:`get` returns, :meth:`get_all` gives every one.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes | str, bytes | str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [
            (_text(name).lower(), _text(value)) for name, value in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (any case), or ``default``."""
        key = name.lower()
        for item_name, value in self._items:
            if item_name == key:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        key = name.lower()
        return [value for item_name, value in self._items if item_name == key]

    def items(self) -> list[tuple[str, str]]:
        """``(lower-case name, value)`` pairs, in order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


BodyReader = Callable[[float | None], Awaitable[bytes]]
"""Gives the next piece of a request body, ``b""`` at its end, waiting at most the timeout
given (None: the server's :attr:`HttpLimits.body_timeout`; ``math.inf``: no bound)."""


class HttpRequest:
    """One request as a handler sees it: method, decoded path, query, headers, and the body.

    The body is not read until the handler asks (:meth:`read_body` or :meth:`body_chunks`), so
    an upload streams to the guest as it comes and a request refused on its headers costs
    nothing. Read it once, one way. Tests build one with :meth:`make`.
    """

    def __init__(self, method: str, target: str, headers: Headers, body: BodyReader,
                 content_length: int | None = None) -> None:
        """``target`` is the request line's target (``/files?path=%2Ftmp``); ``body`` is how
        the body is read; ``content_length`` its declared size, if any. :class:`HttpError`
        (400) if the target is not a path or is not UTF-8 once decoded."""
        self.method = method
        self.target = target
        self.headers = headers
        self.content_length = content_length
        if not target.startswith("/"):
            raise HttpError(400, f"the request target must be a path, not {target[:80]!r}")
        try:
            parts = urlsplit(target)
            self.path: str = unquote(parts.path, errors="strict")
            self.query: dict[str, list[str]] = parse_qs(
                parts.query, keep_blank_values=True, errors="strict", max_num_fields=1000)
        except (UnicodeDecodeError, ValueError) as error:
            raise HttpError(400, f"the request target is not valid: {error}") from None
        self._body = body
        self._consumed = False

    @classmethod
    def make(cls, method: str, target: str, headers: Iterable[tuple[str, str]] = (),
             body: bytes | Iterable[bytes] = b"") -> HttpRequest:
        """A request with ``body`` already in hand (bytes, or pieces of it): for tests and for
        handlers that call one another."""
        pieces: Iterator[bytes] = iter([body] if isinstance(body, bytes) else list(body))

        async def reader(timeout: float | None) -> bytes:
            await trio.lowlevel.checkpoint()
            for piece in pieces:
                if piece:
                    return piece
            return b""

        length = len(body) if isinstance(body, bytes) else None
        return cls(method, target, Headers(headers), reader, length)

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    async def body_chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives, in pieces (each non-empty); bounded by the server's
        :attr:`HttpLimits.max_body_bytes` (413 past it). A client silent for ``idle_timeout``
        seconds is gone (:class:`ClientGone`): None is the server's
        :attr:`HttpLimits.body_timeout`, ``math.inf`` no bound beyond the connection's own
        liveness (a client stream whose silence is the caller's business, bounded by its
        call's deadline)."""
        if self._consumed:
            raise RuntimeError("the request body was already read")
        self._consumed = True
        while True:
            piece = await self._body(idle_timeout)
            if not piece:
                return
            yield piece

    async def read_body(self, max_size: int) -> bytes:
        """The whole body; :class:`HttpError` 413 if it is (or says it is) over ``max_size``
        bytes, before reading more than that."""
        if self.content_length is not None and self.content_length > max_size:
            raise HttpError(413, f"the request body ({self.content_length} bytes) is over "
                                 f"{max_size} bytes")
        buffer = bytearray()
        async for piece in self.body_chunks():
            buffer += piece
            if len(buffer) > max_size:
                raise HttpError(413, f"the request body is over {max_size} bytes")
        return bytes(buffer)


@attrs.define
class HttpResponse:
    """What a handler answers. ``body`` as bytes goes out with a Content-Length; as an async
    iterator it goes out chunked, each piece as soon as it is yielded, and it is ``aclose()``\\ d
    when done or when the client goes away."""

    status: int
    headers: list[tuple[str, str]] = attrs.Factory(list)
    body: bytes | AsyncIterator[bytes] = b""


def json_response(status: int, value: object,
                  headers: Iterable[tuple[str, str]] = ()) -> HttpResponse:
    """A response carrying ``value`` as JSON (``application/json``)."""
    return HttpResponse(status, [("content-type", "application/json"), *headers],
                        json.dumps(value, separators=(",", ":")).encode())


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


@attrs.frozen
class HttpLimits:
    """Every bound of the server (seconds, bytes, connections)."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024 * 1024
    header_timeout: float = 10.0
    #: Longer than the E2B SDK keeps an idle pooled connection (300 s, E2B_KEEPALIVE_EXPIRY), so
    #: that the client, not this server, closes it: no request races a close on a reused one.
    idle_timeout: float = 310.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    max_connections: int = 512
    #: Connections at once from one non-loopback address. Loopback peers are not capped: every
    #: local client (the usual setup: the listener defaults to 127.0.0.1) shares 127.0.0.1, so a
    #: cap there would only cap the user's own SDK; the header timeout is what bounds a local
    #: client that opens connections and says nothing.
    max_connections_per_peer: int = 64
    #: How much of a body the handler left unread is read and dropped to keep the connection.
    drain_bytes: int = 256 * 1024


class ClientGone(Exception):
    """The peer closed, broke the socket, was silent too long or stopped reading: drop the
    connection. Nothing is answered to a client that is gone, and it is no error of the daemon:
    a handler that meets it (reading a body) lets it pass."""


class _Connection:
    """One client connection: h11's state, and the reads and writes on the stream."""

    def __init__(self, stream: trio.abc.Stream, limits: HttpLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.body_read = 0
        self.peer_closed = False
        #: Requests whose head was read on this connection (the first has no idle time).
        self.requests = 0
        #: Set once the current request's body was read to its end.
        self.body_done = trio.Event()

    async def send(self, event: h11.Event) -> None:
        """Send one event; a client that does not take it within the send timeout, or whose
        socket broke, is gone."""
        data = self.conn.send(event)
        if not data:
            return
        with trio.move_on_after(self.limits.send_timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise ClientGone("the client's socket broke") from error
        if scope.cancelled_caught:
            raise ClientGone("the client stopped reading")

    async def receive(self, timeout: float) -> None:
        """Feed h11 the next bytes from the client; :class:`ClientGone` if none came within
        ``timeout`` or the socket broke. EOF is fed to h11 (it decides what it means)."""
        if self.conn.they_are_waiting_for_100_continue:
            await self.send(h11.InformationalResponse(status_code=100, headers=[]))
        with trio.move_on_after(timeout) as scope:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise ClientGone("the client's socket broke") from error
        if scope.cancelled_caught:
            raise ClientGone("the client was silent too long")
        if not data:
            self.peer_closed = True
        self.conn.receive_data(bytes(data))

    async def next_event(self, *, head: bool, body_timeout: float | None = None) -> h11.Event:
        """The next h11 event, reading as needed: for a connection's first request head, the
        header timeout for the whole of it (a new connection that says nothing holds a slot
        no longer); for a later head, the idle timeout until its first byte and the header
        timeout for the rest; for a body, ``body_timeout`` (None: the server's) for each
        read."""
        now = trio.current_time()
        first = self.requests == 0
        idle_deadline = now + (self.limits.header_timeout if first else self.limits.idle_timeout)
        head_deadline: float | None = None
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)  # PAUSED: only before start_next_cycle
                return event
            if head:
                if head_deadline is None and self.conn.trailing_data[0]:
                    head_deadline = trio.current_time() + self.limits.header_timeout
                deadline = idle_deadline if head_deadline is None else head_deadline
                timeout = deadline - trio.current_time()
                if timeout <= 0:
                    raise ClientGone("the request's head took too long")
            else:
                timeout = self.limits.body_timeout if body_timeout is None else body_timeout
            await self.receive(timeout)

    async def read_body_piece(self, timeout: float | None = None) -> bytes:
        """The next piece of the current request's body, ``b""`` at its end; ``timeout`` as in
        :meth:`HttpRequest.body_chunks`."""
        while True:
            if self.conn.their_state is not h11.SEND_BODY:
                self.body_done.set()
                return b""
            try:
                event = await self.next_event(head=False, body_timeout=timeout)
            except h11.RemoteProtocolError as error:
                raise HttpError(400, f"the request body is malformed: {error}") from None
            if isinstance(event, h11.Data):
                self.body_read += len(event.data)
                if self.body_read > self.limits.max_body_bytes:
                    raise HttpError(413, f"the request body is over {self.limits.max_body_bytes} bytes")
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.body_done.set()
                return b""
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone("the client closed the connection mid-body")

    async def watch_for_close(self, gone: trio.CancelScope) -> None:
        """While a streamed response waits on its iterator: read what the client sends (a
        pipelined request is kept for later, up to the header bound) and cancel ``gone`` when
        the client closes or its socket breaks."""
        while len(self.conn.trailing_data[0]) <= self.limits.max_header_bytes:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.peer_closed = True
                gone.cancel()
                return
            self.conn.receive_data(bytes(data))
        await trio.sleep_forever()

    async def watch_after_body(self, gone: trio.CancelScope) -> None:
        """While a handler works: once the request's body was read whole, watch for the client
        leaving (:meth:`watch_for_close`), cancelling ``gone`` if it does."""
        await self.body_done.wait()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE):
            await self.watch_for_close(gone)
        else:
            await trio.sleep_forever()


def _response_headers(response: HttpResponse) -> list[tuple[str, str]]:
    headers = [(name, value) for name, value in response.headers
               if name.lower() not in ("content-length", "transfer-encoding")]
    if isinstance(response.body, bytes):
        headers.append(("content-length", str(len(response.body))))
    return headers


async def _aclose(iterator: AsyncIterator[bytes]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with trio.move_on_after(5) as scope:
        scope.shield = True
        try:
            await aclose()
        except Exception:
            log.exception("closing a response stream failed")


async def _send_response(connection: _Connection, method: str, response: HttpResponse) -> None:
    """Send ``response``; a streamed body is cancelled (and closed) if the client goes away."""
    status = response.status
    head = h11.Response(status_code=status, headers=_response_headers(response),
                        reason=_REASONS.get(status, "").encode())
    body = response.body
    if isinstance(body, bytes):
        await connection.send(head)
        if body and method != "HEAD" and status not in (204, 304):
            await connection.send(h11.Data(data=body))
        await connection.send(h11.EndOfMessage())
        return
    failure: str | None = None
    try:
        await connection.send(head)
        gone = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            if connection.conn.their_state in (h11.DONE, h11.MUST_CLOSE):
                nursery.start_soon(connection.watch_for_close, gone)
            with gone:
                try:
                    async for piece in body:
                        if piece:
                            await connection.send(h11.Data(data=piece))
                    await connection.send(h11.EndOfMessage())
                except ClientGone as error:
                    failure = str(error)
                except Exception as error:
                    # Too late for an error status: cut the stream (no last chunk), which the
                    # client sees as a broken response.
                    log.error("an E2B response stream failed: %s: %s", type(error).__name__,
                              error, exc_info=error)
                    failure = "the response stream failed"
            nursery.cancel_scope.cancel()
        if gone.cancelled_caught:
            failure = "the client went away mid-stream"
        if failure is not None:
            raise ClientGone(failure)
    finally:
        await _aclose(body)


async def _error_for(error: BaseException) -> HttpResponse:
    if isinstance(error, HttpError):
        return error.response()
    log.error("an E2B request failed: %s: %s", type(error).__name__, error, exc_info=error)
    return HttpError(500, "internal error: the daemon's log has the details").response()


async def serve_connection(stream: trio.abc.Stream, handler: Handler, limits: HttpLimits) -> None:
    """Serve requests on ``stream`` until the client closes, a bound is passed, or either side
    says ``Connection: close``. Closes ``stream``."""
    connection = _Connection(stream, limits)
    try:
        async with stream:
            await _serve(connection, handler)
    except ClientGone as gone:
        log.debug("an E2B client connection ended: %s", gone)


async def _serve(connection: _Connection, handler: Handler) -> None:
    conn = connection.conn
    while True:
        try:
            event = await connection.next_event(head=True)
        except h11.RemoteProtocolError as error:
            status = error.error_status_hint  # 431 for a head over the bound
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with trio.move_on_after(connection.limits.send_timeout):
                    response = HttpError(status, f"bad request: {error}").response()
                    response.headers.append(("connection", "close"))
                    await _send_response(connection, "GET", response)
            return
        if isinstance(event, h11.ConnectionClosed):
            return
        assert isinstance(event, h11.Request)
        connection.requests += 1
        size = len(event.method) + len(event.target) + sum(
            len(name) + len(value) + 4 for name, value in event.headers)
        if size > connection.limits.max_header_bytes:
            # h11 bounds only a head still arriving; one that came whole is measured here.
            response = HttpError(431, f"the request's head is over "
                                      f"{connection.limits.max_header_bytes} bytes").response()
            response.headers.append(("connection", "close"))
            await _send_response(connection, "GET", response)
            return
        await _serve_one(connection, handler, event)
        if conn.our_state is h11.MUST_CLOSE or connection.peer_closed:
            return
        if conn.their_state is h11.SEND_BODY and not await _drain(connection):
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _drain(connection: _Connection) -> bool:
    """Read and drop what the handler left of a request body, up to a bound: True if the
    connection can serve another request."""
    dropped = 0
    with trio.move_on_after(connection.limits.body_timeout):
        try:
            while dropped <= connection.limits.drain_bytes:
                piece = await connection.read_body_piece()
                if not piece:
                    return connection.conn.their_state is h11.DONE
                dropped += len(piece)
        except HttpError:
            return False
    return False


async def _serve_one(connection: _Connection, handler: Handler, event: h11.Request) -> None:
    method = event.method.decode("ascii", "replace")
    headers = Headers(event.headers)
    length_text = headers.get("content-length")
    length = int(length_text) if length_text is not None else None  # h11 checked the digits
    connection.body_read = 0
    connection.body_done = trio.Event()
    if not length and headers.get("transfer-encoding") is None:
        # No body: h11 ends the message without reading, so the request is DONE now.
        assert isinstance(connection.conn.next_event(), h11.EndOfMessage)
        connection.body_done.set()
    response: HttpResponse | None = None
    left: ClientGone | None = None
    gone = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.watch_after_body, gone)
        with gone:
            try:
                if length is not None and length > connection.limits.max_body_bytes:
                    raise HttpError(413, f"the request body ({length} bytes) is over "
                                         f"{connection.limits.max_body_bytes} bytes")
                request = HttpRequest(method, event.target.decode("latin-1"), headers,
                                      connection.read_body_piece, length)
                response = await handler(request)
            except ClientGone as error:
                left = error
            except Exception as error:
                response = await _error_for(error)
        nursery.cancel_scope.cancel()
    if left is not None:
        raise left
    if gone.cancelled_caught or response is None:
        raise ClientGone("the client went away before its answer")
    if connection.conn.their_state is h11.SEND_BODY and (
            response.status >= 400 or connection.conn.they_are_waiting_for_100_continue):
        # A refused request's unread body is not read: say so, and close after.
        response.headers.append(("connection", "close"))
    await _send_response(connection, method, response)


async def serve_http(handler: Handler, host: str, port: int, *, limits: HttpLimits | None = None,
                     task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
                     ) -> None:
    """Listen on ``host:port`` and serve ``handler`` until cancelled. ``task_status.started``
    gets the listeners once they listen (port 0 picks a free port: read it from them)."""
    limits = limits or HttpLimits()
    listeners = await trio.open_tcp_listeners(port, host=host)
    await serve_listeners(handler, listeners, limits=limits, task_status=task_status)


async def serve_listeners(handler: Handler, listeners: list[trio.SocketListener], *,
                          limits: HttpLimits | None = None,
                          task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """Serve ``handler`` on ``listeners`` (taken over: closed when this ends)."""
    limits = limits or HttpLimits()
    slots = trio.CapacityLimiter(limits.max_connections)

    per_peer: dict[str, int] = {}

    async def one(stream: trio.SocketStream) -> None:
        peer = _peer_address(stream)
        if peer is not None and per_peer.get(peer, 0) >= limits.max_connections_per_peer:
            await _refuse(stream, limits)
            return
        try:
            slots.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            await _refuse(stream, limits)
            return
        if peer is not None:
            per_peer[peer] = per_peer.get(peer, 0) + 1
        try:
            await serve_connection(stream, handler, limits)
        except Exception as error:  # a bug here must not end the listener
            log.error("an E2B connection failed: %s: %s", type(error).__name__, error, exc_info=error)
        finally:
            slots.release_on_behalf_of(stream)
            if peer is not None:
                per_peer[peer] -= 1
                if not per_peer[peer]:
                    del per_peer[peer]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, one, listeners)
        task_status.started(listeners)


def _peer_address(stream: trio.SocketStream) -> str | None:
    """The client's address, for the per-peer cap; None for a loopback peer (not capped) or
    one whose address cannot be read."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return None
    host = address[0] if isinstance(address, tuple) else None
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return None if ip.is_loopback else host


async def _refuse(stream: trio.abc.Stream, limits: HttpLimits) -> None:
    """Answer one connection too many with 503 and close it."""
    body = json.dumps({"code": 503, "message": "too many connections; try again later"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    with trio.move_on_after(min(limits.send_timeout, 5)):
        try:
            async with stream:
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

