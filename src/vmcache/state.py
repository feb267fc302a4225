"""Records of the VMs a daemon is responsible for, so that a crash leaks nothing.

A daemon killed with SIGKILL (or by the OOM killer) cannot stop its cached VMs,
and they run in their own session, so they live on. Each VM therefore has a
record in the daemon's state directory from the moment QEMU starts until it is
stopped or handed out. The next daemon on the same endpoint reads the records
left behind and kills those VMs, but only after checking that the pid is still
that QEMU (same start time, and its command line names the VM), so a reused pid
is never killed. Handed-out VMs have no record: they belong to their clients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import trio

from .process import PidfdProcess, stop_process
from .procfs import cmdline, process_start_time
from .qemu import VM, make_private_dir

log = logging.getLogger("vmcache.state")


def state_dir_for(run_root: Path, endpoint: Path) -> Path:
    """The state directory of the daemon serving ``endpoint`` (one per endpoint)."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(endpoint))).hexdigest()[:16]
    return run_root / "state" / digest


class VMRegistry:
    """The records of one daemon's VMs (``<state>/vm-<id>.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def prepare(self) -> None:
        """Create the directory (0700) and check it is writable; a ConfigError if not."""
        make_private_dir(self.path.parent)
        make_private_dir(self.path)
        probe = self.path / ".write-test"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            from .errors import ConfigError

            raise ConfigError(f"state directory {self.path} is not writable: {error.strerror}") from None

    def _record(self, vm_id: str) -> Path:
        return self.path / f"vm-{vm_id}.json"

    def add(self, vm: VM) -> None:
        """Remember a VM whose QEMU has just started."""
        record = {
            "id": vm.id,
            "pid": vm.pid,
            "start_time": process_start_time(vm.pid),
            "run_dir": str(vm.run_dir),
        }
        partial = self.path / f".vm-{vm.id}.partial"
        try:
            partial.write_text(json.dumps(record))
            partial.replace(self._record(vm.id))
        except OSError as error:
            log.error("cannot record VM %s in %s: %s", vm.id, self.path, error.strerror)

    def remove(self, vm: VM) -> None:
        """Forget a VM: it was stopped, or it was handed out and is not ours any more."""
        self._record(vm.id).unlink(missing_ok=True)

    async def recover(self) -> int:
        """Kill the VMs a previous daemon left behind; returns how many were killed."""
        killed = 0
        for record_path in sorted(self.path.glob("vm-*.json")):
            try:
                record = json.loads(record_path.read_text())
                vm_id, pid = str(record["id"]), int(record["pid"])
                start_time, run_dir = int(record["start_time"]), Path(record["run_dir"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable record %s", record_path)
                record_path.unlink(missing_ok=True)
                continue
            process = PidfdProcess(pid, start_time)
            try:
                ours = start_time and f"vmcache-{vm_id}".encode() in cmdline(pid)
                if process.returncode is None and ours:
                    log.warning("killing VM %s (pid %d) that a previous daemon left behind", vm_id, pid)
                    with trio.CancelScope(shield=True):
                        await stop_process(process, None, term_grace=2.0)
                    killed += 1
            finally:
                process.close()
            if run_dir.name == f"vm-{vm_id}":
                shutil.rmtree(run_dir, ignore_errors=True)
            record_path.unlink(missing_ok=True)
        return killed
