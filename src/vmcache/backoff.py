"""Capped exponential backoff: the one retry schedule of the package.

Boots that fail, snapshots that cannot be made, ``accept`` out of file
descriptors and sockets QEMU has not made yet all retry on this schedule, each
with its own first delay and cap.
"""

from __future__ import annotations

import trio


class Backoff:
    """Delays of ``initial``, 2x ``initial``, 4x ... up to ``cap``; :meth:`reset` starts over."""

    def __init__(self, initial: float, cap: float) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"backoff needs 0 < initial <= cap, not {initial}, {cap}")
        self.initial = initial
        self.cap = cap
        self._next = initial

    def next(self) -> float:
        """The delay to wait now; the one after it doubles, up to the cap."""
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        """Back to the first delay (after a success)."""
        self._next = self.initial

    async def sleep(self) -> float:
        """Sleep for :meth:`next` and return how long that was."""
        delay = self.next()
        await trio.sleep(delay)
        return delay
