"""The host side of the guest agent, over the VM's virtio-serial chardev socket."""

from __future__ import annotations

import os
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import TypeVar

import trio

from .agent_protocol import (
    AgentProtocol,
    Event,
    ExecResult,
    Failure,
    Ok,
    Pong,
    Ready,
)
from .errors import AgentError

RECEIVE_SIZE = 65536
ReplyT = TypeVar("ReplyT", Pong, ExecResult, Ok)


class AgentClient:
    """Requests to one guest's agent. One request at a time (a lock serialises them).

    Request ids start at a random number, so that a late reply meant for a
    previous owner of the VM (the daemon, before a hand-out) is recognised and
    dropped rather than taken for ours.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._protocol = AgentProtocol(first_request_id=secrets.randbelow(2**31) + 1)
        self._pending: deque[Event] = deque()
        self._lock = trio.Lock()
        #: The guest's boot id, once the agent said READY (or answered a ping).
        self.boot_id: str | None = None

    async def _next_event(self) -> Event:
        while not self._pending:
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise AgentError(f"connection to the guest agent broke: {error}") from None
            if not data:
                raise AgentError("the guest agent's connection closed (QEMU has exited?)")
            self._pending.extend(self._protocol.receive_data(data))
        return self._pending.popleft()

    async def wait_ready(self) -> str:
        """Wait for the agent's READY and return the boot id. The caller bounds the time."""
        async with self._lock:
            while self.boot_id is None:
                event = await self._next_event()
                if isinstance(event, Ready):
                    self.boot_id = event.boot_id
            return self.boot_id

    async def _call(self, request: tuple[int, bytes], reply_type: type[ReplyT]) -> ReplyT:
        request_id, data = request
        async with self._lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                raise AgentError(f"connection to the guest agent broke: {error}") from None
            while True:
                event = await self._next_event()
                if isinstance(event, Ready):
                    self.boot_id = event.boot_id
                elif getattr(event, "request_id", None) != request_id:
                    continue  # a reply to a request that was cancelled, or not ours
                elif isinstance(event, Failure):
                    raise AgentError(f"the guest agent refused the request: {event.message}")
                elif isinstance(event, reply_type):
                    return event
                else:
                    raise AgentError(f"the guest agent answered with {event!r:.80}")

    async def ping(self) -> str:
        """Check the agent answers; returns the guest's boot id."""
        pong = await self._call(self._protocol.ping(), Pong)
        self.boot_id = pong.boot_id
        return pong.boot_id

    async def exec(self, argv: Sequence[str | bytes], timeout: int = 0) -> ExecResult:
        """Run ``argv`` in the guest (no shell) and return its status and output.

        ``timeout`` > 0 makes the guest kill the command after that many seconds
        (exit status 137). The wait here ends when the command does, or when the
        connection to the agent breaks.
        """
        try:
            request = self._protocol.exec(argv, timeout)
        except ValueError as error:
            raise AgentError(str(error)) from None
        return await self._call(request, ExecResult)

    async def add_entropy(self, data: bytes | None = None) -> None:
        """Mix host randomness (64 fresh bytes by default) into the guest's pool."""
        await self._call(self._protocol.entropy(data if data is not None else os.urandom(64)), Ok)

    async def set_clock(self, unix_seconds: float | None = None) -> None:
        """Set the guest's clock (to the host's by default)."""
        seconds = time.time() if unix_seconds is None else unix_seconds
        await self._call(self._protocol.set_clock(seconds), Ok)

    async def aclose(self) -> None:
        await self._stream.aclose()
