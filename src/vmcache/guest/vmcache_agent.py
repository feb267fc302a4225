"""vmcache guest agent: runs commands and moves files for the host, over virtio-serial.

Started in the guest as PID 1 after switch_root::

    /usr/bin/python3 -E -s /run/vmcache/agent/vmcache_agent.py --init

(``agent_protocol.py`` sits next to this file). It serves every virtio-serial
port whose name starts with ``vmcache.`` (``vmcache.control``,
``vmcache.agent.0`` ...), one independent session per port, all in one
single-threaded event loop (epoll). ``--fd N`` serves one already-connected
socket instead (the host tests run the agent that way) and exits when it
closes.

Only modules that Debian's ``python3-minimal`` ships are used (no json, no
termios, no ctypes needed), and the code runs on any Python >= 3.9. The wire
protocol is ``agent_protocol.py``'s; ``docs/agent-protocol.md`` describes the
requests and their answers.

Memory stays bounded whatever a process or the host does: a process's output
is read only while the host granted credit and the port's send queue is
short (the process then blocks on its pipe), and the host may send only as
much as the agent granted.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import heapq
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from vmcache import agent_protocol as ap
else:
    try:
        import agent_protocol as ap
    except ImportError:  # run from a source checkout: src/vmcache/agent_protocol.py
        sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import agent_protocol as ap

AGENT_VERSION = "2.0.0"

#: The environment every command starts from (the agent's own is not passed on).
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
#: TERM for commands with a pty, and without one.
PTY_TERM = "xterm-256color"
PIPE_TERM = "dumb"

# Linux ioctl and fcntl numbers (termios is not in python3-minimal).
TIOCSWINSZ = 0x5414
TIOCSCTTY = 0x540E
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PR_SET_CHILD_SUBREAPER = 36

#: A virtio-serial port takes at most 32 KiB per write(); writev with pieces that size.
PORT_WRITE_PIECE = 32 * 1024
#: A virtio-serial read returns one 4 KiB guest buffer at most; readv with pieces that size.
PORT_READ_PIECE = 4096
READ_PIECES = 64
WRITE_PIECES = 64
#: A session stops reading process output while this much waits to go to the host.
OUT_LIMIT = 512 * 1024
#: Pipe size asked for stdin/stdout (fewer wake-ups per MB).
PIPE_SIZE = 1024 * 1024
#: Credit the agent grants for a process's stdin and for a file being written.
STDIN_WINDOW = 2 * 1024 * 1024
FILE_WINDOW = 4 * 1024 * 1024
#: A frame still incomplete this long after the last complete one is given up (FrameReader.rescan).
STALL_TIMEOUT = 2.0
#: How often disconnected ports are checked, besides SIGIO.
PORT_RECHECK = 2.0
#: At most this many processes at once per session.
MAX_PROCESSES = 64


def log(message: str) -> None:
    try:
        os.write(2, ("vmcache-agent: " + message.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def log_exception(what: str) -> None:
    log(what + "\n" + traceback.format_exc())


def os_error_text(error: OSError) -> str:
    return error.strerror or str(error)


# --- Event loop ----------------------------------------------------------------------------------


class Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """A minimal epoll loop: per-fd read and write callbacks, timers, soon-callbacks."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._soon: deque[Callable[[], None]] = deque()
        self._sequence = 0
        self.running = True

    def _update(self, fd: int) -> None:
        mask = select.EPOLLIN if fd in self._readers else 0
        if fd in self._writers:
            mask |= select.EPOLLOUT
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        try:
            if not mask:
                del self._masks[fd]
                self._epoll.unregister(fd)
            elif not old:
                self._epoll.register(fd, mask)
                self._masks[fd] = mask
            else:
                self._epoll.modify(fd, mask)
                self._masks[fd] = mask
        except OSError as error:
            log(f"epoll on fd {fd}: {os_error_text(error)}")

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (call before closing it)."""
        self.remove_reader(fd)
        self.remove_writer(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        self._sequence += 1
        heapq.heappush(self._timers, (timer.deadline, self._sequence, timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    def _run_callback(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log_exception("error in the event loop (carrying on)")

    def run_once(self) -> None:
        if self._soon:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, min(60.0, self._timers[0][0] - time.monotonic()))
        else:
            timeout = 60.0
        for fd, events in self._epoll.poll(timeout):
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                reader = self._readers.get(fd)
                if reader is not None:
                    self._run_callback(reader)
            if events & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
                writer = self._writers.get(fd)
                if writer is not None:
                    self._run_callback(writer)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            if not timer.cancelled:
                self._run_callback(timer.callback)
        for _ in range(len(self._soon)):
            self._run_callback(self._soon.popleft())


# --- Processes -----------------------------------------------------------------------------------


def set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def make_pipe(size: int) -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, size)
    except OSError:
        pass  # pipe-max-size or the per-user limit: the default size works too
    return read_end, write_end


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_terminal() -> None:
    """In the child, after setsid(): make the pty (its stdin) the controlling terminal."""
    fcntl.ioctl(0, TIOCSCTTY, 0)


def spawn_failure_line(argv0: str, error: OSError) -> tuple[int, str]:
    """The exit status and the one stderr line for a command that could not start."""
    if isinstance(error, FileNotFoundError):
        return 127, f"vmcache: command not found in the guest: {argv0}"
    if isinstance(error, PermissionError):
        return 126, f"vmcache: command not executable in the guest: {argv0}"
    return 126, f"vmcache: cannot run in the guest: {argv0}: {os_error_text(error)}"


class RequestFailed(Exception):
    """A request that the agent answers with an error (its message goes to the host)."""

    def __init__(self, message: str, error_number: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = error_number


def _get(body: dict[str, Any], key: str, kind: Any, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is default:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestFailed(f"bad request: {key!r} has the wrong type")
    return value


def _fs_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        raise RequestFailed(f"bad request: {what} is not text")
    if b"\0" in value:
        raise RequestFailed(f"bad request: {what} contains a NUL byte")
    return value


# --- Streams -------------------------------------------------------------------------------------


class Stream:
    """One stream of a session: a process or a file transfer."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self.session = session
        self.id = stream_id

    def on_data(self, channel: int, data: memoryview) -> None:
        raise RequestFailed(f"DATA on channel {channel} of a stream that takes none")

    def on_eof(self, channel: int) -> None:
        pass

    def on_window(self, channel: int, increment: int) -> None:
        pass

    def on_control(self, body: dict[str, Any]) -> None:
        raise RequestFailed("this stream takes no CONTROL")

    def close(self) -> None:
        """The host reset the stream, or the session ended: release everything now."""

    def finish(self) -> None:
        self.session.streams.pop(self.id, None)


