"""The default guest image: a kernel plus an initramfs that vmcache writes itself.

The initramfs carries a static busybox, the virtio modules the guest needs (in
dependency order), an ``/init`` and the guest agent (``vmcache/guest/``). It
is written as a cpio "newc" archive in pure Python, deterministically (every
mtime is zero), so that building twice from the same inputs gives the same
bytes and a rebuild can say "nothing changed".

Where the kernel comes from, in order:

1. ``--kernel PATH`` (its modules from ``--modules DIR`` or
   ``/lib/modules/<version>``, if the guest needs any);
2. the host's own ``/boot/vmlinuz-$(uname -r)`` with ``/lib/modules/$(uname -r)``;
3. Debian's ``linux-image-cloud-amd64`` package, fetched with
   ``apt-get download`` and unpacked with ``dpkg-deb -x`` (not installed),
   kept under ``<data>/kernel-package`` so that later builds reuse it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import ImageError
from .paths import default_data_dir

#: Modules the guest needs, in an order that satisfies their dependencies.
#: Missing ones are fine when the kernel has them built in.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_rng",
)

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initramfs.cpio.gz"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
DEBIAN_KERNEL_PACKAGE = "linux-image-cloud-amd64"

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


# --------------------------------------------------------------------------
# cpio "newc" writer (pure)
# --------------------------------------------------------------------------

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000


@dataclass(frozen=True)
class CpioEntry:
    """One member of a cpio archive. ``data`` is file content or a link target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str, perms: int = 0o755) -> CpioEntry:
    return CpioEntry(name, S_IFDIR | perms)


def regular_file(name: str, data: bytes, perms: int = 0o644) -> CpioEntry:
    return CpioEntry(name, S_IFREG | perms, data)


def symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perms: int = 0o600) -> CpioEntry:
    return CpioEntry(name, S_IFCHR | perms, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Return a cpio newc archive of ``entries``, owned by root, every mtime zero."""
    out = io.BytesIO()
    trailer = CpioEntry("TRAILER!!!", 0)
    for inode, entry in enumerate([*entries, trailer], start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if entry.mode & S_IFDIR == S_IFDIR and entry is not trailer else 1
        fields = (
            inode if entry is not trailer else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            nlink if entry is not trailer else 1,
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        out.write(header + name + _pad4(len(header) + len(name)))
        out.write(entry.data + _pad4(len(entry.data)))
    return out.getvalue()


def gzip_deterministic(data: bytes) -> bytes:
    """gzip with no file name and mtime zero, so equal input gives equal output."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=6) as stream:
        stream.write(data)
    return buffer.getvalue()


# --------------------------------------------------------------------------
# kernel modules and ELF (pure)
# --------------------------------------------------------------------------


def module_name(path: Path | str) -> str:
    """``.../virtio-rng.ko.xz`` -> ``virtio_rng`` (the kernel treats - and _ alike)."""
    name = Path(path).name
    return name.split(".ko", 1)[0].replace("-", "_")


def module_depends(module: bytes) -> list[str]:
    """The ``depends=`` list in a module's .modinfo section."""
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


def read_module(path: Path) -> bytes:
    """A module file's bytes, decompressed if it is .ko.xz or .ko.gz."""
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
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def elf_is_static(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF with no program interpreter."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    for index in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + index * phentsize)
        if p_type == pt_interp:
            return False
    return True


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


# --------------------------------------------------------------------------
# vmcache-reseed: a tiny static helper, written here as machine code
# --------------------------------------------------------------------------

#: x86-64 code of ``vmcache-reseed``: open("/dev/urandom", O_RDWR), then
#: ioctl(fd, RNDRESEEDCRNG), then exit with 0 or the errno. Busybox cannot
#: issue an ioctl, and without this a guest restored from a snapshot keeps
#: the template's CRNG state until the kernel's own reseed interval passes,
#: however much fresh entropy the host writes into its pool.
RESEED_CODE = bytes.fromhex(
    "b802000000"      # mov eax, 2 (open)
    "488d3d26000000"  # lea rdi, [rip+0x26] -> path
    "be02000000"      # mov esi, 2 (O_RDWR)
    "0f05"            # syscall
    "85c0"            # test eax, eax
    "7810"            # js fail
    "89c7"            # mov edi, eax (fd)
    "b810000000"      # mov eax, 16 (ioctl)
    "be07520000"      # mov esi, 0x5207 (RNDRESEEDCRNG = _IO('R', 7))
    "31d2"            # xor edx, edx
    "0f05"            # syscall
    "89c7"            # fail: mov edi, eax
    "f7df"            # neg edi (-errno -> errno; 0 stays 0)
    "b83c000000"      # mov eax, 60 (exit)
    "0f05"            # syscall
) + b"/dev/urandom\0"


def static_elf(code: bytes, base: int = 0x400000) -> bytes:
    """A minimal static x86-64 ELF executable that runs ``code`` (one RX segment)."""
    header_size, phdr_size = 64, 56
    entry = base + header_size + phdr_size
    size = header_size + phdr_size + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, header_size, 0, 0,
                                 header_size, phdr_size, 1, 0, 0, 0)
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return header + program + code


# --------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------


@dataclass
class KernelSource:
    """A kernel image and the directory of its modules (None: use none)."""

    kernel: Path
    modules_dir: Path | None
    origin: str


@dataclass
class BuildResult:
    """What ``build_image`` did: where the image is and whether it changed."""

    image_dir: Path
    manifest: dict[str, object]
    changed: bool
    notes: list[str] = field(default_factory=list)


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{what}: {' '.join(argv)} took longer than 600 s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{what} failed: {last}")
    return done.stdout


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
            _run(["apt-get", "download", DEBIAN_KERNEL_PACKAGE], fetch, workdir)
            meta = next(workdir.glob("*.deb"))
            depends = _run(["dpkg-deb", "-f", str(meta), "Depends"], "dpkg-deb -f")
            image_package = next(
                (part.strip().split(" ")[0] for part in depends.split(",")
                 if part.strip().startswith("linux-image-")),
                None,
            )
            if image_package is None:
                raise ImageError(f"{DEBIAN_KERNEL_PACKAGE} names no linux-image package")
            progress(f"fetching {image_package}")
            _run(["apt-get", "download", image_package], fetch, workdir)
            package = next(workdir.glob(f"{image_package}_*.deb"))
            data_dir.mkdir(parents=True, exist_ok=True)
            staging = data_dir / "kernel-package.partial"
            shutil.rmtree(staging, ignore_errors=True)
            progress(f"unpacking {package.name}")
            _run(["dpkg-deb", "-x", str(package), str(staging)], "dpkg-deb -x")
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


def _collect_modules(modules_dir: Path | None) -> list[tuple[str, bytes]]:
    """The guest's modules from ``modules_dir``, in load order, as (file name, bytes)."""
    if modules_dir is None or not modules_dir.is_dir():
        return []
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.is_file()
        else set()
    )
    available: dict[str, Path] = {}
    for root, _dirs, files in os.walk(modules_dir / "kernel"):
        for file_name in files:
            if ".ko" in file_name:
                available.setdefault(module_name(file_name), Path(root) / file_name)
    contents: dict[str, bytes] = {}
    depends: dict[str, list[str]] = {}
    pending = [name for name in GUEST_MODULES if name not in builtin]
    while pending:
        name = pending.pop()
        if name in contents or name not in available:
            continue
        contents[name] = read_module(available[name])
        depends[name] = [dep for dep in module_depends(contents[name]) if dep not in builtin]
        pending.extend(depends[name])
    return [(f"{name}.ko", contents[name]) for name in module_load_order(GUEST_MODULES, depends)]


def _guest_file(name: str) -> bytes:
    return resources.files("vmcache").joinpath("guest", name).read_bytes()


def _find_busybox() -> tuple[Path, bytes]:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and os.path.isfile(candidate):
            data = Path(candidate).read_bytes()
            if elf_is_static(data):
                return Path(candidate), data
    raise ImageError("no static busybox: apt-get install busybox-static")


