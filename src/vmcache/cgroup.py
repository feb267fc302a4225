"""A cgroup per QEMU: memory, pids and CPU limits, on cgroup v1 or v2.

Every VM's QEMU joins ``vmcache/vm-<id>`` before it runs a single instruction of
QEMU's (vmcache.jail holds it at bubblewrap's ``--block-fd`` until then). The
layout is read once per process from /proc/self/mounts:

- cgroup v2 (unified): ``<root>/vmcache/vm-<id>`` with ``memory.max``,
  ``memory.swap.max``, ``pids.max`` and ``cpu.max``; the controllers are enabled in
  the ``subtree_control`` of the root and of ``vmcache``.
- cgroup v1: one ``vmcache/vm-<id>`` directory in each of the memory, pids and cpu
  hierarchies, with ``memory.limit_in_bytes``, ``pids.max`` and ``cpu.cfs_quota_us``.

Where neither can be written (a daemon that is not root, a read-only cgroupfs), VMs
run without cgroup limits and :attr:`CgroupManager.unavailable` says why; the daemon
logs it once and reports it in Status. A VM's cgroup is removed when its QEMU is gone;
:meth:`CgroupManager.sweep` removes every empty ``vm-*`` cgroup (those of handed-out VMs
stopped by their owners, or of a daemon that was killed): a cgroup with a process in it
cannot be removed, so a sweep never touches a live VM's.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import attrs
import trio

log = logging.getLogger("vmcache.cgroup")

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "vmcache"
V1_CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@attrs.frozen
class Limits:
    """What one VM's cgroup allows."""

    memory_bytes: int
    pids: int
    #: CPU time per wall-clock time, in cores (1.5 = one and a half cores).
    cpus: float

    @property
    def cpu_quota_us(self) -> int:
        return max(1000, round(self.cpus * CPU_PERIOD_US))


@attrs.frozen
class Layout:
    """Where vmcache's cgroups live on this host: the directories that hold ``vm-<id>``."""

    version: int
    #: v2: one directory; v1: one per controller, in V1_CONTROLLERS order.
    parents: tuple[Path, ...]


def find_layout(mounts: str, root: Path = CGROUP_ROOT) -> Layout | str:
    """The cgroup layout from the text of /proc/self/mounts, or why there is none (pure)."""
    v1: dict[str, Path] = {}
    unified: Path | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        where, kind, options = Path(fields[1]), fields[2], fields[3].split(",")
        if kind == "cgroup2" and where == root:
            unified = where
        elif kind == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options:
                    v1.setdefault(controller, where)
    if unified is not None:
        return Layout(2, (unified / GROUP,))
    if all(controller in v1 for controller in V1_CONTROLLERS):
        return Layout(1, tuple(v1[controller] / GROUP for controller in V1_CONTROLLERS))
    missing = [controller for controller in V1_CONTROLLERS if controller not in v1]
    return f"no cgroup v2 at {root} and no cgroup v1 {', '.join(missing)} controller mounted"


def _write(path: Path, value: str) -> None:
    # cgroupfs files: no symlinks to follow there, and every write is one small value.
    with open(path, "w") as file:
        file.write(value)


def _setup_v2(parent: Path) -> None:
    """Make ``parent`` (``<root>/vmcache``) with the controllers its children need."""
    parent.mkdir(exist_ok=True)
    for directory in (parent.parent, parent):
        _write(directory / "cgroup.subtree_control", "+memory +pids +cpu")


