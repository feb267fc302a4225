"""E2B sandboxes: one sandbox is one vmcache hand-out, with what E2B keeps beside it.

:class:`SandboxRuntime` is what envd's and the code interpreter's handlers see of a sandbox:
its id, its envVars, the daemon's own connection to its agent, per-sandbox services, and tasks
that live exactly as long as it does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

import trio

from .agent_client import AgentConnection

T = TypeVar("T")


class SandboxRuntime(Protocol):
    """One live sandbox as envd's and the code interpreter's handlers use it."""

    @property
    def id(self) -> str:
        """The sandbox id (``sandboxID``)."""
        ...

    @property
    def envs(self) -> Mapping[str, str]:
        """The ``envVars`` given at create: every command's environment starts from them."""
        ...

    async def agent(self) -> AgentConnection:
        """The daemon's connection to the sandbox's guest agent (opened once, shared)."""
        ...

    def service(self, kind: type[T]) -> T:
        """Per-sandbox state: ``kind(self)``, made on first use and kept for the sandbox's life."""
        ...

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` as long as the sandbox lives (processes outliving a stream,
        watchers, kernels): it is cancelled when the sandbox ends."""
        ...

    @property
    def ended(self) -> trio.Event:
        """Set once the sandbox ended (killed, its TTL passed, its VM gone)."""
        ...
