"""envd on the host (e2b_envd, e2b_process, e2b_files, e2b_users, in_guest/e2b_fs.py).

QEMU-free first: the multipart parser (boundaries split across pieces, oversized part
headers, a missing file field), the user mapping, the process table's fan-out over a fake
agent (a slow subscriber is cut off without holding the process or the others up; a process
outlives the stream that started it; its end stays known to Connect), the guest helper run
on this host. Then one real guest for the whole module (a VM of our own, launched in a
thread of the module's fixture; each test opens its own agent session on a user port):
commands, stdin, PTY, background + kill, connect, list, signals, timeout, users, files,
watches and a 20 MB upload, all through WIRE's ConnectRouter as the SDK calls it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from vmcache import e2b_files, e2b_process
from vmcache.e2b_connect import (
    CallContext,
    Code,
    ConnectError,
    ConnectRouter,
    EnvelopeDecoder,
    encode_envelope,
)
from vmcache.e2b_envd import handle_files, register_envd
from vmcache.e2b_files import MultipartParser, PartData, PartEnd, PartStart, parse_header_value
from vmcache.e2b_http import Headers, HttpError, HttpRequest, HttpResponse
from vmcache.e2b_users import as_user, resolve_path

T = TypeVar("T")
HELPER = Path(__file__).parent.parent / "src" / "vmcache" / "in_guest" / "e2b_fs.py"


# --- A sandbox over any agent -------------------------------------------------------------------


class Sandbox:
    """A minimal SandboxRuntime: services made once, tasks in the test's nursery."""

    def __init__(self, agent: Any, nursery: trio.Nursery, envs: dict[str, str] | None = None) -> None:
        self._agent = agent
        self._nursery = nursery
        self._services: dict[type, object] = {}
        self._envs = envs or {}
        self._ended = trio.Event()

    @property
    def id(self) -> str:
        return "sbx-test"

    @property
    def envs(self) -> dict[str, str]:
        return self._envs

    async def agent(self) -> Any:
        return self._agent

    def service(self, kind: type[T]) -> T:
        if kind not in self._services:
            make: Callable[[Sandbox], object] = kind
            self._services[kind] = make(self)
        return self._services[kind]  # type: ignore[return-value]

    def start_soon(self, fn: Callable[..., Any], *args: object) -> None:
        self._nursery.start_soon(fn, *args)

    @property
    def ended(self) -> trio.Event:
        return self._ended


