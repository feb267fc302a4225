"""QEMU Machine Protocol (QMP) messages, with no I/O.

QMP is JSON objects, one per line, in both directions. After connecting, QEMU
sends a greeting (``{"QMP": {...}}``); the client answers with
``qmp_capabilities``; then every command gets exactly one reply carrying the
``id`` the command gave (``return`` or ``error``), and asynchronous events
(``{"event": ...}``) may arrive at any time, also between a command and its
reply. :class:`QMPProtocol` frames and classifies; :mod:`vmcache.qmp` does the
Trio I/O. The design follows ``qemu.qmp`` (a message layer under the protocol),
without its asyncio.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .errors import QMPProtocolError

DEFAULT_MAX_LINE = 16 * 1024 * 1024


@attrs.frozen
class Greeting:
    """QEMU's first message: its version and capabilities."""

    version: dict[str, Any]
    capabilities: list[Any]


@attrs.frozen
class Return:
    request_id: int
    value: Any


@attrs.frozen
class ErrorReply:
    request_id: int | None
    error_class: str
    description: str


@attrs.frozen
class QMPEvent:
    name: str
    data: dict[str, Any]
    timestamp: float


Message = Greeting | Return | ErrorReply | QMPEvent


def classify(obj: Any) -> Message:
    """One decoded JSON object as a QMP message."""
    if not isinstance(obj, dict):
        raise QMPProtocolError(f"QMP message is not a JSON object: {obj!r:.80}")
    if "QMP" in obj:
        qmp = obj["QMP"]
        return Greeting(qmp.get("version", {}), qmp.get("capabilities", []))
    if "event" in obj:
        stamp = obj.get("timestamp", {})
        seconds = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
        return QMPEvent(str(obj["event"]), obj.get("data", {}), seconds)
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, int):
        raise QMPProtocolError(f"QMP reply has an id we never sent: {request_id!r:.40}")
    if "return" in obj:
        if request_id is None:
            raise QMPProtocolError("QMP reply has no id")
        return Return(request_id, obj["return"])
    if "error" in obj:
        error = obj["error"]
        return ErrorReply(request_id, str(error.get("class", "")), str(error.get("desc", "")))
    raise QMPProtocolError(f"unknown QMP message: {obj!r:.80}")


class QMPProtocol:
    """Command encoding and message framing for one QMP connection."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._next_id = 1

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Encode a command; returns the id its reply will carry and the bytes to send."""
        request_id = self._next_id
        self._next_id += 1
        message: dict[str, Any] = {"execute": name, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        return request_id, json.dumps(message).encode() + b"\n"

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes read from the socket; return every complete message in them."""
        self._buffer += data
        messages: list[Message] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if not line:
                continue
            try:
                decoded = json.loads(line)
            except ValueError:
                raise QMPProtocolError(f"QMP sent a line that is not JSON: {line[:60]!r}") from None
            messages.append(classify(decoded))
        if len(self._buffer) > self._max_line:
            raise QMPProtocolError(f"QMP sent more than {self._max_line} bytes without a newline")
        return messages
