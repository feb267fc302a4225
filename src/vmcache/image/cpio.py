"""cpio "newc" archives, the format of a Linux initramfs: a pure writer and a small reader.

The writer is deterministic (owner root, every mtime zero, inodes numbered in
order), so the same entries always give the same bytes and a rebuild can tell
that nothing changed.

The reader exists to check an initramfs someone else made (a config naming its
own ``initrd`` without a root image must carry python3 and the agent): it
undoes the compressions the kernel's initramfs loader is commonly given (gzip,
xz, zstd through the ``zstd`` tool, or none) and follows concatenated archives,
such as an uncompressed early-microcode archive in front of the compressed one.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ImageError

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000

NEWC_MAGIC = b"070701"
NEWC_CRC_MAGIC = b"070702"
TRAILER = "TRAILER!!!"
_HEADER_SIZE = 110

#: How long decompressing an initrd with an external tool may take.
DECOMPRESS_TIMEOUT = 120.0


@dataclass(frozen=True)
class CpioEntry:
    """One member of a cpio archive. ``data`` is file content or a link target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> int:
        return self.mode & S_IFMT


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
    trailer = CpioEntry(TRAILER, 0)
    for inode, entry in enumerate([*entries, trailer], start=1):
        name = entry.name.encode() + b"\0"
        is_trailer = entry is trailer
        nlink = 2 if entry.kind == S_IFDIR else 1
        fields = (
            0 if is_trailer else inode,
            entry.mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            len(entry.data),
            0,  # devmajor
            0,  # devminor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
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
# reading
# --------------------------------------------------------------------------


def _normalise(name: str) -> str:
    """``./usr/bin/x`` and ``/usr/bin/x`` -> ``usr/bin/x`` (how the kernel treats them)."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _read_one(data: bytes, offset: int, members: dict[str, CpioEntry]) -> int:
    """Read one newc archive at ``offset`` into ``members``; return the offset past its trailer."""
    while True:
        magic = data[offset:offset + 6]
        if magic not in (NEWC_MAGIC, NEWC_CRC_MAGIC):
            raise ImageError(f"not a cpio newc archive (bad header at byte {offset})")
        try:
            fields = [int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ImageError(f"corrupt cpio header at byte {offset}") from None
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_start = offset + _HEADER_SIZE
        name = data[name_start:name_start + namesize - 1].decode("utf-8", "replace")
        data_start = name_start + namesize + (-(_HEADER_SIZE + namesize) % 4)
        if data_start + size > len(data):
            raise ImageError(f"cpio archive truncated in {name!r}")
        body = data[data_start:data_start + size]
        offset = data_start + size + (-size % 4)
        if name == TRAILER:
            return offset
        members[_normalise(name)] = CpioEntry(_normalise(name), mode, body, rdev)


def read_cpio(data: bytes) -> dict[str, CpioEntry]:
    """The members of one uncompressed newc archive (later members win), by normalised name."""
    members: dict[str, CpioEntry] = {}
    _read_one(data, 0, members)
    return members


def _decompress(data: bytes) -> tuple[bytes, bytes]:
    """Decompress the stream at the start of ``data``: (its content, what follows it)."""
    if data[:2] == b"\x1f\x8b":
        decompressor = zlib.decompressobj(wbits=31)
        content = decompressor.decompress(data)
        return content, decompressor.unused_data
    if data[:6] == b"\xfd7zXZ\x00":
        xz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        content = xz.decompress(data)
        return content, xz.unused_data
    if data[:4] == b"\x28\xb5\x2f\xfd":
        tool = shutil.which("zstd")
        if tool is None:
            raise ImageError("the initrd is zstd-compressed: install zstd to check it")
        try:
            done = subprocess.run([tool, "-dcq"], input=data, capture_output=True,
                                  timeout=DECOMPRESS_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise ImageError(f"zstd took longer than {DECOMPRESS_TIMEOUT:g} s") from None
        if done.returncode != 0 and not done.stdout:
            raise ImageError("the initrd is not valid zstd data")
        return done.stdout, b""  # zstd -d reads concatenated frames as one stream
    kinds = {b"BZh": "bzip2", b"\x02!L\x18": "lz4", b"\x89LZO": "lzo", b"\x5d\x00\x00": "lzma"}
    for prefix, kind in kinds.items():
        if data.startswith(prefix):
            raise ImageError(f"the initrd is {kind}-compressed, which vmcache cannot read: "
                             "use gzip, xz, zstd or none")
    raise ImageError("the initrd is not a cpio archive (nor gzip, xz or zstd data)")


def read_initrd(data: bytes) -> dict[str, CpioEntry]:
    """The members of an initramfs as the kernel sees them.

    Handles concatenated archives, each uncompressed or compressed (gzip, xz,
    zstd), with zero padding in between; later members override earlier ones.
    """
    members: dict[str, CpioEntry] = {}
    rest = data
    while rest:
        stripped = rest.lstrip(b"\0")
        if not stripped:
            break
        if stripped[:6] in (NEWC_MAGIC, NEWC_CRC_MAGIC):
            end = _read_one(stripped, 0, members)
            rest = stripped[end:]
            continue
        content, rest = _decompress(stripped)
        while content.lstrip(b"\0"):
            content = content.lstrip(b"\0")
            end = _read_one(content, 0, members)
            content = content[end:]
    return members


def resolve_path(members: dict[str, CpioEntry], path: str, limit: int = 20) -> CpioEntry | None:
    """The entry ``path`` names inside an archive, following symlinks (absolute or relative)
    in every component, as the guest would once this archive is its root; None if absent."""
    parts = [part for part in _normalise(path).split("/") if part]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        current = "/".join([*resolved, part])
        entry = members.get(current)
        if entry is None:
            if not parts:
                return None
            resolved.append(part)  # an archive may leave out its directories' own entries
            continue
        if entry.kind == S_IFLNK:
            hops += 1
            if hops > limit:
                return None
            target = entry.data.decode("utf-8", "replace")
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    if not resolved:
        return None
    return members.get("/".join(resolved))