class OutputPipe:
    """A process's stdout or stderr (or a pty master), read only while it has credit."""

    def __init__(self, process: ProcessStream, channel: int, fd: int, credit: int) -> None:
        self.process = process
        self.session = process.session
        self.channel = channel
        self.fd = fd
        self.credit = ap.SendCredit(credit)
        self.open = True
        self.armed = False
        set_nonblocking(fd)

    def update(self) -> None:
        want = self.open and self.credit.available > 0 and self.session.out_bytes < OUT_LIMIT
        if want and not self.armed:
            self.session.loop.add_reader(self.fd, self.on_readable)
            self.session.waiting_outputs.discard(self)
        elif not want and self.armed:
            self.session.loop.remove_reader(self.fd)
        if not want and self.open and self.credit.available > 0:
            self.session.waiting_outputs.add(self)  # waits for the send queue to drain
        self.armed = want

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, min(self.credit.available, ap.CHUNK))
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno != errno.EIO:  # EIO: a pty whose other side is all closed
                log(f"reading the output of {self.process.argv0}: {os_error_text(error)}")
            data = b""
        if not data:
            self.close(send_eof=True)
            self.process.check_finished()
            return
        self.credit.take(len(data))
        self.session.send_data(self.process.id, self.channel, data)
        self.session.flush()
        self.update()

    def on_window(self, increment: int) -> None:
        self.credit.grant(increment)
        self.update()

    def close(self, send_eof: bool) -> None:
        """Stop reading and close the fd (for a pty, stdin goes with it: same fd)."""
        if not self.open:
            return
        self.open = False
        self.armed = False
        self.session.waiting_outputs.discard(self)
        if self.process.stdin_fd == self.fd:
            self.process.stdin_fd = None
            self.process.stdin_pending.clear()
        self.session.loop.forget(self.fd)
        os.close(self.fd)
        if send_eof:
            self.session.send(ap.encode_eof(self.process.id, self.channel))


