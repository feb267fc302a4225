"""Egress proxy cost, without QEMU: connection set-up time and the throughput of a 100 MB download
through vmcache.egress, beside the same from the host straight to the server.

Topology (tests/netns_pair.py): a "vm" namespace where enforce() runs (as in QEMU's), a "guest"
namespace joined by a veth, a server on the host's loopback. The server and the guest's client are
separate processes (the client under ``ip netns exec``), so this process runs only the proxy, as
the daemon would. Everything stays in the two namespaces and on the host's loopback.

    PYTHONPATH=src python bench/egress.py [--connections 200] [--megabytes 100]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns_pair import FakePolicy, FakeResolver, netns_pair

from vmcache.egress import enforce

CHUNK = 1 << 20


def serve(host: str, port_file: str) -> None:
    """Role "server": on the host's loopback, ``GET /big?N`` sends N bytes, anything else ``OK``."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(64)
    Path(port_file).write_text(str(listener.getsockname()[1]))
    block = b"x" * CHUNK
    listener.settimeout(600)
    while True:
        conn, _ = listener.accept()
        with conn:
            request = conn.recv(4096)
            if request.startswith(b"GET /big?"):
                left = int(request.split()[1][5:])
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
                while left > 0:
                    conn.sendall(block[:min(left, CHUNK)])
                    left -= CHUNK
            else:
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nOK")


def client(ip: str, port: int, host: str, connections: int, size: int) -> None:
    """Role "client" (run in the guest): prints JSON with the set-up times and the download rate."""
    setups = []
    for _ in range(connections):
        start = time.perf_counter()
        with socket.create_connection((ip, port), timeout=10) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert sock.recv(100)
            setups.append(time.perf_counter() - start)
    result: dict[str, float] = {"setup_median_ms": statistics.median(setups) * 1000,
                                "setup_p90_ms": sorted(setups)[int(len(setups) * 0.9)] * 1000}
    if size:
        buf = bytearray(CHUNK)
        start = time.perf_counter()
        got = 0
        with socket.create_connection((ip, port), timeout=30) as sock:
            sock.sendall(f"GET /big?{size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            while n := sock.recv_into(buf):
                got += n
        elapsed = time.perf_counter() - start
        result["mb_per_s"] = got / elapsed / 1e6
        result["bytes"] = got
    print(json.dumps(result))


async def run_client(argv: list[str], netns: str | None) -> dict[str, float]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with trio.fail_after(600):
        done = await trio.run_process([*prefix, sys.executable, __file__, "--role", "client", *argv],
                                      capture_stdout=True, env=env)
    result: dict[str, float] = json.loads(done.stdout)
    return result


async def veth_baseline(vm: str, guest: str, common: list[str]) -> dict[str, float]:
    """The same client against a server in the vm namespace itself: the veth's own cost."""
    await trio.run_process(["ip", "-n", vm, "addr", "add", "10.0.2.2/24", "dev", "tap0"])
    await trio.run_process(["ip", "-n", vm, "link", "set", "tap0", "up"])
    port_file = f"/tmp/vmcache-test-egress-bench-veth-{os.getpid()}"
    server = subprocess.Popen(["ip", "netns", "exec", vm, sys.executable, __file__, "--role", "server",
                               "--port-file", port_file, "--bind", "10.0.2.2"])
    try:
        for _ in range(100):
            if Path(port_file).exists() and Path(port_file).read_text():
                break
            await trio.sleep(0.05)
        port = Path(port_file).read_text()
        return await run_client(["--ip", "10.0.2.2", "--port", port, "--host", "x", *common], guest)
    finally:
        server.kill()
        server.wait()
        Path(port_file).unlink(missing_ok=True)
        await trio.run_process(["ip", "-n", vm, "addr", "flush", "dev", "tap0"])


async def main(args: argparse.Namespace) -> None:
    port_file = f"/tmp/vmcache-test-egress-bench-{os.getpid()}"
    server = subprocess.Popen([sys.executable, __file__, "--role", "server", "--port-file", port_file])
    try:
        for _ in range(100):
            if Path(port_file).exists() and Path(port_file).read_text():
                break
            await trio.sleep(0.05)
        port = int(Path(port_file).read_text())
        size = args.megabytes * 1_000_000
        common = ["--connections", str(args.connections), "--size", str(size)]
        direct = await run_client(["--ip", "127.0.0.1", "--port", str(port), "--host", "x", *common], None)
        with netns_pair(f"vmcache-test-egbench{os.getpid()}") as pair:
            veth = await veth_baseline(pair.vm_name, pair.guest_name, common)
            policy = FakePolicy(names={"allowed.test": frozenset({port})}, internal=frozenset({port}))
            resolver = FakeResolver({"allowed.test": ["127.0.0.1"]})
            async with enforce(pair.vm, policy, resolver=resolver, loopback_targets=True) as enf:
                enf.resolved.record("allowed.test", [ipaddress.IPv4Address("127.0.0.1")])
                internal = await run_client(["--ip", "10.0.2.2", "--port", str(port),
                                             "--host", "host.vmcache.internal", *common], pair.guest_name)
                named = await run_client(["--ip", "127.0.0.1", "--port", str(port),
                                          "--host", "allowed.test", *common], pair.guest_name)
        rows = [("direct, host to loopback (no proxy)", direct),
                ("guest -> server in the vm netns (veth, no proxy)", veth),
                ("guest -> host.vmcache.internal via proxy", internal),
                ("guest -> allowed name via proxy (Host peek)", named)]
        print(f"{'path':50} {'setup p50 ms':>13} {'setup p90 ms':>13} {'MB/s':>8}")
        for label, row in rows:
            print(f"{label:50} {row['setup_median_ms']:13.3f} {row['setup_p90_ms']:13.3f} "
                  f"{row.get('mb_per_s', 0):8.0f}")
        print(f"({args.connections} connections each; {args.megabytes} MB download)")
    finally:
        server.kill()
        server.wait()
        Path(port_file).unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--role", choices=["bench", "server", "client"], default="bench")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--port-file", default="")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--ip", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="")
    parser.add_argument("--size", type=int, default=0)
    ns = parser.parse_args()
    if ns.role == "server":
        serve(ns.bind, ns.port_file)
    elif ns.role == "client":
        client(ns.ip, ns.port, ns.host, ns.connections, ns.size)
    else:
        trio.run(main, ns)
