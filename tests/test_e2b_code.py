"""E2B's code interpreter (port 49999): the host's handler and the guest's kernel.

Three layers, cheapest first: the parsing of kernel lines and their conversion to E2B's
NDJSON (no process at all); the whole path through the real guest agent and the real
``e2b_kernel.py`` run on this host over a socketpair (no QEMU: most behaviour is checked
here); and one module-scoped real guest that runs the kernel from its image as ``user``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from conftest import TCG_BOOT_TIMEOUT, write_config

from vmcache import e2b_code
from vmcache.agent_client import AgentConnection, guest_agent_files
from vmcache.config import load_config, resolve_spec
from vmcache.e2b_code import (
    Execution,
    KernelProtocolError,
    handle_code,
    parse_message,
    result_event,
    split_lines,
    stream_execution,
    to_event,
)
from vmcache.e2b_connect import CallContext
from vmcache.e2b_http import Headers, HttpRequest, HttpResponse
from vmcache.errors import VMGoneError
from vmcache.qemu import launch_vm

T = TypeVar("T")
KERNEL_SOURCE = Path(e2b_code.__file__).parent / "in_guest" / "e2b_kernel.py"


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """Overrides conftest's check for the QEMU-free tests (the real-guest fixture counts its
    own): other runs on this machine start QEMUs meanwhile."""
    yield


# --- Kernel lines and E2B's events (no process) --------------------------------------------------


def test_lines_are_split_across_reads_and_bounded() -> None:
    buffer = bytearray()
    assert split_lines(buffer, b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert split_lines(buffer, b":2}\n\n") == [b'{"b":2}', b""]
    assert buffer == b""
    with pytest.raises(KernelProtocolError, match="over 10 bytes"):
        split_lines(bytearray(), b"x" * 11, max_line=10)
    with pytest.raises(KernelProtocolError, match="over 10 bytes"):
        split_lines(bytearray(), b"x" * 20 + b"\n", max_line=10)
    assert split_lines(bytearray(), b"x" * 10 + b"\n", max_line=10) == [b"x" * 10]


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'{"type": 3}', b'{"no": "type"}',
                                  b"[" * 100_000, b"\xff\xfe"])
def test_malformed_kernel_lines_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(KernelProtocolError):
        parse_message(line)


@pytest.mark.parametrize("message", [
    {"type": "stdout", "text": 3},
    {"type": "stderr"},
    {"type": "start", "execution_count": True},
    {"type": "start", "execution_count": -1},
    {"type": "error", "name": "E", "value": None, "traceback": ""},
    {"type": "result", "data": [], "is_main_result": True},
    {"type": "result", "data": {"text/plain": 5}, "is_main_result": True},
    {"type": "result", "data": {"text/plain": "x"}, "is_main_result": "yes"},
    {"type": "result", "data": {f"x/{n}": "" for n in range(100)}, "is_main_result": True},
    {"type": "surprise"},
])
def test_invalid_kernel_messages_are_protocol_errors(message: dict[str, Any]) -> None:
    with pytest.raises(KernelProtocolError):
        to_event(message)


def test_a_result_is_shaped_as_e2b_servers() -> None:
    """E2B's server: known MIME types in their fields, text/plain's quotes stripped, the rest
    in extra, None fields left out."""
    event = result_event({"text/plain": "'hello'", "text/html": "<b>x</b>", "image/png": "iVBO",
                          "application/json": {"a": 1}, "x/custom": [1]}, True)
    assert event == {"type": "result", "text": "hello", "html": "<b>x</b>", "png": "iVBO",
                     "json": {"a": 1}, "extra": {"x/custom": [1]}, "is_main_result": True}
    assert next(iter(event)) == "type" and list(event)[-2:] == ["extra", "is_main_result"]
    assert result_event({"text/plain": "42"}, False) == {
        "type": "result", "text": "42", "extra": {}, "is_main_result": False}


def test_stream_and_count_events() -> None:
    stdout = to_event({"type": "stdout", "id": "x", "text": "hi\n"})
    assert stdout["type"] == "stdout" and stdout["text"] == "hi\n"
    assert stdout["timestamp"].endswith("+00:00")
    assert to_event({"type": "start", "id": "x", "execution_count": 3}) == {
        "type": "number_of_executions", "execution_count": 3}


def test_events_are_ascii_lines() -> None:
    """The SDKs split on line breaks (httpx's splitlines splits on U+2028 too)."""
    line = e2b_code.encode_event({"type": "stdout", "text": "a\u2028b\nc é"})
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and line.isascii()
    assert json.loads(line)["text"] == "a\u2028b\nc é"


class Ended:
    """Just enough of a sandbox for :func:`stream_execution`."""

    def __init__(self) -> None:
        self.ended = trio.Event()


async def test_a_silent_execution_sends_keepalives(autojump_clock: trio.testing.MockClock) -> None:
    execution = Execution("", {}, None)
    body = stream_execution(execution, Ended())  # type: ignore[arg-type]
    started = trio.current_time()
    assert await body.__anext__() == b'{"type": "keepalive"}\n'
    assert await body.__anext__() == b'{"type": "keepalive"}\n'
    assert trio.current_time() - started == pytest.approx(2 * e2b_code.KEEPALIVE_INTERVAL)
    await execution.deliver({"type": "stdout", "text": "x"})
    assert json.loads(await body.__anext__()) == {"type": "stdout", "text": "x"}
    execution.finish(e2b_code.error_event("E", "v"))
    assert json.loads(await body.__anext__())["name"] == "E"
    assert await body.__anext__() == b'{"type": "end_of_execution"}\n'
    with pytest.raises(StopAsyncIteration):
        await body.__anext__()
    assert not execution.abandoned.is_set()


async def test_closing_the_stream_abandons_the_execution(autojump_clock: trio.testing.MockClock,
                                                         ) -> None:
    execution = Execution("", {}, None)
    body = stream_execution(execution, Ended())  # type: ignore[arg-type]
    await execution.deliver({"type": "stdout", "text": "x"})
    await body.__anext__()
    await body.aclose()
    assert execution.abandoned.is_set()
    await execution.deliver({"type": "stdout", "text": "dropped"})  # does not block
    unread = Execution("", {}, None)
    await stream_execution(unread, Ended()).aclose()  # type: ignore[arg-type]
    assert unread.abandoned.is_set()  # closed by a server that could not send the head


async def test_a_sandbox_that_ends_ends_the_stream(autojump_clock: trio.testing.MockClock) -> None:
    execution = Execution("", {}, None)
    sandbox = Ended()
    body = stream_execution(execution, sandbox)  # type: ignore[arg-type]
    assert await body.__anext__() == b'{"type": "keepalive"}\n'
    sandbox.ended.set()
    assert json.loads(await body.__anext__())["name"] == "SandboxEnded"
    assert await body.__anext__() == b'{"type": "end_of_execution"}\n'


def test_the_kernel_takes_an_interrupt_sent_with_its_execution() -> None:
    """The host may send the interrupt right behind the execution (its client left at once):
    the kernel must not start it, rather than let it run to the end."""
    kernel = subprocess.Popen(["/usr/bin/python3", "-I", str(KERNEL_SOURCE), "--cwd", "/"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert kernel.stdin is not None and kernel.stdout is not None
    out = kernel.stdout
    pending = bytearray()

    def message() -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while b"\n" not in pending:
            ready, _, _ = select.select([out], [], [], max(0, deadline - time.monotonic()))
            assert ready, "no message from the kernel within 10 s"
            pending.extend(os.read(out.fileno(), 65536))
        line, _, rest = bytes(pending).partition(b"\n")
        pending[:] = rest
        return json.loads(line)  # type: ignore[no-any-return]

    try:
        assert message()["type"] == "ready"
        started = time.monotonic()
        kernel.stdin.write(b'{"type":"execute","id":"a","code":"import time\\ntime.sleep(30)"}\n'
                           b'{"type":"interrupt","id":"a"}\n{"type":"interrupt","id":"gone"}\n'
                           b'{"type":"execute","id":"b","code":"1"}\n')
        kernel.stdin.flush()
        messages = [message() for _ in range(6)]
        assert time.monotonic() - started < 10
        assert [(m["type"], m["id"]) for m in messages] == [
            ("start", "a"), ("error", "a"), ("done", "a"), ("start", "b"), ("result", "b"),
            ("done", "b")]
        assert messages[1]["name"] == "KeyboardInterrupt"
    finally:
        kernel.kill()
        kernel.wait()


# --- The handler over a real agent and kernel on this host ----------------------------------------


class Sandbox:
    """A SandboxRuntime over one agent connection, its tasks in a nursery of the test."""

    def __init__(self, nursery: trio.Nursery, connection: AgentConnection,
                 envs: Mapping[str, str] = {}) -> None:
        self._nursery = nursery
        self._connection = connection
        self._envs = dict(envs)
        self._services: dict[type, object] = {}
        self._ended = trio.Event()

    @property
    def id(self) -> str:
        return "sbx-test"

    @property
    def envs(self) -> Mapping[str, str]:
        return self._envs

    async def agent(self) -> AgentConnection:
        return self._connection

    def service(self, kind: type[T]) -> T:
        if kind not in self._services:
            self._services[kind] = kind(self)  # type: ignore[call-arg]
        found = self._services[kind]
        assert isinstance(found, kind)
        return found

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._ended.is_set():
            raise VMGoneError(f"sandbox {self.id} has ended")  # as e2b_sandbox's
        self._nursery.start_soon(fn, *args)

    @property
    def ended(self) -> trio.Event:
        return self._ended


class Client:
    """Calls the handler as WIRE's server would, and reads its answers."""

    def __init__(self, sandbox: Sandbox, user: str = "user") -> None:
        self.sandbox = sandbox
        self.user = user

    async def call(self, method: str, path: str, body: object = None,
                   deadline: float | None = None) -> HttpResponse:
        data = b"" if body is None else json.dumps(body).encode()
        request = HttpRequest.make(method, path, [("content-type", "application/json")], data)
        context = CallContext(self.sandbox, self.user, deadline, Headers())
        return await handle_code(request, context)

    async def json(self, method: str, path: str, body: object = None) -> Any:
        response = await self.call(method, path, body)
        assert isinstance(response.body, bytes)
        assert response.status == 200, (response.status, response.body)
        return json.loads(response.body)

    async def run(self, code: str, timeout: float = 20, **fields: object) -> list[dict[str, Any]]:
        """Execute and read the whole stream; the lines as dicts (keepalives left out)."""
        with trio.fail_after(timeout):
            response = await self.call("POST", "/execute", {"code": code, **fields})
            assert response.status == 200, response.body
            assert not isinstance(response.body, bytes)
            lines = b"".join([piece async for piece in response.body]).split(b"\n")
        assert lines[-1] == b"" and lines[-2] == b'{"type": "end_of_execution"}'
        events = [json.loads(line) for line in lines[:-1]]
        return [event for event in events if event["type"] != "keepalive"]


def text_of(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(event["text"] for event in events if event["type"] == kind)


def main_result(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [event for event in events if event["type"] == "result" and event["is_main_result"]]
    assert len(found) <= 1
    return found[0] if found else None


def the_error(events: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [event for event in events if event["type"] == "error"]
    assert len(errors) == 1, events
    return errors[0]


@pytest.fixture
def host_agent(tmp_path: Path) -> Iterator[socket.socket]:
    """The real guest agent on this host, over a socketpair: the host end."""
    directory = tmp_path / "agent"
    directory.mkdir()
    for name, content in guest_agent_files().items():
        (directory / name).write_bytes(content)
    host_end, agent_end = socket.socketpair()
    with (tmp_path / "agent.log").open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-E", "-s", str(directory / "vmcache_agent.py"), "--fd",
             str(agent_end.fileno()), "--no-set-clock"],
            pass_fds=[agent_end.fileno()], stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=log_file)
    agent_end.close()
    try:
        yield host_end
    finally:
        host_end.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def client(host_agent: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 ) -> AsyncIterator[Client]:
    """The handler with the kernel run on this host, as root, from the source tree."""
    monkeypatch.setattr(e2b_code, "KERNEL_ARGV", ("/usr/bin/python3", "-I", str(KERNEL_SOURCE)))
    monkeypatch.setattr(e2b_code, "DEFAULT_USER", "root")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(e2b_code, "DEFAULT_CWD", str(home))
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(host_agent))
    with trio.fail_after(10):
        connection = await AgentConnection.start(stream, timeout=10)
    async with trio.open_nursery() as nursery:
        sandbox = Sandbox(nursery, connection, {"SANDBOX_VAR": "from-create"})
        yield Client(sandbox, user="root")
        sandbox.ended.set()
        nursery.cancel_scope.cancel()
    await stream.aclose()


async def test_state_results_and_the_execution_count(client: Client) -> None:
    first = await client.run("x = 20\ny = x + 1\ny * 2")
    assert first[0] == {"type": "number_of_executions", "execution_count": 1}
    assert main_result(first) == {"type": "result", "text": "42", "extra": {}, "is_main_result": True}
    second = await client.run("x + 1")
    assert second[0]["execution_count"] == 2
    assert main_result(second)["text"] == "21"  # type: ignore[index]
    assert main_result(await client.run("z = 1")) is None  # an assignment is no result
    assert main_result(await client.run("None")) is None
    assert main_result(await client.run("'quoted'"))["text"] == "quoted"  # type: ignore[index]
    rich = await client.run(
        "class Rich:\n"
        "    def _repr_html_(self): return '<b>rich</b>'\n"
        "    def _repr_markdown_(self): return '**rich**'\n"
        "    def _repr_png_(self): return b'\\x89PNG'\n"
        "    def _repr_json_(self): return {'rich': True}\n"
        "    def __repr__(self): return 'Rich()'\n"
        "Rich()")
    assert main_result(rich) == {"type": "result", "text": "Rich()", "html": "<b>rich</b>",
                                 "markdown": "**rich**", "png": "iVBORw==",
                                 "json": {"rich": True}, "extra": {}, "is_main_result": True}
    shown = await client.run("display(Rich())\n1")
    assert [event["is_main_result"] for event in shown if event["type"] == "result"] == [False, True]
    assert main_result(await client.run("import asyncio\nawait asyncio.sleep(0)\n'awaited'")
                       )["text"] == "awaited"  # type: ignore[index]


async def test_output_streams_in_order_including_a_child_process(client: Client) -> None:
    events = await client.run(
        "import subprocess, sys, time\n"
        "print('one')\n"
        "print('two', file=sys.stderr)\n"
        "subprocess.run(['sh', '-c', 'echo child-out; echo child-err >&2'])\n"
        "print('three')\n"
        "time.sleep(0.3)\n"
        "print('four')\n"
        "7")
    kinds = [(event["type"], event.get("text")) for event in events[1:-1]]
    assert kinds == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "child-out\n"),
                     ("stderr", "child-err\n"), ("stdout", "three\n"), ("stdout", "four\n"),
                     ("result", "7")]


async def test_output_is_streamed_as_it_is_written(client: Client) -> None:
    """The first line arrives while the code still runs."""
    with trio.fail_after(20):
        response = await client.call("POST", "/execute", {
            "code": "import time\nprint('early', flush=True)\ntime.sleep(3)\nprint('late')"})
        assert not isinstance(response.body, bytes)
        started = trio.current_time()
        lines = []
        async for piece in response.body:
            lines.append((trio.current_time() - started, json.loads(piece)))
    early = next(elapsed for elapsed, event in lines if event.get("text") == "early\n")
    late = next(elapsed for elapsed, event in lines if event.get("text") == "late\n")
    assert early < 1.5 and late > 2.5


async def test_big_output_is_chunked_and_a_huge_repr_truncated(client: Client) -> None:
    events = await client.run("print('x' * 1_000_000, end='')\n'y' * 1_000_000")
    chunks = [event["text"] for event in events if event["type"] == "stdout"]
    assert "".join(chunks) == "x" * 1_000_000 and max(map(len, chunks)) <= 16 * 1024
    text = main_result(events)["text"]  # type: ignore[index]
    assert text.startswith("'yyyy") and len(text) < 300_000
    assert "more characters truncated by vmcache" in text


async def test_an_exception_is_an_error_with_the_users_traceback(client: Client) -> None:
    events = await client.run("print('before')\ndef f():\n    raise ValueError('bad value')\nf()")
    error = the_error(events)
    assert (error["name"], error["value"]) == ("ValueError", "bad value")
    assert "raise ValueError('bad value')" in error["traceback"]
    assert 'File "<cell 1>", line 3, in f' in error["traceback"]
    assert "e2b_kernel" not in error["traceback"]
    assert text_of(events, "stdout") == "before\n"
    syntax = the_error(await client.run("x = ("))
    assert syntax["name"] == "SyntaxError" and "e2b_kernel" not in syntax["traceback"]
    assert the_error(await client.run("import sys\nsys.exit(3)"))["name"] == "SystemExit"
    assert main_result(await client.run("'still alive'"))["text"] == "still alive"  # type: ignore[index]


async def test_ipython_shell_lines_and_a_trailing_semicolon(client: Client) -> None:
    events = await client.run("print('py')\n!echo from-shell; echo to-err >&2\nfor n in range(2):\n"
                              "    !echo loop\n'shown'")
    assert text_of(events, "stdout") == "py\nfrom-shell\nloop\nloop\n"
    assert text_of(events, "stderr") == "to-err\n"
    assert main_result(events)["text"] == "shown"  # type: ignore[index]
    assert main_result(await client.run("1 + 1;")) is None
    text = await client.run('s = """\n!not a command\n"""\ns.strip()')  # valid Python stays
    assert main_result(text)["text"] == "!not a command"  # type: ignore[index]


async def test_tracebacks_show_the_source_of_earlier_cells(client: Client) -> None:
    await client.run("def h():\n    raise RuntimeError('late')")
    assert "raise RuntimeError('late')" in the_error(await client.run("h()"))["traceback"]
    printed = await client.run("import traceback\ntry:\n    h()\nexcept Exception:\n"
                               "    traceback.print_exc()")
    assert "raise RuntimeError('late')" in text_of(printed, "stderr")


async def test_env_vars_hold_for_one_execution(client: Client) -> None:
    events = await client.run(
        "import os, subprocess\n"
        "print(os.environ['ONE'], subprocess.run(['sh', '-c', 'echo $ONE'], capture_output=True,"
        " text=True).stdout.strip())\n"
        "os.environ.get('SANDBOX_VAR')", env_vars={"ONE": "1", "SANDBOX_VAR": "overridden"})
    assert text_of(events, "stdout") == "1 1\n"
    assert main_result(events)["text"] == "overridden"  # type: ignore[index]
    after = await client.run("import os\n(os.environ.get('ONE'), os.environ.get('SANDBOX_VAR'))")
    assert main_result(after)["text"] == "(None, 'from-create')"  # type: ignore[index]


async def test_contexts_are_isolated_listed_restarted_and_removed(client: Client,
                                                                  tmp_path: Path) -> None:
    listed = await client.json("GET", "/contexts")
    assert [item["language"] for item in listed] == ["python"]
    default_id = listed[0]["id"]
    await client.run("shared = 'default'")
    created = await client.json("POST", "/contexts", {"language": "python", "cwd": str(tmp_path)})
    assert created["language"] == "python" and created["cwd"] == str(tmp_path)
    other = created["id"]
    assert main_result(await client.run("import os\nos.getcwd()", context_id=other)
                       )["text"] == str(tmp_path)  # type: ignore[index]
    missing = await client.run("shared", context_id=other)
    assert the_error(missing)["name"] == "NameError"
    await client.run("mine = 5", context_id=other)
    assert main_result(await client.run("shared"))["text"] == "default"  # type: ignore[index]
    ids = [item["id"] for item in await client.json("GET", "/contexts")]
    assert ids == [default_id, other]

    assert await client.json("POST", f"/contexts/{other}/restart") is None
    after = await client.run("mine", context_id=other)
    assert the_error(after)["name"] == "NameError" and after[0]["execution_count"] == 1
    assert [item["id"] for item in await client.json("GET", "/contexts")] == ids  # same id

    assert await client.json("DELETE", f"/contexts/{other}") is None
    assert [item["id"] for item in await client.json("GET", "/contexts")] == [default_id]
    gone = await client.call("POST", "/execute", {"code": "1", "context_id": other})
    assert (gone.status, gone.body) == (404, f"Context {other} not found".encode())
    again = await client.call("DELETE", f"/contexts/{other}")
    assert again.status == 404
    restarted = await client.call("POST", f"/contexts/{other}/restart")
    assert restarted.status == 404


async def test_requests_e2b_refuses(client: Client) -> None:
    both = await client.call("POST", "/execute", {"code": "1", "context_id": "x", "language": "python"})
    assert (both.status, both.body) == (400, b"Only one of context_id or language can be provided")
    for language in ("r", "js", "bash"):
        refused = await client.call("POST", "/execute", {"code": "1", "language": language})
        assert refused.status == 400
        assert b"runs Python only" in refused.body  # type: ignore[operator]
    context = await client.call("POST", "/contexts", {"language": "java"})
    assert context.status == 400
    no_code = await client.call("POST", "/execute", {"language": "python"})
    assert no_code.status == 422
    assert json.loads(no_code.body)["detail"][0]["loc"] == ["body", "code"]  # type: ignore[arg-type]
    bad_env = await client.call("POST", "/execute", {"code": "1", "env_vars": {"A": 1}})
    assert bad_env.status == 422
    not_json = await client.call("POST", "/contexts", None)
    assert not_json.status == 200  # an empty body is the defaults
    assert (await client.call("GET", "/nothing")).status == 404
    assert (await client.call("GET", "/execute")).status == 405
    bad_cwd = await client.call("POST", "/contexts", {"cwd": "/no/such/directory"})
    assert bad_cwd.status == 500 and b"/no/such/directory" in bad_cwd.body  # type: ignore[operator]
    assert len(await client.json("GET", "/contexts")) == 2  # the failed one is not kept
    assert main_result(await client.run("1 + 1", language="Python"))["text"] == "2"  # type: ignore[index]


async def test_executions_in_one_context_run_one_at_a_time_in_order(client: Client) -> None:
    results: list[str] = []

    async def one(index: int) -> None:
        events = await client.run(f"import time\ntime.sleep(0.05)\nlog = globals().setdefault('log', [])\n"
                                  f"log.append({index})\nlog[:]")
        results.append(main_result(events)["text"])  # type: ignore[index]

    async with trio.open_nursery() as nursery:
        for index in range(4):
            nursery.start_soon(one, index)
            await trio.sleep(0.01)  # submitted in this order
    assert sorted(results, key=len) == ["[0]", "[0, 1]", "[0, 1, 2]", "[0, 1, 2, 3]"]


async def test_a_vanished_client_interrupts_and_the_context_stays(client: Client) -> None:
    await client.run("kept = 'yes'")
    with trio.fail_after(20):
        response = await client.call("POST", "/execute", {
            "code": "import time\nprint('started', flush=True)\nfor n in range(600):\n"
                    "    time.sleep(0.1)\nfinished = True"})
        assert not isinstance(response.body, bytes)
        async for piece in response.body:
            if b"started" in piece:
                break
        await response.body.aclose()  # type: ignore[attr-defined]
        after = await client.run("kept, 'finished' in globals()")
    assert main_result(after)["text"] == "('yes', False)"  # type: ignore[index]


async def test_a_client_gone_at_once_interrupts_without_losing_state(client: Client) -> None:
    """The interrupt may reach the kernel before it took the execution off its queue."""
    await client.run("kept = 'yes'")
    for _ in range(5):
        with trio.fail_after(4):  # not the 5 s grace and a kill
            response = await client.call("POST", "/execute", {"code": "import time\ntime.sleep(60)"})
            await response.body.aclose()  # type: ignore[union-attr]
            after = await client.run("kept")
        assert main_result(after)["text"] == "yes"  # type: ignore[index]


async def test_a_deadline_interrupts_with_keyboard_interrupt(client: Client) -> None:
    with trio.fail_after(20):
        response = await client.call("POST", "/execute", {"code": "import time\ntime.sleep(60)"},
                                     deadline=trio.current_time() + 1)
        assert not isinstance(response.body, bytes)
        events = [json.loads(piece) async for piece in response.body]
    assert the_error(events)["name"] == "KeyboardInterrupt"
    assert events[-1] == {"type": "end_of_execution"}


async def test_an_execution_that_ignores_the_interrupt_is_killed(client: Client,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(e2b_code, "INTERRUPT_GRACE", 1.0)
    await client.run("state = 1")
    code = ("import time\nwhile True:\n    try:\n        time.sleep(10)\n"
            "    except KeyboardInterrupt:\n        pass")
    with trio.fail_after(20):
        response = await client.call("POST", "/execute", {"code": code},
                                     deadline=trio.current_time() + 0.5)
        assert not isinstance(response.body, bytes)
        events = [json.loads(piece) async for piece in response.body]
    assert the_error(events)["name"] == "KernelDied"
    fresh = await client.run("'state' in globals()")
    assert main_result(fresh)["text"] == "False" and fresh[0]["execution_count"] == 1  # type: ignore[index]


async def test_a_kernel_that_dies_is_an_error_and_restarts(client: Client) -> None:
    await client.run("lost = 1")
    died = await client.run("import os\nprint('bye', flush=True)\nos._exit(7)")
    error = the_error(died)
    assert error["name"] == "KernelDied" and "status 7" in error["value"]
    assert text_of(died, "stdout") == "bye\n"
    assert the_error(await client.run("lost"))["name"] == "NameError"


async def test_restart_during_an_execution_ends_it(client: Client) -> None:
    with trio.fail_after(20):
        response = await client.call("POST", "/execute", {"code": "import time\ntime.sleep(60)"})
        assert not isinstance(response.body, bytes)
        default_id = (await client.json("GET", "/contexts"))[0]["id"]
        events = [json.loads(await response.body.__anext__())]  # it runs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.json, "POST", f"/contexts/{default_id}/restart")
            events += [json.loads(piece) async for piece in response.body]
    assert the_error(events) == {"type": "error", "name": "ContextRestarting",
                                 "value": "Context was restarted", "traceback": ""}
    assert main_result(await client.run("2"))["text"] == "2"  # type: ignore[index]


async def test_an_interrupt_never_cuts_a_message(client: Client) -> None:
    """Interrupted while it prints as fast as it can, the kernel still speaks whole lines:
    the error is the KeyboardInterrupt, and the context keeps its state."""
    await client.run("kept = 3")
    for _ in range(3):
        with trio.fail_after(20):
            response = await client.call("POST", "/execute", {
                "code": "import sys\nwhile True:\n    print('x' * 100)\n    sys.stderr.write('y')"},
                deadline=trio.current_time() + 0.5)
            assert not isinstance(response.body, bytes)
            lines = b"".join([piece async for piece in response.body]).splitlines()
        events = [json.loads(line) for line in lines]
        assert the_error(events)["name"] == "KeyboardInterrupt"
    assert main_result(await client.run("kept"))["text"] == "3"  # type: ignore[index]


async def test_a_format_too_big_for_a_message_is_dropped_with_a_note(client: Client) -> None:
    events = await client.run("class Big:\n    def _repr_html_(self): return 'h' * 5_000_000\n"
                              "    def __repr__(self): return 'Big()'\nBig()")
    result = main_result(events)
    assert result is not None and "html" not in result
    assert result["text"].startswith("Big()") and "text/html dropped by vmcache" in result["text"]


async def test_too_many_waiting_executions_are_refused(client: Client,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(e2b_code, "MAX_QUEUED", 2)
    created = await client.json("POST", "/contexts", {})
    bodies = []
    with trio.fail_after(20):
        for _ in range(3):  # one runs, two wait
            response = await client.call("POST", "/execute", {"code": "import time\ntime.sleep(30)",
                                                              "context_id": created["id"]})
            assert response.status == 200
            bodies.append(response.body)
            await trio.sleep(0.2)
        refused = await client.call("POST", "/execute", {"code": "1", "context_id": created["id"]})
        assert refused.status == 503 and b"wait" in refused.body  # type: ignore[operator]
        for body in bodies:
            await body.aclose()  # type: ignore[union-attr]
        assert main_result(await client.run("'free'", context_id=created["id"]))["text"] == "free"  # type: ignore[index]


async def test_an_ended_sandbox_answers_502(client: Client) -> None:
    ended = Sandbox(client.sandbox._nursery, client.sandbox._connection)
    ended.ended.set()
    response = await Client(ended).call("POST", "/execute", {"code": "1"})
    assert response.status == 502 and b"was not found" in response.body  # type: ignore[operator]


async def test_sys_dunder_stdout_is_not_lost(client: Client) -> None:
    events = await client.run("import sys\nsys.__stdout__.write('raw\\n')\nsys.__stderr__.write('e')")
    assert text_of(events, "stdout") == "raw\n" and text_of(events, "stderr") == "e"


FAKE_KERNEL = """
import json, sys
print(json.dumps({"type": "ready", "pid": 1}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["type"] != "execute":
        continue
    code = command["code"]
    if code == "garbage":
        print("this is not json", flush=True)
    elif code == "huge":
        sys.stdout.write("x" * (9 * 1024 * 1024))
        sys.stdout.flush()
    elif code == "wrong-field":
        print(json.dumps({"type": "stdout", "id": command["id"], "text": 5}), flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("code, said", [("garbage", "not JSON"), ("huge", "over"),
                                        ("wrong-field", "text is not valid")])
async def test_malformed_kernel_output_is_a_clean_error(client: Client, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        code: str, said: str) -> None:
    fake = tmp_path / "fake_kernel.py"
    fake.write_text(FAKE_KERNEL)
    monkeypatch.setattr(e2b_code, "KERNEL_ARGV", ("/usr/bin/python3", "-I", str(fake)))
    for _ in range(2):  # and again: a fresh process each time, never a hang
        error = the_error(await client.run(code))
        assert error["name"] == "KernelDied" and said in error["value"]


async def test_a_kernel_that_cannot_start_is_an_error(client: Client,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(e2b_code, "KERNEL_ARGV", ("/usr/bin/python3", "-c", "import sys; sys.exit(4)"))
    error = the_error(await client.run("1"))
    assert error["name"] == "KernelStartError" and "status 4" in error["value"]


# --- One real guest --------------------------------------------------------------------------------



@pytest.mark.qemu
async def test_in_a_real_guest(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """One TCG guest booted from the image: the kernel /init copied there, run as ``user``
    through the guest agent, everything a run_code user sees, in one boot."""
    spec = resolve_spec(load_config(write_config(tmp_path / "vmcache.toml")), run_root=run_dir)
    with trio.fail_after(TCG_BOOT_TIMEOUT + 60):
        async with launch_vm(spec) as vm, trio.open_nursery() as nursery:
            connection = await vm._guest().connection()  # the user port an owner would use
            sandbox = Sandbox(nursery, connection, {"FROM_CREATE": "kept"})
            client = Client(sandbox)
            started = time.monotonic()
            first = await client.run("import os, sys\nx = 41\n(os.getuid(), os.getcwd(), "
                                     "os.environ['FROM_CREATE'], sys.version_info[:2])", timeout=60)
            first_run = time.monotonic() - started
            assert main_result(first)["text"] == "(1000, '/home/user', 'kept', (3, 11))"  # type: ignore[index]
            started = time.monotonic()
            second = await client.run("x + 1")
            next_run = time.monotonic() - started
            assert second[0]["execution_count"] == 2 and main_result(second)["text"] == "42"  # type: ignore[index]

            streamed = await client.run(
                "import subprocess, sys\nprint('out')\nprint('err', file=sys.stderr)\n"
                "subprocess.run(['bash', '-c', 'echo child; echo child-err >&2'])\nprint('end')")
            assert [(event["type"], event.get("text")) for event in streamed[1:-1]] == [
                ("stdout", "out\n"), ("stderr", "err\n"), ("stdout", "child\n"),
                ("stderr", "child-err\n"), ("stdout", "end\n")]

            error = the_error(await client.run("def g():\n    return {}['missing']\ng()"))
            assert (error["name"], error["value"]) == ("KeyError", "'missing'")
            assert 'File "<cell 4>", line 2, in g' in error["traceback"]
            assert "e2b_kernel" not in error["traceback"]

            env = await client.run("import os\nos.environ['ONLY_NOW']", env_vars={"ONLY_NOW": "yes"})
            assert main_result(env)["text"] == "yes"  # type: ignore[index]
            assert main_result(await client.run("os.environ.get('ONLY_NOW')")) is None

            other = (await client.json("POST", "/contexts", {"cwd": "/tmp"}))["id"]
            assert the_error(await client.run("x", context_id=other))["name"] == "NameError"
            await client.run("y = 'other'", context_id=other)
            assert main_result(await client.run("y", context_id=other))["text"] == "other"  # type: ignore[index]
            assert await client.json("POST", f"/contexts/{other}/restart") is None
            assert the_error(await client.run("y", context_id=other))["name"] == "NameError"
            assert await client.json("DELETE", f"/contexts/{other}") is None
            assert len(await client.json("GET", "/contexts")) == 1

            response = await client.call("POST", "/execute", {
                "code": "import time\nprint('go', flush=True)\ntime.sleep(120)\nslept = True"})
            assert not isinstance(response.body, bytes)
            async for piece in response.body:
                if b"go" in piece:
                    break
            interrupted = time.monotonic()
            await response.body.aclose()  # type: ignore[attr-defined]
            after = await client.run("x, 'slept' in globals()")
            recovered = time.monotonic() - interrupted
            assert main_result(after)["text"] == "(41, False)"  # type: ignore[index]
            processes = (await vm.run(["pgrep", "-c", "-f", "e2b_kernel.py"])).stdout
            sandbox.ended.set()
            nursery.cancel_scope.cancel()
    assert processes == b"1\n"  # the default context's; the other's was stopped
    print(f"first run_code (kernel start) {first_run:.2f} s, next {next_run * 1000:.0f} ms, "
          f"interrupted and answered again in {recovered * 1000:.0f} ms")
