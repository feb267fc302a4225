"""The guest agent's wire protocol, with no I/O (sans-I/O, in the style of h11).

This one file is used on both ends: the host imports it as
``vmcache.agent_protocol``; the guest image carries a copy next to the guest
agent, which imports it as ``agent_protocol``. It therefore uses only modules
that Debian's ``python3-minimal`` ships (no json, no dataclasses), imports
nothing from vmcache, and stays Python 3.9 compatible.

The wire format (``docs/agent-protocol.md`` has the full description):

* A **frame** is a 12-byte header ``type:u8 channel:u8 reserved:u16
  stream:u32 length:u32`` (big-endian) followed by ``length`` payload bytes,
  at most :data:`MAX_PAYLOAD`. Streams multiplex many processes and file
  transfers over one connection; channels are a stream's byte pipes (0 stdin,
  1 stdout, 2 stderr).
* A **HELLO** frame is always preceded by :data:`MAGIC`, which a reader hunts
  for at a new connection and after garbage: that is how both ends find a
  frame boundary in a byte stream that may start with stale bytes.
* Structured payloads (requests, replies, ...) are one value in a small
  binary encoding (:func:`pack_value` / :func:`unpack_value`): binary-safe, no
  base64, no JSON.
* Data flows under **credit** (:class:`SendCredit`, :class:`ReceiveWindow`):
  a sender sends at most what the receiver granted.

:class:`FrameReader` turns received bytes into events; the ``encode_*``
functions turn messages into bytes. Neither does any I/O.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

#: Version of this protocol; both HELLOs carry it.
PROTOCOL_VERSION = 1

#: Precedes every HELLO frame. Written with escapes so that this source file
#: itself (copied into guests, written through the agent) never contains it.
MAGIC = b"\xa7\xf1vmcache-agent\x00"

#: The frame header: type, channel, reserved (0), stream id, payload length.
HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size

#: Largest payload a frame may carry; a bigger length is a protocol error.
MAX_PAYLOAD = 1 << 20
#: Largest HELLO and PING/PONG payloads.
MAX_HELLO = 4096
MAX_PING = 256
#: Length of a HELLO nonce.
NONCE_SIZE = 16

#: Data chunk a sender puts in one DATA frame (throughput: few, big frames).
CHUNK = 256 * 1024
#: Initial credit a receiver grants per channel, unless it says otherwise.
DEFAULT_WINDOW = 4 * 1024 * 1024
#: Largest credit a receiver may hold out (sum of grants not yet used).
MAX_WINDOW = 1 << 30

# Frame types.
HELLO = 1  # MAGIC + header + nonce + value: {"protocol": int, ...}
REQUEST = 2  # host -> guest, opens a stream: {"op": str, ...}
REPLY = 3  # guest -> host, first answer on a stream: {...} or {"error": str, "errno": int}
END = 4  # guest -> host, a stream is finished: {...} or {"error": str}
DATA = 5  # channel bytes
EOF = 6  # no more bytes on a channel
WINDOW = 7  # u32: more credit on a channel
CONTROL = 8  # host -> guest, about a running stream: {"op": "signal"|"resize", ...}
RESET = 9  # host -> guest, abandon a stream (kill its process, drop its transfer)
PING = 10  # opaque payload
PONG = 11  # the ping's payload, echoed, then the guest's boot id
ERROR = 12  # guest -> host: garbage received, resynchronising: {"message": str}

FRAME_NAMES = {
    HELLO: "HELLO", REQUEST: "REQUEST", REPLY: "REPLY", END: "END", DATA: "DATA", EOF: "EOF",
    WINDOW: "WINDOW", CONTROL: "CONTROL", RESET: "RESET", PING: "PING", PONG: "PONG", ERROR: "ERROR",
}

# Channels.
STDIN = 0
STDOUT = 1
STDERR = 2

_CONNECTION_FRAMES = frozenset((HELLO, PING, PONG, ERROR))  # stream 0
_CHANNEL_FRAMES = frozenset((DATA, EOF, WINDOW))  # channel 0..2
_U32 = struct.Struct("!I")


class ProtocolError(Exception):
    """The peer sent something that is not this protocol, or broke its rules (credit)."""


# --- Structured values ---------------------------------------------------------------------------
#
# One tag byte, then: "N" none, "T"/"F" booleans, "i" int64, "d" float64,
# "b" u32 length + bytes, "s" u32 length + UTF-8 (surrogateescape), "l" u32 count
# + values, "m" u32 count + (string key, value) pairs.

_I64 = struct.Struct("!q")
_F64 = struct.Struct("!d")
_MAX_DEPTH = 8

Value = Any


def pack_value(value: Value) -> bytes:
    """Encode ``value`` (None, bool, int, float, bytes, str, list/tuple, dict with str keys)."""
    parts: list[bytes] = []
    _pack(value, parts, 0)
    return b"".join(parts)


def _pack(value: Value, parts: list[bytes], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None:
        parts.append(b"N")
    elif value is True:
        parts.append(b"T")
    elif value is False:
        parts.append(b"F")
    elif isinstance(value, int):
        parts.append(b"i" + _I64.pack(value))
    elif isinstance(value, float):
        parts.append(b"d" + _F64.pack(value))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        parts.append(b"b" + _U32.pack(len(value)))
        parts.append(bytes(value))
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        parts.append(b"s" + _U32.pack(len(raw)))
        parts.append(raw)
    elif isinstance(value, (list, tuple)):
        parts.append(b"l" + _U32.pack(len(value)))
        for item in value:
            _pack(item, parts, depth + 1)
    elif isinstance(value, dict):
        parts.append(b"m" + _U32.pack(len(value)))
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("dictionary keys must be strings")
            _pack(key, parts, depth + 1)
            _pack(item, parts, depth + 1)
    else:
        raise ValueError(f"cannot encode a {type(value).__name__}")


def unpack_value(data: bytes | bytearray | memoryview) -> Value:
    """Decode one value that fills ``data`` exactly; :class:`ProtocolError` if it does not."""
    view = memoryview(data)
    try:
        value, end = _unpack(view, 0, 0)
    except (struct.error, IndexError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("a value is truncated or malformed") from None
    if end != len(view):
        raise ProtocolError(f"{len(view) - end} stray bytes after a value")
    return value


def _unpack(view: memoryview, pos: int, depth: int) -> tuple[Value, int]:
    if depth > _MAX_DEPTH:
        raise ProtocolError("a value is nested too deeply")
    tag = view[pos]
    pos += 1
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x69:  # i
        return _I64.unpack_from(view, pos)[0], pos + 8
    if tag == 0x64:  # d
        return _F64.unpack_from(view, pos)[0], pos + 8
    if tag in (0x62, 0x73, 0x6C, 0x6D):  # b s l m
        (count,) = _U32.unpack_from(view, pos)
        pos += 4
        if tag == 0x62 or tag == 0x73:
            if pos + count > len(view):
                raise ProtocolError("a value is truncated")
            raw = bytes(view[pos:pos + count])
            return (raw if tag == 0x62 else raw.decode("utf-8", "surrogateescape")), pos + count
        if count > len(view) - pos:  # every item takes at least one byte
            raise ProtocolError("a value announces more items than it has bytes")
        if tag == 0x6C:
            items = []
            for _ in range(count):
                item, pos = _unpack(view, pos, depth + 1)
                items.append(item)
            return items, pos
        mapping = {}
        for _ in range(count):
            key, pos = _unpack(view, pos, depth + 1)
            if not isinstance(key, str):
                raise ProtocolError("a dictionary key is not a string")
            mapping[key], pos = _unpack(view, pos, depth + 1)
        return mapping, pos
    raise ProtocolError(f"unknown value tag 0x{tag:02x}")


# --- Events --------------------------------------------------------------------------------------


class Event:
    """A decoded frame. Subclasses list their fields in ``__slots__``."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={_short(getattr(self, name))!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


