"""What /proc says about a process: start time, command line, state, memory, CPU.

Used to recognise a VM's QEMU process for sure (pid *and* start time), to
report memory in Status, and by the tests, the soak and the benchmark to count
QEMU processes.
"""

from __future__ import annotations

import os
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/PID/stat (after the command name, which may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if it does not exist)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else 0


def process_state(pid: int) -> str:
    """The one-letter state (R, S, D, Z, T, ...), or "" if there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return process_state(pid) not in ("", "Z")


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of the process, in clock ticks."""
    fields = _stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_bytes(pid: int) -> int:
    """Resident memory of the process (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def qemu_pids() -> set[int]:
    """Live (not zombie) qemu-system processes on this machine."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            argv0 = cmdline(pid).split(b"\0", 1)[0]
            if b"qemu-system" in os.path.basename(argv0) and alive(pid):
                pids.add(pid)
    return pids


def jail_pids(vm_id: str = "") -> set[int]:
    """Live bubblewrap processes of vmcache's jails (vmcache.jail), of VM ``vm_id`` or of
    any VM: counted by the soaks like QEMU processes, and killed with a VM that a killed
    daemon left half started."""
    wanted = f"vmcache-{vm_id}".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = cmdline(int(entry.name)).split(b"\0")
            ours = any(arg == wanted if vm_id else arg.startswith(b"vmcache-") for arg in argv)
            if os.path.basename(argv[0]) == b"bwrap" and ours and alive(int(entry.name)):
                pids.add(int(entry.name))
    return pids


def find_vm_process(vm_id: str) -> int:
    """The pid of the QEMU whose command line names VM ``vm_id`` (``-name vmcache-<id>``), or 0."""
    wanted = f"vmcache-{vm_id}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = cmdline(int(entry.name)).split(b"\0")
            # QEMU itself, not the jail (bwrap) around it, whose arguments name the VM too.
            if b"qemu-system" in os.path.basename(argv[0]) and wanted in argv:
                return int(entry.name)
    return 0
