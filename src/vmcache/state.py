"""Records of the VMs a daemon is responsible for, so that no exit path leaks one.

Every VM a daemon starts has a record in the daemon's state directory from the
moment its QEMU process exists until the process is gone: its
:class:`~vmcache.lifecycle.VMLife` as of the last write. The phase stored is
``booting`` while it is in the cache (its record is written when QEMU starts and
not again until it is handed out: an offer costs no write either), ``leased``
(bound to a client's open ``TakeVM`` call) or ``claimed`` (its client's, after a
claim or a Kata ``GetBaseVM``; the daemon still enforces its TTL and cleans up
after it when it exits). A record of an older daemon says ``role`` (``cached``,
``offered``, ``leased``, ``claimed``) instead of ``phase``, and repeats the id, pid
and start time inside its handle; both are read.

A daemon killed with SIGKILL (or by the OOM killer) cannot act on any of that,
and QEMU runs in its own session, so the VMs live on. The next daemon on the same
endpoint reads the records: VMs in the cache, offered and leased VMs are killed (nobody
holds them any more), claimed VMs that still run are adopted by its ledger, and
the run directories of VMs that are gone are removed. A pid is only ever
signalled after checking it is still that QEMU (start time and command line).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import attrs
import cattrs
import trio

from . import safefile
from .cgroup import manager as cgroup_manager
from .errors import ConfigError, VmcacheError
from .handle import VMHandle
from .lifecycle import Phase, VMLife
from .paths import make_private_dir, vm_run_dir
from .process import open_vm_process, stop_process
from .procfs import find_vm_process, jail_pids, process_start_time

log = logging.getLogger("vmcache.state")

#: The roles records of older daemons have instead of a phase.
_OLD_ROLES = {"cached": Phase.BOOTING, "offered": Phase.OFFERED, "leased": Phase.LEASED,
              "claimed": Phase.CLAIMED}
#: Kept once, at the top of a record, not again in its handle.
_IDENTITY = ("id", "pid", "start_time")


def state_dir_for(run_root: Path, endpoint: Path) -> Path:
    """The state directory of the daemon serving ``endpoint`` (one per endpoint)."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(endpoint))).hexdigest()[:16]
    return run_root / "state" / digest


@attrs.frozen
class _Stored:
    """A record as the file has it (of this daemon or an older one)."""

    id: str
    pid: int
    start_time: int
    phase: str = ""
    role: str = ""  # an older daemon's record
    owner_uid: int = -1
    handed_at: float = 0.0
    expires_at: float = 0.0
    handle: dict[str, Any] | None = None

    def life(self) -> VMLife:
        """The VMLife recorded; a ValueError for a phase or role we do not know."""
        phase = Phase(self.phase) if self.phase else _OLD_ROLES[self.role] if self.role else Phase.BOOTING
        handle = None
        if self.handle is not None:
            identity = {"id": self.id, "pid": self.pid, "start_time": self.start_time}
            # An older record repeats the identity in its handle: one that disagrees is no handle.
            if all(self.handle.get(key, value) == value for key, value in identity.items()):
                with contextlib.suppress(VmcacheError):
                    handle = VMHandle.from_dict({**self.handle, **identity})
        return VMLife(self.id, self.pid, self.start_time, phase, owner_uid=self.owner_uid,
                      handed_at=self.handed_at, expires_at=self.expires_at, handle=handle)


def _stored(life: VMLife) -> dict[str, Any]:
    handle = None
    if life.handle is not None:
        handle = {key: value for key, value in life.handle.to_dict().items() if key not in _IDENTITY}
    return {"id": life.id, "pid": life.pid, "start_time": life.start_time, "phase": life.phase.value,
            "owner_uid": life.owner_uid, "handed_at": life.handed_at, "expires_at": life.expires_at,
            "handle": handle}


_CONVERTER = cattrs.Converter(forbid_extra_keys=True)


