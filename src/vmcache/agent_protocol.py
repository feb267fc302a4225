"""The guest agent's wire protocol, with no I/O (in the style of h11).

One message per line, fields separated by one space, every payload base64 (an
empty payload is a single ``-``), so the framing holds whatever bytes a command
prints. The full description is in ``docs/agent-protocol.md``.

Host to guest::

    PING <id>
    EXEC <id> <timeout-seconds> <arg>...      (each arg base64; timeout 0 = none)
    ENTROPY <id> <bytes>
    CLOCK <id> <unix-seconds>

Guest to host::

    READY <boot-id>                           (once, when the agent starts)
    PONG <id> <boot-id>
    RESULT <id> <exit-status> <stdout> <stderr>
    OK <id>
    ERROR <id> <message>

:class:`AgentProtocol` turns requests into bytes and received bytes into
events; the Trio side (:mod:`vmcache.agent`) only moves bytes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import attrs

from .errors import AgentProtocolError

#: Longest line accepted from the guest (a command's output is one line).
DEFAULT_MAX_LINE = 64 * 1024 * 1024


@attrs.frozen
class Ready:
    """The agent started; ``boot_id`` is the guest kernel's random boot id."""

    boot_id: str


@attrs.frozen
class Pong:
    request_id: int
    boot_id: str


@attrs.frozen
class ExecResult:
    """A command's exit status and output, as the guest saw them."""

    request_id: int
    exit_status: int
    stdout: bytes
    stderr: bytes


@attrs.frozen
class Ok:
    request_id: int


@attrs.frozen
class Failure:
    """The agent refused a request; ``message`` says why."""

    request_id: int
    message: str


Reply = Pong | ExecResult | Ok | Failure
Event = Ready | Reply


def encode_field(data: bytes) -> str:
    """A payload as one field: base64, or ``-`` for no bytes."""
    return base64.b64encode(data).decode("ascii") if data else "-"


def decode_field(field: str) -> bytes:
    if field == "-":
        return b""
    try:
        return base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError):
        raise AgentProtocolError(f"agent sent a field that is not base64: {field[:40]!r}") from None


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise AgentProtocolError(f"agent sent a {what} that is not a number: {text[:40]!r}") from None


def parse_line(line: bytes) -> Event:
    """One line from the guest (without its newline) as an event."""
    try:
        fields = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise AgentProtocolError(f"agent sent a line that is not ASCII: {line[:40]!r}") from None
    verb, args = fields[0], fields[1:]
    shapes = {"READY": 1, "PONG": 2, "RESULT": 4, "OK": 1, "ERROR": 2}
    if verb not in shapes or len(args) != shapes[verb]:
        raise AgentProtocolError(f"agent sent an unknown message: {line[:60]!r}")
    if verb == "READY":
        return Ready(args[0])
    request_id = _parse_int(args[0], "request id")
    if verb == "PONG":
        return Pong(request_id, args[1])
    if verb == "RESULT":
        return ExecResult(
            request_id,
            _parse_int(args[1], "exit status"),
            decode_field(args[2]),
            decode_field(args[3]),
        )
    if verb == "OK":
        return Ok(request_id)
    return Failure(request_id, decode_field(args[1]).decode("utf-8", "replace"))


class AgentProtocol:
    """Request encoding and reply parsing for one connection to a guest agent."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE, first_request_id: int = 1) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._next_id = first_request_id

    def _request(self, verb: str, *fields: str) -> tuple[int, bytes]:
        request_id = self._next_id
        self._next_id += 1
        return request_id, " ".join((verb, str(request_id), *fields)).encode("ascii") + b"\n"

    def ping(self) -> tuple[int, bytes]:
        return self._request("PING")

    def exec(self, argv: Sequence[str | bytes], timeout: int = 0) -> tuple[int, bytes]:
        """Run ``argv`` (no shell) in the guest, killed after ``timeout`` s if > 0."""
        if not argv:
            raise ValueError("argv must name a command")
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        encoded = []
        for arg in argv:
            raw = arg.encode() if isinstance(arg, str) else bytes(arg)
            if b"\0" in raw:
                raise ValueError(f"a command argument cannot contain a NUL byte: {arg!r}")
            encoded.append(encode_field(raw))
        return self._request("EXEC", str(timeout), *encoded)

    def entropy(self, data: bytes) -> tuple[int, bytes]:
        """Mix ``data`` into the guest's random pool."""
        return self._request("ENTROPY", encode_field(data))

    def set_clock(self, unix_seconds: float) -> tuple[int, bytes]:
        return self._request("CLOCK", str(round(unix_seconds)))

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes read from the port; return every complete message in them."""
        self._buffer += data
        events: list[Event] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                events.append(parse_line(line))
        if len(self._buffer) > self._max_line:
            raise AgentProtocolError(
                f"agent sent a line longer than {self._max_line} bytes without an end"
            )
        return events
