"""``accel = "auto"``: KVM when KVM guests work on this host, else TCG, learned once per host.

Some hosts have a ``/dev/kvm`` that opens but whose guests never come up (nested
virtualisation without the CPU features QEMU needs: QEMU aborts, or the guest
hangs). The only sure test is to boot a guest under KVM. That costs up to
``kvm_probe_timeout`` seconds, so its verdict is kept in a small file in the
state directory, keyed by what decides it (the QEMU binary, the host kernel and
the KVM device): the next daemon or ``run --direct`` on the same host reads it
instead of probing again. The fallback is logged once, when learned, as one line;
QEMU's own messages about it go to the debug log.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from . import safefile
from .errors import BootError

log = logging.getLogger("vmcache.accel")

KVM_DEVICE = Path("/dev/kvm")
T = TypeVar("T")


def kvm_device_opens() -> bool:
    try:
        os.close(os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def probe_key(qemu: Path) -> dict[str, object]:
    """What decides whether KVM guests work: QEMU's binary, the host kernel, the device."""
    def stat(path: Path) -> list[int]:
        try:
            info = path.stat()
        except OSError:
            return []
        return [info.st_size, info.st_mtime_ns, info.st_rdev]

    return {"qemu": str(qemu), "qemu_stat": stat(qemu), "kernel": os.uname().release,
            "boot_id": _boot_id(), "device": stat(KVM_DEVICE)}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class AccelChooser:
    """Chooses ``kvm`` or ``tcg`` for ``accel = "auto"``; owned by whoever boots VMs.

    One probe at a time: concurrent boots wait for the first one's verdict.
    """

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file = cache_file
        self.kvm_works: bool | None = None
        self._lock = trio.Lock()

    def _read_cache(self, key: dict[str, object]) -> bool | None:
        if self.cache_file is None:
            return None
        try:
            raw = safefile.read_small(self.cache_file.parent, self.cache_file.name)
            data = json.loads(raw) if raw is not None else None
        except (OSError, ValueError):  # a symlink or a stranger's directory: not believed
            return None
        if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("kvm"), bool):
            return None
        return bool(data["kvm"])

    def _write_cache(self, key: dict[str, object], works: bool) -> None:
        if self.cache_file is None:
            return
        try:
            self.cache_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Not through a symlink, and only into a directory of ours (vmcache.safefile).
            safefile.write_atomic(self.cache_file.parent, self.cache_file.name,
                                  json.dumps({"key": key, "kvm": works}).encode())
        except OSError as error:
            log.debug("cannot keep the KVM probe's result in %s: %s", self.cache_file, error.strerror)

    async def boot(self, qemu: Path, probe_timeout: float,
                   boot: Callable[[str, float | None], Awaitable[T]]) -> T:
        """Boot with ``boot(accel, timeout)``: ``timeout`` None means the normal boot timeout.

        The first boot on a host where KVM is unknown is the probe: a KVM boot bounded by
        ``probe_timeout``; if it fails, KVM is marked unusable and the boot is retried with TCG.
        """
        if self.kvm_works is False or not kvm_device_opens():
            return await boot("tcg", None)
        if self.kvm_works:
            return await boot("kvm", None)
        async with self._lock:
            if self.kvm_works is None:
                key = probe_key(qemu)
                self.kvm_works = self._read_cache(key)
                if self.kvm_works is None:
                    try:
                        result = await boot("kvm", probe_timeout)
                    except BootError as error:
                        self.kvm_works = False
                        self._write_cache(key, False)
                        log.warning("KVM guests do not come up on this host; using TCG "
                                    "(learned once, kept in %s)", self.cache_file or "memory")
                        log.debug("the KVM probe failed: %s", error)
                    else:
                        self.kvm_works = True
                        self._write_cache(key, True)
                        return result
                else:
                    log.debug("KVM %s on this host (from %s)",
                              "works" if self.kvm_works else "does not work", self.cache_file)
        return await boot("kvm" if self.kvm_works else "tcg", None)
