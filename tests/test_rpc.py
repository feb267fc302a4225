"""The gRPC layer without QEMU: a real server on a real Unix socket, in this process.

What the daemon relies on: a reset cancels its call even when it arrives with the
request, forgotten calls leave nothing behind, silent and idle connections cannot
lock clients out, accept retries only capacity errors, deadlines hold, and a
caller's own exception comes out of ``connect`` as itself.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.lowlevel
import trio.testing
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message as ProtoMessage

import vmcache
from vmcache._proto import cache_pb2
from vmcache.errors import CacheError, DeadlineExceededError, InvalidRequestError, leaves
from vmcache.handle import VMHandle
from vmcache.rpc import server as rpc_server
from vmcache.rpc import transport
from vmcache.rpc.client import open_channel
from vmcache.rpc.endpoint import bind_unix_socket
from vmcache.rpc.server import Method, PeerCheck, RpcCall, RpcServer, unary
from vmcache.rpc.transport import Code
from vmcache.security import PeerCredentials
from vmcache.wire import SERVICE, grpc_vm


class Recorder:
    """Handlers that record how far they got."""

    def __init__(self) -> None:
        self.started = 0
        self.handed_out = 0
        self.cancelled = 0
        self.release = trio.Event()

    async def status(self, _request: ProtoMessage) -> cache_pb2.GrpcStatus:
        return cache_pb2.GrpcStatus(pid=4242)

    async def hand_out(self, call: RpcCall[ProtoMessage]) -> None:
        """Like GetBaseVM: takes a moment to find a VM, then hands it out."""
        self.started += 1
        try:
            await call.receive_one()
            await trio.lowlevel.checkpoint()
            self.handed_out += 1
            await call.send(cache_pb2.GrpcVM(id="vm"))
        except trio.Cancelled:
            self.cancelled += 1
            raise

    async def block(self, _request: ProtoMessage) -> Empty:
        self.started += 1
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        return Empty()


@asynccontextmanager
async def running_server(path: Path, recorder: Recorder,
                         check_peer: PeerCheck | None = None) -> AsyncIterator[RpcServer]:
    server = RpcServer(SERVICE, {
        "Status": Method(Empty, unary(recorder.status)),
        "GetBaseVM": Method(Empty, recorder.hand_out),
        "Quit": Method(Empty, unary(recorder.block)),
    }, check_peer=check_peer)
    sock = bind_unix_socket(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, sock)
        yield server
        nursery.cancel_scope.cancel()


def grpc_frames(*, reset: bool, method: str = "GetBaseVM") -> bytes:
    """A client's preface, one request with its message, and (optionally) RST_STREAM, as bytes."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/{method}"),
                            (":authority", "localhost"), ("te", "trailers"),
                            ("content-type", "application/grpc+proto")])
    client.send_data(1, struct.pack(">?I", False, 0), end_stream=True)
    if reset:
        client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    data: bytes = client.data_to_send()
    return data


async def test_a_reset_in_the_same_read_as_its_request_cancels_the_call(tmp_path: Path) -> None:
    recorder = Recorder()
    path = tmp_path / "s.sock"
    async with running_server(path, recorder):
        with trio.fail_after(10):
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(grpc_frames(reset=True))  # one write: one read on the server
            while recorder.started == 0:
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            await stream.aclose()
    assert (recorder.started, recorder.handed_out, recorder.cancelled) == (1, 0, 1)


async def test_without_a_reset_the_same_bytes_are_served(tmp_path: Path) -> None:
    """The control for the test above: the request alone does reach the hand-out."""
    recorder = Recorder()
    path = tmp_path / "s.sock"
    async with running_server(path, recorder):
        with trio.fail_after(10):
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(grpc_frames(reset=False))
            while recorder.handed_out == 0:
                await trio.sleep(0.01)
            await stream.aclose()
    assert recorder.handed_out == 1


async def test_calls_given_up_leave_nothing_behind_on_a_long_connection(tmp_path: Path) -> None:
    recorder = Recorder()
    path = tmp_path / "s.sock"
    async with running_server(path, recorder) as server, open_channel(path, SERVICE) as channel:
        with trio.fail_after(30):
            for _ in range(200):
                with trio.move_on_after(0.005):
                    await channel.unary("Quit", Empty(), Empty, timeout=10)
            assert (await channel.unary("Status", Empty(), cache_pb2.GrpcStatus, 5)).pid == 4242
            while server.active_calls:
                await trio.sleep(0.01)
            (served,) = server._served
            assert served.connection.open_calls == 0
            assert served.connection._protocol.message_read_buffers == {}
    assert recorder.cancelled == recorder.started


