"""The agent's wire protocol (vmcache.agent_protocol), without sockets or processes."""

from __future__ import annotations

import ast
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmcache import agent_protocol as ap

SRC = Path(__file__).resolve().parent.parent / "src" / "vmcache"
GUEST_FILES = [SRC / "agent_protocol.py", *sorted((SRC / "guest").glob("*.py"))]

#: What Debian's python3-minimal ships besides builtins (checked against the package's file list),
#: plus modules the guest imports only under TYPE_CHECKING or only optionally.
MINIMAL_STDLIB = {
    "__future__", "argparse", "collections", "errno", "fcntl", "heapq", "os", "select", "signal",
    "stat", "struct", "subprocess", "sys", "time", "traceback", "typing",
}
OPTIONAL_IMPORTS = {"ctypes", "vmcache", *(path.stem for path in GUEST_FILES)}

@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """Overrides conftest's check: these tests start no QEMU, and the QEMU processes that other
    test runs on this machine start meanwhile are not ours to count, let alone kill."""
    yield


NONCE = bytes(range(16))


def frames(*parts: bytes) -> bytes:
    return b"".join(parts)


def feed_all(reader: ap.FrameReader, data: bytes, step: int | None = None) -> list[ap.Event]:
    if step is None:
        return reader.feed(data)
    events: list[ap.Event] = []
    for start in range(0, len(data), step):
        events += reader.feed(data[start:start + step])
    return events


def synced() -> ap.FrameReader:
    reader = ap.FrameReader()
    assert reader.feed(ap.encode_hello(NONCE, {"protocol": 1})) == [ap.Hello(NONCE, {"protocol": 1})]
    return reader


# --- The guest-side files ----------------------------------------------------------------------


@pytest.mark.parametrize("path", GUEST_FILES, ids=lambda path: path.name)
def test_guest_files_parse_as_python_3_9(path: Path) -> None:
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


@pytest.mark.parametrize("path", GUEST_FILES, ids=lambda path: path.name)
def test_guest_files_import_only_what_python3_minimal_has(path: Path) -> None:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - MINIMAL_STDLIB - OPTIONAL_IMPORTS == set()


def test_protocol_module_imports_nothing_from_vmcache() -> None:
    tree = ast.parse((SRC / "agent_protocol.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert modules <= {"__future__", "struct", "typing"}


def test_the_magic_is_not_in_the_source() -> None:
    """The file is copied into guests and may be written through the agent: it must not resync anyone."""
    for path in GUEST_FILES:
        assert ap.MAGIC not in path.read_bytes()


@pytest.mark.skipif(sys.version_info < (3, 9), reason="needs 3.9")
def test_python_3_9_can_import_the_protocol_if_installed() -> None:
    python39 = Path("/root/.pyenv/versions/3.9.18/bin/python3.9")
    if not python39.exists():
        pytest.skip("no Python 3.9 here")
    import subprocess
    result = subprocess.run(
        [str(python39), "-E", "-s", "-c",
         "import agent_protocol as ap; r = ap.FrameReader();"
         "print(r.feed(ap.encode_hello(bytes(16), {'protocol': 1}) + ap.encode_data(1, 1, b'x')))"],
        cwd=SRC, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "Data(channel=1, data=b'x', stream=1)" in result.stdout


# --- Values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2**62, 1.5, b"", bytes(range(256)), "", "h\u00e9llo \udcff",
    [], [1, b"x", "y", None], {"op": "exec", "argv": [b"sh", b"-c", b"echo 'a b'\n"], "env": {"A": "1"}},
])
def test_values_round_trip(value: object) -> None:
    assert ap.unpack_value(ap.pack_value(value)) == value


def test_tuples_come_back_as_lists() -> None:
    assert ap.unpack_value(ap.pack_value((1, 2))) == [1, 2]


@pytest.mark.parametrize("data", [
    b"", b"X", b"i\x00", b"b\x00\x00\x00\x05ab", b"l\xff\xff\xff\xff",
    b"m\x00\x00\x00\x01i" + bytes(8) + b"N", b"NN", b"l\x00\x00\x00\x01" * 20 + b"N",
])
def test_malformed_values_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ap.ProtocolError):
        ap.unpack_value(data)


