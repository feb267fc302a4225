"""Records of the VMs a daemon is responsible for, so that no exit path leaks one.

Every VM a daemon starts has a record in the daemon's state directory from the
moment its QEMU process exists until the process is gone. The record says what
the VM is to the daemon (its *role*):

``cached``
    in the cache: booting, ready, or set aside for a client that asked;
``offered``
    handed to a ``TakeVM`` client that has not claimed it yet (written by daemons
    before 2026-11-28; an offered VM's record now stays ``cached``, which a next
    daemon treats alike);
``leased``
    bound to a client's open ``TakeVM`` call;
``claimed``
    belongs to its client (after a claim, or a Kata ``GetBaseVM``); the daemon
    still enforces its TTL and cleans up after it when it exits.

A daemon killed with SIGKILL (or by the OOM killer) cannot act on any of that,
and QEMU runs in its own session, so the VMs live on. The next daemon on the same
endpoint reads the records: cached, offered and leased VMs are killed (nobody
holds them any more), claimed VMs that still run are adopted by its ledger, and
the run directories of VMs that are gone are removed. A pid is only ever
signalled after checking it is still that QEMU (start time and command line).
"""

from __future__ import annotations

import contextlib
import errno
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
from .errors import ConfigError
from .paths import vm_run_dir
from .process import open_vm_process, stop_process
from .procfs import find_vm_process, jail_pids, process_start_time

log = logging.getLogger("vmcache.state")

ROLES = ("cached", "offered", "leased", "claimed")


def state_dir_for(run_root: Path, endpoint: Path) -> Path:
    """The state directory of the daemon serving ``endpoint`` (one per endpoint)."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(endpoint))).hexdigest()[:16]
    return run_root / "state" / digest


@attrs.frozen
class VMRecord:
    """What survives a daemon about one of its VMs."""

    id: str
    pid: int
    start_time: int
    role: str = "cached"
    owner_uid: int = -1
    handed_at: float = 0.0
    #: Unix time the VM's TTL ends; 0 = no TTL.
    expires_at: float = 0.0
    #: The handle its client got (for claimed VMs, so a new daemon can stop them at TTL).
    handle: dict[str, Any] | None = None


_CONVERTER = cattrs.Converter(forbid_extra_keys=True)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700; a ConfigError if it is a symlink or
    belongs to someone else (we would write our records into their directory)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            owner = os.fstat(fd).st_uid
            if owner != os.geteuid():
                raise ConfigError(f"directory {path} belongs to uid {owner}, not to us "
                                  f"(uid {os.geteuid()}): remove it or choose another run directory")
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError(f"{path} is not a directory (a symlink?): remove it") from None
        raise ConfigError(f"cannot create directory {path}: {error.strerror}") from None


class VMRegistry:
    """The records of one daemon's VMs: ``<state>/vm-<id>.json``, written atomically."""

    def __init__(self, path: Path, run_root: Path) -> None:
        self.path = path
        self.run_root = run_root

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

    def write(self, record: VMRecord) -> None:
        """Create or replace a record (atomically: a crash leaves the old or the new one;
        never through a symlink, only in our own directory: see vmcache.safefile)."""
        try:
            safefile.write_atomic(self.path, self._name(record.id),
                                  json.dumps(_CONVERTER.unstructure(record)).encode())
        except OSError as error:
            log.error("cannot record VM %s in %s: %s", record.id, self.path, error.strerror)

    def add(self, vm_id: str) -> None:
        """Remember a VM about to be started (role ``cached``), before its QEMU exists.

        Written first, so that a daemon killed at any instant, even between starting
        QEMU and learning its pid, leaves a record: the next daemon then finds that
        QEMU by its command line (``-name vmcache-<id>``).
        """
        self.write(VMRecord(vm_id, 0, 0))

    def started(self, vm_id: str, pid: int) -> None:
        """The VM's QEMU now runs as ``pid``."""
        self.write(VMRecord(vm_id, pid, process_start_time(pid)))

    def remove(self, vm_id: str) -> None:
        """Forget a VM: its QEMU process is gone."""
        try:
            safefile.remove(self.path, self._name(vm_id))
        except OSError as error:
            log.error("cannot remove the record of VM %s in %s: %s", vm_id, self.path, error.strerror)

    def load(self) -> list[VMRecord]:
        """Every readable record; unreadable ones are logged and removed."""
        records = []
        for path in sorted(self.path.glob("vm-*.json")):
            try:
                data = safefile.read_small(self.path, path.name)
                if data is None:
                    continue
                record = _CONVERTER.structure(json.loads(data), VMRecord)
                if path.name != self._name(record.id) or record.role not in ROLES:
                    raise ValueError("inconsistent record")
            except (OSError, ValueError, TypeError, cattrs.BaseValidationError):
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

    async def recover(self) -> tuple[int, list[VMRecord]]:
        """Deal with what a previous daemon left: returns (VMs killed, claimed VMs still running).

        The caller adopts the claimed VMs it gets back; everything else is settled here.
        """
        killed = 0
        claimed: list[VMRecord] = []
        for record in self.load():
            half_started = record.pid == 0
            if half_started:  # killed while starting it: find it by its command line
                found = find_vm_process(record.id)
                record = attrs.evolve(record, pid=found, start_time=process_start_time(found))
            process = open_vm_process(record.id, record.pid, record.start_time)
            if process is not None and record.role == "claimed":
                process.close()
                claimed.append(record)
                continue
            if process is not None:
                log.warning("killing %s VM %s (pid %d) that a previous daemon left behind",
                            record.role, record.id, record.pid)
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
