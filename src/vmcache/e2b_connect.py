"""The Connect protocol over HTTP/1.1, JSON codec only: what envd's clients speak.

E2B's SDKs (Python's ``connectrpc`` with the SDK's own JSON codec, JS's connect-web with
``useBinaryFormat: false``) call envd with Connect, never gRPC: unary calls POST a JSON body
(``application/json``) and read a JSON body, an error being a non-200 status with
``{"code": "not_found", "message": ...}``; server-streaming calls POST one *enveloped* message
(``application/connect+json``) and read envelopes (a flags byte, a 4-byte big-endian length,
the JSON) up to an end-of-stream envelope (flag ``0x02``) carrying ``{}`` or
``{"error": {"code", "message"}}``. Both SDKs disable compression (they send no
``Content-Encoding``/``Connect-Content-Encoding`` and accept only identity); a compressed request
is refused with ``unimplemented``, and nothing is ever sent compressed.

:class:`ConnectRouter` maps a path (``/process.Process/Start``) to a handler on dicts in the
protobuf-JSON form; it bounds the request, applies ``Connect-Timeout-Ms`` as a deadline, and
turns errors into what the client reads: a :class:`ConnectError` keeps its code and message,
the sandbox ending under a call (:class:`~vmcache.errors.VMGoneError`) is left to the server
(404, as E2B's proxy answers) or ends a stream ``unavailable``, anything else is ``internal``
(logged once, no traceback to the client).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import attrs
import trio

from .e2b_http import ClientGone, Headers, HttpError, HttpRequest, HttpResponse
from .errors import VMGoneError

if TYPE_CHECKING:
    from .e2b_sandbox import SandboxRuntime

log = logging.getLogger("vmcache.e2b.connect")

UNARY_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/connect+json"

#: Flags of an envelope: its payload is compressed; it ends the stream.
FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02

#: The largest request message accepted (stdin data and file names are what gets big).
MAX_REQUEST_BYTES = 8 * 1024 * 1024
#: The largest ``Connect-Timeout-Ms`` (Connect says at most 10 digits).
_MAX_TIMEOUT_DIGITS = 10


class Code(enum.StrEnum):
    """Connect's error codes (the strings on the wire), each with its HTTP status for a unary
    error (:attr:`http_status`, as Connect's spec maps them)."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"

    @property
    def http_status(self) -> int:
        """The HTTP status of a unary error with this code."""
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    Code.CANCELED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429, Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409, Code.OUT_OF_RANGE: 400, Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503, Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401,
}


class ConnectError(Exception):
    """An error a Connect handler answers with: ``code`` and a message the user reads. It
    derives from plain :class:`Exception`, not :class:`~vmcache.errors.VmcacheError`: it is an
    answer on the wire, not a daemon error."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        """The error as Connect puts it on the wire."""
        return {"code": str(self.code), "message": self.message}


@attrs.define
class CallContext:
    """What a handler knows of its call besides the message."""

    sandbox: SandboxRuntime
    user: str
    deadline: float | None
    headers: Headers

    def remaining(self) -> float | None:
        """Seconds left before the deadline (at least 0), None if there is none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - trio.current_time())


