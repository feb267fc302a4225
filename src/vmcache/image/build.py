"""Building the default guest image: kernel, initramfs and root filesystem image.

``<data>/image`` holds:

- ``vmlinuz``: the kernel (see :mod:`.kernel` for where it comes from);
- ``initramfs.cpio.gz``: a static busybox, the modules the guest loads (in
  dependency order), ``/init`` (``vmcache/in_guest/init``) and the agent's files
  under ``/vmcache/agent/``. The agent travels here, not in the root image, so
  that any image with python3 >= 3.9 works and a new agent needs no new image;
- the root filesystem image (:mod:`.rootfs`), attached read-only to every VM;
- ``manifest.json``: what went in, with hashes.

"Nothing changed" is decided per part. The initramfs is cheap to make (about a
second), so it is made in memory every time and compared by hash: that covers
busybox, the modules, ``/init`` and the agent's files. The root image is slow
(mmdebstrap, half a minute or more), so it is keyed by its inputs instead
(suite, mirror, package list, pruning rules, file system options, the builder's
own version) and rebuilt only when the key or the file on disk changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import ImageError
from ..paths import default_data_dir
from .cpio import CpioEntry, char_device, directory, gzip_deterministic, regular_file, symlink, write_cpio
from .kernel import collect_modules, find_kernel, kernel_version
from .rootfs import (
    ROOTFS_FILE,
    ROOTFS_MODULES,
    ROOTFS_TYPE,
    RootfsInputs,
    build_rootfs,
    rootfs_up_to_date,
)
from .tools import Progress, quiet, run_tool

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initramfs.cpio.gz"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2

#: Where the agent's files live in the initramfs; /init copies them to the new root.
AGENT_DIR = "vmcache/agent"
#: E2B's envd and code interpreter, guest side: helpers the host runs through the agent.
#: /init copies them when present (its HELPER_FILES), so a user's own initrd may lack them.
HELPER_FILES = (
    ("e2b_fs.py", ("in_guest", "e2b_fs.py")),
    ("e2b_kernel.py", ("in_guest", "e2b_kernel.py")),
)
#: (file name in the initramfs, the vmcache package resource it comes from)
AGENT_FILES = (
    ("vmcache_agent.py", ("in_guest", "vmcache_agent.py")),
    ("agent_base.py", ("in_guest", "agent_base.py")),
    ("agent_process.py", ("in_guest", "agent_process.py")),
    ("agent_files.py", ("in_guest", "agent_files.py")),
    ("agent_tcp.py", ("in_guest", "agent_tcp.py")),
    ("agent_protocol.py", ("agent_protocol.py",)),
    *HELPER_FILES,
)


@dataclass
class BuildResult:
    """What ``build_image`` did: where the image is and whether it changed."""

    image_dir: Path
    manifest: dict[str, object]
    changed: bool
    notes: list[str] = field(default_factory=list)


def _package_file(*parts: str) -> bytes:
    return resources.files("vmcache").joinpath(*parts).read_bytes()


def agent_files() -> list[tuple[str, bytes]]:
    """The agent's files as the initramfs carries them: (name, content)."""
    return [(name, _package_file(*source)) for name, source in AGENT_FILES]


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


def _find_busybox() -> tuple[Path, bytes]:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and os.path.isfile(candidate):
            data = Path(candidate).read_bytes()
            if elf_is_static(data):
                return Path(candidate), data
    raise ImageError("no static busybox: apt-get install busybox-static")


def _busybox_applets(busybox: Path) -> list[str]:
    listing = run_tool([str(busybox), "--list"], "busybox --list", timeout=30)
    return sorted({name for name in listing.split() if name and "/" not in name})


def initramfs_entries(
    busybox: bytes,
    applets: Iterable[str],
    modules: Sequence[tuple[str, bytes]],
    agent: Sequence[tuple[str, bytes]],
    rootfs_type: str = ROOTFS_TYPE,
) -> list[CpioEntry]:
    """The members of the guest's initramfs (pure: everything comes in as bytes).

    busybox's applets live in ``/bin`` so that ``/usr/bin`` stays free: an
    initramfs that should run the agent itself carries ``/usr/bin/python3``.
    """
    entries = [directory(name) for name in (
        "bin", "dev", "etc", "etc/vmcache", "lib", "lib/modules", "proc", "root",
        "run", "sbin", "sys", "tmp", "vmcache", AGENT_DIR,
    )]
    entries.append(char_device("dev/console", 5, 1))
    entries.append(regular_file("init", _package_file("in_guest", "init"), 0o755))
    entries.append(regular_file("bin/busybox", busybox, 0o755))
    entries.extend(
        symlink(f"bin/{applet}", "busybox") for applet in applets if applet != "busybox"
    )
    entries.extend(regular_file(f"{AGENT_DIR}/{name}", data) for name, data in agent)
    entries.extend(regular_file(f"lib/modules/{name}", data) for name, data in modules)
    load_list = "".join(f"{name}\n" for name, _ in modules).encode()
    entries.append(regular_file("etc/vmcache/modules", load_list))
    entries.append(regular_file("etc/vmcache/rootfs-type", f"{rootfs_type}\n".encode()))
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


