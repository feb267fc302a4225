"""The guest made for real work, against real QEMU (TCG), a real daemon and the real CLI.

One daemon and one handed-out VM serve most tests of this module (a VM that the
tests only use, never break); the tests that kill a guest take their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import RUN_DIR_PREFIX, VMCACHE, pid_alive, qemu_pids, wait_until, write_config
from daemon import Daemon

import vmcache
from vmcache.errors import VMDiedError

pytestmark = pytest.mark.qemu


class Held:
    """The module's daemon and the VM it handed to us (a handle file)."""

    def __init__(self, daemon: Daemon, handle_file: Path, env: dict[str, str]) -> None:
        self.daemon = daemon
        self.handle_file = handle_file
        self.env = env
        self.handle = vmcache.VMHandle.from_json(handle_file.read_text())

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 120,
            ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*VMCACHE, *args], input=input, capture_output=True, timeout=timeout,
                              env=self.env)


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """The module's daemon refills its cache while tests run: QEMU processes are counted
    for the whole module instead (``held``), and each test that starts its own checks it."""
    yield


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Held]:
    tmp = tmp_path_factory.mktemp("guest")
    run_dir = Path(f"{RUN_DIR_PREFIX}guest-{time.monotonic_ns() % 10**9}")
    run_dir.mkdir(mode=0o700)
    env = {**os.environ, "VMCACHE_RUN_DIR": str(run_dir)}
    old_env = os.environ.get("VMCACHE_RUN_DIR")
    os.environ["VMCACHE_RUN_DIR"] = str(run_dir)
    before = qemu_pids()
    daemon = Daemon(tmp, run_dir, cache=1).start()
    try:
        daemon.wait_cached(1)
        handle_file = tmp / "vm.json"
        handle_file.write_text(daemon.cli("get").stdout)
        yield Held(daemon, handle_file, env)
        subprocess.run([*VMCACHE, "stop", str(handle_file)], env=env, capture_output=True, timeout=60)
        daemon.signal(signal.SIGTERM)
    finally:
        daemon.ensure_stopped()
        if old_env is None:
            os.environ.pop("VMCACHE_RUN_DIR", None)
        else:
            os.environ["VMCACHE_RUN_DIR"] = old_env
        subprocess.run(["rm", "-rf", str(run_dir)], check=False)
    assert wait_until(lambda: qemu_pids() == before, 10), "the module left QEMU processes"


def test_python3_in_the_default_image(held: Held) -> None:
    done = subprocess.run([*VMCACHE, "run", "--endpoint", str(held.daemon.endpoint), "--", "python3", "-c",
                           "import sys, json; print(sys.version_info[0])"],
                          capture_output=True, text=True, timeout=120, env=held.env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "3\n", "")


def test_stdin_reaches_the_command_and_bytes_come_back_identical(held: Held) -> None:
    done = subprocess.run([*VMCACHE, "run", "--endpoint", str(held.daemon.endpoint), "--", "wc", "-l"],
                          input=b"a\nb\n", capture_output=True, timeout=120, env=held.env)
    assert (done.returncode, done.stdout.strip()) == (0, b"2")
    data = os.urandom(10 << 20)
    done = held.cli("exec", str(held.handle_file), "--", "cat", input=data)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_output_streams_as_it_is_produced(held: Held) -> None:
    process = subprocess.Popen([*VMCACHE, "exec", str(held.handle_file), "--", "sh", "-c",
                                "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.5; done"],
                               stdout=subprocess.PIPE, env=held.env)
    assert process.stdout is not None
    started = time.monotonic()
    first = process.stdout.readline()
    first_at = time.monotonic() - started
    rest = process.stdout.read()
    process.wait(timeout=60)
    total = time.monotonic() - started
    assert first == b"line 1\n" and rest.count(b"\n") == 5
    assert first_at < 1.5, f"the first line came after {first_at:.2f} s"
    assert total - first_at >= 2.4, "the lines came as they were printed, not all at the end"


async def test_twice_the_guests_memory_of_output_arrives_whole(held: Held) -> None:
    size = 512 << 20  # the guest has 256 MiB
    received = 0
    with trio.fail_after(240):
        async with held.handle.open_process(["head", "-c", str(size), "/dev/zero"]) as process:
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some(1 << 20):
                received += len(chunk)
            assert await process.wait() == 0
        assert received == size
        alive = await held.handle.run(["true"])  # the agent is still there (it is PID 1)
        assert alive.returncode == 0
    await held.handle.disconnect()


