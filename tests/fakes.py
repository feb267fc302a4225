"""Fakes shared by the unit tests that run in virtual time."""

from __future__ import annotations

import signal

import trio


class FakeProcess:
    """A process (a ProcessLike) that exits of the signals in ``dies_of`` and ignores the rest."""

    def __init__(self, dies_of: set[int]) -> None:
        self.dies_of = dies_of
        self.signals: list[int] = []
        self.returncode: int | None = None
        self._exited = trio.Event()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig in self.dies_of and self.returncode is None:
            self.returncode = -sig
            self._exited.set()

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
