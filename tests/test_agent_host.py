"""The real guest agent, run on the host over a socketpair, driven by AgentConnection.

No QEMU: the agent is started as ``python3 vmcache_agent.py --fd N`` from a
directory laid out as in the guest image (the agent next to agent_protocol.py).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from vmcache import agent_client as agent_module
from vmcache import agent_protocol as ap
from vmcache import port_forward as port_forward_module
from vmcache.agent_client import AgentConnection, GuestProcess, PtySize, guest_agent_files
from vmcache.errors import (
    AgentError,
    AgentProtocolError,
    GuestConnectError,
    GuestConnectionBrokenError,
    GuestOutputLimitError,
    GuestPortRefusedError,
    GuestProcessError,
    GuestRequestError,
    VMGoneError,
)
from vmcache.guest_api import GuestAPI
from vmcache.port_forward import ForwardSpec, port_forward


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """Overrides conftest's check: these tests start no QEMU, and the QEMU processes that other
    test runs on this machine start meanwhile are not ours to count, let alone kill."""
    yield


PYTHON39 = Path("/root/.pyenv/versions/3.9.18/bin/python3.9")


class Agent:
    """One agent process and the host end of its socket."""

    def __init__(self, process: subprocess.Popen[bytes], stream: trio.SocketStream, log: Path) -> None:
        self.process = process
        self.stream = stream
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def children(self) -> dict[int, str]:
        return children_of(self.pid)


def children_of(parent: int) -> dict[int, str]:
    """pid -> state letter of every process whose parent is ``parent``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == parent:
            found[int(entry.name)] = fields[0]
    return found


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    """The agent's directory as the image lays it out."""
    directory = tmp_path / "agent"
    directory.mkdir()
    for name, content in guest_agent_files().items():
        (directory / name).write_bytes(content)
    return directory


@pytest.fixture
async def launch(agent_dir: Path, tmp_path: Path) -> AsyncIterator[Callable[..., Agent]]:
    """Start agents (``launch(*args, python=...)``); each is stopped and checked afterwards."""
    started: list[Agent] = []

    def start(*args: str, python: str = sys.executable) -> Agent:
        host_end, agent_end = socket.socketpair()
        log = tmp_path / f"agent-{len(started)}.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [python, "-E", "-s", str(agent_dir / "vmcache_agent.py"), "--fd", str(agent_end.fileno()),
                 "--no-set-clock", *args],
                pass_fds=[agent_end.fileno()], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        agent_end.close()
        agent = Agent(process, trio.SocketStream(trio.socket.from_stdlib_socket(host_end)), log)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        try:
            await agent.stream.aclose()
        except trio.ClosedResourceError:
            pass
        try:
            status = agent.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait()
            pytest.fail(f"the agent did not exit when its socket closed; log:\n{agent.log.read_text()}")
        assert status in (0, -signal.SIGKILL), agent.log.read_text()
        assert "Traceback" not in agent.log.read_text(), agent.log.read_text()


@pytest.fixture
async def agent(launch: Callable[..., Agent]) -> Agent:
    return launch()


@pytest.fixture
async def conn(agent: Agent) -> AsyncIterator[AgentConnection]:
    with trio.fail_after(10):
        connection = await AgentConnection.start(agent.stream, timeout=10)
    yield connection


def pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# --- Handshake -----------------------------------------------------------------------------------


async def test_hello_reports_boot_id_and_version(conn: AgentConnection) -> None:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert conn.boot_id == boot_id
    assert conn.agent_version
    with trio.fail_after(5):
        assert await conn.ping() == boot_id


async def test_garbage_before_hello_is_skipped(agent: Agent) -> None:
    """A host may find stale bytes: a previous client left in the middle of a frame."""
    with trio.fail_after(10):
        await agent.stream.send_all(os.urandom(5000) + ap.encode_data(1, 0, b"x" * 100)[:50])
        connection = await AgentConnection.start(agent.stream, timeout=10)
        result = await connection.run(["echo", "ok"])
    assert result.stdout == b"ok\n"


async def test_a_half_sent_frame_before_hello_is_given_up(agent: Agent) -> None:
    """The previous client died mid-frame: its header swallows our HELLO until the agent rescans."""
    with trio.fail_after(10):
        first = await AgentConnection.start(agent.stream, timeout=5)
        await first.run(["true"])
        await agent.stream.send_all(ap.encode_data_header(99, 0, 500_000) + b"half")
        connection = await AgentConnection.start(agent.stream, timeout=8)
        assert (await connection.run(["echo", "ok"])).stdout == b"ok\n"


async def test_garbage_mid_session_fails_the_connection_and_a_new_hello_recovers(agent: Agent) -> None:
    with trio.fail_after(10):
        connection = await AgentConnection.start(agent.stream, timeout=5)
        await agent.stream.send_all(b"\x00" * 64)
        with pytest.raises(AgentProtocolError, match="garbage"):
            await connection.run(["sleep", "5"])
        again = await AgentConnection.start(agent.stream, timeout=5)
        assert (await again.run(["echo", "back"])).stdout == b"back\n"


async def test_a_second_hello_resets_the_session_and_kills_its_processes(agent: Agent) -> None:
    with trio.fail_after(10):
        first = await AgentConnection.start(agent.stream, timeout=5)
        async with first.open_process(["sleep", "30"]) as process:
            pid = process.pid
            assert not pid_gone(pid)
            second = await AgentConnection.start(agent.stream, timeout=5)
            await wait_until(lambda: pid_gone(pid))
            assert (await second.run(["echo", "new"])).stdout == b"new\n"
            first._fail(AgentError, "replaced")  # what the lead's code does when it starts a new one


async def test_protocol_version_mismatch_is_reported() -> None:
    host, guest = trio.testing.memory_stream_pair()

    async def old_agent() -> None:
        protocol = ap.Connection(ap.Role.GUEST)
        while True:
            protocol.receive_data(await guest.receive_some())
            while (event := protocol.next_event()) is not None:
                if isinstance(event, ap.Hello):
                    await guest.send_all(protocol.send(ap.Hello(event.nonce, {"protocol": 99})))
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_agent)
        with trio.fail_after(5), pytest.raises(AgentProtocolError, match="protocol 99"):
            await AgentConnection.start(host, timeout=5)


async def test_no_agent_means_a_bounded_start() -> None:
    host, _guest = trio.testing.memory_stream_pair()
    with trio.fail_after(5), pytest.raises(AgentError, match=r"did not answer HELLO within 0\.3 s"):
        await AgentConnection.start(host, timeout=0.3)


# --- Exec ----------------------------------------------------------------------------------------


