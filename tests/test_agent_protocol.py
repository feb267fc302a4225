"""The agent's line protocol, without QEMU or sockets."""

from __future__ import annotations

import base64

import pytest
import trio
import trio.testing

from vmcache.agent import AgentClient
from vmcache.agent_protocol import (
    AgentProtocol,
    ExecResult,
    Failure,
    Ok,
    Pong,
    Ready,
    encode_field,
    parse_line,
)
from vmcache.errors import AgentError, AgentProtocolError

BINARY = bytes(range(256)) + b"\n\r\n\0 end"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_exec_request_is_one_line_with_every_argument_base64() -> None:
    protocol = AgentProtocol(first_request_id=7)
    request_id, data = protocol.exec(["sh", "-c", "echo 'a b'\n", ""], timeout=5)
    assert request_id == 7
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    verb, rid, timeout, *args = data.decode().rstrip("\n").split(" ")
    assert (verb, rid, timeout) == ("EXEC", "7", "5")
    assert [base64.b64decode(a) if a != "-" else b"" for a in args] == [
        b"sh", b"-c", b"echo 'a b'\n", b""]


def test_request_ids_increase() -> None:
    protocol = AgentProtocol(first_request_id=1)
    assert [protocol.ping()[0], protocol.entropy(b"x")[0], protocol.set_clock(5.4)[0]] == [1, 2, 3]
    assert protocol.set_clock(5.4)[1] == b"CLOCK 4 5\n"


def test_exec_refuses_nul_and_empty_argv() -> None:
    protocol = AgentProtocol()
    with pytest.raises(ValueError, match="NUL"):
        protocol.exec(["a\0b"])
    with pytest.raises(ValueError):
        protocol.exec([])


def test_binary_output_survives_framing() -> None:
    line = f"RESULT 3 0 {encode_field(BINARY)} {encode_field(b'')}\n".encode()
    assert AgentProtocol().receive_data(line) == [ExecResult(3, 0, BINARY, b"")]


def test_partial_reads_are_reassembled() -> None:
    protocol = AgentProtocol()
    data = f"RESULT 9 1 {b64(b'out')} {b64(b'err')}\n".encode()
    events = []
    for index in range(len(data)):
        events += protocol.receive_data(data[index:index + 1])
    assert events == [ExecResult(9, 1, b"out", b"err")]


def test_several_messages_in_one_read() -> None:
    data = b"READY abc\nPONG 1 abc\nOK 2\nERROR 3 " + b64(b"no such verb").encode() + b"\n"
    assert AgentProtocol().receive_data(data) == [
        Ready("abc"), Pong(1, "abc"), Ok(2), Failure(3, "no such verb")]


@pytest.mark.parametrize("line", [
    b"HELLO 1", b"PONG x abc", b"RESULT 1 0 !!! -", b"OK", b"\xff\xfe", b"RESULT 1 0 -",
])
def test_garbage_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(AgentProtocolError):
        parse_line(line)


def test_a_line_without_end_is_bounded() -> None:
    protocol = AgentProtocol(max_line=100)
    with pytest.raises(AgentProtocolError, match="longer than 100"):
        protocol.receive_data(b"RESULT " + b"A" * 200)


async def fake_agent(stream: trio.abc.Stream, replies: list[bytes]) -> list[bytes]:
    """Read one request per reply; answer with the reply (``{id}`` filled in)."""
    received = []
    buffer = b""
    for reply in replies:
        while b"\n" not in buffer:
            buffer += await stream.receive_some(4096)
        line, buffer = buffer.split(b"\n", 1)
        received.append(line)
        request_id = line.split(b" ")[1]
        await stream.send_all(reply.replace(b"{id}", request_id))
    return received


async def test_client_drops_replies_meant_for_someone_else() -> None:
    host, guest = trio.testing.memory_stream_pair()
    client = AgentClient(host)
    stale = b"PONG 12345 old\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, [stale + b"READY new\nPONG {id} new\n"])
        with trio.fail_after(5):
            assert await client.ping() == "new"
    assert client.boot_id == "new"


async def test_client_reports_refusal_and_eof() -> None:
    host, guest = trio.testing.memory_stream_pair()
    client = AgentClient(host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, [b"ERROR {id} " + b64(b"bad").encode() + b"\n"])
        with trio.fail_after(5), pytest.raises(AgentError, match="refused the request: bad"):
            await client.exec(["true"])
    await guest.aclose()
    with trio.fail_after(5), pytest.raises(AgentError, match="closed"):
        await client.ping()
