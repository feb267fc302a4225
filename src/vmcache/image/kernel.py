"""The guest kernel and the modules its initramfs must load, in load order.

Where the kernel comes from, in order:

1. ``--kernel PATH`` (its modules from ``--modules DIR`` or
   ``/lib/modules/<version>``, if the guest needs any);
2. the host's own ``/boot/vmlinuz-$(uname -r)`` with ``/lib/modules/$(uname -r)``;
3. Debian's ``linux-image-cloud-amd64`` package, fetched with
   ``apt-get download`` and unpacked with ``dpkg-deb -x`` (not installed),
   kept under ``<data>/kernel-package`` so that later builds reuse it.

Which modules, and in what order: the kernel's own ``modules.dep`` says what
each module needs. Debian's kernel package ships none (``depmod`` runs when a
package is installed, and we only unpack it), so we run ``depmod -b`` on a
scratch tree of symlinks to the package's modules: the package (or the host's
``/lib/modules``) is never written to. Only when ``depmod`` (package kmod) is
missing do we fall back to reading each ``.ko``'s ``depends=`` field.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from .tools import Progress, run_tool

DEBIAN_KERNEL_PACKAGE = "linux-image-cloud-amd64"

#: Modules the guest cannot do without: the virtio transport, the agent's port
#: (virtio-serial), the root image's disk (virtio-blk) and overlayfs. Each must be
#: built in or present.
REQUIRED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "overlay",
)

#: Modules loaded when the kernel has them: host entropy (virtio-rng), memory
#: hot-plug (virtio-mem, for a later issue) and the NIC of a VM that may be granted
#: network (virtio-net; its dependencies net_failover and failover come from modules.dep).
OPTIONAL_MODULES = ("virtio_rng", "virtio_mem", "virtio_net")


@dataclass(frozen=True)
class KernelSource:
    """A kernel image and the directory of its modules (None: use none)."""

    kernel: Path
    modules_dir: Path | None
    origin: str


@dataclass(frozen=True)
class GuestModules:
    """The modules an initramfs carries, in load order, and how their order was found."""

    modules: list[tuple[str, bytes]]  # (file name, content), dependencies first
    method: str  # "modules.dep", "depmod", "modinfo scan" or "none"

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]


# --------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------


def module_name(path: Path | str) -> str:
    """``.../virtio-rng.ko.xz`` -> ``virtio_rng`` (the kernel treats - and _ alike)."""
    name = Path(path).name
    return name.split(".ko", 1)[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """``modules.dep`` -> {module: (relative path, [modules it depends on])}.

    Each line is ``path: dependency-path ...``; the list is already transitive.
    """
    parsed: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        path, colon, rest = line.partition(":")
        if not colon or not path.strip():
            continue
        parsed[module_name(path.strip())] = (path.strip(), [module_name(dep) for dep in rest.split()])
    return parsed


def module_depends(module: bytes) -> list[str]:
    """The ``depends=`` list in a module's .modinfo section (the fallback without depmod)."""
    marker = b"\0depends="
    start = module.find(marker)
    if start < 0:
        return []
    start += len(marker)
    end = module.find(b"\0", start)
    value = module[start:end].decode("ascii", "replace")
    return [name.replace("-", "_") for name in value.split(",") if name]


def module_load_order(wanted: Iterable[str], depends: Mapping[str, list[str]]) -> list[str]:
    """Every module in ``wanted`` plus what it depends on, dependencies first.

    ``depends`` maps each available module to its dependencies. A wanted module
    that is not available is skipped (it is built into the kernel, or absent).
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name not in depends:
            return
        if name in visiting:
            raise ImageError(f"kernel modules depend on each other in a cycle at {name}")
        visiting.add(name)
        for dependency in depends[name]:
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def kernel_version(bzimage: bytes) -> str:
    """The version string a bzImage carries in its setup header ("" if none)."""
    if len(bzimage) < 0x210 or bzimage[0x202:0x206] != b"HdrS":
        return ""
    offset, = struct.unpack_from("<H", bzimage, 0x20E)
    start = offset + 0x200
    end = bzimage.find(b"\0", start, start + 256)
    if end < 0:
        return ""
    return bzimage[start:end].decode("ascii", "replace").split(" ", 1)[0]


def read_module(path: Path) -> bytes:
    """A module file's bytes, decompressed if it is .ko.xz, .ko.gz or .ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageError(
                f"{path} is zstd-compressed: install zstd (apt-get install zstd) "
                "or pass --kernel with a kernel whose modules are not"
            )
        try:
            return subprocess.run([zstd, "-dcq", str(path)], check=True, capture_output=True,
                                  timeout=60).stdout
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            raise ImageError(f"cannot decompress {path} with zstd") from None
    return data