def _short(value: Any) -> Any:
    if isinstance(value, memoryview):
        value = bytes(value[:40])
    if isinstance(value, (bytes, bytearray)) and len(value) > 40:
        return bytes(value[:40]) + b"..."
    return value


class Hello(Event):
    """A session handshake: ``nonce`` (16 random bytes the reply repeats) and ``info``."""

    __slots__ = ("info", "nonce")

    def __init__(self, nonce: bytes, info: dict[str, Any]) -> None:
        self.nonce = nonce
        self.info = info


class _Message(Event):
    __slots__ = ("body", "stream")

    def __init__(self, stream: int, body: dict[str, Any]) -> None:
        self.stream = stream
        self.body = body


class Request(_Message):
    """Host to guest: open ``stream`` to do ``body["op"]``."""

    __slots__ = ()


class Reply(_Message):
    """Guest to host: the first answer on a stream (``body["error"]`` if it failed)."""

    __slots__ = ()


class End(_Message):
    """Guest to host: ``stream`` is finished (exit status, transfer size, or ``error``)."""

    __slots__ = ()


class Control(_Message):
    """Host to guest: act on a running stream (send a signal, resize a pty)."""

    __slots__ = ()


class Data(Event):
    """Bytes on a channel. From :meth:`FrameReader.buffer_filled`, ``data`` is a
    memoryview into the reader's buffer, valid until the reader is used again."""

    __slots__ = ("channel", "data", "stream")

    def __init__(self, stream: int, channel: int, data: bytes | memoryview) -> None:
        self.stream = stream
        self.channel = channel
        self.data = data


