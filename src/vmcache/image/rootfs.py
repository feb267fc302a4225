"""The guest's root filesystem image: Debian with python3, read-only and compressed.

Recipe: ``mmdebstrap --variant=essential`` of Debian bookworm (only the
Essential:yes packages: coreutils, util-linux, bash, dpkg ...; no apt) plus
``python3`` (the full standard library, not python3-minimal),
``ca-certificates``, ``procps`` and whatever the user adds. ``/usr`` is merged
by mmdebstrap's own hook, not the ``usrmerge`` package (which would pull in 40
MB of perl). dpkg is told not to unpack documentation, manual pages, info files,
translations or lintian overrides (copyright files stay, for the licences);
apt's lists and caches, logs and debconf backups are removed after.
The C.UTF-8 locale ships with libc and stays. Python's standard library
comes precompiled (``.pyc``, made by the packages' own scripts): on a read-only
root Python could not write them, and compiling at every start costs time.

The file system is **erofs, lz4hc-compressed** (``mkfs.erofs -zlz4hc``), chosen
after measuring it against squashfs on a 2-core machine (QEMU 7.2, TCG, Debian's
6.1 cloud kernel, the same 105 MB tree; boot = QEMU start to python's first
line, median of 4 interleaved boots; the README has the full table):

========================  ==========  =======  =======  ===========================
format                    mkfs time   size     boot     reading 99 MB in the guest
========================  ==========  =======  =======  ===========================
erofs lz4hc               1.8 s       58 MB    3.81 s   3.2 s over cached
squashfs zstd (level 15)  6.1 s       33 MB    4.1 s    3.3 s over cached
squashfs xz               11.5 s      30 MB    4.86 s   11.6 s over cached
========================  ==========  =======  =======  ===========================

Under TCG the guest's CPU is emulated, so what a format costs is decompression
in the guest: lz4 in 4 KiB clusters boots fastest of the compressed choices,
and it packs in under 2 s. squashfs zstd is 25 MB smaller, but the image is
shared read-only by every VM through the host's page cache, so its size is
paid once per host, not per VM. (``-Eztailpacking`` saves another 4 MB; it
was not measured fairly, so it is left out.) Both are built from a directory
without loop mounts; the guest's ``/init`` mounts either (a user's own image
may be squashfs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ImageError
from .tools import Progress, run_tool

#: Bump when the recipe below changes in a way the inputs do not show.
RECIPE_VERSION = 1

SUITE = "bookworm"
VARIANT = "essential"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Packages every default image has, besides the Essential:yes set.
BASE_PACKAGES = ("python3", "ca-certificates", "procps")
#: dpkg path filters: no docs (but keep copyright files), man pages, info, translations.
DPKG_PATH_FILTERS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
)
#: Removed from the tree after mmdebstrap (relative paths; globs): what the dpkg
#: filters leave (install-info's index, empty directories) and what a read-only
#: guest never needs.
PRUNE_GLOBS = (
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "var/cache/apt/*",
    "var/lib/apt/lists/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/*",
)

ROOTFS_TYPE = "erofs"
ROOTFS_FILE = "rootfs.erofs"
#: Kernel modules for root images: the default's type is required, the other is
#: loaded when the kernel has it (a user's own image may be either).
ROOTFS_MODULES = ("erofs", "squashfs")

#: mkfs for each type; the default type's options are part of the build inputs.
#: Owners and mtimes are kept as they are in the tree: Python checks each .pyc
#: against its source's mtime, and would recompile the standard library (into the
#: overlay's tmpfs, at every boot) if the image zeroed them.
MKFS = {
    "erofs": ("mkfs.erofs", ["-zlz4hc", "--quiet"], "erofs-utils"),
    "squashfs": ("mksquashfs", ["-comp", "zstd", "-noappend", "-quiet", "-no-progress"],
                 "squashfs-tools"),
}

MMDEBSTRAP_TIMEOUT = 1800.0
MKFS_TIMEOUT = 600.0

_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def validate_packages(packages: Iterable[str]) -> list[str]:
    """Check Debian package names; return them stripped, without empties or duplicates."""
    cleaned: list[str] = []
    for raw in packages:
        name = raw.strip()
        if not name:
            continue
        if not _PACKAGE_NAME.match(name):
            raise ImageError(f"not a Debian package name: {name!r} (lower case letters, digits, "
                             "+ - . only)")
        if name not in cleaned:
            cleaned.append(name)
    return cleaned


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this host's apt uses for :data:`SUITE`, else deb.debian.org.

    Reads deb822 ``*.sources`` files first, then one-line ``sources.list`` files; only
    an entry for :data:`SUITE` itself counts (an Ubuntu host's do not).
    """
    candidates = sorted((sources_dir / "sources.list.d").glob("*.sources"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if ("deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split()
                    and fields.get("enabled", "yes").lower() != "no" and fields.get("uris")):
                return fields["uris"].split()[0]
    lists = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    return DEFAULT_MIRROR


@dataclass(frozen=True)
class RootfsInputs:
    """Everything the root image is made from: equal inputs, equal image (give or take
    package updates on the mirror, which ``vmcache image build --force`` picks up)."""

    suite: str
    mirror: str
    variant: str
    packages: tuple[str, ...]
    dpkg_filters: tuple[str, ...]
    prune: tuple[str, ...]
    fs_type: str
    mkfs_options: tuple[str, ...]
    recipe: int

    @classmethod
    def make(cls, packages: Sequence[str] = (), mirror: str = "") -> RootfsInputs:
        """The default image's inputs plus ``packages``; ``mirror`` "" = :func:`debian_mirror`."""
        extra = validate_packages(packages)
        return cls(
            suite=SUITE,
            mirror=mirror or debian_mirror(),
            variant=VARIANT,
            packages=tuple(sorted({*BASE_PACKAGES, *extra})),
            dpkg_filters=DPKG_PATH_FILTERS,
            prune=PRUNE_GLOBS,
            fs_type=ROOTFS_TYPE,
            mkfs_options=tuple(MKFS[ROOTFS_TYPE][1]),
            recipe=RECIPE_VERSION,
        )

    def as_dict(self) -> dict[str, object]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def rootfs_up_to_date(record: Mapping[str, object], inputs: RootfsInputs, path: Path) -> bool:
    """Whether ``path`` is the image ``record`` (a manifest's ``rootfs``) describes, made
    from ``inputs``: same input key, and the file's size and hash as recorded."""
    if record.get("inputs_key") != inputs.key():
        return False
    try:
        if path.stat().st_size != record.get("size"):
            return False
    except OSError:
        return False
    return _file_sha256(path) == record.get("sha256")


def _need_tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if found is None:
        raise ImageError(f"building the root image needs {name}: apt-get install {package} "
                         "(scripts/setup does)")
    return found


def _mmdebstrap(inputs: RootfsInputs, target: Path, progress: Progress) -> None:
    """Run mmdebstrap into the directory ``target``, relaying its progress lines."""
    tool = _need_tool("mmdebstrap", "mmdebstrap")
    hook_dir = Path("/usr/share/mmdebstrap/hooks/merged-usr")
    argv = [
        tool, f"--variant={inputs.variant}", f"--include={','.join(inputs.packages)}",
        *(["--hook-dir", str(hook_dir)] if hook_dir.is_dir() else []),
        *(f"--dpkgopt={rule}" for rule in inputs.dpkg_filters),
        inputs.suite, str(target), inputs.mirror,
    ]
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    # SIGTERM, not SIGKILL: mmdebstrap then unmounts what it mounted inside the tree.
    timer = threading.Timer(MMDEBSTRAP_TIMEOUT, process.terminate)
    timer.start()
    last_lines: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            line = line.rstrip()
            last_lines = [*last_lines[-4:], line]
            if line.startswith("I: ") and not line.startswith("I: running"):
                progress(f"mmdebstrap: {line[3:]}")
        status = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # interrupted (Ctrl-C): let mmdebstrap clean up, briefly
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if status != 0:
        if status < 0:
            raise ImageError(f"mmdebstrap took longer than {MMDEBSTRAP_TIMEOUT:g} s; killed")
        errors = [line for line in last_lines if line.startswith("E: ")] or last_lines or ["no output"]
        raise ImageError(f"mmdebstrap failed ({errors[-1]}); is {inputs.mirror} reachable and "
                         f"are the packages {', '.join(inputs.packages)} in {inputs.suite}?")


def prune_tree(root: Path, globs: Iterable[str] = PRUNE_GLOBS) -> None:
    """Remove what a read-only guest never needs: apt's caches and lists, logs, backups."""
    for pattern in globs:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def pack_directory(tree: Path, output: Path, fs_type: str = ROOTFS_TYPE) -> None:
    """Make a read-only ``fs_type`` image of the directory ``tree`` (no mounts, no loop)."""
    if fs_type not in MKFS:
        raise ImageError(f"unknown root file system type {fs_type!r}: {', '.join(MKFS)}")
    name, options, package = MKFS[fs_type]
    tool = _need_tool(name, package)
    output.unlink(missing_ok=True)
    argv = ([tool, *options, str(output), str(tree)] if fs_type == "erofs"
            else [tool, str(tree), str(output), *options])
    run_tool(argv, f"{name} of {tree}", timeout=MKFS_TIMEOUT, hint=f"apt-get install {package}")


def _package_version(root: Path, package: str) -> str:
    """A package's version from the tree's dpkg database ("" if not installed)."""
    try:
        status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return ""
    for stanza in status.split("\n\n"):
        if f"\nPackage: {package}\n" in f"\n{stanza}\n" and "Status: install ok installed" in stanza:
            match = re.search(r"^Version: (.+)$", stanza, re.MULTILINE)
            return match.group(1) if match else ""
    return ""


def _count_packages(root: Path) -> int:
    try:
        status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return 0
    return status.count("Status: install ok installed")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    root = str(path.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4].replace("\\040", " ") for line in lines if len(line.split()) > 4]
    return [point for point in points if point == root or point.startswith(root + "/")]


def _remove_scratch(scratch: Path) -> None:
    """Remove the build directory, unless something is still mounted in it.

    rmtree descends into mount points: had mmdebstrap been killed before it
    unmounted the tree's /dev or /proc, removing the tree would remove the host's.
    """
    left = mounts_under(scratch)
    if left:
        raise ImageError(f"mounts left inside the root image's build directory ({', '.join(left)}): "
                         f"unmount them (umount -R), then remove {scratch}")
    shutil.rmtree(scratch, ignore_errors=True)


def build_rootfs(inputs: RootfsInputs, output: Path, progress: Progress) -> dict[str, object]:
    """Build the root image at ``output`` (atomically); return its manifest record."""
    if os.geteuid() != 0:
        raise ImageError("building the root image needs root (mmdebstrap installs packages "
                         "into a chroot): run `sudo vmcache image build`, or scripts/setup")
    _need_tool(MKFS[inputs.fs_type][0], MKFS[inputs.fs_type][2])
    started = time.monotonic()
    progress(f"building the root image: Debian {inputs.suite} ({inputs.variant}) + "
             f"{', '.join(inputs.packages)} from {inputs.mirror}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".rootfs-build-", dir=output.parent))
    except OSError as error:
        raise ImageError(f"cannot create a build directory in {output.parent}: {error.strerror}") from None
    try:
        tree = scratch / "tree"
        _mmdebstrap(inputs, tree, progress)
        prune_tree(tree, inputs.prune)
        python = _package_version(tree, "python3")
        if not python:
            raise ImageError("the root image has no python3 package after mmdebstrap")
        packages = _count_packages(tree)
        partial = output.parent / f".{output.name}.partial"
        progress(f"packing it as {inputs.fs_type} ({' '.join(inputs.mkfs_options)})")
        pack_directory(tree, partial, inputs.fs_type)
        partial.replace(output)
    except OSError as error:
        raise ImageError(f"building the root image in {scratch} failed: {error}") from None
    finally:
        _remove_scratch(scratch)
    size = output.stat().st_size
    seconds = time.monotonic() - started
    progress(f"root image {output}: {size / 1e6:.1f} MB, {packages} packages, python3 {python}, "
             f"built in {seconds:.0f} s")
    return {
        "file": output.name,
        "type": inputs.fs_type,
        "size": size,
        "sha256": _file_sha256(output),
        "inputs": inputs.as_dict(),
        "inputs_key": inputs.key(),
        "packages_installed": packages,
        "python3_version": python,
        "build_seconds": round(seconds, 1),
    }
