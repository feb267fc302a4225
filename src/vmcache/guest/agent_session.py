"""One host connection: frames in, frames out, each request to its handler."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from vmcache import agent_protocol as ap
    from vmcache.guest import agent_files as files
    from vmcache.guest import agent_loop as base
    from vmcache.guest import agent_process as process
    from vmcache.guest.vmcache_agent import Agent
else:
    import agent_files as files
    import agent_loop as base
    import agent_process as process
    import agent_protocol as ap

#: A virtio-serial port takes at most 32 KiB per write(); writev with pieces that size.
PORT_WRITE_PIECE = 32 * 1024
#: A virtio-serial read returns one 4 KiB guest buffer at most; readv with pieces that size.
PORT_READ_PIECE = 4096
READ_PIECES = 64
WRITE_PIECES = 64
#: A frame still incomplete this long after the last complete one is given up (FrameReader.rescan).
STALL_TIMEOUT = 2.0
#: How often disconnected ports are checked, besides SIGIO.


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
        self.streams: dict[int, base.Stream] = {}
        self.waiting_outputs: set[Any] = set()
        self.alive = True
        self.generation = 0  # counts HELLOs: work started before one is dropped
        #: When the last frame was decoded: a partial frame with none since for long is stalled.
        self.last_frame = time.monotonic()
        self.stall_timer: base.Timer | None = None
        self.loop.add_reader(fd, self.on_readable)

    def processes(self) -> list[process.ProcessStream]:
        return [stream for stream in self.streams.values() if isinstance(stream, process.ProcessStream)]

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
                self.end(f"reading failed: {base.os_error_text(error)}")
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
            except base.RequestFailed as failure:
                stream_id = getattr(event, "stream", 0)
                base.log(f"{self.name}: stream {stream_id}: {failure.message}")
                if isinstance(event, ap.Request):
                    reply = {"error": failure.message, "errno": failure.errno or 0}
                    self.send(ap.encode_reply(stream_id, reply))
                elif stream_id:
                    self.fail_stream(stream_id, failure.message)
            except ap.ProtocolError as error:
                base.log(f"{self.name}: {error}; resynchronising")
                self.send(ap.encode_error(str(error)))
                self.reader.resync()
                return
            except Exception:
                base.log_exception(f"{self.name}: error handling {event!r}")
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
            base.log(f"{self.name}: {event.message}; waiting for a HELLO")
            self.send(ap.encode_error(event.message))
        else:
            base.log(f"{self.name}: ignoring {event!r}, which only the agent sends")

    def hello(self, event: ap.Hello) -> None:
        """A new session on this connection: forget the old one, answer with the nonce."""
        if self.streams:
            base.log(f"{self.name}: new session; ending {len(self.streams)} streams of the previous one")
        self.reset_streams()
        self.generation += 1
        self.out.clear()  # the host discards everything before our HELLO anyway
        self.out_bytes = 0
        self.send(ap.encode_hello(event.nonce, {
            "protocol": ap.PROTOCOL_VERSION,
            "boot_id": self.agent.system.boot_id,
            "agent_version": base.AGENT_VERSION,
            "python": "%d.%d.%d" % sys.version_info[:3],  # noqa: UP031
            "port": self.name,
        }))

    def request(self, stream_id: int, body: dict[str, Any]) -> None:
        if stream_id in self.streams:
            raise base.RequestFailed(f"stream {stream_id} is already in use")
        op = body.get("op")
        system = self.agent.system
        if op == "exec":
            started = process.ProcessStream(self, stream_id, body)
            self.streams[stream_id] = started
            try:
                started.start()
            except BaseException:
                self.streams.pop(stream_id, None)
                raise
        elif op == "write_file" or op == "read_file":
            stream: files.WriteFileStream | files.ReadFileStream = (
                files.WriteFileStream(self, stream_id, body) if op == "write_file"
                else files.ReadFileStream(self, stream_id, body))
            self.streams[stream_id] = stream
            try:
                stream.start()
            except BaseException:
                self.streams.pop(stream_id, None)
                raise
        elif op == "mkdir":
            path = base._fs_bytes(base._get(body, "path", str), "path")
            mode = base._get(body, "mode", int, 0o755) & 0o7777
            try:
                existed = os.path.isdir(path)
                os.makedirs(path, mode, exist_ok=True)
                if not existed:
                    os.chmod(path, mode)
            except OSError as error:
                raise base.RequestFailed(
                    f"cannot make directory {path.decode('utf-8', 'replace')} in the guest: "
                    f"{base.os_error_text(error)}", error.errno) from None
            self.send(ap.encode_reply(stream_id, {}))
        elif op == "entropy":
            system.add_entropy(base._get(body, "data", bytes, b""))
            self.send(ap.encode_reply(stream_id, {}))
        elif op == "clock":
            seconds = base._get(body, "seconds", float)
            if seconds is None:
                raise base.RequestFailed("bad request: seconds")
            system.set_clock(seconds)
            self.send(ap.encode_reply(stream_id, {}))
        elif op == "online":
            self.run_steps(stream_id, system.online())
        elif op == "ping":
            self.send(ap.encode_reply(stream_id, {"boot_id": system.boot_id}))
        else:
            raise base.RequestFailed(f"unknown request {op!r}")

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
                base.log_exception(f"{self.name}: stream {stream_id}")
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
