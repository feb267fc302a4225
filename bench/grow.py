"""Growing a VM by hot-add versus booting it at the size asked, on this machine.

    python bench/grow.py [--runs N] [--output bench/results/grow.json]

Medians over N runs (interleaved, so the machine's noise hits every column alike) of:

  launch 1/256              QEMU start -> agent ready, 1 vCPU / 256 MiB, headroom to 2 / 4096
  grow 1/256 -> 2/1024      vmcache.hotplug.grow alone, on those VMs (until the guest's own
                            view shows 2 CPUs online and MemTotal grown by 768 MiB)
  launch 2/1024             QEMU start -> agent ready, booted at 2 vCPUs / 1024 MiB
  launch 1/256, no headroom the same as the first, without maxcpus/maxmem (what headroom costs)
  grow, snapshot-restored   the grow on VMs restored from a template (which booted with
                            init_on_free=1, so the guest zeroes the memory it is given)

plus the QEMU process's RSS once each VM is ready or grown. TCG here; one VM at a time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from vmcache.config import VMSpec, load_config, resolve_spec
from vmcache.hotplug import grow
from vmcache.procfs import qemu_pids, rss_bytes
from vmcache.qemu import VM, boot_vm
from vmcache.snapshot import SnapshotManager

ROOT = Path(__file__).resolve().parent.parent
GROW_TIMEOUT = 60.0


async def timed_boot(boot: Callable[[], Awaitable[VM]]) -> tuple[VM, float]:
    started = time.monotonic()
    vm = await boot()
    return vm, time.monotonic() - started


async def run(runs: int, run_root: Path) -> dict[str, Any]:
    config = load_config(None)
    qemu = attrs.evolve(config.qemu, accel="tcg", boot_timeout=120.0, default_maxvcpus=2,
                        default_maxmemory=4096)
    spec = resolve_spec(attrs.evolve(config, hypervisor=attrs.evolve(config.hypervisor, qemu=qemu)),
                        run_root=run_root)
    big = attrs.evolve(spec, vcpus=2, memory_mib=1024)
    fixed = attrs.evolve(spec, max_vcpus=1, max_memory_mib=256)
    samples: dict[str, list[float]] = {}
    memtotal: dict[str, list[int]] = {}

    def note(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    async def measure_grow(vm: VM, prefix: str) -> None:
        started = time.monotonic()
        resources = await grow(vm, 2, 1024, timeout=GROW_TIMEOUT)
        note(f"{prefix}_seconds", time.monotonic() - started)
        note(f"{prefix}_rss_mb", rss_bytes(vm.pid) / 1e6)
        memtotal.setdefault(prefix, []).append(resources.mem_total_kib >> 10)

    async def booted(boot: Callable[[], Awaitable[VM]], name: str,
                     then: Callable[[VM], Awaitable[None]] | None = None) -> None:
        vm, seconds = await timed_boot(boot)
        try:
            note(f"{name}_seconds", seconds)
            await trio.sleep(1.0)  # let the boot's tail settle before RSS and grows
            note(f"{name}_rss_mb", rss_bytes(vm.pid) / 1e6)
            if then is not None:
                await then(vm)
        finally:
            await vm.stop()

    def boot(what: VMSpec) -> Callable[[], Awaitable[VM]]:
        return lambda: boot_vm(what)

    manager = SnapshotManager(spec, run_root / "state" / "snapshots")
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        for number in range(runs):
            print(f"run {number + 1}/{runs}", file=sys.stderr, flush=True)
            await booted(boot(spec), "launch_small", lambda vm: measure_grow(vm, "grow"))
            await booted(boot(big), "launch_big")
            await booted(boot(fixed), "launch_small_no_headroom")
            while manager.snapshot is None:  # noqa: ASYNC110 - the manager has no event for it
                await trio.sleep(0.1)
            restore = functools.partial(manager.restore, manager.template_spec, manager.snapshot)
            await booted(restore, "restore_small", lambda vm: measure_grow(vm, "grow_restored"))
        size = manager.snapshot.size if manager.snapshot is not None else 0
        nursery.cancel_scope.cancel()
    return {"runs": runs, "medians": {name: statistics.median(values) for name, values in samples.items()},
            "samples": samples, "memtotal_mib": memtotal, "snapshot_mb": size / 1e6}


def table(result: dict[str, Any]) -> str:
    medians = result["medians"]
    rows = [
        ("launch 1/256 (headroom to 2/4096)", "launch_small"),
        ("grow 1/256 -> 2/1024 (the grow alone)", "grow"),
        ("launch 2/1024", "launch_big"),
        ("launch 1/256, no headroom", "launch_small_no_headroom"),
        ("restore 1/256 from the snapshot", "restore_small"),
        ("grow 1/256 -> 2/1024 of a restored VM", "grow_restored"),
    ]
    lines = [f"{'median of ' + str(result['runs']):<42} {'seconds':>8} {'RSS MB':>8}"]
    for label, key in rows:
        lines.append(f"{label:<42} {medians[key + '_seconds']:>8.2f} {medians[key + '_rss_mb']:>8.0f}")
    lines.append(f"MemTotal after the grow (MiB): cold {result['memtotal_mib'].get('grow')}, "
                 f"restored {result['memtotal_mib'].get('grow_restored')}; "
                 f"snapshot {result['snapshot_mb']:.0f} MB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "grow.json")
    args = parser.parse_args()
    before = qemu_pids()
    with tempfile.TemporaryDirectory(prefix="vmcache-grow-", dir="/tmp") as run_root:
        Path(run_root).chmod(0o711)  # each VM's own uid passes through to its run directory
        result = trio.run(run, args.runs, Path(run_root))
    left = qemu_pids() - before
    if left:
        sys.exit(f"QEMU processes left behind: {sorted(left)}")
    print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
