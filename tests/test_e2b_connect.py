"""Connect over HTTP/1.1 with the JSON codec (vmcache.e2b_connect): unary and server-streaming
calls as E2B's SDKs send them, errors both ways, the deadline, the bounds, and a stream closed
early."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import pytest
import trio

from vmcache.agent_client import AgentConnection
from vmcache.e2b_connect import (
    FLAG_END_STREAM,
    CallContext,
    Code,
    ConnectError,
    ConnectRouter,
    EnvelopeDecoder,
    decode_envelopes,
    encode_end,
    encode_envelope,
    encode_message,
)
from vmcache.e2b_http import ClientGone, Headers, HttpRequest, HttpResponse
from vmcache.errors import VMGoneError

T = TypeVar("T")


class FakeSandbox:
    """The least of a SandboxRuntime that the router needs."""

    def __init__(self) -> None:
        self._ended = trio.Event()

    @property
    def id(self) -> str:
        return "sbx"

    @property
    def envs(self) -> Mapping[str, str]:
        return {}

    async def agent(self) -> AgentConnection:
        raise AssertionError("no agent here")

    def service(self, kind: type[T]) -> T:
        return kind(self)  # type: ignore[call-arg]

    def start_soon(self, fn: Any, *args: object) -> None:
        raise AssertionError("no tasks here")

    @property
    def ended(self) -> trio.Event:
        return self._ended


def context() -> CallContext:
    return CallContext(sandbox=FakeSandbox(), user="user", deadline=None, headers=Headers())


UNARY = [("content-type", "application/json"), ("connect-protocol-version", "1")]
STREAM = [("content-type", "application/connect+json"), ("connect-protocol-version", "1")]

closed = trio.Event()


async def list_processes(message: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
    if message.get("fail"):
        raise ConnectError(Code.NOT_FOUND, "process with pid 7 not found")
    if message.get("bug"):
        raise KeyError("secret-internal-detail")
    if message.get("slow"):
        await trio.sleep(100)
    if message.get("ended"):
        raise VMGoneError("sandbox sbx has ended")
    return {"processes": [], "user": ctx.user, "deadline": ctx.deadline is not None}


async def start(message: dict[str, Any], ctx: CallContext) -> AsyncIterator[dict[str, Any]]:
    try:
        yield {"event": {"start": {"pid": 1}}}
        if message.get("fail"):
            raise ConnectError(Code.INVALID_ARGUMENT, "field cmd: missing")
        if message.get("bug"):
            raise ValueError("secret-internal-detail")
        if message.get("hang"):
            await trio.sleep_forever()
        if message.get("ended"):
            raise VMGoneError("sandbox sbx has ended")
        yield {"event": {"end": {"exitCode": 0}}}
    finally:
        closed.set()


def router() -> ConnectRouter:
    r = ConnectRouter(max_request_bytes=1024)
    r.unary("/process.Process/List", list_processes)
    r.server_stream("/process.Process/Start", start)
    return r


async def body_of(response: HttpResponse) -> bytes:
    if isinstance(response.body, bytes):
        return response.body
    return b"".join([piece async for piece in response.body])


async def unary(message: object, headers: list[tuple[str, str]] = UNARY,
                path: str = "/process.Process/List") -> tuple[int, Any]:
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    response = await router().handle(HttpRequest.make("POST", path, headers, raw), context())
    body = await body_of(response)
    assert dict(response.headers)["content-type"] == "application/json"
    return response.status, json.loads(body)


async def stream(message: object, headers: list[tuple[str, str]] = STREAM) -> list[tuple[int, Any]]:
    raw = message if isinstance(message, bytes) else encode_message(message)  # type: ignore[arg-type,unused-ignore]
    response = await router().handle(
        HttpRequest.make("POST", "/process.Process/Start", headers, raw), context())
    assert response.status == 200
    assert dict(response.headers)["content-type"] == "application/connect+json"
    return [(flags, json.loads(payload)) for flags, payload in decode_envelopes(await body_of(response))]


async def test_a_unary_call_answers_json() -> None:
    assert await unary({}) == (200, {"processes": [], "user": "user", "deadline": False})


async def test_a_unary_error_is_its_http_status_and_connect_json() -> None:
    assert await unary({"fail": True}) == (
        404, {"code": "not_found", "message": "process with pid 7 not found"})


async def test_an_unexpected_exception_is_internal_without_its_details() -> None:
    status, error = await unary({"bug": True})
    assert status == 500 and error["code"] == "internal"
    assert "secret" not in error["message"]


@pytest.mark.parametrize(("raw", "why"), [(b"{nope", "not JSON"), (b"[1]", "JSON object"),
                                        (b"[" * 1020, "nested too deeply")])
async def test_bad_json_is_invalid_argument(raw: bytes, why: str) -> None:
    status, error = await unary(raw)
    assert status == 400 and error["code"] == "invalid_argument" and why in error["message"]


async def test_unknown_procedure_is_unimplemented() -> None:
    status, error = await unary({}, path="/process.Process/Nope")
    assert (status, error["code"]) == (501, "unimplemented")


async def test_wrong_content_type_compression_and_version_are_refused() -> None:
    status, error = await unary({}, [("content-type", "application/proto")])
    assert (status, error["code"]) == (400, "invalid_argument")
    status, error = await unary({}, [*UNARY, ("content-encoding", "gzip")])
    assert (status, error["code"]) == (501, "unimplemented")
    status, error = await unary({}, [("content-type", "application/json"), ("connect-protocol-version", "2")])
    assert (status, error["code"]) == (400, "invalid_argument")


async def test_an_oversized_request_is_resource_exhausted() -> None:
    status, error = await unary({"pad": "x" * 2000})
    assert (status, error["code"]) == (429, "resource_exhausted")


async def test_the_deadline_bounds_a_unary_call(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(10):
        status, error = await unary({"slow": True}, [*UNARY, ("connect-timeout-ms", "1500")])
    assert (status, error["code"]) == (504, "deadline_exceeded")
    status, error = await unary({}, [*UNARY, ("connect-timeout-ms", "soon")])
    assert (status, error["code"]) == (400, "invalid_argument")
    assert (await unary({}, [*UNARY, ("connect-timeout-ms", "60000")]))[1]["deadline"] is True


async def test_a_stream_sends_envelopes_and_an_empty_end() -> None:
    assert await stream({"process": {"cmd": "/bin/bash"}}) == [
        (0, {"event": {"start": {"pid": 1}}}), (0, {"event": {"end": {"exitCode": 0}}}),
        (FLAG_END_STREAM, {})]


async def test_a_stream_error_travels_in_the_end_envelope() -> None:
    assert (await stream({"fail": True}))[-1] == (
        FLAG_END_STREAM, {"error": {"code": "invalid_argument", "message": "field cmd: missing"}})
    flags, end = (await stream({"bug": True}))[-1]
    assert flags == FLAG_END_STREAM and end["error"]["code"] == "internal"
    assert "secret" not in end["error"]["message"]


async def test_a_stream_request_must_be_one_envelope() -> None:
    end = (await stream(b"\x00\x00\x00"))[-1][1]
    assert end["error"]["code"] == "invalid_argument"
    end = (await stream(encode_message({}) + encode_message({})))[-1][1]
    assert end["error"]["code"] == "invalid_argument"
    end = (await stream(encode_envelope(1, b"\x1f\x8b")))[-1][1]
    assert end["error"]["code"] == "unimplemented"


async def test_the_deadline_ends_a_stream(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(10):
        events = await stream({"hang": True}, [*STREAM, ("connect-timeout-ms", "2000")])
    assert events[-1] == (FLAG_END_STREAM, {"error": {"code": "deadline_exceeded",
                                                      "message": "the call's timeout passed"}})


async def test_closing_a_stream_early_closes_the_handler() -> None:
    global closed
    closed = trio.Event()
    response = await router().handle(HttpRequest.make(
        "POST", "/process.Process/Start", STREAM, encode_message({"hang": True})), context())
    body = response.body
    assert not isinstance(body, bytes)
    first = await body.__anext__()
    assert decode_envelopes(first)[0][0] == 0
    await body.aclose()  # type: ignore[attr-defined,unused-ignore]
    with trio.fail_after(1):
        await closed.wait()


def test_envelope_decoder_takes_bytes_in_any_pieces() -> None:
    data = encode_message({"a": 1}) + encode_end(ConnectError(Code.CANCELED, "bye"))
    decoder = EnvelopeDecoder()
    out: list[tuple[int, bytes]] = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i:i + 1]))
    assert out == [(0, b'{"a":1}'), (2, b'{"error":{"code":"canceled","message":"bye"}}')]
    assert decoder.pending == 0


def test_envelope_decoder_refuses_an_oversized_message_from_its_header() -> None:
    with pytest.raises(ConnectError) as raised:
        list(EnvelopeDecoder(max_size=10).feed(struct.pack(">BI", 0, 11)))
    assert raised.value.code is Code.RESOURCE_EXHAUSTED
    with pytest.raises(ConnectError):
        decode_envelopes(encode_message({})[:-1])


def test_codes_map_to_connects_http_statuses() -> None:
    assert {code: code.http_status for code in Code} == {
        Code.CANCELED: 499, Code.UNKNOWN: 500, Code.INVALID_ARGUMENT: 400,
        Code.DEADLINE_EXCEEDED: 504, Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409,
        Code.PERMISSION_DENIED: 403, Code.RESOURCE_EXHAUSTED: 429, Code.FAILED_PRECONDITION: 400,
        Code.ABORTED: 409, Code.OUT_OF_RANGE: 400, Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500,
        Code.UNAVAILABLE: 503, Code.DATA_LOSS: 500, Code.UNAUTHENTICATED: 401}


async def gather(messages: AsyncIterator[dict[str, Any]], ctx: CallContext) -> dict[str, Any]:
    seen = []
    async for message in messages:
        if message.get("fail"):
            raise ConnectError(Code.FAILED_PRECONDITION, "data before the start event")
        if message.get("hang"):
            await trio.sleep_forever()
        seen.append(message["n"])
    return {"seen": seen}


async def client_stream(body: bytes | list[bytes], headers: list[tuple[str, str]] = STREAM
                        ) -> list[tuple[int, Any]]:
    r = ConnectRouter(max_request_bytes=1024)
    r.client_stream("/process.Process/StreamInput", gather)
    response = await r.handle(HttpRequest.make("POST", "/process.Process/StreamInput", headers, body),
                              context())
    assert (response.status, dict(response.headers)["content-type"]) == (200, "application/connect+json")
    return [(flags, json.loads(payload)) for flags, payload in decode_envelopes(await body_of(response))]


async def test_a_client_stream_reads_messages_as_they_come_and_answers_once() -> None:
    data = b"".join(encode_message({"n": n}) for n in range(3))
    pieces = [data[i:i + 7] for i in range(0, len(data), 7)]  # envelopes cut anywhere
    assert await client_stream(pieces) == [(0, {"seen": [0, 1, 2]}), (FLAG_END_STREAM, {})]


async def test_a_client_stream_error_is_its_end_envelope(autojump_clock: trio.abc.Clock) -> None:
    end = (await client_stream(encode_message({"n": 1}) + encode_message({"fail": True})))[-1]
    assert end == (FLAG_END_STREAM, {"error": {"code": "failed_precondition",
                                               "message": "data before the start event"}})
    assert (await client_stream(encode_envelope(1, b"x")))[-1][1]["error"]["code"] == "unimplemented"
    assert (await client_stream(encode_message({"n": 1})[:-1]))[-1][1]["error"]["code"] == "invalid_argument"
    big = encode_message({"n": 1, "pad": "x" * 2000})
    assert (await client_stream(big))[-1][1]["error"]["code"] == "resource_exhausted"
    with trio.fail_after(10):
        end = (await client_stream(encode_message({"hang": True}),
                                   [*STREAM, ("connect-timeout-ms", "500")]))[-1]
    assert end[1]["error"]["code"] == "deadline_exceeded"


def _request_reading(pieces: list[bytes | BaseException], timeouts: list[float | None]) -> HttpRequest:
    """A client-stream request whose body reader records the idle timeout it is given and
    gives ``pieces`` in turn (an exception is raised, as the server does for a client gone)."""

    async def reader(timeout: float | None) -> bytes:
        await trio.lowlevel.checkpoint()
        timeouts.append(timeout)
        if not pieces:
            return b""
        piece = pieces.pop(0)
        if isinstance(piece, BaseException):
            raise piece
        return piece

    return HttpRequest("POST", "/process.Process/StreamInput", Headers(STREAM), reader)


async def test_a_client_stream_has_no_idle_bound_but_its_deadline() -> None:
    r = ConnectRouter(max_request_bytes=1024)
    r.client_stream("/process.Process/StreamInput", gather)
    timeouts: list[float | None] = []
    response = await r.handle(_request_reading([encode_message({"n": 1})], timeouts), context())
    assert decode_envelopes(await body_of(response))[0] == (0, b'{"seen":[1]}')
    assert timeouts and all(timeout == math.inf for timeout in timeouts)


async def test_a_client_leaving_a_client_stream_ends_it_quietly(caplog: pytest.LogCaptureFixture) -> None:
    r = ConnectRouter(max_request_bytes=1024)
    r.client_stream("/process.Process/StreamInput", gather)
    request = _request_reading([encode_message({"n": 1}), ClientGone("the client left")], [])
    with pytest.raises(ClientGone):
        await r.handle(request, context())
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_a_sandbox_ending_under_a_call_is_no_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(VMGoneError):  # the server answers it 404, as E2B's proxy does
        await unary({"ended": True})
    end = (await stream({"ended": True}))[-1]
    assert end[1]["error"]["code"] == "unavailable"
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