class ProcessStream(Stream):
    """A command the host asked for: pipes (or a pty), its exit, its timeout."""

    def __init__(self, session: Session, stream_id: int, body: dict[str, Any]) -> None:
        super().__init__(session, stream_id)
        argv = _get(body, "argv", list)
        if not argv:
            raise RequestFailed("bad request: argv is empty")
        self.argv = [_fs_bytes(arg, "an argument") for arg in argv]
        self.argv0 = self.argv[0].decode("utf-8", "replace")
        env = dict(DEFAULT_ENV)
        pty = _get(body, "pty", list)
        env["TERM"] = PTY_TERM if pty else PIPE_TERM
        for key, value in _get(body, "env", dict, {}).items():
            if not isinstance(value, str) or not key or "=" in key or "\0" in key + value:
                raise RequestFailed(f"bad request: environment variable {key!r}")
            env[key] = value
        self.env = env
        cwd = _get(body, "cwd", str)
        self.cwd = _fs_bytes(cwd, "cwd") if cwd is not None else None
        self.pty: list[int] | None = None
        if pty is not None:
            if len(pty) != 2 or not all(isinstance(n, int) and 0 < n < 65536 for n in pty):
                raise RequestFailed("bad request: pty is [rows, cols]")
            self.pty = pty
        self.timeout = _get(body, "timeout", float)
        self.window = _get(body, "window", int, ap.DEFAULT_WINDOW)
        if not 0 < self.window <= ap.MAX_WINDOW:
            raise RequestFailed("bad request: window")
        self.want_stdout = _get(body, "stdout", bool, True)
        self.want_stderr = _get(body, "stderr", bool, True) and self.pty is None
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.timed_out = False
        self.end_sent = False
        self.outputs: dict[int, OutputPipe] = {}
        self.stdin_fd: int | None = None
        self.stdin_window = ap.ReceiveWindow(STDIN_WINDOW)
        self.stdin_pending: deque[bytes] = deque()
        self.stdin_eof = False
        self.timer: Timer | None = None

    def start(self) -> None:
        if self.cwd is not None and not os.path.isdir(self.cwd):
            shown = self.cwd.decode("utf-8", "replace")
            try:
                os.stat(self.cwd)
                raise RequestFailed(f"the working directory is not a directory in the guest: {shown}",
                                    errno.ENOTDIR)
            except OSError as error:
                raise RequestFailed(f"the working directory does not exist in the guest: {shown}: "
                                    f"{os_error_text(error)}", error.errno) from None
        if len(self.session.processes()) >= MAX_PROCESSES:
            raise RequestFailed(f"too many processes in this session (at most {MAX_PROCESSES})")
        child_fds: list[int] = []
        own_fds: list[int] = []

        def close_all() -> None:
            for fd in own_fds + child_fds:
                os.close(fd)

        try:
            if self.pty is not None:
                master, slave = os.openpty()
                own_fds.append(master)
                child_fds.append(slave)
                set_window_size(master, self.pty[0], self.pty[1])
                stdin: int = slave
                stdout: int = slave
                stderr: int = slave
            else:
                stdin_read, stdin_write = make_pipe(PIPE_SIZE)
                own_fds.append(stdin_write)
                child_fds.append(stdin_read)
                stdin = stdin_read
                stdout = stderr = subprocess.DEVNULL
                if self.want_stdout:
                    out_read, stdout = make_pipe(PIPE_SIZE)
                    own_fds.append(out_read)
                    child_fds.append(stdout)
                if self.want_stderr:
                    err_read, stderr = make_pipe(64 * 1024)
                    own_fds.append(err_read)
                    child_fds.append(stderr)
        except OSError as error:
            close_all()
            raise RequestFailed(f"cannot set up {self.argv0}'s pipes in the guest: {os_error_text(error)}",
                                error.errno) from None
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=stdin, stdout=stdout, stderr=stderr, env=self.env, cwd=self.cwd,
                start_new_session=True, close_fds=True, restore_signals=True,
                preexec_fn=_take_controlling_terminal if self.pty is not None else None,
            )
        except OSError as error:
            close_all()
            self._spawn_failed(error)
            return
        except BaseException:
            close_all()
            raise
        for fd in child_fds:
            os.close(fd)
        self.pid = self.popen.pid
        self.session.agent.children[self.pid] = self
        if self.pty is not None:
            master = own_fds[0]
            self.stdin_fd = master
            self.outputs[ap.STDOUT] = OutputPipe(self, ap.STDOUT, master, self.window)
        else:
            self.stdin_fd = own_fds[0]
            set_nonblocking(self.stdin_fd)
            index = 1
            for channel, wanted in ((ap.STDOUT, self.want_stdout), (ap.STDERR, self.want_stderr)):
                if wanted:
                    self.outputs[channel] = OutputPipe(self, channel, own_fds[index], self.window)
                    index += 1
        if self.timeout is not None:
            self.timer = self.session.loop.call_later(max(0.0, self.timeout), self._on_timeout)
        self.session.send(ap.encode_reply(self.id, {"pid": self.pid, "window": STDIN_WINDOW}))
        for output in self.outputs.values():
            output.update()

    def _spawn_failed(self, error: OSError) -> None:
        """Answer like a process that printed one line on stderr and exited 127 or 126."""
        status, line = spawn_failure_line(self.argv0, error)
        session = self.session
        session.send(ap.encode_reply(self.id, {"pid": 0, "window": STDIN_WINDOW}))
        channel = ap.STDOUT if self.pty is not None else ap.STDERR
        wanted = self.want_stdout if channel == ap.STDOUT else self.want_stderr
        data = (line + ("\r\n" if self.pty is not None else "\n")).encode("utf-8", "replace")
        if wanted and len(data) <= self.window:
            session.send_data(self.id, channel, data)
        for channel, wanted in ((ap.STDOUT, self.want_stdout), (ap.STDERR, self.want_stderr)):
            if wanted:
                session.send(ap.encode_eof(self.id, channel))
        self.returncode = status
        self.end_sent = True
        session.send(ap.encode_end(self.id, {"returncode": status, "timed_out": False}))
        self.finish()

    def _on_timeout(self) -> None:
        self.timer = None
        if self.returncode is None:
            self.timed_out = True
            self.signal_group(signal.SIGKILL)

    def signal_group(self, number: int) -> None:
        if self.pid and self.returncode is None:
            try:
                os.killpg(self.pid, number)
            except ProcessLookupError:
                pass
            except PermissionError:  # the group leader is gone and its id is someone else's
                pass

    # Host -> process.

    def on_data(self, channel: int, data: memoryview) -> None:
        if channel != ap.STDIN:
            raise RequestFailed(f"DATA on channel {channel} of a process")
        self.stdin_window.received(len(data))
        if self.stdin_fd is None or self.stdin_eof:
            self._stdin_consumed(len(data))  # the process is gone or closed stdin: drop it
            return
        written = 0
        if not self.stdin_pending:
            written = self._write_stdin(data)
            if written < 0:
                return
            self._stdin_consumed(written)
        if written < len(data):
            self.stdin_pending.append(bytes(data[written:]))
            self.session.loop.add_writer(self.stdin_fd, self._on_stdin_writable)

    def _write_stdin(self, data: memoryview | bytes) -> int:
        """Write what the pipe takes now; -1 if the process closed its stdin."""
        assert self.stdin_fd is not None
        try:
            return os.write(self.stdin_fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE: nobody reads stdin any more; EIO: the pty is gone
            self._stdin_broken()
            return -1

    def _on_stdin_writable(self) -> None:
        while self.stdin_pending and self.stdin_fd is not None:
            chunk = self.stdin_pending[0]
            written = self._write_stdin(chunk)
            if written < 0:
                return
            self._stdin_consumed(written)
            if written < len(chunk):
                self.stdin_pending[0] = chunk[written:]
                return
            self.stdin_pending.popleft()
        if self.stdin_fd is not None:
            self.session.loop.remove_writer(self.stdin_fd)
            if self.stdin_eof:
                self._close_stdin()

    def _stdin_consumed(self, count: int) -> None:
        increment = self.stdin_window.consumed(count)
        if increment:
            self.session.send(ap.encode_window(self.id, ap.STDIN, increment))

    def _stdin_broken(self) -> None:
        """The process does not read stdin any more: tell the host (EOF on channel 0)."""
        dropped = sum(len(chunk) for chunk in self.stdin_pending)
        self.stdin_pending.clear()
        self._stdin_consumed(dropped)
        self._close_stdin()
        self.stdin_eof = True
        self.session.send(ap.encode_eof(self.id, ap.STDIN))

    def on_eof(self, channel: int) -> None:
        if channel != ap.STDIN or self.stdin_eof:
            return
        self.stdin_eof = True
        if not self.stdin_pending:
            self._close_stdin()

    def _close_stdin(self) -> None:
        fd, self.stdin_fd = self.stdin_fd, None
        if fd is None:
            return
        self.session.loop.remove_writer(fd)
        if self.pty is None:
            os.close(fd)
        elif self.stdin_eof and self.returncode is None:
            # The master stays open (it is the stdout): EOF is the terminal's EOF character.
            try:
                os.write(fd, b"\x04")
            except OSError:
                pass

    def on_window(self, channel: int, increment: int) -> None:
        output = self.outputs.get(channel)
        if output is not None:
            output.on_window(increment)

    def on_control(self, body: dict[str, Any]) -> None:
        op = body.get("op")
        if op == "signal":
            number = _get(body, "signal", int)
            if number is None or not 0 < number < 65:
                raise RequestFailed("bad request: signal")
            self.signal_group(number)
        elif op == "resize":
            rows, cols = _get(body, "rows", int), _get(body, "cols", int)
            output = self.outputs.get(ap.STDOUT)
            if self.pty is None or output is None or not output.open:
                return
            if rows is None or cols is None or not (0 < rows < 65536 and 0 < cols < 65536):
                raise RequestFailed("bad request: rows and cols")
            set_window_size(output.fd, rows, cols)
        else:
            raise RequestFailed(f"unknown control {op!r}")

    # Process -> host.

    def exited(self, returncode: int) -> None:
        """Called by the reaper (SIGCHLD)."""
        self.returncode = returncode
        if self.popen is not None:
            self.popen.returncode = returncode  # keeps subprocess from waiting for it itself
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.session.streams.get(self.id) is not self:
            return  # reset, or its session ended
        self.stdin_pending.clear()
        if self.stdin_fd is not None and self.pty is None:
            self._close_stdin()
        self.end_sent = True
        self.session.send(ap.encode_end(self.id, {"returncode": returncode, "timed_out": self.timed_out}))
        self.session.flush()
        self.check_finished()

    def check_finished(self) -> None:
        if self.end_sent and not any(output.open for output in self.outputs.values()):
            self.stdin_eof = True
            self._close_stdin()
            self.finish()

    def close(self) -> None:
        self.signal_group(signal.SIGKILL)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.stdin_pending.clear()
        for output in self.outputs.values():
            output.close(send_eof=False)
        self.stdin_eof = True
        self._close_stdin()


class WriteFileStream(Stream):
    """A file the host sends: written to a temporary name, renamed into place at EOF."""

    def __init__(self, session: Session, stream_id: int, body: dict[str, Any]) -> None:
        super().__init__(session, stream_id)
        self.path = _fs_bytes(_get(body, "path", str), "path")
        if not self.path.startswith(b"/"):
            raise RequestFailed("the path must be absolute")
        self.mode = _get(body, "mode", int, 0o644) & 0o7777
        self.window = ap.ReceiveWindow(FILE_WINDOW)
        self.size = 0
        self.fd: int | None = None
        self.temp: bytes | None = None
        self.failed = False

    def start(self) -> None:
        directory, name = os.path.split(self.path)
        try:
            os.makedirs(directory or b"/", 0o755, exist_ok=True)
            self.temp = os.path.join(directory, b"." + name + b".vmcache-" + os.urandom(6).hex().encode())
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as error:
            self.temp = None
            raise RequestFailed(f"cannot write {self.path.decode('utf-8', 'replace')} in the guest: "
                                f"{os_error_text(error)}", error.errno) from None
        self.session.send(ap.encode_reply(self.id, {"window": FILE_WINDOW}))

    def on_data(self, channel: int, data: memoryview) -> None:
        if channel != ap.STDIN:
            raise RequestFailed(f"DATA on channel {channel} of a file being written")
        self.window.received(len(data))
        if not self.failed and self.fd is not None:
            try:
                view = data
                while view:
                    written = os.write(self.fd, view)
                    view = view[written:]
                self.size += len(data)
            except OSError as error:
                self._fail(error)
        increment = self.window.consumed(len(data))
        if increment and not self.failed:
            self.session.send(ap.encode_window(self.id, ap.STDIN, increment))

    def on_eof(self, channel: int) -> None:
        if self.failed or self.fd is None or self.temp is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.fchmod(fd, self.mode)
            os.close(fd)
            os.rename(self.temp, self.path)
        except OSError as error:
            self._fail(error)
            return
        self.temp = None
        self.session.send(ap.encode_end(self.id, {"size": self.size}))
        self.finish()

    def _fail(self, error: OSError) -> None:
        self.failed = True
        self.session.send(ap.encode_end(self.id, {
            "error": f"cannot write {self.path.decode('utf-8', 'replace')} in the guest: "
                     f"{os_error_text(error)}",
            "errno": error.errno or 0,
        }))
        self.close()
        self.finish()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.temp is not None:
            try:
                os.unlink(self.temp)
            except OSError:
                pass
            self.temp = None


class ReadFileStream(Stream):
    """A file the host reads: its mode and size, then its bytes as credit allows."""

    def __init__(self, session: Session, stream_id: int, body: dict[str, Any]) -> None:
        super().__init__(session, stream_id)
        self.path = _fs_bytes(_get(body, "path", str), "path")
        self.credit = ap.SendCredit(_get(body, "window", int, ap.DEFAULT_WINDOW))
        self.fd: int | None = None
        self.size = 0
        self.scheduled = False

    def start(self) -> None:
        shown = self.path.decode("utf-8", "replace")
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            info = os.fstat(self.fd)
        except OSError as error:
            self.close()
            raise RequestFailed(f"cannot read {shown} in the guest: {os_error_text(error)}",
                                error.errno) from None
        if not stat.S_ISREG(info.st_mode):
            self.close()
            raise RequestFailed(f"cannot read {shown} in the guest: not a regular file")
        reply = {"mode": stat.S_IMODE(info.st_mode), "size": info.st_size}
        self.session.send(ap.encode_reply(self.id, reply))
        self.schedule()

    def schedule(self) -> None:
        if not self.scheduled and self.fd is not None:
            self.scheduled = True
            self.session.loop.call_soon(self.pump)

    def pump(self) -> None:
        """Read one chunk if there is credit and room; runs again soon while it can."""
        self.scheduled = False
        session = self.session
        if self.fd is None or session.streams.get(self.id) is not self:
            return
        if self.credit.available <= 0:
            return  # a WINDOW reschedules
        if session.out_bytes >= OUT_LIMIT:
            session.waiting_outputs.add(self)
            return
        try:
            data = os.read(self.fd, min(self.credit.available, ap.CHUNK))
        except OSError as error:
            session.send(ap.encode_end(self.id, {
                "error": f"cannot read {self.path.decode('utf-8', 'replace')} in the guest: "
                         f"{os_error_text(error)}", "errno": error.errno or 0}))
            self.close()
            self.finish()
            return
        if not data:
            session.send(ap.encode_eof(self.id, ap.STDOUT))
            session.send(ap.encode_end(self.id, {"size": self.size}))
            self.close()
            self.finish()
            session.flush()
            return
        self.credit.take(len(data))
        self.size += len(data)
        session.send_data(self.id, ap.STDOUT, data)
        session.flush()
        self.schedule()

    def update(self) -> None:
        """Called when the send queue drained (like OutputPipe.update)."""
        self.schedule()

    def on_window(self, channel: int, increment: int) -> None:
        self.credit.grant(increment)
        self.schedule()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- Requests without a stream of data -----------------------------------------------------------


def count_cpu_list(text: str) -> int:
    """How many CPUs a list like ``0-3,5`` names."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


class System:
    """What the agent does to the guest as a whole; paths are configurable for tests."""

    def __init__(self, sys_dir: str, proc_dir: str, random_device: str, set_clock: bool) -> None:
        self.sys_dir = sys_dir
        self.proc_dir = proc_dir
        self.random_device = random_device
        self.clock_allowed = set_clock
        try:
            with open(os.path.join(proc_dir, "sys/kernel/random/boot_id")) as file:
                self.boot_id = file.read().strip()
        except OSError as error:
            log(f"no boot id: {os_error_text(error)}")
            self.boot_id = "unknown"

    def add_entropy(self, data: bytes) -> None:
        """Credit ``data`` to the kernel's pool (RNDADDENTROPY), then reseed the CRNG."""
        if not data or len(data) > 4096:
            raise RequestFailed("entropy must be 1 to 4096 bytes")
        try:
            fd = os.open(self.random_device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as error:
            raise RequestFailed(f"cannot open {self.random_device}: {os_error_text(error)}",
                                error.errno) from None
        try:
            for name, number, argument in (
                ("RNDADDENTROPY", RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data),
                ("RNDRESEEDCRNG", RNDRESEEDCRNG, 0),
            ):
                try:
                    fcntl.ioctl(fd, number, argument)
                except OSError as error:
                    raise RequestFailed(f"{name} on {self.random_device} failed: {os_error_text(error)}",
                                        error.errno) from None
        finally:
            os.close(fd)

    def set_clock(self, seconds: float) -> None:
        if not self.clock_allowed:
            raise RequestFailed("setting the clock is disabled (--no-set-clock)", errno.EPERM)
        try:
            time.clock_settime(time.CLOCK_REALTIME, seconds)
        except OSError as error:
            raise RequestFailed(f"cannot set the clock: {os_error_text(error)}", error.errno) from None

    def online(self) -> Generator[None, None, dict[str, Any]]:
        """Bring hot-added CPUs and memory online; report what the guest now sees.

        A generator that yields after each sysfs write: onlining many memory
        blocks can take a while under TCG, and the loop keeps answering pings
        in between.
        """
        problems: list[str] = []
        memory = os.path.join(self.sys_dir, "devices/system/memory")
        for name in sorted(_listdir(memory)):
            state = os.path.join(memory, name, "state")
            if name.startswith("memory") and _read(state) == "offline":
                for wanted in ("online_movable", "online"):
                    try:
                        _write(state, wanted)
                        break
                    except OSError as error:
                        failure = f"{name}: {os_error_text(error)}"
                else:
                    problems.append(failure)
                yield
        cpus = os.path.join(self.sys_dir, "devices/system/cpu")
        for name in sorted(_listdir(cpus)):
            online = os.path.join(cpus, name, "online")
            if name.startswith("cpu") and name[3:].isdigit() and _read(online) == "0":
                try:
                    _write(online, "1")
                except OSError as error:
                    problems.append(f"{name}: {os_error_text(error)}")
                yield
        online_list = _read(os.path.join(cpus, "online"))
        try:
            online_cpus = count_cpu_list(online_list) if online_list else os.cpu_count() or 1
        except ValueError:
            online_cpus = os.cpu_count() or 1
        mem_total = 0
        for line in (_read(os.path.join(self.proc_dir, "meminfo")) or "").splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1])
        return {"online_cpus": online_cpus, "mem_total_kib": mem_total, "problems": problems}


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


