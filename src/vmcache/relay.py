"""A guest process relayed to this terminal: what ``vmcache exec`` and ``vmcache run`` do.

Output streams as it is produced (stdout to our stdout, stderr to our stderr);
our stdin is forwarded when asked (the CLI asks when stdin is not a terminal, or
with ``-i``) and its end is the process's EOF; with a PTY (``-t``) the terminal is
put in raw mode for the process's life (restored however it ends) and its size
follows ours (SIGWINCH). Ctrl-C can be forwarded as SIGINT to the guest process
instead of stopping us. The exit status is the process's, or 128 + N when signal
N ended it, as a shell reports it.

Local reads and writes go through worker threads: stdin and stdout may be
terminals, pipes or regular files, and none of them may block the event loop.
Keys typed before the guest process runs are kept for it, as ssh and docker
keep them: with ``-t`` the terminal stops echoing before anything else is done
(the guest's terminal echoes instead), and it is made raw without discarding
its pending input.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs
import trio

from .agent_client import GuestProcess, PtySize
from .errors import LocalOutputError, raise_unwrapped
from .guest_api import GuestAPI

CHUNK = 1 << 20


@attrs.frozen
class ProcessRequest:
    """What to run and how, from the command line."""

    argv: Sequence[str]
    env: Mapping[str, str] = attrs.Factory(dict)
    cwd: str | None = None
    forward_stdin: bool = False
    tty: bool = False
    timeout: float | None = None


def shell_status(returncode: int) -> int:
    """A process's status as a shell reports it: 128 + N for signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def _terminal_size() -> PtySize:
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines > 0 and size.columns > 0:  # a new pty says 0x0 until someone sets it
            return PtySize(rows=size.lines, cols=size.columns)
    return PtySize()


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[Callable[[], None]]:
    """Terminal ``fd`` without echo for the block, and raw once the function it gives is
    called; always restored. Nothing typed is ever discarded (no ``TCSAFLUSH``): keys
    typed before the guest process runs wait in the terminal for it, unechoed (the guest's
    terminal echoes them). Until raw, Ctrl-C still interrupts (connecting may take a while).
    Not a terminal: nothing is done."""
    if not os.isatty(fd):
        yield lambda: None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON)  # bytes as typed
    quiet[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        yield lambda: tty.setraw(fd, termios.TCSANOW)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """Write ``data`` whole; a descriptor that someone made non-blocking (a terminal or pipe
    shared with another program) is waited on, not an error."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


async def _copy_out(stream: trio.abc.ReceiveStream, fd: int) -> None:
    """Guest output to a local fd until EOF; a reader that went away (``| head``) only
    means the rest is read and dropped, so the process is not blocked by us. Any other
    failure to write here (a full disk) stops the command with a :class:`LocalOutputError`."""
    writable = True
    while chunk := await stream.receive_some(CHUNK):
        if not writable:
            continue
        try:
            await trio.to_thread.run_sync(_write_all, fd, chunk)
        except OSError as error:
            if error.errno != errno.EPIPE:
                name = {1: "stdout", 2: "stderr"}.get(fd, f"file descriptor {fd}")
                raise LocalOutputError(f"cannot write the command's {name} here: "
                                       f"{error.strerror or error}") from None
            writable = False


async def _copy_in(fd: int, stdin: trio.abc.SendStream) -> None:
    """Local stdin to the guest process until our EOF (then the process's EOF)."""
    try:
        while data := await trio.to_thread.run_sync(os.read, fd, CHUNK, abandon_on_cancel=True):
            await stdin.send_all(data)
        await stdin.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the process closed its stdin or exited: nobody reads the rest


async def _follow_window_size(process: GuestProcess) -> None:
    with trio.open_signal_receiver(signal.SIGWINCH) as changes:
        async for _ in changes:
            size = _terminal_size()
            await process.resize(size.rows, size.cols)


async def _forward_interrupts(process: GuestProcess) -> None:
    """Ctrl-C (SIGINT) goes to the guest process, as a terminal would send it."""
    with trio.open_signal_receiver(signal.SIGINT) as interrupts:
        async for signum in interrupts:
            await process.send_signal(signum)


async def relay_process(vm: GuestAPI, request: ProcessRequest, *, forward_sigint: bool) -> int:
    """Run ``request`` in the guest with this terminal attached; its shell-style exit status."""
    pty = _terminal_size() if request.tty else None
    with raw_terminal(sys.stdin.fileno()) if request.tty else contextlib.nullcontext(lambda: None) as raw:
        async with vm.open_process(request.argv, env=request.env or None, cwd=request.cwd, pty=pty,
                                   timeout=request.timeout) as process:
            assert process.stdout is not None and process.stdin is not None
            raw()
            returncode = await _attach(process, request, forward_sigint=forward_sigint)
    return shell_status(returncode)


async def _attach(process: GuestProcess, request: ProcessRequest, *, forward_sigint: bool) -> int:
    """Our stdin, stdout, stderr, window size and Ctrl-C, to and from ``process``; its status.

    Errors come out as themselves (not in exception groups), so that the guest API above
    can tell a dying VM from a broken connection.
    """
    assert process.stdout is not None and process.stdin is not None
    try:
        async with trio.open_nursery() as helpers:
            if request.forward_stdin:
                helpers.start_soon(_copy_in, sys.stdin.fileno(), process.stdin)
            else:
                await process.stdin.aclose()
            if request.tty:
                helpers.start_soon(_follow_window_size, process)
            elif forward_sigint:
                helpers.start_soon(_forward_interrupts, process)
            async with trio.open_nursery() as outputs:
                outputs.start_soon(_copy_out, process.stdout, sys.stdout.fileno())
                if process.stderr is not None:
                    outputs.start_soon(_copy_out, process.stderr, sys.stderr.fileno())
            returncode = await process.wait()
            helpers.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_unwrapped(group)  # a broken connection fails every stream at once with one error
    return returncode