class Eof(Event):
    """No more bytes on a channel (host to guest: stdin closed; guest to host: output done)."""

    __slots__ = ("channel", "stream")

    def __init__(self, stream: int, channel: int) -> None:
        self.stream = stream
        self.channel = channel


class WindowUpdate(Event):
    """The receiver consumed data: the sender may send ``increment`` more bytes."""

    __slots__ = ("channel", "increment", "stream")

    def __init__(self, stream: int, channel: int, increment: int) -> None:
        self.stream = stream
        self.channel = channel
        self.increment = increment


class Reset(Event):
    """Host to guest: forget ``stream`` (its process is killed, its transfer dropped)."""

    __slots__ = ("stream",)

    def __init__(self, stream: int) -> None:
        self.stream = stream


class Ping(Event):
    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class Pong(Event):
    """The answer to a :class:`Ping`: its payload, and the guest's boot id."""

    __slots__ = ("boot_id", "payload")

    def __init__(self, payload: bytes, boot_id: str) -> None:
        self.payload = payload
        self.boot_id = boot_id


class Garbage(Event):
    """Not a frame: the reader found bytes that are not the protocol and went back to hunting.

    The host treats it as fatal; the guest answers ERROR and waits for a HELLO.
    """

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class ErrorNotice(Event):
    """Guest to host: it received garbage and is resynchronising (it waits for a HELLO)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


# --- Encoding ------------------------------------------------------------------------------------


def _frame(kind: int, stream: int, payload: bytes = b"", channel: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame payload of {len(payload)} bytes is over the {MAX_PAYLOAD} limit")
    return HEADER.pack(kind, channel, 0, stream, len(payload)) + payload


def encode_hello(nonce: bytes, info: dict[str, Any]) -> bytes:
    """MAGIC and a HELLO frame. ``info`` should hold ``"protocol": PROTOCOL_VERSION``."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a HELLO nonce has {NONCE_SIZE} bytes")
    payload = nonce + pack_value(info)
    if len(payload) > MAX_HELLO:
        raise ValueError("HELLO too big")
    return MAGIC + _frame(HELLO, 0, payload)


def _message(kind: int, stream: int, body: dict[str, Any]) -> bytes:
    if stream <= 0 or stream > 0xFFFFFFFF:
        raise ValueError("stream ids are 1 to 2**32-1")
    return _frame(kind, stream, pack_value(body))


def encode_request(stream: int, body: dict[str, Any]) -> bytes:
    return _message(REQUEST, stream, body)


def encode_reply(stream: int, body: dict[str, Any]) -> bytes:
    return _message(REPLY, stream, body)


def encode_end(stream: int, body: dict[str, Any]) -> bytes:
    return _message(END, stream, body)


def encode_control(stream: int, body: dict[str, Any]) -> bytes:
    return _message(CONTROL, stream, body)


def encode_data_header(stream: int, channel: int, length: int) -> bytes:
    """The header of a DATA frame, for writing it and its payload without a copy (writev)."""
    if length > MAX_PAYLOAD:
        raise ValueError(f"a DATA frame carries at most {MAX_PAYLOAD} bytes")
    return HEADER.pack(DATA, channel, 0, stream, length)


def encode_data(stream: int, channel: int, data: bytes | bytearray | memoryview) -> bytes:
    return encode_data_header(stream, channel, len(data)) + bytes(data)


def encode_eof(stream: int, channel: int) -> bytes:
    return HEADER.pack(EOF, channel, 0, stream, 0)


