"""Default locations on the host, in one place so the docs can point here.

==========  ===============================  =====================================
what        root                             other users
==========  ===============================  =====================================
data        ``/var/lib/vmcache``             ``$XDG_DATA_HOME/vmcache`` (or
                                             ``~/.local/share/vmcache``)
run         ``/run/vmcache``                 ``$XDG_RUNTIME_DIR/vmcache`` (or
                                             ``/tmp/vmcache-$UID``)
endpoint    ``<run>/cache.sock``             ``<run>/cache.sock``
==========  ===============================  =====================================

``VMCACHE_DATA_DIR`` and ``VMCACHE_RUN_DIR`` override the first two. The data
directory holds the default guest image (``<data>/image``); the run directory
holds one private directory per VM.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def default_data_dir() -> Path:
    """Where ``vmcache image build`` puts the default guest image."""
    if override := os.environ.get("VMCACHE_DATA_DIR"):
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/lib/vmcache")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "vmcache"


def default_image_dir() -> Path:
    """The directory of the default guest image: kernel, initramfs, manifest."""
    return default_data_dir() / "image"


def default_run_dir() -> Path:
    """Where each VM gets its private run directory (sockets, logs, pidfile)."""
    if override := os.environ.get("VMCACHE_RUN_DIR"):
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/vmcache")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "vmcache"
    return Path(f"/tmp/vmcache-{os.geteuid()}")


def default_endpoint() -> Path:
    """The daemon's Unix socket when neither the command line nor the config names one."""
    return default_run_dir() / "cache.sock"


#: What a VM id looks like (``secrets.token_hex(6)``); anything else names no VM of ours.
VM_ID_PATTERN = re.compile(r"[0-9a-f]{12}")


def vm_run_dir(run_root: Path, vm_id: str) -> Path | None:
    """The run directory of VM ``vm_id`` under ``run_root``, or None if the id is not one of ours.

    Code that removes a VM's directory uses this rather than a path it was given, so
    that a tampered handle or record can never make it remove anything else.
    """
    if not VM_ID_PATTERN.fullmatch(vm_id):
        return None
    return run_root / f"vm-{vm_id}"
