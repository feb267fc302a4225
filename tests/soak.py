"""Soak: many get/stop cycles against a real daemon, then count what leaked.

    python tests/soak.py [--cycles 200] [--cache 2] [--output soak.json]

Run by `nox -s soak` (and so by scripts/test and CI). Bounded: a cycle limit
and an overall deadline. Exits non-zero if anything leaked or was lost:
QEMU processes, the daemon's file descriptors, run directories, VMs handed
out but never received, or a cache that does not refill.

Its VMs have a NIC (the config permits a loopback server the soak starts): every
RESTRICTED_EVERY-th cycle gets its VM with ``host.vmcache.internal:PORT`` allowed, and
every FETCH_EVERY-th fetches from that server through the egress proxy. Then what a VM's
network could leave is counted too (tests/leaks.py): interfaces and named namespaces in
the host's namespace, its nftables ruleset, the daemon's descriptors holding another
namespace, its helper processes, connections to the server.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leaks

import vmcache
from vmcache.cgroup import manager as cgroup_manager
from vmcache.procfs import jail_pids, open_fds, qemu_pids

OVERALL_DEADLINE = 600.0
#: Every this many cycles a VM given network (host.vmcache.internal:PORT) ...
RESTRICTED_EVERY = 20
#: ... and every this many a guest that fetches through the egress proxy.
FETCH_EVERY = 40
FETCH = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
         "f'http://host.vmcache.internal:{sys.argv[1]}/', timeout=10).read().decode())")


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
    with leaks.loopback_server("soak") as port:
        return await soak_with(cycles, cache_size, mode, port)


async def soak_with(cycles: int, cache_size: int, mode: str, port: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="vmcache-soak-", dir="/tmp"))
    work.chmod(0o711)  # each VM's own uid passes through to its run directory
    run_dir = work / "run"
    endpoint = run_dir / "cache.sock"
    config = work / "soak.toml"
    config.write_text(
        f'[factory]\nvm_cache_number = {cache_size}\nvm_cache_endpoint = "{endpoint}"\n'
        f'boot_mode = "{mode}"\n[hypervisor.qemu]\naccel = "tcg"\nboot_timeout = 60.0\n'
        f'[network]\npermit = ["host.vmcache.internal:{port}"]\n'
    )
    restricted = vmcache.NetworkPolicy.parse("restricted", [f"host.vmcache.internal:{port}"])
    host_before = leaks.census()
    before = qemu_pids()
    jails_before, cgroups_before = jail_pids(), set(cgroup_manager().existing())
    log = open(work / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen([sys.executable, "-m", "vmcache", "serve", "--config", str(config)],
                              stdout=log, stderr=log, env={**os.environ, "VMCACHE_RUN_DIR": str(run_dir)})
    started = time.monotonic()
    received: set[int] = set()
    fetched = 0
    try:
        with trio.fail_after(OVERALL_DEADLINE):
            await wait_cached(endpoint, cache_size)
            if mode == "snapshot":  # the first fill boots plainly; start counting once restores run
                await trio.sleep(1)
            fds_before = open_fds(daemon.pid)
            async with vmcache.connect(endpoint) as cache:
                for cycle in range(cycles):
                    network = restricted if cycle % RESTRICTED_EVERY == 0 else None
                    vm = await cache.get_vm(timeout=120, network=network)
                    if vm.pid in received:
                        raise AssertionError(f"VM pid {vm.pid} handed out twice")
                    received.add(vm.pid)
                    if cycle % FETCH_EVERY == 0:
                        ran = await vm.run(["python3", "-c", FETCH, str(port)])
                        assert ran.returncode == 0 and ran.stdout == b"soak", ran
                        fetched += 1
                    else:
                        ran = await vm.run(["true"])
                        assert ran.returncode == 0
                    await vm.stop()
            refilled = await wait_cached(endpoint, cache_size)
            await trio.sleep(1)  # reapers and connection tasks finish
            fds_after = open_fds(daemon.pid)
            foreign, helpers = leaks.foreign_fds(daemon.pid), leaks.helpers(daemon.pid)
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
    host_leaks = leaks.leaked(host_before, leaks.census())
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
        "restricted_vms": len(range(0, cycles, RESTRICTED_EVERY)),
        "fetches_through_the_proxy": fetched,
        **host_leaks,
        "daemon_fds_in_vm_namespaces": foreign,
        "daemon_helpers_left": helpers,
        "proxied_connections_left": leaks.established(port),
        "daemon_exit_status": exit_status,
    }
    subprocess.run(["rm", "-rf", str(work)], check=False)
    for pid in leftover_qemu:
        os.kill(pid, signal.SIGKILL)
    return result


#: The counters of what a VM's network could leave (each must be empty, false or 0).
LEAKS = ("leaked_host_links", "leaked_netns_mounts", "host_ruleset_changed",
         "daemon_fds_in_vm_namespaces", "daemon_helpers_left", "proxied_connections_left")


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
                                         *LEAKS, "daemon_exit_status") if result[key]}
    if bad or result["cached_at_end"] != args.cache:
        raise SystemExit(f"soak: FAILED {bad or result}")
    print(f"soak: ok, {result['cycles']} get/exec/stop cycles, nothing leaked or lost")


if __name__ == "__main__":
    main()