def encode_window(stream: int, channel: int, increment: int) -> bytes:
    if not 0 < increment <= MAX_WINDOW:
        raise ValueError(f"a window increment is 1 to {MAX_WINDOW}")
    return HEADER.pack(WINDOW, channel, 0, stream, 4) + _U32.pack(increment)


def encode_reset(stream: int) -> bytes:
    return HEADER.pack(RESET, 0, 0, stream, 0)


def encode_ping(payload: bytes) -> bytes:
    if len(payload) > MAX_PING:
        raise ValueError(f"a PING payload is at most {MAX_PING} bytes")
    return _frame(PING, 0, payload)


def encode_pong(payload: bytes, boot_id: str) -> bytes:
    return _frame(PONG, 0, pack_value([bytes(payload), boot_id]))


def encode_error(message: str) -> bytes:
    return _frame(ERROR, 0, pack_value({"message": message[:1000]}))


# --- Decoding ------------------------------------------------------------------------------------


def _decode_body(kind: int, payload: memoryview) -> dict[str, Any]:
    body = unpack_value(payload)
    if not isinstance(body, dict):
        raise ProtocolError(f"a {FRAME_NAMES[kind]} frame does not carry a dictionary")
    return body


def decode_frame(kind: int, channel: int, stream: int, payload: memoryview) -> Event:
    """One frame as an event (the header was checked by :func:`check_header`)."""
    if kind == DATA:
        return Data(stream, channel, payload)
    if kind == EOF:
        return Eof(stream, channel)
    if kind == WINDOW:
        (increment,) = _U32.unpack_from(payload)
        if not 0 < increment <= MAX_WINDOW:
            raise ProtocolError(f"a WINDOW increment of {increment}")
        return WindowUpdate(stream, channel, increment)
    if kind == REQUEST:
        return Request(stream, _decode_body(kind, payload))
    if kind == REPLY:
        return Reply(stream, _decode_body(kind, payload))
    if kind == END:
        return End(stream, _decode_body(kind, payload))
    if kind == CONTROL:
        return Control(stream, _decode_body(kind, payload))
    if kind == RESET:
        return Reset(stream)
    if kind == PING:
        return Ping(bytes(payload))
    if kind == PONG:
        value = unpack_value(payload)
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bytes)
                and isinstance(value[1], str)):
            raise ProtocolError("a malformed PONG")
        return Pong(value[0], value[1])
    if kind == ERROR:
        return ErrorNotice(str(_decode_body(kind, payload).get("message", "")))
    if kind == HELLO:
        info = unpack_value(payload[NONCE_SIZE:])
        if not isinstance(info, dict):
            raise ProtocolError("a malformed HELLO")
        return Hello(bytes(payload[:NONCE_SIZE]), info)
    raise ProtocolError(f"unknown frame type {kind}")


def check_header(kind: int, channel: int, reserved: int, stream: int, length: int) -> str | None:
    """Why a frame header is invalid, or None if it is fine."""
    if kind not in FRAME_NAMES:
        return f"unknown frame type {kind}"
    name = FRAME_NAMES[kind]
    if reserved != 0:
        return f"{name} frame with reserved bits set"
    if length > MAX_PAYLOAD:
        return f"{name} frame of {length} bytes (the limit is {MAX_PAYLOAD})"
    if (stream == 0) != (kind in _CONNECTION_FRAMES):
        return f"{name} frame on stream {stream}"
    if channel > STDERR or (channel != 0 and kind not in _CHANNEL_FRAMES):
        return f"{name} frame on channel {channel}"
    if kind == WINDOW and length != 4:
        return f"WINDOW frame of {length} bytes"
    if kind in (EOF, RESET) and length != 0:
        return f"{name} frame with a payload"
    if kind in (PING, PONG) and length > MAX_PING + 64:
        return f"{name} frame of {length} bytes"
    if kind == HELLO and not NONCE_SIZE < length <= MAX_HELLO:
        return f"HELLO frame of {length} bytes"
    return None


