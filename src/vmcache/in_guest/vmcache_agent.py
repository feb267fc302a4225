"""vmcache guest agent: runs commands and moves files for the host, over virtio-serial.

Started in the guest as PID 1 after switch_root::

    /usr/bin/python3 -E -s /run/vmcache/agent/vmcache_agent.py --init

It serves every virtio-serial port whose name starts with ``vmcache.``
(``vmcache.control``, ``vmcache.agent.0`` ...), one independent session per
port, all in one single-threaded event loop (epoll). ``--fd N`` serves one
already-connected socket instead (the host tests run the agent that way) and
exits when it closes.

This file is the driver: the loop, the ports, and per session a guest
``agent_protocol.Connection`` (which checks every frame and field, and each
stream's state) whose events go to handlers by type. Next to it:
``agent_process.py`` (processes and ptys), ``agent_files.py`` (file transfers),
``agent_tcp.py`` (TCP connections to guest ports, for port forwarding),
``agent_base.py`` (what they share) and ``agent_protocol.py``. Only modules
that Debian's ``python3-minimal`` ships are used (no json, no termios, no
ctypes needed), and the code runs on any Python >= 3.9;
``docs/agent-protocol.md`` describes the requests and their answers.

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
import struct
import sys
import time
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from vmcache import agent_protocol as ap
    from vmcache.in_guest import agent_base as base
    from vmcache.in_guest import agent_files as files
    from vmcache.in_guest import agent_process as process
    from vmcache.in_guest import agent_tcp as tcp
else:
    try:
        import agent_protocol as ap
    except ImportError:  # run from a source checkout: src/vmcache/agent_protocol.py
        sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import agent_protocol as ap
    import agent_base as base
    import agent_files as files
    import agent_process as process
    import agent_tcp as tcp

PR_SET_CHILD_SUBREAPER = 36
#: How often disconnected ports are checked, besides SIGIO.
PORT_RECHECK = 2.0
#: A virtio-serial port takes at most 32 KiB per write(); writev with pieces that size.
PORT_WRITE_PIECE = 32 * 1024
#: A virtio-serial read returns one 4 KiB guest buffer at most; readv with pieces that size.
PORT_READ_PIECE = 4096
READ_PIECES = 64
WRITE_PIECES = 64
#: A frame still incomplete this long after the last complete one is given up (Connection.rescan).
STALL_TIMEOUT = 2.0
INTERNAL_ERROR = "internal error in the guest agent"


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
            base.log(f"epoll on fd {fd}: {base.os_error_text(error)}")

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
            base.log_exception("error in the event loop (carrying on)")

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


# --- Requests about the guest as a whole: entropy, the clock, hot-added CPUs and memory ------


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


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
            base.log(f"no boot id: {base.os_error_text(error)}")
            self.boot_id = "unknown"

    def add_entropy(self, request: ap.EntropyRequest) -> None:
        """Credit the request's bytes to the kernel's pool (RNDADDENTROPY), then reseed the CRNG."""
        data = request.data
        try:
            fd = os.open(self.random_device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as error:
            raise base.RequestFailed.from_os(f"cannot open {self.random_device}", error) from None
        try:
            for name, number, argument in (
                ("RNDADDENTROPY", RNDADDENTROPY, struct.pack("ii", len(data) * 8, len(data)) + data),
                ("RNDRESEEDCRNG", RNDRESEEDCRNG, 0),
            ):
                try:
                    fcntl.ioctl(fd, number, argument)
                except OSError as error:
                    what = f"{name} on {self.random_device} failed"
                    raise base.RequestFailed.from_os(what, error) from None
        finally:
            os.close(fd)

    def set_clock(self, request: ap.ClockRequest) -> None:
        if not self.clock_allowed:
            raise base.RequestFailed("setting the clock is disabled (--no-set-clock)", errno.EPERM)
        try:
            time.clock_settime(time.CLOCK_REALTIME, request.seconds)
        except OSError as error:
            raise base.RequestFailed.from_os("cannot set the clock", error) from None

    def online(self) -> Generator[None, None, tuple[int, int, list[str]]]:
        """Bring hot-added CPUs and memory online; return what the guest now sees (online CPUs,
        MemTotal in KiB) and what could not be onlined.

        A generator that yields after each sysfs write: onlining many memory
        blocks can take a while under TCG, and the loop keeps answering pings
        in between.
        """
        problems: list[str] = []
        memory = os.path.join(self.sys_dir, "devices/system/memory")
        for name in sorted(listdir(memory)):
            state = os.path.join(memory, name, "state")
            if name.startswith("memory") and read_text(state) == "offline":
                for wanted in ("online_movable", "online"):
                    try:
                        write_text(state, wanted)
                        break
                    except OSError as error:
                        failure = f"{name}: {base.os_error_text(error)}"
                else:
                    problems.append(failure)
                yield
        cpus = os.path.join(self.sys_dir, "devices/system/cpu")
        for name in sorted(listdir(cpus)):
            online = os.path.join(cpus, name, "online")
            if name.startswith("cpu") and name[3:].isdigit() and read_text(online) == "0":
                try:
                    write_text(online, "1")
                except OSError as error:
                    problems.append(f"{name}: {base.os_error_text(error)}")
                yield
        online_list = read_text(os.path.join(cpus, "online"))
        try:
            online_cpus = count_cpu_list(online_list) if online_list else os.cpu_count() or 1
        except ValueError:
            online_cpus = os.cpu_count() or 1
        mem_total = 0
        for line in (read_text(os.path.join(self.proc_dir, "meminfo")) or "").splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1])
        return online_cpus, mem_total, problems


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def read_text(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def write_text(path: str, text: str) -> None:
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
        self.conn = ap.Connection(ap.Role.GUEST)
        buffer = memoryview(bytearray(READ_PIECES * PORT_READ_PIECE))
        self._read_buffer = buffer
        self._read_pieces = [buffer[i:i + PORT_READ_PIECE] for i in range(0, len(buffer), PORT_READ_PIECE)]
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.streams: dict[int, base.Stream] = {}
        self.waiting_outputs: set[Any] = set()
        self.alive = True
        self.generation = 0  # counts HELLOs: work started before one is dropped
        #: When the last event came: a partial frame with none since for long is stalled.
        self.last_event = time.monotonic()
        self.stall_timer: Timer | None = None
        self.loop.add_reader(fd, self.on_readable)

    # Receiving.

    def on_readable(self) -> None:
        for _ in range(8):  # then let other fds have a turn
            try:
                count = os.readv(self.fd, self._read_pieces)
            except BlockingIOError:
                break
            except OSError as error:
                self.end(f"reading failed: {base.os_error_text(error)}")
                return
            if count == 0:
                self.end("the host closed the connection")
                return
            self.conn.receive_data(self._read_buffer[:count])
            self.handle_events()
            if not self.alive:
                return
            if count < len(self._read_buffer):
                break
        if self.conn.buffered and not self.conn.hunting and self.stall_timer is None:
            self.stall_timer = self.loop.call_later(STALL_TIMEOUT, self._check_stall)

    def _check_stall(self) -> None:
        self.stall_timer = None
        if not self.alive or not self.conn.buffered or self.conn.hunting:
            return
        idle = time.monotonic() - self.last_event
        if idle < STALL_TIMEOUT:
            self.stall_timer = self.loop.call_later(STALL_TIMEOUT - idle, self._check_stall)
            return
        garbage = self.conn.rescan()
        if garbage is not None:
            self.handle(garbage)
        self.handle_events()

    def handle_events(self) -> None:
        while self.alive:
            event = self.conn.next_event()
            if event is None:
                return
            self.last_event = time.monotonic()
            self.handle(event)

    def handle(self, event: ap.Event) -> None:
        """Run the event's handler; a failure becomes the stream's error, never the agent's end."""
        request = REQUESTS.get(type(event))
        try:
            if request is not None:
                request(self, event)
            else:
                EVENTS[type(event)](self, event)
        except base.RequestFailed as failure:
            self._failed(event, request is not None, failure)
        except Exception:
            base.log_exception(f"{self.name}: error handling {event!r}")
            self._failed(event, request is not None, base.RequestFailed(INTERNAL_ERROR))

    def _failed(self, event: ap.Event, request: bool, failure: base.RequestFailed) -> None:
        stream_id: int = getattr(event, "stream", 0)
        base.log(f"{self.name}: stream {stream_id}: {failure.message}")
        if request and self.conn.stream_state(stream_id) in REQUESTED:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream.close()
            self.send(ap.ErrorReply(stream_id, failure.message, failure.errno or 0))
        else:  # a running stream, or a request that had its REPLY already
            self.fail_stream(stream_id, failure)

    # Events, one handler each (the connection checked their fields and their streams' states).

    def on_hello(self, event: ap.Hello) -> None:
        """A new session on this connection: forget the old one, answer with the nonce."""
        if self.streams:
            base.log(f"{self.name}: new session; ending {len(self.streams)} streams of the previous one")
        self.reset_streams()
        self.generation += 1
        self.out.clear()  # the host discards everything before our HELLO anyway
        self.out_bytes = 0
        self.send(ap.Hello(event.nonce, {
            "protocol": ap.PROTOCOL_VERSION,
            "boot_id": self.agent.system.boot_id,
            "agent_version": base.AGENT_VERSION,
            "python": "%d.%d.%d" % sys.version_info[:3],  # noqa: UP031
            "port": self.name,
        }))

    def on_ping(self, event: ap.Ping) -> None:
        self.send(ap.Pong(event.payload, self.agent.system.boot_id))

    def on_garbage(self, event: ap.Garbage) -> None:
        base.log(f"{self.name}: {event.message}; waiting for a HELLO")
        self.send(ap.ErrorNotice(event.message))

    def on_stream_event(self, event: ap.Data | ap.Eof | ap.WindowUpdate | ap.Signal | ap.Resize) -> None:
        """To the stream's handler (gone already if our side finished it first)."""
        handler = getattr(self.streams.get(event.stream), STREAM_EVENTS[type(event)], None)
        if handler is not None:
            handler(event)

    def on_reset(self, event: ap.Reset) -> None:
        stream = self.streams.pop(event.stream, None)
        if stream is not None:
            stream.close()

    # Requests.

    def on_stream_request(self, request: ap.ExecRequest | ap.WriteFileRequest | ap.ReadFileRequest
                          | ap.ConnectRequest) -> None:
        """A request that opens a stream: a process, a file transfer, a TCP connection."""
        stream = STREAM_REQUESTS[type(request)](self, request)
        self.streams[stream.id] = stream
        try:
            stream.start()
        except BaseException:
            self.streams.pop(stream.id, None)
            stream.close()
            raise

    def on_call(self, request: ap.MkdirRequest | ap.EntropyRequest | ap.ClockRequest) -> None:
        """A request done at once, answered with DoneReply (or an error)."""
        system = self.agent.system
        calls: dict[type[ap.Event], Callable[[Any], None]] = {
            ap.MkdirRequest: files.mkdir, ap.EntropyRequest: system.add_entropy,
            ap.ClockRequest: system.set_clock}
        calls[type(request)](request)
        self.send(ap.DoneReply(request.stream))

    def on_status(self, request: ap.StatusRequest) -> None:
        self.send(ap.StatusReply(request.stream, self.agent.system.boot_id))

    def on_bad_request(self, request: ap.BadRequest) -> None:
        raise base.RequestFailed(request.message)

    def on_online(self, request: ap.OnlineRequest) -> None:
        """Onlining runs one step per loop turn (the loop keeps serving meanwhile)."""
        steps = self.agent.system.online()
        generation = self.generation

        def step() -> None:
            if not self.alive or self.generation != generation:
                steps.close()
                return  # the session ended or was reset meanwhile
            try:
                next(steps)
            except StopIteration as done:
                cpus, memory, problems = done.value
                # What fits in the host's limit on an answer (MAX_ANSWER): 100 lines of 200 characters.
                problems = [problem[:200] for problem in problems[:100]]
                self.send(ap.OnlineReply(request.stream, cpus, memory, problems))
            except Exception:
                base.log_exception(f"{self.name}: stream {request.stream}")
                self.send(ap.ErrorReply(request.stream, INTERNAL_ERROR))
            else:
                self.loop.call_soon(step)

        step()

    def fail_stream(self, stream_id: int, failure: base.RequestFailed) -> None:
        """Give up on a running stream: release it and tell the host (END with the error)."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.close()
        if self.conn.stream_state(stream_id) in RUNNING:
            self.send(ap.ErrorEnd(stream_id, failure.message, failure.errno or 0))

    # Sending.

    def send(self, event: ap.Event) -> None:
        if self.alive:
            self._queue(self.conn.send(event))

    def _queue(self, frame: bytes | memoryview) -> None:
        """Whatever a handler or a timer queues goes out at the end of this loop turn."""
        if not self.out:  # else a flush is due already, or waits for the port (POLLOUT)
            self.loop.call_soon(self.flush)
        self.out.append(memoryview(frame))
        self.out_bytes += len(frame)

    def credit(self, stream_id: int, channel: int) -> int:
        """How many bytes the host lets us send on the channel now."""
        return self.conn.send_credit(stream_id, channel)

    def consumed(self, stream_id: int, channel: int, count: int) -> None:
        """``count`` bytes the host sent went where they belong: grant them back (batched)."""
        if count and self.alive:
            frame = self.conn.consumed(stream_id, channel, count)
            if frame:
                self._queue(frame)

    def send_data(self, stream_id: int, channel: int, data: bytes) -> None:
        """A DATA frame; the header rides in the first write piece, the rest is not copied."""
        if not self.alive:
            return
        header = self.conn.send_data_header(stream_id, channel, len(data))
        first = PORT_WRITE_PIECE - len(header)
        if len(data) <= first:
            self._queue(header + data)
        else:
            self._queue(header + data[:first])
            self._queue(memoryview(data)[first:])

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
                self.end(f"writing failed: {base.os_error_text(error)}")
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
        if self.out_bytes < base.OUT_LIMIT and self.waiting_outputs:
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
                base.log_exception(f"{self.name}: closing stream {stream.id}")

    def end(self, why: str) -> None:
        """The host went away: kill the session's processes, drop its transfers."""
        if not self.alive:
            return
        base.log(f"{self.name}: session ended: {why}")
        self.alive = False
        self.loop.forget(self.fd)
        if self.stall_timer is not None:
            self.stall_timer.cancel()
        self.reset_streams()
        self.out.clear()
        self.out_bytes = 0
        self.on_end(self)


