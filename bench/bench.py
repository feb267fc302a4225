"""vmcache benchmark: cold and warm side by side, in one run, on this machine.

    python bench/bench.py [--quick] [--output bench/results/latest.json]

Prints a table (medians and percentiles; this machine is noisy, so compare
ratios, not single numbers) and writes the same numbers as JSON. Every daemon
it starts is its own process on a private socket; every VM it takes is
stopped; it checks at the end that no QEMU process is left.

What it measures (see bench/README.md for the definitions):
  cold      `vmcache run --direct`: QEMU start to agent ready, to first output, whole command
  warm      GetBaseVM latency while a VM is ready (Trio client and grpcio client);
            `vmcache run` against a daemon vs `run --direct`
  refill    hand-out -> cache full again, per VM and after a burst, boot vs snapshot mode
  burst     K clients at once against a cache of N
  idle      daemon CPU, per-VM CPU and RSS over a window; RSS per memory knob
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
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
from vmcache.procfs import cpu_ticks, qemu_pids, rss_bytes
from vmcache.qemu import launch_vm

ROOT = Path(__file__).resolve().parent.parent
VMCACHE = [sys.executable, "-m", "vmcache"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ helpers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.work = Path(tempfile.mkdtemp(prefix="vmcache-bench-", dir="/tmp"))
        self.work.chmod(0o711)  # each VM's own uid passes through to its run directory
        os.environ["VMCACHE_RUN_DIR"] = str(self.work / "run")
        self.results: dict[str, Any] = {}

    def config(self, name: str, cache: int = 2, factory: dict[str, Any] | None = None,
               **qemu: Any) -> Path:
        settings = {"accel": "tcg", "boot_timeout": 60.0} | qemu
        lines = ["[factory]", f"vm_cache_number = {cache}",
                 f'vm_cache_endpoint = "{self.work / name}.sock"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in (factory or {}).items()]
        lines.append("[hypervisor.qemu]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        path = self.work / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


class Daemon:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.endpoint = Path(str(config).removesuffix(".toml") + ".sock")
        self.log = open(str(config) + ".log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen([*VMCACHE, "serve", "--config", str(config)],
                                        stdout=self.log, stderr=self.log)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        self.log.close()


async def status(endpoint: Path) -> vmcache.CacheStatus:
    async with vmcache.connect(endpoint) as cache:
        return await cache.status()


async def wait_ready(endpoint: Path, count: int, timeout: float = 180.0) -> float:
    """Wait until ``count`` VMs are cached; returns how long it took."""
    start = time.monotonic()
    with trio.fail_after(timeout):
        while True:
            try:
                if len((await status(endpoint)).vms) >= count:
                    return time.monotonic() - start
            except vmcache.DaemonNotRunningError:
                pass
            await trio.sleep(0.02)


async def stop_all(handles: list[vmcache.VMHandle]) -> None:
    async with trio.open_nursery() as nursery:
        for handle in handles:
            nursery.start_soon(handle.aclose)


# ------------------------------------------------------------------ parts


async def bench_cold(bench: Bench, runs: int) -> dict[str, Any]:
    spec = resolve_spec(load_config(bench.config("cold")), run_root=bench.work / "run")
    to_ready, to_output = [], []
    for _ in range(runs):
        start = time.monotonic()
        async with launch_vm(spec) as vm:
            to_ready.append(time.monotonic() - start)
            await vm.exec(["echo", "hello"])
            to_output.append(time.monotonic() - start)
    cli = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run([*VMCACHE, "run", "--direct", "--config", str(bench.config("cold")), "--",
                        "echo", "hello"], check=True, capture_output=True)
        cli.append(time.monotonic() - start)
    return {"to_ready_s": summary(to_ready), "to_first_output_s": summary(to_output),
            "cli_run_direct_s": summary(cli)}


async def bench_warm_handout(bench: Bench, endpoint: Path, count: int, cache: int) -> dict[str, Any]:
    """GetBaseVM latency of a ready VM, over one connection.

    Each hand-out waits until the cache is full, so that no refill (a boot or a
    restore, which takes a whole core under TCG) runs while it is timed.
    """
    takevm_ms: list[float] = []
    getbasevm_ms: list[float] = []
    async with vmcache.connect(endpoint) as client:
        for _ in range(count):
            for kind, times in (("take", takevm_ms), ("kata", getbasevm_ms)):
                await wait_ready(endpoint, cache)
                start = time.perf_counter()
                handle = await (client.get_vm(timeout=30) if kind == "take" else client.get_base_vm(30))
                times.append((time.perf_counter() - start) * 1000)
                await handle.aclose()
    grpcio_ms = await trio.to_thread.run_sync(grpcio_handouts, endpoint, count, cache)
    return {"trio_client_ms": summary(takevm_ms), "getbasevm_trio_ms": summary(getbasevm_ms),
            "grpcio_client_ms": summary(grpcio_ms)}


async def bench_grown_handout(bench: Bench, endpoint: Path, count: int, cache: int) -> dict[str, Any]:
    """A hand-out grown 1 -> 2 vCPUs, 256 -> 1024 MiB, beside a plain one and a cold boot at 2/1024."""
    plain_ms: list[float] = []
    grown_ms: list[float] = []
    async with vmcache.connect(endpoint) as client:
        for _ in range(count):
            for size, times in ((vmcache.VMSize(), plain_ms), (vmcache.VMSize(2, 1024), grown_ms)):
                await wait_ready(endpoint, cache)
                start = time.perf_counter()
                handle = await client.get_vm(timeout=60, size=size)
                times.append((time.perf_counter() - start) * 1000)
                await handle.aclose()
    spec = resolve_spec(load_config(bench.config("cold-2x1024", default_vcpus=2, default_memory=1024)),
                        run_root=bench.work / "run")
    cold_s = []
    for _ in range(min(count, 3)):
        start = time.monotonic()
        async with launch_vm(spec) as vm:
            cold_s.append(time.monotonic() - start)
            assert (await vm.run(["nproc"])).stdout == b"2\n"
    return {"plain_ms": summary(plain_ms), "grown_ms": summary(grown_ms), "cold_2x1024_s": summary(cold_s)}


async def bench_guest(endpoint: Path, runs: int) -> dict[str, Any]:
    """What a client does with a VM it got: throughput both ways, exec round trip, python3."""
    size = 200 << 20
    async with vmcache.connect(endpoint) as client, client.lease_vm(timeout=60) as vm:
        stdout_mbs, stdin_mbs, write_mbs, read_mbs = [], [], [], []
        for _ in range(runs):
            start = time.perf_counter()
            received = 0
            async with vm.open_process(["head", "-c", str(size), "/dev/zero"]) as process:
                assert process.stdout is not None
                while chunk := await process.stdout.receive_some(1 << 20):
                    received += len(chunk)
                await process.wait()
            stdout_mbs.append(received / 1e6 / (time.perf_counter() - start))
            data = b"\0" * size
            start = time.perf_counter()
            await vm.run(["sh", "-c", "cat > /dev/null"], stdin=data)
            stdin_mbs.append(size / 1e6 / (time.perf_counter() - start))
            file_size = 48 << 20  # the guest's /tmp is a tmpfs of half its 256 MiB
            start = time.perf_counter()
            await vm.write_file("/tmp/bench.bin", data[:file_size])
            write_mbs.append(file_size / 1e6 / (time.perf_counter() - start))
            start = time.perf_counter()
            back = await vm.read_file("/tmp/bench.bin")
            read_mbs.append(len(back) / 1e6 / (time.perf_counter() - start))
            await vm.run(["rm", "/tmp/bench.bin"])
        true_ms = []
        for _ in range(50):
            start = time.perf_counter()
            await vm.run(["true"])
            true_ms.append((time.perf_counter() - start) * 1000)
        python_ms = []
        for _ in range(10):
            start = time.perf_counter()
            await vm.run(["python3", "-c", "print(1)"])
            python_ms.append((time.perf_counter() - start) * 1000)
        await vm.disconnect()
    return {"stdout_mb_s": summary(stdout_mbs), "stdin_mb_s": summary(stdin_mbs),
            "file_write_mb_s": summary(write_mbs), "file_read_mb_s": summary(read_mbs),
            "exec_true_ms": summary(true_ms), "python3_print_ms": summary(python_ms)}


def grpcio_handouts(endpoint: Path, count: int, cache: int) -> list[float]:
    """The same with grpcio (an independent client), stubs compiled from our proto.

    Runs in a worker thread (grpcio blocks); stops each VM through the Trio thread.
    """
    import grpc
    from google.protobuf.empty_pb2 import Empty

    out = Path(tempfile.mkdtemp(prefix="stubs-"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                    f"--python_out={out}", f"--grpc_python_out={out}",
                    str(ROOT / "protos" / "cache.proto")], check=True)
    sys.path.insert(0, str(out))
    for name in ("cache_pb2", "cache_pb2_grpc"):
        sys.modules.pop(name, None)
    import cache_pb2_grpc

    sys.path.remove(str(out))
    latencies = []
    with grpc.insecure_channel(f"unix://{endpoint}") as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        for _ in range(count):
            deadline = time.monotonic() + 120
            while len(stub.Status(Empty(), timeout=10).vmstatus) < cache:
                if time.monotonic() > deadline:
                    raise TimeoutError("cache did not refill")
                time.sleep(0.02)
            start = time.perf_counter()
            reply = stub.GetBaseVM(Empty(), timeout=30)
            latencies.append((time.perf_counter() - start) * 1000)
            handle = vmcache.VMHandle.from_dict(json.loads(reply.hypervisor)["vmcache"])
            trio.from_thread.run(handle.stop)
    return latencies


def cli_times(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.monotonic() - start)
    return times


async def bench_refill(endpoint: Path, cache: int, rounds: int) -> dict[str, Any]:
    """Hand-out -> full again: one VM at a time, then a burst emptying the cache."""
    single = []
    for _ in range(rounds):
        await wait_ready(endpoint, cache)
        async with vmcache.connect(endpoint) as client:
            vm = await client.get_vm(timeout=30)
        single.append(await wait_ready(endpoint, cache))
        await vm.aclose()
    await wait_ready(endpoint, cache)
    handles = []
    async with vmcache.connect(endpoint) as client:
        for _ in range(cache):
            handles.append(await client.get_vm(timeout=30))
    whole = await wait_ready(endpoint, cache)
    await stop_all(handles)
    return {"per_vm_s": summary(single), "whole_cache_after_burst_s": whole}


async def bench_burst(endpoint: Path, cache: int, clients: int) -> dict[str, Any]:
    await wait_ready(endpoint, cache)
    handles: list[vmcache.VMHandle] = []
    served_at: list[float] = []
    start = time.monotonic()

    async def one() -> None:
        async with vmcache.connect(endpoint) as client:
            handles.append(await client.get_vm(timeout=300))
        served_at.append(time.monotonic() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)
    await stop_all(handles)
    return {"clients": clients, "cache": cache, "all_served_s": max(served_at),
            "first_served_s": min(served_at)}


async def bench_idle(endpoint: Path, daemon_pid: int, cache: int, window: float) -> dict[str, Any]:
    await wait_ready(endpoint, cache)
    await trio.sleep(3)  # let fresh guests settle
    vms = [vm.pid for vm in (await status(endpoint)).vms]
    before = {pid: cpu_ticks(pid) for pid in [daemon_pid, *vms]}
    await trio.sleep(window)
    after = {pid: cpu_ticks(pid) for pid in before}
    percent = {pid: 100 * (after[pid] - before[pid]) / CLK_TCK / window for pid in before}
    return {
        "window_s": window,
        "daemon_cpu_percent": percent[daemon_pid],
        "vm_cpu_percent": statistics.median(percent[pid] for pid in vms),
        "vm_rss_mb": statistics.median(rss_bytes(pid) / 1e6 for pid in vms),
        "daemon_rss_mb": rss_bytes(daemon_pid) / 1e6,
    }


async def bench_memory_knobs(bench: Bench, settle: float) -> list[dict[str, Any]]:
    """RSS of one idle cached VM under each memory knob (one daemon each)."""
    knobs: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("defaults (256 MiB, TCG cache default)", {}, {}),
        ("tb_size = 32", {}, {"tb_size": 32}),
        ("default_memory = 128", {}, {"default_memory": 128}),
        ("tb_size = 32, snapshot restore", {"boot_mode": "snapshot"}, {"tb_size": 32}),
    ]
    rows = []
    for index, (name, factory, qemu) in enumerate(knobs):
        config = bench.config(f"mem{index}", cache=1, factory=factory, **qemu)
        with Daemon(config) as daemon:
            if factory.get("boot_mode") == "snapshot":
                # The first VM boots plainly while the template is made; cycle it out after that.
                await wait_ready(daemon.endpoint, 1)
                await trio.sleep(10)
                async with vmcache.connect(daemon.endpoint) as client:
                    first = await client.get_vm(timeout=60)
                await first.aclose()
            await wait_ready(daemon.endpoint, 1)
            await trio.sleep(settle)
            (vm,) = (await status(daemon.endpoint)).vms
            rows.append({"knob": name, "vm_rss_mb": rss_bytes(vm.pid) / 1e6})
    return rows


# ------------------------------------------------------------------ main


#: The busybox guest's figures (bench/results/busybox-guest.json, and the issue's own
#: measurements for what that run did not measure), to print beside today's.
BEFORE = ROOT / "bench" / "results" / "busybox-guest.json"
BUSYBOX_STDOUT_MB_S = 1.35
BUSYBOX_EXEC_TRUE_MS = 15.8


def before_and_after(results: dict[str, Any]) -> str:
    """The guest's numbers beside the busybox guest's, in one table."""
    try:
        before = json.loads(BEFORE.read_text())
    except (OSError, ValueError):
        return "(no busybox-guest figures to compare with)"
    guest = results["guest"]
    rows = [
        ("measured", "busybox guest", "Debian guest + Python agent"),
        ("cold: QEMU start -> agent ready (p50)", f"{before['cold']['to_ready_s']['p50']:.2f} s",
         f"{results['cold']['to_ready_s']['p50']:.2f} s"),
        ("snapshot refill, one VM (p50)", f"{before['snapshot_refill']['per_vm_s']['p50']:.2f} s",
         f"{results['snapshot_refill']['per_vm_s']['p50']:.2f} s"),
        ("idle cached VM RSS, boot mode", f"{before['boot_idle']['vm_rss_mb']:.0f} MB",
         f"{results['boot_idle']['vm_rss_mb']:.0f} MB"),
        ("idle cached VM RSS, snapshot mode", f"{before['snapshot_idle']['vm_rss_mb']:.0f} MB",
         f"{results['snapshot_idle']['vm_rss_mb']:.0f} MB"),
        ("stdout, guest -> host (p50)", f"{BUSYBOX_STDOUT_MB_S} MB/s",
         f"{guest['stdout_mb_s']['p50']:.0f} MB/s"),
        ("stdin, host -> guest (p50)", "none (no stdin)", f"{guest['stdin_mb_s']['p50']:.0f} MB/s"),
        ("file write, host -> guest (p50)", "none (argv, < 128 KiB)",
         f"{guest['file_write_mb_s']['p50']:.0f} MB/s"),
        ("file read, guest -> host (p50)", "none", f"{guest['file_read_mb_s']['p50']:.0f} MB/s"),
        ("exec `true`, round trip (p50)", f"{BUSYBOX_EXEC_TRUE_MS} ms",
         f"{guest['exec_true_ms']['p50']:.1f} ms"),
        ("warm `python3 -c 'print(1)'` (p50)", "python3 not found",
         f"{guest['python3_print_ms']['p50']:.0f} ms"),
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     for row in rows)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def fmt(stats: dict[str, float], unit: str, scale: float = 1.0) -> str:
    return (f"p50 {stats['p50'] * scale:8.2f} {unit}   p95 {stats['p95'] * scale:8.2f} {unit}   "
            f"p99 {stats['p99'] * scale:8.2f} {unit}   (n={stats['n']})")


async def main(args: argparse.Namespace) -> None:
    bench = Bench(args.quick)
    before = qemu_pids()
    runs = 3 if args.quick else 5
    # A hand-out is timed with the cache full, so each waits for a refill first (a whole boot
    # in boot mode): fewer there.
    handouts = {"boot": 10 if args.quick else 20, "snapshot": 20 if args.quick else 50}
    results = bench.results
    results["machine"] = {
        "cores": os.cpu_count(), "accel": "tcg", "python": platform.python_version(),
        "qemu": subprocess.run(["qemu-system-x86_64", "-version"], capture_output=True,
                               text=True).stdout.splitlines()[0],
        "date": time.strftime("%Y-%m-%d"), "kernel": platform.release(),
    }
    def progress(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)
        # What is measured so far survives a section that fails.
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")

    progress("cold path (run --direct)")
    results["cold"] = await bench_cold(bench, runs)

    for mode in ("boot", "snapshot"):
        config = bench.config(f"warm-{mode}", cache=2, factory={"boot_mode": mode})
        with Daemon(config) as daemon:
            progress(f"{mode} mode: filling the cache")
            results[f"{mode}_first_fill_s"] = await wait_ready(daemon.endpoint, 2)
            if mode == "snapshot":  # the first fill was plain boots; cycle once through restores
                await bench_refill(daemon.endpoint, 2, 1)
            progress(f"{mode} mode: hand-out latency")
            results[f"{mode}_handout"] = await bench_warm_handout(bench, daemon.endpoint,
                                                                  handouts[mode], 2)
            progress(f"{mode} mode: refill")
            results[f"{mode}_refill"] = await bench_refill(daemon.endpoint, 2, runs)
            progress(f"{mode} mode: run end to end")
            await wait_ready(daemon.endpoint, 2)
            results[f"{mode}_cli_run_s"] = summary(cli_times(
                [*VMCACHE, "run", "--endpoint", str(daemon.endpoint), "--", "echo", "hello"], runs))
            progress(f"{mode} mode: burst")
            results[f"{mode}_burst"] = await bench_burst(daemon.endpoint, 2, 6 if args.quick else 10)
            progress(f"{mode} mode: idle cost")
            results[f"{mode}_idle"] = await bench_idle(daemon.endpoint, daemon.process.pid, 2,
                                                        10.0 if args.quick else 30.0)
            progress(f"{mode} mode: grown hand-outs (1/256 -> 2/1024)")
            results[f"{mode}_grown"] = await bench_grown_handout(bench, daemon.endpoint,
                                                                 3 if args.quick else 5, 2)
            if mode == "snapshot":
                progress("the guest: throughput, exec round trip, python3")
                results["guest"] = await bench_guest(daemon.endpoint, 3)

    progress("memory knobs")
    results["memory_knobs"] = await bench_memory_knobs(bench, 2.0 if args.quick else 5.0)

    cold_output = results["cold"]["to_first_output_s"]["p50"]
    warm_ms = results["snapshot_handout"]["trio_client_ms"]["p50"]
    results["headline"] = {
        "cold_to_first_output_over_warm_handout": cold_output / (warm_ms / 1000),
        "cli_run_direct_over_cli_run": results["cold"]["cli_run_direct_s"]["p50"]
        / results["snapshot_cli_run_s"]["p50"],
        "refill_boot_over_snapshot": results["boot_refill"]["per_vm_s"]["p50"]
        / results["snapshot_refill"]["per_vm_s"]["p50"],
    }
    leftover = qemu_pids() - before
    results["leaked_qemu_processes"] = len(leftover)
    shutil.rmtree(bench.work, ignore_errors=True)

    rows = [
        ("machine", f"{results['machine']['cores']} cores, accel tcg, {results['machine']['qemu']}"),
        ("cold: QEMU start -> agent ready", fmt(results["cold"]["to_ready_s"], "s")),
        ("cold: QEMU start -> first output", fmt(results["cold"]["to_first_output_s"], "s")),
        ("cold: `vmcache run --direct`", fmt(results["cold"]["cli_run_direct_s"], "s")),
    ]
    for mode in ("boot", "snapshot"):
        rows += [
            (f"{mode}: TakeVM (claimed), Trio client",
             fmt(results[f"{mode}_handout"]["trio_client_ms"], "ms")),
            (f"{mode}: GetBaseVM, Trio client", fmt(results[f"{mode}_handout"]["getbasevm_trio_ms"], "ms")),
            (f"{mode}: GetBaseVM, grpcio client", fmt(results[f"{mode}_handout"]["grpcio_client_ms"], "ms")),
            (f"{mode}: `vmcache run` (warm)", fmt(results[f"{mode}_cli_run_s"], "s")),
            (f"{mode}: refill one VM", fmt(results[f"{mode}_refill"]["per_vm_s"], "s")),
            (f"{mode}: refill 2 after a burst",
             f"{results[f'{mode}_refill']['whole_cache_after_burst_s']:.2f} s"),
            (f"{mode}: burst of {results[f'{mode}_burst']['clients']} on a cache of 2",
             f"all served in {results[f'{mode}_burst']['all_served_s']:.2f} s"),
            (f"{mode}: hand-out plain / grown to 2 vCPU 1024 MiB",
             f"{results[f'{mode}_grown']['plain_ms']['p50']:.0f} ms / "
             f"{results[f'{mode}_grown']['grown_ms']['p50']:.0f} ms "
             f"(cold boot at 2/1024: {results[f'{mode}_grown']['cold_2x1024_s']['p50']:.2f} s)"),
            (f"{mode}: idle daemon CPU", f"{results[f'{mode}_idle']['daemon_cpu_percent']:.2f} % of a core"),
            (f"{mode}: idle VM CPU / RSS", f"{results[f'{mode}_idle']['vm_cpu_percent']:.2f} % of a core / "
             f"{results[f'{mode}_idle']['vm_rss_mb']:.0f} MB"),
        ]
    rows += [(f"RSS, {row['knob']}", f"{row['vm_rss_mb']:.0f} MB") for row in results["memory_knobs"]]
    head = results["headline"]
    rows += [
        ("HEADLINE cold first output / warm hand-out",
         f"{head['cold_to_first_output_over_warm_handout']:.0f}x"),
        ("`run --direct` / `run` (warm, snapshot)", f"{head['cli_run_direct_over_cli_run']:.1f}x"),
        ("refill: boot / snapshot", f"{head['refill_boot_over_snapshot']:.1f}x"),
        ("QEMU processes left behind", str(len(leftover))),
    ]
    print(f"vmcache benchmark, {results['machine']['date']}")
    print(table(rows))
    print(before_and_after(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"(numbers written to {args.output})")
    if leftover:
        raise SystemExit(f"benchmark leaked QEMU processes: {sorted(leftover)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs and shorter windows")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    trio.run(main, parser.parse_args())