def test_values_that_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        ap.pack_value({1: 2})
    with pytest.raises(ValueError):
        ap.pack_value(object())


# --- Framing ------------------------------------------------------------------------------------


def test_every_frame_round_trips() -> None:
    reader = synced()
    data = frames(
        ap.encode_request(1, {"op": "exec", "argv": [b"cat"]}),
        ap.encode_reply(1, {"pid": 42, "window": 10}),
        ap.encode_data(1, ap.STDIN, b"\x00\n\r\xff" * 3),
        ap.encode_eof(1, ap.STDIN),
        ap.encode_window(1, ap.STDOUT, 4096),
        ap.encode_control(1, {"op": "signal", "signal": 15}),
        ap.encode_end(1, {"returncode": -9, "timed_out": True}),
        ap.encode_reset(7),
        ap.encode_ping(b"12345678"),
        ap.encode_pong(b"12345678", "boot-id"),
        ap.encode_error("bad bytes"),
    )
    assert reader.feed(data) == [
        ap.Request(1, {"op": "exec", "argv": [b"cat"]}),
        ap.Reply(1, {"pid": 42, "window": 10}),
        ap.Data(1, ap.STDIN, b"\x00\n\r\xff" * 3),
        ap.Eof(1, ap.STDIN),
        ap.WindowUpdate(1, ap.STDOUT, 4096),
        ap.Control(1, {"op": "signal", "signal": 15}),
        ap.End(1, {"returncode": -9, "timed_out": True}),
        ap.Reset(7),
        ap.Ping(b"12345678"),
        ap.Pong(b"12345678", "boot-id"),
        ap.ErrorNotice("bad bytes"),
    ]
    assert reader.discarded == 0


@pytest.mark.parametrize("step", [1, 3, 12, 13, 4096, 65537])
def test_split_input_is_reassembled(step: int) -> None:
    payload = os.urandom(300_000)
    data = frames(ap.encode_hello(NONCE, {"protocol": 1}), ap.encode_data(5, ap.STDOUT, payload),
                  ap.encode_eof(5, ap.STDOUT))
    events = feed_all(ap.FrameReader(), data, step)
    assert events == [ap.Hello(NONCE, {"protocol": 1}), ap.Data(5, ap.STDOUT, payload), ap.Eof(5, ap.STDOUT)]


def test_the_largest_frame_passes_and_many_fill_the_buffer_over_and_over() -> None:
    reader = synced()
    payload = os.urandom(ap.MAX_PAYLOAD)
    data = ap.encode_data(3, ap.STDOUT, payload) * 5
    events = feed_all(reader, data, 700_001)
    assert len(events) == 5 and all(event == ap.Data(3, ap.STDOUT, payload) for event in events)


def test_the_buffer_grows_only_for_frames_bigger_than_a_chunk() -> None:
    """A session costs about 0.5 MiB until a peer actually sends 1 MiB frames."""
    reader = synced()
    small = len(reader.get_buffer())
    assert small < 600 * 1024
    assert feed_all(reader, ap.encode_data(1, 1, b"c" * ap.CHUNK) * 3, 100_000) == [
        ap.Data(1, 1, b"c" * ap.CHUNK)] * 3
    assert len(reader.get_buffer()) == small
    big = os.urandom(ap.MAX_PAYLOAD)
    assert feed_all(reader, ap.encode_data(1, 1, big), 65536) == [ap.Data(1, 1, big)]
    assert len(reader.get_buffer()) >= 2 * ap.MAX_PAYLOAD


def test_buffer_interface_gives_views_without_copies() -> None:
    reader = synced()
    data = ap.encode_data(9, ap.STDERR, b"abc" * 1000) + ap.encode_eof(9, ap.STDERR)
    space = reader.get_buffer()
    space[:len(data)] = data
    events = reader.buffer_filled(len(data))
    assert isinstance(events[0], ap.Data) and isinstance(events[0].data, memoryview)
    assert bytes(events[0].data) == b"abc" * 1000 and events[1] == ap.Eof(9, ap.STDERR)
    with pytest.raises(ValueError):
        reader.buffer_filled(len(reader.get_buffer()) + 1)


