"""Which accelerator VMs run on: ``accel = "kvm"``, ``"tcg"``, or ``"auto"``, and whether TCG
is acceptable at all (``require_hardware_accel``).

``kvm`` never falls back: a KVM boot that fails is a boot failure like any other (the pool
retries it with backoff). ``tcg`` is full emulation. ``auto`` is KVM when KVM guests work on
this host, else TCG. QEMU's own security policy puts TCG outside what it supports as a
boundary for hostile guests, so a fall-back to TCG is never silent: its verdict and the
reason (no /dev/kvm, /dev/kvm not accessible, the KVM probe guest timed out, QEMU aborted
under KVM...) are logged as a warning, and the daemon logs the verdict once at each start,
also when it was read from the probe file. With ``require_hardware_accel`` TCG is refused
outright: no VM is booted on it, and a daemon answers hand-outs FAILED_PRECONDITION with a
message that says what to do.

Some hosts have a ``/dev/kvm`` that opens but whose guests never come up (nested
virtualisation without the CPU features QEMU needs: QEMU aborts, or the guest
hangs). The only sure test is to boot a guest under KVM. That costs up to
``kvm_probe_timeout`` seconds, so its verdict (and why) is kept in a small file in the
state directory, keyed by what decides it (the QEMU binary, the host kernel and
the KVM device): the next daemon or ``run --direct`` on the same host reads it
instead of probing again. QEMU's own messages about a failed probe go to the debug log.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from . import safefile
from .errors import BootError, HardwareAccelRequiredError

log = logging.getLogger("vmcache.accel")

KVM_DEVICE = Path("/dev/kvm")
T = TypeVar("T")

_EXITED = re.compile(r"QEMU exited with status (-?\d+)")


@attrs.frozen
class Verdict:
    """The accelerator VMs boot with, and why (one line, for logs and Status)."""

    accel: str  # "kvm" or "tcg"
    reason: str


def kvm_device_problem() -> str | None:
    """Why ``/dev/kvm`` cannot be used by this process, or None when it opens."""
    try:
        os.close(os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        return (f"there is no {KVM_DEVICE} (no hardware virtualisation, or the kvm_intel/kvm_amd "
                "module is not loaded)")
    except PermissionError:
        return (f"{KVM_DEVICE} is not accessible to uid {os.getuid()} (add the daemon's user to "
                f"the device's group, usually kvm)")
    except OSError as error:
        why = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
        return f"{KVM_DEVICE} cannot be opened: {why}"
    return None


def kvm_device_opens() -> bool:
    return kvm_device_problem() is None


def probe_failure_reason(error: BootError, timeout: float) -> str:
    """One line on why the KVM probe failed, from the boot error (whose full text, with the
    console lines, goes to the debug log)."""
    text = str(error)
    exited = _EXITED.search(text)
    if exited:
        status = int(exited.group(1))
        if status == -6:
            return "QEMU aborted (SIGABRT) when it started a KVM guest"
        if status < 0:
            return f"QEMU was killed by signal {-status} when it started a KVM guest"
        return f"QEMU exited with status {status} when it started a KVM guest"
    if "did not become ready within" in text:
        return f"the KVM probe guest did not come up within {timeout:g} s (kvm_probe_timeout)"
    return f"the KVM probe boot failed: {text.split('; last console lines')[0][:200]}"


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
    """Chooses ``kvm`` or ``tcg`` for each boot; owned by whoever boots VMs (one per daemon).

    ``configured`` is the config's ``accel``; ``require_hardware`` its
    ``require_hardware_accel``. ``daemon``: this chooser belongs to a daemon, which logs
    every verdict (once per start, see :meth:`announce_at_start`); a one-shot boot
    (``run --direct``) logs only what a probe learns, as a warning, once per host. Under
    ``auto``, one probe at a time: concurrent boots wait for the first one's verdict.
    """

    def __init__(self, cache_file: Path | None, configured: str = "auto",
                 require_hardware: bool = False, *, daemon: bool = False) -> None:
        self.cache_file = cache_file
        self.configured = configured
        self.require_hardware = require_hardware
        self.daemon = daemon
        #: Under auto: whether KVM guests come up here (None: not known yet).
        self.kvm_works: bool | None = None
        #: What VMs boot with, and why; None while auto's probe has not decided.
        self.verdict: Verdict | None = None
        #: Set once hand-outs are refused (require_hardware and the verdict is TCG).
        self.refused = trio.Event()
        self._announced: Verdict | None = None
        self._lock = trio.Lock()

    # ------------------------------------------------------------ the verdict

    def announce_at_start(self, qemu: Path) -> Verdict | None:
        """Decide what can be decided without booting, and log it in one line (a daemon calls
        this once at start). Under ``auto`` with no verdict kept, returns None: the first
        boot is the probe, and its verdict is logged when it comes."""
        if self.configured == "tcg":
            self._decide(Verdict("tcg", 'accel = "tcg" in the config'))
        elif self.configured == "kvm":
            problem = kvm_device_problem()
            self._decide(Verdict("kvm", 'accel = "kvm" in the config' + (
                f", but {problem}: every boot fails until that is fixed (never falls back to TCG)"
                if problem else "")), warn=problem is not None)
        elif (problem := kvm_device_problem()) is not None:
            self.kvm_works = False
            self._decide(Verdict("tcg", problem))
        elif (kept := self._read_cache(probe_key(qemu))) is not None:
            self.kvm_works = kept.accel == "kvm"
            self._decide(kept)
        else:
            log.info("accel auto: the first boot probes KVM (a KVM guest within kvm_probe_timeout)")
        return self.verdict

    def refusal(self) -> str | None:
        """The message hand-outs are refused with, or None: refused when TCG is all there is
        and ``require_hardware_accel`` is on."""
        if not self.require_hardware or self.verdict is None or self.verdict.accel != "tcg":
            return None
        return (f"this host serves only hardware-accelerated VMs (require_hardware_accel = true), "
                f"and VMs here would run on TCG: {self.verdict.reason}. Make KVM work on this host "
                f"(accel = \"kvm\" or \"auto\"), or set hypervisor.qemu.require_hardware_accel = "
                f"false to accept TCG VMs")

    def _decide(self, verdict: Verdict, *, warn: bool = False, learned: bool = False) -> None:
        """Keep ``verdict`` and log it in one line: a daemon's chooser logs each verdict once
        (per daemon start), another only one a probe has just ``learned``."""
        self.verdict = verdict
        refusal = self.refusal()
        if refusal is not None:
            self.refused.set()
        # A refusal outside a daemon is the error the boot raises: no line of its own.
        if self._announced == verdict or not (self.daemon or learned) or (refusal and not self.daemon):
            log.debug("accel %s: %s (%s)", self.configured, verdict.accel, verdict.reason)
            return
        self._announced = verdict
        if refusal is not None:
            log.error("refusing to boot or hand out VMs: %s", refusal)
        elif verdict.accel == "tcg" and self.configured == "auto":
            log.warning("accel auto: VMs run on TCG (full emulation, outside what QEMU supports "
                        "as a security boundary for hostile guests): %s", verdict.reason)
        else:
            log.log(logging.WARNING if warn else logging.INFO, "accel %s: VMs run on %s (%s)",
                    self.configured, verdict.accel.upper(), verdict.reason)

    def _refuse_tcg(self) -> None:
        refusal = self.refusal()
        if refusal is not None:
            raise HardwareAccelRequiredError(refusal)

    # ------------------------------------------------------------ the probe file

    def _read_cache(self, key: dict[str, object]) -> Verdict | None:
        if self.cache_file is None:
            return None
        try:
            raw = safefile.read_small(self.cache_file.parent, self.cache_file.name)
            data = json.loads(raw) if raw is not None else None
        except (OSError, ValueError):  # a symlink or a stranger's directory: not believed
            return None
        if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("kvm"), bool):
            return None
        reason = data.get("reason") if isinstance(data.get("reason"), str) else ""
        when = data.get("at")
        since = (f", probed {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}"
                 if isinstance(when, int | float) else "")
        kept = f"kept in {self.cache_file}{since}; remove it to probe again"
        if data["kvm"]:
            return Verdict("kvm", f"a KVM guest came up in an earlier probe ({kept})")
        return Verdict("tcg", f"KVM guests do not come up on this host: "
                              f"{reason or 'an earlier probe failed'} ({kept})")

    def _write_cache(self, key: dict[str, object], works: bool, reason: str) -> None:
        if self.cache_file is None:
            return
        try:
            self.cache_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Not through a symlink, and only into a directory of ours (vmcache.safefile).
            verdict = {"key": key, "kvm": works, "reason": reason, "at": time.time()}
            safefile.write_atomic(self.cache_file.parent, self.cache_file.name, json.dumps(verdict).encode())
        except OSError as error:
            log.debug("cannot keep the KVM probe's result in %s: %s", self.cache_file, error.strerror)

    # ------------------------------------------------------------ booting

    async def boot(self, qemu: Path, probe_timeout: float,
                   boot: Callable[[str, float | None], Awaitable[T]]) -> T:
        """Boot with ``boot(accel, timeout)``: ``timeout`` None means the normal boot timeout.

        ``kvm`` and ``tcg`` boot as configured: ``kvm`` never falls back (its failures are
        boot failures, retried by the caller). Under ``auto``, the first boot on a host where
        KVM is unknown is the probe: a KVM boot bounded by ``probe_timeout``; if it fails, KVM
        is marked unusable and the boot is retried with TCG. With ``require_hardware_accel``,
        a boot that would run on TCG raises :class:`HardwareAccelRequiredError` instead, and
        starts nothing.
        """
        if self.configured == "kvm":
            if self.verdict is None:
                self.verdict = Verdict("kvm", 'accel = "kvm" in the config')
            return await boot("kvm", None)
        if self.configured == "tcg":
            if self.verdict is None:
                self._decide(Verdict("tcg", 'accel = "tcg" in the config'))
            self._refuse_tcg()
            return await boot("tcg", None)
        if self.kvm_works is None:
            async with self._lock:
                if self.kvm_works is None:
                    probed = await self._probe(qemu, probe_timeout, boot)
                    if probed is not None:
                        return probed[0]
        if self.kvm_works:
            return await boot("kvm", None)
        self._refuse_tcg()
        return await boot("tcg", None)

    async def _probe(self, qemu: Path, probe_timeout: float,
                     boot: Callable[[str, float | None], Awaitable[T]]) -> tuple[T] | None:
        """Decide ``kvm_works``: from the device, the probe file, else by booting under KVM.
        Returns the VM booted if that probe worked (in a one-tuple), else None."""
        problem = kvm_device_problem()
        if problem is not None:
            self.kvm_works = False
            self._decide(Verdict("tcg", problem))
            return None
        key = probe_key(qemu)
        kept = self._read_cache(key)
        if kept is not None:
            self.kvm_works = kept.accel == "kvm"
            self._decide(kept)
            return None
        started = time.monotonic()
        try:
            result = await boot("kvm", probe_timeout)
        except BootError as error:
            reason = probe_failure_reason(error, probe_timeout)
            self.kvm_works = False
            self._write_cache(key, False, reason)
            log.debug("the KVM probe failed: %s", error)
            self._decide(Verdict("tcg", f"KVM guests do not come up on this host: {reason} "
                                        f"(learned once, kept in {self.cache_file or 'memory'})"),
                         learned=True)
            return None
        self.kvm_works = True
        reason = f"a KVM guest came up in {time.monotonic() - started:.1f} s"
        self._write_cache(key, True, reason)
        self._decide(Verdict("kvm", reason), learned=True)
        return (result,)
