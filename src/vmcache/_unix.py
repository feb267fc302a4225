"""Small Trio helpers for Unix sockets that QEMU creates."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from .backoff import Backoff


async def connect_when_ready(
    path: Path, *, still_starting: Callable[[], bool] = lambda: True
) -> trio.SocketStream:
    """Connect to the Unix socket ``path``, retrying while it does not exist yet.

    QEMU creates its sockets a few milliseconds after it starts, so a refused or
    missing socket is retried with a capped backoff for as long as
    ``still_starting()`` is true. The caller bounds the whole wait (a cancel
    scope with a deadline); this function has no deadline of its own.
    """
    backoff = Backoff(0.002, 0.1)
    while True:
        try:
            return await trio.open_unix_socket(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            if not still_starting():
                raise
            await backoff.sleep()
