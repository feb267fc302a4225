"""A small Trio-native QMP client (the asyncio ``qemu.qmp`` does not run under Trio)."""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from .errors import QMPError
from .qmp_protocol import ErrorReply, Greeting, Message, QMPEvent, QMPProtocol, Return

RECEIVE_SIZE = 65536


class QMPClient:
    """One negotiated QMP connection: ``execute`` commands, collect ``events``.

    Commands are serialised by a lock; events that arrive meanwhile are kept in
    :attr:`events` (the newest 256). A reply whose command was cancelled is
    recognised by its id and dropped.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._protocol = QMPProtocol()
        self._pending: deque[Message] = deque()
        self._lock = trio.Lock()
        self.events: deque[QMPEvent] = deque(maxlen=256)
        self.greeting: Greeting | None = None

    @classmethod
    async def negotiate(cls, stream: trio.abc.Stream) -> QMPClient:
        """Read QEMU's greeting and enter command mode. The caller bounds the time."""
        client = cls(stream)
        try:
            message = await client._next_message()
            if not isinstance(message, Greeting):
                raise QMPError(f"QEMU's monitor did not greet us first but sent {message!r:.80}")
            client.greeting = message
            await client.execute("qmp_capabilities")
        except BaseException:
            await client.aclose()
            raise
        return client

    async def _next_message(self) -> Message:
        while not self._pending:
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise QMPError(f"QMP connection broke: {error}") from None
            if not data:
                raise QMPError("QEMU closed its monitor connection (QEMU has exited?)")
            self._pending.extend(self._protocol.receive_data(data))
        return self._pending.popleft()

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value."""
        async with self._lock:
            request_id, data = self._protocol.command(name, arguments)
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise QMPError(f"QMP connection broke: {error}") from None
            while True:
                message = await self._next_message()
                if isinstance(message, QMPEvent):
                    self.events.append(message)
                elif isinstance(message, Return) and message.request_id == request_id:
                    return message.value
                elif isinstance(message, ErrorReply) and message.request_id in (request_id, None):
                    raise QMPError(f"QMP {name} failed: {message.description}")

    async def aclose(self) -> None:
        await self._stream.aclose()
