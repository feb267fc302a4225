"""The guest image: kernel, initramfs and root filesystem image.

One module per job: :mod:`.cpio` (the initramfs archive format), :mod:`.kernel`
(finding the kernel; its modules in load order), :mod:`.rootfs` (the Debian root
image), :mod:`.build` (putting it together, the manifest, "nothing changed").
"""

from __future__ import annotations

from .build import (
    AGENT_DIR,
    AGENT_FILES,
    HELPER_FILES,
    INITRD_FILE,
    KERNEL_FILE,
    MANIFEST_FILE,
    BuildResult,
    build_image,
    image_id,
    read_manifest,
)
from .cpio import read_initrd, resolve_path
from .rootfs import ROOTFS_FILE, ROOTFS_TYPE, pack_directory

__all__ = [
    "AGENT_DIR",
    "AGENT_FILES",
    "HELPER_FILES",
    "INITRD_FILE",
    "KERNEL_FILE",
    "MANIFEST_FILE",
    "ROOTFS_FILE",
    "ROOTFS_TYPE",
    "BuildResult",
    "build_image",
    "image_id",
    "pack_directory",
    "read_initrd",
    "read_manifest",
    "resolve_path",
]
