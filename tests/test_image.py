"""The image builder: cpio, module order, root image recipe, up-to-date logic, and real boots.

The root image takes most of a minute to build, so no test builds one: the
content test and the boot test use the default image (scripts/setup builds it),
and the up-to-date tests seed a scratch image directory with a copy of its root
image.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import trio
from conftest import VMCACHE, wait_until, write_config

from vmcache.config import load_config, resolve_spec
from vmcache.errors import BootError, ConfigError, ImageError
from vmcache.image import ROOTFS_FILE, ROOTFS_TYPE, build_image, pack_directory, read_manifest
from vmcache.image.build import AGENT_DIR, AGENT_FILES, initramfs_entries
from vmcache.image.cpio import (
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    char_device,
    directory,
    gzip_deterministic,
    read_cpio,
    read_initrd,
    regular_file,
    resolve_path,
    symlink,
    write_cpio,
)
from vmcache.image.kernel import (
    collect_modules,
    kernel_version,
    module_depends,
    module_load_order,
    module_name,
    parse_modules_dep,
)
from vmcache.image.rootfs import (
    BASE_PACKAGES,
    RootfsInputs,
    _remove_scratch,
    debian_mirror,
    mounts_under,
    prune_tree,
    rootfs_up_to_date,
    validate_packages,
)
from vmcache.paths import default_data_dir
from vmcache.qemu import boot_vm, launch_vm
from vmcache.qemu_argv import qemu_argv

NO_PYTHON_LINE = ("vmcache-init: the root image no-python.squashfs has no /usr/bin/python3 "
                  "(vmcache needs python3 >= 3.9 in the image)")

# ---------------------------------------------------------------------- cpio


def independent_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int], int]]:
    """A reader written apart from the package's, to check the writer: name -> (mode, data, rdev, mtime)."""
    members: dict[str, tuple[int, bytes, tuple[int, int], int]] = {}
    offset = 0
    while True:
        assert data[offset:offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, size, namesize = fields[1], fields[5], fields[6], fields[11]
        rdev = (fields[9], fields[10])
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[data_start:data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, body, rdev, mtime)


ENTRIES = [
    directory("bin"),
    regular_file("bin/tool", b"\x7fELF odd length", 0o755),
    symlink("bin/sh", "tool"),
    char_device("dev/console", 5, 1),
    regular_file("empty", b""),
]


def test_cpio_writer_is_newc_and_deterministic() -> None:
    archive = write_cpio(ENTRIES)
    members = independent_newc(archive)
    assert members["bin"][0] == S_IFDIR | 0o755
    assert members["bin/tool"][1] == b"\x7fELF odd length"
    assert members["bin/sh"][:3] == (S_IFLNK | 0o777, b"tool", (0, 0))
    assert members["dev/console"][:3] == (S_IFCHR | 0o600, b"", (5, 1))
    assert members["empty"][1] == b""
    assert {member[3] for member in members.values()} == {0}  # every mtime zero
    assert len(archive) % 4 == 0
    assert write_cpio(ENTRIES) == archive
    assert gzip_deterministic(archive) == gzip_deterministic(archive)


def test_cpio_reader_round_trips_and_undoes_compression() -> None:
    archive = write_cpio(ENTRIES)
    plain = read_cpio(archive)
    assert plain["bin/tool"].data == b"\x7fELF odd length" and plain["bin/tool"].kind == S_IFREG
    assert plain["dev/console"].rdev == (5, 1)
    for packed in (archive, gzip_deterministic(archive), lzma.compress(archive)):
        assert read_initrd(packed) == plain
    zstd = subprocess.run(["zstd", "-q", "-c"], input=archive, capture_output=True, check=True).stdout
    assert read_initrd(zstd) == plain
    # An uncompressed early archive, zero padding, then a compressed main one that overrides.
    early = write_cpio([regular_file("./kernel/x86/microcode/GenuineIntel.bin", b"ucode"),
                        regular_file("empty", b"early")])
    members = read_initrd(early + b"\0" * 512 + gzip_deterministic(archive))
    assert members["kernel/x86/microcode/GenuineIntel.bin"].data == b"ucode"
    assert members["empty"].data == b""
    with pytest.raises(ImageError, match="bzip2"):
        read_initrd(b"BZh91AY&SY" + b"\0" * 20)
    with pytest.raises(ImageError, match="not a cpio archive"):
        read_initrd(b"hello world")


def test_resolve_path_follows_symlinks_like_the_guest() -> None:
    members = read_cpio(write_cpio([
        symlink("bin", "usr/bin"),
        directory("usr"), directory("usr/bin"),
        symlink("usr/bin/python3", "python3.11"),
        regular_file("usr/bin/python3.11", b"ELF"),
        symlink("usr/bin/loop", "/usr/bin/loop"),
        symlink("usr/bin/dangling", "../nowhere"),
    ]))
    found = resolve_path(members, "/bin/python3")
    assert found is not None and found.name == "usr/bin/python3.11"
    assert resolve_path(members, "usr/bin/python3") == found
    assert resolve_path(members, "usr/bin/loop") is None
    assert resolve_path(members, "usr/bin/dangling") is None
    assert resolve_path(members, "usr/bin/python2") is None


# ---------------------------------------------------------------------- modules

MODULES_DEP = """\
kernel/virtio/virtio_ring.ko:
kernel/virtio/virtio.ko: kernel/virtio/virtio_ring.ko
kernel/virtio/virtio_pci.ko: kernel/virtio/virtio_pci_legacy_dev.ko kernel/virtio/virtio_pci_modern_dev.ko \
kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko
kernel/virtio/virtio_pci_modern_dev.ko:
kernel/virtio/virtio_pci_legacy_dev.ko:
kernel/hw_random/virtio-rng.ko.xz: kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
"""


def test_modules_dep_gives_names_paths_and_order() -> None:
    table = parse_modules_dep(MODULES_DEP)
    assert table["virtio_rng"] == ("kernel/hw_random/virtio-rng.ko.xz",
                                   ["virtio", "virtio_ring"])
    depends = {name: deps for name, (_path, deps) in table.items()}
    order = module_load_order(["virtio_pci", "virtio_rng", "erofs", "built_in_one"], depends)
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
    assert order.index("virtio_pci_modern_dev") < order.index("virtio_pci")
    assert order.index("libcrc32c") < order.index("erofs")
    assert "built_in_one" not in order and len(order) == len(set(order))
    with pytest.raises(ImageError, match="cycle"):
        module_load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_module_names_and_modinfo_depends() -> None:
    assert module_name("/x/virtio-rng.ko.xz") == "virtio_rng"
    modinfo = b"\0license=GPL\0depends=virtio_ring,virtio\0name=virtio_console\0"
    assert module_depends(b"junk" + modinfo) == ["virtio_ring", "virtio"]
    assert module_depends(b"no modinfo") == []


def fake_modules(tmp_path: Path, names: list[str], builtin: list[str]) -> Path:
    root = tmp_path / "lib" / "modules" / "9.9.9-test"
    (root / "kernel").mkdir(parents=True)
    lines = []
    for name in names:
        (root / "kernel" / f"{name}.ko").write_bytes(b"\0depends=\0name=" + name.encode() + b"\0")
        lines.append(f"kernel/{name}.ko:")
    (root / "modules.dep").write_text("\n".join(lines) + "\n")
    (root / "modules.builtin").write_text("".join(f"kernel/{name}.ko\n" for name in builtin))
    return root


def test_a_required_module_missing_is_named(tmp_path: Path) -> None:
    root = fake_modules(tmp_path, ["virtio_console", "overlay", "erofs"],
                        builtin=["virtio_ring", "virtio", "virtio_pci", "virtio_pci_modern_dev",
                                 "virtio_pci_legacy_dev"])
    with pytest.raises(ImageError, match="lack virtio_blk "):
        collect_modules(root, extra=["erofs"])
    (root / "kernel" / "virtio_blk.ko").write_bytes(b"x")
    with (root / "modules.dep").open("a") as dep:
        dep.write("kernel/virtio_blk.ko:\n")
    found = collect_modules(root, extra=["erofs"])
    assert found.method == "modules.dep"
    assert sorted(found.names) == ["erofs.ko", "overlay.ko", "virtio_blk.ko", "virtio_console.ko"]


@pytest.fixture(scope="module")
def package_modules() -> Path:
    """The unpacked Debian kernel package's modules (no modules.dep), if that is the kernel."""
    found = sorted((default_data_dir() / "kernel-package" / "lib" / "modules").glob("*"))
    if not found:
        pytest.skip("the default image's kernel is not Debian's package (no <data>/kernel-package)")
    return found[-1]


def test_depmod_and_the_modinfo_fallback_agree(package_modules: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert not (package_modules / "modules.dep").exists()  # Debian's package ships none
    before = sorted(p.name for p in package_modules.iterdir())
    by_depmod = collect_modules(package_modules, extra=["erofs"], extra_optional=["squashfs"])
    assert by_depmod.method == "depmod"
    assert sorted(p.name for p in package_modules.iterdir()) == before  # package left untouched
    names = by_depmod.names
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_pci.ko")
    assert names.index("libcrc32c.ko") < names.index("erofs.ko")
    assert {"virtio_blk.ko", "overlay.ko", "virtio_console.ko", "squashfs.ko"} <= set(names)
    monkeypatch.setattr("vmcache.image.kernel.find_depmod", lambda: None)
    messages: list[str] = []
    by_scan = collect_modules(package_modules, extra=["erofs"], extra_optional=["squashfs"],
                              progress=messages.append)
    assert by_scan.method == "modinfo scan" and "apt-get install kmod" in messages[0]
    assert set(by_scan.names) == set(names)
    scan_order = by_scan.names
    assert scan_order.index("libcrc32c.ko") < scan_order.index("erofs.ko")


def test_kernel_version_from_setup_header(guest_image: Path) -> None:
    version = kernel_version((guest_image / "vmlinuz").read_bytes())
    assert version and version[0].isdigit()
    fake = bytearray(0x400)
    fake[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", fake, 0x20E, 0x100)
    fake[0x300:0x310] = b"9.9.9-test (x)\0"
    assert kernel_version(bytes(fake)) == "9.9.9-test"


# ---------------------------------------------------------------------- root image recipe


def test_mirror_from_the_hosts_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    assert debian_mirror(tmp_path) == "http://deb.debian.org/debian"
    (tmp_path / "sources.list").write_text("deb http://archive.ubuntu.com/ubuntu jammy main\n"
                                           "deb [arch=amd64] http://one.example/debian bookworm main\n")
    assert debian_mirror(tmp_path) == "http://one.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\n# a comment\nURIs: http://two.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert debian_mirror(tmp_path) == "http://two.example/debian"


def test_package_names_are_checked() -> None:
    assert validate_packages(["curl", " git ", "", "curl", "g++", "libc6.1-dev"]) == [
        "curl", "git", "g++", "libc6.1-dev"]
    for bad in ("--include=x", "Curl", "a b", "x;rm"):
        with pytest.raises(ImageError, match="not a Debian package name"):
            validate_packages([bad])


def test_root_image_inputs_key_and_up_to_date(tmp_path: Path) -> None:
    base = RootfsInputs.make(mirror="http://m.example/debian")
    assert set(BASE_PACKAGES) <= set(base.packages)
    assert base.key() == RootfsInputs.make(mirror="http://m.example/debian").key()
    for other in (RootfsInputs.make(packages=["curl"], mirror="http://m.example/debian"),
                  RootfsInputs.make(mirror="http://n.example/debian")):
        assert other.key() != base.key()
    assert RootfsInputs.make(packages=["python3"], mirror="x").key() == RootfsInputs.make(mirror="x").key()
    image = tmp_path / "rootfs"
    image.write_bytes(b"image bytes")
    record = {"inputs_key": base.key(), "size": 11, "sha256": hashlib.sha256(b"image bytes").hexdigest()}
    assert rootfs_up_to_date(record, base, image)
    assert not rootfs_up_to_date(record, RootfsInputs.make(packages=["curl"], mirror="http://m.example/debian"),
                                 image)
    image.write_bytes(b"image bytez")  # same size, other content
    assert not rootfs_up_to_date(record, base, image)
    image.unlink()
    assert not rootfs_up_to_date(record, base, image)


@pytest.fixture(scope="session")
def default_rootfs(guest_image: Path) -> Path:
    manifest = read_manifest(guest_image)
    path = guest_image / ROOTFS_FILE
    if manifest is None or not manifest.get("rootfs") or not path.is_file():
        pytest.fail(f"the default image at {guest_image} has no root image: run `vmcache image build`")
    return path


@pytest.fixture(scope="module")
def rootfs_tree(default_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default root image unpacked (by the file system's own tool: no mounts)."""
    out = tmp_path_factory.mktemp("rootfs") / "tree"
    assert ROOTFS_TYPE == "erofs"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(default_rootfs)], check=True,
                   capture_output=True, timeout=300)
    return out


def test_root_image_has_python_and_no_docs(rootfs_tree: Path) -> None:
    root = rootfs_tree
    python = root / "usr/bin/python3"
    assert python.is_symlink() and (root / "usr/bin" / os.readlink(python)).is_file()
    stdlib = next((root / "usr/lib").glob("python3.*"))
    for module in ("json/__init__.py", "asyncio/__init__.py", "sqlite3/__init__.py", "ssl.py",
                   "venv/__init__.py", "__pycache__"):
        assert (stdlib / module).exists(), module  # the full standard library, precompiled
    assert list((stdlib / "lib-dynload").glob("_ssl*.so"))
    assert (root / "etc/ssl/certs/ca-certificates.crt").is_file()
    for tool in ("ls", "cat", "ps", "kill", "grep", "sed", "tar", "sh", "bash"):
        assert (root / "usr/bin" / tool).exists() or (root / "usr/sbin" / tool).exists(), tool
    assert (root / "usr/lib/locale/C.utf8").is_dir()
    assert (root / "bin").is_symlink()  # merged /usr, without the usrmerge package and its perl
    docs = [p for p in (root / "usr/share/doc").rglob("*") if p.is_file() and p.name != "copyright"]
    assert docs == []
    for gone in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        assert not any((root / gone).rglob("*")) if (root / gone).exists() else True, gone
    assert not any((root / "var/lib/apt/lists").glob("*Packages*"))
    assert not (root / "usr/bin/apt").exists()  # the essential variant: no apt
    assert not (root / "usr/share/perl").exists()  # nor perl-modules (usrmerge wanted them)


# ---------------------------------------------------------------------- build, up to date


def test_initramfs_members() -> None:
    entries = initramfs_entries(b"busybox", ["sh", "mount"], [("virtio.ko", b"ko")],
                                [("vmcache_agent.py", b"agent"), ("agent_protocol.py", b"proto")])
    members = read_cpio(write_cpio(entries))
    assert members["init"].mode & 0o755 == 0o755
    assert members["bin/sh"].data == b"busybox"
    assert members[f"{AGENT_DIR}/vmcache_agent.py"].data == b"agent"
    assert members["etc/vmcache/modules"].data == b"virtio.ko\n"
    assert members["etc/vmcache/rootfs-type"].data == f"{ROOTFS_TYPE}\n".encode()
    assert not any("reseed" in name or name == "bin/vmcache-agent" for name in members)
    assert "usr/bin/python3" not in members


@pytest.fixture
def seeded_image(tmp_path: Path, guest_image: Path, default_rootfs: Path) -> Iterator[Path]:
    """A scratch image directory holding (a hard link to) the default root image and its record."""
    out = tmp_path / "image"
    out.mkdir()
    try:
        os.link(default_rootfs, out / ROOTFS_FILE)
    except OSError:
        shutil.copy2(default_rootfs, out / ROOTFS_FILE)
    manifest = read_manifest(guest_image)
    assert manifest is not None
    (out / "manifest.json").write_text(json.dumps({"rootfs": manifest["rootfs"]}))
    yield out


def test_rebuild_with_the_same_inputs_does_nothing(seeded_image: Path, guest_image: Path) -> None:
    """Kernel and initramfs are written; the seeded root image is kept; then nothing changes."""
    out = seeded_image
    inputs = read_manifest(guest_image)["rootfs"]["inputs"]  # type: ignore[index]
    mirror, packages = inputs["mirror"], inputs["packages"]
    first = build_image(output=out, kernel=guest_image / "vmlinuz", mirror=mirror, packages=packages)
    assert first.changed
    initrd = out / "initramfs.cpio.gz"
    members = read_initrd(initrd.read_bytes())
    assert {"init", "bin/busybox", f"{AGENT_DIR}/vmcache_agent.py", f"{AGENT_DIR}/agent_protocol.py",
            "etc/vmcache/modules"} <= members.keys()
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    started = time.monotonic()
    second = build_image(output=out, kernel=guest_image / "vmlinuz", mirror=mirror, packages=packages)
    assert not second.changed
    assert time.monotonic() - started < 15
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps
    done = subprocess.run([*VMCACHE, "image", "build", "--output", str(out), "--kernel",
                           str(guest_image / "vmlinuz"), "--mirror", mirror,
                           "--packages", ",".join(packages)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "up to date; nothing to do" in done.stderr
    assert "mmdebstrap" not in done.stderr


def test_initramfs_only_build_and_unknown_package(tmp_path: Path, guest_image: Path) -> None:
    out = tmp_path / "image"
    result = build_image(output=out, kernel=guest_image / "vmlinuz", rootfs=False)
    assert result.manifest["rootfs"] is None and not (out / ROOTFS_FILE).exists()
    assert not build_image(output=out, kernel=guest_image / "vmlinuz", rootfs=False).changed
    done = subprocess.run([*VMCACHE, "image", "build", "--output", str(out), "--kernel",
                           str(guest_image / "vmlinuz"), "--packages", "curl,--evil"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("not a Debian package name: '--evil' (lower case letters, "
                                        "digits, + - . only)")


def test_missing_kernel_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*VMCACHE, "image", "build", "--output", str(tmp_path), "--kernel",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"vmcache: kernel not found: {tmp_path / 'nope'}"


# ---------------------------------------------------------------------- config


def test_config_image_keys(tmp_path: Path, guest_image: Path, default_rootfs: Path) -> None:
    spec = resolve_spec(load_config(write_config(tmp_path / "a.toml")))
    assert spec.rootfs == default_rootfs
    argv = qemu_argv(spec, tmp_path / "vm-x", "tcg", "n")
    append = argv[argv.index("-append") + 1]
    assert f"vmcache.root=/dev/vda vmcache.image={ROOTFS_FILE}" in append
    assert f"file={default_rootfs},if=none,id=rootfs,format=raw,readonly=on" in argv
    assert argv[argv.index(f"file={default_rootfs},if=none,id=rootfs,format=raw,readonly=on") + 2] \
        == "virtio-blk-pci,drive=rootfs"
    missing = tmp_path / "no.erofs"
    with pytest.raises(ConfigError, match=f"root filesystem image not found: {missing}"):
        resolve_spec(load_config(write_config(tmp_path / "b.toml", image=str(missing))))
    config = load_config(write_config(tmp_path / "c.toml"))
    assert config.image.packages == () and config.image.mirror == ""
    (tmp_path / "d.toml").write_text('[image]\npackages = ["curl", "git"]\n')
    assert load_config(tmp_path / "d.toml").image.packages == ("curl", "git")
    (tmp_path / "e.toml").write_text('[image]\npackages = ["a b"]\n')
    with pytest.raises(ConfigError, match=r"image\.packages: must be Debian package names"):
        load_config(tmp_path / "e.toml")


def initrd_file(path: Path, entries: list, compress: str = "gzip") -> Path:  # type: ignore[type-arg]
    archive = write_cpio(entries)
    if compress == "gzip":
        archive = gzip_deterministic(archive)
    elif compress == "zstd":
        archive = subprocess.run(["zstd", "-q", "-c"], input=archive, capture_output=True,
                                 check=True).stdout
    path.write_bytes(archive)
    return path


def test_own_initrd_without_image_must_carry_python_and_agent(tmp_path: Path, guest_image: Path) -> None:
    kernel = str(guest_image / "vmlinuz")
    bare = initrd_file(tmp_path / "bare.gz", [regular_file("init", b"#!/bin/sh\n", 0o755)])
    with pytest.raises(ConfigError) as caught:
        resolve_spec(load_config(write_config(tmp_path / "a.toml", kernel=kernel, initrd=str(bare))))
    message = str(caught.value)
    assert f"the initrd {bare} cannot run the guest agent" in message
    assert f"no /usr/bin/python3 and no /{AGENT_DIR}/vmcache_agent.py and no " \
           f"/{AGENT_DIR}/agent_protocol.py" in message
    half = initrd_file(tmp_path / "half.zst", [
        symlink("bin", "usr/bin"), directory("usr"), directory("usr/bin"),
        symlink("usr/bin/python3", "python3.11"), regular_file("usr/bin/python3.11", b"ELF", 0o755),
        regular_file(f"{AGENT_DIR}/vmcache_agent.py", b"agent"),
        regular_file(f"{AGENT_DIR}/agent_base.py", b""),
        regular_file(f"{AGENT_DIR}/agent_process.py", b""),
        regular_file(f"{AGENT_DIR}/agent_files.py", b""),
        regular_file(f"{AGENT_DIR}/agent_tcp.py", b""),
    ], compress="zstd")
    with pytest.raises(ConfigError, match=f"it has no /{AGENT_DIR}/agent_protocol.py \\(from "):
        resolve_spec(load_config(write_config(tmp_path / "b.toml", kernel=kernel, initrd=str(half))))
    full = initrd_file(tmp_path / "full.cpio", [
        regular_file("usr/bin/python3", b"ELF", 0o755),
        regular_file(f"{AGENT_DIR}/vmcache_agent.py", b"agent"),
        regular_file(f"{AGENT_DIR}/agent_protocol.py", b"proto"),
        regular_file(f"{AGENT_DIR}/agent_base.py", b""),
        regular_file(f"{AGENT_DIR}/agent_process.py", b""),
        regular_file(f"{AGENT_DIR}/agent_files.py", b""),
        regular_file(f"{AGENT_DIR}/agent_tcp.py", b""),
    ], compress="none")
    spec = resolve_spec(load_config(write_config(tmp_path / "c.toml", kernel=kernel, initrd=str(full))))
    assert spec.rootfs is None
    argv = qemu_argv(spec, tmp_path / "vm-x", "tcg", "n")
    assert "vmcache.root" not in argv[argv.index("-append") + 1] and "-drive" not in argv
    done = subprocess.run([*VMCACHE, "config", "check", "--files", str(tmp_path / "a.toml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "/usr/bin/python3" in done.stderr


# ---------------------------------------------------------------------- real boots (TCG)


def boot_to_console(spec, run_dir: Path, until: str, timeout: float = 90.0,  # type: ignore[no-untyped-def]
                    exits: bool = False) -> tuple[str, float]:
    """Start QEMU with vmcache's own argv; return the console text once it shows ``until``.

    With ``exits`` the guest must also power itself off. QEMU is always gone afterwards.
    """
    work = run_dir / "image-boot"
    work.mkdir()
    argv = qemu_argv(spec, work, "tcg", "vmcache-image-test")
    console = work / "console.log"
    started = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    # The console is a socket QEMU waits on before it starts the guest: copy it to the file.
    console_socket = socket.socket(socket.AF_UNIX)
    wait_until(lambda: console_socket.connect_ex(str(work / "console.sock")) == 0
               or process.poll() is not None, 30, interval=0.005)

    def copy_console() -> None:
        with console_socket, open(console, "wb") as out:
            while data := console_socket.recv(1 << 16):
                out.write(data)
                out.flush()

    threading.Thread(target=copy_console, daemon=True).start()
    try:
        def shown() -> bool:
            return console.is_file() and until in console.read_text(errors="replace")

        wait_until(lambda: shown() or process.poll() is not None, timeout, interval=0.02)
        seen = shown()
        elapsed = time.monotonic() - started
        if exits:
            process.wait(timeout=30)
        text = console.read_text(errors="replace") if console.is_file() else ""
        assert seen, f"no {until!r} on the console within {timeout} s: {text[:3000]}"
        return text, elapsed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.qemu
async def test_boots_into_python_from_the_root_image(tmp_path: Path, run_dir: Path,
                                                    default_rootfs: Path) -> None:
    spec = resolve_spec(load_config(write_config(tmp_path / "vmcache.toml")), run_root=run_dir)
    assert spec.rootfs == default_rootfs
    with trio.fail_after(120):
        async with launch_vm(spec) as vm:
            result = await vm.run(["python3", "-c", "import sys, json; print(sys.version_info[0])"])
            assert (result.returncode, result.stdout) == (0, b"3\n")
            mounts = (await vm.run(["cat", "/proc/mounts"])).stdout or b""
            assert b"overlay / overlay" in mounts and b"/dev/vda" in mounts
            console = (vm.run_dir / "console.log").read_text(errors="replace")
    assert "vmcache-init:" not in console  # no complaint on the way


@pytest.mark.qemu
def test_root_image_without_python_fails_with_one_line(tmp_path: Path, run_dir: Path,
                                                        guest_image: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "os-release").write_text("NAME=nopython\n")
    image = tmp_path / "no-python.squashfs"
    pack_directory(tree, image, "squashfs")  # a user's image may be squashfs: /init mounts both
    spec = resolve_spec(load_config(write_config(tmp_path / "vmcache.toml", image=str(image))),
                        run_root=run_dir)
    text, _elapsed = boot_to_console(spec, run_dir, "vmcache-init:", exits=True)
    lines = [line.strip() for line in text.splitlines() if "vmcache-init" in line]
    assert lines == [NO_PYTHON_LINE]
    # Through vmcache itself: the boot fails at once (the guest powers off), saying why.
    started = time.monotonic()
    with pytest.raises(BootError) as failed:
        trio.run(boot_vm, spec)
    assert time.monotonic() - started < 30
    assert NO_PYTHON_LINE in str(failed.value)


def python_initrd(default_initrd: Path, tree: Path, output: Path) -> Path:
    """The default initramfs plus just enough of the root image's python3 to run the agent."""
    entries = [entry for name, entry in read_initrd(default_initrd.read_bytes()).items()]
    multiarch = "usr/lib/x86_64-linux-gnu"
    stdlib = next((tree / "usr/lib").glob("python3.*")).relative_to(tree)
    packages = ("encodings", "collections", "re", "importlib")
    entries += [directory(name) for name in ("usr", "usr/bin", "usr/lib", multiarch, "lib64", str(stdlib),
                                             f"{stdlib}/lib-dynload", *(f"{stdlib}/{p}" for p in packages))]
    files = {"usr/bin/python3": tree / "usr/bin/python3",
             "lib64/ld-linux-x86-64.so.2": tree / multiarch / "ld-linux-x86-64.so.2"}
    for library in ("libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1"):
        files[f"{multiarch}/{library}"] = tree / multiarch / library
    sources = [*(tree / stdlib).glob("*.py"),
               *(source for package in packages for source in (tree / stdlib / package).glob("*.py"))]
    for source in sources:  # the standard library's plain modules, without their .pyc
        files[str(source.relative_to(tree))] = source
    entries += [regular_file(name, source.resolve().read_bytes(), 0o755) for name, source in files.items()]
    output.write_bytes(gzip_deterministic(write_cpio(entries)))
    return output


@pytest.mark.qemu
def test_initramfs_with_python_runs_the_agent_without_root_image(
    tmp_path: Path, run_dir: Path, guest_image: Path, rootfs_tree: Path
) -> None:
    initrd = python_initrd(guest_image / "initramfs.cpio.gz", rootfs_tree, tmp_path / "python.cpio.gz")
    config = write_config(tmp_path / "vmcache.toml", kernel=str(guest_image / "vmlinuz"), initrd=str(initrd))
    spec = resolve_spec(load_config(config), run_root=run_dir)
    assert spec.rootfs is None

    async def check() -> None:
        with trio.fail_after(120):
            async with launch_vm(spec) as vm:
                result = await vm.run(["/usr/bin/python3", "-c", "print(6 * 7)"])
                assert (result.returncode, result.stdout) == (0, b"42\n")

    trio.run(check)


def test_build_directory_with_mounts_inside_is_not_removed(tmp_path: Path) -> None:
    """rmtree would descend into a mount left in the tree (a killed mmdebstrap's /dev or /proc)."""
    assert "/proc" in mounts_under(Path("/proc")) and mounts_under(tmp_path) == []
    scratch = tmp_path / "scratch"
    (scratch / "tree" / "usr").mkdir(parents=True)
    prune_tree(scratch / "tree", ["usr/*", "var/log/*"])
    _remove_scratch(scratch)
    assert not scratch.exists()


def test_the_initramfs_init_copies_every_agent_file() -> None:
    """/init copies the agent's files into the new root by a list of its own: it must be the
    image's list, or the guest agent fails at import after switch_root."""
    init = resources.files("vmcache").joinpath("in_guest", "init").read_text()

    def listed(name: str) -> list[str]:
        line = next(line for line in init.splitlines() if line.startswith(f"{name}="))
        return line.split("=", 1)[1].strip('"').split()

    # The agent's own files are required; E2B's helpers are copied when the initramfs has them.
    assert sorted(listed("AGENT_FILES") + listed("HELPER_FILES")) == sorted(name for name, _ in AGENT_FILES)
    assert set(listed("HELPER_FILES")) == {"e2b_fs.py", "e2b_kernel.py"}
