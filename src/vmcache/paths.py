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

import errno
import os
import re
import stat
from pathlib import Path

from .errors import ConfigError


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
    fallback = FALLBACK_RUN_PARENT / f"vmcache-{os.geteuid()}"
    check_fallback_run_dir(fallback)
    return fallback


#: Where the run directory falls back to with no XDG_RUNTIME_DIR: a world-writable place.
FALLBACK_RUN_PARENT = Path("/tmp")


def check_fallback_run_dir(path: Path) -> None:
    """Refuse a fallback run directory in a shared place (``/tmp/vmcache-$UID``) that exists
    and is not our own private directory: another user could have made it first (a symlink,
    a directory of theirs, or one that is ours but open to others) to read our sockets or
    plant files in it. One that does not exist yet is made 0700 by whoever needs it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise ConfigError(f"cannot check the run directory {path}: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the run directory {path} is not a directory (a symlink?): it is not "
                          "ours; remove it, or set XDG_RUNTIME_DIR or VMCACHE_RUN_DIR")
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
        raise ConfigError(f"the run directory {path} belongs to uid {info.st_uid} with mode "
                          f"{stat.S_IMODE(info.st_mode):04o}, not to uid {os.geteuid()} with mode "
                          "0700: remove it, or set XDG_RUNTIME_DIR or VMCACHE_RUN_DIR")


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


def make_private_dir(path: Path, *, enforce: bool = True) -> None:
    """Create ``path`` (and parents) with mode 0700; a ConfigError if it is a symlink.

    With ``enforce`` an existing directory is set to 0700 too, and one that belongs to
    someone else is refused (we would put our records or VMs into their directory); without,
    it is left as it is (a run root a library user shares, 0710 for a socket group, o+x for
    the jail).
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create directory {path}: {error.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError(f"{path} is not a directory (a symlink?): remove it") from None
        raise ConfigError(f"cannot open directory {path}: {error.strerror}") from None
    try:
        owner = os.fstat(fd).st_uid
        if enforce and owner != os.geteuid():
            raise ConfigError(f"directory {path} belongs to uid {owner}, not to us "
                              f"(uid {os.geteuid()}): remove it or choose another run directory")
        if enforce:
            os.fchmod(fd, 0o700)
    except OSError as error:
        raise ConfigError(f"cannot make directory {path} private: {error.strerror}") from None
    finally:
        os.close(fd)
