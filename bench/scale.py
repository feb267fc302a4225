"""vmcache at scale: caches of 10, 50 and 100 VMs on this host, paused versus running idle VMs.

    python bench/scale.py [--sizes 10,50,100] [--modes paused,running] [--handouts 30]
                          [--memory 128] [--hot 1] [--jails on] [--output bench/results/scale.json]
                          [--plot bench/results/scale.png]

For each idle mode and cache size, a real ``vmcache serve`` (snapshot mode, TCG, guests
of ``--memory`` MiB) is started in its own run directory, and this reports:

  jail            QEMU confined (``[jail] enabled``, the default) or not: ``--jails off,on``
                  measures both, one after the other, in one run; ``on-private``: confined,
                  and clones share no template RAM (``share_template_memory = false``)
  fill            daemon start -> every VM ready (the template's boot and save included)
  restore         one snapshot restore, QEMU start -> ready (p50 of the fill's restores,
                  two at a time on two cores), from the daemon's log
  monitor pss     the jail's bubblewrap process that waits for each QEMU (its PSS, per VM)
  rss/vm, total   the cached QEMU processes' resident memory, once the cache is full
  pss/vm, total   the same, shared pages divided among the processes sharing them
  host memory     MemAvailable before the daemon minus after the fill
  idle cpu        % of one core used by all cached QEMU processes, and by the daemon,
                  over 10 s with nobody asking
  status          client-observed Status latency (median of 20, one connection)
  rpc warm/idle   client-observed Config round trip (the smallest rpc: no VM involved),
                  back to back (2 ms apart) and after 0.2 s idle, median of 20 each: what
                  the same code costs with the CPU caches warm and once QEMU has had the
                  cores for a while
  hand-out        client-observed, one connection kept open: ``--handouts`` GetBaseVM
                  (Kata's, one round trip), then as many get_vm (TakeVM: offer + claim),
                  p50 and p99, a request every second, each VM stopped before the next;
                  and server side for the GetBaseVM ones (request -> reply written to the
                  socket, from Status) p50 and p99
  purge           SIGINT -> daemon gone, and how many QEMU processes were left (must be 0)

A nox session (``nox -s scale``), not run by CI: a full run takes about 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from vmcache.procfs import cpu_ticks, qemu_pids, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
FILL_TIMEOUT = 1200.0
IDLE_WINDOW = 10.0
#: Between hand-outs: the refill (a restore) has mostly finished by the next request.
HANDOUT_GAP = 1.0
#: Config round trips: back to back (caches warm) and after an idle spell.
WARM_GAP = 0.002
IDLE_GAP = 0.2


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def pss_bytes(pid: int) -> int:
    """Proportional set size: private pages plus this process's share of shared ones."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def write_config(directory: Path, size: int, mode: str, memory: int, hot: int, jail: str) -> Path:
    path = directory / "scale.toml"
    path.write_text("\n".join([
        "[factory]",
        f"vm_cache_number = {size}",
        f'vm_cache_endpoint = "{directory / "cache.sock"}"',
        'boot_mode = "snapshot"',
        f'idle_vms = "{mode}"',
        f"hot_vms = {hot}",
        f"share_template_memory = {'false' if jail == 'on-private' else 'true'}",
        "[hypervisor.qemu]",
        'accel = "tcg"',
        "boot_timeout = 300.0",
        f"default_memory = {memory}",
        "[jail]",
        f"enabled = {'false' if jail == 'off' else 'true'}",
        "",
    ]))
    return path


async def client_measurements(endpoint: Path, handouts: int, run_root: Path) -> dict[str, Any]:
    """Status latency and hand-out latencies, over one connection."""
    async with vmcache.connect(endpoint) as cache:
        status_ms = []
        for _ in range(20):
            started = time.perf_counter()
            await cache.status()
            status_ms.append((time.perf_counter() - started) * 1000)
        rpc_ms: dict[float, list[float]] = {IDLE_GAP: [], WARM_GAP: []}
        for _ in range(20):
            for gap, times in rpc_ms.items():
                await trio.sleep(gap)
                started = time.perf_counter()
                await cache.config()
                times.append((time.perf_counter() - started) * 1000)
        base_ms: list[float] = []
        take_ms: list[float] = []
        for _ in range(handouts):  # GetBaseVM first: the daemon's own numbers are for these
            await trio.sleep(HANDOUT_GAP)
            started = time.perf_counter()
            handle = await cache.get_base_vm(timeout=120)
            base_ms.append((time.perf_counter() - started) * 1000)
            await handle.stop(run_root)
        status = await cache.status()
        for _ in range(handouts):
            await trio.sleep(HANDOUT_GAP)
            started = time.perf_counter()
            handle = await cache.get_vm(timeout=120)
            take_ms.append((time.perf_counter() - started) * 1000)
            await handle.stop(run_root)
    return {
        "status_ms_p50": statistics.median(status_ms),
        "rpc_warm_ms_p50": statistics.median(rpc_ms[WARM_GAP]),
        "rpc_idle_ms_p50": statistics.median(rpc_ms[IDLE_GAP]),
        "get_base_vm_ms_p50": statistics.median(base_ms), "get_base_vm_ms_p99": percentile(base_ms, 0.99),
        "get_vm_ms_p50": statistics.median(take_ms), "get_vm_ms_p99": percentile(take_ms, 0.99),
        "server_ms_p50": status.median_handout_seconds * 1000,
        "server_ms_p99": status.p99_handout_seconds * 1000,
    }