class Cgroup:
    """One VM's cgroup (in each hierarchy it needs)."""

    def __init__(self, paths: tuple[Path, ...]) -> None:
        self.paths = paths

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and so everything it starts from then on) into the cgroup."""
        for path in self.paths:
            _write(path / "cgroup.procs", str(pid))

    def remove(self) -> bool:
        """Remove the cgroup; False while a process is still in it (it is left for a sweep)."""
        removed = True
        for path in self.paths:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as error:
                if error.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cannot remove cgroup %s: %s", path, error.strerror)
                removed = False
        return removed


#: How long a VM's cgroup may stay busy after its last process was reaped (the kernel
#: releases a memory cgroup a moment later) before it is left to a sweep.
REMOVE_WAIT = 1.0


async def remove_when_empty(cgroup: Cgroup, wait: float = REMOVE_WAIT) -> bool:
    """Remove ``cgroup`` once the kernel lets us (retried with backoff, at most ``wait``
    seconds); False if it is still there then (a sweep removes it later)."""
    delay = 0.005
    with trio.move_on_after(wait):
        while not cgroup.remove():
            await trio.sleep(delay)
            delay = min(delay * 2, 0.2)
        return True
    return False


class CgroupManager:
    """Makes, fills and removes the VMs' cgroups on this host."""

    def __init__(self, layout: Layout | str) -> None:
        self.layout = layout if isinstance(layout, Layout) else None
        #: Why VMs run without cgroup limits ("" when they have them).
        self.unavailable = layout if isinstance(layout, str) else ""
        self._ready = False

    @classmethod
    def for_host(cls) -> CgroupManager:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError as error:
            return cls(f"cannot read /proc/self/mounts: {error.strerror}")
        return cls(find_layout(mounts))

    def describe(self) -> str:
        """One line for the log and Status."""
        if self.layout is None:
            return f"no cgroup limits ({self.unavailable})"
        return f"cgroup v{self.layout.version} (memory, pids, cpu)"

    def _prepare(self) -> None:
        assert self.layout is not None
        if self._ready:
            return
        if self.layout.version == 2:
            _setup_v2(self.layout.parents[0])
        else:
            for parent in self.layout.parents:
                parent.mkdir(exist_ok=True)
        self._ready = True

    def _unusable(self, error: OSError) -> None:
        self.unavailable = f"cannot write {error.filename or 'the cgroup'}: {error.strerror}"
        log.warning("VMs run without cgroup limits: %s", self.unavailable)
        self.layout = None

    def check(self) -> bool:
        """Make vmcache's parent cgroups now (a daemon's start), so that a host where they
        cannot be written says so at once; True if VMs get cgroups."""
        if self.layout is not None:
            try:
                self._prepare()
            except OSError as error:
                self._unusable(error)
        return self.layout is not None

    def create(self, vm_id: str, limits: Limits) -> Cgroup | None:
        """The VM's cgroup with ``limits`` written, or None where cgroups cannot be used
        (the first failure is logged once and kept in :attr:`unavailable`)."""
        if self.layout is None:
            return None
        try:
            self._prepare()
            paths = tuple(parent / f"vm-{vm_id}" for parent in self.layout.parents)
            for path in paths:
                path.mkdir(exist_ok=True)
            cgroup = Cgroup(paths)
            try:
                self._limit(paths, limits)
            except BaseException:
                cgroup.remove()
                raise
        except OSError as error:
            self._unusable(error)
            return None
        return cgroup

    def _limit(self, paths: tuple[Path, ...], limits: Limits) -> None:
        assert self.layout is not None
        if self.layout.version == 2:
            (path,) = paths
            _write(path / "memory.max", str(limits.memory_bytes))
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
            _write(path / "pids.max", str(limits.pids))
            _write(path / "cpu.max", f"{limits.cpu_quota_us} {CPU_PERIOD_US}")
            return
        memory, pids, cpu = paths
        _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
        _write(pids / "pids.max", str(limits.pids))
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us))

    def of(self, vm_id: str) -> Cgroup | None:
        """The cgroup of VM ``vm_id`` (whether or not it exists), to remove it."""
        if self.layout is None:
            return None
        return Cgroup(tuple(parent / f"vm-{vm_id}" for parent in self.layout.parents))

    def existing(self) -> Iterable[str]:
        """The ids of the VMs that have a cgroup now (in the first hierarchy)."""
        if self.layout is None:
            return []
        try:
            names = os.listdir(self.layout.parents[0])
        except OSError:
            return []
        return [name.removeprefix("vm-") for name in names if name.startswith("vm-")]

    def sweep(self) -> int:
        """Remove every empty VM cgroup; the number removed."""
        return sum(1 for vm_id in self.existing() if (cgroup := self.of(vm_id)) and cgroup.remove())


_MANAGER: CgroupManager | None = None


def manager() -> CgroupManager:
    """This process's cgroup manager (the layout is read once)."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = CgroupManager.for_host()
    return _MANAGER