class VMRegistry:
    """The records of one daemon's VMs: ``<state>/vm-<id>.json``, written atomically; and
    each VM's :class:`VMLife`, from its start until its record is removed (the pool and
    the ledger move the same one)."""

    def __init__(self, path: Path, run_root: Path) -> None:
        self.path = path
        self.run_root = run_root
        self._lives: dict[str, VMLife] = {}

    def prepare(self) -> None:
        """Create the directory (0700) and check it is writable; a ConfigError if not."""
        make_private_dir(self.path.parent)
        make_private_dir(self.path)
        try:
            safefile.write_atomic(self.path, ".write-test", b"")
            safefile.remove(self.path, ".write-test")
        except OSError as error:
            raise ConfigError(f"state directory {self.path} is not writable: {error.strerror}") from None

    @staticmethod
    def _name(vm_id: str) -> str:
        return f"vm-{vm_id}.json"

    def write(self, life: VMLife) -> None:
        """Create or replace a VM's record (atomically: a crash leaves the old or the new
        one; never through a symlink, only in our own directory: see vmcache.safefile)."""
        self._lives[life.id] = life
        try:
            safefile.write_atomic(self.path, self._name(life.id), json.dumps(_stored(life)).encode())
        except OSError as error:
            log.error("cannot record VM %s in %s: %s", life.id, self.path, error.strerror)

    def add(self, vm_id: str) -> VMLife:
        """Remember a VM about to be started (phase ``booting``), before its QEMU exists.

        Written first, so that a daemon killed at any instant, even between starting
        QEMU and learning its pid, leaves a record: the next daemon then finds that
        QEMU by its command line (``-name vmcache-<id>``).
        """
        life = VMLife(vm_id)
        self.write(life)
        return life

    def life(self, vm_id: str) -> VMLife | None:
        """The life of VM ``vm_id`` if this registry records it."""
        return self._lives.get(vm_id)

    def remove(self, vm_id: str) -> None:
        """Forget a VM: its QEMU process is gone."""
        self._lives.pop(vm_id, None)
        try:
            safefile.remove(self.path, self._name(vm_id))
        except OSError as error:
            log.error("cannot remove the record of VM %s in %s: %s", vm_id, self.path, error.strerror)

    def load(self) -> list[VMLife]:
        """Every readable record; unreadable ones are logged and removed."""
        records = []
        for path in sorted(self.path.glob("vm-*.json")):
            try:
                data = safefile.read_small(self.path, path.name)
                if data is None:
                    continue
                record = _CONVERTER.structure(json.loads(data), _Stored).life()
                if path.name != self._name(record.id):
                    raise ValueError("inconsistent record")
            except (OSError, ValueError, TypeError, KeyError, cattrs.BaseValidationError):
                log.warning("ignoring an unreadable record %s", path)
                with contextlib.suppress(OSError):
                    safefile.remove(self.path, path.name)
                continue
            records.append(record)
        return records

    def remove_run_dir(self, vm_id: str) -> None:
        """Remove a VM's run directory, found from its id (never from a path we were given)."""
        run_dir = vm_run_dir(self.run_root, vm_id)
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
            if (cgroup := cgroup_manager().of(vm_id)) is not None:
                cgroup.remove()

    async def recover(self) -> tuple[int, list[VMLife]]:
        """Deal with what a previous daemon left: returns (VMs killed, claimed VMs still running).

        The caller adopts the claimed VMs it gets back; everything else is settled here.
        """
        killed = 0
        claimed: list[VMLife] = []
        for record in self.load():
            half_started = record.pid == 0
            if half_started:  # killed while starting it: find it by its command line
                record.pid = find_vm_process(record.id)
                record.start_time = process_start_time(record.pid)
            process = open_vm_process(record.id, record.pid, record.start_time)
            if process is not None and record.phase is Phase.CLAIMED:
                process.close()
                claimed.append(record)
                continue
            if process is not None:
                log.warning("killing VM %s (pid %d, %s when last recorded) that a previous daemon "
                            "left behind", record.id, record.pid, record.phase)
                try:
                    with trio.CancelScope(shield=True):
                        await stop_process(process, None, term_grace=2.0)
                finally:
                    process.close()
                killed += 1
            # A jail whose set-up the killed daemon left (its record never got a pid): one
            # scan of /proc for those only, not for every record.
            for pid in jail_pids(record.id) if half_started else ():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.remove_run_dir(record.id)
            self.remove(record.id)
        cgroup_manager().sweep()  # those of VMs their owners stopped, or a killed daemon's
        return killed, claimed
