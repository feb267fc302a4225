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

* Every message kind is a typed event (:class:`ExecRequest`, :class:`ExecReply`,
  :class:`ProcessEnd`, :class:`Data`, ...) whose fields are checked once, when
  it is built or decoded.

:class:`Connection` (one per session end, ``Role.HOST`` or ``Role.GUEST``)
turns events into bytes and bytes into events, keeps each stream's state in
one table (:data:`TRANSITIONS`) and the credit of each channel. It does no I/O.
"""

from __future__ import annotations

import enum
import socket
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
    """Something that is not this protocol, or breaks its rules; ``field`` names the bad field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


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

    def _names(self) -> tuple[str, ...]:
        return tuple(name for kind in reversed(type(self).__mro__) for name in getattr(kind, "__slots__", ()))

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._names())

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={_short(getattr(self, name))!r}" for name in self._names())
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


class Data(Event):
    """Bytes on a channel (a sender may pass a memoryview, to save a copy)."""

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
    """A HELLO, WINDOW, PING, PONG or ERROR frame as an event (its header checked by
    :func:`check_header`); the :class:`Connection` decodes the others itself, by stream state."""
    if kind == WINDOW:
        (increment,) = _U32.unpack_from(payload)
        if not 0 < increment <= MAX_WINDOW:
            raise ProtocolError(f"a WINDOW increment of {increment}")
        return WindowUpdate(stream, channel, increment)
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
    raise ProtocolError(f"{FRAME_NAMES.get(kind, kind)} frames are not decoded here")


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



# --- Typed messages ------------------------------------------------------------------------------
#
# Every REQUEST, REPLY, END and CONTROL payload has a class of its own, whose
# FIELDS say each field's check. The constructor runs the checks and raises
# ProtocolError naming the field; the Connection builds events from received
# values, so a field is checked once, where it enters.

#: Field bounds.
MAX_PID = (1 << 31) - 1
MAX_PATH = 4096
MAX_TEXT = 16 * 1024
MAX_ENV_TEXT = 128 * 1024  # Linux's longest argument or variable
MAX_ARGS = 64 * 1024
MAX_ENTROPY = 4096
MAX_PROBLEMS = 1024
MAX_SIZE = (1 << 63) - 1
MAX_HELLO_FIELDS = 64
#: Largest REPLY, END or ERROR payload a host takes: decoding a value costs time, and what the
#: guest answers is small (a hostile guest must not stall the host's event loop with it).
MAX_ANSWER = 64 * 1024
_ANSWERS = (REPLY, END, ERROR)