async def test_sixteen_processes_over_one_connection(held: Held) -> None:
    results: dict[int, bytes] = {}

    async def one(index: int) -> None:
        async with held.handle.open_process(["sh", "-c", "read x; sleep 1; echo $x-$x"]) as process:
            assert process.stdin is not None and process.stdout is not None
            await process.stdin.send_all(f"{index}\n".encode())
            await process.stdin.aclose()
            output = b""
            while chunk := await process.stdout.receive_some():
                output += chunk
            await process.wait()
            results[index] = output

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for index in range(16):
                nursery.start_soon(one, index)
    assert results == {index: f"{index}-{index}\n".encode() for index in range(16)}
    await held.handle.disconnect()


def test_eight_cli_execs_at_once_on_one_vm(held: Held) -> None:
    processes = [subprocess.Popen([*VMCACHE, "exec", str(held.handle_file), "--", "sh", "-c",
                                   f"sleep 2; echo exec {index}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=held.env)
                 for index in range(8)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 8, [err for _, err in outputs]
    assert [out for out, _ in outputs] == [f"exec {index}\n".encode() for index in range(8)]


def test_exit_statuses_and_a_missing_command(held: Held) -> None:
    handle = str(held.handle_file)
    assert held.cli("exec", handle, "--", "sh", "-c", "exit 3").returncode == 3
    assert held.cli("exec", handle, "--", "sh", "-c", "kill -9 $$").returncode == 137
    missing = held.cli("exec", handle, "--", "python4", "-c", "1")
    assert missing.returncode == 127
    assert missing.stderr == b"vmcache: command not found in the guest: python4\n"
    # Options before and after the handle; environment and working directory.
    done = held.cli("exec", "--env", "GREETING=hi", handle, "--cwd", "/tmp", "--", "sh", "-c",
                    'echo "$GREETING from $(pwd)"')
    assert (done.returncode, done.stdout) == (0, b"hi from /tmp\n")


def test_cp_fifty_megabytes_in_and_out(held: Held, tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(50 << 20))
    source.chmod(0o640)
    handle = str(held.handle_file)
    done = held.cli("cp", str(source), f"{handle}:/tmp/")
    assert done.returncode == 0, done.stderr
    mode = held.cli("exec", handle, "--", "stat", "-c", "%a %s", "/tmp/data.bin").stdout
    assert mode == f"640 {50 << 20}\n".encode()
    back = tmp_path / "back"
    back.mkdir()
    done = held.cli("cp", f"{handle}:/tmp/data.bin", str(back))
    assert done.returncode == 0, done.stderr
    copy = back / "data.bin"
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
    assert copy.stat().st_mode & 0o777 == 0o640
    # stdin and stdout as the local side.
    done = held.cli("cp", "-", f"{handle}:/tmp/piped.txt", input=b"through a pipe\n")
    assert done.returncode == 0, done.stderr
    assert held.cli("cp", f"{handle}:/tmp/piped.txt", "-").stdout == b"through a pipe\n"
    missing = held.cli("cp", f"{handle}:/nonexistent", str(back))
    assert missing.returncode != 0 and missing.stderr.count(b"\n") == 1



def test_cp_to_stdout_into_a_reader_that_stops_ends_quietly(held: Held) -> None:
    """`vmcache cp HANDLE:PATH - | head -c 10`: the reader leaving is no error, as for cat
    (status 128 + SIGPIPE, nothing on stderr)."""
    assert held.cli("exec", str(held.handle_file), "--", "sh", "-c",
                    "head -c 30000000 /dev/zero > /tmp/big").returncode == 0
    process = subprocess.Popen([*VMCACHE, "cp", f"{held.handle_file}:/tmp/big", "-"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=held.env)
    assert process.stdout is not None and process.stderr is not None
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE, stderr
    assert stderr == b""

def test_cp_out_of_the_guest_makes_no_setuid_file_and_applies_the_umask(held: Held, tmp_path: Path) -> None:
    """A hostile guest's setuid (setgid, sticky) file is copied as a plain file, like cp
    without -p, with the user's umask applied."""
    handle = str(held.handle_file)
    made = held.cli("exec", handle, "--", "sh", "-c",
                    "echo x > /tmp/suid && chmod 7755 /tmp/suid && stat -c %a /tmp/suid")
    assert made.stdout == b"7755\n", made.stderr
    for umask, expected in ((0o022, 0o755), (0o077, 0o700)):
        target = tmp_path / f"suid-{umask:o}"
        done = subprocess.run([*VMCACHE, "cp", f"{handle}:/tmp/suid", str(target)], capture_output=True,
                              timeout=120, env=held.env, umask=umask)
        assert done.returncode == 0, done.stderr
        assert target.stat().st_mode & 0o7777 == expected


def test_an_interactive_shell_on_a_pty(held: Held) -> None:
    master, slave = pty.openpty()
    process = subprocess.Popen([*VMCACHE, "exec", "-it", str(held.handle_file), "--", "sh"],
                               stdin=slave, stdout=slave, stderr=slave, env=held.env,
                               start_new_session=True)
    os.close(slave)
    seen = b""

    def expect(needle: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while needle not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {needle!r} within {timeout} s; got {seen[-500:]!r}"
            try:
                seen += os.read(master, 65536)
            except OSError:  # EIO: every slave end closed, vmcache exited
                raise AssertionError(f"vmcache exited before {needle!r}: {seen[-500:]!r}") from None

    try:
        time.sleep(1)
        os.write(master, b"echo $((6*7))\n")
        expect(b"42")
        os.write(master, b"tty\n")
        expect(b"/dev/pts/")
        os.write(master, b"exit 5\n")
        assert process.wait(timeout=60) == 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)



def test_keys_typed_before_the_guest_shell_starts_are_kept(held: Held) -> None:
    """Type-ahead, as ssh and docker exec keep it: a line typed before vmcache started and
    one typed while it connects both reach the guest's shell (they used to be echoed here,
    then discarded when the terminal was made raw)."""
    master, slave = pty.openpty()
    os.write(master, b"echo typed-$((6*7))\n")
    process = subprocess.Popen([*VMCACHE, "exec", "-it", str(held.handle_file), "--", "sh"],
                               stdin=slave, stdout=slave, stderr=slave, env=held.env,
                               start_new_session=True)
    os.close(slave)
    os.write(master, b"echo early-$((5*5))\n")
    seen = b""

    def expect(needle: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while needle not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {needle!r} within {timeout} s: typed keys lost; got {seen[-500:]!r}"
            try:
                seen += os.read(master, 65536)
            except OSError:  # EIO: every slave end closed, vmcache exited
                raise AssertionError(f"vmcache exited before {needle!r}: {seen[-500:]!r}") from None

    try:
        expect(b"typed-42")
        expect(b"early-25")
        os.write(master, b"exit 4\n")
        assert process.wait(timeout=60) == 4
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)

async def test_a_guest_killed_mid_call_fails_the_call_at_once(held: Held, tmp_path: Path) -> None:
    """The kernel panics under a running call (sysrq c): the call fails within 2 s, quoting it."""
    daemon = held.daemon
    with trio.fail_after(120):
        async with vmcache.connect(daemon.endpoint) as cache:
            vm = await cache.get_vm(timeout=120)
    started = time.monotonic()
    with trio.fail_after(30), pytest.raises(VMDiedError) as died:
        await vm.run(["sh", "-c", "sleep 0.5; echo c > /proc/sysrq-trigger; sleep 60"])
    assert time.monotonic() - started < 2.5
    assert "Kernel panic" in str(died.value)
    assert not pid_alive(vm.pid)

    # The same through the CLI: non-zero, one line.
    handle_file = tmp_path / "doomed.json"
    async with vmcache.connect(daemon.endpoint) as cache:
        handle_file.write_text((await cache.get_vm(timeout=120)).to_json())
    started = time.monotonic()
    done = await trio.run_process([*VMCACHE, "exec", str(handle_file), "--", "sh", "-c",
                                   "echo c > /proc/sysrq-trigger; sleep 60"],
                                  capture_stdout=True, capture_stderr=True, check=False, env=held.env)
    assert done.returncode != 0
    assert done.stderr.count(b"\n") == 1 and b"Kernel panic" in done.stderr, done.stderr
    assert time.monotonic() - started < 5  # CLI start-up included


def test_a_user_image_config_without_python_is_one_line(tmp_path: Path, guest_image: Path,
                                                         run_dir: Path) -> None:
    """Kernel and initrd of one's own, no image, and an initrd that cannot run the agent."""
    initrd = tmp_path / "plain.cpio"
    from vmcache.image.cpio import directory, write_cpio

    initrd.write_bytes(write_cpio([directory("bin")]))
    config = write_config(tmp_path / "c.toml", kernel=str(guest_image / "vmlinuz"), initrd=str(initrd))
    done = subprocess.run([*VMCACHE, "run", "--direct", "--config", str(config), "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "has no /usr/bin/python3" in done.stderr and "vmcache_agent.py" in done.stderr


def test_status_json_lists_the_vm_handed_out(held: Held) -> None:
    status = json.loads(held.daemon.cli("status", "--json").stdout)
    assert held.handle.id in [vm["id"] for vm in status["handed_out_vms"]]


# --- Ports inside the guest, reached from the host through the agent (no guest network) ----------

#: A tiny server for the guest: answers every connection with what it reads, upper-cased, as it
#: reads it, and half-closes at the client's EOF. Prints its port once it listens.
UPPER_SERVER = r"""
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(64)
print(server.getsockname()[1], flush=True)
def serve(client):
    while True:
        chunk = client.recv(65536)
        if not chunk:
            break
        client.sendall(chunk.upper())
    client.shutdown(socket.SHUT_WR)
    client.close()
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""


async def _guest_server(process: vmcache.GuestProcess) -> int:
    """The port the guest server printed once it listens."""
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some()
        assert chunk, "the guest server exited"
        line += chunk
    return int(line)


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def test_connect_tcp_reaches_a_guest_server_with_no_guest_network(held: Held) -> None:
    handle = held.handle
    try:
        with trio.fail_after(60):
            interfaces = await handle.run(["ls", "/sys/class/net"])
            assert interfaces.stdout is not None  # mode none: no network device at all
            assert interfaces.stdout.split() == [b"lo"]
            async with handle.open_process(["python3", "-c", UPPER_SERVER, "0"]) as server:
                port = await _guest_server(server)
                async with await handle.connect_tcp(port) as stream:
                    await stream.send_all(b"hello ")
                    assert await stream.receive_some() == b"HELLO "  # as it goes, both ways
                    await stream.send_all(b"guest" * 200_000)  # a megabyte: several windows
                    await stream.send_eof()  # the server sees EOF, answers the rest, half-closes
                    assert await _read_all(stream) == b"GUEST" * 200_000

                async def one(index: int) -> bytes:
                    async with await handle.connect_tcp(port) as stream:
                        await stream.send_all(f"client {index}".encode())
                        await stream.send_eof()
                        return await _read_all(stream)

                results: dict[int, bytes] = {}

                async def keep(index: int) -> None:
                    results[index] = await one(index)

                async with trio.open_nursery() as nursery:
                    for index in range(8):
                        nursery.start_soon(keep, index)
                assert results == {index: f"CLIENT {index}".encode() for index in range(8)}
                with pytest.raises(vmcache.GuestPortRefusedError,
                                   match=f"nothing listens on 127.0.0.1:{port + 1} in the guest"):
                    await handle.connect_tcp(port + 1)
                await server.kill()
    finally:
        await handle.disconnect()


def _forward_lines(process: subprocess.Popen[bytes], count: int, timeout: float) -> list[str]:
    """The first ``count`` lines the process prints (read from the pipe itself: a buffered
    reader may hold the next line where select() does not see it)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    output = b""
    deadline = time.monotonic() + timeout
    while output.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"port-forward printed {output!r} only"
        chunk = os.read(fd, 4096)
        assert chunk, f"port-forward exited ({process.wait()}) after printing {output!r}"
        output += chunk
    return output.decode().splitlines()[:count]


def test_port_forward_two_ports_at_once_then_ctrl_c(held: Held) -> None:
    server = subprocess.Popen([*VMCACHE, "exec", str(held.handle_file), "--", "python3", "-c",
                               UPPER_SERVER, "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              env=held.env)
    second = subprocess.Popen([*VMCACHE, "exec", str(held.handle_file), "--", "python3", "-c",
                               UPPER_SERVER, "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              env=held.env)
    forward = None
    try:
        assert server.stdout is not None and second.stdout is not None
        ports = [int(server.stdout.readline()), int(second.stdout.readline())]
        forward = subprocess.Popen([*VMCACHE, "port-forward", str(held.handle_file), f"0:{ports[0]}",
                                    f"127.0.0.1:0:{ports[1]}"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=held.env)
        lines = _forward_lines(forward, 2, 60)
        local = []
        for line, port in zip(lines, ports, strict=True):
            prefix, _, target = line.partition(" -> ")
            assert prefix.startswith("Forwarding from 127.0.0.1:") and target == str(port), lines
            local.append(int(prefix.rsplit(":", 1)[1]))
        for index, local_port in enumerate(local * 2):  # each forward, twice
            with socket.create_connection(("127.0.0.1", local_port), timeout=30) as client:
                client.sendall(f"request {index}".encode())
                client.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := client.recv(65536):
                    data += chunk
            assert data == f"REQUEST {index}".encode()
        forward.send_signal(signal.SIGINT)
        assert forward.wait(timeout=30) == 130
        assert forward.stderr is not None
        assert forward.stderr.read().decode().splitlines() == ["vmcache: interrupted (SIGINT)"]
        for local_port in local:  # no listener left behind
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", local_port), timeout=5).close()
    finally:
        for process in (forward, server, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