def context(
    sandbox: Sandbox,
    user: str = "user",
    timeout: float | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> CallContext:
    deadline = None if timeout is None else trio.current_time() + timeout
    return CallContext(sandbox, user, deadline, Headers(headers))


# --- multipart ------------------------------------------------------------------------------------


def form(parts: Sequence[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b"".join(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n" for headers, data in parts)
    return body + f"--{boundary}--\r\n".encode()


def parse(
    body: bytes, pieces: Sequence[int], boundary: bytes = b"b0undary"
) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(boundary)
    events = []
    at = 0
    for size in [*pieces, len(body)]:
        events += parser.feed(body[at : at + size])
        at += size
        if at >= len(body):
            break
    parser.close()
    parts: list[tuple[dict[str, str], bytes]] = []
    for event in events:
        if isinstance(event, PartStart):
            parts.append((event.headers, b""))
        elif isinstance(event, PartData):
            parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
        else:
            assert isinstance(event, PartEnd)
    return parts


def test_multipart_parts_come_out_whole_however_the_body_is_split() -> None:
    tricky = b"line\r\n--b0undar not yet\r\n--b0undaryX? no: " + bytes(range(256)) * 3
    body = (
        b"preamble to ignore\r\n"
        + form(
            [
                ('Content-Disposition: form-data; name="file"; filename="/tmp/a b.txt"', tricky),
                ('Content-Disposition: form-data; name="other"', b""),
                (
                    'Content-Disposition: form-data; name="file"; filename="rel/x"\r\nContent-Type: x/y',
                    b"second",
                ),
            ]
        )
        + b"epilogue"
    )
    expected = parse(body, [len(body)])
    assert [data for _, data in expected] == [tricky, b"", b"second"]
    assert expected[2][0]["content-type"] == "x/y"
    assert parse(body, [1] * len(body)) == expected
    generator = random.Random(19)
    for _ in range(50):
        pieces = [generator.randint(1, 40) for _ in range(len(body))]
        assert parse(body, pieces) == expected


def test_multipart_refuses_oversized_part_headers_and_a_body_cut_short() -> None:
    parser = MultipartParser(b"b", max_headers=1024)
    with pytest.raises(HttpError) as raised:
        for _ in range(10):
            parser.feed(b"--b\r\nX-Long: " + b"a" * 200)
    assert raised.value.status == 400 and "headers are over 1024 bytes" in raised.value.message
    cut = MultipartParser(b"b")
    cut.feed(b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nhalf a file")
    with pytest.raises(HttpError, match="before its closing boundary"):
        cut.close()


def test_header_values_with_quotes_escapes_and_rfc5987() -> None:
    media, params = parse_header_value('form-data; name="file"; filename="a \\"q\\";b.txt"')
    assert media == "form-data" and params == {"name": "file", "filename": 'a "q";b.txt'}
    _, params = parse_header_value("form-data; name=file; filename=plain; filename*=UTF-8''%C3%A9t%C3%A9")
    assert params["filename"] == "été"
    assert parse_header_value("multipart/form-data; boundary=----x")[1] == {"boundary": "----x"}


class FakeUploadProcess:
    """The guest side of an upload: the filesystem helper (every request answered ok, each
    recorded) or the writer (its stdin is the file)."""

    def __init__(self, agent: FakeFileAgent, argv: list[str]) -> None:
        self._agent = agent
        self._helper = argv == e2b_files.HELPER_ARGV
        self.path = "" if self._helper else argv[4]
        self.pid = 200
        send, receive = trio.open_memory_channel[bytes](100)
        self._send = send
        self.stdin = self
        self.stdout: trio.abc.ReceiveStream = _ChannelStream(receive)
        self.stderr: trio.abc.ReceiveStream | None = _Ended()
        self._closed = trio.Event()
        self._content = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._helper:
            for line in bytes(data).splitlines():
                request = json.loads(line)
                self._agent.requests.append(request)
                self._send.send_nowait(json.dumps({"id": request["id"], "ok": {}}).encode() + b"\n")
        else:
            self._agent.chunks.append(len(data))
            self._content += data

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._helper:
            self._agent.files[self.path] = bytes(self._content)
        self._closed.set()

    async def wait(self) -> int:
        await self._closed.wait()
        return 0


class _Ended(trio.abc.ReceiveStream):
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class FakeFileAgent:
    """An agent whose processes are FakeUploadProcess: what each upload wrote, chunk by chunk."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.chunks: list[int] = []
        self.requests: list[dict[str, Any]] = []

    @asynccontextmanager
    async def open_process(self, argv: Sequence[str], **options: Any) -> AsyncIterator[FakeUploadProcess]:
        yield FakeUploadProcess(self, list(argv))


async def upload(
    body: bytes | list[bytes], target: str, content_type: str, headers: Sequence[tuple[str, str]] = ()
) -> tuple[HttpResponse | HttpError, FakeFileAgent]:
    agent = FakeFileAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        request = HttpRequest.make("POST", target, [("content-type", content_type), *headers], body)
        try:
            result: HttpResponse | HttpError = await handle_files(request, context(sandbox, "root"))
        except HttpError as error:
            result = error
        nursery.cancel_scope.cancel()
    return result, agent


async def test_multipart_upload_writes_each_file_part_as_it_arrives() -> None:
    big = os.urandom(300_000)
    body = form(
        [
            ('Content-Disposition: form-data; name="file"; filename="/root/big.bin"', big),
            ('Content-Disposition: form-data; name="note"', b"ignored"),
            ('Content-Disposition: form-data; name="file"; filename="rel/small"', b"hi"),
        ]
    )
    pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
    result, agent = await upload(pieces, "/files?username=root", "multipart/form-data; boundary=b0undary")
    assert isinstance(result, HttpResponse) and result.status == 200
    assert isinstance(result.body, bytes)
    assert json.loads(result.body) == [
        {"name": "big.bin", "type": "file", "path": "/root/big.bin"},
        {"name": "small", "type": "file", "path": "/root/rel/small"},
    ]
    assert agent.files == {"/root/big.bin": big, "/root/rel/small": b"hi"}
    assert max(agent.chunks) <= 7000  # streamed piece by piece, never gathered whole


async def test_upload_without_a_file_field_writes_nothing_and_a_nameless_part_is_refused() -> None:
    only_other = form([('Content-Disposition: form-data; name="other"; filename="x"', b"data")])
    result, agent = await upload(only_other, "/files", "multipart/form-data; boundary=b0undary")
    assert isinstance(result, HttpResponse) and result.body == b"[]" and agent.files == {}
    nameless = form([('Content-Disposition: form-data; name="file"', b"data")])
    result, agent = await upload(nameless, "/files?username=root", "multipart/form-data; boundary=b0undary")
    assert isinstance(result, HttpError) and result.status == 400 and "filename" in result.message
    result, _ = await upload(b"x", "/files?username=nobody&path=/x", "application/octet-stream")
    assert isinstance(result, HttpError) and result.status == 401
    result, _ = await upload(b"x", "/files?username=root", "text/plain")
    assert (
        isinstance(result, HttpError)
        and result.status == 400
        and "unsupported content type" in result.message
    )
    twice = form(
        [
            ('Content-Disposition: form-data; name="file"; filename="a"', b"1"),
            ('Content-Disposition: form-data; name="file"; filename="b"', b"2"),
        ]
    )
    result, _ = await upload(
        twice, "/files?username=root&path=/one", "multipart/form-data; boundary=b0undary"
    )
    assert isinstance(result, HttpError) and result.status == 400 and "same path" in result.message


async def test_octet_stream_upload_plain_and_gzip() -> None:
    data = os.urandom(100_000)
    result, agent = await upload(data, "/files?username=root&path=~/raw", "application/octet-stream")
    assert isinstance(result, HttpResponse) and agent.files == {"/root/raw": data}
    result, agent = await upload(
        gzip.compress(data),
        "/files?username=root&path=/z",
        "application/octet-stream",
        [("content-encoding", "gzip")],
    )
    assert isinstance(result, HttpResponse) and agent.files == {"/z": data}
    result, _ = await upload(b"x", "/files?username=root", "application/octet-stream")
    assert isinstance(result, HttpError) and result.status == 400


# --- users and ends -------------------------------------------------------------------------------


def test_users_as_envd_applies_them() -> None:
    argv, env, cwd = as_user("user", ["/bin/bash", "-c", "id"], {"HOME": "/override", "A": "1"}, None)
    assert argv[:1] == ["/usr/bin/setpriv"] and "--reuid=1000" in argv
    assert argv[-3:] == ["/bin/bash", "-c", "id"]
    assert env["USER"] == env["LOGNAME"] == "user" and env["HOME"] == "/override" and env["A"] == "1"
    assert cwd == "/home/user"
    argv, env, cwd = as_user("root", ["ls"], {}, "sub/../dir")
    assert argv == ["ls"] and env["HOME"] == "/root" and cwd == "/root/dir"
    with pytest.raises(ConnectError) as raised:
        as_user("admin", ["ls"], {}, None)
    assert raised.value.code is Code.INVALID_ARGUMENT
    assert resolve_path("user", "~/a") == "/home/user/a" and resolve_path("user", "/x/../y") == "/y"
    with pytest.raises(ConnectError):
        resolve_path("user", "~root/x")


def test_ends_in_envds_words() -> None:
    assert e2b_process.end_event(0) == {"exitCode": 0, "exited": True, "status": "exit status 0"}
    assert e2b_process.end_event(3)["error"] == "exit status 3"
    assert e2b_process.end_event(-9) == {
        "exitCode": -1,
        "exited": False,
        "status": "signal: killed",
        "error": "signal: killed",
    }
    assert e2b_process.end_event(-15)["status"] == "signal: terminated"


# --- the process table over a fake agent ------------------------------------------------------


class FakeStdin(trio.abc.SendStream):
    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.received += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


class FakeProcess:
    """A guest process the test drives: ``print`` writes its stdout, ``exit`` ends it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        send, receive = trio.open_memory_channel[bytes](10_000)
        self._send = send
        self._receive = receive
        self.stdin = FakeStdin()
        self.stdout: trio.abc.ReceiveStream = _ChannelStream(receive)
        self.stderr: trio.abc.ReceiveStream | None = None
        self.returncode: int | None = None
        self._exited = trio.Event()
        self.signals: list[int] = []

    def print(self, data: bytes) -> None:
        self._send.send_nowait(data)

    def exit(self, returncode: int) -> None:
        self.returncode = returncode
        self._send.close()
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        await trio.lowlevel.checkpoint()
        if self.returncode is None:
            self.exit(-sig)


class _ChannelStream(trio.abc.ReceiveStream):
    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._receive = receive

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class FakeProcessAgent:
    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self.started: list[dict[str, Any]] = []

    @asynccontextmanager
    async def open_process(self, argv: Sequence[str], **options: Any) -> AsyncIterator[FakeProcess]:
        process = FakeProcess(100 + len(self.processes))
        self.processes.append(process)
        self.started.append({"argv": list(argv), **options})
        try:
            yield process
        finally:
            if process.returncode is None:
                process.exit(-9)


def start_request(cmd: str = "cat", **extra: Any) -> dict[str, Any]:
    return {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": {"REQ": "2"}}, **extra}


def data_of(events: Sequence[dict[str, Any]], kind: str = "stdout") -> bytes:
    return b"".join(base64.b64decode(e["event"]["data"][kind]) for e in events if "data" in e["event"])


async def test_a_slow_subscriber_is_cut_off_while_the_process_and_others_go_on() -> None:
    agent = FakeProcessAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery, envs={"SBX": "1", "REQ": "1"})
        started = e2b_process.start(start_request(), context(sandbox))
        first = await started.__anext__()
        pid = first["event"]["start"]["pid"]
        process = agent.processes[0]
        assert agent.started[0]["env"]["SBX"] == "1" and agent.started[0]["env"]["REQ"] == "2"
        assert agent.started[0]["argv"][0] == "/usr/bin/setpriv" and agent.started[0]["cwd"] == "/home/user"
        reader = e2b_process.connect({"process": {"pid": pid}}, context(sandbox))
        assert (await reader.__anext__())["event"]["start"]["pid"] == pid
        got: list[dict[str, Any]] = []

        async def read_all() -> None:
            async for event in reader:
                got.append(event)

        nursery.start_soon(read_all)
        for index in range(e2b_process.SUBSCRIBER_EVENTS + 50):
            process.print(b"%d\n" % index)
            await trio.testing.wait_all_tasks_blocked()
        process.exit(0)
        await trio.testing.wait_all_tasks_blocked()
        # The Start stream never read: cut off with data_loss, after what it had queued.
        with pytest.raises(ConnectError) as raised:
            async for _ in started:
                pass
        assert raised.value.code is Code.DATA_LOSS and "connect to it again" in raised.value.message
        # The reader saw everything and the end.
        assert data_of(got) == b"".join(b"%d\n" % i for i in range(e2b_process.SUBSCRIBER_EVENTS + 50))
        assert got[-1]["event"]["end"] == {"exitCode": 0, "exited": True, "status": "exit status 0"}
        nursery.cancel_scope.cancel()


async def test_a_process_outlives_its_stream_and_its_end_stays_known_to_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = FakeProcessAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        started = e2b_process.start(start_request(tag="job"), context(sandbox))
        pid = (await started.__anext__())["event"]["start"]["pid"]
        await started.aclose()  # the client went away
        listed = await e2b_process.list_processes({}, context(sandbox))
        assert listed == {
            "processes": [
                {
                    "config": {"cmd": "/bin/bash", "args": ["-l", "-c", "cat"], "envs": {"REQ": "2"}},
                    "pid": pid,
                    "tag": "job",
                }
            ]
        }
        await e2b_process.send_input(
            {"process": {"tag": "job"}, "input": {"stdin": base64.b64encode(b"in").decode()}},
            context(sandbox),
        )
        assert agent.processes[0].stdin.received == b"in"
        with pytest.raises(ConnectError) as raised:
            await e2b_process.send_input(
                {"process": {"pid": pid}, "input": {"pty": "eA=="}}, context(sandbox)
            )
        assert raised.value.code is Code.INTERNAL
        with pytest.raises(ConnectError) as raised:
            await e2b_process.send_signal(
                {"process": {"pid": pid}, "signal": "SIGNAL_UNSPECIFIED"}, context(sandbox)
            )
        assert raised.value.code is Code.UNIMPLEMENTED
        await e2b_process.send_signal({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}, context(sandbox))
        await trio.testing.wait_all_tasks_blocked()
        assert await e2b_process.list_processes({}, context(sandbox)) == {"processes": []}
        late = [e async for e in e2b_process.connect({"process": {"tag": "job"}}, context(sandbox))]
        assert late == [
            {"event": {"start": {"pid": pid}}},
            {
                "event": {
                    "end": {
                        "exitCode": -1,
                        "exited": False,
                        "status": "signal: killed",
                        "error": "signal: killed",
                    }
                }
            },
        ]
        await trio.sleep(e2b_process.RETAIN_SECONDS + 1)
        with pytest.raises(ConnectError) as raised:
            async for _ in e2b_process.connect({"process": {"pid": pid}}, context(sandbox)):
                pass
        assert raised.value.code is Code.NOT_FOUND and f"pid {pid} not found" in raised.value.message
        nursery.cancel_scope.cancel()


async def test_quiet_streams_get_keepalives_and_the_deadline_bounds_the_command(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = FakeProcessAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        started = e2b_process.start(
            start_request(stdin=False),
            context(sandbox, timeout=30, headers=[("Keepalive-Ping-Interval", "5")]),
        )
        await started.__anext__()
        before = trio.current_time()
        assert await started.__anext__() == {"event": {"keepalive": {}}}
        assert trio.current_time() - before == pytest.approx(5)
        assert agent.started[0]["timeout"] == pytest.approx(30)  # the guest kills it then
        assert agent.processes[0].stdin.closed  # stdin: false is EOF at once
        await started.aclose()
        nursery.cancel_scope.cancel()


# --- the guest helper, run on this host --------------------------------------------------------


def test_the_guest_helper_answers_envds_shapes(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "f").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "d" / "f")
    helper = subprocess.Popen(
        [sys.executable, "-I", "-S", str(HELPER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert helper.stdin is not None and helper.stdout is not None

    def call(**request: Any) -> dict[str, Any]:
        assert helper.stdin is not None and helper.stdout is not None
        helper.stdin.write(json.dumps(request).encode() + b"\n")
        helper.stdin.flush()
        answer: dict[str, Any] = json.loads(helper.stdout.readline())
        return answer

    try:
        link = call(id=1, op="stat", path=str(tmp_path / "link"))["ok"]["entry"]
        assert link["type"] == "FILE_TYPE_FILE" and link["symlinkTarget"] == str(tmp_path / "d" / "f")
        assert link["permissions"].startswith("L") and link["modifiedTime"].endswith("Z")
        listed = call(id=2, op="list", path=str(tmp_path / "d"), depth=1)["ok"]["entries"]
        assert [(e["name"], e["type"], e["size"]) for e in listed] == [
            ("e", "FILE_TYPE_DIRECTORY", listed[0]["size"]),
            ("f", "FILE_TYPE_FILE", "3"),
        ]
        assert listed[0]["permissions"] == "drwxr-xr-x" and listed[0]["mode"] == 0o755
        assert call(id=3, op="stat", path=str(tmp_path / "nope"))["error"]["code"] == "not_found"
        assert (
            call(id=4, op="mkdir", path=str(tmp_path / "d"), uid=0, gid=0)["error"]["code"]
            == "already_exists"
        )
        assert call(id=5, op="list", path=str(tmp_path / "d" / "f"))["error"]["code"] == "invalid_argument"
        assert call(id=6, op="remove", path=str(tmp_path / "absent")) == {"id": 6, "ok": {}}
        (tmp_path / "d" / "e" / os.fsdecode(b"bad\xff")).write_bytes(b"")  # a name that is not UTF-8
        deep = call(id=7, op="list", path=str(tmp_path / "d"), depth=2)["ok"]["entries"]
        assert [e["name"] for e in deep] == ["e", "bad\ufffd", "f"]
        for entry in [link, *listed, *deep]:  # the host's shape check takes the helper's entries whole
            assert e2b_files.checked_entry(entry) == entry
    finally:
        helper.stdin.close()
        assert helper.wait(10) == 0


# --- one real guest for the rest of the module -------------------------------------------------

BIG = 20 * 1024 * 1024


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """The module's VM lives across tests: QEMU processes are counted for the module (``guest``)."""
    yield


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Path]:
    """One TCG guest for the module, booted by launch_vm in a thread with its own Trio loop;
    tests reach its agent through a user port (each test its own session). Yields its run
    directory."""
    from conftest import TCG_BOOT_TIMEOUT, qemu_pids, wait_until, write_config

    from vmcache.config import load_config, resolve_spec
    from vmcache.qemu import launch_vm

    tmp = tmp_path_factory.mktemp("envd")
    before = qemu_pids()
    ready = threading.Event()
    held: dict[str, Any] = {}

    async def main() -> None:
        spec = resolve_spec(load_config(write_config(tmp / "vmcache.toml")), run_root=tmp)
        with trio.fail_after(TCG_BOOT_TIMEOUT + 30):
            vm_context = launch_vm(spec)
            vm = await vm_context.__aenter__()
        try:
            held["run_dir"], held["token"], held["stop"] = (
                vm.run_dir,
                trio.lowlevel.current_trio_token(),
                trio.Event(),
            )
            ready.set()
            await held["stop"].wait()
        finally:
            with trio.CancelScope(shield=True):
                await vm_context.__aexit__(None, None, None)

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as error:  # reported by the fixture below
            held["error"] = error
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="envd-guest", daemon=True)
    thread.start()
    ready.wait(TCG_BOOT_TIMEOUT + 60)
    if "run_dir" not in held:
        thread.join(30)
        pytest.fail(f"the module's guest did not boot: {held.get('error')!r}")
    try:
        yield held["run_dir"]
    finally:
        trio.from_thread.run_sync(held["stop"].set, trio_token=held["token"])
        thread.join(60)
    assert wait_until(lambda: qemu_pids() == before, 10), "the module left QEMU processes"


class Envd:
    """WIRE's ConnectRouter with envd's procedures, over one agent session of the guest."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.router = ConnectRouter()
        register_envd(self.router)

    def _context(self, user: str) -> CallContext:
        return context(self.sandbox, user)

    async def unary(self, method: str, message: dict[str, Any], *, user: str = "user") -> dict[str, Any]:
        request = HttpRequest.make(
            "POST", method, [("content-type", "application/json")], json.dumps(message).encode()
        )
        response = await self.router.handle(request, self._context(user))
        assert isinstance(response.body, bytes)
        answer: dict[str, Any] = json.loads(response.body)
        if response.status != 200:
            raise ConnectError(Code(answer["code"]), answer["message"])
        return answer

    async def client_stream(
        self, method: str, messages: Sequence[dict[str, Any]], *, user: str = "user"
    ) -> dict[str, Any]:
        body = b"".join(encode_envelope(0, json.dumps(item).encode()) for item in messages)
        request = HttpRequest.make(
            "POST",
            method,
            [("content-type", "application/connect+json")],
            [body[i : i + 7] for i in range(0, len(body), 7)],
        )
        response = await self.router.handle(request, self._context(user))
        assert isinstance(response.body, bytes)
        envelopes = list(EnvelopeDecoder().feed(response.body))
        end = json.loads(envelopes[-1][1])
        if "error" in end:
            raise ConnectError(Code(end["error"]["code"]), end["error"]["message"])
        answer: dict[str, Any] = json.loads(envelopes[0][1])
        return answer

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        message: dict[str, Any],
        *,
        user: str = "user",
        timeout_ms: int | None = None,
        keepalive: int | None = None,
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The stream's messages as they come; an end with an error raises ConnectError;
        leaving the block early is the client going away."""
        headers = [("content-type", "application/connect+json")]
        if timeout_ms is not None:
            headers.append(("connect-timeout-ms", str(timeout_ms)))
        if keepalive is not None:
            headers.append(("keepalive-ping-interval", str(keepalive)))
        request = HttpRequest.make("POST", method, headers, encode_envelope(0, json.dumps(message).encode()))
        response = await self.router.handle(request, self._context(user))
        body = response.body
        assert response.status == 200 and not isinstance(body, bytes)

        async def messages() -> AsyncIterator[dict[str, Any]]:
            decoder = EnvelopeDecoder()
            async for piece in body:
                for flags, payload in decoder.feed(piece):
                    value = json.loads(payload)
                    if flags & 0x02:
                        if "error" in value:
                            raise ConnectError(Code(value["error"]["code"]), value["error"]["message"])
                        return
                    yield value

        try:
            yield messages()
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    async def run(self, cmd: str, *, user: str = "user", **extra: Any) -> tuple[bytes, bytes, dict[str, Any]]:
        """bash -l -c cmd as commands.run sends it: (stdout, stderr, end)."""
        out, err = bytearray(), bytearray()
        end: dict[str, Any] = {}
        message = {
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd], **extra.pop("process", {})},
            "stdin": False,
            **extra,
        }
        async with self.stream("/process.Process/Start", message, user=user) as events:
            async for item in events:
                event = item["event"]
                if "data" in event:
                    out += base64.b64decode(event["data"].get("stdout", ""))
                    err += base64.b64decode(event["data"].get("stderr", ""))
                end = event.get("end", end)
        return bytes(out), bytes(err), end


@asynccontextmanager
async def envd(run_dir: Path, envs: dict[str, str] | None = None) -> AsyncIterator[Envd]:
    from vmcache.agent_client import AgentConnection

    with trio.fail_after(30):
        stream = await trio.open_unix_socket(str(run_dir / "agent-0.sock"))
    async with AgentConnection.open(stream, timeout=30) as agent, trio.open_nursery() as nursery:
        yield Envd(Sandbox(agent, nursery, envs))
        nursery.cancel_scope.cancel()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.qemu
async def test_commands_run_as_the_user_or_root_with_envs_and_cwd(guest: Path) -> None:
    with trio.fail_after(60):
        async with envd(guest, envs={"FROM_SANDBOX": "s", "BOTH": "sandbox"}) as client:
            out, _, end = await client.run(
                'whoami; echo "$HOME"; pwd; echo "$FROM_SANDBOX $BOTH"; id -u',
                process={"envs": {"BOTH": "request"}},
            )
            assert out.decode().split("\n")[:5] == ["user", "/home/user", "/home/user", "s request", "1000"]
            assert end == {"exitCode": 0, "exited": True, "status": "exit status 0"}
            out, _, _ = await client.run("whoami; echo $HOME; pwd", user="root", process={"cwd": "/tmp"})
            assert out == b"root\n/root\n/tmp\n"
            out, err, end = await client.run("echo out; echo err >&2; exit 3", process={"cwd": "sub/.."})
            assert (out, err, end["exitCode"], end["error"]) == (b"out\n", b"err\n", 3, "exit status 3")
            with pytest.raises(ConnectError) as raised:
                await client.run("true", process={"cwd": "/no/such/dir"})
            assert raised.value.code is Code.INVALID_ARGUMENT and "/no/such/dir" in raised.value.message
            with pytest.raises(ConnectError) as raised:
                await client.run("true", user="admin")
            assert raised.value.code is Code.INVALID_ARGUMENT


@pytest.mark.qemu
async def test_stdin_pty_resize_and_signals(guest: Path) -> None:
    with trio.fail_after(60):
        async with envd(guest) as client:
            start = {"process": {"cmd": "/bin/cat"}, "stdin": True}
            async with client.stream("/process.Process/Start", start) as events:
                pid = (await events.__anext__())["event"]["start"]["pid"]
                await client.unary(
                    "/process.Process/SendInput",
                    {"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}},
                )
                echoed = await events.__anext__()
                assert base64.b64decode(echoed["event"]["data"]["stdout"]) == b"hello\n"
                inputs: list[dict[str, Any]] = [
                    {"start": {"process": {"pid": pid}}},
                    {"keepalive": {}},
                    *({"data": {"input": {"stdin": b64(b"part %d\n" % i)}}} for i in range(3)),
                ]
                assert await client.client_stream("/process.Process/StreamInput", inputs) == {}
                streamed = b""
                while streamed != b"part 0\npart 1\npart 2\n":  # in order, however they were cut
                    streamed += base64.b64decode((await events.__anext__())["event"]["data"]["stdout"])
                await client.unary("/process.Process/CloseStdin", {"process": {"pid": pid}})
                rest = [item async for item in events]
                assert rest[-1]["event"]["end"]["exitCode"] == 0

            pty = {
                "process": {
                    "cmd": "/bin/bash",
                    "args": ["-c", "stty size; read line; stty size; echo got $line"],
                },
                "pty": {"size": {"rows": 24, "cols": 80}},
            }
            output = b""
            async with client.stream("/process.Process/Start", pty) as events:
                pid = (await events.__anext__())["event"]["start"]["pid"]
                while b"24 80" not in output:
                    output += base64.b64decode((await events.__anext__())["event"]["data"]["pty"])
                await client.unary(
                    "/process.Process/Update",
                    {"process": {"pid": pid}, "pty": {"size": {"rows": 40, "cols": 100}}},
                )
                await client.unary(
                    "/process.Process/SendInput", {"process": {"pid": pid}, "input": {"pty": b64(b"x\r")}}
                )
                async for item in events:
                    if "data" in item["event"]:
                        output += base64.b64decode(item["event"]["data"]["pty"])
                    end = item["event"].get("end")
            assert b"40 100" in output and b"got x" in output and end is not None and end["exitCode"] == 0

            term = {"process": {"cmd": "/bin/sleep", "args": ["30"]}}
            async with client.stream("/process.Process/Start", term) as events:
                pid = (await events.__anext__())["event"]["start"]["pid"]
                await client.unary(
                    "/process.Process/SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"}
                )
                ends = [item["event"]["end"] async for item in events if "end" in item["event"]]
            assert ends == [
                {
                    "exitCode": -1,
                    "exited": False,
                    "status": "signal: terminated",
                    "error": "signal: terminated",
                }
            ]


@pytest.mark.qemu
async def test_background_commands_outlive_their_stream_and_are_killed_by_pid(guest: Path) -> None:
    with trio.fail_after(60):
        async with envd(guest) as client:
            ticker = {
                "process": {"cmd": "/bin/bash", "args": ["-c", "while :; do echo tick; sleep 0.2; done"]},
                "tag": "ticker",
            }
            async with client.stream("/process.Process/Start", ticker) as events:
                pid = (await events.__anext__())["event"]["start"]["pid"]
            # The client went away; the command runs on, listed with its config.
            listed = await client.unary("/process.Process/List", {})
            assert [(p["pid"], p.get("tag"), p["config"]["cmd"]) for p in listed["processes"]] == [
                (pid, "ticker", "/bin/bash")
            ]
            async with client.stream("/process.Process/Connect", {"process": {"tag": "ticker"}}) as events:
                assert (await events.__anext__())["event"]["start"]["pid"] == pid
                assert base64.b64decode((await events.__anext__())["event"]["data"]["stdout"]) == b"tick\n"
                await client.unary(
                    "/process.Process/SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}
                )
                ends = [item["event"]["end"] async for item in events if "end" in item["event"]]
            assert ends[0]["status"] == "signal: killed"
            assert (await client.unary("/process.Process/List", {}))["processes"] == []
            with pytest.raises(ConnectError) as raised:
                await client.unary(
                    "/process.Process/SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}
                )
            assert raised.value.code is Code.NOT_FOUND


@pytest.mark.qemu
async def test_the_timeout_ends_the_stream_and_kills_the_command(guest: Path) -> None:
    with trio.fail_after(60):
        async with envd(guest) as client:
            sleeper = {"process": {"cmd": "/bin/sleep", "args": ["60"]}}
            async with client.stream("/process.Process/Start", sleeper, timeout_ms=1500) as events:
                pid = (await events.__anext__())["event"]["start"]["pid"]
                with pytest.raises(ConnectError) as raised:
                    async for _ in events:
                        pass
            assert raised.value.code is Code.DEADLINE_EXCEEDED
            while (await client.unary("/process.Process/List", {}))["processes"]:
                await trio.sleep(0.1)
            async with client.stream("/process.Process/Connect", {"process": {"pid": pid}}) as events:
                ends = [item["event"]["end"] async for item in events if "end" in item["event"]]
            assert ends[0]["status"] == "signal: killed"


@pytest.mark.qemu
async def test_files_stat_list_mkdir_move_remove_and_watch(guest: Path) -> None:
    fs = "/filesystem.Filesystem/"
    with trio.fail_after(60):
        async with envd(guest) as client:
            made = (await client.unary(fs + "MakeDir", {"path": "work/deep/er"}))["entry"]
            assert (made["path"], made["type"], made["owner"], made["group"]) == (
                "/home/user/work/deep/er",
                "FILE_TYPE_DIRECTORY",
                "user",
                "user",
            )
            with pytest.raises(ConnectError) as raised:
                await client.unary(fs + "MakeDir", {"path": "/home/user/work"})
            assert raised.value.code is Code.ALREADY_EXISTS
            listed = (await client.unary(fs + "ListDir", {"path": "~/work", "depth": 2}))["entries"]
            assert [e["path"] for e in listed] == ["/home/user/work/deep", "/home/user/work/deep/er"]
            assert len((await client.unary(fs + "ListDir", {"path": "work"}))["entries"]) == 1
            with pytest.raises(ConnectError) as raised:
                await client.unary(fs + "Stat", {"path": "/nothing/here"})
            assert raised.value.code is Code.NOT_FOUND

            watcher = (await client.unary(fs + "CreateWatcher", {"path": "work", "recursive": True}))[
                "watcherId"
            ]
            async with client.stream(fs + "WatchDir", {"path": "/home/user/work"}) as watched:
                assert await watched.__anext__() == {"start": {}}
                await client.run("echo data > ~/work/new.txt")
                seen = []
                while ("new.txt", "EVENT_TYPE_WRITE") not in seen:
                    event = (await watched.__anext__())["filesystem"]
                    seen.append((event["name"], event["type"]))
                assert seen[0] == ("new.txt", "EVENT_TYPE_CREATE")
            moved = await client.unary(
                fs + "Move", {"source": "work/new.txt", "destination": "work/deep/er/x"}
            )
            assert moved["entry"]["path"] == "/home/user/work/deep/er/x" and moved["entry"]["size"] == "5"
            kinds: list[tuple[str, str]] = []
            while ("deep/er/x", "EVENT_TYPE_CREATE") not in kinds:  # inotify's events come when they come
                events = (await client.unary(fs + "GetWatcherEvents", {"watcherId": watcher}))["events"]
                kinds += [(e["name"], e["type"]) for e in events]
            assert kinds[:2] == [("new.txt", "EVENT_TYPE_CREATE"), ("new.txt", "EVENT_TYPE_WRITE")]
            assert ("new.txt", "EVENT_TYPE_RENAME") in kinds
            await client.unary(fs + "Remove", {"path": "work"})
            await client.unary(fs + "Remove", {"path": "work"})  # not there: no error, as envd
            await client.unary(fs + "RemoveWatcher", {"watcherId": watcher})
            with pytest.raises(ConnectError) as raised:
                await client.unary(fs + "GetWatcherEvents", {"watcherId": watcher})
            assert raised.value.code is Code.NOT_FOUND
            with pytest.raises(ConnectError) as raised:
                await client.unary(fs + "Stat", {"path": "work"})
            assert raised.value.code is Code.NOT_FOUND


@pytest.mark.qemu
async def test_a_20_mb_multipart_upload_reads_back_byte_exact(
    guest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(20).randbytes(BIG)
    boundary = "----vmcache-upload-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="up/big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    with trio.fail_after(60):
        async with envd(guest) as client:
            request = HttpRequest.make(
                "POST", "/files", [("content-type", f"multipart/form-data; boundary={boundary}")], pieces
            )
            watcher = (
                await client.unary("/filesystem.Filesystem/CreateWatcher", {"path": "", "recursive": True})
            )["watcherId"]
            response = await handle_files(request, context(client.sandbox))
            assert isinstance(response.body, bytes)
            assert json.loads(response.body) == [
                {"name": "big.bin", "type": "file", "path": "/home/user/up/big.bin"}
            ]
            names: set[str] = set()
            while "up/big.bin" not in names:  # written in place: a watcher sees no other name
                got = await client.unary("/filesystem.Filesystem/GetWatcherEvents", {"watcherId": watcher})
                names |= {event["name"] for event in got["events"]}
            assert names == {"up", "up/big.bin"}
            entry = (await client.unary("/filesystem.Filesystem/Stat", {"path": "up/big.bin"}))["entry"]
            assert (entry["size"], entry["owner"]) == (str(BIG), "user")
            assert (await client.unary("/filesystem.Filesystem/Stat", {"path": "up"}))["entry"][
                "owner"
            ] == "user"
            download = await handle_files(
                HttpRequest.make("GET", "/files?path=%2Fhome%2Fuser%2Fup%2Fbig.bin"), context(client.sandbox)
            )
            digest = hashlib.sha256()
            largest = 0
            assert not isinstance(download.body, bytes)
            async for piece in download.body:
                digest.update(piece)
                largest = max(largest, len(piece))
            assert digest.digest() == hashlib.sha256(data).digest() and largest <= e2b_files.DOWNLOAD_CHUNK
            for target, status in (
                ("/files?path=/home/user/none", 404),
                ("/files?path=/home/user", 400),
                ("/files?path=x&username=admin", 401),
            ):
                with pytest.raises(HttpError) as raised:
                    await handle_files(HttpRequest.make("GET", target), context(client.sandbox))
                assert raised.value.status == status
            await client.unary("/filesystem.Filesystem/Remove", {"path": "up"})
            # A write to a named pipe nobody reads gives up once it stops moving; its writer goes.
            monkeypatch.setattr(e2b_files, "FILES_TIMEOUT", 2.0)
            await client.run("mkfifo ~/fifo")
            octet = [("content-type", "application/octet-stream")]
            stuck = HttpRequest.make("POST", "/files?path=fifo", octet, b"x")
            with pytest.raises(HttpError) as raised:
                await handle_files(stuck, context(client.sandbox))
            assert raised.value.status == 500 and "context deadline exceeded" in raised.value.message
            left = "sleep 0.5; pgrep -f 'e2b-uploa[d]'; pgrep -x cat; rm /home/user/fifo"
            out, _, _ = await client.run(left, user="root")
            assert out == b""


async def test_a_pty_keeps_its_input_whatever_stdin_says() -> None:
    agent = FakeProcessAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        request = start_request(stdin=False, pty={"size": {"rows": 5, "cols": 7}})
        started = e2b_process.start(request, context(sandbox))
        pid = (await started.__anext__())["event"]["start"]["pid"]
        assert agent.started[0]["pty"].rows == 5 and not agent.processes[0].stdin.closed
        await e2b_process.send_input(
            {"process": {"pid": pid}, "input": {"pty": b64(b"ls\r")}}, context(sandbox)
        )
        assert agent.processes[0].stdin.received == b"ls\r"
        with pytest.raises(ConnectError) as raised:
            await e2b_process.close_stdin({"process": {"pid": pid}}, context(sandbox))
        assert raised.value.code is Code.UNKNOWN and "Ctrl+D" in raised.value.message
        await started.aclose()
        nursery.cancel_scope.cancel()


class FakeReadAgent:
    """An agent with open_file only: whether each opened file was let go."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    @asynccontextmanager
    async def open_file(self, path: str) -> AsyncIterator[trio.abc.ReceiveStream]:
        send, receive = trio.open_memory_channel[bytes](4)
        send.send_nowait(b"content")
        send.close()
        try:
            yield _ChannelStream(receive)
        finally:
            self.closed.append(path)


async def test_a_download_lets_the_guest_file_go_even_if_never_read() -> None:
    agent = FakeReadAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        response = await handle_files(HttpRequest.make("GET", "/files?path=a"), context(sandbox))
        assert response.status == 200 and not isinstance(response.body, bytes) and agent.closed == []
        await response.body.aclose()  # type: ignore[attr-defined]  # the client went away at once
        assert agent.closed == ["/home/user/a"]
        response = await handle_files(HttpRequest.make("GET", "/files?path=/b"), context(sandbox))
        assert not isinstance(response.body, bytes)
        assert [piece async for piece in response.body] == [b"content"] and agent.closed[-1] == "/b"


async def test_a_lost_agent_ends_the_stream_as_unavailable_and_not_the_sandbox(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from vmcache.errors import AgentError

    class Broken(trio.abc.ReceiveStream):
        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            await trio.lowlevel.checkpoint()
            raise AgentError("the connection to the guest agent broke")

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    class LostProcess(FakeProcess):
        def __init__(self, pid: int) -> None:
            super().__init__(pid)
            self.stdout = Broken()

        async def wait(self) -> int:
            await trio.lowlevel.checkpoint()
            raise AgentError("the connection to the guest agent broke")

    class LostAgent(FakeProcessAgent):
        @asynccontextmanager
        async def open_process(self, argv: Sequence[str], **options: Any) -> AsyncIterator[FakeProcess]:
            yield LostProcess(300)

    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(LostAgent(), nursery)
        started = e2b_process.start(start_request(), context(sandbox))
        assert (await started.__anext__())["event"]["start"]["pid"] == 300
        with pytest.raises(ConnectError) as raised:
            async for _ in started:
                pass
        assert raised.value.code is Code.UNAVAILABLE
        assert await e2b_process.list_processes({}, context(sandbox)) == {"processes": []}
        nursery.cancel_scope.cancel()  # the nursery itself saw no error
    assert not [record for record in caplog.records if record.levelname == "ERROR"]  # an ending, not a bug


# --- review findings: paths, names, a hostile helper, watchers, a stuck upload -------------------


def test_paths_fold_every_run_of_slashes_as_envds_filepath_clean() -> None:
    assert resolve_path("root", "//tmp/x") == "/tmp/x"  # never "/": Remove("//tmp/x") removed the root
    assert resolve_path("root", "///tmp//x/") == "/tmp/x"
    assert resolve_path("root", "/./tmp/./x") == "/tmp/x"
    assert resolve_path("root", "/../../tmp/x") == "/tmp/x"
    assert resolve_path("root", "//") == "/" and resolve_path("root", "/..") == "/"
    assert resolve_path("user", "../../../etc") == "/etc"


async def test_a_download_of_a_non_ascii_name_has_an_ascii_header_with_the_name_in_utf8() -> None:
    import h11

    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(FakeReadAgent(), nursery)
        response = await handle_files(HttpRequest.make("GET", "/files?path=/tmp/%C3%A9t%C3%A9.txt"),
                                      context(sandbox))
        await response.body.aclose()  # type: ignore[union-attr]
    value = dict(response.headers)["content-disposition"]
    h11.Response(status_code=200, headers=response.headers)  # h11 takes it (header values are ASCII)
    assert value.isascii() and parse_header_value(value) == ("inline", {"filename": "été.txt"})
    assert e2b_files.content_disposition("plain.txt") == 'inline; filename="plain.txt"'


class HelperAgent(FakeFileAgent):
    """A FakeFileAgent that keeps its filesystem helper, to send lines as the guest would."""

    helper: FakeUploadProcess | None = None

    @asynccontextmanager
    async def open_process(self, argv: Sequence[str], **options: Any) -> AsyncIterator[FakeUploadProcess]:
        process = FakeUploadProcess(self, list(argv))
        if list(argv) == e2b_files.HELPER_ARGV:
            self.helper = process
        yield process


async def test_a_hostile_helper_cannot_kill_the_helper_or_grow_a_watcher_unbounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = HelperAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        ctx = context(sandbox, "root")
        with trio.fail_after(10):
            watcher_id = (await e2b_files.create_watcher({"path": "/tmp"}, ctx))["watcherId"]
            assert agent.helper is not None
            ident = agent.requests[-1]["watch"]
            sink = sandbox.service(e2b_files.Watchers).by_id[watcher_id][1]

            async def send(message: object) -> None:
                changed = sink.changed
                assert agent.helper is not None
                await agent.helper._send.send(json.dumps(message).encode() + b"\n")
                await changed.wait()

            # Nested past the parser's recursion limit, small (on the loop) and big (in a thread).
            await agent.helper._send.send(b"[" * 100_000 + b"\n")
            await agent.helper._send.send(b"[" * (e2b_files.PARSE_IN_THREAD + 10) + b"\n")
            entry = {"name": "c", "type": "FILE_TYPE_FILE", "path": "/tmp/c", "size": "1", "mode": 0o644,
                     "permissions": "-rw-r--r--", "owner": "root", "group": "root",
                     "modifiedTime": "2026-01-01T00:00:00Z", "extra": "x" * 100}
            await send({"watch": ident, "events": [
                {"name": "a", "type": "EVENT_TYPE_CREATE"},
                {"name": "x" * 5000, "type": "EVENT_TYPE_CREATE"},  # longer than any guest path
                {"name": "b", "type": "EVENT_TYPE_BOGUS"},
                {"name": "c", "type": "EVENT_TYPE_WRITE", "entry": {**entry, "mode": "rw"}},
                {"name": "c", "type": "EVENT_TYPE_WRITE", "entry": entry},
            ]})
            events = (await e2b_files.get_watcher_events({"watcherId": watcher_id}, ctx))["events"]
            assert events == [{"name": "a", "type": "EVENT_TYPE_CREATE"},
                              {"name": "c", "type": "EVENT_TYPE_WRITE",
                               "entry": {k: v for k, v in entry.items() if k != "extra"}}]
            # The helper still answers.
            assert await e2b_files.list_dir({"path": "/"}, ctx) == {"entries": []}
            # Far fewer than MAX_WATCH_EVENTS events, but long ones: the byte bound ends the watcher.
            long_event = {"name": "n" * 4000, "type": "EVENT_TYPE_CREATE"}
            for _ in range(e2b_files.MAX_WATCH_BYTES // (4000 * 256) + 1):
                await send({"watch": ident, "events": [long_event] * 256})
            assert sink.error is not None and not sink.events  # an ended sink keeps no events
            with pytest.raises(ConnectError) as raised:
                await e2b_files.get_watcher_events({"watcherId": watcher_id}, ctx)
            assert raised.value.code is Code.DATA_LOSS
            # Reported: the watcher is gone.
            assert sandbox.service(e2b_files.Watchers).by_id == {}
            with pytest.raises(ConnectError) as raised:
                await e2b_files.get_watcher_events({"watcherId": watcher_id}, ctx)
            assert raised.value.code is Code.NOT_FOUND
        nursery.cancel_scope.cancel()
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_create_watcher_is_bounded_even_when_the_guest_ends_watches() -> None:
    agent = HelperAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        ctx = context(sandbox, "root")
        with trio.fail_after(10):
            for _ in range(e2b_files.MAX_WATCHERS):
                watcher_id = (await e2b_files.create_watcher({"path": "/tmp"}, ctx))["watcherId"]
                sink = sandbox.service(e2b_files.Watchers).by_id[watcher_id][1]
                changed = sink.changed
                assert agent.helper is not None
                error = {"code": "not_found", "message": "gone"}
                await agent.helper._send.send(json.dumps({"watch": agent.requests[-1]["watch"],
                                                          "error": error}).encode() + b"\n")
                await changed.wait()
            with pytest.raises(ConnectError) as raised:
                await e2b_files.create_watcher({"path": "/tmp"}, ctx)
            assert raised.value.code is Code.RESOURCE_EXHAUSTED
        nursery.cancel_scope.cancel()


class StuckWriterAgent(FakeFileAgent):
    """Uploads write to a named pipe nobody reads: the writer never ends by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: list[str] = []

    @asynccontextmanager
    async def open_process(self, argv: Sequence[str], **options: Any) -> AsyncIterator[FakeUploadProcess]:
        process = FakeUploadProcess(self, list(argv))
        if list(argv) != e2b_files.HELPER_ARGV:
            process.stderr = _ChannelStream(trio.open_memory_channel[bytes](0)[1])  # never ends
            process.wait = trio.sleep_forever  # type: ignore[method-assign]
        try:
            yield process
        finally:
            self.killed.append(process.path)


async def test_an_upload_that_stops_moving_is_answered_and_its_writer_killed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = StuckWriterAgent()
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(agent, nursery)
        request = HttpRequest.make("POST", "/files?username=root&path=/tmp/fifo",
                                   [("content-type", "application/octet-stream")], b"x")
        with trio.fail_after(e2b_files.FILES_TIMEOUT * 2):
            start = trio.current_time()
            with pytest.raises(HttpError) as raised:
                await handle_files(request, context(sandbox, "root"))
        assert trio.current_time() - start == pytest.approx(e2b_files.FILES_TIMEOUT, abs=1)
        assert raised.value.status == 500 and "context deadline exceeded" in raised.value.message
        assert agent.killed == ["/tmp/fifo"]
        nursery.cancel_scope.cancel()


def test_the_guest_helper_never_sends_a_line_the_host_refuses(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("e2b_fs_under_test", HELPER)
    assert spec is not None and spec.loader is not None
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    assert helper.MAX_ANSWER <= e2b_files.MAX_HELPER_LINE
    helper.write({"watch": 3, "events": [{"name": "a", "type": "EVENT_TYPE_CREATE"}] * 600})
    lines = capsysbinary.readouterr().out.splitlines()
    assert [len(json.loads(line)["events"]) for line in lines] == [256, 256, 88]
    helper.write({"id": 9, "ok": {"entries": [{"name": "x" * 4000}] * (helper.MAX_ANSWER // 4000 + 1)}})
    (line,) = capsysbinary.readouterr().out.splitlines()
    assert json.loads(line)["error"]["code"] == "resource_exhausted"


class SlowHelperAgent(FakeFileAgent):
    """An agent whose helper takes longer than CALL_TIMEOUT to start, or fails to."""

    def __init__(self, delay: float, fail: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.fail = fail
        self.opened = 0

    @asynccontextmanager
    async def open_process(self, argv: Sequence[str], **options: Any) -> AsyncIterator[FakeUploadProcess]:
        from vmcache.errors import AgentError

        self.opened += 1
        await trio.sleep(self.delay)
        if self.fail:
            raise AgentError("the guest agent refused to start it")
        yield FakeUploadProcess(self, list(argv))


async def test_the_helper_starts_once_however_slowly_and_again_after_it_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = SlowHelperAgent(e2b_files.CALL_TIMEOUT + 10)
    async with trio.open_nursery() as nursery:
        ctx = context(Sandbox(slow, nursery), "root")
        with pytest.raises(ConnectError) as raised:
            await e2b_files.list_dir({"path": "/"}, ctx)
        assert raised.value.code is Code.UNAVAILABLE
        assert await e2b_files.list_dir({"path": "/"}, ctx) == {"entries": []}  # the same start, done
        assert slow.opened == 1
        nursery.cancel_scope.cancel()
    failing = SlowHelperAgent(1, fail=True)
    async with trio.open_nursery() as nursery:
        ctx = context(Sandbox(failing, nursery), "root")
        for _ in range(2):
            with pytest.raises(ConnectError) as raised:
                await e2b_files.list_dir({"path": "/"}, ctx)
            assert raised.value.code is Code.UNAVAILABLE and "refused to start it" in raised.value.message
        assert failing.opened == 2  # each call tried again
        nursery.cancel_scope.cancel()
