"""The E2B listener's HTTP/1.1 server (vmcache.e2b_http), over in-memory streams: keep-alive,
chunked streams, the bounds (431, 413, timeouts, connections), 100-continue, and a client that
goes away mid-stream."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import h11
import pytest
import trio
import trio.testing

from vmcache.e2b_http import (
    HttpError,
    HttpLimits,
    HttpRequest,
    HttpResponse,
    json_response,
    serve_connection,
    serve_listeners,
)


class Client:
    """An h11 client on one end of a memory stream pair."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            await self.stream.send_all(self.conn.send(event) or b"")

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> None:
        heads = [("host", "test"), *(headers or [])]
        if body:
            heads.append(("content-length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=heads))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            assert not isinstance(event, type)
            return event

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.event()
        while isinstance(head, h11.InformationalResponse):
            head = await self.event()
        assert isinstance(head, h11.Response), head
        body = b""
        while True:
            event = await self.event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return head, body


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key.decode() == name:
            return value.decode()
    return None


async def echo(request: HttpRequest) -> HttpResponse:
    if request.path == "/boom":
        raise RuntimeError("a bug")
    if request.path == "/refuse":
        raise HttpError(404, "no such thing")
    body = await request.read_body(100)
    return json_response(200, {"path": request.path, "query": request.query,
                               "method": request.method, "body": body.decode(),
                               "x": request.headers.get("X-Thing")})


@pytest.fixture
async def pair(nursery: trio.Nursery) -> Client:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_connection, server_stream, echo, HttpLimits(max_header_bytes=1024))
    return Client(client_stream)


async def test_keep_alive_serves_many_requests_on_one_connection(pair: Client) -> None:
    with trio.fail_after(5):
        await pair.request("GET", "/a%20b?x=1&x=2&empty=", [("X-THING", "yes")])
        head, body = await pair.response()
        assert head.status_code == 200
        assert header(head, "content-type") == "application/json"
        assert body == (b'{"path":"/a b","query":{"x":["1","2"],"empty":[""]},"method":"GET",'
                        b'"body":"","x":"yes"}')
        await pair.request("POST", "/b", body=b"hello")
        head, body = await pair.response()
        assert b'"body":"hello"' in body


async def test_errors_are_json_and_never_tracebacks(pair: Client) -> None:
    with trio.fail_after(5):
        await pair.request("GET", "/refuse")
        head, body = await pair.response()
        assert (head.status_code, body) == (404, b'{"code":404,"message":"no such thing"}')
        await pair.request("GET", "/boom")
        head, body = await pair.response()
        assert head.status_code == 500
        assert b"a bug" not in body and b"Traceback" not in body
        await pair.request("GET", "/still-here")
        head, _ = await pair.response()
        assert head.status_code == 200


async def test_a_body_over_the_handlers_bound_is_413(pair: Client) -> None:
    with trio.fail_after(5):
        await pair.request("POST", "/x", body=b"y" * 101)
        head, body = await pair.response()
        assert head.status_code == 413
        assert b'"code":413' in body


async def test_a_chunked_body_over_the_bound_is_413_before_it_ends(pair: Client) -> None:
    with trio.fail_after(5):
        await pair.send(h11.Request(method="POST", target="/x",
                                    headers=[("host", "t"), ("transfer-encoding", "chunked")]))
        await pair.send(h11.Data(data=b"y" * 60), h11.Data(data=b"y" * 60))
        head, _ = await pair.response()
        assert head.status_code == 413
        assert header(head, "connection") == "close"


async def test_oversized_headers_are_431(pair: Client) -> None:
    with trio.fail_after(5):
        await pair.stream.send_all(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n")
        head, _ = await pair.response()
        assert head.status_code == 431


async def test_a_malformed_request_is_400(pair: Client) -> None:
    with trio.fail_after(5):
        await pair.stream.send_all(b"GARBAGE\r\n\r\n")
        head, body = await pair.response()
        assert head.status_code == 400
        assert b'"code":400' in body


async def test_expect_100_continue_is_answered(pair: Client) -> None:
    with trio.fail_after(5):
        await pair.send(h11.Request(method="POST", target="/x", headers=[
            ("host", "t"), ("content-length", "3"), ("expect", "100-continue")]))
        first = await pair.event()
        assert isinstance(first, h11.InformationalResponse) and first.status_code == 100
        await pair.send(h11.Data(data=b"abc"), h11.EndOfMessage())
        head, body = await pair.response()
        assert head.status_code == 200 and b'"body":"abc"' in body


async def test_a_stream_is_sent_chunked_as_it_yields() -> None:
    step = trio.Event()

    async def pieces() -> AsyncIterator[bytes]:
        yield b"one"
        await step.wait()
        yield b"two"

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, [("content-type", "text/plain")], pieces())

    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, handler, HttpLimits())
        with trio.fail_after(5):
            await client.request("GET", "/")
            head = await client.event()
            assert isinstance(head, h11.Response)
            assert header(head, "transfer-encoding") == "chunked"
            first = await client.event()
            assert isinstance(first, h11.Data) and first.data == b"one"
            step.set()
            second = await client.event()
            assert isinstance(second, h11.Data) and second.data == b"two"
            assert isinstance(await client.event(), h11.EndOfMessage)
        nursery.cancel_scope.cancel()


async def test_a_client_gone_mid_stream_closes_the_iterator_at_once() -> None:
    closed = trio.Event()
    started = trio.Event()

    async def pieces() -> AsyncIterator[bytes]:
        try:
            yield b"first"
            started.set()
            await trio.sleep_forever()  # a process with nothing more to say
            yield b"never"
        finally:
            closed.set()

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, [], pieces())

    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, handler, HttpLimits())
        with trio.fail_after(5):
            await client.request("GET", "/")
            await started.wait()
            await client_stream.aclose()
            await closed.wait()


