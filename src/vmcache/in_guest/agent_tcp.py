"""TCP connections the host opens to ports inside the guest (port forwarding), under credit.

A :class:`TcpStream` is one ``connect`` request: a non-blocking connect (bounded by the
request's timeout), then bytes both ways as the protocol's credit allows, and each
direction closed on its own (the host's EOF is ``shutdown(SHUT_WR)`` once its bytes are
written; the socket's EOF is an EOF to the host). It works with no network device at
all: the guest's loopback is enough.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmcache import agent_protocol as ap
    from vmcache.in_guest import agent_base as base
    from vmcache.in_guest.vmcache_agent import Session, Timer
else:
    import agent_base as base
    import agent_protocol as ap

#: Credit the agent grants for the bytes the host sends to a connection.
TCP_WINDOW = 1024 * 1024
#: At most this many connections at once per session.
MAX_CONNECTIONS = 64
OPEN = ap.ChannelState.OPEN
#: Linux's interface flag ioctls and ``struct ifreq`` (a 16-byte name, then a 24-byte union).
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = struct.Struct("16sh22x")


def bring_up_loopback() -> bool:
    """Set ``lo`` up (the kernel then gives it 127.0.0.1 and ::1), as an init system would: the
    agent is PID 1 and nothing else does it, and connections to the guest's own ports need it.
    True if it was down. Raises OSError if it cannot."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        flags = IFREQ.unpack(fcntl.ioctl(probe.fileno(), SIOCGIFFLAGS, IFREQ.pack(b"lo", 0)))[1]
        if flags & IFF_UP:
            return False
        fcntl.ioctl(probe.fileno(), SIOCSIFFLAGS, IFREQ.pack(b"lo", flags | IFF_UP))
        return True


