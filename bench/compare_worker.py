"""The client side of one revision in ``bench/compare.py``: run with that revision's tree on
PYTHONPATH, so every measurement goes through that revision's own vmcache package.

    PYTHONPATH=TREE/src python bench/compare_worker.py --tree TREE --scratch DIR

It reads one JSON command per line on stdin and answers one JSON line on stdout
(``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``); compare.py
drives two of these, one per revision, and interleaves their commands. Only
vmcache's public API is used, so that both revisions of a before/after run can be
driven by this one file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import trio

import vmcache

#: Every wait for a cache to fill gives up after this long (a cold boot takes about 5 s
#: alone under TCG, 15 s when several run at once).
FILL_TIMEOUT = 180.0


async def _full(client: vmcache.CacheClient, count: int, timeout: float = FILL_TIMEOUT) -> float:
    """Wait until ``count`` VMs are cached (no refill running); how long it took."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        while len((await client.status()).vms) < count:  # noqa: ASYNC110 (Status is all there is)
            await trio.sleep(0.02)
    return time.monotonic() - start


async def op_full(endpoint: str, count: int) -> float:
    start = time.monotonic()
    with trio.fail_after(FILL_TIMEOUT):
        while True:
            try:
                async with vmcache.connect(endpoint) as client:
                    await _full(client, count)
                    return time.monotonic() - start
            except vmcache.DaemonNotRunningError:
                await trio.sleep(0.1)


async def op_cycle(endpoint: str, count: int) -> None:
    """Take every cached VM, let the cache fill again, stop them: in snapshot mode the first
    fill is plain boots (the template is made meanwhile), so this leaves restored VMs only."""
    async with vmcache.connect(endpoint) as client:
        await _full(client, count)
        handles = [await client.get_vm(timeout=60) for _ in range(count)]
        await _full(client, count)
        for handle in handles:
            await handle.aclose()
        await _full(client, count)


async def op_handout(endpoint: str, count: int, kind: str) -> float:
    """One hand-out of a full cache, timed in ms over an open connection; the VM is stopped."""
    async with vmcache.connect(endpoint) as client:
        await _full(client, count)
        start = time.perf_counter()
        if kind == "take":
            handle = await client.get_vm(timeout=30)
        elif kind == "kata":
            handle = await client.get_base_vm(30)
        else:
            raise ValueError(f"unknown hand-out kind {kind!r}")
        elapsed = (time.perf_counter() - start) * 1000
        await handle.aclose()
    return elapsed


_stubs: ModuleType | None = None


def _grpcio_stubs(tree: Path, scratch: Path) -> ModuleType:
    """``cache_pb2_grpc`` compiled from this revision's ``protos/cache.proto`` (once)."""
    global _stubs
    if _stubs is None:
        out = str(scratch / "stubs")
        os.makedirs(out, exist_ok=True)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tree / 'protos'}",
                        f"--python_out={out}", f"--grpc_python_out={out}",
                        str(tree / "protos" / "cache.proto")], check=True, timeout=60)
        sys.path.insert(0, out)
        import cache_pb2_grpc

        _stubs = cache_pb2_grpc
    return _stubs


def grpcio_handout(tree: Path, scratch: Path, endpoint: str, count: int) -> tuple[float, dict[str, Any]]:
    """Kata's GetBaseVM through grpcio (Kata's own kind of client), timed in ms on a channel
    already connected (its Status calls wait for the full cache); the VM's handle back."""
    import grpc
    from google.protobuf.empty_pb2 import Empty

    stubs = _grpcio_stubs(tree, scratch)
    with grpc.insecure_channel(f"unix://{endpoint}") as channel:
        stub = stubs.CacheServiceStub(channel)
        deadline = time.monotonic() + FILL_TIMEOUT
        while len(stub.Status(Empty(), timeout=10).vmstatus) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cache at {endpoint} did not fill in {FILL_TIMEOUT:.0f} s")
            time.sleep(0.02)
        start = time.perf_counter()
        reply = stub.GetBaseVM(Empty(), timeout=30)
        elapsed = (time.perf_counter() - start) * 1000
    handle: dict[str, Any] = json.loads(reply.hypervisor)["vmcache"]
    return elapsed, handle


async def op_grpcio(tree: Path, scratch: Path, endpoint: str, count: int) -> float:
    elapsed, handle = await trio.to_thread.run_sync(grpcio_handout, tree, scratch, endpoint, count)
    await vmcache.VMHandle.from_dict(handle).aclose()
    return elapsed


async def op_guest(endpoint: str, count: int, size: int, true_runs: int,
                   python_runs: int) -> dict[str, Any]:
    """On a leased VM, once the cache has refilled behind it: stdout and stdin MB/s (one
    transfer of ``size`` bytes each, as bench/bench.py does them), then ``run(["true"])``
    and a warm ``python3 -c 'print(1)'`` in ms (every sample)."""
    async with vmcache.connect(endpoint) as client, client.lease_vm(timeout=60) as vm:
        await _full(client, count)  # the refill behind this lease is not timed with it
        start = time.perf_counter()
        received = 0
        async with vm.open_process(["head", "-c", str(size), "/dev/zero"]) as process:
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some(1 << 20):
                received += len(chunk)
            await process.wait()
        if received != size:
            raise RuntimeError(f"stdout: {received} bytes, not {size}")
        stdout_mb_s = received / 1e6 / (time.perf_counter() - start)
        data = b"\0" * size
        start = time.perf_counter()
        await vm.run(["sh", "-c", "cat > /dev/null"], stdin=data)
        stdin_mb_s = size / 1e6 / (time.perf_counter() - start)
        del data
        true_ms = []
        for _ in range(true_runs):
            start = time.perf_counter()
            await vm.run(["true"])
            true_ms.append((time.perf_counter() - start) * 1000)
        python_ms = []
        await vm.run(["python3", "-c", "print(1)"])  # warm: its files are in the page cache
        for _ in range(python_runs):
            start = time.perf_counter()
            result = await vm.run(["python3", "-c", "print(1)"])
            python_ms.append((time.perf_counter() - start) * 1000)
            if result.stdout != b"1\n":
                raise RuntimeError(f"python3 printed {result.stdout!r}")
        await vm.disconnect()
    return {"stdout_mb_s": [stdout_mb_s], "stdin_mb_s": [stdin_mb_s], "exec_true_ms": true_ms,
            "python3_print_ms": python_ms}


async def dispatch(tree: Path, scratch: Path, command: dict[str, Any]) -> Any:
    op = command["op"]
    endpoint, count = command["endpoint"], command["count"]
    if op == "full":
        return await op_full(endpoint, count)
    if op == "cycle":
        return await op_cycle(endpoint, count)
    if op == "handout":
        if command["kind"] == "grpcio":
            return await op_grpcio(tree, scratch, endpoint, count)
        return await op_handout(endpoint, count, command["kind"])
    if op == "guest":
        return await op_guest(endpoint, count, command["size"], command["true_runs"],
                              command["python_runs"])
    raise ValueError(f"unknown command {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, required=True, help="the revision's source tree")
    parser.add_argument("--scratch", type=Path, required=True, help="a directory for the grpcio stubs")
    args = parser.parse_args()
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        try:
            answer = {"ok": True, "result": trio.run(dispatch, args.tree, args.scratch, command)}
        except Exception as error:  # every failure goes back to compare.py, which stops the run
            traceback.print_exc(file=sys.stderr)
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
