"""The host side of the guest agent: one :class:`AgentConnection` per virtio-serial port.

The connection runs no background task: users call ``await vm.run([...])`` on
long-lived objects without a nursery of their own. Instead it *pulls*:
whichever task is waiting for something reads from the socket and dispatches
the frames to per-stream buffers; a ``_progress`` event, replaced after each
read, wakes the other waiters to recheck their condition. If the reading task
is cancelled, another waiter takes over. Sends are serialised by a lock, and
shielded (a frame is never cut in half) but bounded in time.

Every wait is bounded: while a call waits and the agent has sent nothing for
:data:`IDLE_PING` seconds, a PING goes out; no answer within
:data:`PONG_TIMEOUT` more fails every call in flight. An EOF or a broken
socket fails them at once. Everything raised is an :class:`AgentError` (or
a subclass), except trio's own stream errors on a process's stdin/stdout
(``BrokenResourceError`` when the process closed its stdin, as trio does).

The wire protocol is :mod:`vmcache.agent_protocol` (``docs/agent-protocol.md``).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import trio

from . import agent_protocol as ap
from .errors import AgentError, AgentProtocolError, GuestProcessError, GuestRequestError, printable

log = logging.getLogger("vmcache.agent")

#: A call that has heard nothing from the agent for this long sends a PING ...
IDLE_PING = 1.0
#: ... and fails every call in flight if no answer comes within this much more.
PONG_TIMEOUT = 1.0
#: A frame the socket does not take within this long breaks the connection.
SEND_TIMEOUT = 5.0
#: How long leaving ``open_process`` waits for a killed process to be reported gone.
KILL_TIMEOUT = 5.0
#: HELLO is sent again (new nonce) after this long without a reply, doubling up to the max.
HELLO_RETRY_FIRST = 0.5
HELLO_RETRY_MAX = 4.0
#: Read size from the socket.
RECEIVE_SIZE = 1 << 20
#: Credit granted to the guest per output channel.
OUTPUT_WINDOW = ap.DEFAULT_WINDOW


@attrs.frozen
class PtySize:
    """A terminal size, for a process run on a pty."""

    rows: int = 24
    cols: int = 80


@attrs.frozen
class GuestResources:
    """What the guest sees after :meth:`AgentConnection.online_resources`."""

    online_cpus: int
    mem_total_kib: int


@attrs.frozen
class CompletedProcess:
    """The result of :meth:`AgentConnection.run`, like :class:`subprocess.CompletedProcess`.

    ``returncode`` is negative when a signal ended the process (-9 for SIGKILL);
    ``timed_out`` says the guest killed it because its ``timeout`` passed.
    """

    args: list[str | bytes]
    returncode: int
    stdout: bytes | None
    stderr: bytes | None
    timed_out: bool = False

    def check_returncode(self) -> None:
        """Raise :class:`GuestProcessError` if the command failed."""
        if self.returncode != 0:
            raise GuestProcessError(self.args, self.returncode, self.stdout, self.stderr, self.timed_out)


class _Inbound:
    """Bytes the guest sent on one channel, waiting for their consumer."""

    __slots__ = ("chunks", "discard", "eof", "window")

    def __init__(self, window: int) -> None:
        self.chunks: deque[bytes] = deque()
        self.window = ap.ReceiveWindow(window)
        self.eof = False
        self.discard = False


class _Stream:
    """The host's record of one stream: the guest's answers as they arrive."""

    def __init__(self, stream_id: int, inbound: Sequence[int]) -> None:
        self.id = stream_id
        self.reply: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.inbound = {channel: _Inbound(OUTPUT_WINDOW) for channel in inbound}
        self.credit: ap.SendCredit | None = None  # for channel 0, once the reply came
        self.stdin_broken = False  # the guest said EOF on channel 0: nobody reads it
        self.forgotten = False


class AgentConnection:
    """One session with the guest agent over one ``trio.abc.Stream`` (a port's socket).

    Make one with :meth:`start`. Many calls may run at once from many tasks
    (processes, transfers): each is a stream of the protocol.
    """

    def __init__(self, stream: trio.abc.Stream, reader: ap.FrameReader, hello: ap.Hello) -> None:
        self._stream = stream
        self._reader = reader
        #: The guest kernel's boot id, and what the agent said about itself.
        self.boot_id: str = printable(str(hello.info.get("boot_id", "")))
        self.agent_version: str = str(hello.info.get("agent_version", ""))
        self.info: dict[str, Any] = dict(hello.info)
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._send_lock = trio.Lock()
        self._progress = trio.Event()
        self._reading_task: trio.lowlevel.Task | None = None  # the task reading for everyone
        self._failure: tuple[type[AgentError], str] | None = None
        self._last_receive = trio.current_time()
        self._ping_sent: float | None = None
        self._ping_payload = b""
        self._pongs: dict[bytes, str | None] = {}
        self._pending_frames: list[bytes] = []

    # --- Starting ---------------------------------------------------------------------------------

    @classmethod
    async def start(cls, stream: trio.abc.Stream, *, timeout: float) -> AgentConnection:
        """Say HELLO and wait (at most ``timeout`` s) for the agent's answer to it.

        Everything the stream holds before that answer is discarded: stale
        bytes of a previous client, replies to older HELLOs. The HELLO is
        repeated (with a new nonce) while no answer comes, in case the agent
        was still reading an old client's half-sent frame.
        """
        nonce = [b""]
        reader = ap.FrameReader(hunting=True, accept_hello=lambda hello: hello.nonce == nonce[0])
        hello: ap.Hello | None = None
        leftover: list[ap.Event] = []
        with trio.move_on_after(timeout):
            retry = HELLO_RETRY_FIRST
            while hello is None:
                nonce[0] = os.urandom(ap.NONCE_SIZE)
                await _send_or_fail(stream, ap.encode_hello(nonce[0], {"protocol": ap.PROTOCOL_VERSION}))
                with trio.move_on_after(retry):
                    while hello is None:
                        data = await _receive_or_fail(stream)
                        events = reader.feed(data)
                        for index, event in enumerate(events):
                            if isinstance(event, ap.Hello):
                                hello, leftover = event, events[index + 1:]
                                break
                retry = min(retry * 2, HELLO_RETRY_MAX)
        if hello is None:
            raise AgentError(f"the guest agent did not answer HELLO within {timeout:g} s")
        if hello.info.get("protocol") != ap.PROTOCOL_VERSION:
            raise AgentProtocolError(
                f"the guest agent speaks protocol {hello.info.get('protocol')!r}, "
                f"vmcache speaks {ap.PROTOCOL_VERSION}: rebuild the guest image")
        connection = cls(stream, reader, hello)
        for event in leftover:
            connection._dispatch(event)
        return connection

    # --- The pull machinery -----------------------------------------------------------------------

    def _check(self) -> None:
        if self._failure is not None:
            kind, message = self._failure
            raise kind(message)

    def _fail(self, kind: type[AgentError], message: str) -> None:
        if self._failure is None:
            self._failure = (kind, message)
        self._progress.set()

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Return once ``ready()``; meanwhile read and dispatch frames, or let another task do it.

        Always a checkpoint (as trio's own streams are), even when ``ready()`` already holds.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if ready():
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while not ready():
            self._check()
            if self._reading_task is not None:
                await self._progress.wait()
            else:
                await self._read_round()

    async def _read_round(self) -> None:
        """One read from the socket (or one liveness step), then wake everyone to recheck."""
        self._reading_task = trio.lowlevel.current_task()
        try:
            now = trio.current_time()
            if self._ping_sent is None:
                # The silence that counts is the one while someone waits.
                self._last_receive = max(self._last_receive, now - IDLE_PING / 2)
                deadline = self._last_receive + IDLE_PING
            else:
                deadline = self._ping_sent + PONG_TIMEOUT
            data: bytes | bytearray = b""
            with trio.move_on_at(deadline):
                try:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self._fail(AgentError, f"the connection to the guest agent broke: {error}")
                    return
                if not data:
                    self._fail(AgentError, "the guest agent's connection closed")
                    return
            if not data:
                await self._on_silence()
                return
            self._last_receive = trio.current_time()
            self._ping_sent = None
            for event in self._reader.feed(data):
                self._dispatch(event)
            if self._pending_frames:
                frames, self._pending_frames = self._pending_frames, []
                await self._send(b"".join(frames))
        finally:
            self._reading_task = None
            self._progress.set()
            self._progress = trio.Event()

    async def _on_silence(self) -> None:
        if self._ping_sent is None:
            self._ping_payload = os.urandom(8)
            self._ping_sent = trio.current_time()
            await self._send(ap.encode_ping(self._ping_payload))
        elif trio.current_time() >= self._ping_sent + PONG_TIMEOUT:
            self._fail(AgentError, f"the guest agent stopped answering (no reply to a ping within "
                                   f"{IDLE_PING + PONG_TIMEOUT:g} s)")

    def _dispatch(self, event: ap.Event) -> None:
        try:
            self._dispatch_event(event)
        except ap.ProtocolError as error:
            self._fail(AgentProtocolError, f"the guest agent broke the protocol: {error}")

    def _dispatch_event(self, event: ap.Event) -> None:
        if isinstance(event, ap.Data):
            stream = self._streams.get(event.stream)
            inbound = stream.inbound.get(event.channel) if stream is not None else None
            if inbound is None:
                return  # a stream we gave up on
            inbound.window.received(len(event.data))
            if inbound.discard:
                self._consumed(event.stream, event.channel, inbound, len(event.data))
            else:
                inbound.chunks.append(bytes(event.data))
        elif isinstance(event, ap.Eof):
            stream = self._streams.get(event.stream)
            if stream is None:
                return
            if event.channel == ap.STDIN:
                stream.stdin_broken = True
            elif event.channel in stream.inbound:
                stream.inbound[event.channel].eof = True
        elif isinstance(event, ap.WindowUpdate):
            stream = self._streams.get(event.stream)
            if stream is not None and stream.credit is not None and event.channel == ap.STDIN:
                stream.credit.grant(event.increment)
        elif isinstance(event, ap.Reply):
            stream = self._streams.get(event.stream)
            if stream is not None:
                stream.reply = event.body
                window = event.body.get("window")
                if isinstance(window, int) and 0 < window <= ap.MAX_WINDOW:
                    stream.credit = ap.SendCredit(window)
        elif isinstance(event, ap.End):
            stream = self._streams.get(event.stream)
            if stream is not None:
                stream.end = event.body
        elif isinstance(event, ap.Pong):
            if event.payload in self._pongs:
                self._pongs[event.payload] = printable(event.boot_id)
        elif isinstance(event, ap.Hello):
            pass  # an answer to an earlier HELLO of ours
        elif isinstance(event, ap.ErrorNotice):
            self._fail(AgentProtocolError, f"the guest agent received garbage and dropped the session: "
                                           f"{printable(event.message)}")
        elif isinstance(event, ap.Garbage):
            self._fail(AgentProtocolError, f"the guest agent sent {printable(event.message)}")
        else:
            self._fail(AgentProtocolError, f"the guest agent sent {type(event).__name__}, a host's frame")

    def _consumed(self, stream_id: int, channel: int, inbound: _Inbound, count: int) -> bytes:
        """The consumer took ``count`` bytes; returns a WINDOW frame to send, if one is due."""
        increment = inbound.window.consumed(count)
        if not increment:
            return b""
        frame = ap.encode_window(stream_id, channel, increment)
        if inbound.discard:
            self._pending_frames.append(frame)
        return frame

    async def _send(self, data: bytes) -> None:
        """Write whole frames: shielded (never half a frame) and bounded by SEND_TIMEOUT."""
        self._check()
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT) as scope:
            async with self._send_lock:
                self._check()
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
                    self._fail(AgentError, f"the connection to the guest agent broke: {error}")
        if scope.cancelled_caught:
            self._fail(AgentError, f"the guest agent did not take {len(data)} bytes "
                                   f"within {SEND_TIMEOUT:g} s")
        self._check()

    # --- Streams ----------------------------------------------------------------------------------

    async def _request(
        self, body: dict[str, Any], inbound: Sequence[int] = (), *, close_stdin: bool = False,
    ) -> tuple[_Stream, dict[str, Any]]:
        """Open a stream with a REQUEST; return it and the guest's REPLY (GuestRequestError if refused).

        ``close_stdin`` sends the stdin EOF in the same write (a command run with no input).
        """
        stream = _Stream(self._next_id, inbound)
        self._next_id += 1
        self._streams[stream.id] = stream
        frames = ap.encode_request(stream.id, body)
        if close_stdin:
            frames += ap.encode_eof(stream.id, ap.STDIN)
        try:
            await self._send(frames)
            await self._wait_for(lambda: stream.reply is not None)
        except BaseException:
            await self._abandon(stream)
            raise
        reply = stream.reply
        assert reply is not None
        if "error" in reply:
            self._forget(stream)
            raise GuestRequestError(printable(str(reply["error"])), reply.get("errno") or None)
        return stream, reply

    async def _abandon(self, stream: _Stream) -> None:
        """Tell the guest to drop a stream we give up on (kill its process); shielded, bounded."""
        self._forget(stream)
        if self._failure is None:
            with trio.CancelScope(shield=True):
                try:
                    await self._send(ap.encode_reset(stream.id))
                except AgentError:
                    pass

    def _forget(self, stream: _Stream) -> None:
        stream.forgotten = True
        self._streams.pop(stream.id, None)

    async def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        stream, reply = await self._request(body)
        self._forget(stream)
        return reply

    async def _take(self, stream: _Stream, channel: int, max_bytes: int | None) -> bytes:
        """Next bytes on an output channel (b"" at its end), granting credit back."""
        inbound = stream.inbound[channel]
        await self._wait_for(lambda: bool(inbound.chunks) or inbound.eof or stream.forgotten
                             or (stream.end is not None and "error" in stream.end))
        if not inbound.chunks:
            _raise_stream_error(stream)
            if stream.forgotten and not inbound.eof:
                raise trio.ClosedResourceError("the guest stream was closed")
            return b""
        chunk = inbound.chunks[0]
        if max_bytes is not None and max_bytes < len(chunk):
            inbound.chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        else:
            inbound.chunks.popleft()
        frame = self._consumed(stream.id, channel, inbound, len(chunk))
        if frame and not stream.forgotten:
            await self._send(frame)
        return chunk

    async def _give(self, stream: _Stream, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on channel 0 as the guest's credit allows."""
        view = memoryview(data).cast("B")
        while view:
            await self._wait_for(lambda: _stdin_ready(stream))
            _raise_stream_error(stream)
            if stream.stdin_broken or stream.end is not None or stream.forgotten or stream.credit is None:
                raise trio.BrokenResourceError("the guest process does not read its stdin any more")
            count = min(len(view), stream.credit.available, ap.CHUNK)
            stream.credit.take(count)
            await self._send(ap.encode_data_header(stream.id, ap.STDIN, count) + view[:count])
            view = view[count:]

    # --- Requests ---------------------------------------------------------------------------------

    async def ping(self) -> str:
        """Check that the agent answers; returns the guest's boot id."""
        payload = os.urandom(8)
        self._pongs[payload] = None
        try:
            await self._send(ap.encode_ping(payload))
            await self._wait_for(lambda: self._pongs[payload] is not None)
            return self._pongs[payload] or ""
        finally:
            del self._pongs[payload]

    async def add_entropy(self, data: bytes | None = None) -> None:
        """Credit host randomness (64 fresh bytes by default) to the guest's pool and reseed its CRNG."""
        await self._call({"op": "entropy", "data": os.urandom(64) if data is None else bytes(data)})

    async def set_clock(self, unix_seconds: float | None = None) -> None:
        """Set the guest's clock (CLOCK_REALTIME), to the host's by default."""
        seconds = time.time() if unix_seconds is None else float(unix_seconds)
        await self._call({"op": "clock", "seconds": seconds})

    async def online_resources(self) -> GuestResources:
        """Online hot-added CPUs and memory; return what the guest then sees."""
        reply = await self._call({"op": "online"})
        for problem in reply.get("problems", []):
            log.warning("the guest could not online %s", problem)
        return GuestResources(online_cpus=int(reply.get("online_cpus", 0)),
                              mem_total_kib=int(reply.get("mem_total_kib", 0)))

    async def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """``mkdir -p`` in the guest; ``mode`` applies to the last directory if it is made."""
        await self._call({"op": "mkdir", "path": _absolute(path), "mode": mode})

    # --- Processes --------------------------------------------------------------------------------

    def open_process(
        self,
        argv: Sequence[str | bytes],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        pty: PtySize | None = None,
        timeout: float | None = None,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
    ) -> AbstractAsyncContextManager[GuestProcess]:
        """Start ``argv`` in the guest (no shell); the block's end kills it if it still runs.

        ``env`` is added to the guest's default environment (PATH, HOME, LANG,
        TERM); ``timeout`` makes the guest kill the process group after that
        many seconds. With ``pty``, the process gets a terminal of that size
        as its controlling terminal, and ``stdout`` carries everything it
        prints (``stderr`` is None; ``capture_stdout`` is then ignored). Without ``capture_stdout`` /
        ``capture_stderr``, that output goes to /dev/null in the guest.
        """
        args = list(argv)
        body = _exec_body(args, env, cwd, pty, timeout, capture_stdout, capture_stderr)
        return _ProcessContext(self, args, body)

    async def _start_process(self, args: list[str | bytes], body: dict[str, Any],
                             close_stdin: bool = False) -> GuestProcess:
        wanted = ((ap.STDOUT, body["stdout"]), (ap.STDERR, body["stderr"]))
        inbound = [channel for channel, want in wanted if want]
        stream, reply = await self._request(body, inbound, close_stdin=close_stdin)
        return GuestProcess(self, stream, args, int(reply.get("pid", 0)), stdin_closed=close_stdin)

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
    ) -> CompletedProcess:
        """Run ``argv`` to its end, like :func:`trio.run_process`; feeds ``stdin``, collects output.

        Output not captured goes to /dev/null in the guest (``stdout``/``stderr``
        are then None). ``check=True`` raises :class:`GuestProcessError` for a
        non-zero status. Cancelling kills the guest process.
        """
        context = self.open_process(argv, env=env, cwd=cwd, timeout=timeout,
                                    capture_stdout=capture_stdout, capture_stderr=capture_stderr)
        assert isinstance(context, _ProcessContext)
        context.close_stdin = not stdin
        async with context as process:
            stream = process._stream
            collected = {channel: bytearray() for channel in stream.inbound}
            pending = memoryview(stdin).cast("B")
            stdin_open = bool(stdin)
            # One task does it all (no nursery, so no exception groups): drain output,
            # feed stdin as credit comes, until the exit and every output's EOF.
            while True:
                for channel, inbound in stream.inbound.items():
                    while inbound.chunks:
                        chunk = inbound.chunks.popleft()
                        collected[channel] += chunk
                        frame = self._consumed(stream.id, channel, inbound, len(chunk))
                        if frame:
                            await self._send(frame)
                if stdin_open and (stream.stdin_broken or stream.end is not None):
                    stdin_open = False
                elif stdin_open and pending and stream.credit is not None and stream.credit.available > 0:
                    count = min(len(pending), stream.credit.available, ap.CHUNK)
                    stream.credit.take(count)
                    await self._send(ap.encode_data_header(stream.id, ap.STDIN, count) + pending[:count])
                    pending = pending[count:]
                    continue
                elif stdin_open and not pending:
                    stdin_open = False
                    await self._send(ap.encode_eof(stream.id, ap.STDIN))
                    continue
                if _finished(stream):
                    break

                def progress(stdin_open: bool = stdin_open) -> bool:
                    if any(inbound.chunks for inbound in stream.inbound.values()):
                        return True
                    if stdin_open and (stream.stdin_broken or stream.end is not None or (
                            stream.credit is not None and stream.credit.available > 0)):
                        return True
                    return _finished(stream)

                await self._wait_for(progress)
            _raise_stream_error(stream)
            returncode = process.returncode
            assert returncode is not None
        result = CompletedProcess(
            args=list(argv), returncode=returncode,
            stdout=bytes(collected[ap.STDOUT]) if ap.STDOUT in collected else None,
            stderr=bytes(collected[ap.STDERR]) if ap.STDERR in collected else None,
            timed_out=process.timed_out,
        )
        if check:
            result.check_returncode()
        return result

    # --- Files ------------------------------------------------------------------------------------

    async def write_file(
        self,
        path: str,
        data: bytes | bytearray | memoryview | trio.abc.ReceiveStream | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
    ) -> int:
        """Write a file in the guest (missing parent directories are made); returns its size.

        The guest writes a temporary name and renames it into place at the
        end, so the file never exists half-written under its name. ``data``
        is bytes, a stream, or an async iterable of bytes, of any size.
        """
        stream, _ = await self._request({"op": "write_file", "path": _absolute(path), "mode": mode})
        try:
            async for chunk in _chunks(data):
                await self._give(stream, chunk)
            await self._send(ap.encode_eof(stream.id, ap.STDIN))
            await self._wait_for(lambda: stream.end is not None)
        except BaseException:
            await self._abandon(stream)
            raise
        self._forget(stream)
        _raise_stream_error(stream)
        assert stream.end is not None
        return int(stream.end.get("size", 0))

    def open_file(self, path: str) -> AbstractAsyncContextManager[GuestFile]:
        """Read a guest file as a stream: ``async with conn.open_file(p) as f: await f.receive_some()``."""
        return _FileContext(self, _absolute(path))

    async def read_file(self, path: str) -> bytes:
        """A whole guest file's bytes."""
        async with self.open_file(path) as file:
            chunks = []
            while chunk := await file.receive_some():
                chunks.append(chunk)
        return b"".join(chunks)

    # --- Closing ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection; the guest ends the session (and kills its processes)."""
        self._fail(AgentError, "the connection to the guest agent was closed")
        await self._stream.aclose()