async def test_a_client_deadline_cancels_the_handler(tmp_path: Path) -> None:
    recorder = Recorder()
    path = tmp_path / "s.sock"
    async with running_server(path, recorder), open_channel(path, SERVICE) as channel:
        with trio.fail_after(10), pytest.raises(DeadlineExceededError):
            await channel.unary("Quit", Empty(), Empty, timeout=0.3)
        while not recorder.cancelled:
            await trio.sleep(0.01)


async def test_unknown_methods_and_bad_messages_get_real_status_codes(tmp_path: Path) -> None:
    recorder = Recorder()
    path = tmp_path / "s.sock"
    async with running_server(path, recorder), open_channel(path, SERVICE) as channel:
        with trio.fail_after(10):
            with pytest.raises(CacheError, match="UNIMPLEMENTED"):
                await channel.unary("Config", Empty(), cache_pb2.GrpcVMConfig, 5)
            async with channel.open_call("Status", cache_pb2.GrpcStatus, timeout=5) as call:
                await call._call.send(b"\xff\xff\xff", last=True)  # not protobuf
                with pytest.raises(InvalidRequestError, match="not valid protobuf"):
                    await call.receive()


async def test_silent_connections_are_closed_after_the_handshake_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    recorder = Recorder()
    path = tmp_path / "s.sock"
    async with running_server(path, recorder):
        stream = await trio.open_unix_socket(str(path))
        start = trio.current_time()
        with trio.fail_after(60):
            while await stream.receive_some(65536):
                pass  # our SETTINGS, then EOF
        assert rpc_server.HANDSHAKE_TIMEOUT <= trio.current_time() - start < rpc_server.HANDSHAKE_TIMEOUT + 1


async def test_idle_connections_make_room_for_new_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rpc_server, "MAX_CONNECTIONS", 8)
    recorder = Recorder()
    path = tmp_path / "s.sock"
    async with running_server(path, recorder) as server:
        squatters = []
        for _ in range(8):
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(grpc_frames(reset=False, method="Status")[:24])  # preface only
            squatters.append(stream)
        while server.connections < 8:
            await trio.sleep(0.01)
        with trio.fail_after(10):
            async with vmcache.connect(path) as cache:
                with pytest.raises(CacheError):  # not a daemon: but it was served, not refused
                    await cache.config()
        assert server.evicted >= 1
        assert "closed the longest-idle one" in caplog.text
        for stream in squatters:
            await stream.aclose()


async def refuse_everyone(_peer: PeerCredentials) -> str:
    return "nobody may"