class FrameReader:
    """Bytes in, events out, for one connection; finds frame boundaries by itself.

    It starts *hunting* (``hunting=True``): every byte before :data:`MAGIC` and
    a well-formed HELLO is discarded (and counted in ``discarded``).
    ``accept_hello(hello)`` may refuse a HELLO (the host refuses replies to a
    nonce it did not send last), which is then skipped like garbage. Once
    synchronised, every frame is decoded; garbage yields a :class:`Garbage`
    event, in order among the others, and puts the reader back to hunting.

    Two ways to feed it: :meth:`feed` with bytes (events then own their data),
    or, to save copies, :meth:`get_buffer` to read straight into its buffer
    followed by :meth:`buffer_filled` (DATA payloads are then views into that
    buffer, valid until the reader is used again).

    The buffer starts at ``capacity`` (room for two :data:`CHUNK` frames) and
    grows, up to two of the largest frames, only if the peer sends bigger ones.
    """

    def __init__(
        self,
        *,
        hunting: bool = True,
        accept_hello: Callable[[Hello], bool] | None = None,
        capacity: int = 2 * (CHUNK + HEADER_SIZE + len(MAGIC)),
    ) -> None:
        self._buffer = bytearray(max(capacity, 2 * (MAX_HELLO + HEADER_SIZE + len(MAGIC))))
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._need = 0  # bytes the incomplete frame at _start needs in all
        self.hunting = hunting
        self.accept_hello = accept_hello
        #: Bytes dropped while hunting.
        self.discarded = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (an incomplete frame)."""
        return self._end - self._start

    def resync(self) -> None:
        """Drop what is buffered and hunt for the next HELLO (a new connection)."""
        self.discarded += self._end - self._start
        self._start = self._end = 0
        self.hunting = True

    def rescan(self) -> list[Event]:
        """Give up on the incomplete frame buffered and hunt for a HELLO inside it.

        For a stream that stalled mid-frame: a host that left in the middle of
        a frame, and a new host whose HELLO the old frame swallowed as payload.
        """
        if self.hunting or self._start == self._end:
            return []
        events: list[Event] = [self._garbage("an incomplete frame, then silence")]
        return events + self.buffer_filled(0)

    def get_buffer(self) -> memoryview:
        """Free space to read into; then call :meth:`buffer_filled` with the count.

        Invalidates the data of events from the previous call.
        """
        if self._start == self._end:
            self._start = self._end = 0
        if self._need > len(self._buffer) // 2:  # a frame bigger than we were ready for
            size = self._end - self._start
            buffer = bytearray(2 * self._need)
            buffer[:size] = self._view[self._start:self._end]
            self._buffer, self._view = buffer, memoryview(buffer)
            self._start, self._end = 0, size
        elif self._start and len(self._buffer) - self._end < len(self._buffer) // 2:
            size = self._end - self._start
            self._view[:size] = self._view[self._start:self._end]
            self._start, self._end = 0, size
        return self._view[self._end:]

    def buffer_filled(self, count: int) -> list[Event]:
        """``count`` bytes were written at the start of :meth:`get_buffer`'s view."""
        if not 0 <= count <= len(self._buffer) - self._end:
            raise ValueError("more bytes than the buffer had room for")
        self._end += count
        events: list[Event] = []
        while True:
            if self.hunting and not self._hunt():
                return events
            event = self._next_frame()
            if event is None:
                return events
            events.append(event)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Decode ``data`` (any length); returned events own their bytes."""
        events: list[Event] = []
        view = memoryview(data).cast("B")
        while True:
            space = self.get_buffer()
            count = min(len(space), len(view))
            space[:count] = view[:count]
            view = view[count:]
            events.extend(_owned(event) for event in self.buffer_filled(count))
            if not view:
                return events

    def _next_frame(self) -> Event | None:
        """Decode the frame at the start of the buffer; None if it is incomplete."""
        view = self._view
        pos = self._start
        available = self._end - pos
        if available < HEADER_SIZE:
            return None
        first = view[pos]
        if first == MAGIC[0]:  # a HELLO at a frame boundary: a new session on this connection
            seen = min(available, len(MAGIC))
            if view[pos:pos + seen] != MAGIC[:seen]:
                return self._garbage("bytes that look like a HELLO but are not")
            if available < len(MAGIC) + HEADER_SIZE:
                return None
            pos += len(MAGIC)
        kind, channel, reserved, stream, length = HEADER.unpack_from(view, pos)
        problem = check_header(kind, channel, reserved, stream, length)
        if problem is None and (kind == HELLO) != (first == MAGIC[0]):
            problem = "a HELLO without MAGIC" if kind == HELLO else "MAGIC before a non-HELLO frame"
        if problem is not None:
            return self._garbage(problem)
        end = pos + HEADER_SIZE + length
        if end > self._end:
            self._need = end - self._start
            return None
        self._need = 0
        try:
            event = decode_frame(kind, channel, stream, view[pos + HEADER_SIZE:end])
        except ProtocolError as error:
            return self._garbage(f"{FRAME_NAMES[kind]} frame: {error}")
        self._start = end
        return event

    def _garbage(self, problem: str) -> Garbage:
        """Skip one byte and hunt again."""
        self._need = 0
        self._start += 1
        self.discarded += 1
        self.hunting = True
        return Garbage("garbage from the peer: " + problem)

    def _hunt(self) -> bool:
        """Skip to a MAGIC followed by an acceptable HELLO; False if more bytes are needed."""
        view = self._view
        while True:
            index = self._buffer.find(MAGIC, self._start, self._end)
            if index < 0:
                keep = min(len(MAGIC) - 1, self._end - self._start)  # maybe a MAGIC's start
                self.discarded += self._end - self._start - keep
                self._start = self._end - keep
                return False
            self.discarded += index - self._start
            self._start = index
            if self._end - index < len(MAGIC) + HEADER_SIZE:
                return False
            kind, channel, reserved, stream, length = HEADER.unpack_from(view, index + len(MAGIC))
            if kind == HELLO and check_header(kind, channel, reserved, stream, length) is None:
                end = index + len(MAGIC) + HEADER_SIZE + length
                if end > self._end:
                    return False
                try:
                    hello = decode_frame(kind, channel, stream, view[end - length:end])
                except ProtocolError:
                    hello = None
                if isinstance(hello, Hello) and (self.accept_hello is None or self.accept_hello(hello)):
                    self.hunting = False
                    return True
            self._start = index + 1
            self.discarded += 1


def _owned(event: Event) -> Event:
    if isinstance(event, Data) and isinstance(event.data, memoryview):
        return Data(event.stream, event.channel, bytes(event.data))
    return event


# --- Flow control --------------------------------------------------------------------------------


class SendCredit:
    """How many data bytes the peer allows us to send on one channel."""

    __slots__ = ("available",)

    def __init__(self, initial: int) -> None:
        self.available = initial

    def grant(self, increment: int) -> None:
        """The peer sent WINDOW ``increment``; :class:`ProtocolError` past :data:`MAX_WINDOW`."""
        if increment <= 0 or self.available + increment > MAX_WINDOW:
            raise ProtocolError(f"the peer granted a window of {increment} more bytes")
        self.available += increment

    def take(self, count: int) -> None:
        """We send ``count`` bytes; sending more than the credit is our own bug."""
        if count > self.available:
            raise ValueError(f"sending {count} bytes with {self.available} of credit")
        self.available -= count


class ReceiveWindow:
    """The receiving side of one channel's flow control.

    ``size`` bytes are granted at the start. The invariant is
    ``outstanding + buffered + unacknowledged == size``: the peer may send
    ``outstanding`` bytes, ``buffered`` bytes wait for the consumer, and
    ``unacknowledged`` bytes were consumed but not yet granted back. Grants
    are batched (a quarter of the window at a time) to keep WINDOW frames few.
    """

    __slots__ = ("buffered", "outstanding", "size", "unacknowledged")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if not 0 < size <= MAX_WINDOW:
            raise ValueError(f"a window is 1 to {MAX_WINDOW} bytes")
        self.size = size
        self.outstanding = size
        self.buffered = 0
        self.unacknowledged = 0

    def received(self, count: int) -> None:
        """The peer sent ``count`` bytes; :class:`ProtocolError` if it had no credit for them."""
        if count > self.outstanding:
            raise ProtocolError(f"the peer sent {count} bytes with {self.outstanding} of credit")
        self.outstanding -= count
        self.buffered += count

    def consumed(self, count: int) -> int:
        """The consumer took ``count`` bytes; returns an increment to grant now (WINDOW), or 0."""
        if count > self.buffered:
            raise ValueError(f"consumed {count} bytes of {self.buffered} buffered")
        self.buffered -= count
        self.unacknowledged += count
        if self.unacknowledged >= max(1, self.size // 4):
            increment = self.unacknowledged
            self.unacknowledged = 0
            self.outstanding += increment
            return increment
        return 0