UnaryHandler = Callable[[dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
StreamHandler = Callable[[dict[str, Any], CallContext], AsyncIterator[dict[str, Any]]]
#: A client-streaming procedure: the request's messages as they arrive, one answer.
ClientStreamHandler = Callable[[AsyncIterator[dict[str, Any]], CallContext], Awaitable[dict[str, Any]]]


def encode_envelope(flags: int, payload: bytes) -> bytes:
    """One envelope: the flags byte, the payload's length (4 bytes, big-endian), the payload."""
    return struct.pack(">BI", flags, len(payload)) + payload


def encode_message(message: dict[str, Any]) -> bytes:
    """A stream's data envelope carrying ``message`` as JSON."""
    return encode_envelope(0, _dumps(message))


def encode_end(error: ConnectError | None = None) -> bytes:
    """The end-of-stream envelope: ``{}``, or ``{"error": ...}``."""
    return encode_envelope(FLAG_END_STREAM, _dumps({} if error is None else {"error": error.to_json()}))


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class EnvelopeDecoder:
    """Sans-I/O: feed bytes as they come, get ``(flags, payload)`` envelopes out.

    A payload over ``max_size`` is refused as soon as its header is seen
    (:class:`ConnectError` ``resource_exhausted``), so nothing of it is buffered.
    """

    def __init__(self, max_size: int = MAX_REQUEST_BYTES) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Add ``data``; yield every envelope now complete."""
        self._buffer += data
        while len(self._buffer) >= 5:
            flags, length = struct.unpack_from(">BI", self._buffer)
            if length > self.max_size:
                raise ConnectError(Code.RESOURCE_EXHAUSTED,
                                   f"a message of {length} bytes is over the {self.max_size} allowed")
            if len(self._buffer) < 5 + length:
                return
            payload = bytes(self._buffer[5:5 + length])
            del self._buffer[:5 + length]
            yield flags, payload

    @property
    def pending(self) -> int:
        """Bytes fed that are not yet part of a complete envelope."""
        return len(self._buffer)


def decode_envelopes(data: bytes, max_size: int = MAX_REQUEST_BYTES) -> list[tuple[int, bytes]]:
    """Every envelope of a whole body; :class:`ConnectError` if it ends inside one."""
    decoder = EnvelopeDecoder(max_size)
    envelopes = list(decoder.feed(data))
    if decoder.pending:
        raise ConnectError(Code.INVALID_ARGUMENT, "the request ends inside an envelope")
    return envelopes


def parse_message(payload: bytes) -> dict[str, Any]:
    """A request message: a JSON object, or :class:`ConnectError` ``invalid_argument``."""
    from .e2b_message import NotJsonObject, parse_json_object  # it imports this module

    if not payload.strip():
        return {}
    try:
        return parse_json_object(payload, "the request")
    except NotJsonObject as error:
        raise ConnectError(Code.INVALID_ARGUMENT, str(error)) from None


def parse_timeout(headers: Headers) -> float | None:
    """Seconds from ``Connect-Timeout-Ms`` (None without it); ``invalid_argument`` if it is
    not 1 to 10 digits. 0 means no time at all (the SDK sends no header for no timeout)."""
    text = headers.get("connect-timeout-ms")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= _MAX_TIMEOUT_DIGITS):
        raise ConnectError(Code.INVALID_ARGUMENT, f"Connect-Timeout-Ms {text[:20]!r} is not a number")
    return int(text) / 1000


def _content_type(headers: Headers) -> str:
    return (headers.get("content-type") or "").split(";", 1)[0].strip().lower()


def unary_error_response(error: ConnectError) -> HttpResponse:
    """A unary call's error: its HTTP status, the JSON error body."""
    return HttpResponse(error.code.http_status, [("content-type", UNARY_CONTENT_TYPE)],
                        _dumps(error.to_json()))


@attrs.define
class _Route:
    streaming: bool
    handler: UnaryHandler | StreamHandler | ClientStreamHandler
    client_streaming: bool = False


class ConnectRouter:
    """Connect procedures by path, served over :mod:`vmcache.e2b_http`."""

    def __init__(self, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.max_request_bytes = max_request_bytes
        self._routes: dict[str, _Route] = {}

    def unary(self, path: str, handler: UnaryHandler) -> None:
        """Serve ``handler`` as the unary procedure ``path`` (``/process.Process/List``)."""
        self._add(path, _Route(False, handler))

    def server_stream(self, path: str, handler: StreamHandler) -> None:
        """Serve ``handler`` (an async generator of messages) as the server-streaming
        procedure ``path``."""
        self._add(path, _Route(True, handler))

    def client_stream(self, path: str, handler: ClientStreamHandler) -> None:
        """Serve ``handler`` as the client-streaming procedure ``path``: it reads the request's
        messages as they arrive (each bounded like a unary request) and answers one message,
        sent as a stream's (an envelope, then the end envelope) once it returns."""
        self._add(path, _Route(True, handler, client_streaming=True))

    def _add(self, path: str, route: _Route) -> None:
        if path in self._routes:
            raise ValueError(f"{path} is registered twice")
        self._routes[path] = route

    def paths(self) -> list[str]:
        """Every procedure served."""
        return sorted(self._routes)

    def handles(self, path: str) -> bool:
        """Whether ``path`` is one of the procedures."""
        return path in self._routes

    async def handle(self, request: HttpRequest, context: CallContext) -> HttpResponse:
        """Answer one Connect call (the request's path names the procedure)."""
        route = self._routes.get(request.path)
        streaming = route.streaming if route is not None else (
            _content_type(request.headers) == STREAM_CONTENT_TYPE)
        try:
            if route is None:
                raise ConnectError(Code.UNIMPLEMENTED, f"{request.path} is not a procedure vmcache serves")
            if request.method != "POST":
                raise ConnectError(Code.UNIMPLEMENTED, f"{request.path} takes POST, not {request.method}")
            self._check_headers(request.headers, route.streaming)
            timeout = parse_timeout(request.headers)
            deadline = None if timeout is None else trio.current_time() + timeout
            context = attrs.evolve(context, deadline=deadline)
            if route.client_streaming:
                return await self._client_stream(request, cast(ClientStreamHandler, route.handler),
                                                 context)
            body = await self._read(request)
            if route.streaming:
                envelopes = decode_envelopes(body, self.max_request_bytes)
                data = [payload for flags, payload in envelopes if not flags & FLAG_END_STREAM]
                if any(flags & FLAG_COMPRESSED for flags, _ in envelopes):
                    raise ConnectError(Code.UNIMPLEMENTED, "compressed messages are not supported")
                if len(data) != 1:
                    raise ConnectError(Code.INVALID_ARGUMENT,
                                       f"a server-streaming call takes one message, not {len(data)}")
                message = parse_message(data[0])
                return HttpResponse(200, [("content-type", STREAM_CONTENT_TYPE)], self._stream(
                    request.path, cast(StreamHandler, route.handler), message, context))
            message = parse_message(body)
            return await self._unary(request.path, cast(UnaryHandler, route.handler), message, context)
        except ConnectError as error:
            if streaming:
                return HttpResponse(200, [("content-type", STREAM_CONTENT_TYPE)], _single(encode_end(error)))
            return unary_error_response(error)

    def _check_headers(self, headers: Headers, streaming: bool) -> None:
        version = headers.get("connect-protocol-version")
        if version is not None and version != "1":
            raise ConnectError(Code.INVALID_ARGUMENT, f"Connect-Protocol-Version must be 1, not {version!r}")
        expected = STREAM_CONTENT_TYPE if streaming else UNARY_CONTENT_TYPE
        content_type = _content_type(headers)
        if content_type != expected:
            raise ConnectError(Code.INVALID_ARGUMENT if content_type.startswith("application/") else
                               Code.UNIMPLEMENTED,
                               f"content-type {content_type or '(none)'!r} is not served here; "
                               f"vmcache speaks Connect's JSON codec ({expected})")
        encoding = headers.get("connect-content-encoding" if streaming else "content-encoding")
        if encoding not in (None, "", "identity"):
            raise ConnectError(Code.UNIMPLEMENTED,
                               f"compression {encoding!r} is not supported: send identity")

    async def _read(self, request: HttpRequest) -> bytes:
        try:
            return await request.read_body(self.max_request_bytes)
        except HttpError as error:
            code = Code.RESOURCE_EXHAUSTED if error.status == 413 else Code.INVALID_ARGUMENT
            raise ConnectError(code, error.message) from None

    async def _client_stream(self, request: HttpRequest, handler: ClientStreamHandler,
                             context: CallContext) -> HttpResponse:
        """Run a client-streaming call to its end (within the deadline) and answer it.

        The stream's messages may be far apart (``commands.stream_input`` is a user typing):
        no idle bound applies between them but the call's deadline; a client that leaves
        mid-stream ends the call quietly (:class:`ClientGone` passes: nothing is answered)."""
        path = request.path
        decoder = EnvelopeDecoder(self.max_request_bytes)

        async def messages() -> AsyncIterator[dict[str, Any]]:
            try:
                async for piece in request.body_chunks(math.inf):
                    for flags, payload in decoder.feed(piece):
                        if flags & FLAG_COMPRESSED:
                            raise ConnectError(Code.UNIMPLEMENTED, "compressed messages are not supported")
                        if flags & FLAG_END_STREAM:
                            return
                        yield parse_message(payload)
            except HttpError as error:
                code = Code.RESOURCE_EXHAUSTED if error.status == 413 else Code.INVALID_ARGUMENT
                raise ConnectError(code, error.message) from None
            if decoder.pending:
                raise ConnectError(Code.INVALID_ARGUMENT, "the request ends inside an envelope")

        error: ConnectError | None = None
        result: dict[str, Any] | None = None
        try:
            with trio.fail_at(context.deadline if context.deadline is not None else float("inf")):
                result = await handler(messages(), context)
            if not isinstance(result, dict):
                raise TypeError(f"{path} answered {type(result).__name__}")
        except trio.TooSlowError:
            error = ConnectError(Code.DEADLINE_EXCEEDED, "the call's timeout passed")
        except ConnectError as raised:
            error = raised
        except (ClientGone, VMGoneError):
            raise  # VMGoneError: the sandbox ended under the call; the server answers 404
        except Exception as raised:
            gone = _client_gone(raised)
            if gone is not None:
                raise gone from None
            error = _internal(path, raised)
        body = encode_end(error) if error is not None or result is None else (
            encode_message(result) + encode_end())
        return HttpResponse(200, [("content-type", STREAM_CONTENT_TYPE)], body)

    async def _unary(self, path: str, handler: UnaryHandler, message: dict[str, Any],
                     context: CallContext) -> HttpResponse:
        try:
            with trio.fail_at(context.deadline if context.deadline is not None else float("inf")):
                result = await handler(message, context)
        except trio.TooSlowError:
            return unary_error_response(ConnectError(Code.DEADLINE_EXCEEDED, "the call's timeout passed"))
        except ConnectError as error:
            return unary_error_response(error)
        except VMGoneError:
            raise  # the sandbox ended under the call: the server answers what E2B's proxy does
        except Exception as error:
            return unary_error_response(_internal(path, error))
        if not isinstance(result, dict):
            wrong = TypeError(f"{path} answered {type(result).__name__}")
            return unary_error_response(_internal(path, wrong))
        return HttpResponse(200, [("content-type", UNARY_CONTENT_TYPE)], _dumps(result))

    async def _stream(self, path: str, handler: StreamHandler, message: dict[str, Any],
                      context: CallContext) -> AsyncIterator[bytes]:
        """The response body: each message enveloped as the handler yields it, then the end
        envelope (with the error, if any). Each wait for the handler is bounded by the
        deadline; closing this (the client went away) closes the handler's iterator."""
        messages: AsyncIterator[dict[str, Any]] | None = None
        error: ConnectError | None = None
        deadline = context.deadline if context.deadline is not None else float("inf")
        try:
            messages = handler(message, context)
            while True:
                with trio.move_on_at(deadline) as scope:
                    try:
                        item = await messages.__anext__()
                    except StopAsyncIteration:
                        break
                if scope.cancelled_caught:
                    error = ConnectError(Code.DEADLINE_EXCEEDED, "the call's timeout passed")
                    break
                if not isinstance(item, dict):
                    raise TypeError(f"{path} yielded {type(item).__name__}")
                yield encode_message(item)
        except ConnectError as raised:
            error = raised
        except VMGoneError as raised:  # the sandbox ended mid-stream (a kill, its TTL)
            log.info("%s ended with its sandbox: %s", path, raised)
            error = ConnectError(Code.UNAVAILABLE, f"the sandbox ended: {raised}")
        except Exception as raised:
            error = _internal(path, raised)
        finally:
            if messages is not None:
                aclose = getattr(messages, "aclose", None)
                if aclose is not None:
                    with trio.move_on_after(5) as closing:
                        closing.shield = True
                        try:
                            await aclose()
                        except Exception as raised:
                            log.error("closing the stream of %s failed: %s", path, raised, exc_info=raised)
        yield encode_end(error)


def _client_gone(error: BaseException) -> ClientGone | None:
    """The :class:`ClientGone` that ``error`` is, or that an exception group of only it holds
    (a handler reading its messages from a nursery's task)."""
    if isinstance(error, ClientGone):
        return error
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(ClientGone)
        if matched is not None and rest is None:
            return _client_gone(matched.exceptions[0])
    return None


def _internal(path: str, error: BaseException) -> ConnectError:
    log.error("%s failed: %s: %s", path, type(error).__name__, error, exc_info=error)
    return ConnectError(Code.INTERNAL, f"{path} failed inside vmcache: the daemon's log has the details")


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data