async def test_a_client_that_stops_reading_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    closed = trio.Event()

    async def pieces() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
        finally:
            closed.set()

    async def handler(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, [], pieces())

    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    client = Client(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, handler, HttpLimits(send_timeout=3))
        await client.request("GET", "/")
        assert isinstance(await client.event(), h11.Response)
        # lockstep streams hold no buffer: not reading stalls every send at once.
        with trio.fail_after(10):
            await closed.wait()


async def test_an_idle_connection_is_closed(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(100):
        await serve_connection(server_stream, echo, HttpLimits(idle_timeout=30))
    assert await client_stream.receive_some(10) == b""


async def test_a_slow_head_is_closed_after_the_header_timeout(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, echo,
                           HttpLimits(idle_timeout=1000, header_timeout=5))
        await client_stream.send_all(b"GET / HTTP/1.1\r\n")
        start = trio.current_time()
        with trio.fail_after(20):
            assert await client_stream.receive_some(10) == b""
        assert trio.current_time() - start < 6


async def test_connections_over_the_cap_get_503() -> None:
    release = trio.Event()

    async def handler(request: HttpRequest) -> HttpResponse:
        await release.wait()
        return json_response(200, {})

    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    listener = trio.SocketListener(sock)
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: serve_listeners(
            handler, [listener], limits=HttpLimits(max_connections=1), task_status=task_status))

        def blocking(send_request: bool) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if send_request:
                    sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
                return sock.recv(4096)

        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                inner.start_soon(trio.to_thread.run_sync, blocking, True)
                await trio.sleep(0.2)  # the first connection takes the one slot
                second = await trio.to_thread.run_sync(blocking, False)
                assert second.startswith(b"HTTP/1.1 503 ")
                release.set()
        nursery.cancel_scope.cancel()


async def test_make_builds_requests_for_handler_tests() -> None:
    request = HttpRequest.make("POST", "/files?path=%2Ftmp%2Fa&username=user",
                               [("Content-Type", "text/plain")], [b"ab", b"c"])
    assert request.path == "/files"
    assert request.query_value("path") == "/tmp/a"
    assert request.headers.get("content-type") == "text/plain"
    assert await request.read_body(10) == b"abc"
    with pytest.raises(HttpError) as raised:
        await HttpRequest.make("POST", "/", body=b"x" * 11).read_body(10)
    assert raised.value.status == 413


async def test_a_new_connection_that_says_nothing_has_only_the_header_timeout(
        autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with trio.fail_after(100):
        await serve_connection(server_stream, echo, HttpLimits(idle_timeout=1000, header_timeout=5))
    assert trio.current_time() - start < 6
    assert await client_stream.receive_some(10) == b""


async def test_a_kept_alive_connection_has_the_idle_timeout_between_requests(
        autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, echo,
                           HttpLimits(idle_timeout=300, header_timeout=5))
        with trio.fail_after(5):
            await client.request("GET", "/one")
            assert (await client.response())[0].status_code == 200
        await trio.sleep(200)  # a pooled connection, idle: still served
        with trio.fail_after(5):
            await client.request("GET", "/two")
            assert (await client.response())[0].status_code == 200


class _FakeSocket:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address

    def getpeername(self) -> tuple[str, int]:
        return self.address


class _FakeStream:
    def __init__(self, address: tuple[str, int]) -> None:
        self.socket = _FakeSocket(address)


def test_only_non_loopback_peers_are_capped_per_address() -> None:
    from vmcache.e2b_http import _peer_address

    def peer(host: str) -> str | None:
        return _peer_address(_FakeStream((host, 1)))  # type: ignore[arg-type]

    assert peer("127.0.0.1") is None and peer("127.0.0.9") is None
    assert peer("::1") is None and peer("::ffff:127.0.0.1") is None
    assert peer("10.1.2.3") == "10.1.2.3"
    assert HttpLimits().max_connections_per_peer < HttpLimits().max_connections


async def test_a_client_gone_while_a_handler_works_cancels_the_handler() -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def handler(request: HttpRequest) -> HttpResponse:
        await request.read_body(100)
        started.set()
        try:
            await trio.sleep_forever()  # waiting for a VM, say
        finally:
            cancelled.set()
        return json_response(200, {})

    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, handler, HttpLimits())
        with trio.fail_after(5):
            await client.request("POST", "/sandboxes", body=b"{}")
            await started.wait()
            await client_stream.aclose()
            await cancelled.wait()


async def test_a_body_read_without_idle_bound_outlasts_the_body_timeout(
        autojump_clock: trio.abc.Clock) -> None:
    import math

    async def handler(request: HttpRequest) -> HttpResponse:
        got = b""
        async for piece in request.body_chunks(math.inf):
            got += piece
        return json_response(200, {"got": got.decode()})

    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, server_stream, handler, HttpLimits(body_timeout=60))
        await client.send(h11.Request(method="POST", target="/x",
                                      headers=[("host", "t"), ("transfer-encoding", "chunked")]))
        await client.send(h11.Data(data=b"a"))
        await trio.sleep(120)  # a user who stops typing for two minutes
        await client.send(h11.Data(data=b"b"), h11.EndOfMessage())
        with trio.fail_after(5):
            head, body = await client.response()
        assert head.status_code == 200 and body == b'{"got":"ab"}'