#: The states in which a stream still waits for its REPLY, and those in which it may get an END.
REQUESTED = frozenset(state for state in ap.StreamState if state.name.endswith("_REQUESTED"))
RUNNING = frozenset((ap.StreamState.RUNNING, ap.StreamState.WRITING, ap.StreamState.READING,
                     ap.StreamState.CONNECTED))

#: Each request the connection hands over, and its handler (a failure is an ErrorReply).
REQUESTS: dict[type[ap.Event], Callable[[Session, Any], None]] = {
    **{kind: Session.on_stream_request
       for kind in (ap.ExecRequest, ap.WriteFileRequest, ap.ReadFileRequest, ap.ConnectRequest)},
    **{kind: Session.on_call for kind in (ap.MkdirRequest, ap.EntropyRequest, ap.ClockRequest)},
    ap.OnlineRequest: Session.on_online,
    ap.StatusRequest: Session.on_status,
    ap.BadRequest: Session.on_bad_request,
}
#: Every other event a host sends, and its handler (a failure ends the stream with an error).
EVENTS: dict[type[ap.Event], Callable[[Session, Any], None]] = {
    ap.Hello: Session.on_hello,
    ap.Ping: Session.on_ping,
    ap.Garbage: Session.on_garbage,
    ap.Reset: Session.on_reset,
    **{kind: Session.on_stream_event for kind in (ap.Data, ap.Eof, ap.WindowUpdate, ap.Signal, ap.Resize)},
}
#: The requests that open a stream, and the stream's class.
STREAM_REQUESTS = {ap.ExecRequest: process.ProcessStream, ap.WriteFileRequest: files.WriteFileStream,
                   ap.ReadFileRequest: files.ReadFileStream, ap.ConnectRequest: tcp.TcpStream}
