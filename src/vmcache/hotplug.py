"""Growing a running VM: hot-added vCPUs and memory DIMMs, onlined by the guest.

A VM starts with headroom (``default_maxvcpus``, ``default_maxmemory``: QEMU's
``-smp N,maxcpus=M`` and ``-m SIZE,slots=K,maxmem=MAX``, see
:func:`vmcache.qemu_argv.size_args`). :func:`grow` then:

1. plugs the missing vCPUs in (QMP ``query-hotpluggable-cpus``, then ``device_add`` of
   each free slot with the driver and properties QEMU reports) and the missing memory
   as one ``pc-dimm`` (``object-add`` of a RAM backend, ``device_add``);
2. waits until the guest's ACPI handler has processed every added device, as QEMU
   sees it (``query-acpi-ospm-status``: the guest's ``_OST`` answer). The guest kernel
   onlines a hot-added DIMM itself, before that answer (``memhp_default_state=online``).
   This wait asks nothing of the guest agent: a guest that zeroes the new memory
   (``init_on_free=1``, as snapshot templates boot) is busy in the kernel for seconds
   under TCG and its agent cannot answer meanwhile;
3. asks the agent to online what is still offline (hot-added vCPUs always are) and
   polls its report until the guest's own view shows the vCPUs online and MemTotal
   grown by the memory added.

Everything is bounded by ``timeout``. DIMMs and not virtio-mem: same speed, RSS and
snapshot size here, but a DIMM needs no guest driver (ACPI memory hot-plug is built into
the kernel; virtio-mem needs ``virtio_mem.ko``), and QEMU reports when the guest has
processed it, which virtio-mem does not. The price: memory grows in 128 MiB steps
(:data:`vmcache.config.MEMORY_HOTPLUG_STEP_MIB`; a request is rounded up) and at most
:data:`vmcache.qemu_argv.MEMORY_SLOTS` times per VM.

One grow at a time per VM. Nothing is ever unplugged: VMs only grow.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from .agent_client import AgentConnection, GuestResources
from .backoff import Backoff
from .config import MEMORY_HOTPLUG_STEP_MIB, VMSpec
from .errors import QMPError, ResizeError, SizeLimitError, VMGoneError
from .lifecycle import USABLE
from .qemu import VM
from .qemu_argv import MEMORY_SLOTS
from .qmp import QMPClient

log = logging.getLogger("vmcache.hotplug")

#: The _OST source event the guest answers a hot-add with (ACPI "device check").
_OST_DEVICE_CHECK = 1
#: _OST status codes: done, and "insertion in progress" (not done yet).
_OST_SUCCESS = 0
_OST_IN_PROGRESS = 0x80
#: MemTotal may fall short of the memory added by this much (1/32): a kernel that keeps the
#: new memory's struct pages on that memory (memory_hotplug.memmap_on_memory) loses 1/64.
#: Measured here: MemTotal grows by exactly the DIMM's size.
_MEMTOTAL_SLACK = 32


def target_size(spec: VMSpec, vcpus: int, memory_mib: int, *,
                current: tuple[int, int] | None = None) -> tuple[int, int]:
    """The size (vCPUs, MiB) a VM made from ``spec``, now of size ``current`` (default: the
    spec's), would have after growing to ``vcpus`` and ``memory_mib``: memory is rounded up
    to whole hot-add steps above the current memory (256 MiB asked 1000 gets 1024).

    Raises :class:`SizeLimitError`, naming the limit, for less than the current size or
    more than the maxima. Pure: a daemon can check a request before picking a VM.
    """
    current_vcpus, current_memory = current if current is not None else (spec.vcpus, spec.memory_mib)
    if vcpus < current_vcpus:
        raise SizeLimitError(f"cannot shrink a VM: it has {current_vcpus} vCPUs, {vcpus} asked")
    if memory_mib < current_memory:
        raise SizeLimitError(f"cannot shrink a VM: it has {current_memory} MiB of memory, "
                             f"{memory_mib} MiB asked")
    if vcpus > spec.max_vcpus:
        raise SizeLimitError(f"{vcpus} vCPUs asked, more than the maximum of {spec.max_vcpus} "
                             "(hypervisor.qemu.default_maxvcpus)")
    if memory_mib > spec.max_memory_mib:
        raise SizeLimitError(f"{memory_mib} MiB of memory asked, more than the maximum of "
                             f"{spec.max_memory_mib} MiB (hypervisor.qemu.default_maxmemory)")
    steps = -(-(memory_mib - current_memory) // MEMORY_HOTPLUG_STEP_MIB)
    rounded = current_memory + steps * MEMORY_HOTPLUG_STEP_MIB
    if rounded > spec.max_memory_mib:
        raise SizeLimitError(
            f"{memory_mib} MiB of memory asked: memory grows in {MEMORY_HOTPLUG_STEP_MIB} MiB steps "
            f"from {current_memory} MiB, and {rounded} MiB is more than the maximum of "
            f"{spec.max_memory_mib} MiB (hypervisor.qemu.default_maxmemory)")
    return vcpus, rounded


def _connections(vm: VM) -> tuple[QMPClient, AgentConnection]:
    if vm.life.phase not in USABLE or vm.qmp is None or vm.agent is None:
        raise VMGoneError(f"VM {vm.id} is {vm.life.phase}, not ready: it cannot grow")
    if not vm.alive:
        raise VMGoneError(f"VM {vm.id} is not running any more: it cannot grow")
    return vm.qmp, vm.agent


def _slot_order(cpu: dict[str, Any]) -> tuple[int, ...]:
    props = cpu.get("props", {})
    return tuple(int(props.get(key, 0)) for key in ("node-id", "socket-id", "die-id", "core-id",
                                                    "thread-id"))


async def _add_cpus(vm: VM, qmp: QMPClient, vcpus: int) -> list[str]:
    """Plug vCPUs in until QEMU has ``vcpus``; returns the new devices' ids."""
    slots = sorted(await qmp.execute("query-hotpluggable-cpus"), key=_slot_order)
    present = sum(1 for slot in slots if "qom-path" in slot)
    free = [slot for slot in slots if "qom-path" not in slot]
    missing = vcpus - present
    if missing <= 0:  # QEMU has them already (vm.vcpus lagged behind): nothing to plug
        vm.vcpus = max(vm.vcpus, present)
        return []
    if missing > len(free):
        raise SizeLimitError(f"VM {vm.id} has {present} vCPUs and {len(free)} free vCPU slots: "
                             f"it cannot have {vcpus}")
    added = []
    for slot in free[:missing]:
        props = slot.get("props", {})
        device_id = "vmcache-cpu-" + "-".join(str(props[key]) for key in sorted(props))
        try:
            await qmp.execute("device_add", {"driver": slot["type"], "id": device_id, **props})
        except QMPError as error:
            raise ResizeError(f"QEMU could not add a vCPU to VM {vm.id}: {error}") from None
        added.append(device_id)
        vm.vcpus += 1
    return added


async def _add_dimm(vm: VM, qmp: QMPClient, size_mib: int) -> str:
    """Plug one DIMM of ``size_mib`` in; returns its device id."""
    index = len(await qmp.execute("query-memory-devices"))
    if index >= MEMORY_SLOTS:
        raise ResizeError(f"VM {vm.id} has used all its {MEMORY_SLOTS} memory slots: it cannot grow "
                          "its memory again")
    backend, device_id = f"vmcache-mem{index}", f"vmcache-dimm{index}"
    try:
        await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": backend,
                                         "size": size_mib << 20})
        try:
            await qmp.execute("device_add", {"driver": "pc-dimm", "id": device_id, "memdev": backend})
        except QMPError:
            with trio.CancelScope(shield=True):
                await qmp.execute("object-del", {"id": backend})
            raise
    except QMPError as error:
        raise ResizeError(f"QEMU could not add {size_mib} MiB of memory to VM {vm.id}: {error}") from None
    vm.memory_mib += size_mib
    return device_id


