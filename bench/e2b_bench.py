"""E2B's SDK against vmcache, beside vmcache's own hand-out and a cold boot, in one run.

    flock /tmp/vmcache-qemu.lock python bench/e2b_bench.py [--runs N] [--cold-runs M]
                                                     [--output bench/results/e2b.json]

Three ways to get "hello" out of a fresh VM, each a median of N (see bench/README.md):

- **SDK**: ``Sandbox.create()`` to the first ``commands.run("echo hello")``'s output, timed by
  tests/e2b_scripts/sdk_timing.py inside the released SDK's own venv (tests/e2b_sdk.py builds it),
  against this tree's ``vmcache serve`` with ``[e2b] listen``; split into the SDK's import
  (a fresh process each time), the HTTP create, the first envd call, the same command again
  (the command alone: first call minus this is the first call's own cost), and kill.
- **TakeVM**: the library's ``get_vm`` and ``exec`` of the same command line
  (``/bin/bash -l -c "echo hello"``) on the same daemon.
- **cold**: ``launch_vm`` and ``exec`` of it, no cache.

Every timed hand-out starts with the cache full (no refill running: under TCG a boot takes a
core). Every VM taken is stopped, every daemon ended; it fails if a QEMU process is left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import vmcache
from vmcache.config import load_config, resolve_spec
from vmcache.procfs import qemu_pids
from vmcache.qemu import launch_vm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from e2b_sdk import sdk_environment, wait_listening, write_api_keys  # noqa: E402

VMCACHE = [sys.executable, "-m", "vmcache"]
COMMAND = ["/bin/bash", "-l", "-c", "echo hello"]
API_KEY = "e2b_vmcache-bench"
CACHE = 2


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def spread_ms(values: list[float]) -> str:
    return f"{min(values) * 1000:.0f}-{max(values) * 1000:.0f}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_config(work: Path, name: str, port: int | None = None) -> Path:
    lines = ["[factory]", f"vm_cache_number = {CACHE}", f'vm_cache_endpoint = "{work / name}.sock"',
             "[hypervisor.qemu]", 'accel = "tcg"', "boot_timeout = 60.0"]
    if port is not None:
        keys = write_api_keys(work / "api-keys", API_KEY)
        lines += ["[e2b]", f'listen = "127.0.0.1:{port}"', f'api_keys_file = "{keys}"']
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def cached(endpoint: Path) -> int:
    async with vmcache.connect(endpoint) as cache:
        return len((await cache.status()).vms)


async def wait_full(endpoint: Path, timeout: float = 180.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                if await cached(endpoint) >= CACHE:
                    return
            except vmcache.DaemonNotRunningError:
                pass
            await trio.sleep(0.05)


async def bench_sdk(python: Path, endpoint: Path, port: int, runs: int) -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("E2B_") and key != "PYTHONPATH"}
    env |= {"E2B_API_URL": f"http://127.0.0.1:{port}", "E2B_SANDBOX_URL": f"http://127.0.0.1:{port}",
            "E2B_API_KEY": API_KEY}
    imports = []
    for _ in range(runs):  # the import in a fresh interpreter each time, as a user's program pays it
        done = subprocess.run([str(python), "-c", "import time; t = time.perf_counter(); import e2b; "
                               "print(time.perf_counter() - t)"], capture_output=True, text=True, env=env,
                              check=True, timeout=60)
        imports.append(float(done.stdout))
    process = await trio.lowlevel.open_process(
        [str(python), str(ROOT / "tests" / "e2b_scripts" / "sdk_timing.py")], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, env=env)
    assert process.stdin is not None and process.stdout is not None
    buffered = b""

    async def line() -> dict[str, Any]:
        nonlocal buffered
        with trio.fail_after(120):
            while b"\n" not in buffered:
                chunk = await process.stdout.receive_some(65536)  # type: ignore[union-attr]
                if not chunk:
                    raise RuntimeError("the SDK timing script ended early")
                buffered += chunk
        text, buffered = buffered.split(b"\n", 1)
        value: dict[str, Any] = json.loads(text)
        return value

    samples: list[dict[str, float]] = []
    try:
        await line()  # its own import: the first SDK import of the run (disk cache), not counted
        for _ in range(runs):
            await wait_full(endpoint)
            await process.stdin.send_all(b"go\n")
            samples.append(await line())
        await process.stdin.send_all(b"stop\n")
        with trio.fail_after(30):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    parts = {key: [sample[key] for sample in samples] for key in samples[0]}
    first_call = [f - c for f, c in zip(parts["first_command_s"], parts["command_s"], strict=True)]
    return {"import_ms": median_ms(imports), "create_ms": median_ms(parts["create_s"]),
            "first_command_ms": median_ms(parts["first_command_s"]),
            "command_ms": median_ms(parts["command_s"]), "first_call_extra_ms": median_ms(first_call),
            "kill_ms": median_ms(parts["kill_s"]),
            "create_to_output_ms": median_ms(parts["create_to_output_s"]),
            "create_to_output_range_ms": spread_ms(parts["create_to_output_s"]), "samples": samples}


async def bench_takevm(endpoint: Path, runs: int) -> dict[str, Any]:
    take, command, total = [], [], []
    async with vmcache.connect(endpoint) as client:
        for _ in range(runs):
            await wait_full(endpoint)
            t0 = time.perf_counter()
            handle = await client.get_vm(timeout=60)
            t1 = time.perf_counter()
            done = await handle.exec(COMMAND)
            t2 = time.perf_counter()
            assert done.stdout == b"hello\n", done
            await handle.aclose()
            take.append(t1 - t0)
            command.append(t2 - t1)
            total.append(t2 - t0)
    return {"takevm_ms": median_ms(take), "command_ms": median_ms(command),
            "takevm_to_output_ms": median_ms(total), "takevm_to_output_range_ms": spread_ms(total)}


async def bench_cold(work: Path, runs: int) -> dict[str, Any]:
    spec = resolve_spec(load_config(write_config(work, "cold")), run_root=work / "run")
    ready, total = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        async with launch_vm(spec) as vm:
            ready.append(time.perf_counter() - t0)
            done = await vm.exec(COMMAND)
            total.append(time.perf_counter() - t0)
            assert done.stdout == b"hello\n", done
    return {"boot_to_ready_ms": median_ms(ready), "boot_to_output_ms": median_ms(total),
            "boot_to_output_range_ms": spread_ms(total)}


async def main(args: argparse.Namespace) -> None:
    sdk = sdk_environment()
    work = Path(tempfile.mkdtemp(prefix="vmcache-bench-e2b-", dir="/tmp"))
    work.chmod(0o711)
    os.environ["VMCACHE_RUN_DIR"] = str(work / "run")
    before = qemu_pids()
    port = free_port()
    config = write_config(work, "daemon", port)
    endpoint = work / "daemon.sock"
    results: dict[str, Any] = {"machine": {
        "cores": os.cpu_count(), "accel": "tcg", "python": platform.python_version(),
        "kernel": platform.release(), "date": time.strftime("%Y-%m-%d"),
        "qemu": subprocess.run(["qemu-system-x86_64", "-version"], capture_output=True,
                               text=True).stdout.splitlines()[0]},
        "runs": args.runs, "cold_runs": args.cold_runs, "command": COMMAND}
    with open(work / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([*VMCACHE, "serve", "--config", str(config)], stdout=log, stderr=log)
        try:
            assert wait_listening(port, 30), (work / "daemon.log").read_text()
            await wait_full(endpoint)
            print("bench: SDK", file=sys.stderr, flush=True)
            results["sdk"] = await bench_sdk(sdk.python, endpoint, port, args.runs)
            print("bench: TakeVM", file=sys.stderr, flush=True)
            results["takevm"] = await bench_takevm(endpoint, args.runs)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    print("bench: cold", file=sys.stderr, flush=True)
    results["cold"] = await bench_cold(work, args.cold_runs)
    left = qemu_pids() - before
    results["leaked_qemu_processes"] = len(left)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    s, t, c = results["sdk"], results["takevm"], results["cold"]
    rows = [
        ("SDK: Sandbox.create() -> first output",
         f"{s['create_to_output_ms']} ms ({s['create_to_output_range_ms']})"),
        ("  import e2b (fresh process, not in the line above)", f"{s['import_ms']} ms"),
        ("  Sandbox.create() (HTTP create: a hand-out)", f"{s['create_ms']} ms"),
        ("  first commands.run (first envd call)", f"{s['first_command_ms']} ms"),
        ("  the same command again", f"{s['command_ms']} ms"),
        ("  first call's own cost (first - again)", f"{s['first_call_extra_ms']} ms"),
        ("  kill()", f"{s['kill_ms']} ms"),
        ("TakeVM: get_vm -> exec output",
         f"{t['takevm_to_output_ms']} ms ({t['takevm_to_output_range_ms']})"),
        ("  get_vm", f"{t['takevm_ms']} ms"),
        ("  exec", f"{t['command_ms']} ms"),
        ("cold: launch_vm -> exec output", f"{c['boot_to_output_ms']} ms ({c['boot_to_output_range_ms']})"),
        ("  launch_vm (to the agent's READY)", f"{c['boot_to_ready_ms']} ms"),
        ("QEMU processes left", str(len(left))),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"E2B SDK vs TakeVM vs cold boot, medians of {args.runs} ({args.cold_runs} cold), "
          f"{results['machine']['cores']} cores, TCG")
    print("\n".join(f"  {name:<{width}}  {value}" for name, value in rows))
    if left:
        sys.exit(f"bench: {len(left)} QEMU processes left behind")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "e2b.json")
    trio.run(main, parser.parse_args())