def image_id(manifest: Mapping[str, object]) -> str:
    """A short name for an image: kernel version, initramfs hash prefix, root image hash prefix."""
    name = f"{manifest.get('kernel_version', '?')}+{str(manifest.get('initrd_sha256', ''))[:12]}"
    rootfs = manifest.get("rootfs")
    if isinstance(rootfs, dict) and rootfs.get("sha256"):
        name += f"+{str(rootfs['sha256'])[:12]}"
    return name


def _write_atomically(path: Path, content: bytes) -> None:
    partial = path.parent / f".{path.name}.partial"
    partial.write_bytes(content)
    partial.replace(path)


def build_image(
    output: Path | None = None,
    kernel: Path | None = None,
    modules: Path | None = None,
    progress: Progress = quiet,
    *,
    packages: Sequence[str] = (),
    mirror: str = "",
    rootfs: bool = True,
    force: bool = False,
) -> BuildResult:
    """Build the guest image into ``output`` (default ``<data>/image``).

    ``packages`` are Debian packages added to the root image; ``mirror`` is the
    Debian mirror ("" = the host's, see :func:`.rootfs.debian_mirror`).
    ``rootfs=False`` makes the kernel and initramfs only (and drops a root image
    left from before). Does nothing, and says so in ``BuildResult.changed``,
    when nothing it would write differs from what is there; ``force`` rebuilds the
    root image anyway (to pick up package updates on the mirror).
    """
    data_dir = default_data_dir()
    image_dir = output if output is not None else data_dir / "image"
    previous = read_manifest(image_dir)
    source = find_kernel(kernel, modules, data_dir, progress)
    progress(f"kernel: {source.kernel} ({source.origin})")
    kernel_bytes = source.kernel.read_bytes()
    version = kernel_version(kernel_bytes) or source.kernel.name.removeprefix("vmlinuz-")
    guest_modules = collect_modules(
        source.modules_dir, extra=(ROOTFS_TYPE,),
        extra_optional=[name for name in ROOTFS_MODULES if name != ROOTFS_TYPE], progress=progress)
    progress(f"modules ({guest_modules.method}): "
             f"{', '.join(guest_modules.names) or 'none (built in)'}")
    busybox_path, busybox = _find_busybox()
    initrd = gzip_deterministic(write_cpio(initramfs_entries(
        busybox, _busybox_applets(busybox_path), guest_modules.modules, agent_files())))
    manifest: dict[str, object] = {
        "format": MANIFEST_FORMAT,
        "kernel_version": version,
        "kernel_origin": source.origin,
        "kernel_sha256": _sha256(kernel_bytes),
        "initrd_sha256": _sha256(initrd),
        "modules": guest_modules.names,
        "module_order_from": guest_modules.method,
        "rootfs": None,
    }
    changed = False
    # The root image first: it is the slow part and the likeliest to fail, and until
    # the manifest is written last, a half-done build is redone next time.
    rootfs_path = image_dir / ROOTFS_FILE
    if rootfs:
        inputs = RootfsInputs.make(packages=packages, mirror=mirror)
        old = previous.get("rootfs") if previous is not None else None
        record = old if isinstance(old, dict) else None
        if not force and record is not None and rootfs_up_to_date(record, inputs, rootfs_path):
            progress(f"root image {rootfs_path} is up to date")
            manifest["rootfs"] = record
        else:
            manifest["rootfs"] = build_rootfs(inputs, rootfs_path, progress)
            changed = True
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
        if not rootfs and rootfs_path.exists():
            rootfs_path.unlink()
            changed = True
        for name, content, key in ((KERNEL_FILE, kernel_bytes, "kernel_sha256"),
                                   (INITRD_FILE, initrd, "initrd_sha256")):
            path = image_dir / name
            digest = manifest[key]
            same = (previous is not None and previous.get(key) == digest
                    and path.is_file() and _sha256(path.read_bytes()) == digest)
            if not same:
                progress(f"writing {path}")
                _write_atomically(path, content)
                changed = True
    except OSError as error:
        raise ImageError(f"cannot write the image to {image_dir}: {error.strerror}") from None
    if changed or previous != manifest:
        try:
            _write_atomically(image_dir / MANIFEST_FILE,
                              (json.dumps(manifest, indent=2) + "\n").encode())
        except OSError as error:
            raise ImageError(f"cannot write {image_dir / MANIFEST_FILE}: {error.strerror}") from None
        changed = True
    return BuildResult(image_dir, manifest, changed=changed)

