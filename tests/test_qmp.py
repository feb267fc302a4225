"""QMP framing and the Trio QMP client, without QEMU."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from vmcache.errors import QMPError, QMPProtocolError
from vmcache.qmp import QMPClient
from vmcache.qmp_protocol import ErrorReply, Greeting, QMPEvent, QMPProtocol, Return

GREETING = (b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, '
            b'"capabilities": ["oob"]}}\r\n')
EVENT = b'{"timestamp": {"seconds": 10, "microseconds": 500000}, "event": "STOP"}\r\n'


def test_command_encoding_carries_an_id() -> None:
    protocol = QMPProtocol()
    request_id, data = protocol.command("migrate", {"uri": "file:/x"})
    assert json.loads(data) == {"execute": "migrate", "id": request_id, "arguments": {"uri": "file:/x"}}
    assert protocol.command("stop")[0] == request_id + 1


def test_partial_and_combined_reads() -> None:
    protocol = QMPProtocol()
    error = b'{"error": {"class": "GenericError", "desc": "no"}, "id": 2}\r\n'
    data = GREETING + EVENT + b'{"return": {}, "id": 1}\r\n' + error
    messages = []
    for start in range(0, len(data), 7):
        messages += protocol.receive_data(data[start:start + 7])
    assert messages == [
        Greeting({"qemu": {"major": 7, "minor": 2, "micro": 0}}, ["oob"]),
        QMPEvent("STOP", {}, 10.5),
        Return(1, {}),
        ErrorReply(2, "GenericError", "no"),
    ]


@pytest.mark.parametrize("data", [b"not json\n", b"[1, 2]\n", b'{"hello": 1}\n', b'{"return": {}}\n'])
def test_garbage_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(QMPProtocolError):
        QMPProtocol().receive_data(data)


async def fake_qemu(stream: trio.abc.Stream, script: list[bytes]) -> None:
    """Greet, then answer each command in turn with a script entry (``{id}`` filled in)."""
    await stream.send_all(GREETING)
    buffer = b""
    for reply in script:
        while b"\n" not in buffer:
            buffer += await stream.receive_some(4096)
        line, buffer = buffer.split(b"\n", 1)
        request_id = str(json.loads(line)["id"]).encode()
        await stream.send_all(reply.replace(b"{id}", request_id))


async def test_event_between_command_and_reply() -> None:
    host, qemu = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_qemu, qemu, [
            b'{"return": {}, "id": {id}}\n',
            EVENT + b'{"return": {"status": "running"}, "id": {id}}\n',
            b'{"error": {"class": "GenericError", "desc": "nope"}, "id": {id}}\n',
        ])
        with trio.fail_after(5):
            client = await QMPClient.negotiate(host)
            assert client.greeting is not None
            assert await client.execute("query-status") == {"status": "running"}
            assert [event.name for event in client.events] == ["STOP"]
            with pytest.raises(QMPError, match="nope"):
                await client.execute("cont")


async def test_eof_is_a_qmp_error() -> None:
    host, qemu = trio.testing.memory_stream_pair()
    await qemu.aclose()
    with trio.fail_after(5), pytest.raises(QMPError, match="closed"):
        await QMPClient.negotiate(host)
