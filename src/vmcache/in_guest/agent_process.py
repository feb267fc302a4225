"""Processes the host runs in the guest: pipes or a pty, stdin and output under credit."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
import subprocess
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmcache import agent_protocol as ap
    from vmcache.in_guest import agent_base as base
    from vmcache.in_guest.vmcache_agent import Session, Timer
else:
    import agent_base as base
    import agent_protocol as ap

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
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: Pipe size asked for stdin/stdout (fewer wake-ups per MB).
PIPE_SIZE = 1024 * 1024
#: Credit the agent grants for a process's stdin.
STDIN_WINDOW = 2 * 1024 * 1024
#: At most this many processes at once per session.
MAX_PROCESSES = 64
OPEN = ap.ChannelState.OPEN


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
    return 126, f"vmcache: cannot run in the guest: {argv0}: {base.os_error_text(error)}"


class OutputPipe:
    """A process's stdout or stderr (or a pty master), read only while the host granted credit."""

    def __init__(self, process: ProcessStream, channel: int, fd: int) -> None:
        self.process = process
        self.session = process.session
        self.channel = channel
        self.fd = fd
        self.open = True
        self.armed = False
        base.set_nonblocking(fd)

    def update(self) -> None:
        credit = self.session.credit(self.process.id, self.channel)
        want = self.open and credit > 0 and self.session.out_bytes < base.OUT_LIMIT
        if want and not self.armed:
            self.session.loop.add_reader(self.fd, self.on_readable)
            self.session.waiting_outputs.discard(self)
        elif not want and self.armed:
            self.session.loop.remove_reader(self.fd)
        if not want and self.open and credit > 0:
            self.session.waiting_outputs.add(self)  # waits for the send queue to drain
        self.armed = want

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, min(self.session.credit(self.process.id, self.channel), ap.CHUNK))
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno != errno.EIO:  # EIO: a pty whose other side is all closed
                base.log(f"reading the output of {self.process.argv0}: {base.os_error_text(error)}")
            data = b""
        if not data:
            self.close(send_eof=True)
            self.process.check_finished()
            return
        self.session.send_data(self.process.id, self.channel, data)
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
            self.session.send(ap.Eof(self.process.id, self.channel))