#: The events a stream takes, and the name of its method for each.
STREAM_EVENTS = {ap.Data: "on_data", ap.Eof: "on_eof", ap.WindowUpdate: "on_window", ap.Signal: "on_signal",
                 ap.Resize: "on_resize"}


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
            base.log(f"{name}: F_SETOWN: {base.os_error_text(error)} (reconnections noticed by polling)")

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
            base.log(f"{self.name}: O_ASYNC: {base.os_error_text(error)}")

    def check(self) -> None:
        if self.session is None and self.host_connected():
            self._set_async(False)
            base.log(f"{self.name}: host connected")
            self.session = Session(self.agent, self.fd, self.name, self._ended)

    def _ended(self, ended: Session) -> None:
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
        self.children: dict[int, process.ProcessStream] = {}
        self.ports: dict[str, Port] = {}
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
            base.log("stopping on a signal")
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
            child = self.children.pop(pid, None)
            if child is not None:
                try:
                    child.exited(os.waitstatus_to_exitcode(status))
                except Exception:
                    base.log_exception(f"handling the exit of pid {pid}")

    # Ports.

    def scan_ports(self) -> None:
        for entry in sorted(listdir(self.args.port_dir)):
            name = read_text(os.path.join(self.args.port_dir, entry, "name"))
            if not name or not name.startswith("vmcache.") or name in self.ports:
                continue
            path = os.path.join(self.args.dev_dir, entry)
            try:
                port = Port(self, name, path)
            except OSError as error:
                base.log(f"cannot open port {name} ({path}): {base.os_error_text(error)}")
                continue
            self.ports[name] = port
            base.log(f"serving {name} on {path}")
            port.start()

    def check_ports(self) -> None:
        for port in self.ports.values():
            try:
                port.check()
            except Exception:
                base.log_exception(f"checking port {port.name}")

    def port_timer(self) -> None:
        """Serve the ports there are now, and look again every PORT_RECHECK seconds."""
        self.scan_ports()  # ports may appear late (modules loading, hotplug)
        self.check_ports()
        self.loop.call_later(PORT_RECHECK, self.port_timer)

    # One socket.

    def serve_fd(self, fd: int) -> None:
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)

        def ended(_: Session) -> None:
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
                base.log_exception("error in the main loop (PID 1 carries on)")
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
        base.log("--init but not PID 1: orphans are not ours to reap")
    if os.getpid() != 1:
        become_subreaper()
    if args.init:
        try:
            if tcp.bring_up_loopback():
                base.log("brought the loopback interface up")
        except OSError as error:
            base.log(f"cannot bring the loopback interface up: {base.os_error_text(error)}")
    agent = Agent(args)
    base.log(f"version {base.AGENT_VERSION}, Python {sys.version.split()[0]}, boot id {agent.system.boot_id}")
    if args.fd is not None:
        agent.serve_fd(args.fd)
    else:
        agent.port_timer()
    while True:
        try:
            return agent.run()
        except Exception:
            base.log_exception("the agent failed")
            if not args.init:
                return 1


if __name__ == "__main__":
    sys.exit(main())