def test_oversized_frame_is_garbage() -> None:
    reader = synced()
    header = ap.HEADER.pack(ap.DATA, 1, 0, 1, ap.MAX_PAYLOAD + 1)
    events = reader.feed(header + b"x" * 100)
    assert len(events) == 1 and isinstance(events[0], ap.Garbage)
    assert "limit" in events[0].message
    assert reader.hunting


@pytest.mark.parametrize("header", [
    ap.HEADER.pack(0, 0, 0, 1, 0),  # type 0
    ap.HEADER.pack(99, 0, 0, 1, 0),  # unknown type
    ap.HEADER.pack(ap.DATA, 3, 0, 1, 0),  # channel 3
    ap.HEADER.pack(ap.DATA, 1, 1, 1, 0),  # reserved bits
    ap.HEADER.pack(ap.REQUEST, 0, 0, 0, 1),  # a stream frame on stream 0
    ap.HEADER.pack(ap.PING, 0, 0, 5, 0),  # a connection frame on a stream
    ap.HEADER.pack(ap.WINDOW, 1, 0, 1, 3),  # WINDOW must carry 4 bytes
    ap.HEADER.pack(ap.EOF, 1, 0, 1, 1) + b"x",  # EOF carries nothing
    ap.HEADER.pack(ap.HELLO, 0, 0, 0, 20) + bytes(20),  # HELLO without MAGIC
    ap.HEADER.pack(ap.REQUEST, 0, 0, 1, 1) + b"Z",  # an undecodable body
    ap.HEADER.pack(ap.REQUEST, 0, 0, 1, 1) + b"N",  # a body that is not a dictionary
    ap.HEADER.pack(ap.WINDOW, 1, 0, 1, 4) + bytes(4),  # a zero increment
    ap.MAGIC[:5] + b"nope nope nope!",  # almost a MAGIC
])
def test_malformed_frames_are_garbage(header: bytes) -> None:
    reader = synced()
    events = reader.feed(header)
    assert len(events) == 1 and isinstance(events[0], ap.Garbage), events


def test_garbage_in_the_middle_keeps_order_and_resyncs_at_the_next_hello() -> None:
    reader = synced()
    other = bytes(range(16, 32))
    data = frames(
        ap.encode_ping(b"before"),
        b"\x00" * 40,
        ap.encode_ping(b"lost: hunting"),
        ap.encode_hello(other, {"protocol": 1}),
        ap.encode_ping(b"after"),
    )
    events = reader.feed(data)
    assert [type(event) for event in events] == [ap.Ping, ap.Garbage, ap.Hello, ap.Ping]
    assert events[0] == ap.Ping(b"before") and events[3] == ap.Ping(b"after")
    assert events[2] == ap.Hello(other, {"protocol": 1})


def test_hunting_skips_stale_bytes_before_the_hello() -> None:
    """A new connection may start with the end of a previous client's frame."""
    stale = ap.encode_data(1, 0, b"A" * 5000)[3000:] + os.urandom(777)
    reader = ap.FrameReader()
    events = feed_all(reader, stale + ap.encode_hello(NONCE, {"protocol": 1}) + ap.encode_ping(b"p"), 100)
    assert events == [ap.Hello(NONCE, {"protocol": 1}), ap.Ping(b"p")]
    assert reader.discarded == len(stale)


def test_a_magic_split_across_reads_is_found() -> None:
    data = b"junk" + ap.encode_hello(NONCE, {"protocol": 1})
    for cut in range(1, 30):
        reader = ap.FrameReader()
        assert reader.feed(data[:cut]) == []
        assert reader.feed(data[cut:]) == [ap.Hello(NONCE, {"protocol": 1})]