async def test_a_slow_refused_client_still_learns_why(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The refusal grace counts from the answer, not the accept: a loaded host is no excuse."""
    path = tmp_path / "s.sock"
    async with running_server(path, Recorder(), check_peer=refuse_everyone):
        stream = await trio.open_unix_socket(str(path))
        await trio.sleep(3 * rpc_server.REFUSED_GRACE)  # the client is slow to ask
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE}/Status"),
                                (":authority", "localhost"), ("te", "trailers"),
                                ("content-type", "application/grpc+proto")])
        client.send_data(1, struct.pack(">?I", False, 0), end_stream=True)
        trailers: dict[bytes, bytes] = {}
        with trio.fail_after(30):
            await stream.send_all(client.data_to_send())
            while chunk := await stream.receive_some(65536):
                for event in client.receive_data(chunk):
                    if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                        trailers.update((bytes(k), bytes(v)) for k, v in event.headers)
        assert trailers[b"grpc-status"] == b"%d" % Code.PERMISSION_DENIED
        assert trailers[b"grpc-message"] == b"nobody%20may"  # percent-encoded, as gRPC says
        await stream.aclose()


async def test_a_silent_refused_client_is_hung_up_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "s.sock"
    async with running_server(path, Recorder(), check_peer=refuse_everyone):
        stream = await trio.open_unix_socket(str(path))
        start = trio.current_time()
        with trio.fail_after(60):
            while await stream.receive_some(65536):
                pass
        assert trio.current_time() - start == pytest.approx(rpc_server.REFUSED_FIRST_CALL_TIMEOUT, abs=0.5)


class FailingListener(trio.abc.Listener[trio.SocketStream]):
    def __init__(self, errors: list[int]) -> None:
        self.errors = errors
        self.calls = 0

    async def accept(self) -> trio.SocketStream:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        raise OSError(self.errors.pop(0), "simulated")

    async def aclose(self) -> None:
        pass


async def test_accept_retries_capacity_errors_only(autojump_clock: trio.testing.MockClock) -> None:
    server = RpcServer(SERVICE, {})
    listener = FailingListener([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.EBADF])
    start = trio.current_time()
    with pytest.raises(BaseExceptionGroup) as raised:  # the nurseries wrap it
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listener, listener)
    assert _leaf(raised.value).errno == errno.EBADF
    assert listener.calls == 4
    assert trio.current_time() - start == pytest.approx(0.01 + 0.02 + 0.04)


def _leaf(error: BaseException) -> OSError:
    [leaf] = leaves(error)
    assert isinstance(leaf, OSError)
    return leaf


async def test_the_callers_own_exception_comes_out_of_connect_as_itself(tmp_path: Path) -> None:
    recorder = Recorder()
    path = tmp_path / "s.sock"

    class Mine(Exception):
        pass

    async with running_server(path, recorder):
        with pytest.raises(Mine) as raised:
            async with vmcache.connect(path) as cache:
                await cache.status()
                raise Mine("from the caller")
    assert type(raised.value) is Mine and str(raised.value) == "from the caller"


async def test_no_daemon_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(vmcache.DaemonNotRunningError, match="start one with `vmcache serve`"):
        async with vmcache.connect(tmp_path / "nobody.sock"):
            pass



async def test_a_calls_time_counts_from_the_bytes_read_not_from_the_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's hand-out time starts when the request's bytes were read: the HTTP/2
    parse before the handler runs (0.6 ms on a cold cache here) is counted, not hidden."""
    parse = transport._Protocol.receive_data

    def slow_parse(self: transport._Protocol, data: bytes) -> list[object]:
        if not self.config.client_side:
            time.sleep(0.2)  # a slow parse, on purpose
        events: list[object] = parse(self, data)
        return events

    monkeypatch.setattr(transport._Protocol, "receive_data", slow_parse)
    seen: list[float] = []

    async def handler(call: RpcCall[ProtoMessage]) -> None:
        await call.receive_one()
        seen.append(trio.current_time() - call.arrived_at)
        await call.send(Empty(), last=True)
        await call.finish()

    server = RpcServer(SERVICE, {"Status": Method(Empty, handler)})
    path = tmp_path / "s.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, bind_unix_socket(path))
        async with open_channel(path, SERVICE) as channel:
            with trio.fail_after(10):
                await channel.unary("Status", Empty(), Empty, timeout=5)
        nursery.cancel_scope.cancel()
    assert seen and seen[0] >= 0.2


def _request(client: h2.connection.H2Connection, stream_id: int, method: str) -> None:
    client.send_headers(stream_id, [(":method", "POST"), (":scheme", "http"),
                                    (":path", f"/{SERVICE}/{method}"), (":authority", "localhost"),
                                    ("te", "trailers"), ("content-type", "application/grpc+proto")])
    client.send_data(stream_id, struct.pack(">?I", False, 0), end_stream=True)


async def test_a_reset_already_on_the_socket_stops_a_hand_out_reply(tmp_path: Path) -> None:
    """Kata's hand-out has no acknowledgement: a reply written after the client's RST_STREAM
    arrived gives a VM to nobody. The reset is on the socket, not yet read, when the handler
    replies: the reply must not go out, and the handler must know (it keeps the VM)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    _request(client, 1, "GetBaseVM")
    outcome: list[str] = []
    stream: trio.SocketStream | None = None

    async def hand_out(call: RpcCall[ProtoMessage]) -> None:
        await call.receive_one()
        assert stream is not None
        client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        # The client gives up, and its reset reaches our socket, just as the VM is ready:
        # no yield between this write and the reply, so our reader has not seen it yet.
        os.write(stream.socket.fileno(), client.data_to_send())
        try:
            await call.reply(cache_pb2.GrpcVM(id="vm-1"))
        except (rpc_server.CallGone, trio.Cancelled):  # the reset cancels the handler, or is seen
            outcome.append("kept")
            raise
        outcome.append("handed out")

    server = RpcServer(SERVICE, {"GetBaseVM": Method(Empty, hand_out),
                                 "Status": Method(Empty, unary(Recorder().status))})
    path = tmp_path / "s.sock"
    seen: list[tuple[int, str]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, bind_unix_socket(path))
        with trio.fail_after(10):
            stream = await trio.open_unix_socket(str(path))
            await stream.send_all(client.data_to_send())
            while not outcome:
                await trio.sleep(0.01)
            _request(client, 3, "Status")  # frames are in order: once this one ends, all are in
            await stream.send_all(client.data_to_send())
            done = False
            while not done and (chunk := await stream.receive_some(65536)):
                for event in client.receive_data(chunk):
                    if isinstance(event, h2.events.DataReceived | h2.events.ResponseReceived):
                        seen.append((event.stream_id, type(event).__name__))
                    done = done or (isinstance(event, h2.events.StreamEnded) and event.stream_id == 3)
                await stream.send_all(client.data_to_send())
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert outcome == ["kept"]
    assert [stream_id for stream_id, _ in seen] == [3, 3]  # Status answered; nothing on stream 1


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """A clock that runs in real time (sockets, fail_after) and that a test can jump."""
    return trio.testing.MockClock(rate=1.0)


async def test_a_hand_out_reply_is_not_written_once_the_deadline_has_passed(
    tmp_path: Path, clock: trio.testing.MockClock,
) -> None:
    """The VM is ready when the client's deadline has (all but) passed, and Trio has not yet
    cancelled the handler: the reply must not be written; the client learns DEADLINE_EXCEEDED."""
    outcome: list[str] = []

    async def hand_out(call: RpcCall[ProtoMessage]) -> None:
        await call.receive_one()
        # The VM's resume took the client's whole deadline, but for under REPLY_MARGIN.
        clock.jump(call.deadline - trio.current_time() - rpc_server.REPLY_MARGIN / 2)
        try:
            await call.reply(cache_pb2.GrpcVM(id="vm-1"))
        except rpc_server.CallGone:
            outcome.append("kept")
            raise
        outcome.append("handed out")

    server = RpcServer(SERVICE, {"GetBaseVM": Method(Empty, hand_out)})
    path = tmp_path / "s.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, bind_unix_socket(path))
        async with open_channel(path, SERVICE) as channel:
            with trio.fail_after(10), pytest.raises(DeadlineExceededError):
                await channel.unary("GetBaseVM", Empty(), cache_pb2.GrpcVM, timeout=5)
        nursery.cancel_scope.cancel()
    assert outcome == ["kept"]


async def test_a_lease_cancelled_as_a_signal_cancels_a_cli_is_released_on_its_own_call(
        tmp_path: Path) -> None:
    """``vmcache run`` stopped by SIGTERM: run_async cancels everything in the connection's
    block, the connection's reader and writer with the lease. The lease's shielded cleanup
    must still release the VM on the lease's own call, and hear that it ended: cancelled
    along, the reader marked the connection closed and reset the call, so the release never
    went out, the daemon learned nothing until the process closed its socket, and the client
    fell back to a second connection (StopVM) after all its other cleanups."""
    handle = VMHandle(id="0123456789ab", pid=2**22 + 1, start_time=1, qmp_socket="/nonexistent/qmp.sock",
                      agent_socket="/nonexistent/agent-0.sock", console_log="/nonexistent/console.log",
                      run_dir="/nonexistent/vm-0123456789ab", cpu=1, memory=256)
    seen: list[str] = []
    leased = trio.Event()

    async def take_vm(call: RpcCall[ProtoMessage]) -> None:  # the daemon's side, as _take_vm
        await call.receive_one()
        await call.send(cache_pb2.TakeReply(offer=grpc_vm(handle)))
        await call.receive()
        await call.send(cache_pb2.TakeReply(claimed=cache_pb2.TakeClaimed(vm_id=handle.id)))
        leased.set()
        try:
            message = await call.receive()
        except rpc_server.CallGone:
            seen.append("the call ended under the lease")
            raise
        seen.append(f"TakeVM: {message.WhichOneof('step') if message is not None else 'half-closed'}")
        await call.send(cache_pb2.TakeReply(ended=cache_pb2.TakeEnded(
            vm_id=handle.id, reason="the client released it")), last=True)
        await call.finish()

    async def stop_vm(call: RpcCall[ProtoMessage]) -> None:
        seen.append("StopVM")
        await call.receive_one()
        await call.send(cache_pb2.StopVMReply(vm_id=handle.id, was_running=True), last=True)
        await call.finish()

    server = RpcServer(SERVICE, {"TakeVM": Method(cache_pb2.TakeRequest, take_vm),
                                 "StopVM": Method(cache_pb2.StopVMRequest, stop_vm)})
    path = tmp_path / "s.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, bind_unix_socket(path))
        with trio.fail_after(10):
            with trio.CancelScope() as command:  # run_async's nursery
                async with vmcache.connect(path) as cache, cache.lease_vm() as vm:
                    assert vm.id == handle.id and leased.is_set()
                    command.cancel()  # SIGTERM
                    await trio.sleep_forever()
            assert command.cancelled_caught
            while server.active_calls:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert seen == ["TakeVM: release"]
