"""Ports inside the guest reached from the host through the agent, beside the agent's stdout.

    flock /tmp/vmcache-qemu.lock python bench/port_forward.py [--size-mb 100] [--runs 3]

Starts a daemon (this tree) with a cache of one VM (mode none: no network device), takes
it with `vmcache get`, starts a small HTTP/1.0 download server in the guest (python3,
one response of SIZE bytes per request), then measures in one run, on that one VM:

  stdout        `head -c SIZE /dev/zero` read through ``open_process`` (the agent's stdout)
  connect_tcp   the download read through ``vm.connect_tcp`` in this process
  port-forward  the download through a `vmcache port-forward` subprocess, read here from
                its local port
  set-up        ``connect_tcp`` alone; and connect + a one-byte round trip, through the
                library and through port-forward (an echo server in the guest)

MB/s are SIZE over the transfer's wall time; medians of ``--runs``. CPU seconds spent by
the guest agent (PID 1), the guest server, the QEMU process and the forwarder during
each download say where the time goes. Everything is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

import vmcache

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")

#: HTTP/1.0 download server: every request gets SIZE bytes (argv[2]), then the connection closes;
#: with argv[3] == "echo" it echoes instead. Prints its port once it listens.
SERVER = r"""
import socket, sys, threading
size, mode = int(sys.argv[2]), sys.argv[3]
block = memoryview(b"x" * (1 << 20))
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(64)
print(server.getsockname()[1], flush=True)
def download(client):
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = client.recv(4096)
        if not chunk:
            return client.close()
        request += chunk
    client.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    left = size
    while left:
        left -= client.send(block[:min(left, len(block))])
    client.close()
def echo(client):
    while True:
        chunk = client.recv(65536)
        if not chunk:
            break
        client.sendall(chunk)
    client.close()
while True:
    threading.Thread(target=download if mode == "download" else echo, args=(server.accept()[0],),
                     daemon=True).start()
"""
REQUEST = b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n"


def host_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def guest_cpu(vm: vmcache.VMHandle, pids: list[int]) -> list[float]:
    """CPU seconds (user + system) of guest processes, from the guest's /proc."""
    script = "import os,sys\nt=os.sysconf('SC_CLK_TCK')\nfor p in sys.argv[1:]:\n" \
             " f=open('/proc/%s/stat'%p).read().rsplit(')',1)[1].split()\n print((int(f[11])+int(f[12]))/t)"
    done = await vm.run(["python3", "-c", script, *map(str, pids)], check=True)
    assert done.stdout is not None
    return [float(line) for line in done.stdout.split()]


async def read_all(stream: trio.abc.ReceiveStream) -> int:
    total = 0
    while chunk := await stream.receive_some(1 << 20):
        total += len(chunk)
    return total


async def start_server(vm: vmcache.VMHandle, nursery: trio.Nursery, size: int, mode: str,
                       ) -> tuple[int, int]:
    """A guest server (its port and guest pid), running until the nursery is cancelled."""
    ready: trio.Event = trio.Event()
    found: list[int] = []

    async def run() -> None:
        async with vm.open_process(["python3", "-c", SERVER, "0", str(size), mode]) as process:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some()
            found.extend([int(line), process.pid])
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    with trio.fail_after(60):
        await ready.wait()
    return found[0], found[1]


