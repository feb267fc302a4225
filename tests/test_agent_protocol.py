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
GUEST_FILES = [SRC / "agent_protocol.py", *sorted((SRC / "in_guest").glob("*.py"))]
#: E2B's guest-side helpers (envd's filesystem, the code interpreter): they serve E2B's SDKs,
#: whose base template has the full python3, as the default image has; the agent itself must
#: run on python3-minimal.
HELPER_FILES = [path for path in GUEST_FILES if path.name.startswith("e2b_")]
AGENT_GUEST_FILES = [path for path in GUEST_FILES if path not in HELPER_FILES]

#: What Debian's python3-minimal ships besides builtins (checked against the package's file list),
#: plus modules the guest imports only under TYPE_CHECKING or only optionally.
MINIMAL_STDLIB = {
    "__future__", "argparse", "collections", "enum", "errno", "fcntl", "heapq", "os", "select", "signal",
    "socket", "stat", "struct", "subprocess", "sys", "time", "traceback", "typing",
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


def feed_all(connection: ap.Connection, data: bytes, step: int | None = None) -> list[ap.Event]:
    """What ``connection`` makes of ``data`` received ``step`` bytes at a time."""
    events: list[ap.Event] = []
    step = step or max(1, len(data))
    for start in range(0, len(data), step):
        connection.receive_data(data[start:start + step])
        while (event := connection.next_event()) is not None:
            events.append(event)
    return events


def request(stream: int, body: dict[str, object]) -> bytes:
    """A REQUEST frame with any body: bytes a hostile or buggy peer may send."""
    return ap._message(ap.REQUEST, stream, body)


def reply(stream: int, body: dict[str, object]) -> bytes:
    return ap._message(ap.REPLY, stream, body)


def end(stream: int, body: dict[str, object]) -> bytes:
    return ap._message(ap.END, stream, body)


def control(stream: int, body: dict[str, object]) -> bytes:
    return ap._message(ap.CONTROL, stream, body)


# --- The guest-side files ----------------------------------------------------------------------


@pytest.mark.parametrize("path", GUEST_FILES, ids=lambda path: path.name)
def test_guest_files_parse_as_python_3_9(path: Path) -> None:
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def _imports(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    return imported


@pytest.mark.parametrize("path", AGENT_GUEST_FILES, ids=lambda path: path.name)
def test_guest_files_import_only_what_python3_minimal_has(path: Path) -> None:
    assert _imports(path) - MINIMAL_STDLIB - OPTIONAL_IMPORTS == set()


@pytest.mark.parametrize("path", HELPER_FILES, ids=lambda path: path.name)
def test_e2b_helpers_import_only_the_standard_library(path: Path) -> None:
    assert {name for name in _imports(path) if name not in sys.stdlib_module_names} == set()


def test_protocol_module_imports_nothing_from_vmcache() -> None:
    tree = ast.parse((SRC / "agent_protocol.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert modules <= {"__future__", "enum", "socket", "struct", "typing"}  # socket: inet_pton


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
         "import agent_protocol as ap; c = ap.Connection(ap.Role.GUEST);"
         "c.receive_data(ap.encode_hello(bytes(16), {'protocol': 1}) + ap.encode_ping(b'x'));"
         "print(c.next_event(), c.next_event())"],
        cwd=SRC, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "Ping(payload=b'x')" in result.stdout


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
#
# Frames through a Connection: its checks of headers, hunting and resync. A guest Connection
# reports garbage as an event, so most of these use one.


def running(window: int = ap.MAX_WINDOW) -> tuple[ap.Connection, ap.Connection]:
    """A host and a guest with stream 1 running, the host granted ``window`` bytes of stdin."""
    host, guest = connected()
    deliver(host, guest, exec_request(window=1 << 20))
    deliver(guest, host, ap.ExecReply(1, 42, window))
    return host, guest


@pytest.mark.parametrize("step", [1, 3, 12, 13, 4096, 65537])
def test_split_input_is_reassembled(step: int) -> None:
    host, guest = ap.Connection(HOST), ap.Connection(GUEST)
    hello = ap.Hello(NONCE, {"protocol": 1})
    assert feed_all(guest, b"junk" + host.send(hello), step) == [hello]
    assert feed_all(host, b"junk" + guest.send(hello), step) == [hello]
    assert feed_all(guest, host.send(exec_request()), step) == [exec_request()]
    assert feed_all(host, guest.send(ap.ExecReply(1, 42, 1 << 20)), step) == [ap.ExecReply(1, 42, 1 << 20)]
    payload = os.urandom(300_000)
    data = host.send(ap.Data(1, ap.STDIN, payload)) + host.send(ap.Eof(1, ap.STDIN))
    assert feed_all(guest, data, step) == [ap.Data(1, ap.STDIN, payload), ap.Eof(1, ap.STDIN)]
    big = payload[:1000]  # the host takes a DATA frame in pieces as they come
    events = feed_all(host, guest.send(ap.Data(1, ap.STDOUT, big)) + guest.send(ap.Eof(1, ap.STDOUT)), step)
    assert events[-1] == ap.Eof(1, ap.STDOUT)
    assert b"".join(event.data for event in events[:-1] if isinstance(event, ap.Data)) == big


def test_the_largest_frame_passes_and_many_fill_the_buffer_over_and_over() -> None:
    host, guest = running()
    payload = os.urandom(ap.MAX_PAYLOAD)
    data = b"".join(host.send(ap.Data(1, ap.STDIN, payload)) for _ in range(5))
    events = feed_all(guest, data, 700_001)
    assert len(events) == 5 and all(event == ap.Data(1, ap.STDIN, payload) for event in events)
    assert guest.buffered == 0


def test_oversized_frame_is_garbage() -> None:
    _, guest = running()
    header = ap.HEADER.pack(ap.DATA, 1, 0, 1, ap.MAX_PAYLOAD + 1)
    events = feed_all(guest, header + b"x" * 100)
    assert len(events) == 1 and isinstance(events[0], ap.Garbage)
    assert "limit" in events[0].message
    assert guest.hunting


@pytest.mark.parametrize(("header", "expected"), [
    (ap.HEADER.pack(0, 0, 0, 1, 0), ap.Garbage),  # type 0
    (ap.HEADER.pack(99, 0, 0, 1, 0), ap.Garbage),  # unknown type
    (ap.HEADER.pack(ap.DATA, 3, 0, 1, 0), ap.Garbage),  # channel 3
    (ap.HEADER.pack(ap.DATA, 1, 1, 1, 0), ap.Garbage),  # reserved bits
    (ap.HEADER.pack(ap.REQUEST, 0, 0, 0, 1), ap.Garbage),  # a stream frame on stream 0
    (ap.HEADER.pack(ap.PING, 0, 0, 5, 0), ap.Garbage),  # a connection frame on a stream
    (ap.HEADER.pack(ap.WINDOW, 1, 0, 1, 3), ap.Garbage),  # WINDOW must carry 4 bytes
    (ap.HEADER.pack(ap.EOF, 1, 0, 1, 1) + b"x", ap.Garbage),  # EOF carries nothing
    (ap.HEADER.pack(ap.HELLO, 0, 0, 0, 20) + bytes(20), ap.Garbage),  # HELLO without MAGIC
    (ap.HEADER.pack(ap.REQUEST, 0, 0, 2, 1) + b"Z", ap.BadRequest),  # an undecodable body
    (ap.HEADER.pack(ap.REQUEST, 0, 0, 2, 1) + b"N", ap.BadRequest),  # a body that is not a dictionary
    (ap.HEADER.pack(ap.WINDOW, 1, 0, 1, 4) + bytes(4), ap.Garbage),  # a zero increment
    (ap.MAGIC[:5] + b"nope nope nope!", ap.Garbage),  # almost a MAGIC
])
def test_malformed_frames_are_garbage(header: bytes, expected: type[ap.Event]) -> None:
    _, guest = running()
    events = feed_all(guest, header)
    assert len(events) == 1 and isinstance(events[0], expected), events


def test_garbage_in_the_middle_keeps_order_and_resyncs_at_the_next_hello() -> None:
    _, guest = connected()
    other = bytes(range(16, 32))
    data = frames(
        ap.encode_ping(b"before"),
        b"\x00" * 40,
        ap.encode_ping(b"lost: hunting"),
        ap.encode_hello(other, {"protocol": 1}),
        ap.encode_ping(b"after"),
    )
    events = feed_all(guest, data)
    assert [type(event) for event in events] == [ap.Ping, ap.Garbage, ap.Hello, ap.Ping]
    assert events[0] == ap.Ping(b"before") and events[3] == ap.Ping(b"after")
    assert events[2] == ap.Hello(other, {"protocol": 1})


def test_hunting_skips_stale_bytes_before_the_hello() -> None:
    """A new connection may start with the end of a previous client's frame."""
    stale = ap.encode_data(1, 0, b"A" * 5000)[3000:] + os.urandom(777)
    guest = ap.Connection(GUEST)
    events = feed_all(guest, stale + ap.encode_hello(NONCE, {"protocol": 1}) + ap.encode_ping(b"p"), 100)
    assert events == [ap.Hello(NONCE, {"protocol": 1}), ap.Ping(b"p")]
    assert guest.discarded == len(stale)


def test_a_magic_split_across_reads_is_found() -> None:
    data = b"junk" + ap.encode_hello(NONCE, {"protocol": 1})
    for cut in range(1, 30):
        guest = ap.Connection(GUEST)
        assert feed_all(guest, data[:cut]) == []
        assert feed_all(guest, data[cut:]) == [ap.Hello(NONCE, {"protocol": 1})]


def test_the_host_skips_hellos_it_does_not_expect() -> None:
    """Replies to older HELLOs (and their sessions' frames) are discarded until the latest's."""
    old, new = os.urandom(16), os.urandom(16)
    host = ap.Connection(HOST)
    host.send(ap.Hello(old, {"protocol": 1}))
    host.send(ap.Hello(new, {"protocol": 1}))
    data = frames(
        ap.encode_hello(old, {"protocol": 1}), ap.encode_data(1, 1, b"stale" * 100),
        ap.encode_hello(new, {"protocol": 1, "boot_id": "b"}), ap.encode_pong(b"p", "b"),
    )
    expected = [ap.Hello(new, {"protocol": 1, "boot_id": "b"}), ap.Pong(b"p", "b")]
    assert feed_all(host, data, 7) == expected


def test_encoders_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ap.encode_data_header(1, 1, ap.MAX_PAYLOAD + 1)
    with pytest.raises(ValueError):
        ap._message(ap.REQUEST, 0, {})
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


# --- Connection: the typed, stateful protocol, both roles ----------------------------------------

S = ap.StreamState
HOST, GUEST = ap.Role.HOST, ap.Role.GUEST


def events_of(connection: ap.Connection, data: bytes) -> list[ap.Event]:
    connection.receive_data(data)
    events = []
    while (event := connection.next_event()) is not None:
        events.append(event)
    return events


def connected() -> tuple[ap.Connection, ap.Connection]:
    """A host and a guest Connection after the handshake (and stale bytes before it)."""
    host, guest = ap.Connection(HOST), ap.Connection(GUEST)
    assert events_of(guest, b"stale" + host.send(ap.Hello(NONCE, {"protocol": 1}))) == [
        ap.Hello(NONCE, {"protocol": 1})]
    info = {"protocol": 1, "boot_id": "b", "port": "vmcache.agent.0"}
    assert events_of(host, guest.send(ap.Hello(NONCE, info))) == [ap.Hello(NONCE, info)]
    assert not host.hunting and not guest.hunting
    return host, guest


def deliver(sender: ap.Connection, receiver: ap.Connection, *events: ap.Event) -> list[ap.Event]:
    """Send ``events`` one end to the other; what the receiver got."""
    return events_of(receiver, b"".join(sender.send(event) for event in events))


def exec_request(stream: int = 1, **fields: object) -> ap.ExecRequest:
    values: dict[str, object] = {"argv": ["cat", b"-"], "env": {"A": "1"}, "cwd": None, "pty": None,
                                 "timeout": None, "stdout": True, "stderr": True, "window": 1000}
    values.update(fields)
    return ap.ExecRequest(stream, **values)


#: How to bring a stream (id 1) to each state: the events the host and the guest send.
PATHS: dict[ap.StreamState, list[ap.Event]] = {
    S.EXEC_REQUESTED: [exec_request()],
    S.WRITE_REQUESTED: [ap.WriteFileRequest(1, "/f", 0o644)],
    S.READ_REQUESTED: [ap.ReadFileRequest(1, "/f", 1000)],
    S.CALL_REQUESTED: [ap.MkdirRequest(1, "/d", 0o755)],
    S.ONLINE_REQUESTED: [ap.OnlineRequest(1)],
    S.STATUS_REQUESTED: [ap.StatusRequest(1)],
    S.CONNECT_REQUESTED: [ap.ConnectRequest(1, 8080, window=1000)],
    S.CONNECTED: [ap.ConnectRequest(1, 8080, window=1000), ap.ConnectReply(1, 1000)],
    S.RUNNING: [exec_request(), ap.ExecReply(1, 42, 1000)],
    S.WRITING: [ap.WriteFileRequest(1, "/f", 0o644), ap.WriteFileReply(1, 1000)],
    S.READING: [ap.ReadFileRequest(1, "/f", 1000), ap.ReadFileReply(1, 0o600, 3)],
    S.ENDED: [exec_request(), ap.ExecReply(1, 42, 1000), ap.ProcessEnd(1, 0)],
}


def in_state(state: ap.StreamState) -> tuple[ap.Connection, ap.Connection]:
    host, guest = connected()
    for event in PATHS[state]:
        sender, receiver = (host, guest) if type(event) in ap.SENDS[HOST] else (guest, host)
        assert deliver(sender, receiver, event) == [event]
    assert host.stream_state(1) is state and guest.stream_state(1) is state
    return host, guest


#: One of each event a role sends on stream 1 ("stop": the guest's EOF on stdin).
HOST_SENDS: dict[str, ap.Event] = {
    "signal": ap.Signal(1, 15), "resize": ap.Resize(1, 30, 100), "data0": ap.Data(1, 0, b"in"),
    "eof0": ap.Eof(1, 0), "window1": ap.WindowUpdate(1, 1, 10), "reset": ap.Reset(1),
}
GUEST_SENDS: dict[str, ap.Event] = {
    "exec_reply": ap.ExecReply(1, 7, 100), "write_reply": ap.WriteFileReply(1, 100),
    "read_reply": ap.ReadFileReply(1, 0o644, 9), "done_reply": ap.DoneReply(1),
    "online_reply": ap.OnlineReply(1, 2, 1024, ["memory9"]), "status_reply": ap.StatusReply(1, "b"),
    "connect_reply": ap.ConnectReply(1, 100), "connect_end": ap.ConnectEnd(1, 5, 7),
    "error_reply": ap.ErrorReply(1, "refused", 13), "process_end": ap.ProcessEnd(1, -9, True),
    "file_end": ap.FileEnd(1, 9), "error_end": ap.ErrorEnd(1, "failed", 5), "data1": ap.Data(1, 1, b"out"),
    "eof1": ap.Eof(1, 1), "stop0": ap.Eof(1, 0), "window0": ap.WindowUpdate(1, 0, 10),
}
_REQUESTED_GUEST = {"error_reply"}
#: What each role may send in each state: written out here, apart from the module's table.
ALLOWED: dict[ap.StreamState, tuple[set[str], set[str]]] = {
    S.EXEC_REQUESTED: ({"eof0", "reset"}, {"exec_reply"} | _REQUESTED_GUEST),
    S.WRITE_REQUESTED: ({"reset"}, {"write_reply"} | _REQUESTED_GUEST),
    S.READ_REQUESTED: ({"reset"}, {"read_reply"} | _REQUESTED_GUEST),
    S.CALL_REQUESTED: ({"reset"}, {"done_reply"} | _REQUESTED_GUEST),
    S.ONLINE_REQUESTED: ({"reset"}, {"online_reply"} | _REQUESTED_GUEST),
    S.STATUS_REQUESTED: ({"reset"}, {"status_reply"} | _REQUESTED_GUEST),
    S.CONNECT_REQUESTED: ({"reset"}, {"connect_reply"} | _REQUESTED_GUEST),
    S.CONNECTED: ({"data0", "eof0", "window1", "reset"},
                  {"connect_end", "error_end", "data1", "eof1", "stop0", "window0"}),
    S.RUNNING: ({"signal", "resize", "data0", "eof0", "window1", "reset"},
                {"process_end", "error_end", "data1", "eof1", "stop0", "window0"}),
    S.WRITING: ({"data0", "eof0", "reset"}, {"file_end", "error_end", "window0", "stop0"}),
    S.READING: ({"window1", "reset"}, {"file_end", "error_end", "data1", "eof1"}),
    S.ENDED: ({"signal", "resize", "data0", "eof0", "window1", "reset"},
              {"data1", "eof1", "stop0", "window0"}),
}


def raw(event: ap.Event) -> bytes:
    """``event``'s frame, encoded without any connection's checks."""
    if isinstance(event, ap.Message):
        return ap._message(event.FRAME, event.stream, event.body())
    if isinstance(event, ap.Data):
        return ap.encode_data(event.stream, event.channel, event.data)
    if isinstance(event, ap.Eof):
        return ap.encode_eof(event.stream, event.channel)
    if isinstance(event, ap.WindowUpdate):
        return ap.encode_window(event.stream, event.channel, event.increment)
    assert isinstance(event, ap.Reset)
    return ap.encode_reset(event.stream)


CASES = [(state, role, name) for state in ALLOWED
         for role, sends in ((HOST, HOST_SENDS), (GUEST, GUEST_SENDS)) for name in sends]


@pytest.mark.parametrize(("state", "role", "name"), CASES, ids=lambda value: getattr(value, "name", value))
def test_every_event_in_every_state_is_sent_and_received_only_if_allowed(
        state: ap.StreamState, role: ap.Role, name: str) -> None:
    host, guest = in_state(state)
    sender, receiver = (host, guest) if role is HOST else (guest, host)
    event = (HOST_SENDS if role is HOST else GUEST_SENDS)[name]
    allowed = name in ALLOWED[state][0 if role is HOST else 1]
    if allowed:
        assert events_of(receiver, sender.send(event)) == [event]
        return
    with pytest.raises(ap.LocalProtocolError):
        sender.send(event)
    assert sender.stream_state(1) is state  # a refused send changes nothing
    if role is GUEST:
        try:
            received = events_of(host, raw(event))
        except ap.RemoteProtocolError:
            return
        # A REPLY or END says nothing of its kind: the host reads it as its stream's kind, or fails.
        assert len(received) == 1 and type(received[0]) is not type(event)
    else:
        received = events_of(guest, raw(event))
        assert len(received) == 1 and isinstance(received[0], ap.Garbage)
        assert guest.hunting


def test_the_table_is_what_the_test_allows() -> None:
    """Every stream move in TRANSITIONS shows up in ALLOWED (or is a request or the drain)."""
    names = {type(event): name for name, event in {**HOST_SENDS, **GUEST_SENDS}.items() if name != "stop0"}
    for (state, kind), _new in ap.TRANSITIONS.items():
        if not isinstance(state, ap.StreamState) or state not in ALLOWED or kind not in names:
            continue
        allowed = ALLOWED[state][0] | ALLOWED[state][1]
        assert any(type({**HOST_SENDS, **GUEST_SENDS}[name]) is kind for name in allowed), (state, kind)


@pytest.mark.parametrize("request_event", [
    exec_request(), ap.WriteFileRequest(1, "/a", 0o600), ap.ReadFileRequest(1, "/a", 5),
    ap.MkdirRequest(1, "/a/b", 0o700), ap.EntropyRequest(1, b"\0" * 64), ap.ClockRequest(1, 1.5e9),
    ap.OnlineRequest(1), ap.StatusRequest(1),
    exec_request(pty=(24, 80), timeout=2.5, cwd="/tmp", stderr=False, env={}),
    ap.ConnectRequest(1, 80, window=5), ap.ConnectRequest(1, 65535, "::1", 0.5, 1 << 20),
    ap.ConnectRequest(1, 1, "10.0.2.15", 3600, 1),
], ids=lambda event: type(event).__name__)
def test_every_request_round_trips_and_an_error_reply_closes_it(request_event: ap.Message) -> None:
    host, guest = connected()
    assert deliver(host, guest, request_event) == [request_event]
    assert deliver(guest, host, ap.ErrorReply(1, "no", 2)) == [ap.ErrorReply(1, "no", 2)]
    assert host.stream_state(1) is S.CLOSED and guest.stream_state(1) is S.CLOSED


@pytest.mark.parametrize(("request_event", "reply"), [
    (ap.MkdirRequest(1, "/d", 0o755), ap.DoneReply(1)),
    (ap.EntropyRequest(1, b"x"), ap.DoneReply(1)),
    (ap.ClockRequest(1, 5), ap.DoneReply(1)),
    (ap.OnlineRequest(1), ap.OnlineReply(1, 4, 1 << 20, [])),
    (ap.StatusRequest(1), ap.StatusReply(1, "boot")),
])
def test_calls_close_with_their_reply(request_event: ap.Message, reply: ap.Message) -> None:
    host, guest = connected()
    deliver(host, guest, request_event)
    assert deliver(guest, host, reply) == [reply]
    assert host.stream_state(1) is S.CLOSED and guest.stream_state(1) is S.CLOSED


def test_a_process_stream_from_start_to_finish_with_credit() -> None:
    host, guest = connected()
    deliver(host, guest, exec_request(window=8))
    deliver(guest, host, ap.ExecReply(1, 42, 4))
    assert host.send_credit(1, 0) == 4 and guest.send_credit(1, 1) == 8 and guest.send_credit(1, 2) == 8
    with pytest.raises(ap.LocalProtocolError, match="credit"):
        host.send(ap.Data(1, 0, b"12345"))
    assert deliver(host, guest, ap.Data(1, 0, b"1234")) == [ap.Data(1, 0, b"1234")]
    assert host.send_credit(1, 0) == 0
    window = guest.consumed(1, 0, 4)
    assert events_of(host, window) == [ap.WindowUpdate(1, 0, 4)] and host.send_credit(1, 0) == 4
    assert deliver(guest, host, ap.Data(1, 1, b"12345678")) == [ap.Data(1, 1, b"12345678")]
    assert guest.send_credit(1, 1) == 0
    with pytest.raises(ap.RemoteProtocolError, match="credit"):  # a guest that ignores credit
        events_of(host, raw(ap.Data(1, 1, b"9")))


def test_a_connection_carries_data_both_ways_under_credit_and_half_closes() -> None:
    host, guest = connected()
    request = ap.ConnectRequest(1, 8080, window=6)
    assert request.host == "127.0.0.1" and request.timeout == 10.0  # the defaults
    assert deliver(host, guest, request) == [request]
    assert host.send_credit(1, 0) == 0  # nothing goes before the connection is made
    deliver(guest, host, ap.ConnectReply(1, 4))
    assert host.send_credit(1, 0) == 4 and guest.send_credit(1, 1) == 6
    with pytest.raises(ap.LocalProtocolError, match="credit"):
        host.send(ap.Data(1, 0, b"12345"))
    with pytest.raises(ap.LocalProtocolError):
        guest.send(ap.Data(1, 2, b"x"))  # no stderr on a connection
    with pytest.raises(ap.LocalProtocolError):
        host.send(ap.Signal(1, 9))  # nor signals
    deliver(host, guest, ap.Data(1, 0, b"ping"), ap.Eof(1, 0))  # the host is done writing ...
    assert host.channel_state(1, 0) is ap.ChannelState.DONE
    assert guest.channel_state(1, 0) is ap.ChannelState.DONE
    with pytest.raises(ap.LocalProtocolError):
        host.send(ap.Data(1, 0, b"x"))
    assert events_of(host, guest.consumed(1, 0, 4)) == []  # no grant after the sender's EOF
    deliver(guest, host, ap.Data(1, 1, b"pong!!"))  # ... and still reads
    with pytest.raises(ap.RemoteProtocolError, match="credit"):
        events_of(host, raw(ap.Data(1, 1, b"!")))


def test_a_connection_ends_once_the_guest_closed_it_both_ways() -> None:
    host, guest = in_state(S.CONNECTED)
    deliver(host, guest, ap.Eof(1, 0))
    deliver(guest, host, ap.Data(1, 1, b"last"), ap.Eof(1, 1))
    assert host.stream_state(1) is S.CONNECTED
    assert deliver(guest, host, ap.ConnectEnd(1, 0, 4)) == [ap.ConnectEnd(1, 0, 4)]
    assert host.stream_state(1) is S.CLOSED and guest.stream_state(1) is S.CLOSED
    host, guest = in_state(S.CONNECTED)
    in_flight = host.send(ap.Data(1, 0, b"typed"))
    deliver(guest, host, ap.Eof(1, 0))  # the socket takes no more: "stop"
    assert host.channel_state(1, 0) is ap.ChannelState.UNREAD and host.send_credit(1, 0) == 0
    assert events_of(guest, in_flight) == []  # dropped on arrival
    deliver(guest, host, ap.ErrorEnd(1, "connection reset", 104))
    assert host.stream_state(1) is S.CLOSED and guest.stream_state(1) is S.CLOSED


def test_an_old_guest_refuses_connect_as_an_unknown_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wire stays compatible: an agent without ``connect`` answers a BadRequest, not garbage."""
    host, guest = connected()
    monkeypatch.delitem(ap._REQUESTS, "connect")
    [event] = deliver(host, guest, ap.ConnectRequest(1, 80, window=10))
    assert isinstance(event, ap.BadRequest) and "unknown request 'connect'" in event.message
    assert deliver(guest, host, ap.ErrorReply(1, event.message)) == [ap.ErrorReply(1, event.message)]
    assert host.stream_state(1) is S.CLOSED and not host.hunting


def test_a_process_ends_once_every_output_is_done() -> None:
    host, guest = connected()
    deliver(host, guest, exec_request(), ap.Eof(1, 0))  # stdin EOF with the request, as run() does
    deliver(guest, host, ap.ExecReply(1, 42, 100), ap.Eof(1, 0), ap.Eof(1, 2), ap.ProcessEnd(1, 3))
    assert host.stream_state(1) is S.ENDED and guest.stream_state(1) is S.ENDED
    assert host.channel_state(1, 0) is ap.ChannelState.DONE
    assert deliver(host, guest, ap.Signal(1, 2)) == [ap.Signal(1, 2)]  # a late signal is harmless
    deliver(guest, host, ap.Data(1, 1, b"late"), ap.Eof(1, 1))
    assert host.stream_state(1) is S.CLOSED and guest.stream_state(1) is S.CLOSED
    with pytest.raises(ap.LocalProtocolError, match="not open"):
        host.send(ap.Signal(1, 9))


def test_stdin_the_guest_stopped_reading_is_dropped_on_arrival() -> None:
    host, guest = in_state(S.RUNNING)
    in_flight = host.send(ap.Data(1, 0, b"typed"))
    deliver(guest, host, ap.Eof(1, 0))
    assert host.channel_state(1, 0) is ap.ChannelState.UNREAD and host.send_credit(1, 0) == 0
    assert events_of(guest, in_flight) == []
    with pytest.raises(ap.LocalProtocolError):
        guest.send(ap.Eof(1, 0))  # it stopped already
    assert deliver(host, guest, ap.Eof(1, 0)) == [ap.Eof(1, 0)]
    assert deliver(guest, host, ap.Eof(1, 0)) == [ap.Eof(1, 0)]  # crossing EOFs are harmless
    with pytest.raises(ap.LocalProtocolError):
        host.send(ap.Eof(1, 1))  # the host is no stdout's sender, nor stops reading it


def test_a_reset_stream_skips_what_the_guest_had_in_flight() -> None:
    host, guest = in_state(S.RUNNING)
    in_flight = guest.send(ap.Data(1, 1, b"x" * 500)) + guest.send(ap.ProcessEnd(1, 0))
    assert deliver(host, guest, ap.Reset(1)) == [ap.Reset(1)]
    assert host.stream_state(1) is S.CLOSED and guest.stream_state(1) is S.CLOSED
    assert events_of(host, in_flight) == []
    assert host.buffered == 0


def test_frames_for_unknown_streams_are_skipped_by_length_unread_in_bounded_memory() -> None:
    host, _ = connected()
    junk = b"\xff" * ap.MAX_PAYLOAD  # not a value at all: decoding it would fail
    for kind in (ap.REPLY, ap.END, ap.DATA, ap.EOF, ap.WINDOW):
        length = {ap.EOF: 0, ap.WINDOW: 4}.get(kind, ap.MAX_PAYLOAD)
        host.receive_data(ap.HEADER.pack(kind, 1 if kind == ap.DATA else 0, 0, 77, length))
        assert host.next_event() is None
        for start in range(0, length, 65536):
            host.receive_data(junk[start:min(start + 65536, length)])
            assert host.next_event() is None
            assert host.buffered == 0
    assert events_of(host, ap.encode_pong(b"p", "b")) == [ap.Pong(b"p", "b")]


def test_host_data_comes_out_as_it_arrives() -> None:
    host, guest = in_state(S.RUNNING)
    frame = guest.send(ap.Data(1, 1, bytes(range(200)) * 4))
    assert events_of(host, frame[:112]) == [ap.Data(1, 1, bytes(range(100)))]
    assert host.buffered == 0
    assert events_of(host, frame[112:]) == [ap.Data(1, 1, (bytes(range(200)) * 4)[100:])]


def test_guest_data_comes_whole() -> None:
    host, guest = in_state(S.RUNNING)
    frame = host.send(ap.Data(1, 0, b"abc" * 100))
    assert events_of(guest, frame[:100]) == []
    assert events_of(guest, frame[100:]) == [ap.Data(1, 0, b"abc" * 100)]


def test_consumed_grants_in_batches_and_not_after_eof() -> None:
    host, guest = in_state(S.READING)
    deliver(guest, host, ap.Data(1, 1, b"x" * 300))
    assert host.consumed(1, 1, 200) == b""  # a quarter of the 1000-byte window is 250
    assert events_of(guest, host.consumed(1, 1, 100)) == [ap.WindowUpdate(1, 1, 300)]
    deliver(guest, host, ap.Data(1, 1, b"y" * 300), ap.Eof(1, 1))
    assert host.consumed(1, 1, 300) == b""  # the sender is done: no grant
    assert host.consumed(99, 1, 10) == b""


def test_roles_refuse_each_others_events() -> None:
    host, guest = connected()
    for event in GUEST_SENDS.values():
        if type(event) not in (ap.Data, ap.Eof, ap.WindowUpdate):
            with pytest.raises(ap.LocalProtocolError, match="host does not send"):
                host.send(event)
    for event in [exec_request(), ap.Signal(1, 9), ap.Reset(1), ap.Ping(b"p"), ap.StatusRequest(1)]:
        with pytest.raises(ap.LocalProtocolError, match="guest does not send"):
            guest.send(event)
    with pytest.raises(ap.LocalProtocolError, match="host does not send"):
        host.send(ap.Pong(b"p", "b"))
    with pytest.raises(ap.LocalProtocolError):
        guest.send(ap.Ping(b"p"))


@pytest.mark.parametrize("frame", [
    request(1, {"op": "ping"}), control(1, {"op": "signal", "signal": 9}),
    ap.encode_ping(b"p"), ap.encode_reset(1),
], ids=["REQUEST", "CONTROL", "PING", "RESET"])
def test_the_host_refuses_host_frames_from_the_guest(frame: bytes) -> None:
    host, guest = connected()
    deliver(host, guest, exec_request())
    with pytest.raises(ap.RemoteProtocolError):
        events_of(host, frame)
    with pytest.raises(ap.RemoteProtocolError):  # and stays broken
        host.next_event()


@pytest.mark.parametrize("frame", [
    reply(1, {}), end(1, {"size": 1}), ap.encode_pong(b"p", "b"), ap.encode_error("e"),
    request(1, {"op": "ping"}),  # an id already used
], ids=["REPLY", "END", "PONG", "ERROR", "REQUEST again"])
def test_the_guest_treats_guest_frames_from_the_host_as_garbage(frame: bytes) -> None:
    host, guest = connected()
    deliver(host, guest, ap.StatusRequest(1))
    assert guest.stream_state(1) is S.STATUS_REQUESTED
    events = events_of(guest, frame)
    assert len(events) == 1 and isinstance(events[0], ap.Garbage) and guest.hunting
    # The next HELLO is a new session: stream ids start again.
    assert deliver(host, guest, ap.Hello(NONCE, {"protocol": 1}), ap.StatusRequest(1)) == [
        ap.Hello(NONCE, {"protocol": 1}), ap.StatusRequest(1)]


def test_stream_ids_only_go_up() -> None:
    host, guest = connected()
    deliver(host, guest, ap.StatusRequest(3))
    assert host.next_stream_id() == 4
    with pytest.raises(ap.LocalProtocolError, match="not new"):
        host.send(ap.StatusRequest(2))
    assert isinstance(events_of(guest, request(2, {"op": "ping"}))[0], ap.Garbage)


def test_the_host_hunts_for_the_answer_to_its_latest_hello() -> None:
    host, guest = ap.Connection(HOST), ap.Connection(GUEST)
    old, new = bytes(16), bytes(range(1, 17))
    host.send(ap.Hello(old, {"protocol": 1}))
    host.send(ap.Hello(new, {"protocol": 1}))
    data = b"junk" + guest.send(ap.Hello(old, {"protocol": 1})) + reply(3, {})[:5]
    data += guest.send(ap.Hello(new, {"protocol": 1, "boot_id": "b"}))
    assert events_of(host, data) == [ap.Hello(new, {"protocol": 1, "boot_id": "b"})]
    assert host.discarded > 0
    assert events_of(host, guest.send(ap.Hello(old, {"protocol": 1}))) == []  # a late stale answer


def test_a_guest_hello_starts_a_new_session() -> None:
    host, guest = in_state(S.RUNNING)
    assert deliver(host, guest, ap.Hello(NONCE, {"protocol": 1})) == [ap.Hello(NONCE, {"protocol": 1})]
    assert guest.stream_state(1) is S.CLOSED and host.stream_state(1) is S.CLOSED


def test_the_guest_resyncs_after_garbage_and_rescans_a_stalled_frame() -> None:
    host, guest = connected()
    events = events_of(guest, b"\x00" * 20)
    assert isinstance(events[0], ap.Garbage) and guest.hunting
    deliver(host, guest, ap.Hello(NONCE, {"protocol": 1}))
    deliver(guest, host, ap.Hello(NONCE, {"protocol": 1}))
    deliver(host, guest, exec_request())
    deliver(guest, host, ap.ExecReply(1, 1, 1000))
    half = host.send(ap.Data(1, 0, b"z" * 500))[:100]
    second = ap.Connection(HOST)  # a new host, after the first left mid-frame
    assert events_of(guest, half + second.send(ap.Hello(NONCE, {"protocol": 1}))) == []
    event = guest.rescan()
    assert isinstance(event, ap.Garbage)
    assert events_of(guest, b"") == [ap.Hello(NONCE, {"protocol": 1})]
    assert guest.rescan() is None


def test_ping_and_pong() -> None:
    host, guest = connected()
    assert deliver(host, guest, ap.Ping(b"12345678")) == [ap.Ping(b"12345678")]
    assert deliver(guest, host, ap.Pong(b"12345678", "boot")) == [ap.Pong(b"12345678", "boot")]
    assert deliver(guest, host, ap.ErrorNotice("x" * 5000)) == [ap.ErrorNotice("x" * 1000)]
    with pytest.raises(ap.LocalProtocolError):
        host.send(ap.Ping(b"x" * 257))


EXEC: dict[str, object] = {"op": "exec", "argv": ["a"], "env": {}, "cwd": None, "pty": None,
                           "timeout": None, "stdout": True, "stderr": True, "window": 1}
BAD_REQUESTS = [
    ({**EXEC, "argv": []}, "ExecRequest.argv"),
    ({**EXEC, "argv": ["a\0b"]}, "ExecRequest.argv"),
    ({**EXEC, "argv": [3]}, "ExecRequest.argv"),
    ({**EXEC, "argv": "ls"}, "ExecRequest.argv"),
    ({**EXEC, "env": {"A=B": "c"}}, "ExecRequest.env"),
    ({**EXEC, "env": {"": "c"}}, "ExecRequest.env"),
    ({**EXEC, "env": {"A": 1}}, "ExecRequest.env"),
    ({**EXEC, "env": []}, "ExecRequest.env"),
    ({**EXEC, "cwd": ""}, "ExecRequest.cwd"),
    ({**EXEC, "cwd": 5}, "ExecRequest.cwd"),
    ({**EXEC, "pty": [1]}, "ExecRequest.pty"),
    ({**EXEC, "pty": [1, 1 << 20]}, "ExecRequest.pty"),
    ({**EXEC, "timeout": float("nan")}, "ExecRequest.timeout"),
    ({**EXEC, "timeout": -1}, "ExecRequest.timeout"),
    ({**EXEC, "stdout": 1}, "ExecRequest.stdout"),
    ({**EXEC, "stderr": None}, "ExecRequest.stderr"),
    ({**EXEC, "window": 0}, "ExecRequest.window"),
    ({key: value for key, value in EXEC.items() if key != "window"}, "ExecRequest.window"),
    ({"op": "write_file", "path": "relative", "mode": 0}, "WriteFileRequest.path"),
    ({"op": "write_file", "path": "/a", "mode": 0o17777}, "WriteFileRequest.mode"),
    ({"op": "read_file", "path": "/a\0", "window": 1}, "ReadFileRequest.path"),
    ({"op": "read_file", "path": "/a", "window": 1 << 40}, "ReadFileRequest.window"),
    ({"op": "mkdir", "path": b"/a", "mode": 1}, "MkdirRequest.path"),
    ({"op": "entropy", "data": b"x" * 4097}, "EntropyRequest.data"),
    ({"op": "entropy", "data": "text"}, "EntropyRequest.data"),
    ({"op": "clock", "seconds": "now"}, "ClockRequest.seconds"),
    ({"op": "clock", "seconds": float("inf")}, "ClockRequest.seconds"),
    ({"op": "connect", "port": 0, "window": 1}, "ConnectRequest.port"),
    ({"op": "connect", "port": 65536, "window": 1}, "ConnectRequest.port"),
    ({"op": "connect", "port": "80", "window": 1}, "ConnectRequest.port"),
    ({"op": "connect", "window": 1}, "ConnectRequest.port"),
    ({"op": "connect", "port": 80, "host": "localhost", "window": 1}, "ConnectRequest.host"),
    ({"op": "connect", "port": 80, "host": "1.2.3", "window": 1}, "ConnectRequest.host"),
    ({"op": "connect", "port": 80, "host": "::1\0", "window": 1}, "ConnectRequest.host"),
    ({"op": "connect", "port": 80, "host": b"127.0.0.1", "window": 1}, "ConnectRequest.host"),
    ({"op": "connect", "port": 80, "host": "1" * 100, "window": 1}, "ConnectRequest.host"),
    ({"op": "connect", "port": 80, "timeout": -1.0, "window": 1}, "ConnectRequest.timeout"),
    ({"op": "connect", "port": 80, "timeout": 1e9, "window": 1}, "ConnectRequest.timeout"),
    ({"op": "connect", "port": 80, "timeout": float("nan"), "window": 1}, "ConnectRequest.timeout"),
    ({"op": "connect", "port": 80}, "ConnectRequest.window"),
    ({"op": "connect", "port": 80, "window": 0}, "ConnectRequest.window"),
    ({"op": "reboot"}, "unknown request"),
    ({"argv": ["a"]}, "unknown request"),
]


@pytest.mark.parametrize(("body", "field"), BAD_REQUESTS, ids=[field for _, field in BAD_REQUESTS])
def test_a_malformed_request_is_a_bad_request_naming_its_field(body: dict[str, object], field: str) -> None:
    _, guest = connected()
    [event] = events_of(guest, request(1, body))
    assert isinstance(event, ap.BadRequest) and field in event.message
    assert guest.stream_state(1) is S.BAD_REQUESTED
    assert events_of(guest, ap.encode_eof(1, 0) + ap.encode_reset(1)) == []  # the host's follow-ups
    guest.send(ap.ErrorReply(1, event.message))
    assert guest.stream_state(1) is S.CLOSED


BAD_ANSWERS: list[tuple[ap.StreamState, bytes, str]] = [
    (S.EXEC_REQUESTED, reply(1, {"pid": "7", "window": 1}), "ExecReply.pid"),
    (S.EXEC_REQUESTED, reply(1, {"pid": 1 << 40, "window": 1}), "ExecReply.pid"),
    (S.EXEC_REQUESTED, reply(1, {"pid": True, "window": 1}), "ExecReply.pid"),
    (S.EXEC_REQUESTED, reply(1, {"window": 1}), "ExecReply.pid"),
    (S.EXEC_REQUESTED, reply(1, {"pid": 1, "window": 0}), "ExecReply.window"),
    (S.EXEC_REQUESTED, reply(1, {"error": 5}), "ErrorReply.error"),
    (S.EXEC_REQUESTED, reply(1, {"error": "x", "errno": -1}), "ErrorReply.errno"),
    (S.EXEC_REQUESTED, reply(1, {"error": "x" * 17000}), "ErrorReply.error"),
    (S.WRITE_REQUESTED, reply(1, {"window": 1.5}), "WriteFileReply.window"),
    (S.READ_REQUESTED, reply(1, {"mode": 1 << 20, "size": 0}), "ReadFileReply.mode"),
    (S.READ_REQUESTED, reply(1, {"mode": 0, "size": -1}), "ReadFileReply.size"),
    (S.ONLINE_REQUESTED, reply(1, {"online_cpus": -1, "mem_total_kib": 0}),
     "OnlineReply.online_cpus"),
    (S.ONLINE_REQUESTED, reply(1, {"online_cpus": 1, "mem_total_kib": "x"}),
     "OnlineReply.mem_total_kib"),
    (S.ONLINE_REQUESTED, reply(1, {"online_cpus": 1, "mem_total_kib": 1, "problems": [1]}),
     "OnlineReply.problems"),
    (S.ONLINE_REQUESTED, reply(1, {"online_cpus": 1, "mem_total_kib": 1, "problems": "x"}),
     "OnlineReply.problems"),
    (S.STATUS_REQUESTED, reply(1, {"boot_id": b"x"}), "StatusReply.boot_id"),
    (S.CALL_REQUESTED, reply(1, []), "dictionary"),  # type: ignore[arg-type]
    (S.RUNNING, end(1, {"returncode": 300}), "ProcessEnd.returncode"),
    (S.RUNNING, end(1, {"returncode": 0, "timed_out": 1}), "ProcessEnd.timed_out"),
    (S.RUNNING, end(1, {"error": None}), "ErrorEnd.error"),
    (S.READING, end(1, {"size": "big"}), "FileEnd.size"),
    (S.CONNECT_REQUESTED, reply(1, {}), "ConnectReply.window"),
    (S.CONNECT_REQUESTED, reply(1, {"window": 0}), "ConnectReply.window"),
    (S.CONNECT_REQUESTED, reply(1, {"window": 1 << 31}), "ConnectReply.window"),
    (S.CONNECTED, end(1, {"received": -1, "sent": 0}), "ConnectEnd.received"),
    (S.CONNECTED, end(1, {"received": 0}), "ConnectEnd.sent"),
    (S.CONNECTED, end(1, {"error": "reset", "errno": 1 << 20}), "ErrorEnd.errno"),
    (S.CONNECTED, ap.HEADER.pack(ap.DATA, 2, 0, 1, 1) + b"x", "no channel 2"),
    (S.RUNNING, b"\xa7" + bytes(30), "HELLO"),
    (S.RUNNING, ap.HEADER.pack(ap.END, 0, 0, 1, 3) + b"i\x00\x00", "truncated"),
    (S.RUNNING, ap.HEADER.pack(ap.DATA, 0, 0, 1, 1) + b"x", "no channel 0"),
    (S.RUNNING, ap.HEADER.pack(ap.DATA, 1, 0, 1, ap.MAX_PAYLOAD + 1), "limit"),
    (S.RUNNING, ap.HEADER.pack(ap.WINDOW, 0, 0, 1, 4) + bytes(4), "WINDOW increment"),
    (S.RUNNING, ap.encode_window(1, 0, ap.MAX_WINDOW), "window"),
    (S.RUNNING, ap.encode_pong(b"x" * 300, "b"), "PONG"),
    (S.RUNNING, ap.encode_pong(b"x", "b" * 300), "PONG boot id"),
]


@pytest.mark.parametrize(("state", "frame", "field"), BAD_ANSWERS, ids=[field for _, _, field in BAD_ANSWERS])
def test_a_malformed_answer_is_a_remote_protocol_error_naming_its_field(
        state: ap.StreamState, frame: bytes, field: str) -> None:
    host, _ = in_state(state)
    with pytest.raises(ap.RemoteProtocolError, match=field.replace(".", r"\.")):
        events_of(host, frame)


@pytest.mark.parametrize(("body", "field"), [
    ({"op": "signal", "signal": 0}, "Signal.signal"), ({"op": "signal"}, "Signal.signal"),
    ({"op": "resize", "rows": -1, "cols": 1}, "Resize.rows"), ({"op": "resize", "rows": 1}, "Resize.cols"),
    ({"op": "stop"}, "unknown CONTROL"),
])
def test_a_malformed_control_is_garbage_naming_its_field(body: dict[str, object], field: str) -> None:
    _, guest = in_state(S.RUNNING)
    [event] = events_of(guest, control(1, body))
    assert isinstance(event, ap.Garbage) and field in event.message


def test_events_refuse_bad_fields_when_built() -> None:
    with pytest.raises(ap.ProtocolError, match=r"ExecRequest\.argv") as caught:
        exec_request(argv=["a\0"])
    assert caught.value.field == "ExecRequest.argv"
    with pytest.raises(ap.ProtocolError, match=r"HELLO\.protocol"):
        ap.Connection(HOST).send(ap.Hello(NONCE, {}))


def test_random_bytes_never_raise_anything_but_protocol_errors() -> None:
    rng = random.Random(17)
    for _ in range(300):
        host, guest = in_state(S.RUNNING)
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
        frame = raw(GUEST_SENDS[rng.choice(list(GUEST_SENDS))])
        position = rng.randrange(len(frame))
        mutated = frame[:position] + bytes([rng.getrandbits(8)]) + frame[position + 1:]
        for chunk in (data, mutated):
            try:
                events_of(host, chunk)
            except ap.RemoteProtocolError:
                pass
            events_of(guest, chunk)  # the guest never raises: garbage is an event


def test_the_host_refuses_answers_too_big_to_decode_quickly() -> None:
    host, _ = in_state(S.EXEC_REQUESTED)
    with pytest.raises(ap.RemoteProtocolError, match="REPLY frame of 65537 bytes"):
        events_of(host, ap.HEADER.pack(ap.REPLY, 0, 0, 1, ap.MAX_ANSWER + 1))


def test_a_send_that_cannot_be_encoded_changes_no_state() -> None:
    host, _ = connected()
    with pytest.raises(ap.LocalProtocolError, match="limit"):
        host.send(exec_request(argv=["x" * 100_000] * 11))  # over the 1 MiB frame
    assert host.stream_state(1) is S.CLOSED and host.next_stream_id() == 1
