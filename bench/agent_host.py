"""Throughput and latency of the guest agent, run on the host over a socketpair (no QEMU).

    python bench/agent_host.py [--size MB] [--python PATH]

Prints MB/s for stdout (``head -c``), stdin (``cat > /dev/null``), file write
and file read, and the round trip of running ``true`` (median of 50). The
numbers bound what a guest can reach: in a TCG guest Python runs several
times slower and virtio-serial adds its own ceiling (machine.md: about
100-180 MB/s), so the agent's host-side figures should sit well above that.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from vmcache.agent_client import AgentConnection, guest_agent_files


async def measure(size: int, python: str, agent_dir: Path) -> dict[str, float]:
    host_end, agent_end = socket.socketpair()
    process = subprocess.Popen(
        [python, "-E", "-s", str(agent_dir / "vmcache_agent.py"), "--fd", str(agent_end.fileno()),
         "--no-set-clock"],
        pass_fds=[agent_end.fileno()], stderr=subprocess.DEVNULL)
    agent_end.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(host_end))
    results: dict[str, float] = {}
    try:
        connection = await AgentConnection.start(stream, timeout=10)
        mb = size / 1e6

        started = time.perf_counter()
        async with connection.open_process(["head", "-c", str(size), "/dev/zero"]) as proc:
            assert proc.stdout is not None
            received = 0
            while chunk := await proc.stdout.receive_some():
                received += len(chunk)
            await proc.wait()
        assert received == size
        results["stdout MB/s"] = mb / (time.perf_counter() - started)

        data = os.urandom(min(size, 64 << 20))
        started = time.perf_counter()
        async with connection.open_process(["sh", "-c", "cat > /dev/null"]) as proc:
            assert proc.stdin is not None
            sent = 0
            while sent < size:
                piece = data[:size - sent]
                await proc.stdin.send_all(piece)
                sent += len(piece)
            await proc.stdin.aclose()
            await proc.wait()
        results["stdin MB/s"] = mb / (time.perf_counter() - started)

        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "file")

            async def pieces() -> AsyncIterator[bytes]:
                sent = 0
                while sent < size:
                    piece = data[:size - sent]
                    yield piece
                    sent += len(piece)

            started = time.perf_counter()
            await connection.write_file(path, pieces())
            results["file write MB/s"] = mb / (time.perf_counter() - started)

            started = time.perf_counter()
            async with connection.open_file(path) as file:
                received = 0
                while chunk := await file.receive_some():
                    received += len(chunk)
            assert received == size
            results["file read MB/s"] = mb / (time.perf_counter() - started)

        times = []
        for _ in range(50):
            started = time.perf_counter()
            await connection.run(["true"])
            times.append(time.perf_counter() - started)
        results["exec true ms (median of 50)"] = statistics.median(times) * 1000
        times = []
        for _ in range(50):
            started = time.perf_counter()
            await connection.ping()
            times.append(time.perf_counter() - started)
        results["ping ms (median of 50)"] = statistics.median(times) * 1000
        await connection.aclose()
    finally:
        process.wait(timeout=10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=500, help="MB per throughput run (default 500)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs the agent")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        agent_dir = Path(directory)
        for name, content in guest_agent_files().items():
            (agent_dir / name).write_bytes(content)
        results = trio.run(measure, args.size * 1_000_000, args.python, agent_dir)
    for name, value in results.items():
        print(f"{name:30} {value:10.2f}")


if __name__ == "__main__":
    main()
