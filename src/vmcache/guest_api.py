"""What an owner does with a VM's guest: processes and files, over the agent's user ports.

Each VM has one control port (``vmcache.control``, the daemon's: pings, entropy,
clock) and :data:`USER_PORTS` user ports (``vmcache.agent.N``), each a chardev Unix
socket in the VM's run directory. QEMU serves one connection per port, so an owner
takes a free one: an ``flock`` on ``agent-N.lock`` next to the socket says who has
it, across processes (eight ``vmcache exec`` at once on one VM each get their own).
The daemon's pings never wait behind an owner's work, and owners never wait behind
each other's.

:class:`Guest` opens its connection on first use and keeps it (one connection
carries any number of processes and transfers at once). :class:`GuestAPI` gives
:class:`~vmcache.qemu.VM` and :class:`~vmcache.handle.VMHandle` the same methods,
shaped like Trio's own process API: ``run``, ``open_process``, ``write_file``,
``read_file``, ``open_file``, ``mkdir``; and ``connect_tcp`` for a port inside the guest.

When the connection breaks, the error says why: a VM whose QEMU is gone is a
:class:`VMGoneError` quoting the console's telling line (a panic, the OOM killer).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ._unix import connect_when_ready
from .agent_client import (
    DEFAULT_MAX_OUTPUT,
    TCP_CONNECT_TIMEOUT,
    AgentConnection,
    CompletedProcess,
    GuestFile,
    GuestProcess,
    GuestTcpStream,
    PtySize,
)
from .backoff import Backoff
from .console import CONSOLE_LOG, read_console
from .console import telling_console_line as telling
from .errors import AgentError, VMDiedError, VMGoneError

#: User ports per VM (the control port comes on top).
USER_PORTS = 16
CONTROL_PORT = "vmcache.control"
CONTROL_SOCKET = "control.sock"
#: How long to wait for a free port and a HELLO answer.
CONNECT_TIMEOUT = 10.0
#: After the agent's connection broke: how long to wait for QEMU to exit, if it is going to.
DEATH_WAIT = 1.0
#: How much of the console's end is searched for the line that says why a guest died.
CONSOLE_TAIL = 1 << 16


def user_port_name(index: int) -> str:
    return f"vmcache.agent.{index}"


def user_socket(run_dir: Path, index: int) -> Path:
    return run_dir / f"agent-{index}.sock"


class Guest:
    """One owner's connection to a VM's guest agent, on a user port it holds the lock of."""

    def __init__(self, vm_id: str, run_dir: Path, *, is_running: Callable[[], bool],
                 wait_stopped: Callable[[], Awaitable[object]], ports: int = USER_PORTS) -> None:
        self.vm_id = vm_id
        self.run_dir = run_dir
        self._is_running = is_running
        self._wait_stopped = wait_stopped
        self._ports = ports
        self._connection: AgentConnection | None = None
        self._lock_fd: int | None = None
        #: The console log's two files (see vmcache.console.RotatingLog), kept open: whoever
        #: reaps a dead VM may remove its run directory before we read why it died, and an
        #: open file outlives its name.
        self._console_fds: list[int] = []
        self._opening = trio.Lock()

    def _try_lock_port(self) -> int | None:
        """Lock the first free port; its index, or None if all are taken."""
        for index in range(self._ports):
            fd = os.open(self.run_dir / f"agent-{index}.lock",
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd = fd
            return index
        return None

    def _unlock_port(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    async def connection(self) -> AgentConnection:
        """The connection, opened (port locked, HELLO answered) on first use."""
        if self._connection is not None:
            return self._connection
        async with self._opening:
            if self._connection is None:
                if not self._is_running():
                    raise VMGoneError(f"VM {self.vm_id} is not running")
                self._connection = await self._open()
        return self._connection

    async def _open(self) -> AgentConnection:
        backoff = Backoff(0.01, 0.5)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                try:
                    while (index := self._try_lock_port()) is None:
                        await backoff.sleep()
                except trio.TooSlowError:
                    raise
                stream = await connect_when_ready(user_socket(self.run_dir, index),
                                                  still_starting=self._is_running)
                if not self._console_fds:
                    self._open_console()
                try:
                    return await AgentConnection.start(stream, timeout=CONNECT_TIMEOUT)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            self._unlock_port()
            if self._lock_fd is None and not self._is_running():
                raise VMGoneError(f"VM {self.vm_id} stopped") from None
            raise AgentError(f"VM {self.vm_id}: no free agent port, or no answer from the guest "
                             f"agent within {CONNECT_TIMEOUT:g} s ({self._ports} ports; each "
                             "`vmcache exec` or library handle holds one)") from None
        except OSError as error:
            self._unlock_port()
            if not self._is_running():
                raise VMGoneError(f"VM {self.vm_id} is not running") from None
            raise AgentError(f"VM {self.vm_id}: cannot reach its agent: {error.strerror}") from None
        except BaseException:
            self._unlock_port()
            raise

    async def explain(self, error: AgentError) -> AgentError:
        """An agent error with the reason it happened: a VM that is dying (QEMU exits a moment
        after the guest panics) is waited for, at most :data:`DEATH_WAIT` s, and the error
        then quotes the console's telling line."""
        with trio.move_on_after(DEATH_WAIT):
            await self._wait_stopped()
        if self._is_running():
            return error
        line = self._telling_line()
        return VMDiedError(f"VM {self.vm_id} stopped ({line or 'its QEMU exited'}): {error}")

    def _open_console(self) -> None:
        for name in (f"{CONSOLE_LOG}.1", CONSOLE_LOG):  # oldest first
            try:
                self._console_fds.append(os.open(self.run_dir / name, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                pass

    def _telling_line(self) -> str:
        if not self._console_fds:
            return telling(read_console(self.run_dir))
        tails = []
        for fd in self._console_fds:
            size = os.fstat(fd).st_size
            tails.append(os.pread(fd, CONSOLE_TAIL, max(0, size - CONSOLE_TAIL)))
        return telling(b"".join(tails).decode(errors="replace"))

    async def aclose(self) -> None:
        """Close the connection (the guest kills this session's processes); free the port."""
        connection, self._connection = self._connection, None
        try:
            if connection is not None:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
        finally:
            self._unlock_port()
            for fd in self._console_fds:
                os.close(fd)
            self._console_fds = []


class GuestAPI:
    """The guest methods of a VM, for classes that know how to reach its guest (:meth:`_guest`)."""

    def _guest(self) -> Guest:
        raise NotImplementedError

    @asynccontextmanager
    async def _explained(self) -> AsyncIterator[AgentConnection]:
        """The agent's connection for one call; an :class:`AgentError` raised in the block
        (connecting included) comes out saying why it happened (:meth:`Guest.explain`)."""
        guest = self._guest()
        try:
            yield await guest.connection()
        except AgentError as error:
            raise await guest.explain(error) from None

    async def run(
        self,
        argv: Sequence[str | bytes],
        *,
        stdin: bytes = b"",
        capture_stdout: bool = True,
        capture_stderr: bool = True,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> CompletedProcess:
        """Run ``argv`` in the guest to its end, like :func:`trio.run_process` (no shell).

        ``returncode`` is negative for a signal (-9: SIGKILL); a command that does not
        exist is 127 with one line on its stderr. ``check=True`` raises
        :class:`~vmcache.errors.GuestProcessError` for a non-zero status; ``timeout``
        makes the guest kill it. Cancelling kills the guest process. Output past
        ``max_output`` bytes (stdout and stderr together, 64 MiB by default) kills it and
        raises :class:`~vmcache.errors.GuestOutputLimitError`: stream it with :meth:`open_process`.
        """
        async with self._explained() as connection:
            return await connection.run(argv, stdin=stdin, capture_stdout=capture_stdout,
                                        capture_stderr=capture_stderr, check=check, env=env,
                                        cwd=cwd, timeout=timeout, max_output=max_output)

    @asynccontextmanager
    async def open_process(
        self,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        pty: PtySize | None = None,
        timeout: float | None = None,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
    ) -> AsyncIterator[GuestProcess]:
        """Start ``argv`` in the guest: ``proc.stdin`` (a SendStream), ``proc.stdout`` /
        ``proc.stderr`` (ReceiveStreams), ``await proc.wait()``, ``proc.send_signal()``,
        ``proc.kill()``, ``proc.returncode``. Leaving the block kills it if it still runs.
        With ``pty``, it runs on a terminal of that size (``proc.resize()`` follows yours)."""
        async with self._explained() as connection, connection.open_process(
                argv, env=env, cwd=cwd, pty=pty, timeout=timeout, capture_stdout=capture_stdout,
                capture_stderr=capture_stderr) as process:
            yield process

    async def write_file(
        self,
        path: str,
        data: bytes | bytearray | memoryview | trio.abc.ReceiveStream | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
    ) -> int:
        """Write a guest file of any size (parent directories made; ``mode`` kept); its size."""
        async with self._explained() as connection:
            return await connection.write_file(path, data, mode=mode)

    async def read_file(self, path: str, *, max_size: int = DEFAULT_MAX_OUTPUT) -> bytes:
        """A whole guest file's bytes; past ``max_size`` (64 MiB by default)
        :class:`~vmcache.errors.GuestOutputLimitError`: stream it with :meth:`open_file`."""
        async with self._explained() as connection:
            return await connection.read_file(path, max_size=max_size)

    @asynccontextmanager
    async def open_file(self, path: str) -> AsyncIterator[GuestFile]:
        """A guest file as a ReceiveStream, with its ``mode`` and ``size``."""
        async with self._explained() as connection, connection.open_file(path) as file:
            yield file

    async def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """``mkdir -p`` in the guest."""
        async with self._explained() as connection:
            await connection.mkdir(path, mode=mode)

    async def connect_tcp(self, port: int, host: str = "127.0.0.1", *,
                          timeout: float = TCP_CONNECT_TIMEOUT) -> GuestTcpStream:
        """A TCP connection to ``host``:``port`` inside the guest (its loopback by default), carried
        by the agent, so it needs no guest network at all: a ``trio.abc.HalfCloseableStream``
        (``send_all``, ``receive_some``, ``send_eof``, ``aclose``). Nothing listening there is a
        :class:`~vmcache.errors.GuestPortRefusedError`; a connect not done within ``timeout`` s
        (or any other failure) a :class:`~vmcache.errors.GuestConnectError`."""
        async with self._explained() as connection:
            return await connection.connect_tcp(port, host, timeout=timeout)

    async def exec(self, argv: Sequence[str | bytes], timeout: float | None = None) -> CompletedProcess:
        """:meth:`run` with output captured: a convenience kept from vmcache's first API."""
        return await self.run(argv, timeout=timeout)