def connect_failure(host: str, port: int, number: int) -> base.RequestFailed:
    """The error for a connect that failed with ``number`` (errno)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if number == errno.ECONNREFUSED:
        return base.RequestFailed(f"nothing listens on {where} in the guest (connection refused)", number)
    return base.RequestFailed(f"cannot connect to {where} in the guest: {os.strerror(number)}", number)


class TcpStream(base.Stream):
    """A checked :class:`ConnectRequest`: its socket, the host's bytes not yet written to it,
    and which directions are done."""

    def __init__(self, session: Session, request: ap.ConnectRequest) -> None:
        super().__init__(session, request.stream)
        self.host = request.host
        self.port = request.port
        self.timeout = request.timeout
        self.sock: socket.socket | None = None
        self.fd = -1
        self.timer: Timer | None = None
        self.connected = False
        self.armed = False  # reading the socket
        self.read_done = False  # its EOF went to the host
        self.write_done = False  # the host's EOF was passed on (SHUT_WR), or the socket stopped taking bytes
        self.eof_received = False
        self.pending: deque[memoryview] = deque()
        self.received = 0  # from the host, written to the socket
        self.sent = 0  # read from the socket, sent to the host

    def start(self) -> None:
        if sum(isinstance(stream, TcpStream) for stream in self.session.streams.values()) > MAX_CONNECTIONS:
            raise base.RequestFailed(f"too many connections in this session (at most {MAX_CONNECTIONS})",
                                     errno.EMFILE)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as error:
            raise base.RequestFailed.from_os("cannot make a socket in the guest", error) from None
        self.fd = self.sock.fileno()
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        number = self.sock.connect_ex((self.host, self.port))
        if number == 0:
            self._connected()
        elif number in (errno.EINPROGRESS, errno.EAGAIN):
            self.session.loop.add_writer(self.fd, self._on_connect)
            self.timer = self.session.loop.call_later(self.timeout, self._on_connect_timeout)
        else:
            raise connect_failure(self.host, self.port, number)

    def _on_connect(self) -> None:
        assert self.sock is not None
        self.session.loop.remove_writer(self.fd)
        number = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if number:
            self._refuse(connect_failure(self.host, self.port, number))
        else:
            self._connected()

    def _on_connect_timeout(self) -> None:
        self.timer = None
        if not self.connected:
            where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            self._refuse(base.RequestFailed(f"connecting to {where} in the guest timed out after "
                                            f"{self.timeout:g} s", errno.ETIMEDOUT))

    def _refuse(self, failure: base.RequestFailed) -> None:
        """A connect that failed after the request was taken: the REPLY is the error."""
        session = self.session
        if session.streams.get(self.id) is not self:
            return
        session.streams.pop(self.id, None)
        self.close()
        base.log(f"{session.name}: stream {self.id}: {failure.message}")
        session.send(ap.ErrorReply(self.id, failure.message, failure.errno or 0))

    def _connected(self) -> None:
        self.connected = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.session.send(ap.ConnectReply(self.id, TCP_WINDOW))
        self.update()

    # Socket -> host.

    def update(self) -> None:
        """Read the socket only while the host granted credit and the port's queue is short."""
        session = self.session
        if self.sock is None or not self.connected:
            return
        credit = session.credit(self.id, ap.STDOUT)
        want = not self.read_done and credit > 0 and session.out_bytes < base.OUT_LIMIT
        if want and not self.armed:
            session.loop.add_reader(self.fd, self.on_readable)
            session.waiting_outputs.discard(self)
        elif not want and self.armed:
            session.loop.remove_reader(self.fd)
        if not want and not self.read_done and credit > 0:
            session.waiting_outputs.add(self)  # waits for the send queue to drain
        self.armed = want

    def on_readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(min(self.session.credit(self.id, ap.STDOUT), ap.CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            what = f"the connection to port {self.port} in the guest broke"
            self.session.fail_stream(self.id, base.RequestFailed.from_os(what, error))
            return
        if not data:
            self.read_done = True
            self.update()
            self.session.waiting_outputs.discard(self)
            self.session.send(ap.Eof(self.id, ap.STDOUT))
            self._check_finished()
            return
        self.sent += len(data)
        self.session.send_data(self.id, ap.STDOUT, data)
        self.update()

    def on_window(self, event: ap.WindowUpdate) -> None:
        self.update()

    # Host -> socket.

    def on_data(self, event: ap.Data) -> None:
        data = event.data
        if self.write_done or self.eof_received:
            self.session.consumed(self.id, ap.STDIN, len(data))
            return
        written = 0
        if not self.pending:
            written = self._write(data)
            if written < 0:
                return
            self.session.consumed(self.id, ap.STDIN, written)
        if written < len(data):
            self.pending.append(memoryview(data)[written:])
            self.session.loop.add_writer(self.fd, self._on_writable)

    def _write(self, data: memoryview | bytes) -> int:
        """Write what the socket takes now; -1 if it takes no more (reset, or shut for reading)."""
        assert self.sock is not None
        try:
            count = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:  # EPIPE, ECONNRESET: the peer is gone
            self._write_broken()
            return -1
        self.received += count
        return count

    def _on_writable(self) -> None:
        while self.pending and not self.write_done:
            chunk = self.pending[0]
            written = self._write(chunk)
            if written < 0:
                return
            self.session.consumed(self.id, ap.STDIN, written)
            if written < len(chunk):
                self.pending[0] = chunk[written:]
                return
            self.pending.popleft()
        self.session.loop.remove_writer(self.fd)
        if self.eof_received:
            self._shut_write()

    def _write_broken(self) -> None:
        """The socket takes no more bytes: tell the host (EOF on channel 0, "stop")."""
        self.pending.clear()
        self.session.loop.remove_writer(self.fd)
        self.write_done = True
        if self.session.conn.channel_state(self.id, ap.STDIN) is OPEN:
            self.session.send(ap.Eof(self.id, ap.STDIN))
        self._check_finished()

    def on_eof(self, event: ap.Eof) -> None:
        if self.eof_received:
            return
        self.eof_received = True
        if not self.pending:
            self._shut_write()

    def _shut_write(self) -> None:
        if self.write_done or self.sock is None:
            return
        self.write_done = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # not connected any more: the read side says how it ended
        self._check_finished()

    def _check_finished(self) -> None:
        """Both directions done: close the socket and end the stream."""
        if self.read_done and self.write_done and self.session.streams.get(self.id) is self:
            self.close()
            self.session.send(ap.ConnectEnd(self.id, self.received, self.sent))
            self.finish()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.clear()
        self.session.waiting_outputs.discard(self)
        if self.sock is not None:
            self.session.loop.forget(self.fd)
            self.sock.close()
            self.sock = None