# --------------------------------------------------------------------------
# finding the kernel
# --------------------------------------------------------------------------


def _fetch_debian_kernel(data_dir: Path, progress: Progress) -> KernelSource:
    unpacked = data_dir / "kernel-package"
    kernels = sorted((unpacked / "boot").glob("vmlinuz-*")) if unpacked.is_dir() else []
    if not kernels:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise ImageError(
                "no kernel: /boot has no readable kernel for this host and apt-get/dpkg-deb "
                "are missing to fetch Debian's; pass --kernel PATH"
            )
        with tempfile.TemporaryDirectory(prefix="vmcache-kernel-") as scratch:
            workdir = Path(scratch)
            os.chmod(workdir, 0o755)  # apt's sandbox user must be able to write here
            progress(f"fetching Debian's {DEBIAN_KERNEL_PACKAGE} with apt-get download")
            fetch = f"fetching {DEBIAN_KERNEL_PACKAGE} (is the package registry reachable? " \
                "`apt-get update` first, or pass --kernel PATH)"
            run_tool(["apt-get", "download", DEBIAN_KERNEL_PACKAGE], fetch, workdir)
            meta = next(workdir.glob("*.deb"))
            depends = run_tool(["dpkg-deb", "-f", str(meta), "Depends"], "dpkg-deb -f")
            image_package = next(
                (part.strip().split(" ")[0] for part in depends.split(",")
                 if part.strip().startswith("linux-image-")),
                None,
            )
            if image_package is None:
                raise ImageError(f"{DEBIAN_KERNEL_PACKAGE} names no linux-image package")
            progress(f"fetching {image_package}")
            run_tool(["apt-get", "download", image_package], fetch, workdir)
            package = next(workdir.glob(f"{image_package}_*.deb"))
            data_dir.mkdir(parents=True, exist_ok=True)
            staging = data_dir / "kernel-package.partial"
            shutil.rmtree(staging, ignore_errors=True)
            progress(f"unpacking {package.name}")
            run_tool(["dpkg-deb", "-x", str(package), str(staging)], "dpkg-deb -x")
            shutil.rmtree(unpacked, ignore_errors=True)
            staging.rename(unpacked)
        kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageError(f"{image_package} has no /boot/vmlinuz-*")
    kernel = kernels[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    return KernelSource(kernel, unpacked / "lib" / "modules" / version, "debian-package")


def find_kernel(
    kernel: Path | None, modules: Path | None, data_dir: Path, progress: Progress
) -> KernelSource:
    """Choose the kernel by the order in this module's docstring."""
    if kernel is not None:
        if not kernel.is_file():
            raise ImageError(f"kernel not found: {kernel}")
        if modules is None:
            version = kernel_version(kernel.read_bytes())
            candidate = Path("/lib/modules") / version
            modules = candidate if version and candidate.is_dir() else None
        return KernelSource(kernel, modules, "explicit")
    release = os.uname().release
    host_kernel = Path("/boot") / f"vmlinuz-{release}"
    host_modules = Path("/lib/modules") / release
    if os.access(host_kernel, os.R_OK) and host_modules.is_dir():
        return KernelSource(host_kernel, host_modules, "host")
    return _fetch_debian_kernel(data_dir, progress)


# --------------------------------------------------------------------------
# modules and their order
# --------------------------------------------------------------------------


def find_depmod() -> str | None:
    """depmod's path (package kmod; often in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("depmod") or next(
        (p for p in ("/usr/sbin/depmod", "/sbin/depmod") if os.access(p, os.X_OK)), None)


def _depmod_in_scratch(modules_dir: Path) -> str:
    """Run ``depmod -b`` on a scratch tree of symlinks to ``modules_dir``; its modules.dep."""
    depmod = find_depmod()
    if depmod is None:
        raise FileNotFoundError("depmod")
    version = modules_dir.name
    with tempfile.TemporaryDirectory(prefix="vmcache-depmod-") as scratch:
        tree = Path(scratch) / "lib" / "modules" / version
        source = modules_dir.resolve()
        for root, _dirs, files in os.walk(source):
            relative = Path(root).relative_to(source)
            (tree / relative).mkdir(parents=True, exist_ok=True)
            for file_name in files:
                if ".ko" in file_name or file_name in ("modules.order", "modules.builtin",
                                                       "modules.builtin.modinfo"):
                    os.symlink(Path(root) / file_name, tree / relative / file_name)
        run_tool([depmod, "-b", scratch, version], f"depmod for {modules_dir}", timeout=120)
        return (tree / "modules.dep").read_text()


def _scan_depends(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """The fallback without depmod: each module's ``depends=`` from its own bytes."""
    parsed: dict[str, tuple[str, list[str]]] = {}
    for root, _dirs, files in os.walk(modules_dir / "kernel"):
        for file_name in files:
            if ".ko" in file_name:
                path = Path(root) / file_name
                relative = str(path.relative_to(modules_dir))
                parsed.setdefault(module_name(file_name), (relative, []))
    return parsed


def _builtin(modules_dir: Path) -> set[str] | None:
    builtin_file = modules_dir / "modules.builtin"
    if not builtin_file.is_file():
        return None
    return {module_name(line) for line in builtin_file.read_text().split()}


def collect_modules(modules_dir: Path | None, extra: Iterable[str] = (),
                    extra_optional: Iterable[str] = (),
                    progress: Progress | None = None) -> GuestModules:
    """The guest's modules from ``modules_dir``, in load order.

    ``extra`` names modules needed besides :data:`REQUIRED_MODULES` (the root
    image's file system), ``extra_optional`` ones loaded if the kernel has them.
    A required one that is neither built in nor present is an ImageError;
    without ``modules_dir`` everything is assumed built in.
    """
    required = [*REQUIRED_MODULES, *extra]
    optional = [*OPTIONAL_MODULES, *extra_optional]
    if modules_dir is None or not modules_dir.is_dir():
        return GuestModules([], "none")
    builtin = _builtin(modules_dir) or set()
    dep_file = modules_dir / "modules.dep"
    method = "modules.dep"
    scanned = False
    if dep_file.is_file() and dep_file.stat().st_size > 0:
        table = parse_modules_dep(dep_file.read_text())
    else:
        try:
            table = parse_modules_dep(_depmod_in_scratch(modules_dir))
            method = "depmod"
        except FileNotFoundError:
            if progress is not None:
                progress("depmod not found (apt-get install kmod): reading each module's "
                         "depends= instead")
            table = _scan_depends(modules_dir)
            method = "modinfo scan"
            scanned = True
    missing = [name for name in required if name not in table and name not in builtin]
    if missing:
        raise ImageError(
            f"the kernel's modules in {modules_dir} lack {', '.join(missing)} (neither built "
            "in nor a module): vmcache's guest needs them; use another kernel (--kernel)"
        )
    wanted = [name for name in (*required, *optional) if name not in builtin]
    contents: dict[str, bytes] = {}
    depends: dict[str, list[str]] = {}
    pending = [name for name in wanted if name in table]
    while pending:
        name = pending.pop()
        if name in contents:
            continue
        contents[name] = read_module(modules_dir / table[name][0])
        found = module_depends(contents[name]) if scanned else table[name][1]
        depends[name] = [dep for dep in found if dep not in builtin]
        pending.extend(dep for dep in depends[name] if dep in table)
    order = module_load_order(wanted, depends)
    return GuestModules([(f"{name}.ko", contents[name]) for name in order], method)
