"""`vmcache exec`'s relay (vmcache.relay) without QEMU: the real agent runs on this host.

Each test runs a small driver in a child process, as the CLI would be: the guest
agent on a socket pair, and :func:`vmcache.relay.relay_process` with the child's
own stdin/stdout/stderr (a pty, a pipe, /dev/full), so the terminal and file
descriptor handling is the real one. The same on real QEMU through the CLI is in
test_guest.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmcache.agent_client import guest_agent_files

SRC = Path(__file__).resolve().parent.parent / "src"

DRIVER = r"""
import json, socket, subprocess, sys
import trio
from vmcache import relay
from vmcache.agent_client import AgentConnection
from vmcache.errors import VmcacheError

argv, tty, forward_stdin, agent_dir = json.loads(sys.argv[1])


class Guest:
    def __init__(self, connection):
        self.connection = connection

    def open_process(self, *args, **kwargs):
        return self.connection.open_process(*args, **kwargs)


async def main():
    host, agent = socket.socketpair()
    process = subprocess.Popen(
        [sys.executable, "-E", "-s", agent_dir + "/vmcache_agent.py", "--fd", str(agent.fileno()),
         "--no-set-clock"], pass_fds=[agent.fileno()], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(host))
    connection = await AgentConnection.start(stream, timeout=10)
    try:
        request = relay.ProcessRequest(argv=argv, tty=tty, forward_stdin=forward_stdin)
        return await relay.relay_process(Guest(connection), request, forward_sigint=False)
    finally:
        await connection.aclose()
        process.wait()


try:
    status = trio.run(main)
except VmcacheError as error:
    print(f"vmcache: {error}", file=sys.stderr)
    status = error.exit_status
sys.exit(status)
"""


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """Overrides conftest's check: no QEMU here (and other runs' QEMUs are not ours)."""
    yield


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "agent"
    directory.mkdir()
    for name, content in guest_agent_files().items():
        (directory / name).write_bytes(content)
    return directory


def driver(agent_dir: Path, argv: list[str], *, tty: bool = False, forward_stdin: bool = False,
           **popen: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    arguments = json.dumps([argv, tty, forward_stdin, str(agent_dir)])
    return subprocess.Popen([sys.executable, "-c", DRIVER, arguments], env=env, **popen)  # type: ignore[call-overload, no-any-return]


def test_keys_typed_before_the_process_starts_reach_it(agent_dir: Path) -> None:
    """Type-ahead is kept (ssh and docker exec keep it): a line typed before vmcache even
    started, and one typed while it connects, both reach the shell; nothing is discarded
    when the terminal is made raw."""
    master, slave = pty.openpty()
    os.write(master, b"echo typed-$((6*7))\n")  # before the relay exists at all
    process = driver(agent_dir, ["sh"], tty=True, forward_stdin=True, stdin=slave, stdout=slave,
                     stderr=slave, start_new_session=True)
    os.close(slave)
    os.write(master, b"echo early-$((5*5))\n")  # while it starts and connects
    seen = b""

    def expect(needle: bytes, timeout: float = 20) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while needle not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {needle!r} within {timeout} s: the typed keys were lost; got {seen[-500:]!r}"
            try:
                seen += os.read(master, 65536)
            except OSError:  # EIO: the relay exited
                raise AssertionError(f"the relay exited before {needle!r}: {seen[-500:]!r}") from None

    try:
        expect(b"typed-42")
        expect(b"early-25")
        os.write(master, b"exit 3\n")
        assert process.wait(timeout=20) == 3
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def test_a_non_blocking_stdout_gets_every_byte(agent_dir: Path) -> None:
    """A stdout that another program made non-blocking (the flag is on the shared pipe) is
    waited on, not an error: every byte arrives, in order."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    size = 5_000_000
    process = driver(agent_dir, ["head", "-c", str(size), "/dev/urandom"], stdout=write_end,
                     stderr=subprocess.PIPE)
    os.close(write_end)
    time.sleep(1)  # a slow reader: the pipe fills up
    received = bytearray()
    while chunk := os.read(read_end, 1 << 20):
        received += chunk
    os.close(read_end)
    assert process.stderr is not None
    stderr = process.stderr.read()
    assert process.wait(timeout=30) == 0, stderr
    assert len(received) == size and stderr == b""


def test_a_stdout_that_cannot_be_written_is_one_line(agent_dir: Path) -> None:
    """A write error here (a full disk) stops the command with one line that says which
    stream and why, not an 'unexpected error'."""
    with open("/dev/full", "wb") as full:
        process = driver(agent_dir, ["head", "-c", "1000000", "/dev/zero"], stdout=full,
                         stderr=subprocess.PIPE)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1, stderr
    assert stderr == b"vmcache: cannot write the command's stdout here: No space left on device\n"