def cached_status(endpoint: Path) -> vmcache.CacheStatus:
    async def ask() -> vmcache.CacheStatus:
        async with vmcache.connect(endpoint) as cache:
            return await cache.status()
    return trio.run(ask)


def monitor_pss(pid: int) -> int:
    """PSS of QEMU's parent if it is the jail's bubblewrap (0 for an unconfined QEMU)."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        parent = int(fields["PPid"])
        return pss_bytes(parent) if Path(f"/proc/{parent}/comm").read_text().strip() == "bwrap" else 0
    except (OSError, ValueError, KeyError):
        return 0


def restore_seconds(log: str) -> list[float]:
    """Each restore's QEMU start -> ready, from the daemon log (the VMs booted after the
    template was saved)."""
    _, _, after = log.partition(" saved: ")
    return [float(seconds) for seconds in re.findall(r"VM \w+ booted in ([0-9.]+) s", after)]


def measure(size: int, mode: str, memory: int, handouts: int, hot: int, jail: str = "on") -> dict[str, Any]:
    before_pids = qemu_pids()
    available_before = mem_available()
    with tempfile.TemporaryDirectory(prefix="vmcache-scale-", dir="/tmp") as tmp:
        directory = Path(tmp)
        directory.chmod(0o711)  # each VM's own uid passes through to its run directory
        run_root = directory / "run"
        run_root.mkdir(mode=0o700)
        config = write_config(directory, size, mode, memory, hot, jail)
        env = os.environ | {"VMCACHE_RUN_DIR": str(run_root)}
        endpoint = directory / "cache.sock"
        started = time.monotonic()
        with open(directory / "daemon.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "vmcache", "serve", "--config", str(config)],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        try:
            os.environ["VMCACHE_RUN_DIR"] = str(run_root)
            status = None
            while time.monotonic() - started < FILL_TIMEOUT:
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon exited: {(directory / 'daemon.log').read_text()[-2000:]}")
                try:
                    status = cached_status(endpoint)
                except vmcache.VmcacheError:
                    status = None
                if status is not None and len(status.vms) == size:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"the cache of {size} did not fill in {FILL_TIMEOUT:.0f} s")
            fill = time.monotonic() - started
            print(f"  jail {jail}, {mode} {size}: filled in {fill:.1f} s", flush=True)
            settle_until = time.monotonic() + 60
            while mode == "paused" and time.monotonic() < settle_until:
                if cached_status(endpoint).pools[0].paused >= size - 1:
                    break
                time.sleep(0.5)
            time.sleep(5)
            status = cached_status(endpoint)
            pids = [vm.pid for vm in status.vms]
            rss = [rss_bytes(pid) for pid in pids]
            pss = [pss_bytes(pid) for pid in pids]
            monitors = [monitor_pss(pid) for pid in pids]
            host_used = available_before - mem_available()
            ticks_before = {pid: cpu_ticks(pid) for pid in [*pids, daemon.pid]}
            time.sleep(IDLE_WINDOW)
            ticks = {pid: cpu_ticks(pid) - value for pid, value in ticks_before.items()}
            vm_cpu = sum(ticks[pid] for pid in pids) / TICKS / IDLE_WINDOW * 100
            daemon_cpu = ticks[daemon.pid] / TICKS / IDLE_WINDOW * 100
            latencies = trio.run(client_measurements, endpoint, handouts, run_root)
        finally:
            purge_started = time.monotonic()
            daemon.send_signal(signal.SIGINT)
            try:
                daemon.wait(timeout=300)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            purge = time.monotonic() - purge_started
            time.sleep(1)
            left = qemu_pids() - before_pids
            for pid in left:  # never leave a VM behind, even when a measurement failed
                os.kill(pid, signal.SIGKILL)
            restores = restore_seconds((directory / "daemon.log").read_text(errors="replace"))
    return {
        "jail": jail, "mode": mode, "size": size, "hot": hot, "memory_mib": memory, "fill_s": fill,
        "restore_s_p50": statistics.median(restores) if restores else 0.0,
        "monitor_pss_per_vm_mb": statistics.median(monitors) / 1e6,
        "rss_per_vm_mb": statistics.median(rss) / 1e6, "rss_total_mb": sum(rss) / 1e6,
        "pss_per_vm_mb": statistics.median(pss) / 1e6, "pss_total_mb": sum(pss) / 1e6,
        "host_used_mb": host_used / 1e6, "idle_cpu_vms_pct": vm_cpu, "idle_cpu_daemon_pct": daemon_cpu,
        **latencies, "purge_s": purge, "qemu_left": len(left), "daemon_exit": daemon.returncode,
    }


COLUMNS = [
    ("jail", "{}"), ("mode", "{}"), ("size", "{}"), ("hot", "{}"), ("fill_s", "{:.1f}"),
    ("restore_s_p50", "{:.2f}"), ("rss_per_vm_mb", "{:.0f}"), ("monitor_pss_per_vm_mb", "{:.1f}"),
    ("rss_total_mb", "{:.0f}"), ("pss_per_vm_mb", "{:.0f}"), ("pss_total_mb", "{:.0f}"),
    ("host_used_mb", "{:.0f}"), ("idle_cpu_vms_pct", "{:.2f}"),
    ("idle_cpu_daemon_pct", "{:.2f}"), ("status_ms_p50", "{:.1f}"), ("rpc_warm_ms_p50", "{:.2f}"),
    ("rpc_idle_ms_p50", "{:.2f}"), ("server_ms_p50", "{:.2f}"),
    ("server_ms_p99", "{:.2f}"), ("get_base_vm_ms_p50", "{:.2f}"), ("get_base_vm_ms_p99", "{:.2f}"),
    ("get_vm_ms_p50", "{:.2f}"), ("get_vm_ms_p99", "{:.2f}"), ("purge_s", "{:.1f}"), ("qemu_left", "{}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[name]) for name, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for jail, kind in sorted({(row["jail"], row["mode"]) for row in rows}):
        mode = f"{kind}, jail {jail}"
        mine = sorted((row for row in rows if (row["jail"], row["mode"]) == (jail, kind)),
                      key=lambda row: row["size"])
        sizes = [row["size"] for row in mine]
        memory_axis.plot(sizes, [row["rss_per_vm_mb"] for row in mine], "o-", label=f"{mode}: RSS per VM")
        memory_axis.plot(sizes, [row["pss_per_vm_mb"] for row in mine], "s--",
                         label=f"{mode}: PSS per VM (shared pages divided)")
        latency_axis.plot(sizes, [row["server_ms_p50"] for row in mine], "o-", label=f"{mode}: server p50")
        latency_axis.plot(sizes, [row["get_base_vm_ms_p50"] for row in mine], "s--",
                          label=f"{mode}: GetBaseVM client p50")
        latency_axis.plot(sizes, [row["get_base_vm_ms_p99"] for row in mine], "^:",
                          label=f"{mode}: GetBaseVM client p99")
    memory_axis.set(xlabel="cached VMs", ylabel="MB", title="memory per cached VM (128 MiB guests)")
    memory_axis.axhline(64, color="grey", linestyle="--", linewidth=1, label="target: 64 MB")
    memory_axis.set_ylim(0, 1.25 * max(row["rss_per_vm_mb"] for row in rows))
    latency_axis.set(xlabel="cached VMs", ylabel="ms", title="hand-out latency", yscale="log")
    for axis in (memory_axis, latency_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,100")
    parser.add_argument("--modes", default="paused,running")
    parser.add_argument("--handouts", type=int, default=30)
    parser.add_argument("--memory", type=int, default=128)
    parser.add_argument("--hot", type=int, default=1, help="hot_vms: VMs kept running, next in line")
    parser.add_argument("--jails", default="on", help="on, off or off,on: QEMU confined or not")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/scale.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench/results/scale.png")
    args = parser.parse_args()
    rows = []
    for jail in args.jails.split(","):
        for mode in args.modes.split(","):
            for size in (int(value) for value in args.sizes.split(",")):
                rows.append(measure(size, mode, args.memory, args.handouts, args.hot, jail))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                results = {"host_cpus": os.cpu_count(), "rows": rows}
                args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(table(rows))
    plot(rows, args.plot)
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
