"""The host side of the guest agent: one :class:`AgentConnection` per virtio-serial port.

A thin Trio driver on the sans-I/O :class:`vmcache.agent_protocol.Connection`, which keeps
every stream's state and credit and checks every field the guest sends (root in the guest can
replace the agent); this module moves bytes and wakes tasks. ``async with
AgentConnection.open(stream, timeout=...)`` owns a reader task (as trio-websocket's
``open_websocket``). :meth:`AgentConnection.start` runs no task, for long-lived objects with no
nursery (a VM, a guest port): it *pulls*, whichever task waits reads and dispatches, and a
``_progress`` event, replaced after each read, wakes the other waiters; if the reading task is
cancelled, another takes over. Sends are serialised by a lock, shielded (a frame is never cut
in half) and bounded in time.

Every wait and buffer is bounded: while a call waits and the agent has sent nothing for
:data:`IDLE_PING` s, a PING goes out, and no answer within :data:`PONG_TIMEOUT` more fails
every call; an EOF or a broken socket fails them at once. Output is bounded by the credit the
host grants; ``run()`` / ``read_file()`` by ``max_output`` / ``max_size``
(:class:`GuestOutputLimitError`). Everything else raised is an :class:`AgentError`
(:class:`AgentProtocolError` names the field a guest got wrong), except trio's own stream
errors on a process's stdin/stdout (``BrokenResourceError`` once it closed its stdin).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import attrs
import trio

from . import agent_protocol as ap
from .errors import (
    AgentError,
    AgentProtocolError,
    GuestConnectError,
    GuestConnectionBrokenError,
    GuestOutputLimitError,
    GuestPortRefusedError,
    GuestProcessError,
    GuestRequestError,
    printable,
)

log = logging.getLogger("vmcache.agent_client")

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
#: How long closing the stream to the agent may take (a Unix socket closes at once).
CLOSE_TIMEOUT = 5.0
#: Read size from the socket.
RECEIVE_SIZE = 1 << 20
#: Credit granted to the guest per output channel.
OUTPUT_WINDOW = ap.DEFAULT_WINDOW
#: What ``run()`` collects (stdout and stderr together) and ``read_file()`` reads, by default.
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
#: How long the guest tries to connect for :meth:`AgentConnection.connect_tcp`, by default ...
TCP_CONNECT_TIMEOUT = 10.0
#: ... and how much longer the host waits for the agent's answer (it may be slow, not silent).
TCP_CONNECT_GRACE = 5.0
#: A result at least this big is joined off the event loop (see :func:`_joined`).
JOIN_IN_THREAD = 4 * 1024 * 1024

_M = TypeVar("_M", bound=ap.Message)


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


class _Stream:
    """The guest's answers on one stream, and output not yet taken (its state is the protocol's)."""

    __slots__ = ("chunks", "cut", "discard", "end", "forgotten", "id", "reply")

    def __init__(self, stream_id: int, channels: Sequence[int] = ()) -> None:
        self.id = stream_id
        self.reply: ap.Message | None = None
        self.end: ap.Message | None = None
        self.chunks: dict[int, deque[bytes]] = {channel: deque() for channel in channels}
        self.discard: set[int] = set()  # channels whose reader left: data is acknowledged and dropped
        self.cut: set[int] = set()  # channels still open when the host gave up the stream
        self.forgotten = False


class AgentConnection:
    """One session with the guest agent over one ``trio.abc.Stream`` (a port's socket).

    Make one with :meth:`open` (a context manager owning a reader task) or
    :meth:`start`. Many calls may run at once from many tasks (processes,
    transfers): each is a stream of the protocol.
    """

    def __init__(self, stream: trio.abc.Stream, protocol: ap.Connection, hello: ap.Hello) -> None:
        self._stream = stream
        self._protocol = protocol
        #: The guest kernel's boot id, and what the agent said about itself.
        self.boot_id: str = printable(str(hello.info.get("boot_id", "")))
        self.agent_version: str = printable(str(hello.info.get("agent_version", "")))
        self.info: dict[str, Any] = dict(hello.info)
        self._streams: dict[int, _Stream] = {}
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
        protocol = ap.Connection(ap.Role.HOST)
        hello: ap.Event | None = None
        with trio.move_on_after(timeout):
            retry = HELLO_RETRY_FIRST
            while hello is None:
                await _send_or_fail(stream, protocol.send(
                    ap.Hello(os.urandom(ap.NONCE_SIZE), {"protocol": ap.PROTOCOL_VERSION})))
                with trio.move_on_after(retry):
                    while hello is None:
                        protocol.receive_data(await _receive_or_fail(stream))
                        try:
                            hello = protocol.next_event()  # nothing comes before the answer
                        except ap.ProtocolError as error:
                            raise AgentProtocolError(_broke(error)) from None
                retry = min(retry * 2, HELLO_RETRY_MAX)
        if not isinstance(hello, ap.Hello):
            raise AgentError(f"the guest agent did not answer HELLO within {timeout:g} s")
        if hello.info.get("protocol") != ap.PROTOCOL_VERSION:
            raise AgentProtocolError(
                f"the guest agent speaks protocol {hello.info.get('protocol')!r}, "
                f"vmcache speaks {ap.PROTOCOL_VERSION}: rebuild the guest image")
        connection = cls(stream, protocol, hello)
        connection._drain()
        return connection

    @classmethod
    def open(cls, stream: trio.abc.Stream, *, timeout: float) -> AbstractAsyncContextManager[AgentConnection]:
        """``async with AgentConnection.open(stream, timeout=t) as conn``: :meth:`start`, then a
        reader task of the connection's own until the block ends, which closes the connection."""
        return _Opened(cls, stream, timeout)

    async def _reader(self) -> None:
        """Read for everyone until the connection fails or closes (the task :meth:`open` owns)."""
        try:
            await self._wait_for(lambda: self._failure is not None)
        except AgentError:
            pass

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
            self._protocol.receive_data(data)
            self._drain()
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
            await self._send(self._encode(ap.Ping(self._ping_payload)))
        elif trio.current_time() >= self._ping_sent + PONG_TIMEOUT:
            self._fail(AgentError, f"the guest agent stopped answering (no reply to a ping within "
                                   f"{IDLE_PING + PONG_TIMEOUT:g} s)")

    def _drain(self) -> None:
        """Dispatch every event the protocol has; a broken rule fails the connection."""
        try:
            while (event := self._protocol.next_event()) is not None:
                self._dispatch(event)
        except ap.ProtocolError as error:
            self._fail(AgentProtocolError, _broke(error))

    def _dispatch(self, event: ap.Event) -> None:
        if isinstance(event, ap.Data):
            stream = self._streams.get(event.stream)
            if stream is None or event.channel in stream.discard:
                frame = self._protocol.consumed(event.stream, event.channel, len(event.data))
                if frame:
                    self._pending_frames.append(frame)
            else:
                stream.chunks[event.channel].append(event.data)  # type: ignore[arg-type]
        elif isinstance(event, ap.Message):  # a REPLY or an END, checked and typed
            stream = self._streams.get(event.stream)
            if stream is not None:
                if event.FRAME == ap.REPLY:
                    stream.reply = event
                else:
                    stream.end = event
        elif isinstance(event, ap.Pong):
            if event.payload in self._pongs:
                self._pongs[event.payload] = printable(event.boot_id)
        elif isinstance(event, ap.ErrorNotice):
            self._fail(AgentProtocolError, f"the guest agent received garbage and dropped the session: "
                                           f"{printable(event.message)}")
        # Eof and WindowUpdate: the protocol keeps channel states and credit; waiters recheck.

    def _encode(self, event: ap.Event) -> bytes:
        """``event``'s bytes; an event the protocol refuses is an AgentError (our bug, or a race)."""
        try:
            return self._protocol.send(event)
        except ap.ProtocolError as error:
            raise AgentError(f"vmcache cannot send that to the guest agent: {error}") from None

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

    def _done(self, stream: _Stream, channel: int) -> bool:
        """The guest sent EOF on an output channel (or the stream is finished)."""
        return self._protocol.channel_state(stream.id, channel) is ap.ChannelState.DONE

    def _finished(self, stream: _Stream) -> bool:
        """The guest is done with a stream: ended, and every output at EOF (or it failed)."""
        return stream.end is not None and self._protocol.stream_state(stream.id) is ap.StreamState.CLOSED

    def _stdin_ready(self, stream: _Stream) -> bool:
        """Channel 0 of ``stream`` can take bytes now, or never will."""
        protocol = self._protocol
        return (stream.end is not None or stream.forgotten or protocol.send_credit(stream.id, ap.STDIN) > 0
                or protocol.channel_state(stream.id, ap.STDIN) is not ap.ChannelState.OPEN)

    async def _request(self, request: ap.Message, reply_kind: type[_M], channels: Sequence[int] = (),
                       *, close_stdin: bool = False) -> tuple[_Stream, _M]:
        """Open a stream with ``request``; return it and the guest's reply (GuestRequestError if refused).

        ``close_stdin`` sends the stdin EOF in the same write (a command run with no input).
        """
        request.stream = self._protocol.next_stream_id()
        frames = self._encode(request)
        stream = _Stream(request.stream, channels)
        self._streams[stream.id] = stream
        if close_stdin:
            frames += self._encode(ap.Eof(stream.id, ap.STDIN))
        try:
            await self._send(frames)
            await self._wait_for(lambda: stream.reply is not None)
        except BaseException:
            await self._abandon(stream)
            raise
        reply = stream.reply
        if isinstance(reply, ap.ErrorReply):
            self._forget(stream)
            raise GuestRequestError(printable(reply.message), reply.errno or None)
        assert isinstance(reply, reply_kind)  # the protocol reads a reply as its request's kind
        return stream, reply

    async def _abandon(self, stream: _Stream) -> None:
        """Tell the guest to drop a stream we give up on (kill its process); shielded, bounded."""
        stream.cut = {channel for channel in stream.chunks if not self._done(stream, channel)}
        self._forget(stream)
        if self._failure is None and self._protocol.stream_state(stream.id) is not ap.StreamState.CLOSED:
            with trio.CancelScope(shield=True):
                try:
                    await self._send(self._encode(ap.Reset(stream.id)))
                except AgentError:
                    pass

    def _forget(self, stream: _Stream) -> None:
        stream.forgotten = True
        self._streams.pop(stream.id, None)

    async def _call(self, request: ap.Message, reply_kind: type[_M]) -> _M:
        stream, reply = await self._request(request, reply_kind)
        self._forget(stream)
        return reply

    async def _take(self, stream: _Stream, channel: int, max_bytes: int | None) -> bytes:
        """Next bytes on an output channel (b"" at its end), granting credit back."""
        chunks = stream.chunks[channel]
        await self._wait_for(lambda: bool(chunks) or self._done(stream, channel)
                             or isinstance(stream.end, ap.ErrorEnd))
        if not chunks:
            _raise_stream_error(stream)
            if channel in stream.cut:
                raise trio.ClosedResourceError("the guest stream was closed")
            return b""
        chunk = chunks[0]
        if max_bytes is not None and max_bytes < len(chunk):
            chunks[0] = chunk[max_bytes:]
            chunk = chunk[:max_bytes]
        else:
            chunks.popleft()
        frame = self._protocol.consumed(stream.id, channel, len(chunk))
        if frame:
            await self._send(frame)
        return chunk

    async def _give(self, stream: _Stream, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` on channel 0 as the guest's credit allows."""
        view = memoryview(data).cast("B")
        while view:
            await self._wait_for(lambda: self._stdin_ready(stream))
            _raise_stream_error(stream)
            credit = self._protocol.send_credit(stream.id, ap.STDIN)
            if stream.end is not None or stream.forgotten or not credit:
                raise trio.BrokenResourceError("the guest process does not read its stdin any more")
            count = min(len(view), credit, ap.CHUNK)
            await self._send(self._protocol.send_data_header(stream.id, ap.STDIN, count) + view[:count])
            view = view[count:]

    # --- Requests ---------------------------------------------------------------------------------

    async def ping(self) -> str:
        """Check that the agent answers; returns the guest's boot id."""
        payload = os.urandom(8)
        self._pongs[payload] = None
        try:
            await self._send(self._encode(ap.Ping(payload)))
            await self._wait_for(lambda: self._pongs[payload] is not None)
            return self._pongs[payload] or ""
        finally:
            del self._pongs[payload]

    async def add_entropy(self, data: bytes | None = None) -> None:
        """Credit host randomness (64 fresh bytes by default) to the guest's pool and reseed its CRNG."""
        entropy = os.urandom(64) if data is None else bytes(data)
        await self._call(_build(ap.EntropyRequest, entropy), ap.DoneReply)

    async def set_clock(self, unix_seconds: float | None = None) -> None:
        """Set the guest's clock (CLOCK_REALTIME), to the host's by default."""
        seconds = time.time() if unix_seconds is None else float(unix_seconds)
        await self._call(_build(ap.ClockRequest, seconds), ap.DoneReply)

    async def online_resources(self) -> GuestResources:
        """Online hot-added CPUs and memory; return what the guest then sees."""
        reply = await self._call(ap.OnlineRequest(0), ap.OnlineReply)
        for problem in reply.problems:
            log.warning("the guest could not online %s", printable(problem))
        return GuestResources(online_cpus=reply.online_cpus, mem_total_kib=reply.mem_total_kib)

    async def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """``mkdir -p`` in the guest; ``mode`` applies to the last directory if it is made."""
        await self._call(_build(ap.MkdirRequest, path, mode & 0o7777), ap.DoneReply)

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
        request = _build(
            ap.ExecRequest, args, dict(env or {}), cwd, (pty.rows, pty.cols) if pty is not None else None,
            timeout, capture_stdout or pty is not None,  # a pty's output must be read anyway
            capture_stderr and pty is None, OUTPUT_WINDOW)
        return self._process(args, request)

    @asynccontextmanager
    async def _process(self, args: list[str | bytes], request: ap.ExecRequest,
                       close_stdin: bool = False) -> AsyncIterator[GuestProcess]:
        channels = [channel for channel, wanted in ((ap.STDOUT, request.stdout), (ap.STDERR, request.stderr))
                    if wanted]
        stream, reply = await self._request(request, ap.ExecReply, channels, close_stdin=close_stdin)
        process = GuestProcess(self, stream, args, reply.pid, stdin_closed=close_stdin)
        try:
            yield process
        finally:
            await process.aclose()

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
        """Run ``argv`` to its end, like :func:`trio.run_process`; feeds ``stdin``, collects output.

        Output not captured goes to /dev/null in the guest (``stdout``/``stderr``
        are then None). ``check=True`` raises :class:`GuestProcessError` for a
        non-zero status. Cancelling kills the guest process. More than
        ``max_output`` bytes of stdout and stderr together (64 MiB by default)
        kills it and raises :class:`GuestOutputLimitError`: read such output
        as a stream with :meth:`open_process`.
        """
        args = list(argv)
        request = _build(ap.ExecRequest, args, dict(env or {}), cwd, None, timeout, capture_stdout,
                         capture_stderr, OUTPUT_WINDOW)
        protocol = self._protocol
        async with self._process(args, request, close_stdin=not stdin) as process:
            stream = process._stream
            collected: dict[int, list[bytes]] = {channel: [] for channel in stream.chunks}
            total = 0
            pending = memoryview(stdin).cast("B")
            stdin_open = bool(stdin)
            # One task does it all (no nursery, so no exception groups): drain output,
            # feed stdin as credit comes, until the exit and every output's EOF.
            while True:
                for channel, chunks in stream.chunks.items():
                    while chunks:
                        chunk = chunks.popleft()
                        total += len(chunk)
                        if total > max_output:
                            raise GuestOutputLimitError(
                                f"guest command {_shown(process.args)} printed more than max_output="
                                f"{max_output} bytes and was killed: read its output as a stream "
                                "(open_process) or pass a larger max_output")
                        collected[channel].append(bytes(chunk))
                        frame = self._protocol.consumed(stream.id, channel, len(chunk))
                        if frame:
                            await self._send(frame)
                credit = protocol.send_credit(stream.id, ap.STDIN)
                if stdin_open and (stream.end is not None or
                                   protocol.channel_state(stream.id, ap.STDIN) is not ap.ChannelState.OPEN):
                    stdin_open = False
                elif stdin_open and pending and credit > 0:
                    count = min(len(pending), credit, ap.CHUNK)
                    await self._send(protocol.send_data_header(stream.id, ap.STDIN, count) + pending[:count])
                    pending = pending[count:]
                    continue
                elif stdin_open and not pending:
                    stdin_open = False
                    await self._send(self._encode(ap.Eof(stream.id, ap.STDIN)))
                    continue
                if self._finished(stream):
                    break

                def progress(stdin_open: bool = stdin_open) -> bool:
                    return (any(stream.chunks.values()) or (stdin_open and self._stdin_ready(stream))
                            or self._finished(stream))

                await self._wait_for(progress)
            _raise_stream_error(stream)
            returncode = process.returncode
            assert returncode is not None
        result = CompletedProcess(
            args=list(argv), returncode=returncode,
            stdout=await _joined(collected[ap.STDOUT]) if ap.STDOUT in collected else None,
            stderr=await _joined(collected[ap.STDERR]) if ap.STDERR in collected else None,
            timed_out=process.timed_out,
        )
        if check:
            result.check_returncode()
        return result

    # --- TCP connections --------------------------------------------------------------------------

    async def connect_tcp(self, port: int, host: str = "127.0.0.1", *,
                          timeout: float = TCP_CONNECT_TIMEOUT) -> GuestTcpStream:
        """A TCP connection to ``host``:``port`` inside the guest (an address literal; the guest's
        loopback by default), made by the agent: no guest network device is needed.

        The stream is a ``trio.abc.HalfCloseableStream``, flow-controlled both ways; ``aclose()``
        it when done. The guest gives up connecting after ``timeout`` s. Raises
        :class:`GuestPortRefusedError` when nothing listens there, :class:`GuestConnectError`
        for any other failure to connect.
        """
        request = _build(ap.ConnectRequest, int(port), host, float(timeout), OUTPUT_WINDOW)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            with trio.fail_after(timeout + TCP_CONNECT_GRACE):
                stream, _ = await self._request(request, ap.ConnectReply, [ap.STDOUT])
        except trio.TooSlowError:
            raise GuestConnectError(f"connecting to {where} in the guest: no answer from the guest "
                                    f"agent within {timeout + TCP_CONNECT_GRACE:g} s") from None
        except GuestConnectError:
            raise
        except GuestRequestError as error:
            raise _connect_error(error) from None
        return GuestTcpStream(self, stream, where)

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
        request = _build(ap.WriteFileRequest, path, mode & 0o7777)
        stream, _ = await self._request(request, ap.WriteFileReply)
        try:
            async for chunk in _chunks(data):
                await self._give(stream, chunk)
            if self._protocol.channel_state(stream.id, ap.STDIN) is ap.ChannelState.OPEN:
                await self._send(self._encode(ap.Eof(stream.id, ap.STDIN)))
            await self._wait_for(lambda: stream.end is not None)
        except BaseException:
            await self._abandon(stream)
            raise
        self._forget(stream)
        _raise_stream_error(stream)
        assert isinstance(stream.end, ap.FileEnd)
        return stream.end.size

    def open_file(self, path: str) -> AbstractAsyncContextManager[GuestFile]:
        """Read a guest file as a stream: ``async with conn.open_file(p) as f: await f.receive_some()``."""
        return self._open_file(_build(ap.ReadFileRequest, path, OUTPUT_WINDOW))

    @asynccontextmanager
    async def _open_file(self, request: ap.ReadFileRequest) -> AsyncIterator[GuestFile]:
        stream, reply = await self._request(request, ap.ReadFileReply, [ap.STDOUT])
        file = GuestFile(self, stream, reply.mode, reply.size)
        try:
            yield file
        finally:
            await file.aclose()

    async def read_file(self, path: str, *, max_size: int = DEFAULT_MAX_OUTPUT) -> bytes:
        """A whole guest file's bytes; more than ``max_size`` (64 MiB by default) raises
        :class:`GuestOutputLimitError`: read such a file as a stream with :meth:`open_file`."""
        async with self.open_file(path) as file:
            chunks = []
            total = file.size
            if total <= max_size:
                total = 0
                while chunk := await file.receive_some():
                    total += len(chunk)
                    if total > max_size:
                        break
                    chunks.append(chunk)
            if total > max_size:
                raise GuestOutputLimitError(
                    f"the guest file {path} is larger than max_size={max_size} bytes: read it as a "
                    "stream (open_file), or pass a larger max_size")
        return await _joined(chunks)

    # --- Closing ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection; the guest ends the session (and kills its processes)."""
        self._fail(AgentError, "the connection to the guest agent was closed")
        # Callers close in shielded cleanups: bounded here, whatever stream we were given (a
        # trio stream whose aclose is cancelled is closed all the same).
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._stream.aclose()


class _Opened(AbstractAsyncContextManager[AgentConnection]):
    """:meth:`AgentConnection.open`: a nursery for the reader task, for as long as the block runs.

    The reader never raises, so the block's own exception comes out as it is, not in a group.
    """

    def __init__(self, kind: type[AgentConnection], stream: trio.abc.Stream, timeout: float) -> None:
        self._kind, self._stream, self._timeout = kind, stream, timeout
        self._nursery_manager = trio.open_nursery()
        self._nursery: trio.Nursery | None = None
        self._connection: AgentConnection | None = None

    async def __aenter__(self) -> AgentConnection:
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            self._connection = await self._kind.start(self._stream, timeout=self._timeout)
        except BaseException:
            await self._nursery_manager.__aexit__(None, None, None)  # nothing runs in it yet
            raise
        self._nursery.start_soon(self._connection._reader)
        return self._connection

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        assert self._connection is not None and self._nursery is not None
        with trio.CancelScope(shield=True):
            await self._connection.aclose()
        self._nursery.cancel_scope.cancel()
        await self._nursery_manager.__aexit__(None, None, None)


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
            _OutputStream(connection, stream, ap.STDOUT) if ap.STDOUT in stream.chunks else None)
        self.stderr: trio.abc.ReceiveStream | None = (
            _OutputStream(connection, stream, ap.STDERR) if ap.STDERR in stream.chunks else None)

    @property
    def returncode(self) -> int | None:
        end = self._stream.end
        if end is None:
            return None
        if isinstance(end, ap.ProcessEnd):
            return end.returncode
        return -signal.SIGKILL  # the agent gave up on it

    @property
    def timed_out(self) -> bool:
        """The guest killed the process because its timeout passed."""
        return isinstance(self._stream.end, ap.ProcessEnd) and self._stream.end.timed_out

    async def wait(self) -> int:
        """Wait for the process to exit; returns its returncode."""
        await self._connection._wait_for(lambda: self._stream.end is not None)
        _raise_stream_error(self._stream)
        returncode = self.returncode
        assert returncode is not None
        return returncode

    async def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process's group (it has a session of its own)."""
        await self._control(_build(ap.Signal, int(sig)))

    async def kill(self) -> None:
        await self.send_signal(signal.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the pty (the process gets SIGWINCH); no effect without one."""
        await self._control(_build(ap.Resize, int(rows), int(cols)))

    async def _control(self, control: ap.Message) -> None:
        connection, stream = self._connection, self._stream
        control.stream = stream.id
        if self.returncode is None and not stream.forgotten and (
                connection._protocol.stream_state(stream.id) is ap.StreamState.RUNNING):
            await connection._send(connection._encode(control))

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
            if connection._finished(self._stream):
                connection._forget(self._stream)
            else:
                await connection._abandon(self._stream)

    def __repr__(self) -> str:
        return f"<GuestProcess pid={self.pid} args={self.args!r} returncode={self.returncode}>"


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
        stream, connection = self._stream, self._connection
        stream.discard.add(self._channel)
        chunks = stream.chunks[self._channel]
        frames = b""
        while chunks:
            frames += connection._protocol.consumed(stream.id, self._channel, len(chunks.popleft()))
        if frames and not stream.forgotten and connection._failure is None:
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
        await self._connection._wait_for(lambda: self._connection._stdin_ready(stream))

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        stream, connection = self._stream, self._connection
        if not stream.forgotten and stream.end is None and (
                connection._protocol.channel_state(stream.id, ap.STDIN) is ap.ChannelState.OPEN):
            with trio.CancelScope(shield=True):
                try:
                    await connection._send(connection._encode(ap.Eof(stream.id, ap.STDIN)))
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


class GuestTcpStream(trio.abc.HalfCloseableStream):
    """A TCP connection inside the guest (see :meth:`AgentConnection.connect_tcp`), relayed by the
    agent: channel 0 carries what is sent, channel 1 what is received, each under credit.

    ``send_eof()`` shuts the guest socket for writing once every byte sent is written to it;
    ``receive_some()`` returns b"" at the guest socket's EOF. ``aclose()`` before both ends are
    done abandons the connection (the guest closes its socket; bytes still on their way are
    dropped): for an orderly end, ``send_eof()`` and read to the EOF first. A connection that
    breaks in the guest raises :class:`GuestConnectionBrokenError` (a ``trio.BrokenResourceError``).

    ``send_all()`` waits for the guest's credit and ``receive_some()`` for its bytes for as long
    as that takes: a guest that grants none or sends nothing keeps them waiting, so a caller that
    must not hang bounds them (``trio.move_on_after``, then ``aclose()``), as ``vmcache
    port-forward`` does (:data:`vmcache.port_forward.NO_PROGRESS_TIMEOUT`).
    """

    def __init__(self, connection: AgentConnection, stream: _Stream, where: str) -> None:
        self._connection = connection
        self._stream = stream
        #: Where it goes in the guest, as ``HOST:PORT``.
        self.where = where
        self._sending = False
        self._receiving = False
        self._eof_sent = False
        self._closed = False

    def _broken(self) -> GuestConnectionBrokenError:
        end = self._stream.end
        if isinstance(end, ap.ErrorEnd):
            return GuestConnectionBrokenError(printable(end.message))
        return GuestConnectionBrokenError(f"the connection to {self.where} in the guest takes no more "
                                          "bytes (its peer there closed or reset it)")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this connection was closed")
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this connection")
        self._sending = True
        try:
            connection, stream, protocol = self._connection, self._stream, self._connection._protocol
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
            while view:
                await connection._wait_for(lambda: connection._stdin_ready(stream))
                if self._closed:
                    raise trio.ClosedResourceError("this connection was closed")
                credit = protocol.send_credit(stream.id, ap.STDIN)
                if stream.end is not None or stream.forgotten or not credit:
                    raise self._broken()
                count = min(len(view), credit, ap.CHUNK)
                await connection._send(protocol.send_data_header(stream.id, ap.STDIN, count) + view[:count])
                view = view[count:]
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this connection was closed")
        connection, stream = self._connection, self._stream
        await connection._wait_for(lambda: connection._stdin_ready(stream))

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this connection was closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this connection")
        connection, stream = self._connection, self._stream
        if not self._eof_sent and not stream.forgotten and stream.end is None and (
                connection._protocol.channel_state(stream.id, ap.STDIN) is ap.ChannelState.OPEN):
            self._eof_sent = True
            await connection._send(connection._encode(ap.Eof(stream.id, ap.STDIN)))
        else:
            self._eof_sent = True
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("this connection was closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            return await self._connection._take(self._stream, ap.STDOUT, max_bytes)
        except GuestRequestError:  # the guest ended the stream with an error: a broken connection
            raise self._broken() from None
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Close: forget a finished connection, abandon one still open (shielded, bounded)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        connection, stream = self._connection, self._stream
        if stream.forgotten or connection._finished(stream):
            connection._forget(stream)
            await trio.lowlevel.checkpoint()
        else:
            await connection._abandon(stream)
            await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"<GuestTcpStream to {self.where} in the guest, stream {self._stream.id}>"


def _connect_error(error: GuestRequestError) -> GuestConnectError:
    """What a refused ``connect`` request means for the caller."""
    message = str(error)
    if error.errno == errno.ECONNREFUSED:
        return GuestPortRefusedError(message, error.errno)
    if message.startswith("bad request: unknown request"):
        return GuestConnectError("the guest agent cannot open TCP connections (it is older than this "
                                 "vmcache): rebuild the guest image (`vmcache image build`) and boot "
                                 "new VMs")
    return GuestConnectError(message, error.errno)


def _raise_stream_error(stream: _Stream) -> None:
    """A stream the agent gave up on (an internal error there) is an error here."""
    if isinstance(stream.end, ap.ErrorEnd):
        raise GuestRequestError(printable(stream.end.message), stream.end.errno or None)


def _build(kind: type[_M], *fields: Any) -> _M:
    """A request or control (its stream id set when sent); a bad argument is an AgentError."""
    try:
        return kind(0, *fields)
    except ap.ProtocolError as error:
        raise AgentError(f"cannot ask that of the guest: {error}") from None


def _broke(error: ap.ProtocolError) -> str:
    return f"the guest agent broke the protocol: {printable(str(error))}"


async def _joined(chunks: list[bytes]) -> bytes:
    """The chunks as one ``bytes``. A large result is joined in a worker thread: copying tens
    of MiB takes tens of ms (bench/README.md), and ``bytes.join`` lets go of the GIL while it
    copies that much, so the event loop goes on meanwhile."""
    if sum(map(len, chunks)) < JOIN_IN_THREAD:
        return b"".join(chunks)
    return await trio.to_thread.run_sync(b"".join, chunks)


def _shown(args: Sequence[str | bytes]) -> str:
    return printable(" ".join(arg if isinstance(arg, str) else arg.decode("utf-8", "replace")
                              for arg in args)[:200])


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
    from .image.build import agent_files  # the one list of them: the image's

    return dict(agent_files())
