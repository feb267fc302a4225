"""Which process is a VM's QEMU: a record the launcher writes, checked against /proc.

A VM handle is user input: its ``pid`` and ``start_time`` may name any process, and a
process's command line is no proof (``exec -a vmcache-<id> sleep 60`` makes one that
names any VM). What cannot be forged is what the launching process saw and wrote
itself, right after starting QEMU, into the VM's run directory: ``vm.json``, the
*identity record*, owned by the launcher (the run root's owner), mode 0644, written
atomically and never through a symlink (see :mod:`vmcache.safefile`)::

    {"version": 1, "id": "0123456789ab", "pid": 4250, "start_time": 81234,
     "uid": 0, "qemu": "/usr/bin/qemu-system-x86_64", "qemu_dev": 2049, "qemu_ino": 1234}

``pid`` is QEMU's host pid, ``start_time`` its start in clock ticks since boot, ``uid``
the uid QEMU runs as, ``qemu`` the binary (and its device and inode at start, so a
QEMU upgraded since still matches its running process).

Before anything is done to a VM through a handle (stop, exec, cp), :func:`open_verified`
checks: the run directory is exactly ``<run root>/vm-<id>`` (nothing else the handle
says is used to find it), the record there belongs to the run root's owner and is not
writable by others, it names the handle's id, pid and start time, and the live process
with that pid has that start time, runs that QEMU binary (``/proc/PID/exe``) and that
uid (``/proc/PID/status``). Neither the guest (QEMU cannot write a record owned by the
launcher) nor the handle's holder (who cannot write into the run directory) can make
it pass for another process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import cattrs

from . import safefile
from .errors import HandleError
from .paths import vm_run_dir
from .process import PidfdProcess
from .procfs import process_start_time

IDENTITY_FILE = "vm.json"
#: What :func:`_mismatch` says of a process that is exiting (it has no executable any more).
EXITING = "exiting"
VERSION = 1

_CONVERTER = cattrs.Converter(forbid_extra_keys=True)


@attrs.frozen
class VMIdentity:
    """What the launcher knows about a VM's QEMU process (``vm.json``)."""

    id: str
    pid: int
    start_time: int
    uid: int
    qemu: str
    qemu_dev: int
    qemu_ino: int
    version: int = VERSION


def write_identity(run_dir: Path, vm_id: str, pid: int, uid: int, qemu: Path | str,
                   start_time: int | None = None) -> VMIdentity:
    """Write ``run_dir/vm.json`` for VM ``vm_id`` whose QEMU (binary ``qemu``) runs as ``pid``
    under ``uid``: right after QEMU starts, by the process that started it."""
    binary = os.path.realpath(qemu)
    info = os.stat(binary)
    identity = VMIdentity(vm_id, pid, start_time if start_time is not None else process_start_time(pid),
                          uid, binary, info.st_dev, info.st_ino)
    data = json.dumps(_CONVERTER.unstructure(identity), sort_keys=True).encode()
    safefile.write_atomic(run_dir, IDENTITY_FILE, data, mode=0o644)
    return identity


def read_identity(run_root: Path, vm_id: str) -> VMIdentity | None:
    """The identity record of VM ``vm_id`` under ``run_root``, checked to be the launcher's;
    None if there is no such run directory (the VM is gone). A :class:`HandleError` for an
    id that is not one of ours, a run directory without a record, or a record not to be
    trusted (a symlink, another owner, writable by others, malformed)."""
    run_dir = vm_run_dir(run_root, vm_id)
    if run_dir is None:
        raise HandleError(f"not a VM handle of ours: the id {vm_id[:40]!r} is not a vmcache VM id")
    try:
        owner = os.stat(run_root).st_uid
    except FileNotFoundError:
        return None
    except OSError as error:
        raise HandleError(f"VM {vm_id}: cannot check the run root {run_root}: {error.strerror}") from None
    try:
        data = safefile.read_small(run_dir, IDENTITY_FILE, dir_owner=owner, file_owner=owner,
                                   limit=4096)
    except OSError as error:
        raise HandleError(f"VM {vm_id}: its identity record is not to be trusted "
                          f"({error.strerror}); not touching it") from None
    if data is None:
        if os.path.lexists(run_dir):
            raise HandleError(f"VM {vm_id}: its run directory {run_dir} has no identity record "
                              f"({IDENTITY_FILE}); not touching it")
        return None
    try:
        identity = _CONVERTER.structure(json.loads(data), VMIdentity)
    except (ValueError, TypeError, cattrs.BaseValidationError):
        raise HandleError(f"VM {vm_id}: its identity record {run_dir / IDENTITY_FILE} is malformed; "
                          "not touching it") from None
    if identity.id != vm_id:
        raise HandleError(f"VM {vm_id}: its identity record names VM {identity.id[:40]}; not touching it")
    return identity


def open_verified(run_root: Path, vm_id: str, pid: int, start_time: int) -> PidfdProcess | None:
    """VM ``vm_id``'s running QEMU, if ``pid`` and ``start_time`` are it (see the module's
    docstring for every check); None if that VM's QEMU is not running any more. Anything
    that does not add up is a :class:`HandleError`, and nothing is touched. The caller
    closes the process."""
    identity = read_identity(run_root, vm_id)
    if identity is None:
        return None
    if (pid, start_time) != (identity.pid, identity.start_time):
        raise HandleError(f"VM handle {vm_id}: pid {pid} (start time {start_time}) is not that VM's "
                          f"QEMU (was the handle edited?); not touching it")
    process = PidfdProcess(pid, start_time)  # None-like (returncode 0) if gone or pid reused
    if process.returncode is not None:
        return None
    try:
        problem = _mismatch(identity)
        if problem is EXITING or process.returncode is not None:  # it exited while we looked
            process.close()
            return None
    except BaseException:
        process.close()
        raise
    if problem:
        process.close()
        raise HandleError(f"VM handle {vm_id}: pid {pid} is not that VM's QEMU ({problem}); "
                          "not touching it")
    return process


def _mismatch(identity: VMIdentity) -> str:
    """Why the live process ``identity.pid`` is not the one the record describes ("" if it is)."""
    pid = identity.pid
    try:
        exe = os.stat(f"/proc/{pid}/exe")
    except FileNotFoundError:  # a live QEMU always has one: the process is exiting
        return EXITING
    except OSError as error:
        return f"cannot read its executable: {error.strerror}"
    same = (exe.st_dev, exe.st_ino) == (identity.qemu_dev, identity.qemu_ino)
    if not same:
        try:
            same = os.path.samefile(f"/proc/{pid}/exe", identity.qemu)
        except OSError:
            same = False
    if not same:
        return f"it does not run {identity.qemu}"
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as error:
        return f"cannot read its status: {error.strerror}"
    uids = next((line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")), [])
    if not uids or any(int(uid) != identity.uid for uid in uids):
        return f"it does not run as uid {identity.uid}"
    if process_start_time(pid) != identity.start_time:
        return "its start time differs"
    return ""