async def measure(vm: vmcache.VMHandle, qemu_pid: int,
                  forwarder: Callable[[int], Awaitable[tuple[int, int]]],
                  size: int, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    async with trio.open_nursery() as nursery:
        port, server_pid = await start_server(vm, nursery, size, "download")
        echo_port, _ = await start_server(vm, nursery, 0, "echo")
        (local, forward_pid), (echo_local, _) = await forwarder(port), await forwarder(echo_port)

        async def cpu_around(name: str, work: Callable[[], Awaitable[float]]) -> None:
            guest_before = await guest_cpu(vm, [1, server_pid])
            qemu_before, forward_before = host_cpu(qemu_pid), host_cpu(forward_pid)
            note(name, await work())
            guest_after = await guest_cpu(vm, [1, server_pid])
            note(f"{name} cpu agent", guest_after[0] - guest_before[0])
            note(f"{name} cpu server", guest_after[1] - guest_before[1])
            note(f"{name} cpu qemu", host_cpu(qemu_pid) - qemu_before)
            note(f"{name} cpu forwarder", host_cpu(forward_pid) - forward_before)

        async def stdout() -> float:
            start = time.perf_counter()
            async with vm.open_process(["head", "-c", str(size), "/dev/zero"]) as process:
                assert process.stdout is not None
                assert await read_all(process.stdout) == size
            return size / 1e6 / (time.perf_counter() - start)

        async def library() -> float:
            start = time.perf_counter()
            async with await vm.connect_tcp(port) as stream:
                await stream.send_all(REQUEST)
                received = await read_all(stream)
            assert received > size, received
            return size / 1e6 / (time.perf_counter() - start)

        async def forwarded() -> float:
            start = time.perf_counter()
            async with await trio.open_tcp_stream("127.0.0.1", local) as stream:
                await stream.send_all(REQUEST)
                received = await read_all(stream)
            assert received > size, received
            return size / 1e6 / (time.perf_counter() - start)

        for _ in range(runs):
            await cpu_around("stdout", stdout)
            await cpu_around("connect_tcp", library)
            await cpu_around("port-forward", forwarded)
        for _ in range(20):
            start = time.perf_counter()
            stream = await vm.connect_tcp(echo_port)
            note("set-up connect_tcp", (time.perf_counter() - start) * 1000)
            await stream.send_all(b"x")
            assert await stream.receive_some() == b"x"
            note("set-up connect_tcp + 1-byte round trip", (time.perf_counter() - start) * 1000)
            await stream.aclose()
            start = time.perf_counter()
            async with await trio.open_tcp_stream("127.0.0.1", echo_local) as local_stream:
                await local_stream.send_all(b"x")
                assert await local_stream.receive_some() == b"x"
            note("set-up port-forward + 1-byte round trip", (time.perf_counter() - start) * 1000)
        nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * 1_000_000
    work = Path(tempfile.mkdtemp(prefix="vmcache-bench-forward-", dir="/tmp"))
    work.chmod(0o711)
    os.environ["VMCACHE_RUN_DIR"] = str(work / "run")
    endpoint = work / "cache.sock"
    config = work / "daemon.toml"
    config.write_text(f'[factory]\nvm_cache_number = 1\nvm_cache_endpoint = "{endpoint}"\n'
                      '[hypervisor.qemu]\naccel = "tcg"\nboot_timeout = 60.0\n')
    command = [sys.executable, "-m", "vmcache"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(work / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([*command, "serve", "--config", str(config)], env=env,
                                  stdout=log, stderr=log)
    handle_file = work / "vm.json"
    forwarders: list[subprocess.Popen[bytes]] = []

    async def forwarder(guest_port: int) -> tuple[int, int]:
        """A `vmcache port-forward` of ``guest_port``: its local port and its pid."""
        process = subprocess.Popen([*command, "port-forward", str(handle_file), f"0:{guest_port}"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        forwarders.append(process)
        assert process.stdout is not None
        line = (await trio.to_thread.run_sync(process.stdout.readline)).decode()
        return int(line.split(" -> ")[0].rsplit(":", 1)[1]), process.pid

    async def run() -> dict[str, list[float]]:
        from exec_relay import wait_cached

        await wait_cached(endpoint)
        done = await trio.run_process([*command, "get", "--endpoint", str(endpoint), "--ttl", "900"], env=env,
                                      capture_stdout=True)
        handle_file.write_bytes(done.stdout)
        vm = vmcache.VMHandle.from_json(done.stdout.decode())
        try:
            return await measure(vm, vm.pid, forwarder, size, args.runs)
        finally:
            await vm.disconnect()

    try:
        sys.path.insert(0, str(ROOT / "bench"))
        results = trio.run(run)
    finally:
        for process in forwarders:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
        if handle_file.exists() and handle_file.stat().st_size:
            subprocess.run([*command, "stop", str(handle_file)], env=env, timeout=120, check=False)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.size_mb} MB from the guest (TCG, mode none: no guest network device), medians of "
          f"{args.runs} runs; CPU seconds during each transfer")
    print(f"{'':28}{'MB/s':>8}{'agent':>8}{'server':>8}{'qemu':>8}{'forwarder':>10}")
    for name, label in (("stdout", "agent stdout (head -c)"), ("connect_tcp", "vm.connect_tcp download"),
                        ("port-forward", "port-forward download")):
        cpu = [statistics.median(results[f"{name} cpu {part}"])
               for part in ("agent", "server", "qemu", "forwarder")]
        print(f"{label:28}{statistics.median(results[name]):>8.1f}{cpu[0]:>8.2f}{cpu[1]:>8.2f}{cpu[2]:>8.2f}"
              f"{cpu[3] if name == 'port-forward' else 0.0:>10.2f}")
    for name in ("set-up connect_tcp", "set-up connect_tcp + 1-byte round trip",
                 "set-up port-forward + 1-byte round trip"):
        values = sorted(results[name])
        print(f"{name:44} p50 {statistics.median(values):6.1f} ms   max {values[-1]:6.1f} ms  "
              f"(n={len(values)})")


if __name__ == "__main__":
    main()