def _field_error(field: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{field} {problem}", field)


def _int(field: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int:
        raise _field_error(field, f"is a {type(value).__name__}, not an integer")
    if not low <= value <= high:
        raise _field_error(field, f"is {value}, not {low} to {high}")
    return value


def _text(field: str, value: Any, limit: int = MAX_TEXT, *, nul: bool = True) -> str:
    if type(value) is not str:
        raise _field_error(field, f"is a {type(value).__name__}, not text")
    if len(value) > limit:
        raise _field_error(field, f"has {len(value)} characters, more than {limit}")
    if not nul and "\0" in value:
        raise _field_error(field, "contains a NUL character")
    return value


Check = Callable[[str, Any], Any]


def _ranged(low: int, high: int) -> Check:
    return lambda field, value: _int(field, value, low, high)


def _bool(field: str, value: Any) -> bool:
    if type(value) is not bool:
        raise _field_error(field, f"is a {type(value).__name__}, not a boolean")
    return value


def _number(high: float) -> Check:
    def check(field: str, value: Any) -> float:
        if type(value) is int:
            value = float(value)
        if type(value) is not float:
            raise _field_error(field, f"is a {type(value).__name__}, not a number")
        if not 0.0 <= value <= high:  # also refuses NaN
            raise _field_error(field, f"is {value!r}, not 0 to {high:g}")
        return value
    return check


def _optional(check: Check) -> Check:
    return lambda field, value: None if value is None else check(field, value)


def _path(field: str, value: Any) -> str:
    path = _text(field, value, MAX_PATH, nul=False)
    if not path.startswith("/"):
        raise _field_error(field, f"is not an absolute path: {path[:100]!r}")
    return path


def _argv(field: str, argv: Any) -> list[str | bytes]:
    if not isinstance(argv, list) or not 0 < len(argv) <= MAX_ARGS:
        raise _field_error(field, f"is not a list of 1 to {MAX_ARGS} arguments")
    for arg in argv:
        if not isinstance(arg, (str, bytes)):
            raise _field_error(field, f"holds a {type(arg).__name__}")
        if ("\0" if isinstance(arg, str) else b"\0") in arg:  # type: ignore[operator]
            raise _field_error(field, f"holds a NUL in {arg[:100]!r}")
    return argv


def _env(field: str, env: Any) -> dict[str, str]:
    if not isinstance(env, dict):
        raise _field_error(field, f"is a {type(env).__name__}, not a dictionary")
    for key, value in env.items():
        if not _text(field, key, nul=False) or "=" in key:
            raise _field_error(field, f"has a bad variable name {key[:100]!r}")
        _text(f"{field}[{key[:100]!r}]", value, MAX_ENV_TEXT, nul=False)
    return env


def _cwd(field: str, value: Any) -> str | None:
    if value is None:
        return None
    if not _text(field, value, MAX_PATH, nul=False):
        raise _field_error(field, "is empty")
    return str(value)


def _pty(field: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _field_error(field, "is not [rows, cols]")
    return (_int(f"{field} rows", value[0], 0, 0xFFFF), _int(f"{field} cols", value[1], 0, 0xFFFF))


def _entropy(field: str, value: Any) -> bytes:
    if type(value) is not bytes or len(value) > MAX_ENTROPY:
        raise _field_error(field, f"is not at most {MAX_ENTROPY} bytes")
    return value


def _problems(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_PROBLEMS:
        raise _field_error(field, f"is not a list of at most {MAX_PROBLEMS} texts")
    return [_text(field, item, 200) for item in value]


def _address(field: str, value: Any) -> str:
    """An IPv4 or IPv6 address literal (no names: the guest resolves nothing for the host)."""
    text = _text(field, value, 64, nul=False)
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        raise _field_error(field, f"is not an IP address: {text[:64]!r}") from None
    return text


_REQUIRED: Any = object()
_mode = _ranged(0, 0o7777)
_window = _ranged(1, MAX_WINDOW)
_errno = _ranged(0, 4095)


class Message(Event):
    """A REQUEST, REPLY, END or CONTROL on a stream: ``Kind(stream, *fields)``, fields checked.

    ``FIELDS`` lists (name, check, default) in the constructor's order; ``OP`` is a request's
    or control's ``op``; ``KEYS`` renames fields on the wire.
    """

    __slots__ = ("stream",)
    stream: int
    FRAME = 0
    OP = ""
    FIELDS: tuple[tuple[str, Check, Any], ...] = ()
    KEYS: dict[str, str] = {}

    def __init__(self, stream: int, *values: Any, **named: Any) -> None:
        self.stream = stream
        kind = type(self).__name__
        if len(values) > len(self.FIELDS):
            raise TypeError(f"{kind} has {len(self.FIELDS)} fields")
        for index, (name, check, default) in enumerate(self.FIELDS):
            value = values[index] if index < len(values) else named.pop(name, default)
            if value is _REQUIRED:
                raise _field_error(f"{kind}.{self.KEYS.get(name, name)}", "is missing")
            setattr(self, name, check(f"{kind}.{self.KEYS.get(name, name)}", value))
        if named:
            raise TypeError(f"{kind} has no field {next(iter(named))}")

    def body(self) -> dict[str, Any]:
        body = {self.KEYS.get(name, name): getattr(self, name) for name, _, _ in self.FIELDS}
        if self.OP:
            body["op"] = self.OP
        return body

    @classmethod
    def from_body(cls, stream: int, body: dict[str, Any]) -> Message:
        return cls(stream, *(body.get(cls.KEYS.get(name, name), default) for name, _, default in cls.FIELDS))


class ExecRequest(Message):
    """Run ``argv`` (no shell) with ``env`` added, in ``cwd``, on a pty of ``pty`` (rows, cols) or
    pipes; ``timeout`` s; ``stdout``/``stderr`` captured or /dev/null; ``window``: output credit."""

    __slots__ = ("argv", "cwd", "env", "pty", "stderr", "stdout", "timeout", "window")
    argv: list[str | bytes]
    env: dict[str, str]
    cwd: str | None
    pty: tuple[int, int] | None
    timeout: float | None
    stdout: bool
    stderr: bool
    window: int
    FRAME, OP = REQUEST, "exec"
    FIELDS = (("argv", _argv, _REQUIRED), ("env", _env, _REQUIRED), ("cwd", _cwd, _REQUIRED),
              ("pty", _pty, _REQUIRED), ("timeout", _optional(_number(1e12)), _REQUIRED),
              ("stdout", _bool, _REQUIRED), ("stderr", _bool, _REQUIRED), ("window", _window, _REQUIRED))


class WriteFileRequest(Message):
    """Write ``path`` (made with ``mode``) from the bytes the host sends on channel 0."""

    __slots__ = ("mode", "path")
    path: str
    mode: int
    FRAME, OP = REQUEST, "write_file"
    FIELDS = (("path", _path, _REQUIRED), ("mode", _mode, _REQUIRED))


class ReadFileRequest(Message):
    """Send the regular file ``path`` on channel 1, with ``window`` bytes of credit."""

    __slots__ = ("path", "window")
    path: str
    window: int
    FRAME, OP = REQUEST, "read_file"
    FIELDS = (("path", _path, _REQUIRED), ("window", _window, _REQUIRED))


class MkdirRequest(Message):
    """``mkdir -p path``; ``mode`` for the last directory if it is made."""

    __slots__ = ("mode", "path")
    path: str
    mode: int
    FRAME, OP = REQUEST, "mkdir"
    FIELDS = (("path", _path, _REQUIRED), ("mode", _mode, _REQUIRED))


class EntropyRequest(Message):
    """Credit ``data`` to the guest's entropy pool and reseed its CRNG."""

    __slots__ = ("data",)
    data: bytes
    FRAME, OP = REQUEST, "entropy"
    FIELDS = (("data", _entropy, _REQUIRED),)


class ClockRequest(Message):
    """Set CLOCK_REALTIME to ``seconds`` since the epoch."""

    __slots__ = ("seconds",)
    seconds: float
    FRAME, OP = REQUEST, "clock"
    FIELDS = (("seconds", _number(1e11), _REQUIRED),)


class OnlineRequest(Message):
    """Online hot-added CPUs and memory, and count what the guest then has."""

    __slots__ = ()
    FRAME, OP = REQUEST, "online"


class StatusRequest(Message):
    """Ask for the guest's boot id on a stream (a PING frame is the usual liveness check)."""

    __slots__ = ()
    FRAME, OP = REQUEST, "ping"


class ConnectRequest(Message):
    """Open a TCP connection inside the guest to ``host``:``port`` (an address literal, the
    guest's loopback by default), giving up after ``timeout`` s; ``window``: credit for what the
    guest reads from it (channel 1). Bytes the host sends on channel 0 go to it."""

    __slots__ = ("host", "port", "timeout", "window")
    port: int
    host: str
    timeout: float
    window: int
    FRAME, OP = REQUEST, "connect"
    FIELDS = (("port", _ranged(1, 0xFFFF), _REQUIRED), ("host", _address, "127.0.0.1"),
              ("timeout", _number(3600.0), 10.0), ("window", _window, _REQUIRED))


class BadRequest(Message):
    """Guest role only: a REQUEST whose fields were wrong; answer it with an :class:`ErrorReply`."""

    __slots__ = ("message",)
    message: str
    FRAME = REQUEST
    FIELDS = (("message", _text, _REQUIRED),)


class ExecReply(Message):
    """The process started as ``pid`` (0: it could not; END says why); ``window``: stdin credit."""

    __slots__ = ("pid", "window")
    pid: int
    window: int
    FRAME = REPLY
    FIELDS = (("pid", _ranged(0, MAX_PID), _REQUIRED), ("window", _window, _REQUIRED))


class ConnectReply(Message):
    """The connection is made; ``window``: credit for the bytes the host sends to it (channel 0)."""

    __slots__ = ("window",)
    window: int
    FRAME = REPLY
    FIELDS = (("window", _window, _REQUIRED),)


class WriteFileReply(Message):
    """The file is open for writing; ``window``: credit for its bytes."""

    __slots__ = ("window",)
    window: int
    FRAME = REPLY
    FIELDS = (("window", _window, _REQUIRED),)


class ReadFileReply(Message):
    """The file is open: its permission bits and size (0 for most /proc files)."""

    __slots__ = ("mode", "size")
    mode: int
    size: int
    FRAME = REPLY
    FIELDS = (("mode", _mode, _REQUIRED), ("size", _ranged(0, MAX_SIZE), _REQUIRED))


class DoneReply(Message):
    """A mkdir, entropy or clock request was done."""

    __slots__ = ()
    FRAME = REPLY


class OnlineReply(Message):
    """What the guest has after onlining, and what it could not online."""

    __slots__ = ("mem_total_kib", "online_cpus", "problems")
    online_cpus: int
    mem_total_kib: int
    problems: list[str]
    FRAME = REPLY
    FIELDS = (("online_cpus", _ranged(0, 1 << 20), _REQUIRED),
              ("mem_total_kib", _ranged(0, 1 << 53), _REQUIRED), ("problems", _problems, []))


class StatusReply(Message):
    """The answer to a :class:`StatusRequest`."""

    __slots__ = ("boot_id",)
    boot_id: str
    FRAME = REPLY
    FIELDS = (("boot_id", lambda field, value: _text(field, value, 256), _REQUIRED),)


class ErrorReply(Message):
    """The guest refused or failed a request: a one-line ``message`` and its ``errno`` (0: none)."""

    __slots__ = ("errno", "message")
    message: str
    errno: int
    FRAME = REPLY
    FIELDS = (("message", _text, _REQUIRED), ("errno", _errno, 0))
    KEYS = {"message": "error"}


class ProcessEnd(Message):
    """The process exited: ``returncode`` (negative: a signal), ``timed_out``: killed by its timeout."""

    __slots__ = ("returncode", "timed_out")
    returncode: int
    timed_out: bool
    FRAME = END
    FIELDS = (("returncode", _ranged(-128, 255), _REQUIRED), ("timed_out", _bool, False))


class FileEnd(Message):
    """A file transfer is complete: ``size`` bytes."""

    __slots__ = ("size",)
    size: int
    FRAME = END
    FIELDS = (("size", _ranged(0, MAX_SIZE), _REQUIRED),)


class ConnectEnd(Message):
    """The guest closed the connection, both ways done: ``received`` bytes came from the host and
    were written to it, ``sent`` bytes were read from it and sent to the host."""

    __slots__ = ("received", "sent")
    received: int
    sent: int
    FRAME = END
    FIELDS = (("received", _ranged(0, MAX_SIZE), _REQUIRED), ("sent", _ranged(0, MAX_SIZE), _REQUIRED))


class ErrorEnd(ErrorReply):
    """The guest gave up on a running stream (a failed write, an internal error)."""

    __slots__ = ()
    FRAME = END


class Signal(Message):
    """Send ``signal`` to the process group."""

    __slots__ = ("signal",)
    signal: int
    FRAME, OP = CONTROL, "signal"
    FIELDS = (("signal", _ranged(1, 64), _REQUIRED),)


class Resize(Message):
    """Resize the process's pty."""

    __slots__ = ("cols", "rows")
    rows: int
    cols: int
    FRAME, OP = CONTROL, "resize"
    FIELDS = (("rows", _ranged(0, 0xFFFF), _REQUIRED), ("cols", _ranged(0, 0xFFFF), _REQUIRED))


_REQUESTS = {kind.OP: kind for kind in (ExecRequest, WriteFileRequest, ReadFileRequest, MkdirRequest,
                                        EntropyRequest, ClockRequest, OnlineRequest, StatusRequest,
                                        ConnectRequest)}
_CONTROLS = {kind.OP: kind for kind in (Signal, Resize)}


# --- The state of a stream -----------------------------------------------------------------------


class Role(enum.Enum):
    HOST = "host"
    GUEST = "guest"


class StreamState(enum.Enum):
    """Where a stream is. ``*_REQUESTED``: the REQUEST went, its REPLY did not yet."""

    IDLE = "idle"
    EXEC_REQUESTED = "exec requested"
    WRITE_REQUESTED = "write requested"
    READ_REQUESTED = "read requested"
    CALL_REQUESTED = "call requested"  # mkdir, entropy, clock
    ONLINE_REQUESTED = "online requested"
    STATUS_REQUESTED = "status requested"
    CONNECT_REQUESTED = "connect requested"
    BAD_REQUESTED = "bad request received"  # guest only: it must answer ErrorReply
    RUNNING = "running"  # a process
    WRITING = "writing"  # a file, host to guest
    READING = "reading"  # a file, guest to host
    CONNECTED = "connected"  # a TCP connection in the guest, both ways
    ENDED = "ended"  # END came; output may still be arriving
    CLOSED = "closed"


class ChannelState(enum.Enum):
    OPEN = "open"
    UNREAD = "unread"  # the receiver said EOF: it reads no more (data in flight is dropped)
    DONE = "done"  # the sender said EOF


# Pseudo-events of channels: data, the sender's EOF, the receiver's EOF ("stop"), a grant.
_DATA, _EOF, _STOP, _WINDOW = "data", "eof", "stop", "window"
# Pseudo-events of streams: the host's EOF on stdin (the only EOF before the REPLY: run() sends it
# with the request) and a stream's end with every output done.
_STDIN_EOF, _DRAINED = "stdin eof", "drained"

_S = StreamState
_C = ChannelState
_REQUESTED = (_S.EXEC_REQUESTED, _S.WRITE_REQUESTED, _S.READ_REQUESTED, _S.CALL_REQUESTED,
              _S.ONLINE_REQUESTED, _S.STATUS_REQUESTED, _S.CONNECT_REQUESTED, _S.BAD_REQUESTED)
_OPEN = (_S.RUNNING, _S.WRITING, _S.READING, _S.CONNECTED, _S.ENDED)

#: Every legal move: (state, event class or channel pseudo-event) -> new state. Anything
#: else is refused, by :meth:`Connection.send` (LocalProtocolError) or on receipt.
TRANSITIONS: dict[tuple[enum.Enum, Any], enum.Enum] = {
    (_S.IDLE, ExecRequest): _S.EXEC_REQUESTED,
    (_S.IDLE, WriteFileRequest): _S.WRITE_REQUESTED,
    (_S.IDLE, ReadFileRequest): _S.READ_REQUESTED,
    (_S.IDLE, MkdirRequest): _S.CALL_REQUESTED,
    (_S.IDLE, EntropyRequest): _S.CALL_REQUESTED,
    (_S.IDLE, ClockRequest): _S.CALL_REQUESTED,
    (_S.IDLE, OnlineRequest): _S.ONLINE_REQUESTED,
    (_S.IDLE, StatusRequest): _S.STATUS_REQUESTED,
    (_S.IDLE, ConnectRequest): _S.CONNECT_REQUESTED,
    (_S.IDLE, BadRequest): _S.BAD_REQUESTED,
    **{(state, ErrorReply): _S.CLOSED for state in _REQUESTED},
    **{(state, Reset): _S.CLOSED for state in _REQUESTED + _OPEN},
    (_S.EXEC_REQUESTED, _STDIN_EOF): _S.EXEC_REQUESTED,
    (_S.EXEC_REQUESTED, ExecReply): _S.RUNNING,
    (_S.WRITE_REQUESTED, WriteFileReply): _S.WRITING,
    (_S.READ_REQUESTED, ReadFileReply): _S.READING,
    (_S.CALL_REQUESTED, DoneReply): _S.CLOSED,
    (_S.ONLINE_REQUESTED, OnlineReply): _S.CLOSED,
    (_S.STATUS_REQUESTED, StatusReply): _S.CLOSED,
    (_S.CONNECT_REQUESTED, ConnectReply): _S.CONNECTED,
    **{(state, kind): state for state in _OPEN for kind in (Data, Eof, _STDIN_EOF, WindowUpdate)},
    **{(state, kind): state for state in (_S.RUNNING, _S.ENDED) for kind in (Signal, Resize)},
    (_S.RUNNING, ProcessEnd): _S.ENDED,
    (_S.WRITING, FileEnd): _S.ENDED,
    (_S.READING, FileEnd): _S.ENDED,
    (_S.CONNECTED, ConnectEnd): _S.ENDED,
    **{(state, ErrorEnd): _S.CLOSED for state in (_S.RUNNING, _S.WRITING, _S.READING, _S.CONNECTED)},
    (_S.ENDED, _DRAINED): _S.CLOSED,
    (_C.OPEN, _DATA): _C.OPEN,
    (_C.OPEN, _EOF): _C.DONE,
    (_C.OPEN, _STOP): _C.UNREAD,
    (_C.OPEN, _WINDOW): _C.OPEN,
    (_C.UNREAD, _DATA): _C.UNREAD,
    (_C.UNREAD, _EOF): _C.DONE,
    (_C.UNREAD, _WINDOW): _C.UNREAD,
    (_C.DONE, _WINDOW): _C.DONE,  # a grant for bytes sent before the EOF
    (_C.DONE, _STOP): _C.DONE,  # the reader stopped as the EOF was on its way
}

#: The events each role may send (the other role may receive exactly these).
SENDS: dict[Role, frozenset[type[Event]]] = {
    Role.HOST: frozenset((Hello, Ping, ExecRequest, WriteFileRequest, ReadFileRequest, MkdirRequest,
                          EntropyRequest, ClockRequest, OnlineRequest, StatusRequest, ConnectRequest,
                          Signal, Resize, Data, Eof, WindowUpdate, Reset)),
    Role.GUEST: frozenset((Hello, Pong, ErrorNotice, ExecReply, WriteFileReply, ReadFileReply, DoneReply,
                           OnlineReply, StatusReply, ConnectReply, ErrorReply, ProcessEnd, FileEnd,
                           ConnectEnd, ErrorEnd, Data, Eof, WindowUpdate)),
}

#: The REPLY and END classes a host decodes a stream's frames into, by the stream's state.
_REPLIES: dict[StreamState, type[Message]] = {
    _S.EXEC_REQUESTED: ExecReply, _S.WRITE_REQUESTED: WriteFileReply, _S.READ_REQUESTED: ReadFileReply,
    _S.CALL_REQUESTED: DoneReply, _S.ONLINE_REQUESTED: OnlineReply, _S.STATUS_REQUESTED: StatusReply,
    _S.CONNECT_REQUESTED: ConnectReply,
}
_ENDS: dict[StreamState, type[Message]] = {_S.RUNNING: ProcessEnd, _S.WRITING: FileEnd, _S.READING: FileEnd,
                                           _S.CONNECTED: ConnectEnd}


def _move(state: Any, event: Any, what: str) -> Any:
    """The one place that applies :data:`TRANSITIONS` (``what`` names the stream or channel)."""
    new = TRANSITIONS.get((state, event))
    if new is None:
        name = event if isinstance(event, str) else event.__name__
        raise ProtocolError(f"{what}: {name} is not allowed in state {state.value}")
    return new


class _Channel:
    __slots__ = ("credit", "inbound", "state", "window")

    def __init__(self, inbound: bool) -> None:
        self.inbound = inbound  # this end receives the channel's data
        self.state = ChannelState.OPEN
        self.credit = SendCredit(0)  # outbound: what the peer lets us send
        self.window: ReceiveWindow | None = None  # inbound: what we let the peer send


class _Stream:
    __slots__ = ("channels", "id", "state")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.state = StreamState.IDLE
        self.channels: dict[int, _Channel] = {}


class LocalProtocolError(ProtocolError):
    """This end tried to send something the protocol does not allow (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


# --- The connection ------------------------------------------------------------------------------


class Connection:
    """One end of one session, as h11's ``Connection``: events in, bytes out, and back.

    * :meth:`send` (event) checks the event is this role's to send and legal in
      its stream's state, updates state and credit, and returns its bytes.
    * :meth:`receive_data` takes received bytes; :meth:`next_event` returns the
      next event, or None when it needs more bytes.

    The HOST starts hunting for the answer to its latest :class:`Hello` (send
    one first); it raises :class:`RemoteProtocolError` for anything wrong the
    guest sends, after which the connection is dead. The GUEST hunts for a
    HELLO at the start and after garbage; a HELLO starts a new session (every
    stream dropped); wrong bytes come out as a :class:`Garbage` event (answer
    :class:`ErrorNotice`), a wrong REQUEST as :class:`BadRequest` (answer
    :class:`ErrorReply`).

    Frames for streams that are unknown or finished are skipped by their
    length, never decoded. On the HOST a DATA frame comes out in pieces as its
    bytes arrive, so nothing is held back: memory is what was received and not
    yet taken. Received data is acknowledged with :meth:`consumed` (WINDOW).
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._peer = Role.GUEST if role is Role.HOST else Role.HOST
        self._streams: dict[int, _Stream] = {}
        self._last_id = 0  # highest stream id opened in this session
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of a dropped frame still to skip
        self._piece: tuple[int, int] | None = None  # the DATA frame (stream, channel) coming in pieces
        self._piece_left = 0
        self._nonce: bytes | None = None  # the host's latest HELLO nonce
        self._broken: ProtocolError | None = None
        self._expect_hello = False  # the hunt found the HELLO at the buffer's start
        #: Looking for MAGIC and a HELLO; bytes dropped meanwhile.
        self.hunting = True
        self.discarded = 0

    # --- State, for drivers ---

    def stream_state(self, stream_id: int) -> StreamState:
        """A stream's state; CLOSED once finished (or never opened)."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    def channel_state(self, stream_id: int, channel: int) -> ChannelState:
        """A channel's state; DONE for a finished stream or a channel it does not have."""
        stream = self._streams.get(stream_id)
        found = stream.channels.get(channel) if stream is not None else None
        return found.state if found is not None else ChannelState.DONE

    def send_credit(self, stream_id: int, channel: int) -> int:
        """How many data bytes this end may send on the channel now (0 if it may not)."""
        stream = self._streams.get(stream_id)
        found = stream.channels.get(channel) if stream is not None else None
        if found is None or found.inbound or found.state is not ChannelState.OPEN:
            return 0
        return found.credit.available

    def next_stream_id(self) -> int:
        """The id for the host's next REQUEST."""
        return self._last_id + 1

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buffer)

    # --- Sending ---

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``; :class:`LocalProtocolError` if this end may not send it now."""
        if type(event) not in SENDS[self.role]:
            raise LocalProtocolError(f"a {self.role.value} does not send {type(event).__name__}")
        try:
            return self._send(event)
        except LocalProtocolError:
            raise
        except (ProtocolError, ValueError) as error:
            raise LocalProtocolError(str(error), getattr(error, "field", None)) from None

    def _send(self, event: Event) -> bytes:
        if isinstance(event, Data):
            return self.send_data_header(event.stream, event.channel, len(event.data)) + bytes(event.data)
        if isinstance(event, Hello):
            if self.role is Role.HOST:
                self._new_session()
                self._nonce = event.nonce
                self.hunting = True
            return encode_hello(event.nonce, _check_info(event.info))
        if isinstance(event, Ping):
            return encode_ping(event.payload)
        if isinstance(event, Pong):
            return encode_pong(event.payload, event.boot_id)
        if isinstance(event, ErrorNotice):
            return encode_error(event.message)
        if isinstance(event, Message) and event.FRAME == REQUEST:
            if event.stream <= self._last_id or event.stream > 0xFFFFFFFF:
                raise ProtocolError(f"stream id {event.stream} is not new")
            frame = _message(REQUEST, event.stream, event.body())
            self._transition(self._open(event.stream), event)
            return frame
        found = self._streams.get(getattr(event, "stream", 0))
        if found is None:
            raise ProtocolError(f"{type(event).__name__} on stream {getattr(event, 'stream', 0)}, "
                                "which is not open")
        stream = found
        if isinstance(event, Eof):
            self._eof(stream, event.channel)
            return encode_eof(stream.id, event.channel)
        if isinstance(event, WindowUpdate):
            channel = self._channel(stream, event.channel, inbound=True)
            self._transition(stream, event)
            channel.state = _move(channel.state, _WINDOW, f"stream {stream.id} channel {event.channel}")
            return encode_window(stream.id, event.channel, event.increment)
        if isinstance(event, Reset):
            self._transition(stream, event)
            return encode_reset(stream.id)
        assert isinstance(event, Message)
        frame = _message(event.FRAME, stream.id, event.body())  # before the move: it may fail
        self._transition(stream, event)
        return frame

    def send_data_header(self, stream_id: int, channel: int, length: int) -> bytes:
        """The header of a DATA frame whose ``length`` bytes the caller writes after it (writev)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"DATA on stream {stream_id}, which is not open")
        try:
            found = self._channel(stream, channel, inbound=False)
            if found.state is not ChannelState.OPEN:
                raise ProtocolError(f"stream {stream_id} channel {channel} is {found.state.value}")
            self._transition(stream, Data)
            found.credit.take(length)
        except (ProtocolError, ValueError) as error:
            raise LocalProtocolError(str(error)) from None
        return encode_data_header(stream_id, channel, length)

    def consumed(self, stream_id: int, channel: int, count: int) -> bytes:
        """The consumer took ``count`` bytes of a channel's data: a WINDOW frame to send, or b""."""
        stream = self._streams.get(stream_id)
        found = stream.channels.get(channel) if stream is not None else None
        if found is None or found.window is None:
            return b""
        increment = found.window.consumed(min(count, found.window.buffered))
        if not increment or found.state is ChannelState.DONE:
            return b""
        return encode_window(stream_id, channel, increment)

    # --- Receiving ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; then call :meth:`next_event` until it returns None."""
        self._buffer += data

    def next_event(self) -> Event | None:
        """The next event, or None if more bytes are needed."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._next_event()
        except ProtocolError as error:
            if self.role is Role.GUEST:
                return self._garbage(str(error))
            self._broken = RemoteProtocolError(str(error), getattr(error, "field", None))
            raise self._broken from None

    def rescan(self) -> Event | None:
        """Give up on an incomplete frame and hunt for a HELLO inside it (a peer that left
        mid-frame, a new peer whose HELLO became the old frame's payload); None if none was due."""
        if self.hunting or not self._buffer:
            return None
        self._skip, self._piece = 0, None
        return self._garbage("an incomplete frame, then silence")

    def _garbage(self, problem: str) -> Event:
        """Guest role: skip a byte, hunt again, and report it."""
        self._skip, self._piece = 0, None
        if self._buffer:
            del self._buffer[:1]
            self.discarded += 1
        self.hunting = True
        return Garbage("garbage from the peer: " + problem)

    def _next_event(self) -> Event | None:
        while True:
            buffer = self._buffer
            if self._skip:
                count = min(self._skip, len(buffer))
                del buffer[:count]
                self._skip -= count
                if self._skip:
                    return None
            if self._piece is not None:
                event = self._next_piece()
                if event is not None or self._piece is not None:
                    return event
                continue
            if self.hunting and not self._hunt():
                return None
            if len(buffer) < HEADER_SIZE:
                return None
            start = 0
            if buffer[0] == MAGIC[0]:  # a HELLO at a frame boundary: a new session
                if buffer[:len(MAGIC)] != MAGIC[:len(buffer)]:
                    raise ProtocolError("garbage: bytes that look like a HELLO but are not")
                if len(buffer) < len(MAGIC) + HEADER_SIZE:
                    return None
                start = len(MAGIC)
            kind, channel, reserved, stream_id, length = HEADER.unpack_from(buffer, start)
            problem = check_header(kind, channel, reserved, stream_id, length)
            if problem is None and (kind == HELLO) != (start > 0):
                problem = "a HELLO without MAGIC" if kind == HELLO else "MAGIC before a non-HELLO frame"
            if problem is not None:
                raise ProtocolError("garbage: " + problem)
            begin = start + HEADER_SIZE
            stream = self._streams.get(stream_id) if stream_id else None
            if stream_id and kind != REQUEST and (stream is None or stream.state is _S.BAD_REQUESTED):
                if self.role is Role.GUEST and len(buffer) < begin + length:
                    return None  # kept whole, for rescan(): it may hide a new host's HELLO
                self._skip_frame(begin, length)  # a finished stream's: never decoded
                continue
            if length > MAX_ANSWER and kind in _ANSWERS and self.role is Role.HOST:
                raise ProtocolError(f"garbage: {FRAME_NAMES[kind]} frame of {length} bytes "
                                    f"(the limit is {MAX_ANSWER})")
            if kind == DATA and self.role is Role.HOST:
                assert stream is not None
                if self._data_header(stream, channel, length):
                    del buffer[:begin]
                    self._piece, self._piece_left = (stream_id, channel), length
                else:
                    self._skip_frame(begin, length)
                continue
            if len(buffer) < begin + length:
                return None
            with memoryview(buffer) as view:
                payload = view[begin:begin + length].tobytes()
            del buffer[:begin + length]
            event = self._decode(kind, channel, stream_id, stream, payload)
            if event is not None:
                return event

    def _skip_frame(self, begin: int, length: int) -> None:
        count = min(len(self._buffer), begin + length)
        del self._buffer[:count]
        self._skip = begin + length - count

    def _next_piece(self) -> Event | None:
        assert self._piece is not None
        stream_id, channel = self._piece
        count = min(self._piece_left, len(self._buffer))
        if stream_id not in self._streams:  # reset meanwhile: drop the rest
            self._skip, self._piece = self._piece_left, None
            return None
        if not count:
            return None
        with memoryview(self._buffer) as view:
            chunk = view[:count].tobytes()
        del self._buffer[:count]
        self._piece_left -= count
        if not self._piece_left:
            self._piece = None
        return Data(stream_id, channel, chunk)

    def _data_header(self, stream: _Stream, channel: int, length: int) -> bool:
        """Account for a DATA frame received: False if its bytes are to be dropped."""
        found = self._channel(stream, channel, inbound=True)
        self._transition(stream, Data)
        found.state = _move(found.state, _DATA, f"stream {stream.id} channel {channel}")
        if found.state is ChannelState.UNREAD or length == 0:
            return False
        if found.window is None:
            raise ProtocolError(f"stream {stream.id} channel {channel}: DATA before any credit")
        found.window.received(length)
        return True

    def _decode(self, kind: int, channel: int, stream_id: int, stream: _Stream | None,
                payload: bytes) -> Event | None:
        if kind == HELLO:
            hello = decode_frame(kind, channel, stream_id, memoryview(payload))
            assert isinstance(hello, Hello)
            expected, self._expect_hello = self._expect_hello, False
            if self.role is Role.HOST and not expected:
                return None  # an answer to an earlier HELLO of ours
            _check_info(hello.info)
            self._new_session()
            return hello
        if kind in (PING, PONG, ERROR):
            event = decode_frame(kind, channel, stream_id, memoryview(payload))
            if type(event) not in SENDS[self._peer]:
                raise ProtocolError(f"a {self._peer.value} does not send {FRAME_NAMES[kind]}")
            if isinstance(event, ErrorNotice):
                event.message = event.message[:1000]
            if isinstance(event, Pong):
                _text("PONG boot id", event.boot_id, 256)
                if len(event.payload) > MAX_PING:
                    raise _field_error("PONG payload", f"is over {MAX_PING} bytes")
            return event
        if kind == REQUEST:
            if self.role is Role.HOST:
                raise ProtocolError("a guest does not send REQUEST")
            if stream_id <= self._last_id:
                raise ProtocolError(f"REQUEST on stream {stream_id}, which is not new")
            event = self._decode_request(stream_id, payload)
            self._transition(self._open(stream_id), event)
            return event
        assert stream is not None
        if kind == DATA:  # guest role: whole frames
            if not self._data_header(stream, channel, len(payload)):
                return None
            return Data(stream_id, channel, payload)
        if kind == EOF:
            self._eof(stream, channel, received=True)
            return Eof(stream_id, channel)
        if kind == WINDOW:
            event = decode_frame(kind, channel, stream_id, memoryview(payload))
            assert isinstance(event, WindowUpdate)
            found = self._channel(stream, channel, inbound=False)
            self._transition(stream, event)
            found.state = _move(found.state, _WINDOW, f"stream {stream_id} channel {channel}")
            found.credit.grant(event.increment)
            return event
        if kind == RESET:
            if self.role is Role.HOST:
                raise ProtocolError("a guest does not send RESET")
            event = Reset(stream_id)
        else:
            event = self._decode_message(kind, stream, _decode_body(kind, memoryview(payload)))
        self._transition(stream, event)
        return event

    def _decode_request(self, stream_id: int, payload: bytes) -> Message:
        try:
            body = _decode_body(REQUEST, memoryview(payload))
            kind = _REQUESTS.get(body.get("op"))  # type: ignore[arg-type]
            if kind is None:
                raise ProtocolError(f"unknown request {printable_op(body.get('op'))}")
            return kind.from_body(stream_id, body)
        except ProtocolError as error:
            return BadRequest(stream_id, f"bad request: {error}")

    def _decode_message(self, kind: int, stream: _Stream, body: dict[str, Any]) -> Event:
        if self.role is Role.GUEST:
            if kind != CONTROL:
                raise ProtocolError(f"a host does not send {FRAME_NAMES[kind]}")
            control = _CONTROLS.get(body.get("op"))  # type: ignore[arg-type]
            if control is None:
                raise ProtocolError(f"unknown CONTROL {printable_op(body.get('op'))}")
            return control.from_body(stream.id, body)
        if kind == REPLY:
            if "error" in body:
                return ErrorReply.from_body(stream.id, body)
            reply = _REPLIES.get(stream.state)
            if reply is None:
                raise ProtocolError(f"stream {stream.id}: REPLY is not allowed in state {stream.state.value}")
            return reply.from_body(stream.id, body)
        if kind == END:
            if "error" in body:
                return ErrorEnd.from_body(stream.id, body)
            end = _ENDS.get(stream.state)
            if end is None:
                raise ProtocolError(f"stream {stream.id}: END is not allowed in state {stream.state.value}")
            return end.from_body(stream.id, body)
        raise ProtocolError(f"a guest does not send {FRAME_NAMES[kind]}")

    # --- Streams and channels ---

    def _new_session(self) -> None:
        self._streams.clear()
        self._last_id = 0

    def _open(self, stream_id: int) -> _Stream:
        stream = _Stream(stream_id)
        self._streams[stream_id] = stream
        self._last_id = stream_id
        return stream

    def _channel(self, stream: _Stream, channel: int, *, inbound: bool) -> _Channel:
        """The stream's channel this end receives on (``inbound``) or sends on."""
        found = stream.channels.get(channel)
        if found is None or found.inbound != inbound:
            direction = "receive" if inbound else "send"
            raise ProtocolError(f"stream {stream.id} has no channel {channel} for the {self.role.value} "
                                f"to {direction} data on")
        return found

    def _add_channel(self, stream: _Stream, channel: int, sender: Role, window: int | None) -> None:
        found = _Channel(inbound=sender is not self.role)
        stream.channels[channel] = found
        if window is not None:
            self._grant(found, window)

    def _grant(self, channel: _Channel, window: int) -> None:
        """A channel's initial credit."""
        if channel.inbound:
            channel.window = ReceiveWindow(window)
        else:
            channel.credit = SendCredit(window)

    def _eof(self, stream: _Stream, channel: int, *, received: bool = False) -> None:
        """An EOF sent (or ``received``): the sender's, or a receiver's stop (guest, channel 0)."""
        found = stream.channels.get(channel)
        if found is None:
            raise ProtocolError(f"stream {stream.id} has no channel {channel}")
        eof_by_receiver = found.inbound != received
        if eof_by_receiver and channel != STDIN:  # only the guest stops reading, and only stdin
            raise ProtocolError(f"stream {stream.id}: EOF on channel {channel} from its receiver")
        self._transition(stream, _STDIN_EOF if channel == STDIN and not eof_by_receiver else Eof)
        found.state = _move(found.state, _STOP if eof_by_receiver else _EOF,
                            f"stream {stream.id} channel {channel}")
        self._drained(stream)

    def _transition(self, stream: _Stream, event: Any) -> None:
        """Move ``stream`` by ``event`` (an instance or a class) through :data:`TRANSITIONS`."""
        kind = event if isinstance(event, (type, str)) else type(event)
        stream.state = _move(stream.state, kind, f"stream {stream.id}")
        if isinstance(event, ExecRequest):
            self._add_channel(stream, STDIN, Role.HOST, None)
            for channel, wanted in ((STDOUT, event.stdout), (STDERR, event.stderr)):
                if wanted:
                    self._add_channel(stream, channel, Role.GUEST, event.window)
        elif isinstance(event, WriteFileRequest):
            self._add_channel(stream, STDIN, Role.HOST, None)
        elif isinstance(event, ReadFileRequest):
            self._add_channel(stream, STDOUT, Role.GUEST, event.window)
        elif isinstance(event, ConnectRequest):
            self._add_channel(stream, STDIN, Role.HOST, None)
            self._add_channel(stream, STDOUT, Role.GUEST, event.window)
        elif isinstance(event, (ExecReply, WriteFileReply, ConnectReply)):
            self._grant(stream.channels[STDIN], event.window)
        if stream.state is StreamState.ENDED:
            self._drained(stream)
        elif stream.state is StreamState.CLOSED:
            self._streams.pop(stream.id, None)

    def _drained(self, stream: _Stream) -> None:
        """An ENDED stream whose every guest output is done is finished."""
        if stream.state is StreamState.ENDED and all(
                channel.state is ChannelState.DONE for number, channel in stream.channels.items()
                if number != STDIN):
            stream.state = _move(stream.state, _DRAINED, f"stream {stream.id}")
            del self._streams[stream.id]

    # --- Hunting ---

    def _hunt(self) -> bool:
        """Skip to MAGIC and an acceptable HELLO; False if more bytes are needed."""
        buffer = self._buffer
        while True:
            index = buffer.find(MAGIC)
            if index < 0:
                drop = max(0, len(buffer) - (len(MAGIC) - 1))  # keep what may start a MAGIC
                del buffer[:drop]
                self.discarded += drop
                return False
            del buffer[:index]
            self.discarded += index
            if len(buffer) < len(MAGIC) + HEADER_SIZE:
                return False
            kind, channel, reserved, stream, length = HEADER.unpack_from(buffer, len(MAGIC))
            if kind == HELLO and check_header(kind, channel, reserved, stream, length) is None:
                end = len(MAGIC) + HEADER_SIZE + length
                if len(buffer) < end:
                    return False
                try:
                    hello = decode_frame(kind, channel, stream, memoryview(bytes(buffer[end - length:end])))
                except ProtocolError:
                    hello = None
                if isinstance(hello, Hello) and (self.role is Role.GUEST or hello.nonce == self._nonce):
                    self.hunting = False
                    self._expect_hello = True
                    return True
            del buffer[:1]
            self.discarded += 1


def _check_info(info: Any) -> dict[str, Any]:
    """A HELLO's fields: ``protocol`` (int) and a few scalars."""
    if not isinstance(info, dict) or len(info) > MAX_HELLO_FIELDS:
        raise _field_error("HELLO", "is not a small dictionary")
    _int("HELLO.protocol", info.get("protocol"), 0, 1 << 31)
    for key, value in info.items():
        if value is not None and type(value) not in (str, int, float, bool):
            raise _field_error(f"HELLO.{key[:40]}", f"is a {type(value).__name__}")
        if type(value) is str:
            _text(f"HELLO.{key[:40]}", value, 1000)
    return info


def printable_op(value: Any) -> str:
    return repr(value)[:100]