# --- Sessions ------------------------------------------------------------------------------------


class Session:
    """One host connection on one port (or socket): frames in, frames out, streams."""

    def __init__(self, agent: Agent, fd: int, name: str, on_end: Callable[[Session], None]) -> None:
        self.agent = agent
        self.loop = agent.loop
        self.fd = fd
        self.name = name
        self.on_end = on_end
        self.reader = ap.FrameReader(hunting=True)
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.streams: dict[int, Stream] = {}
        self.waiting_outputs: set[Any] = set()
        self.alive = True
        self.generation = 0  # counts HELLOs: work started before one is dropped
        #: When the last frame was decoded: a partial frame with none since for long is stalled.
        self.last_frame = time.monotonic()
        self.stall_timer: Timer | None = None
        self.loop.add_reader(fd, self.on_readable)

    def processes(self) -> list[ProcessStream]:
        return [stream for stream in self.streams.values() if isinstance(stream, ProcessStream)]

    # Receiving.

    def on_readable(self) -> None:
        for _ in range(8):  # then let other fds have a turn
            space = self.reader.get_buffer()
            pieces = min(READ_PIECES, len(space) // PORT_READ_PIECE)
            if pieces:
                iov = [space[i * PORT_READ_PIECE:(i + 1) * PORT_READ_PIECE] for i in range(pieces)]
            else:  # cannot happen (the reader keeps half its buffer free); never read 0 bytes
                iov, pieces = [space], 1
            try:
                count = os.readv(self.fd, iov)
            except BlockingIOError:
                break
            except OSError as error:
                self.end(f"reading failed: {os_error_text(error)}")
                return
            if count == 0:
                self.end("the host closed the connection")
                return
            events = self.reader.buffer_filled(count)
            if events:
                self.last_frame = time.monotonic()
            self.handle(events)
            if not self.alive:
                return
            if count < pieces * PORT_READ_PIECE:
                break
        if self.reader.buffered and not self.reader.hunting and self.stall_timer is None:
            self.stall_timer = self.loop.call_later(STALL_TIMEOUT, self._check_stall)
        self.flush()

    def _check_stall(self) -> None:
        self.stall_timer = None
        if not self.alive or not self.reader.buffered or self.reader.hunting:
            return
        idle = time.monotonic() - self.last_frame
        if idle < STALL_TIMEOUT:
            self.stall_timer = self.loop.call_later(STALL_TIMEOUT - idle, self._check_stall)
            return
        self.handle(self.reader.rescan())
        self.flush()

    def handle(self, events: list[ap.Event]) -> None:
        for event in events:
            if not self.alive:
                return
            try:
                self.handle_event(event)
            except RequestFailed as failure:
                stream_id = getattr(event, "stream", 0)
                log(f"{self.name}: stream {stream_id}: {failure.message}")
                if isinstance(event, ap.Request):
                    reply = {"error": failure.message, "errno": failure.errno or 0}
                    self.send(ap.encode_reply(stream_id, reply))
                elif stream_id:
                    self.fail_stream(stream_id, failure.message)
            except ap.ProtocolError as error:
                log(f"{self.name}: {error}; resynchronising")
                self.send(ap.encode_error(str(error)))
                self.reader.resync()
                return
            except Exception:
                log_exception(f"{self.name}: error handling {event!r}")
                stream_id = getattr(event, "stream", 0)
                if isinstance(event, ap.Request):
                    self.send(ap.encode_reply(stream_id, {"error": "internal error in the guest agent"}))
                elif stream_id:
                    self.fail_stream(stream_id, "internal error in the guest agent")

    def handle_event(self, event: ap.Event) -> None:
        kind = type(event)
        if kind is ap.Data:
            assert isinstance(event, ap.Data)
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_data(event.channel, event.data)  # type: ignore[arg-type]
        elif kind is ap.WindowUpdate:
            assert isinstance(event, ap.WindowUpdate)
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_window(event.channel, event.increment)
        elif kind is ap.Eof:
            assert isinstance(event, ap.Eof)
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_eof(event.channel)
        elif kind is ap.Request:
            assert isinstance(event, ap.Request)
            self.request(event.stream, event.body)
        elif kind is ap.Ping:
            assert isinstance(event, ap.Ping)
            self.send(ap.encode_pong(event.payload, self.agent.system.boot_id))
        elif kind is ap.Control:
            assert isinstance(event, ap.Control)
            stream = self.streams.get(event.stream)
            if stream is not None:
                stream.on_control(event.body)
        elif kind is ap.Reset:
            assert isinstance(event, ap.Reset)
            stream = self.streams.pop(event.stream, None)
            if stream is not None:
                stream.close()
        elif kind is ap.Hello:
            assert isinstance(event, ap.Hello)
            self.hello(event)
        elif kind is ap.Garbage:
            assert isinstance(event, ap.Garbage)
            log(f"{self.name}: {event.message}; waiting for a HELLO")
            self.send(ap.encode_error(event.message))
        else:
            log(f"{self.name}: ignoring {event!r}, which only the agent sends")

    def hello(self, event: ap.Hello) -> None:
        """A new session on this connection: forget the old one, answer with the nonce."""
        if self.streams:
            log(f"{self.name}: new session; ending {len(self.streams)} streams of the previous one")
        self.reset_streams()
        self.generation += 1
        self.out.clear()  # the host discards everything before our HELLO anyway
        self.out_bytes = 0
        self.send(ap.encode_hello(event.nonce, {
            "protocol": ap.PROTOCOL_VERSION,
            "boot_id": self.agent.system.boot_id,
            "agent_version": AGENT_VERSION,
            "python": "%d.%d.%d" % sys.version_info[:3],  # noqa: UP031
            "port": self.name,
        }))

    def request(self, stream_id: int, body: dict[str, Any]) -> None:
        if stream_id in self.streams:
            raise RequestFailed(f"stream {stream_id} is already in use")
        op = body.get("op")
        system = self.agent.system
        if op == "exec":
            process = ProcessStream(self, stream_id, body)
            self.streams[stream_id] = process
            try:
                process.start()
            except BaseException:
                self.streams.pop(stream_id, None)
                raise
        elif op == "write_file" or op == "read_file":
            stream: WriteFileStream | ReadFileStream = (
                WriteFileStream(self, stream_id, body) if op == "write_file"
                else ReadFileStream(self, stream_id, body))
            self.streams[stream_id] = stream
            try:
                stream.start()
            except BaseException:
                self.streams.pop(stream_id, None)
                raise
        elif op == "mkdir":
            path = _fs_bytes(_get(body, "path", str), "path")
            mode = _get(body, "mode", int, 0o755) & 0o7777
            try:
                existed = os.path.isdir(path)
                os.makedirs(path, mode, exist_ok=True)
                if not existed:
                    os.chmod(path, mode)
            except OSError as error:
                raise RequestFailed(f"cannot make directory {path.decode('utf-8', 'replace')} in the guest: "
                                    f"{os_error_text(error)}", error.errno) from None
            self.send(ap.encode_reply(stream_id, {}))
        elif op == "entropy":
            system.add_entropy(_get(body, "data", bytes, b""))
            self.send(ap.encode_reply(stream_id, {}))
        elif op == "clock":
            seconds = _get(body, "seconds", float)
            if seconds is None:
                raise RequestFailed("bad request: seconds")
            system.set_clock(seconds)
            self.send(ap.encode_reply(stream_id, {}))
        elif op == "online":
            self.run_steps(stream_id, system.online())
        elif op == "ping":
            self.send(ap.encode_reply(stream_id, {"boot_id": system.boot_id}))
        else:
            raise RequestFailed(f"unknown request {op!r}")

    def run_steps(self, stream_id: int, steps: Generator[None, None, dict[str, Any]]) -> None:
        """Run a long request one step per loop turn; its return value is the REPLY."""
        generation = self.generation

        def step() -> None:
            if not self.alive or self.generation != generation:
                steps.close()
                return  # the session ended or was reset meanwhile
            try:
                next(steps)
            except StopIteration as done:
                self.send(ap.encode_reply(stream_id, done.value))
            except Exception:
                log_exception(f"{self.name}: stream {stream_id}")
                self.send(ap.encode_reply(stream_id, {"error": "internal error in the guest agent"}))
            else:
                self.loop.call_soon(step)
                return
            self.flush()

        step()

    def fail_stream(self, stream_id: int, message: str) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.close()
            self.send(ap.encode_end(stream_id, {"error": message}))

    # Sending.

    def send(self, frame: bytes) -> None:
        if self.alive:
            self.out.append(memoryview(frame))
            self.out_bytes += len(frame)

    def send_data(self, stream_id: int, channel: int, data: bytes) -> None:
        """A DATA frame; the header rides in the first write piece, the rest is not copied."""
        header = ap.encode_data_header(stream_id, channel, len(data))
        first = PORT_WRITE_PIECE - len(header)
        if len(data) <= first:
            self.send(header + data)
        else:
            self.send(header + data[:first])
            self.send(memoryview(data)[first:])  # type: ignore[arg-type]

    def flush(self) -> None:
        """Write what the port takes now; wait for POLLOUT for the rest."""
        if not self.alive:
            return
        while self.out:
            iov: list[memoryview] = []
            for item in self.out:
                for start in range(0, len(item), PORT_WRITE_PIECE):
                    iov.append(item[start:start + PORT_WRITE_PIECE])
                    if len(iov) == WRITE_PIECES:
                        break
                if len(iov) == WRITE_PIECES:
                    break
            try:
                written = os.writev(self.fd, iov)
            except BlockingIOError:
                break
            except OSError as error:
                self.end(f"writing failed: {os_error_text(error)}")
                return
            self.out_bytes -= written
            while written:
                item = self.out[0]
                if written >= len(item):
                    written -= len(item)
                    self.out.popleft()
                else:
                    self.out[0] = item[written:]
                    written = 0
        if self.out:
            self.loop.add_writer(self.fd, self.flush)
        else:
            self.loop.remove_writer(self.fd)
        if self.out_bytes < OUT_LIMIT and self.waiting_outputs:
            waiting, self.waiting_outputs = self.waiting_outputs, set()
            for output in waiting:
                output.update()

    # Ending.

    def reset_streams(self) -> None:
        streams, self.streams = self.streams, {}
        self.waiting_outputs.clear()
        for stream in streams.values():
            try:
                stream.close()
            except Exception:
                log_exception(f"{self.name}: closing stream {stream.id}")

    def end(self, why: str) -> None:
        """The host went away: kill the session's processes, drop its transfers."""
        if not self.alive:
            return
        log(f"{self.name}: session ended: {why}")
        self.alive = False
        self.loop.forget(self.fd)
        if self.stall_timer is not None:
            self.stall_timer.cancel()
        self.reset_streams()
        self.out.clear()
        self.out_bytes = 0
        self.on_end(self)


# --- Ports ---------------------------------------------------------------------------------------


class Port:
    """A virtio-serial port named ``vmcache.*``: one session per host connection."""

    def __init__(self, agent: Agent, name: str, path: str) -> None:
        self.agent = agent
        self.name = name
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        self.session: Session | None = None
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
        except OSError as error:
            log(f"{name}: F_SETOWN: {os_error_text(error)} (reconnections noticed by polling)")

    def host_connected(self) -> bool:
        """virtio-serial polls POLLHUP while no host end is connected."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not any(events & select.POLLHUP for _, events in poller.poll(0))

    def _set_async(self, on: bool) -> None:
        """SIGIO on connection changes, wanted only while idle (it also fires on every input)."""
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, (flags | os.O_ASYNC) if on else (flags & ~os.O_ASYNC))
        except OSError as error:
            log(f"{self.name}: O_ASYNC: {os_error_text(error)}")

    def check(self) -> None:
        if self.session is None and self.host_connected():
            self._set_async(False)
            log(f"{self.name}: host connected")
            self.session = Session(self.agent, self.fd, self.name, self._ended)

    def _ended(self, session: Session) -> None:
        self.session = None
        self._set_async(True)
        self.check()  # a host may have connected again already

    def start(self) -> None:
        self._set_async(True)
        self.check()


# --- The agent -----------------------------------------------------------------------------------


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = Loop()
        self.system = System(args.sys_dir, args.proc_dir, args.random_device, not args.no_set_clock)
        self.children: dict[int, ProcessStream] = {}
        self.ports: dict[str, Port] = {}
        self.sessions = 0
        self.exit_status: int | None = None
        self._setup_signals()

    def _setup_signals(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_fd = read_end
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for number in (signal.SIGCHLD, signal.SIGIO, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, self._on_signal_handler)
        self.loop.add_reader(read_end, self._on_signals)

    def _on_signal_handler(self, number: int, frame: Any) -> None:
        """The wakeup fd does the work; this only keeps Python from acting on the signal."""

    def _on_signals(self) -> None:
        try:
            numbers = set(os.read(self._signal_fd, 4096))
        except BlockingIOError:
            return
        if signal.SIGCHLD in numbers:
            self.reap()
        if signal.SIGIO in numbers:
            self.check_ports()
        if not self.args.init and numbers & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}:
            log("stopping on a signal")
            self.stop(0)

    def reap(self) -> None:
        """Collect every exited child, ours or orphans (as PID 1 or a subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self.children.pop(pid, None)
            if process is not None:
                try:
                    process.exited(os.waitstatus_to_exitcode(status))
                except Exception:
                    log_exception(f"handling the exit of pid {pid}")

    # Ports.

    def serve_ports(self) -> None:
        self.scan_ports()
        self._port_timer()

    def scan_ports(self) -> None:
        for entry in sorted(_listdir(self.args.port_dir)):
            name = _read(os.path.join(self.args.port_dir, entry, "name"))
            if not name or not name.startswith("vmcache.") or name in self.ports:
                continue
            path = os.path.join(self.args.dev_dir, entry)
            try:
                port = Port(self, name, path)
            except OSError as error:
                log(f"cannot open port {name} ({path}): {os_error_text(error)}")
                continue
            self.ports[name] = port
            log(f"serving {name} on {path}")
            port.start()

    def check_ports(self) -> None:
        for port in self.ports.values():
            try:
                port.check()
            except Exception:
                log_exception(f"checking port {port.name}")

    def _port_timer(self) -> None:
        self.scan_ports()  # ports may appear late (modules loading, hotplug)
        self.check_ports()
        self.loop.call_later(PORT_RECHECK, self._port_timer)

    # One socket.

    def serve_fd(self, fd: int) -> None:
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)

        def ended(session: Session) -> None:
            os.close(fd)
            self.stop(0)

        Session(self, fd, f"fd {fd}", ended)

    def stop(self, status: int) -> None:
        self.exit_status = status
        self.loop.running = False

    def run(self) -> int:
        while self.loop.running:
            try:
                self.loop.run_once()
            except Exception:
                if not self.args.init:
                    raise
                log_exception("error in the main loop (PID 1 carries on)")
                time.sleep(0.1)
        self._wait_for_children(1.0)
        return self.exit_status or 0

    def _wait_for_children(self, limit: float) -> None:
        """Before exiting (not as PID 1): reap the processes the sessions killed."""
        deadline = time.monotonic() + limit
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)