def _pending(statuses: list[dict[str, Any]], device_ids: list[str]) -> list[str]:
    """The devices the guest has not answered yet; a failed answer raises."""
    by_device = {status.get("device"): status for status in statuses}
    pending = []
    for device_id in device_ids:
        status = by_device.get(device_id)
        if status is None or status.get("source") != _OST_DEVICE_CHECK \
                or status.get("status") == _OST_IN_PROGRESS:
            pending.append(device_id)
        elif status.get("status") != _OST_SUCCESS:
            raise ResizeError(f"the guest could not take the hot-added {device_id}: its ACPI handler "
                              f"answered status {status.get('status'):#x} (see its console log)")
    return pending


async def grow(vm: VM, vcpus: int, memory_mib: int, *, timeout: float) -> GuestResources:
    """Grow ``vm`` to ``vcpus`` and ``memory_mib`` (rounded up to 128 MiB steps, see
    :func:`target_size`); return the guest's own view once it shows them.

    The guest must show the vCPUs online and MemTotal grown by the memory added, all within
    ``timeout`` seconds, else :class:`ResizeError` says what did not come up. Asking for
    the current size is a no-op (one agent call, for the guest's view). Asking for less than
    the current size or more than the maxima raises :class:`SizeLimitError` and changes
    nothing. ``vm.vcpus`` and ``vm.memory_mib`` (and so ``vm.handle()``) follow what QEMU
    has once each device is plugged in.
    """
    target_vcpus, target_memory = target_size(vm.spec, vcpus, memory_mib,
                                              current=(vm.vcpus, vm.memory_mib))
    qmp, agent = _connections(vm)
    if (target_vcpus, target_memory) == (vm.vcpus, vm.memory_mib):
        return await agent.online_resources()
    started = time.monotonic()
    added_mib = target_memory - vm.memory_mib
    seen: GuestResources | None = None
    pending: list[str] = []
    expected_kib = 0
    with trio.move_on_after(timeout):
        before = await agent.online_resources()
        expected_kib = before.mem_total_kib + (added_mib << 10) - (added_mib << 10) // _MEMTOTAL_SLACK
        devices = await _add_cpus(vm, qmp, target_vcpus)
        if added_mib:
            devices.append(await _add_dimm(vm, qmp, added_mib))
        backoff = Backoff(0.005, 0.1)
        while pending := _pending(await qmp.execute("query-acpi-ospm-status"), devices):
            await backoff.sleep()
        backoff = Backoff(0.01, 0.2)
        while True:
            seen = await agent.online_resources()
            if seen.online_cpus >= target_vcpus and seen.mem_total_kib >= expected_kib:
                log.info("VM %s grown to %d vCPUs and %d MiB in %.2f s (the guest sees %d CPUs, "
                         "MemTotal %d MiB)", vm.id, vm.vcpus, vm.memory_mib, time.monotonic() - started,
                         seen.online_cpus, seen.mem_total_kib >> 10)
                return seen
            await backoff.sleep()
    raise ResizeError(f"VM {vm.id} did not grow to {target_vcpus} vCPUs and {target_memory} MiB "
                      f"within {timeout:g} s: {_shortfall(pending, seen, target_vcpus, expected_kib)}")


def _shortfall(pending: list[str], seen: GuestResources | None, vcpus: int, expected_kib: int) -> str:
    if pending:
        return (f"the guest did not answer the hot-add of {', '.join(pending)} (ACPI _OST; does its "
                "kernel have ACPI_HOTPLUG_CPU and ACPI_HOTPLUG_MEMORY?)")
    if seen is None:
        return "QEMU or the guest agent did not answer"
    missing = []
    if seen.online_cpus < vcpus:
        missing.append(f"{seen.online_cpus} of {vcpus} vCPUs online")
    if seen.mem_total_kib < expected_kib:
        missing.append(f"MemTotal {seen.mem_total_kib >> 10} MiB, not yet {expected_kib >> 10} MiB")
    return "the guest shows " + " and ".join(missing)