class GuestProcess:
    """A process running in the guest (see :meth:`AgentConnection.open_process`).

    Shaped like :class:`trio.Process`: ``stdin`` is a ``trio.abc.SendStream``
    (closing it is EOF in the guest), ``stdout``/``stderr`` are
    ``trio.abc.ReceiveStream`` (None when not captured), ``returncode`` is
    None while it runs and negative for a signal. ``pid`` is the guest pid
    (0 when the command could not start: status 127 or 126, one line on stderr).
    """

    def __init__(
        self, connection: AgentConnection, stream: _Stream, args: list[str | bytes], pid: int,
        *, stdin_closed: bool = False,
    ) -> None:
        self._connection = connection
        self._stream = stream
        self.args = args
        self.pid = pid
        self.stdin: trio.abc.SendStream | None = _StdinStream(connection, stream, closed=stdin_closed)
        self.stdout: trio.abc.ReceiveStream | None = (
            _OutputStream(connection, stream, ap.STDOUT) if ap.STDOUT in stream.inbound else None)
        self.stderr: trio.abc.ReceiveStream | None = (
            _OutputStream(connection, stream, ap.STDERR) if ap.STDERR in stream.inbound else None)

    @property
    def returncode(self) -> int | None:
        end = self._stream.end
        if end is None:
            return None
        if "error" in end:
            return -signal.SIGKILL
        return int(end.get("returncode", -1))

    @property
    def timed_out(self) -> bool:
        """The guest killed the process because its timeout passed."""
        return bool(self._stream.end and self._stream.end.get("timed_out"))

    async def wait(self) -> int:
        """Wait for the process to exit; returns its returncode."""
        await self._connection._wait_for(lambda: self._stream.end is not None)
        _raise_stream_error(self._stream)
        returncode = self.returncode
        assert returncode is not None
        return returncode

    async def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process's group (it has a session of its own)."""
        if self.returncode is None and not self._stream.forgotten:
            frame = ap.encode_control(self._stream.id, {"op": "signal", "signal": int(sig)})
            await self._connection._send(frame)

    async def kill(self) -> None:
        await self.send_signal(signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the pty (the process gets SIGWINCH); no effect without one."""
        if self.returncode is None and not self._stream.forgotten:
            await self._connection._send(
                ap.encode_control(self._stream.id, {"op": "resize", "rows": int(rows), "cols": int(cols)}))

    async def aclose(self) -> None:
        """Kill the process if it still runs and wait for it: shielded, at most KILL_TIMEOUT s."""
        connection = self._connection
        with trio.CancelScope(shield=True):
            with trio.move_on_after(KILL_TIMEOUT):
                try:
                    if self.returncode is None and self.pid:
                        await self.kill()
                        await self.wait()
                except AgentError:
                    pass  # the connection is gone: the guest ends the session, killing the process
            if self._stream.end is None or any(not inbound.eof for inbound in self._stream.inbound.values()):
                await connection._abandon(self._stream)
            else:
                connection._forget(self._stream)

    def __repr__(self) -> str:
        return f"<GuestProcess pid={self.pid} args={self.args!r} returncode={self.returncode}>"


class _ProcessContext(AbstractAsyncContextManager[GuestProcess]):
    def __init__(self, connection: AgentConnection, args: list[str | bytes], body: dict[str, Any]) -> None:
        self._connection = connection
        self._args = args
        self._body = body
        self._process: GuestProcess | None = None
        self.close_stdin = False

    async def __aenter__(self) -> GuestProcess:
        self._process = await self._connection._start_process(self._args, self._body, self.close_stdin)
        return self._process

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._process is not None:
            await self._process.aclose()


class _OutputStream(trio.abc.ReceiveStream):
    """A guest process's stdout or stderr."""

    def __init__(self, connection: AgentConnection, stream: _Stream, channel: int) -> None:
        self._connection = connection
        self._stream = stream
        self._channel = channel
        self._busy = False
        self._closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("this output stream was closed")
        if self._busy:
            raise trio.BusyResourceError("another task is already receiving from this stream")
        self._busy = True
        try:
            return await self._connection._take(self._stream, self._channel, max_bytes)
        finally:
            self._busy = False

    async def aclose(self) -> None:
        """Stop receiving: what the process prints from now on is dropped (it does not block)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        inbound = self._stream.inbound[self._channel]
        inbound.discard = True
        connection = self._connection
        frames = b""
        while inbound.chunks:
            count = len(inbound.chunks.popleft())
            frames += connection._consumed(self._stream.id, self._channel, inbound, count)
        if frames and not self._stream.forgotten and connection._failure is None:
            with trio.CancelScope(shield=True):
                try:
                    await connection._send(frames)
                except AgentError:
                    pass
        await trio.lowlevel.checkpoint()


class _StdinStream(trio.abc.SendStream):
    """A guest process's stdin; closing it is EOF in the guest."""

    def __init__(self, connection: AgentConnection, stream: _Stream, *, closed: bool = False) -> None:
        self._connection = connection
        self._stream = stream
        self._busy = False
        self._closed = closed  # run() with no input sent the EOF with the request

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stdin was closed")
        if self._busy:
            raise trio.BusyResourceError("another task is already sending to stdin")
        self._busy = True
        try:
            await self._connection._give(self._stream, data)
        finally:
            self._busy = False

    async def wait_send_all_might_not_block(self) -> None:
        stream = self._stream
        await self._connection._wait_for(lambda: _stdin_ready(stream))

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        stream = self._stream
        if not (stream.stdin_broken or stream.end is not None or stream.forgotten):
            with trio.CancelScope(shield=True):
                try:
                    await self._connection._send(ap.encode_eof(stream.id, ap.STDIN))
                except AgentError:
                    pass
        await trio.lowlevel.checkpoint()


class GuestFile(trio.abc.ReceiveStream):
    """A guest file being read (see :meth:`AgentConnection.open_file`): its bytes, ``mode`` and ``size``."""

    def __init__(self, connection: AgentConnection, stream: _Stream, mode: int, size: int) -> None:
        self._connection = connection
        self._stream = stream
        #: Permission bits, and the size when it was opened (0 for most /proc files).
        self.mode = mode
        self.size = size
        self._busy = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._stream.forgotten:
            raise trio.ClosedResourceError("this file was closed")
        if self._busy:
            raise trio.BusyResourceError("another task is already receiving from this file")
        self._busy = True
        try:
            return await self._connection._take(self._stream, ap.STDOUT, max_bytes)
        finally:
            self._busy = False

    async def aclose(self) -> None:
        stream = self._stream
        if stream.forgotten:
            await trio.lowlevel.checkpoint()
        elif stream.end is None:
            await self._connection._abandon(stream)
        else:
            self._connection._forget(stream)
            await trio.lowlevel.checkpoint()


class _FileContext(AbstractAsyncContextManager[GuestFile]):
    def __init__(self, connection: AgentConnection, path: str) -> None:
        self._connection = connection
        self._path = path
        self._file: GuestFile | None = None

    async def __aenter__(self) -> GuestFile:
        stream, reply = await self._connection._request(
            {"op": "read_file", "path": self._path, "window": OUTPUT_WINDOW}, [ap.STDOUT])
        self._file = GuestFile(self._connection, stream, int(reply.get("mode", 0)), int(reply.get("size", 0)))
        return self._file

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._file is not None:
            await self._file.aclose()


def _finished(stream: _Stream) -> bool:
    """The guest is done with a process stream: exited and every output at EOF, or failed."""
    end = stream.end
    return end is not None and ("error" in end or all(inbound.eof for inbound in stream.inbound.values()))


def _raise_stream_error(stream: _Stream) -> None:
    """A stream the agent gave up on (an internal error there) is an error here."""
    if stream.end is not None and "error" in stream.end:
        raise GuestRequestError(printable(str(stream.end["error"])), stream.end.get("errno") or None)


def _stdin_ready(stream: _Stream) -> bool:
    """Channel 0 of ``stream`` can take bytes now, or never will."""
    return (stream.stdin_broken or stream.end is not None or stream.forgotten
            or (stream.credit is not None and stream.credit.available > 0))


def _absolute(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise AgentError(f"a guest path must be absolute (and without NUL): {path!r}")
    return path


def _exec_body(args: list[str | bytes], env: Mapping[str, str] | None, cwd: str | None, pty: PtySize | None,
               timeout: float | None, capture_stdout: bool, capture_stderr: bool) -> dict[str, Any]:
    if not args:
        raise AgentError("argv must name a command")
    for arg in args:
        if (b"\0" if isinstance(arg, bytes) else "\0") in arg:  # type: ignore[operator]
            raise AgentError(f"a command argument cannot contain a NUL byte: {arg!r}")
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise AgentError(f"bad environment variable for the guest: {key!r}")
    if cwd is not None and ("\0" in cwd or not cwd):
        raise AgentError(f"bad working directory for the guest: {cwd!r}")
    if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
        raise AgentError(f"bad timeout: {timeout!r}")
    return {
        "op": "exec",
        "argv": args,
        "env": dict(env or {}),
        "cwd": cwd,
        "pty": [pty.rows, pty.cols] if pty is not None else None,
        "timeout": float(timeout) if timeout is not None else None,
        "stdout": capture_stdout or pty is not None,  # a pty's output must be read anyway
        "stderr": capture_stderr and pty is None,
        "window": OUTPUT_WINDOW,
    }


async def _chunks(
    data: bytes | bytearray | memoryview | trio.abc.ReceiveStream | AsyncIterable[bytes],
) -> AsyncIterable[bytes | memoryview]:
    """``data`` as pieces of at most one chunk."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), ap.CHUNK):
            yield view[start:start + ap.CHUNK]
            await trio.lowlevel.checkpoint()
    elif isinstance(data, trio.abc.ReceiveStream):
        while chunk := await data.receive_some(ap.CHUNK):
            yield bytes(chunk)
    else:
        async for chunk in data:
            view = memoryview(chunk).cast("B")
            for start in range(0, len(view), ap.CHUNK):
                yield view[start:start + ap.CHUNK]


async def _send_or_fail(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        raise AgentError(f"the connection to the guest agent broke: {error}") from None


async def _receive_or_fail(stream: trio.abc.Stream) -> bytes:
    try:
        data = await stream.receive_some(RECEIVE_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        raise AgentError(f"the connection to the guest agent broke: {error}") from None
    if not data:
        raise AgentError("the guest agent's connection closed")
    return bytes(data)


def guest_agent_files() -> dict[str, bytes]:
    """The files a guest image carries side by side (e.g. in ``/run/vmcache/agent/``).

    Start the agent with ``/usr/bin/python3 -E -s <dir>/vmcache_agent.py --init``
    as PID 1; it imports its modules and ``agent_protocol`` from its own directory.
    """
    here = Path(__file__).parent
    return {
        "vmcache_agent.py": (here / "guest" / "vmcache_agent.py").read_bytes(),
        "agent_base.py": (here / "guest" / "agent_base.py").read_bytes(),
        "agent_process.py": (here / "guest" / "agent_process.py").read_bytes(),
        "agent_files.py": (here / "guest" / "agent_files.py").read_bytes(),
        "agent_protocol.py": (here / "agent_protocol.py").read_bytes(),
    }