def test_the_host_skips_hellos_it_does_not_expect() -> None:
    """Replies to older HELLOs (and their sessions' frames) are discarded until the latest's."""
    old, new = os.urandom(16), os.urandom(16)
    reader = ap.FrameReader(accept_hello=lambda hello: hello.nonce == new)
    data = frames(
        ap.encode_hello(old, {"protocol": 1}), ap.encode_data(1, 1, b"stale" * 100),
        ap.encode_hello(new, {"protocol": 1, "boot_id": "b"}), ap.encode_data(1, 1, b"fresh"),
    )
    expected = [ap.Hello(new, {"protocol": 1, "boot_id": "b"}), ap.Data(1, 1, b"fresh")]
    assert feed_all(reader, data, 7) == expected


def test_a_hello_at_a_frame_boundary_starts_a_new_session() -> None:
    reader = synced()
    other = os.urandom(16)
    assert reader.feed(ap.encode_hello(other, {"protocol": 1})) == [ap.Hello(other, {"protocol": 1})]


def test_rescan_finds_a_hello_swallowed_by_a_half_sent_frame() -> None:
    """A client left mid-frame; the next client's HELLO became that frame's payload."""
    reader = synced()
    half = ap.encode_data(1, 0, b"x" * 100_000)[:5000]
    assert reader.feed(half + ap.encode_hello(NONCE, {"protocol": 1})) == []
    events = reader.rescan()
    assert [type(event) for event in events] == [ap.Garbage, ap.Hello]
    assert reader.rescan() == []


def test_random_bytes_never_crash_the_reader() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        reader = synced()
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        if rng.random() < 0.5:
            blob = ap.MAGIC + blob
        for event in reader.feed(blob):
            assert isinstance(event, ap.Event)


def test_encoders_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ap.encode_data_header(1, 1, ap.MAX_PAYLOAD + 1)
    with pytest.raises(ValueError):
        ap.encode_request(0, {})
    with pytest.raises(ValueError):
        ap.encode_window(1, 1, 0)
    with pytest.raises(ValueError):
        ap.encode_hello(b"short", {})
    with pytest.raises(ValueError):
        ap.encode_ping(b"x" * 1000)


# --- Flow control --------------------------------------------------------------------------------


def test_send_credit() -> None:
    credit = ap.SendCredit(100)
    credit.take(60)
    with pytest.raises(ValueError):
        credit.take(41)
    credit.grant(10)
    assert credit.available == 50
    with pytest.raises(ap.ProtocolError):
        credit.grant(0)
    with pytest.raises(ap.ProtocolError):
        credit.grant(ap.MAX_WINDOW)


def test_receive_window_grants_back_in_batches_and_keeps_its_invariant() -> None:
    window = ap.ReceiveWindow(1000)
    window.received(600)
    with pytest.raises(ap.ProtocolError, match="credit"):
        window.received(401)
    assert window.consumed(100) == 0  # below a quarter: no WINDOW yet
    assert window.consumed(200) == 300  # a quarter reached: grant it all back
    assert window.outstanding + window.buffered + window.unacknowledged == window.size
    window.received(700)
    assert window.outstanding == 0
    assert window.consumed(1000) == 1000
    assert window.outstanding == 1000 and window.buffered == 0
    with pytest.raises(ValueError):
        window.consumed(1)


def test_a_sender_that_respects_credit_never_overruns_a_slow_receiver() -> None:
    """Simulate a producer pushing 10 MB through a receiver that consumes in odd sizes."""
    rng = random.Random(7)
    window = ap.ReceiveWindow(256 * 1024)
    credit = ap.SendCredit(window.size)
    sent = received = 0
    buffered_max = 0
    while received < 10_000_000:
        count = min(credit.available, ap.CHUNK, 10_000_000 - sent)
        if count:
            credit.take(count)
            window.received(count)
            sent += count
        buffered_max = max(buffered_max, window.buffered)
        take = min(window.buffered, rng.randrange(1, 100_000))
        received += take
        increment = window.consumed(take)
        if increment:
            credit.grant(increment)
    assert sent == received == 10_000_000
    assert buffered_max <= window.size
