"""Stopping a process for sure: the quit -> SIGTERM -> SIGKILL escalation, and pidfds.

Modelled on Trio's own subprocess handling: the cleanup is shielded from the
cancellation that triggered it, every step is bounded in time, and the process
is always reaped (or, for a process that is not our child, watched until it is
gone).
"""

from __future__ import annotations

import logging
import os
import select
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from .errors import VmcacheError
from .procfs import cmdline, process_start_time

log = logging.getLogger("vmcache.process")

#: Bounds of the stop escalation, in seconds.
QUIT_GRACE = 3.0
TERM_GRACE = 3.0
KILL_GRACE = 5.0


class ProcessLike(Protocol):
    """What :func:`stop_process` needs of a process (trio.Process has it)."""

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


async def stop_process(
    process: ProcessLike,
    polite: Callable[[], Awaitable[object]] | None = None,
    *,
    quit_grace: float = QUIT_GRACE,
    term_grace: float = TERM_GRACE,
    kill_grace: float = KILL_GRACE,
) -> int | None:
    """Stop ``process``: ``polite()`` (QMP quit), then SIGTERM, then SIGKILL.

    Each step waits at most its grace period for the process to exit. The whole
    escalation is shielded from cancellation (it is what cancellation relies on)
    and bounded by the sum of the graces. Returns the exit status, or None if
    the process survived even SIGKILL for ``kill_grace`` s (logged; it is in an
    uninterruptible kernel state we cannot do anything about).
    """
    with trio.CancelScope(shield=True):
        if polite is not None and process.returncode is None:
            with trio.move_on_after(quit_grace):
                try:
                    await polite()
                except VmcacheError:
                    pass  # QEMU often closes the monitor before answering quit
                await process.wait()
        for sig, grace in ((signal.SIGTERM, term_grace), (signal.SIGKILL, kill_grace)):
            if process.returncode is not None:
                break
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass
            with trio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            log.error("process did not exit %.0f s after SIGKILL; giving up on it", kill_grace)
    return process.returncode


class PidfdProcess:
    """A process that is not our child, watched through a pidfd (a :class:`ProcessLike`).

    Opening checks the start time, so a pid that was reused by another process
    is reported as gone rather than signalled.
    """

    def __init__(self, pid: int, start_time: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        self._waiting = False
        self._changed = trio.Event()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        if start_time and process_start_time(pid) != start_time:
            os.close(fd)
            return
        self._fd = fd

    @property
    def returncode(self) -> int | None:
        """None while running; 0 once exited (a non-child's status is not ours to know)."""
        if self._fd is None:
            return 0
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return 0 if poller.poll(0) else None

    async def wait(self) -> int:
        """Wait until the process is gone. Several tasks may wait at once (one of them
        watches the pidfd, the others wait for its news)."""
        while self.returncode is None:
            if self._waiting:
                await self._changed.wait()
                continue
            self._waiting = True
            try:
                assert self._fd is not None
                await trio.lowlevel.wait_readable(self._fd)
            finally:
                self._waiting = False
                self._changed.set()
                self._changed = trio.Event()
        return 0

    def send_signal(self, sig: int) -> None:
        if self._fd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_vm_process(vm_id: str, pid: int, start_time: int) -> PidfdProcess | None:
    """The running QEMU of VM ``vm_id``, or None if ``pid`` is not that process any more.

    All three must match: the pid, its start time (so a reused pid is never taken for
    the VM) and a command line naming the VM (``-name vmcache-<id>``). Whatever claims
    to be a VM (a handle a user passes, a record on disk) is checked this way before
    anything is signalled. The caller closes the returned process.
    """
    if pid <= 0 or start_time <= 0:
        return None
    process = PidfdProcess(pid, start_time)
    if process.returncode is not None or f"vmcache-{vm_id}".encode() not in cmdline(pid).split(b"\0"):
        process.close()
        return None
    return process


def describe_exit(status: int | None) -> str:
    """'exited with status N' or 'was killed by SIGX', for log lines."""
    if status is None:
        return "is still running"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"