def _busybox_applets(busybox: Path) -> list[str]:
    listing = _run([str(busybox), "--list"], "busybox --list")
    return sorted({name for name in listing.split() if name and "/" not in name})


def initramfs_entries(
    busybox: bytes, applets: Iterable[str], modules: list[tuple[str, bytes]]
) -> list[CpioEntry]:
    """The members of the guest's initramfs (pure: everything comes in as bytes)."""
    entries = [directory(name) for name in (
        "bin", "dev", "etc", "etc/vmcache", "lib", "lib/modules", "proc", "root",
        "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin",
    )]
    entries.append(char_device("dev/console", 5, 1))
    entries.append(regular_file("init", _guest_file("init"), 0o755))
    entries.append(regular_file("bin/busybox", busybox, 0o755))
    entries.append(regular_file("bin/vmcache-agent", _guest_file("vmcache-agent"), 0o755))
    entries.append(regular_file("bin/vmcache-reseed", static_elf(RESEED_CODE), 0o755))
    entries.extend(
        symlink(f"bin/{applet}", "busybox") for applet in applets if applet != "busybox"
    )
    entries.extend(regular_file(f"lib/modules/{name}", data) for name, data in modules)
    load_list = "".join(f"{name}\n" for name, _ in modules).encode()
    entries.append(regular_file("etc/vmcache/modules", load_list))
    return entries


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(image_dir: Path) -> dict[str, object] | None:
    """The manifest of the image in ``image_dir``, or None if there is none."""
    try:
        loaded = json.loads((image_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def build_image(
    output: Path | None = None,
    kernel: Path | None = None,
    modules: Path | None = None,
    progress: Progress = _quiet,
) -> BuildResult:
    """Build the guest image into ``output`` (default ``<data>/image``).

    Does nothing, and says so in ``BuildResult.changed``, when the kernel and
    the initramfs it would write are the ones already there.
    """
    data_dir = default_data_dir()
    image_dir = output if output is not None else data_dir / "image"
    source = find_kernel(kernel, modules, data_dir, progress)
    progress(f"kernel: {source.kernel} ({source.origin})")
    kernel_bytes = source.kernel.read_bytes()
    version = kernel_version(kernel_bytes) or source.kernel.name.removeprefix("vmlinuz-")
    guest_modules = _collect_modules(source.modules_dir)
    progress(f"modules: {', '.join(name for name, _ in guest_modules) or 'none (built in)'}")
    busybox_path, busybox = _find_busybox()
    initrd = gzip_deterministic(
        write_cpio(initramfs_entries(busybox, _busybox_applets(busybox_path), guest_modules))
    )
    manifest: dict[str, object] = {
        "format": MANIFEST_FORMAT,
        "kernel_version": version,
        "kernel_origin": source.origin,
        "kernel_sha256": _sha256(kernel_bytes),
        "initrd_sha256": _sha256(initrd),
        "modules": [name for name, _ in guest_modules],
    }
    previous = read_manifest(image_dir)
    on_disk_ok = all(
        (image_dir / name).is_file() for name in (KERNEL_FILE, INITRD_FILE)
    ) and previous == manifest
    if on_disk_ok and _sha256((image_dir / INITRD_FILE).read_bytes()) == manifest["initrd_sha256"]:
        return BuildResult(image_dir, manifest, changed=False)
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
        for name, content in ((KERNEL_FILE, kernel_bytes), (INITRD_FILE, initrd)):
            partial = image_dir / f".{name}.partial"
            partial.write_bytes(content)
            partial.replace(image_dir / name)
        (image_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as error:
        raise ImageError(f"cannot write the image to {image_dir}: {error.strerror}") from None
    return BuildResult(image_dir, manifest, changed=True)


def image_id(manifest: Mapping[str, object]) -> str:
    """A short name for an image: kernel version and the initramfs hash prefix."""
    return f"{manifest.get('kernel_version', '?')}+{str(manifest.get('initrd_sha256', ''))[:12]}"
