"""The QEMU command line of one VM (pure: tested without QEMU)."""

from __future__ import annotations

from pathlib import Path

from .config import VMSpec
from .console import console_args
from .guest_api import CONTROL_PORT, CONTROL_SOCKET, USER_PORTS, user_port_name, user_socket
from .vm_nic import qemu_nic_args

BASE_KERNEL_PARAMS = "console=ttyS0 panic=-1 quiet"
#: The root image is the VM's only virtio-blk disk, so the guest sees it as /dev/vda.
ROOT_DEVICE_PARAM = "vmcache.root=/dev/vda"


def _escape(value: str) -> str:
    """Escape a value for a QEMU ``-chardev``/``-device`` option list (comma doubled)."""
    return value.replace(",", ",,")


def _image_name(path: Path) -> str:
    """The root image's name for the guest's messages: one kernel command line word."""
    return "".join(char if char.isprintable() and not char.isspace() else "_" for char in path.name)


def _port_args(chardev: str, path: Path, name: str) -> list[str]:
    """A virtio-serial port named ``name`` in the guest, a Unix socket at ``path`` on the host."""
    return ["-chardev", f"socket,id={chardev},path={_escape(str(path))},server=on,wait=off",
            "-device", f"virtserialport,chardev={chardev},name={name}"]


#: DIMM slots of a VM with memory headroom: each grow plugs one DIMM (Kata's default, 10).
MEMORY_SLOTS = 10
#: Kernel parameters of a VM with memory headroom (see vmcache.hotplug).
#: memhp_default_state=online: the guest kernel onlines a hot-added DIMM itself, in its ACPI
#: handler, before it reports the DIMM done (_OST): in ZONE_NORMAL, usable by the kernel too
#: (online_movable would leave the kernel only the boot memory for its own allocations,
#: the hot-added memory's struct pages included; VMs here never shrink, so movability buys
#: nothing). swiotlb=noforce: a guest whose memory may reach above 4 GiB otherwise reserves a
#: 64 MiB bounce buffer for 32-bit DMA (see the README, "Measured choices in the code"); its
#: only devices are virtio, which do not use it.
MEMORY_HOTPLUG_PARAMS = "memhp_default_state=online swiotlb=noforce"
#: The option ROM that ``-kernel`` adds (q35 has fw_cfg DMA): a restored VM, which loads no
#: kernel, names it itself so that its RAM blocks are the template's.
LINUX_BOOT_ROM = "linuxboot_dma.bin"
#: The id of the guest RAM's backend object when it lives in a file (VMSpec.memory_fd).
MEMORY_BACKEND_ID = "vmcache-ram"


def size_args(spec: VMSpec) -> list[str]:
    """``-m`` and ``-smp`` with the spec's headroom (identical for a template and its restores)."""
    memory = str(spec.memory_mib)
    if spec.max_memory_mib > spec.memory_mib:
        memory += f",slots={MEMORY_SLOTS},maxmem={spec.max_memory_mib}M"
    cpus = str(spec.vcpus)
    if spec.max_vcpus > spec.vcpus:
        cpus += f",maxcpus={spec.max_vcpus}"
    return ["-m", memory, "-smp", cpus]


def qemu_argv(spec: VMSpec, run_dir: Path, accel: str, name: str, *,
              tap_fd: int | None = None) -> list[str]:
    """The QEMU command line for one VM (pure: tested without QEMU); a VM with a NIC
    (``spec.nic``) needs the descriptor of its tap, ``tap_fd`` (vmcache.vm_nic)."""
    if spec.nic and tap_fd is None:
        raise ValueError("a VM with a NIC needs the descriptor of its tap")
    hotplug_params = MEMORY_HOTPLUG_PARAMS if spec.max_memory_mib > spec.memory_mib else ""
    root_params = ""
    root_drive: list[str] = []
    if spec.rootfs is not None:
        # The root image: read-only, so every VM shares it through the host's page cache.
        root_params = f"{ROOT_DEVICE_PARAM} vmcache.image={_image_name(spec.rootfs)}"
        root_drive = [
            "-drive", f"file={_escape(str(spec.rootfs))},if=none,id=rootfs,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=rootfs",
        ]
    params = " ".join(part for part in (BASE_KERNEL_PARAMS, root_params, hotplug_params,
                                        spec.kernel_params) if part)
    accel_option = "kvm" if accel == "kvm" else "tcg"
    if accel_option == "tcg" and spec.tb_size_mib:
        accel_option += f",tb-size={spec.tb_size_mib}"
    sandbox = ["-sandbox", spec.sandbox] if spec.sandbox else []
    machine = spec.machine_type
    memory_backend: list[str] = []
    if spec.memory_fd is not None:
        machine += f",memory-backend={MEMORY_BACKEND_ID}"
        share = "on" if spec.memory_file_shared else "off"
        memory_backend = ["-object", f"memory-backend-file,id={MEMORY_BACKEND_ID},size={spec.memory_mib}M,"
                          f"mem-path=/proc/self/fd/{spec.memory_fd},share={share}"]
    if spec.restored:
        boot = ["-option-rom", LINUX_BOOT_ROM]
    else:
        boot = ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", params]
    return [
        str(spec.qemu),
        "-name", name,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", machine,
        "-accel", accel_option,
        "-cpu", "host" if accel == "kvm" else "max",
        *size_args(spec),
        *boot,
        "-no-reboot",
        *console_args(run_dir),
        "-chardev", f"socket,id=qmp,path={_escape(str(run_dir / 'qmp.sock'))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-pci,id=vmcache-serial",
        *_port_args("control", run_dir / CONTROL_SOCKET, CONTROL_PORT),
        *(arg for index in range(USER_PORTS)
          for arg in _port_args(f"agent{index}", user_socket(run_dir, index), user_port_name(index))),
        "-device", "virtio-rng-pci",
        *root_drive,
        *(qemu_nic_args(tap_fd) if spec.nic and tap_fd is not None else ()),
        *memory_backend,
        *sandbox,
    ]