async def test_exit_codes_and_signals(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        assert (await conn.run(["sh", "-c", "exit 3"])).returncode == 3
        assert (await conn.run(["sh", "-c", "kill -9 $$"])).returncode == -9
        result = await conn.run(["sh", "-c", "echo out; echo err >&2"])
    assert (result.returncode, result.stdout, result.stderr) == (0, b"out\n", b"err\n")


async def test_check_raises_with_the_output(conn: AgentConnection) -> None:
    with trio.fail_after(10), pytest.raises(GuestProcessError, match="exited with status 4: oops") as info:
        await conn.run(["sh", "-c", "echo partial; echo oops >&2; exit 4"], check=True)
    assert (info.value.returncode, info.value.stdout, info.value.stderr) == (4, b"partial\n", b"oops\n")


async def test_command_not_found_is_127_and_one_line(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        result = await conn.run(["python4", "-c", "1"])
    assert result.returncode == 127
    assert result.stderr == b"vmcache: command not found in the guest: python4\n"
    assert result.stdout == b""


async def test_not_executable_is_126(conn: AgentConnection, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with trio.fail_after(10):
        result = await conn.run([str(script)])
    assert result.returncode == 126
    assert result.stderr == f"vmcache: command not executable in the guest: {script}\n".encode()


async def test_bad_cwd_is_a_one_line_error(conn: AgentConnection) -> None:
    with trio.fail_after(10), pytest.raises(GuestRequestError) as info:
        await conn.run(["true"], cwd="/no/such/dir")
    assert str(info.value) == ("the working directory does not exist in the guest: /no/such/dir: "
                               "No such file or directory")
    assert info.value.errno == errno.ENOENT
    with trio.fail_after(5):
        assert (await conn.run(["true"])).returncode == 0  # the connection is fine


async def test_bad_arguments_are_refused_on_the_host(conn: AgentConnection) -> None:
    with pytest.raises(AgentError, match="argv"):
        conn.open_process([])
    with pytest.raises(AgentError, match="NUL"):
        conn.open_process(["echo", "a\0b"])


async def test_env_and_cwd(conn: AgentConnection, tmp_path: Path) -> None:
    with trio.fail_after(10):
        result = await conn.run(["sh", "-c", 'echo "$FOO|$TERM|$HOME|$PATH"; pwd'],
                                env={"FOO": "bar baz"}, cwd=str(tmp_path))
    assert result.stdout is not None
    first, second = result.stdout.decode().splitlines()
    foo, term, home, path = first.split("|")
    assert (foo, term, home) == ("bar baz", "dumb", "/root")
    assert "/usr/bin" in path.split(":")
    assert second == str(tmp_path)


async def test_binary_arguments_survive(conn: AgentConnection) -> None:
    arguments = [b"\xff\xfe", b"trailing newline\n", b"", b"  spaces  "]
    with trio.fail_after(10):
        result = await conn.run(["printf", "%s|", *arguments])
    assert result.stdout == b"|".join(arguments) + b"|"


async def test_stdin_is_streamed(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        assert (await conn.run(["wc", "-l"], stdin=b"a\nb\n")).stdout.strip() == b"2"  # type: ignore[union-attr]
        async with conn.open_process(["cat"]) as process:
            assert process.stdin is not None and process.stdout is not None
            for line in (b"one\n", b"two\n"):
                await process.stdin.send_all(line)
                assert await process.stdout.receive_some() == line  # echoed before EOF
            await process.stdin.aclose()
            assert await process.stdout.receive_some() == b""
            assert await process.wait() == 0


async def test_ten_megabytes_through_cat(conn: AgentConnection) -> None:
    data = os.urandom(10_000_000)
    with trio.fail_after(30):
        result = await conn.run(["cat"], stdin=data)
    assert result.stdout == data


async def test_output_arrives_while_the_process_runs(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        async with conn.open_process(["sh", "-c", "echo first; sleep 30; echo second"]) as process:
            assert process.stdout is not None
            assert await process.stdout.receive_some() == b"first\n"
            assert process.returncode is None


async def test_signals_go_to_the_process_group(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        async with conn.open_process(["sh", "-c", "sleep 30 & echo $!; wait"]) as process:
            assert process.stdout is not None
            child = int(await process.stdout.receive_some())
            await process.send_signal(signal.SIGTERM)
            assert await process.wait() == -signal.SIGTERM
            await wait_until(lambda: pid_gone(child))


async def test_timeout_kills_the_group(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        started = time.monotonic()
        result = await conn.run(["sh", "-c", "sleep 30; true"], timeout=0.5)
    assert result.returncode == -signal.SIGKILL and result.timed_out
    assert time.monotonic() - started < 5
    with trio.fail_after(10), pytest.raises(GuestProcessError, match="killed by its timeout"):
        await conn.run(["sleep", "30"], timeout=0.2, check=True)


async def test_leaving_open_process_kills_the_process(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0.3):
            async with conn.open_process(["sleep", "30"]) as process:
                pid = process.pid
                await process.wait()
        await wait_until(lambda: pid_gone(pid))
        assert process.returncode == -signal.SIGKILL
        with pytest.raises(RuntimeError):
            async with conn.open_process(["sleep", "30"]) as process:
                pid = process.pid
                raise RuntimeError("user code failed")
        await wait_until(lambda: pid_gone(pid))


async def test_a_cancelled_run_kills_the_process(conn: AgentConnection, agent: Agent) -> None:
    with trio.fail_after(10):
        with trio.move_on_after(0.5):
            await conn.run(["sh", "-c", "echo $$ > /dev/null; sleep 30"])
        await wait_until(lambda: not [pid for pid, state in agent.children().items() if state != "Z"])
        assert (await conn.run(["echo", "still fine"])).stdout == b"still fine\n"


async def test_sixteen_processes_at_once(conn: AgentConnection) -> None:
    results: dict[int, bytes] = {}

    async def one(index: int) -> None:
        script = f"sleep 0.3; head -c 100000 /dev/zero | tr '\\0' x; echo {index}"
        result = await conn.run(["sh", "-c", script], stdin=b"ignored")
        results[index] = result.stdout or b""

    with trio.fail_after(20):
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for index in range(16):
                nursery.start_soon(one, index)
    assert time.monotonic() - started < 10
    for index in range(16):
        assert results[index] == b"x" * 100000 + f"{index}\n".encode()


async def test_an_output_that_ends_after_its_process_is_not_held_back(conn: AgentConnection) -> None:
    """The EOF of an output that a background child kept open past the process's exit goes out at
    once: it used to wait in the agent's send queue for the host's next frame (a ping, 1 s later)."""
    for _ in range(3):
        with trio.fail_after(0.8):
            result = await conn.run(["sh", "-c", "sleep 0.1 & echo started"])
        assert (result.returncode, result.stdout) == (0, b"started\n")


async def test_uncaptured_output_goes_nowhere(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        result = await conn.run(["sh", "-c", "head -c 3000000 /dev/zero; echo err >&2"], capture_stdout=False)
    assert result.stdout is None and result.stderr == b"err\n" and result.returncode == 0


async def test_closing_an_output_drops_it_without_blocking_the_process(conn: AgentConnection) -> None:
    with trio.fail_after(20):
        async with conn.open_process(["sh", "-c", "head -c 20000000 /dev/zero; echo done >&2"]) as process:
            assert process.stdout is not None and process.stderr is not None
            await process.stdout.receive_some()
            await process.stdout.aclose()
            assert await process.stderr.receive_some() == b"done\n"
            assert await process.wait() == 0


async def test_stdin_of_a_process_that_stopped_reading(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        async with conn.open_process(["sh", "-c", "exec 0<&-; sleep 30"]) as process:
            assert process.stdin is not None
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(100):
                    await process.stdin.send_all(b"x" * 1_000_000)


async def test_process_tree_is_reaped(conn: AgentConnection, agent: Agent) -> None:
    """Orphans of a guest command are adopted and reaped by the agent (PID 1 in a guest)."""
    with trio.fail_after(10):
        result = await conn.run(["sh", "-c", "(sleep 0.3 &) ; (sleep 0.2 &); echo started"])
        assert result.stdout == b"started\n"
        await trio.sleep(0.6)
        await wait_until(lambda: not agent.children())


# --- PTY -----------------------------------------------------------------------------------------


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"EOF before {marker!r}; got {seen!r}")
        seen += chunk
    return seen


async def test_pty_is_the_controlling_terminal(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        result = await conn.run(["tty"], )
        assert result.returncode == 1  # no pty: "not a tty"
        async with conn.open_process(["sh", "-c", "tty; echo TERM=$TERM"], pty=PtySize(24, 80)) as process:
            assert process.stdout is not None and process.stderr is None
            output = await read_until(process.stdout, b"TERM=xterm")
            assert await process.wait() == 0
    assert output.split(b"\r\n")[0].startswith(b"/dev/pts/")


async def test_pty_shell_reads_stdin_and_sees_resizes(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        async with conn.open_process(["sh"], pty=PtySize(24, 80), env={"PS1": "$ "}) as process:
            assert process.stdin is not None and process.stdout is not None
            await process.stdin.send_all(b"echo $((6*7))\n")
            assert b"42\r\n" in await read_until(process.stdout, b"42\r\n")
            await process.stdin.send_all(b"stty size\n")
            await read_until(process.stdout, b"24 80\r\n")
            await process.resize(40, 100)
            await process.stdin.send_all(b"stty size\n")
            await read_until(process.stdout, b"40 100\r\n")
            await process.stdin.aclose()  # ^D: the shell exits
            assert await process.wait() == 0


async def test_pty_command_not_found(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        async with conn.open_process(["python4"], pty=PtySize()) as process:
            assert process.stdout is not None
            output = await read_until(process.stdout, b"\n")
            assert await process.wait() == 127
    assert output == b"vmcache: command not found in the guest: python4\r\n"


@pytest.mark.parametrize("argv", [["sh", "-c", "exit 3"], ["python4"]], ids=["runs", "not found"])
async def test_a_pty_process_asked_for_stderr_still_finishes(agent: Agent, argv: list[str]) -> None:
    """A host may ask for stderr with a pty (which has none): the agent ends that channel at once,
    so the stream finishes (END and every output's EOF) instead of staying open for ever."""
    host = ap.Connection(ap.Role.HOST)
    seen: list[ap.Event] = []

    async def receive_until(done: Callable[[], bool]) -> None:
        while not done():
            host.receive_data(await agent.stream.receive_some())
            while (event := host.next_event()) is not None:
                seen.append(event)

    with trio.fail_after(10):
        await agent.stream.send_all(host.send(ap.Hello(bytes(16), {"protocol": ap.PROTOCOL_VERSION})))
        await receive_until(lambda: any(isinstance(event, ap.Hello) for event in seen))
        await agent.stream.send_all(host.send(ap.ExecRequest(
            1, argv=argv, env={}, cwd=None, pty=(24, 80), timeout=None, stdout=True, stderr=True,
            window=1 << 20)))
        await receive_until(lambda: host.stream_state(1) is ap.StreamState.CLOSED)
    assert ap.Eof(1, ap.STDERR) in seen and ap.Eof(1, ap.STDOUT) in seen
    returncodes = [event.returncode for event in seen if isinstance(event, ap.ProcessEnd)]
    assert returncodes == [3 if argv[0] == "sh" else 127]


# --- Files ---------------------------------------------------------------------------------------


async def test_write_and_read_twenty_megabytes(conn: AgentConnection, tmp_path: Path) -> None:
    data = os.urandom(20_000_000)
    path = tmp_path / "new" / "dirs" / "file.bin"
    with trio.fail_after(30):
        assert await conn.write_file(str(path), data, mode=0o750) == len(data)
        assert path.read_bytes() == data
        assert path.stat().st_mode & 0o7777 == 0o750
        assert await conn.read_file(str(path)) == data
        async with conn.open_file(str(path)) as file:
            assert (file.mode, file.size) == (0o750, len(data))
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]  # no temporary left


async def test_write_from_a_stream_of_chunks(conn: AgentConnection, tmp_path: Path) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for index in range(100):
            yield bytes([index]) * 10_001

    with trio.fail_after(10):
        size = await conn.write_file(str(tmp_path / "pieces"), pieces())
    assert size == 1_000_100
    assert (tmp_path / "pieces").read_bytes() == b"".join(bytes([i]) * 10_001 for i in range(100))


async def test_empty_file_and_mkdir(conn: AgentConnection, tmp_path: Path) -> None:
    with trio.fail_after(10):
        await conn.mkdir(str(tmp_path / "a" / "b" / "c"), mode=0o700)
        await conn.mkdir(str(tmp_path / "a" / "b" / "c"))  # -p: fine if it exists
        assert (tmp_path / "a" / "b" / "c").stat().st_mode & 0o777 == 0o700
        await conn.write_file(str(tmp_path / "a" / "empty"), b"")
        assert await conn.read_file(str(tmp_path / "a" / "empty")) == b""


async def test_file_errors(conn: AgentConnection, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with trio.fail_after(10):
        with pytest.raises(GuestRequestError, match="cannot read /no/such/file in the guest") as info:
            await conn.read_file("/no/such/file")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(GuestRequestError, match="not a regular file"):
            await conn.read_file(str(tmp_path))
        with pytest.raises(GuestRequestError, match=r"in the guest: (File exists|Not a directory)"):
            await conn.write_file(str(tmp_path / "plain" / "under"), b"data")
        with pytest.raises(GuestRequestError, match="cannot make directory"):
            await conn.mkdir(str(tmp_path / "plain"))
        with pytest.raises(AgentError, match="absolute"):
            await conn.read_file("relative")
        assert (await conn.run(["true"])).returncode == 0  # the connection is fine


async def test_a_cancelled_write_leaves_no_temporary(conn: AgentConnection, tmp_path: Path) -> None:
    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await trio.sleep(30)
        yield b"never"

    target = tmp_path / "target"
    target.mkdir()
    with trio.fail_after(10):
        with trio.move_on_after(0.3):
            await conn.write_file(str(target / "partial"), slow())
        await conn.ping()
        await wait_until(lambda: not list(target.iterdir()))


# --- Flow control --------------------------------------------------------------------------------


async def test_a_slow_reader_keeps_the_agent_small(conn: AgentConnection, agent: Agent) -> None:
    """300 MB of output, read with pauses: the agent holds at most about one chunk of it."""
    total = 300_000_000
    received = 0
    rss_max = 0
    with trio.fail_after(120):
        async with conn.open_process(["head", "-c", str(total), "/dev/zero"]) as process:
            assert process.stdout is not None
            while True:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    break
                received += len(chunk)
                if received % (30 * ap.CHUNK) < len(chunk):  # now and then, stall
                    await trio.sleep(0.2)
                    rss_max = max(rss_max, agent.rss_kib())
                    assert process.returncode is None or received > total - 2 * ap.DEFAULT_WINDOW
            assert await process.wait() == 0
    assert received == total
    assert rss_max < 48 * 1024, f"agent RSS reached {rss_max} KiB"


async def test_the_host_buffers_at_most_its_window(conn: AgentConnection) -> None:
    with trio.fail_after(20):
        async with conn.open_process(["head", "-c", "50000000", "/dev/zero"]) as process:
            await trio.sleep(0.5)  # nobody reads: the guest must stop at the window
            await conn.ping()  # reading happens while someone waits
            await trio.sleep(0.3)
            await conn.ping()
            buffered = sum(len(chunk) for chunk in process._stream.chunks[ap.STDOUT])
            assert 0 < buffered <= agent_module.OUTPUT_WINDOW
            assert process.returncode is None


# --- Failures ------------------------------------------------------------------------------------


async def test_agent_killed_mid_call_fails_the_call_quickly(conn: AgentConnection, agent: Agent) -> None:
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await conn.run(["sleep", "30"])
        except AgentError as error:
            errors.append(error)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            nursery.start_soon(call)
            await trio.sleep(0.3)
            killed = time.monotonic()
            agent.process.kill()
    assert time.monotonic() - killed < 2
    assert len(errors) == 2 and all("connection" in str(error) for error in errors)
    with pytest.raises(AgentError):
        await conn.ping()


async def test_a_frozen_agent_is_noticed(conn: AgentConnection, agent: Agent) -> None:
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with trio.fail_after(10), pytest.raises(AgentError, match="stopped answering"):
            await conn.run(["sleep", "30"])
        assert time.monotonic() - started < 3.5
    finally:
        os.kill(agent.pid, signal.SIGCONT)


async def test_liveness_pings_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    """A fake agent that answers pings but whose process never ends: the call just waits."""
    host, guest = trio.testing.memory_stream_pair()
    pings = 0

    async def fake_agent(answer_pings: bool) -> None:
        nonlocal pings
        protocol = ap.Connection(ap.Role.GUEST)
        while True:
            data = await guest.receive_some()
            if not data:
                return
            protocol.receive_data(data)
            while (event := protocol.next_event()) is not None:
                if isinstance(event, ap.Hello):
                    info = {"protocol": 1, "boot_id": "b"}
                    await guest.send_all(protocol.send(ap.Hello(event.nonce, info)))
                elif isinstance(event, ap.ExecRequest):
                    await guest.send_all(protocol.send(ap.ExecReply(event.stream, 7, 10)))
                elif isinstance(event, ap.Ping):
                    pings += 1
                    if answer_pings:
                        await guest.send_all(protocol.send(ap.Pong(event.payload, "b")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, True)
        connection = await AgentConnection.start(host, timeout=5)
        async with connection.open_process(["sleep", "forever"]) as process:
            with trio.move_on_after(60):
                await process.wait()
            assert process.returncode is None
            assert 30 <= pings <= 70
        nursery.cancel_scope.cancel()

    host, guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, False)
        connection = await AgentConnection.start(host, timeout=5)
        started = trio.current_time()
        with pytest.raises(AgentError, match="stopped answering"):
            await connection.run(["sleep", "forever"])
        assert trio.current_time() - started <= agent_module.IDLE_PING + agent_module.PONG_TIMEOUT + 0.1
        nursery.cancel_scope.cancel()


# --- System requests -----------------------------------------------------------------------------


async def test_entropy_reports_failure_with_errno(launch: Callable[..., Agent], tmp_path: Path) -> None:
    not_a_device = tmp_path / "random"
    not_a_device.write_bytes(b"")
    agent = launch("--random-device", str(not_a_device))
    with trio.fail_after(10):
        connection = await AgentConnection.start(agent.stream, timeout=5)
        with pytest.raises(GuestRequestError, match="RNDADDENTROPY") as info:
            await connection.add_entropy()
    assert info.value.errno == errno.ENOTTY


@pytest.mark.skipif(os.geteuid() != 0, reason="RNDADDENTROPY needs CAP_SYS_ADMIN")
async def test_entropy_as_root(conn: AgentConnection) -> None:
    with trio.fail_after(10):
        await conn.add_entropy()
        await conn.add_entropy(b"host bytes")


async def test_clock_failure_is_reported(conn: AgentConnection) -> None:
    with trio.fail_after(10), pytest.raises(GuestRequestError, match="clock"):
        await conn.set_clock()


async def test_online_resources(launch: Callable[..., Agent], tmp_path: Path) -> None:
    sys_dir, proc_dir = tmp_path / "sys", tmp_path / "proc"
    cpus = sys_dir / "devices/system/cpu"
    for index, state in enumerate(["1", "0", "0"]):
        (cpus / f"cpu{index}").mkdir(parents=True)
        if index:
            (cpus / f"cpu{index}" / "online").write_text(state)
    (cpus / "online").write_text("0-2\n")
    memory = sys_dir / "devices/system/memory"
    for index, state in enumerate(["online", "offline"]):
        (memory / f"memory{index}").mkdir(parents=True)
        (memory / f"memory{index}" / "state").write_text(state)
    (proc_dir / "sys/kernel/random").mkdir(parents=True)
    (proc_dir / "sys/kernel/random/boot_id").write_text("fake-boot\n")
    (proc_dir / "meminfo").write_text("MemTotal:         262144 kB\nMemFree: 1 kB\n")
    agent = launch("--sys-dir", str(sys_dir), "--proc-dir", str(proc_dir))
    with trio.fail_after(10):
        connection = await AgentConnection.start(agent.stream, timeout=5)
        resources = await connection.online_resources()
    assert connection.boot_id == "fake-boot"
    assert (resources.online_cpus, resources.mem_total_kib) == (3, 262144)
    assert (cpus / "cpu1/online").read_text() == "1" and (cpus / "cpu2/online").read_text() == "1"
    assert (memory / "memory1/state").read_text() == "online_movable"
    assert (memory / "memory0/state").read_text() == "online"


# --- Compatibility -------------------------------------------------------------------------------


@pytest.mark.skipif(not PYTHON39.exists(), reason="no Python 3.9 here")
async def test_the_agent_runs_on_python_3_9(launch: Callable[..., Agent]) -> None:
    agent = launch(python=str(PYTHON39))
    with trio.fail_after(10):
        connection = await AgentConnection.start(agent.stream, timeout=5)
        assert connection.info["python"].startswith("3.9.")
        result = await connection.run(["sh", "-c", "cat; exit 5"], stdin=b"abc")
        async with connection.open_process(["tty"], pty=PtySize()) as process:
            assert process.stdout is not None
            assert (await read_until(process.stdout, b"\n")).startswith(b"/dev/pts/")
    assert (result.returncode, result.stdout) == (5, b"abc")


def test_guest_agent_files_are_the_sources() -> None:
    files = guest_agent_files()
    source = Path(agent_module.__file__).parent
    assert files["agent_protocol.py"] == (source / "agent_protocol.py").read_bytes()
    assert b"def main(" in files["vmcache_agent.py"]
    assert shutil.which("sh") is not None


# --- Ports and PID 1 -----------------------------------------------------------------------------


class FakePort:
    """A pty standing in for a virtio-serial port: the agent opens the slave by path."""

    def __init__(self, port_dir: Path, dev_dir: Path, entry: str, name: str) -> None:
        import tty

        self.master, self.slave = os.openpty()  # the slave stays open: without one the master reads EIO
        tty.setraw(self.slave)  # a port carries bytes, not lines
        (port_dir / entry).mkdir(parents=True)
        (port_dir / entry / "name").write_text(name + "\n")
        (dev_dir / entry).symlink_to(os.ttyname(self.slave))
        self.stream = trio.lowlevel.FdStream(os.dup(self.master))

    async def close(self) -> None:
        await self.stream.aclose()
        os.close(self.master)
        os.close(self.slave)


async def test_ports_are_found_by_name_and_served_at_once(agent_dir: Path, tmp_path: Path) -> None:
    port_dir, dev_dir = tmp_path / "ports", tmp_path / "dev"
    dev_dir.mkdir()
    control = FakePort(port_dir, dev_dir, "vport0p1", "vmcache.control")
    user = FakePort(port_dir, dev_dir, "vport0p2", "vmcache.agent.0")
    other = FakePort(port_dir, dev_dir, "vport0p3", "org.qemu.guest_agent.0")
    log = tmp_path / "ports.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-E", "-s", str(agent_dir / "vmcache_agent.py"), "--port-dir", str(port_dir),
             "--dev-dir", str(dev_dir), "--no-set-clock"], stdout=log_file, stderr=log_file)
    try:
        with trio.fail_after(20):
            first = await AgentConnection.start(control.stream, timeout=10)
            second = await AgentConnection.start(user.stream, timeout=10)
            assert (first.info["port"], second.info["port"]) == ("vmcache.control", "vmcache.agent.0")
            async with second.open_process(["sleep", "30"]) as sleeper:
                assert (await first.run(["echo", "control"])).stdout == b"control\n"
                assert await first.ping() == second.boot_id
                # The host end of vmcache.agent.0 goes away: its session ends, its process dies.
                await user.close()
                await wait_until(lambda: pid_gone(sleeper.pid))
                sleeper._stream.end = ap.ProcessEnd(sleeper._stream.id, -9)  # the connection is gone
            assert (await first.run(["echo", "still"])).stdout == b"still\n"
        assert b"org.qemu" not in log.read_bytes()
        assert process.poll() is None  # served ports keep the agent running
    finally:
        process.terminate()
        process.wait(timeout=10)
        await control.close()
        await other.close()
    text = log.read_text()
    assert "serving vmcache.control" in text and "serving vmcache.agent.0" in text, text
    assert "Traceback" not in text, text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
async def test_as_pid_1_the_agent_reaps_orphans_and_ignores_sigterm(agent_dir: Path, tmp_path: Path) -> None:
    host_end, agent_end = socket.socketpair()
    log = tmp_path / "init.log"
    with log.open("wb") as log_file:
        unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-E", "-s",
             str(agent_dir / "vmcache_agent.py"), "--init", "--fd", str(agent_end.fileno()),
             "--no-set-clock"],
            pass_fds=[agent_end.fileno()], stdout=log_file, stderr=log_file)
    agent_end.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(host_end))
    try:
        with trio.fail_after(20):
            connection = await AgentConnection.start(stream, timeout=10)
            [agent_pid] = children_of(unshare.pid)
            assert (await connection.run(["sh", "-c", "echo $PPID"])).stdout == b"1\n"
            os.kill(agent_pid, signal.SIGTERM)  # PID 1 ignores it
            result = await connection.run(["sh", "-c", "(sleep 0.3 &) ; (sleep 0.2 &); echo started"])
            assert result.stdout == b"started\n"
            await trio.sleep(0.6)
            await wait_until(lambda: not children_of(agent_pid))
            assert await connection.ping() == connection.boot_id
    finally:
        await stream.aclose()
        unshare.wait(timeout=10)
    assert "Traceback" not in log.read_text()


async def test_when_the_reading_task_is_cancelled_another_waiter_takes_over(conn: AgentConnection) -> None:
    """The pull design: the task that reads for everyone can be cancelled; another one takes over."""
    outcome: list[bytes] = []
    reader_scope = trio.CancelScope()
    reader_task: list[trio.lowlevel.Task] = []

    async def reads_for_everyone(process: GuestProcess) -> None:
        reader_task.append(trio.lowlevel.current_task())
        with reader_scope:
            await process.wait()  # first to wait on a silent process: this task becomes the reader

    async def waits_for_output() -> None:
        result = await conn.run(["sh", "-c", "sleep 0.6; echo done"])
        outcome.append(result.stdout or b"")

    with trio.fail_after(10):
        async with conn.open_process(["sleep", "30"]) as sleeper, trio.open_nursery() as nursery:
            nursery.start_soon(reads_for_everyone, sleeper)
            await trio.sleep(0.1)
            nursery.start_soon(waits_for_output)
            await trio.sleep(0.3)
            assert conn._reading_task is reader_task[0]  # blocked in receive_some for both of them
            reader_scope.cancel()
    assert reader_scope.cancelled_caught
    assert outcome == [b"done\n"]


async def test_write_file_from_a_trio_stream(conn: AgentConnection, tmp_path: Path) -> None:
    send, receive = trio.testing.memory_stream_pair()
    payload = os.urandom(3_000_000)

    async def produce() -> None:
        await send.send_all(payload)
        await send.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            assert await conn.write_file(str(tmp_path / "streamed"), receive) == len(payload)
    assert (tmp_path / "streamed").read_bytes() == payload


async def test_a_stream_the_agent_gave_up_on_fails_the_call() -> None:
    """An internal error in the agent ends a process stream with END {"error"} and no EOFs."""
    host, guest = trio.testing.memory_stream_pair()

    async def failing_agent() -> None:
        protocol = ap.Connection(ap.Role.GUEST)
        while data := await guest.receive_some():
            protocol.receive_data(data)
            while (event := protocol.next_event()) is not None:
                if isinstance(event, ap.Hello):
                    info = {"protocol": 1, "boot_id": "b"}
                    await guest.send_all(protocol.send(ap.Hello(event.nonce, info)))
                elif isinstance(event, ap.ExecRequest):
                    failure = ap.ErrorEnd(event.stream, "internal error in the guest agent")
                    await guest.send_all(protocol.send(ap.ExecReply(event.stream, 7, 10))
                                         + protocol.send(failure))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(failing_agent)
        with trio.fail_after(5):
            connection = await AgentConnection.start(host, timeout=5)
            with pytest.raises(GuestRequestError, match="internal error"):
                await connection.run(["anything"])
            with pytest.raises(GuestRequestError, match="internal error"):
                async with connection.open_process(["anything"]) as process:
                    await process.wait()
        nursery.cancel_scope.cancel()


async def test_no_fd_leaks(conn: AgentConnection, agent: Agent, tmp_path: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir(f"/proc/{agent.pid}/fd"))

    with trio.fail_after(60):
        await conn.run(["true"])
        before = open_fds()
        for _ in range(5):
            await conn.run(["sh", "-c", "echo out; echo err >&2"], stdin=b"in")
            await conn.run(["python4"])
            async with conn.open_process(["cat"], pty=PtySize()) as process:
                await process.kill()
            with trio.move_on_after(0.05):
                await conn.run(["sleep", "30"])
            with pytest.raises(GuestRequestError):
                await conn.read_file("/no/such/file")
            with pytest.raises(GuestRequestError):
                await conn.run(["true"], cwd="/no/such/dir")
            await conn.write_file(str(tmp_path / "f"), b"data")
            assert await conn.read_file(str(tmp_path / "f")) == b"data"
        await conn.ping()
        await wait_until(lambda: open_fds() == before)


# --- Size limits and a hostile guest --------------------------------------------------------------


async def test_run_stops_at_max_output_and_the_connection_stays_usable(conn: AgentConnection) -> None:
    with trio.fail_after(20):
        with pytest.raises(GuestOutputLimitError, match="more than max_output=1000000 bytes"):
            await conn.run(["head", "-c", "3000000", "/dev/zero"], max_output=1_000_000)
        result = await conn.run(["sh", "-c", "head -c 600000 /dev/zero; head -c 400000 /dev/zero >&2"],
                                max_output=1_000_000)
    assert (len(result.stdout or b""), len(result.stderr or b"")) == (600_000, 400_000)
    assert agent_module.DEFAULT_MAX_OUTPUT == 64 * 1024 * 1024


async def test_read_file_stops_at_max_size(conn: AgentConnection, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 2_000_000)
    with trio.fail_after(20):
        with pytest.raises(GuestOutputLimitError, match="larger than max_size=1000000"):
            await conn.read_file(str(tmp_path / "big"), max_size=1_000_000)
        assert await conn.read_file(str(tmp_path / "big"), max_size=2_000_000) == b"x" * 2_000_000
        with pytest.raises(GuestOutputLimitError):  # a file that says it is small and is not
            await conn.read_file("/proc/self/smaps", max_size=1000)


async def fake_agent(guest: trio.abc.Stream,
                     answer: Callable[[ap.Connection, ap.Event], bytes | list[bytes]]) -> None:
    """A guest agent that may lie: ``answer`` turns each event from the host into raw bytes
    (or a list of pieces, each written on its own)."""
    protocol = ap.Connection(ap.Role.GUEST)
    while data := await guest.receive_some():
        protocol.receive_data(data)
        while (event := protocol.next_event()) is not None:
            if isinstance(event, ap.Hello):
                await guest.send_all(protocol.send(ap.Hello(event.nonce, {"protocol": 1, "boot_id": "b"})))
            elif isinstance(event, ap.Ping):
                await guest.send_all(protocol.send(ap.Pong(event.payload, "b")))
            else:
                pieces = answer(protocol, event)
                for piece in pieces if isinstance(pieces, list) else [pieces]:
                    await guest.send_all(piece)


@pytest.mark.parametrize(("reply", "field"), [
    ({"pid": "7", "window": 10}, "ExecReply.pid"),
    ({"pid": 1 << 62, "window": 10}, "ExecReply.pid"),
    ({"pid": 7, "window": -1}, "ExecReply.window"),
    ({"pid": 7}, "ExecReply.window"),
    ({"error": ["not", "text"]}, "ErrorReply.error"),
    ({"error": "x", "errno": 1.5}, "ErrorReply.errno"),
])
async def test_a_malformed_reply_is_an_agent_protocol_error_naming_the_field(
        reply: dict[str, object], field: str) -> None:
    host, guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, lambda _, event: ap._message(ap.REPLY, event.stream, reply))
        with trio.fail_after(5):
            connection = await AgentConnection.start(host, timeout=5)
            with pytest.raises(AgentProtocolError, match=field.replace(".", r"\.")):
                await connection.run(["true"])
            with pytest.raises(AgentProtocolError, match=field.replace(".", r"\.")):  # and it stays failed
                await connection.ping()
        nursery.cancel_scope.cancel()


async def test_a_flood_of_frames_for_unknown_streams_never_blocks_the_event_loop() -> None:
    """1 MiB REPLY, END and DATA frames for streams the host never opened cost no decoding
    (decoding this value takes a quarter of a second)."""
    host, guest = trio.testing.memory_stream_pair()
    junk = ap.pack_value({"x": [None] * (ap.MAX_PAYLOAD - 20)})
    flood = [ap.HEADER.pack(kind, channel, 0, 1000 + kind, len(junk)) + junk
             for kind, channel in ((ap.REPLY, 0), (ap.END, 0), (ap.DATA, 1))] * 10

    def answer(protocol: ap.Connection, event: ap.Event) -> list[bytes]:
        assert isinstance(event, ap.StatusRequest)
        return [*flood, protocol.send(ap.StatusReply(event.stream, "b"))]

    longest = 0.0

    async def ticker() -> None:
        nonlocal longest
        while True:
            before = time.monotonic()
            await trio.lowlevel.checkpoint()
            longest = max(longest, time.monotonic() - before)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, answer)
        with trio.fail_after(20):
            connection = await AgentConnection.start(host, timeout=5)
            nursery.start_soon(ticker)
            for _ in range(3):
                stream, reply = await connection._request(ap.StatusRequest(0), ap.StatusReply)
                connection._forget(stream)
                assert reply.boot_id == "b"
        nursery.cancel_scope.cancel()
    assert longest < 0.05, f"the event loop was blocked for {longest * 1000:.0f} ms"


async def test_open_owns_a_reader_task_that_pings() -> None:
    host, guest = trio.testing.memory_stream_pair()
    pings = 0

    async def counting_agent() -> None:
        nonlocal pings
        protocol = ap.Connection(ap.Role.GUEST)
        while data := await guest.receive_some():
            protocol.receive_data(data)
            while (event := protocol.next_event()) is not None:
                if isinstance(event, ap.Hello):
                    hello = ap.Hello(event.nonce, {"protocol": 1, "boot_id": "b"})
                    await guest.send_all(protocol.send(hello))
                elif isinstance(event, ap.Ping):
                    pings += 1
                    await guest.send_all(protocol.send(ap.Pong(event.payload, "b")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(counting_agent)
        with trio.fail_after(10):
            async with AgentConnection.open(host, timeout=5) as connection:
                await trio.sleep(2.5)  # nobody calls: the reader task keeps the agent checked
                assert pings >= 2
                assert await connection.ping() == "b"
            with pytest.raises(AgentError, match="closed"):
                await connection.ping()
        nursery.cancel_scope.cancel()


async def test_open_passes_the_blocks_own_error_unwrapped() -> None:
    host, guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, lambda _, event: b"")
        with trio.fail_after(10), pytest.raises(KeyError):
            async with AgentConnection.open(host, timeout=5):
                raise KeyError("mine")
        nursery.cancel_scope.cancel()


class _StuckClose(trio.abc.Stream):
    """A stream whose aclose never returns by itself (a wrapper of someone else's)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await trio.sleep_forever()


async def test_closing_is_bounded_even_in_a_shielded_cleanup(autojump_clock: trio.testing.MockClock) -> None:
    """Holders close their agent connection in shielded cleanups: a stream whose aclose hangs
    must not hang them."""
    host, guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, lambda _, event: b"")
        connection = await AgentConnection.start(_StuckClose(host), timeout=5)
        started = trio.current_time()
        with trio.CancelScope(shield=True), trio.fail_after(agent_module.CLOSE_TIMEOUT + 1):
            await connection.aclose()
        assert trio.current_time() - started == pytest.approx(agent_module.CLOSE_TIMEOUT)
        with pytest.raises(AgentError, match="closed"):
            await connection.ping()
        nursery.cancel_scope.cancel()


# --- TCP connections (port forwarding) -----------------------------------------------------------
#
# The agent runs on the host here, so "127.0.0.1 in the guest" is the host's loopback: each test
# starts its own server there and reaches it only through the agent.


async def _serve_once(handler: Callable[[trio.SocketStream], Any], nursery: trio.Nursery) -> int:
    """A loopback server (every connection to ``handler``); its port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _upper_until_eof(client: trio.SocketStream) -> None:
    """Reads to EOF, then answers with it all upper-cased and closes."""
    data = b""
    while chunk := await client.receive_some():
        data += chunk
    await client.send_all(data.upper())
    await client.aclose()


async def _echo(client: trio.SocketStream) -> None:
    async with client:
        while chunk := await client.receive_some():
            await client.send_all(chunk)
        await client.send_eof()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_connect_tcp_carries_bytes_both_ways_and_half_closes(
        agent: Agent, conn: AgentConnection) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve_once(_upper_until_eof, nursery)
        fds = _open_fds(agent.pid)
        with trio.fail_after(10):
            stream = await conn.connect_tcp(port)
            assert isinstance(stream, trio.abc.HalfCloseableStream)
            await stream.send_all(b"hello ")
            await stream.send_all(b"guest")
            await stream.send_eof()  # the server answers only after our EOF: a true half-close
            with pytest.raises(trio.ClosedResourceError, match="send_eof"):
                await stream.send_all(b"more")
            received = b""
            while chunk := await stream.receive_some():
                received += chunk
            assert received == b"HELLO GUEST"
            assert await stream.receive_some() == b""
            await stream.aclose()
            await wait_until(lambda: _open_fds(agent.pid) == fds)  # the agent closed its socket
        nursery.cancel_scope.cancel()


async def test_connect_tcp_moves_megabytes_both_ways_at_once_under_credit(
        agent: Agent, conn: AgentConnection) -> None:
    payload = os.urandom(12 * 1024 * 1024)  # several windows each way
    async with trio.open_nursery() as nursery:
        port = await _serve_once(_echo, nursery)
        with trio.fail_after(60):
            stream = await conn.connect_tcp(port)
            received = bytearray()

            async def send() -> None:
                view = memoryview(payload)
                for start in range(0, len(view), 1 << 20):
                    await stream.send_all(view[start:start + (1 << 20)])
                await stream.send_eof()

            async with trio.open_nursery() as inner:
                inner.start_soon(send)
                while chunk := await stream.receive_some(1 << 20):
                    received += chunk
            assert bytes(received) == payload
            await stream.aclose()
            assert agent.rss_kib() < 64 * 1024
        nursery.cancel_scope.cancel()


async def test_connect_tcp_to_a_port_nobody_listens_on_is_a_clear_error(conn: AgentConnection) -> None:
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    with trio.fail_after(10):
        with pytest.raises(GuestPortRefusedError,
                           match=rf"nothing listens on 127\.0\.0\.1:{port} in the guest") as caught:
            await conn.connect_tcp(port)
        assert caught.value.errno == errno.ECONNREFUSED
        assert isinstance(caught.value, GuestConnectError)
        assert (await conn.run(["echo", "still fine"])).stdout == b"still fine\n"  # the session is fine


async def test_connect_tcp_gives_up_after_its_timeout(conn: AgentConnection) -> None:
    """A listener whose accept queue is full drops new SYNs: the guest's connect hangs, and
    its timeout ends it."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)
        with trio.fail_after(10):
            started = trio.current_time()
            with pytest.raises(GuestConnectError, match=r"timed out after 0\.5 s") as caught:
                await conn.connect_tcp(full.getsockname()[1], timeout=0.5)
            assert caught.value.errno == errno.ETIMEDOUT
            assert trio.current_time() - started < 3
    finally:
        for filler in fillers:
            filler.close()
        full.close()


async def test_several_connections_at_once(conn: AgentConnection) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve_once(_upper_until_eof, nursery)
        results: dict[int, bytes] = {}

        async def one(index: int) -> None:
            async with await conn.connect_tcp(port) as stream:
                await stream.send_all(f"client {index}".encode())
                await stream.send_eof()
                data = b""
                while chunk := await stream.receive_some():
                    data += chunk
                results[index] = data

        with trio.fail_after(20):
            async with trio.open_nursery() as clients:
                for index in range(20):
                    clients.start_soon(one, index)
        assert results == {index: f"CLIENT {index}".encode() for index in range(20)}
        nursery.cancel_scope.cancel()


async def test_a_connection_reset_in_the_guest_is_a_broken_resource(conn: AgentConnection) -> None:
    async def reset(client: trio.SocketStream) -> None:
        await client.receive_some()
        await client.send_all(b"partial")
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # linger 0: an RST

    async with trio.open_nursery() as nursery:
        port = await _serve_once(reset, nursery)
        with trio.fail_after(10):
            async with await conn.connect_tcp(port) as stream:
                await stream.send_all(b"go")
                received = b""
                with pytest.raises(GuestConnectionBrokenError, match="reset") as caught:
                    while chunk := await stream.receive_some():
                        received += chunk
                assert isinstance(caught.value, trio.BrokenResourceError)
                assert received == b"partial"
        nursery.cancel_scope.cancel()


async def test_closing_an_open_connection_closes_it_in_the_guest(agent: Agent, conn: AgentConnection) -> None:
    closed = trio.Event()

    async def wait_for_close(client: trio.SocketStream) -> None:
        while await client.receive_some():
            pass
        closed.set()

    async with trio.open_nursery() as nursery:
        port = await _serve_once(wait_for_close, nursery)
        fds = _open_fds(agent.pid)
        with trio.fail_after(10):
            stream = await conn.connect_tcp(port)
            await stream.send_all(b"x")
            await stream.aclose()
            await closed.wait()
            await wait_until(lambda: _open_fds(agent.pid) == fds)
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_some()
        nursery.cancel_scope.cancel()


async def test_an_agent_without_connect_says_to_rebuild_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent of an image built before connect existed refuses the request as unknown."""
    monkeypatch.delitem(ap._REQUESTS, "connect")  # the guest end's decoder, as it was

    def answer(protocol: ap.Connection, event: ap.Event) -> bytes:
        assert isinstance(event, ap.BadRequest)
        return protocol.send(ap.ErrorReply(event.stream, event.message))

    host, guest = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, answer)
        with trio.fail_after(5):
            connection = await AgentConnection.start(host, timeout=5)
            with pytest.raises(GuestConnectError, match="rebuild the guest image"):
                await connection.connect_tcp(8080)
            assert await connection.ping() == "b"
        nursery.cancel_scope.cancel()


async def test_connect_tcp_refuses_a_name_or_a_bad_port_before_asking(conn: AgentConnection) -> None:
    with pytest.raises(AgentError, match=r"ConnectRequest\.host is not an IP address"):
        await conn.connect_tcp(80, "localhost")
    with pytest.raises(AgentError, match=r"ConnectRequest\.port"):
        await conn.connect_tcp(70000)


class _ConnectionGuest(GuestAPI):
    """A GuestAPI over one AgentConnection (no VM): what port_forward needs of a guest."""

    def __init__(self, connection: AgentConnection) -> None:
        self.connection = connection

    async def connect_tcp(self, port: int, host: str = "127.0.0.1", *,
                          timeout: float = agent_module.TCP_CONNECT_TIMEOUT) -> agent_module.GuestTcpStream:
        return await self.connection.connect_tcp(port, host, timeout=timeout)


async def test_port_forward_relays_local_connections_through_the_agent(conn: AgentConnection) -> None:
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        upper = await _serve_once(_upper_until_eof, nursery)
        echo = await _serve_once(_echo, nursery)
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))
        nobody = refused.getsockname()[1]
        refused.close()
        specs = [ForwardSpec("127.0.0.1", 0, upper), ForwardSpec("127.0.0.1", 0, echo),
                 ForwardSpec("127.0.0.1", 0, nobody)]
        with trio.fail_after(20):
            ports = await nursery.start(partial_port_forward(_ConnectionGuest(conn), specs, errors.append))
            for _ in range(3):
                client = await trio.open_tcp_stream("127.0.0.1", ports[0])
                await client.send_all(b"abc")
                await client.send_eof()
                assert await _read_all(client) == b"ABC"
                await client.aclose()
            client = await trio.open_tcp_stream("127.0.0.1", ports[1])
            await client.send_all(b"x" * 3_000_000)
            await client.send_eof()
            assert await _read_all(client) == b"x" * 3_000_000
            await client.aclose()
            client = await trio.open_tcp_stream("127.0.0.1", ports[2])
            assert await _read_all(client) == b""  # refused in the guest: closed here
            await client.aclose()
            await wait_until(lambda: bool(errors))
        assert errors == [f"port-forward 127.0.0.1:{ports[2]} -> 127.0.0.1:{nobody} in the guest: "
                          f"nothing listens on 127.0.0.1:{nobody} in the guest (connection refused)"]
        nursery.cancel_scope.cancel()


def partial_port_forward(guest: GuestAPI, specs: list[ForwardSpec],
                         on_error: Callable[[str], None]) -> Callable[..., Any]:
    return functools.partial(port_forward, guest, specs, on_error=on_error)


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def test_port_forward_ends_with_its_vm_and_closes_its_listeners(conn: AgentConnection) -> None:
    gone = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def forward(task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
                with pytest.raises(VMGoneError, match="the VM stopped: port-forward ends"):
                    await port_forward(_ConnectionGuest(conn), [ForwardSpec("127.0.0.1", 0, 1)],
                                       vm_stopped=gone.wait, task_status=task_status)

            [port] = await nursery.start(forward)
            (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()  # it listens
            gone.set()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_port_forward_abandons_a_connection_a_hostile_agent_never_grants_credit_to(
        autojump_clock: trio.testing.MockClock) -> None:
    """An agent that connects, grants 1000 bytes and then neither grants more nor ever sends:
    once the local client has gone (or half-closed), the forwarder resets the guest stream and
    closes its socket within NO_PROGRESS_TIMEOUT, not never."""
    host, guest = trio.testing.memory_stream_pair()
    received = 0
    resets: list[int] = []
    errors: list[str] = []
    error_seen = trio.Event()

    def answer(protocol: ap.Connection, event: ap.Event) -> bytes:
        nonlocal received
        if isinstance(event, ap.ConnectRequest):
            return protocol.send(ap.ConnectReply(event.stream, 1000))
        if isinstance(event, ap.Data):
            received += len(event.data)
        elif isinstance(event, ap.Reset):
            resets.append(event.stream)
        return b""

    def on_error(line: str) -> None:
        errors.append(line)
        error_seen.set()

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    bound = port_forward_module.NO_PROGRESS_TIMEOUT
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_agent, guest, answer)
        with trio.fail_after(4 * bound):
            connection = await AgentConnection.start(host, timeout=5)
            [port] = await nursery.start(partial_port_forward(
                _ConnectionGuest(connection), [ForwardSpec("127.0.0.1", 0, 80)], on_error))
            baseline = open_fds()

            # The client sends more than the credit, then goes away.
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"x" * 100_000)
            await wait_until(lambda: received == 1000, timeout=bound)  # the forwarder is stuck
            await client.aclose()
            gone = trio.current_time()
            await error_seen.wait()
            assert trio.current_time() - gone <= bound
            await wait_until(lambda: open_fds() == baseline and len(resets) == 1, timeout=1)
            assert errors == [f"port-forward 127.0.0.1:{port} -> 127.0.0.1:80 in the guest: connection "
                              f"broken: the guest took none of the bytes sent to it for {bound:g} s"]

            # The client half-closes and waits for an answer that never comes.
            error_seen = trio.Event()
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"hi")
            await client.send_eof()
            eof = trio.current_time()
            assert await _read_all(client) == b""  # the forwarder gave up and closed its end
            assert trio.current_time() - eof == pytest.approx(bound, abs=1)
            await client.aclose()
            await error_seen.wait()
            await wait_until(lambda: open_fds() == baseline and len(resets) == 2, timeout=1)
            assert errors[1] == (f"port-forward 127.0.0.1:{port} -> 127.0.0.1:80 in the guest: connection "
                                 f"broken: the guest sent nothing for {bound:g} s after the local side's EOF")
            assert (await connection.ping()) == "b"  # the agent connection itself is fine
        nursery.cancel_scope.cancel()


async def test_a_guest_peer_that_stops_reading_breaks_send_all(conn: AgentConnection) -> None:
    async def slam(client: trio.SocketStream) -> None:
        await client.receive_some(1)  # connected for sure, then reset while bytes keep coming
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()

    async with trio.open_nursery() as nursery:
        port = await _serve_once(slam, nursery)
        with trio.fail_after(20):
            async with await conn.connect_tcp(port) as stream:
                with pytest.raises(GuestConnectionBrokenError):
                    for _ in range(1000):  # far more than every window and buffer on the way
                        await stream.send_all(b"x" * 65536)
            assert (await conn.run(["true"])).returncode == 0
        nursery.cancel_scope.cancel()


async def test_an_init_agent_brings_the_loopback_up_for_guest_servers(
        agent_dir: Path, tmp_path: Path) -> None:
    """In a network namespace of the test's own, where ``lo`` starts down as in a fresh guest:
    the agent as init sets it up, and a server it starts there is reached by connect_tcp."""
    host_end, agent_end = socket.socketpair()
    log = tmp_path / "netns-agent.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            ["unshare", "--net", sys.executable, "-E", "-s", str(agent_dir / "vmcache_agent.py"), "--init",
             "--fd", str(agent_end.fileno()), "--no-set-clock"],
            pass_fds=[agent_end.fileno()], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    agent_end.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(host_end))
    try:
        with trio.fail_after(20):
            connection = await AgentConnection.start(stream, timeout=10)
            server = ("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
                      "print(s.getsockname()[1], flush=True)\nc = s.accept()[0]\n"
                      "c.sendall(c.recv(100)[::-1])\n")
            async with connection.open_process([sys.executable, "-c", server]) as guest_server:
                assert guest_server.stdout is not None
                port = int(await guest_server.stdout.receive_some())
                async with await connection.connect_tcp(port) as tcp:
                    await tcp.send_all(b"olleh")
                    assert await tcp.receive_some() == b"hello"
    finally:
        await stream.aclose()
        process.wait(timeout=10)
    assert "brought the loopback interface up" in log.read_text()
