"""The image builder: cpio writer, module ordering, ELF checks, and an idempotent real build."""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import VMCACHE

from vmcache.errors import ImageError
from vmcache.image import (
    RESEED_CODE,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    build_image,
    char_device,
    directory,
    elf_is_static,
    kernel_version,
    module_depends,
    module_load_order,
    module_name,
    regular_file,
    static_elf,
    symlink,
    write_cpio,
)


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A minimal newc reader, independent of the writer: name -> (mode, data, rdev)."""
    members = {}
    offset = 0
    while True:
        assert data[offset:offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_start = offset + 110
        name = data[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        body = data[data_start:data_start + size]
        offset = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, body, rdev)


def test_cpio_round_trip() -> None:
    archive = write_cpio([
        directory("bin"),
        regular_file("bin/tool", b"\x7fELF odd length", 0o755),
        symlink("bin/sh", "tool"),
        char_device("dev/console", 5, 1),
        regular_file("empty", b""),
    ])
    members = read_cpio(archive)
    assert members["bin"][0] == S_IFDIR | 0o755
    assert members["bin/tool"][1] == b"\x7fELF odd length"
    assert members["bin/sh"] == (S_IFLNK | 0o777, b"tool", (0, 0))
    assert members["dev/console"] == (S_IFCHR | 0o600, b"", (5, 1))
    assert members["empty"][1] == b""
    assert len(archive) % 4 == 0


def test_cpio_is_deterministic() -> None:
    entries = [regular_file("a", b"1"), regular_file("b", b"22")]
    assert write_cpio(entries) == write_cpio(entries)


def test_module_names_and_depends() -> None:
    assert module_name("/x/virtio-rng.ko.xz") == "virtio_rng"
    modinfo = b"\0license=GPL\0depends=virtio_ring,virtio\0name=virtio_console\0"
    assert module_depends(b"junk" + modinfo) == ["virtio_ring", "virtio"]
    assert module_depends(b"no modinfo") == []


def test_load_order_puts_dependencies_first_and_skips_builtins() -> None:
    depends = {
        "virtio_pci": ["virtio_ring", "virtio"],
        "virtio": ["virtio_ring"],
        "virtio_ring": [],
        "virtio_console": ["virtio", "virtio_ring"],
    }
    order = module_load_order(["virtio_console", "virtio_pci", "virtio_rng"], depends)
    assert order == ["virtio_ring", "virtio", "virtio_console", "virtio_pci"]
    with pytest.raises(ImageError, match="cycle"):
        module_load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_elf_checks() -> None:
    assert elf_is_static(Path("/bin/busybox").read_bytes())
    assert not elf_is_static(Path("/bin/ls").read_bytes())
    assert not elf_is_static(b"#!/bin/sh\n")


def test_kernel_version_from_setup_header(guest_image: Path) -> None:
    version = kernel_version((guest_image / "vmlinuz").read_bytes())
    assert version and version[0].isdigit()
    fake = bytearray(0x400)
    fake[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", fake, 0x20E, 0x100)
    fake[0x300:0x310] = b"9.9.9-test (x)\0"
    assert kernel_version(bytes(fake)) == "9.9.9-test"


def test_second_build_does_nothing(tmp_path: Path, guest_image: Path) -> None:
    """A real build from the default image's kernel into a scratch directory, twice."""
    out = tmp_path / "image"
    first = build_image(output=out, kernel=guest_image / "vmlinuz")
    assert first.changed
    initrd = out / "initramfs.cpio.gz"
    members = read_cpio(gzip.decompress(initrd.read_bytes()))
    assert {"init", "bin/busybox", "bin/vmcache-agent", "etc/vmcache/modules"} <= members.keys()
    assert first.manifest["initrd_sha256"] and first.manifest["kernel_sha256"]
    mtime = initrd.stat().st_mtime_ns
    second = build_image(output=out, kernel=guest_image / "vmlinuz")
    assert not second.changed
    assert initrd.stat().st_mtime_ns == mtime
    done = subprocess.run([*VMCACHE, "image", "build", "--output", str(out), "--kernel",
                           str(guest_image / "vmlinuz")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "up to date; nothing to do" in done.stderr


def test_missing_kernel_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([*VMCACHE, "image", "build", "--output", str(tmp_path), "--kernel",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"vmcache: kernel not found: {tmp_path / 'nope'}"


def test_reseed_helper_is_a_working_static_binary(tmp_path: Path) -> None:
    """The hand-assembled helper runs: opens /dev/urandom and asks for a reseed."""
    helper = tmp_path / "vmcache-reseed"
    helper.write_bytes(static_elf(RESEED_CODE))
    helper.chmod(0o755)
    assert elf_is_static(helper.read_bytes())
    done = subprocess.run([str(helper)], timeout=10)
    assert done.returncode in (0, 1)  # 1 = EPERM where the host denies CAP_SYS_ADMIN