class ProcessStream(base.Stream):
    """A command the host asked for (a checked :class:`ExecRequest`): its pipes or pty, its exit,
    its timeout."""

    def __init__(self, session: Session, request: ap.ExecRequest) -> None:
        super().__init__(session, request.stream)
        self.argv = [base.fs_bytes(arg) for arg in request.argv]
        self.argv0 = self.argv[0].decode("utf-8", "replace")
        self.env = {**DEFAULT_ENV, "TERM": PTY_TERM if request.pty is not None else PIPE_TERM, **request.env}
        self.cwd = base.fs_bytes(request.cwd) if request.cwd is not None else None
        self.pty = request.pty
        self.timeout = request.timeout
        self.want_stdout = request.stdout
        self.want_stderr = request.stderr and self.pty is None
        self.pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.timed_out = False
        self.outputs: dict[int, OutputPipe] = {}
        self.stdin_fd: int | None = None
        self.stdin_pending: deque[memoryview] = deque()
        self.stdin_eof = False
        self.timer: Timer | None = None

    def start(self) -> None:
        if self.cwd is not None and not os.path.isdir(self.cwd):
            shown = base.shown(self.cwd)
            try:
                os.stat(self.cwd)
                raise base.RequestFailed(f"the working directory is not a directory in the guest: {shown}",
                                         errno.ENOTDIR)
            except OSError as error:
                raise base.RequestFailed.from_os(
                    f"the working directory does not exist in the guest: {shown}", error) from None
        if sum(isinstance(stream, ProcessStream) for stream in self.session.streams.values()) > MAX_PROCESSES:
            raise base.RequestFailed(f"too many processes in this session (at most {MAX_PROCESSES})")
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
            raise base.RequestFailed.from_os(f"cannot set up {self.argv0}'s pipes in the guest",
                                             error) from None
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
        self.stdin_fd = own_fds[0]
        if self.pty is not None:
            self.outputs[ap.STDOUT] = OutputPipe(self, ap.STDOUT, own_fds[0])
        else:
            base.set_nonblocking(self.stdin_fd)
            outputs = iter(own_fds[1:])
            for channel, wanted in ((ap.STDOUT, self.want_stdout), (ap.STDERR, self.want_stderr)):
                if wanted:
                    self.outputs[channel] = OutputPipe(self, channel, next(outputs))
        if self.timeout is not None:
            self.timer = self.session.loop.call_later(self.timeout, self._on_timeout)
        self.session.send(ap.ExecReply(self.id, self.pid, STDIN_WINDOW))
        self._end_unused_outputs()
        for output in self.outputs.values():
            output.update()

    def _end_unused_outputs(self) -> None:
        """An output channel the host opened that no pipe feeds (a pty has no stderr; a command that
        could not start has no output at all) ends at once."""
        for channel in (ap.STDOUT, ap.STDERR):
            if channel not in self.outputs and self.session.conn.channel_state(self.id, channel) is OPEN:
                self.session.send(ap.Eof(self.id, channel))

    def _spawn_failed(self, error: OSError) -> None:
        """Answer like a process that printed one line on stderr and exited 127 or 126."""
        status, line = spawn_failure_line(self.argv0, error)
        session = self.session
        session.send(ap.ExecReply(self.id, 0, STDIN_WINDOW))
        channel = ap.STDOUT if self.pty is not None else ap.STDERR
        data = (line + ("\r\n" if self.pty is not None else "\n")).encode("utf-8", "replace")
        if len(data) <= session.credit(self.id, channel):
            session.send_data(self.id, channel, data)
        self._end_unused_outputs()
        self.returncode = status
        session.send(ap.ProcessEnd(self.id, status, False))
        self.finish()

    def _on_timeout(self) -> None:
        self.timer = None
        if self.returncode is None:
            self.timed_out = True
            self.signal_group(signal.SIGKILL)

    def on_signal(self, event: ap.Signal) -> None:
        self.signal_group(event.signal)

    def signal_group(self, number: int) -> None:
        if self.pid and self.returncode is None:
            try:
                os.killpg(self.pid, number)
            except ProcessLookupError:
                pass
            except PermissionError:  # the group leader is gone and its id is someone else's
                pass

    # Host -> process.

    def on_data(self, event: ap.Data) -> None:
        data = event.data
        if self.stdin_fd is None or self.stdin_eof:
            self.session.consumed(self.id, ap.STDIN, len(data))  # the process is gone or closed stdin
            return
        written = 0
        if not self.stdin_pending:
            written = self._write_stdin(data)
            if written < 0:
                return
            self.session.consumed(self.id, ap.STDIN, written)
        if written < len(data):
            self.stdin_pending.append(memoryview(data)[written:])
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
            self.session.consumed(self.id, ap.STDIN, written)
            if written < len(chunk):
                self.stdin_pending[0] = chunk[written:]
                return
            self.stdin_pending.popleft()
        if self.stdin_fd is not None:
            self.session.loop.remove_writer(self.stdin_fd)
            if self.stdin_eof:
                self._close_stdin()

    def _stdin_broken(self) -> None:
        """The process does not read stdin any more: tell the host (EOF on channel 0)."""
        self.stdin_pending.clear()
        self._close_stdin()
        self.stdin_eof = True
        if self.session.conn.channel_state(self.id, ap.STDIN) is OPEN:
            self.session.send(ap.Eof(self.id, ap.STDIN))

    def on_eof(self, event: ap.Eof) -> None:
        if self.stdin_eof:
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

    def on_window(self, event: ap.WindowUpdate) -> None:
        output = self.outputs.get(event.channel)
        if output is not None:
            output.update()

    def on_resize(self, event: ap.Resize) -> None:
        output = self.outputs.get(ap.STDOUT)
        if self.pty is not None and output is not None and output.open:
            set_window_size(output.fd, event.rows, event.cols)

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
        self.session.send(ap.ProcessEnd(self.id, returncode, self.timed_out))
        self.check_finished()

    def check_finished(self) -> None:
        """Once END and every output's EOF went, the connection closed the stream: so do we."""
        if self.session.conn.stream_state(self.id) is ap.StreamState.CLOSED:
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