def become_subreaper() -> None:
    """Not PID 1: adopt orphaned grandchildren, so that they are reaped too (if ctypes is there)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="vmcache guest agent")
    parser.add_argument("--init", action="store_true", help="run as PID 1: reap every process, never exit")
    parser.add_argument("--fd", type=int, help="serve this one connected socket, then exit")
    parser.add_argument("--port-dir", default="/sys/class/virtio-ports", help="where port names are")
    parser.add_argument("--dev-dir", default="/dev", help="where port devices are")
    parser.add_argument("--sys-dir", default="/sys", help="sysfs (for online)")
    parser.add_argument("--proc-dir", default="/proc", help="procfs (boot id, meminfo)")
    parser.add_argument("--random-device", default="/dev/urandom", help="target of the entropy ioctls")
    parser.add_argument("--no-set-clock", action="store_true", help="refuse clock requests (tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.umask(0o022)
    if args.init and os.getpid() != 1:
        log("--init but not PID 1: orphans are not ours to reap")
    if os.getpid() != 1:
        become_subreaper()
    agent = Agent(args)
    log(f"version {AGENT_VERSION}, Python {sys.version.split()[0]}, boot id {agent.system.boot_id}")
    if args.fd is not None:
        agent.serve_fd(args.fd)
    else:
        agent.serve_ports()
    while True:
        try:
            return agent.run()
        except Exception:
            log_exception("the agent failed")
            if not args.init:
                return 1


if __name__ == "__main__":
    sys.exit(main())
