"""What a VM's NIC (vmcache.vm_nic) costs: boot and snapshot refill with and without it.

    flock /tmp/vmcache-qemu.lock python bench/nic.py [--runs N] [--output bench/results/nic.json]

Medians over N runs, interleaved (each run measures every column once), one VM at a time, TCG:

  boot              QEMU start -> agent ready (boot_vm), without / with the NIC (the tap,
                    the drop-all ruleset and IPv6 off made at the jail's gate included)
  restore           a snapshot clone (SnapshotManager.boot, what a refill does), each column
                    from its own template
  configure_guest   the guest's interface configured through the agent (NIC only)
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

from vmcache.config import load_config, resolve_spec
from vmcache.procfs import qemu_pids
from vmcache.qemu import VM, boot_vm
from vmcache.snapshot import SnapshotManager
from vmcache.vm_nic import configure_guest

ROOT = Path(__file__).resolve().parent.parent


async def run(runs: int, run_root: Path) -> dict[str, Any]:
    config = load_config(None)
    qemu = attrs.evolve(config.qemu, accel="tcg", boot_timeout=120.0)
    plain = resolve_spec(attrs.evolve(config, hypervisor=attrs.evolve(config.hypervisor, qemu=qemu)),
                         run_root=run_root)
    nic = attrs.evolve(plain, nic=True)
    samples: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    async def timed(name: str, boot: Callable[[], Awaitable[VM]], *, configure: bool) -> None:
        started = time.monotonic()
        vm = await boot()
        try:
            note(name, time.monotonic() - started)
            if configure:
                started = time.monotonic()
                await configure_guest(vm)
                note("configure_guest", time.monotonic() - started)
        finally:
            await vm.stop()

    managers = {"plain": SnapshotManager(plain, run_root / "state" / "snap-plain"),
                "nic": SnapshotManager(nic, run_root / "state" / "snap-nic")}
    async with trio.open_nursery() as nursery:
        for manager in managers.values():
            await nursery.start(manager.run)
        for number in range(runs):
            print(f"run {number + 1}/{runs}", file=sys.stderr, flush=True)
            await timed("boot_plain", lambda: boot_vm(plain), configure=False)
            await timed("boot_nic", lambda: boot_vm(nic), configure=True)
            for name, manager in managers.items():
                while manager.snapshot is None:  # noqa: ASYNC110 - the manager has no event for it
                    await trio.sleep(0.1)
                await timed(f"restore_{name}", functools.partial(manager.boot, manager.spec),
                            configure=False)
        restores = {name: manager.restores for name, manager in managers.items()}
        nursery.cancel_scope.cancel()
    if any(count != runs for count in restores.values()):
        sys.exit(f"some refills were not restores from the snapshot: {restores}")
    return {"runs": runs, "medians": {name: statistics.median(values) for name, values in samples.items()},
            "samples": samples}


def table(result: dict[str, Any]) -> str:
    medians = result["medians"]
    lines = [f"{'median of ' + str(result['runs']) + ', seconds':<28} {'no NIC':>8} {'NIC':>8}"]
    for label, key in (("boot (start -> ready)", "boot"), ("snapshot refill (restore)", "restore")):
        lines.append(f"{label:<28} {medians[key + '_plain']:>8.2f} {medians[key + '_nic']:>8.2f}")
    lines.append(f"{'configure_guest':<28} {'':>8} {medians['configure_guest']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "nic.json")
    args = parser.parse_args()
    before = qemu_pids()
    with tempfile.TemporaryDirectory(prefix="vmcache-nic-", dir="/tmp") as run_root:
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
