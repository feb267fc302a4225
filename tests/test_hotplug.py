"""Growing VMs by hot-add: the argv's headroom, the size rules, and real QEMU guests (TCG)
grown from 1 vCPU / 256 MiB to 2 / 1024, booted cold and restored from a snapshot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from conftest import write_config

from vmcache.agent_client import GuestResources
from vmcache.config import VMSpec, load_config, resolve_spec
from vmcache.errors import ResizeError, SizeLimitError
from vmcache.hotplug import _pending, _shortfall, grow, target_size
from vmcache.qemu import VM, boot_vm
from vmcache.qemu_argv import MEMORY_HOTPLUG_PARAMS, qemu_argv
from vmcache.snapshot import SnapshotManager

GROW_TIMEOUT = 30.0


def spec_for(tmp_path: Path, run_dir: Path, **qemu: object) -> VMSpec:
    settings: dict[str, object] = {"default_maxvcpus": 2, "default_maxmemory": 2048} | qemu
    config = write_config(tmp_path / "vmcache.toml", **settings)  # type: ignore[arg-type]
    return resolve_spec(load_config(config), run_root=run_dir)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_argv_has_the_headroom(tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    spec = spec_for(tmp_path, run_dir, kernel_params="loglevel=3")
    assert (spec.vcpus, spec.max_vcpus, spec.memory_mib, spec.max_memory_mib) == (1, 2, 256, 2048)
    argv = qemu_argv(spec, run_dir / "vm-x", "tcg", "n")
    assert option(argv, "-smp") == "1,maxcpus=2"
    assert option(argv, "-m") == "256,slots=10,maxmem=2048M"
    params = option(argv, "-append")
    assert MEMORY_HOTPLUG_PARAMS in params
    assert params.endswith("loglevel=3"), "the config's own parameters come last, so they win"
    assert argv == qemu_argv(spec, run_dir / "vm-x", "tcg", "n"), "a template and its restores match"

    fixed = spec_for(tmp_path, run_dir, default_maxvcpus=1, default_maxmemory=256)
    argv = qemu_argv(fixed, run_dir / "vm-x", "tcg", "n")
    assert (option(argv, "-smp"), option(argv, "-m")) == ("1", "256"), "no headroom: as before"
    assert MEMORY_HOTPLUG_PARAMS not in option(argv, "-append")
    with pytest.raises(Exception, match="cannot have maxima"):
        attrs.evolve(spec, vcpus=4)


def test_target_size_rounds_memory_up_and_names_the_limits(tmp_path: Path, run_dir: Path,
                                                           guest_image: Path) -> None:
    spec = spec_for(tmp_path, run_dir)
    assert target_size(spec, 1, 256) == (1, 256)
    assert target_size(spec, 2, 1024) == (2, 1024)
    assert target_size(spec, 2, 1000) == (2, 1024)
    assert target_size(spec, 1, 257) == (1, 384)
    assert target_size(spec, 2, 1500, current=(2, 1024)) == (2, 1536)
    for vcpus, memory, current, needle in [
        (3, 256, None, "3 vCPUs asked, more than the maximum of 2 (hypervisor.qemu.default_maxvcpus)"),
        (1, 4096, None, "4096 MiB of memory asked, more than the maximum of 2048 MiB "
                        "(hypervisor.qemu.default_maxmemory)"),
        (1, 512, (2, 1024), "cannot shrink a VM: it has 2 vCPUs, 1 asked"),
        (2, 512, (2, 1024), "cannot shrink a VM: it has 1024 MiB of memory, 512 MiB asked"),
    ]:
        with pytest.raises(SizeLimitError) as caught:
            target_size(spec, vcpus, memory, current=current)
        assert str(caught.value) == needle
    odd = attrs.evolve(spec, max_memory_mib=1000)  # not through the config: not in 128 MiB steps
    with pytest.raises(SizeLimitError, match="1024 MiB is more than the maximum of 1000 MiB"):
        target_size(odd, 1, 1000)


def test_what_did_not_come_up_is_named() -> None:
    assert _pending([{"device": "d0", "source": 1, "status": 0},
                     {"device": "c1", "source": 0, "status": 0}], ["d0", "c1", "c2"]) == ["c1", "c2"]
    with pytest.raises(ResizeError, match="d0: its ACPI handler answered status 0x1"):
        _pending([{"device": "d0", "source": 1, "status": 1}], ["d0"])
    assert "hot-add of c1" in _shortfall(["c1"], None, 2, 0)
    seen = GuestResources(online_cpus=1, mem_total_kib=200 << 10)
    assert _shortfall([], seen, 2, 900 << 10) == \
        "the guest shows 1 of 2 vCPUs online and MemTotal 200 MiB, not yet 900 MiB"


@asynccontextmanager
async def booted(spec: VMSpec) -> AsyncIterator[VM]:
    # Not launch_vm: its die-with-parent signal is tied to a Trio worker thread that ends
    # after 10 s idle, killing QEMU (see /work/shared/notes/launch-vm-pdeathsig.md).
    vm = await boot_vm(spec)
    try:
        yield vm
    finally:
        await vm.stop()


async def check_grows_to_2_and_1024(vm: VM) -> None:
    resources = await grow(vm, 2, 1024, timeout=GROW_TIMEOUT)
    assert resources.online_cpus == 2
    assert resources.mem_total_kib >= 900 << 10
    result = await vm.run(["sh", "-c", "nproc; grep MemTotal /proc/meminfo"], check=True)
    nproc, meminfo = (result.stdout or b"").decode().splitlines()
    assert nproc == "2"
    assert int(meminfo.split()[1]) >= 900 << 10, meminfo
    handle = vm.handle()
    assert (handle.cpu, handle.memory) == (2, 1024)
    assert (vm.vcpus, vm.memory_mib) == (2, 1024)


@pytest.mark.qemu
async def test_a_vm_grows_from_1_and_256_to_2_and_1024(tmp_path: Path, run_dir: Path,
                                                        guest_image: Path) -> None:
    spec = spec_for(tmp_path, run_dir)
    with trio.fail_after(180):
        async with booted(spec) as vm:
            assert (vm.handle().cpu, vm.handle().memory) == (1, 256)
            same = await grow(vm, 1, 256, timeout=GROW_TIMEOUT)
            assert same.online_cpus == 1 and 150 << 10 < same.mem_total_kib < 256 << 10
            await check_grows_to_2_and_1024(vm)

            for vcpus, memory, limit in [(3, 1024, "default_maxvcpus"), (2, 4096, "default_maxmemory"),
                                         (1, 1024, "cannot shrink")]:
                with pytest.raises(SizeLimitError, match=limit):
                    await grow(vm, vcpus, memory, timeout=GROW_TIMEOUT)
            assert (vm.handle().cpu, vm.handle().memory) == (2, 1024), "a refused grow changes nothing"
            again = await grow(vm, 2, 1100, timeout=GROW_TIMEOUT)  # a second DIMM: 1152
            assert again.mem_total_kib >= resources_floor(1152)
            result = await vm.run(["python3", "-c", "b = bytearray(800 << 20); print(len(b) >> 20)"],
                                  check=True)
            assert result.stdout == b"800\n", "the hot-added memory is usable"


def resources_floor(memory_mib: int) -> int:
    """MemTotal (KiB) a VM of ``memory_mib`` shows at least: the kernel keeps about 40 MiB."""
    return (memory_mib - 64) << 10


@pytest.mark.qemu
async def test_a_vm_restored_from_a_snapshot_grows_too(tmp_path: Path, run_dir: Path,
                                                        guest_image: Path) -> None:
    spec = spec_for(tmp_path, run_dir)
    manager = SnapshotManager(spec, run_dir / "state" / "snapshots")
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            while manager.snapshot is None:
                await trio.sleep(0.1)
            vm = await manager.boot(spec)
            try:
                assert manager.restores == 1, "restored, not booted"
                await check_grows_to_2_and_1024(vm)
            finally:
                await vm.stop()
            nursery.cancel_scope.cancel()
