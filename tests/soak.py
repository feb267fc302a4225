"""Soak: many get/stop cycles against a real daemon, then count what leaked.

    python tests/soak.py [--cycles 200] [--cache 2] [--output soak.json]

Run by `nox -s soak` (and so by scripts/test and CI). Bounded: a cycle limit
and an overall deadline. Exits non-zero if anything leaked or was lost:
QEMU processes, the daemon's file descriptors, run directories, VMs handed
out but never received, or a cache that does not refill.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import vmcache
from vmcache.cgroup import manager as cgroup_manager
from vmcache.procfs import jail_pids, open_fds, qemu_pids

OVERALL_DEADLINE = 600.0


async def cached(endpoint: Path) -> list[int]:
    async with vmcache.connect(endpoint) as cache:
        return [vm.pid for vm in (await cache.status()).vms]


async def wait_cached(endpoint: Path, count: int, timeout: float = 120.0) -> list[int]:
    """Wait until ``count`` VMs are cached (the daemon may still be starting)."""
    with trio.fail_after(timeout):
        while True:
            try:
                if len(pids := await cached(endpoint)) >= count:
                    return pids
            except vmcache.DaemonNotRunningError:
                pass
            await trio.sleep(0.05)


async def soak(cycles: int, cache_size: int, mode: str) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="vmcache-soak-", dir="/tmp"))
    work.chmod(0o711)  # each VM's own uid passes through to its run directory
    run_dir = work / "run"
    endpoint = run_dir / "cache.sock"
    config = work / "soak.toml"
    config.write_text(
        f'[factory]\nvm_cache_number = {cache_size}\nvm_cache_endpoint = "{endpoint}"\n'
        f'boot_mode = "{mode}"\n[hypervisor.qemu]\naccel = "tcg"\nboot_timeout = 60.0\n'
    )
    before = qemu_pids()
    jails_before, cgroups_before = jail_pids(), set(cgroup_manager().existing())
    log = open(work / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen([sys.executable, "-m", "vmcache", "serve", "--config", str(config)],
                              stdout=log, stderr=log, env={**os.environ, "VMCACHE_RUN_DIR": str(run_dir)})
    started = time.monotonic()
    received: set[int] = set()
    try:
        with trio.fail_after(OVERALL_DEADLINE):
            await wait_cached(endpoint, cache_size)
            if mode == "snapshot":  # the first fill boots plainly; start counting once restores run
                await trio.sleep(1)
            fds_before = open_fds(daemon.pid)
            async with vmcache.connect(endpoint) as cache:
                for _ in range(cycles):
                    vm = await cache.get_vm(timeout=120)
                    if vm.pid in received:
                        raise AssertionError(f"VM pid {vm.pid} handed out twice")
                    received.add(vm.pid)
                    ran = await vm.run(["true"])
                    assert ran.returncode == 0
                    await vm.stop()
            refilled = await wait_cached(endpoint, cache_size)
            await trio.sleep(1)  # reapers and connection tasks finish
            fds_after = open_fds(daemon.pid)
        async with vmcache.connect(endpoint) as cache:
            status = await cache.status()
        daemon.send_signal(signal.SIGTERM)
        exit_status = daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    leftover_qemu = qemu_pids() - before
    leftover_dirs = [p.name for p in run_dir.iterdir() if p.name.startswith("vm-")]
    leftover_jails = jail_pids() - jails_before
    leftover_cgroups = set(cgroup_manager().existing()) - cgroups_before
    result = {
        "cycles": cycles,
        "cache": cache_size,
        "boot_mode": mode,
        "seconds": round(time.monotonic() - started, 1),
        "handed_out_by_daemon": status.handed_out,
        "received_by_client": len(received),
        "lost_vms": status.handed_out - len(received),
        "cached_at_end": len(refilled),
        "leaked_qemu_processes": len(leftover_qemu),
        "leaked_fds": max(0, fds_after - fds_before),
        "leaked_run_dirs": len(leftover_dirs),
        "leaked_jail_processes": len(leftover_jails),
        "leaked_cgroups": len(leftover_cgroups),
        "daemon_exit_status": exit_status,
    }
    subprocess.run(["rm", "-rf", str(work)], check=False)
    for pid in leftover_qemu:
        os.kill(pid, signal.SIGKILL)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--cache", type=int, default=2)
    parser.add_argument("--mode", choices=["boot", "snapshot"], default="snapshot")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    result = trio.run(soak, args.cycles, args.cache, args.mode)
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    bad = {key: result[key] for key in ("lost_vms", "leaked_qemu_processes", "leaked_fds",
                                         "leaked_run_dirs", "leaked_jail_processes", "leaked_cgroups",
                                         "daemon_exit_status") if result[key]}
    if bad or result["cached_at_end"] != args.cache:
        raise SystemExit(f"soak: FAILED {bad or result}")
    print(f"soak: ok, {result['cycles']} get/exec/stop cycles, nothing leaked or lost")


if __name__ == "__main__":
    main()
