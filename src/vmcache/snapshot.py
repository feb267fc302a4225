"""Snapshot refill (``boot_mode = "snapshot"``): restore cached VMs instead of booting them.

One *template* VM boots the ordinary way; then QMP ``stop`` + ``migrate`` writes
its state to a file. Every cached VM then starts as a fresh QEMU with
``-incoming defer -S``, gets the file streamed into ``migrate-incoming``, and is
resumed with ``cont``. Each VM loads the device state from the file; its guest
RAM is the template's, shared or copied as below.

Clones start with the template's kernel state, random pool included. So each
restored VM gets fresh host entropy through its agent, which also forces an
immediate CRNG reseed (the agent's RNDRESEEDCRNG), and its clock is set to the host's,
before it is offered. Two restored VMs never share RNG output.

The snapshot is keyed by everything that shapes the guest (QEMU binary and
version, kernel and initrd, vCPUs, memory and their maxima, machine, accel, kernel parameters,
sandbox, TCG cache size). A changed key, a file whose size or SHA-256 no longer
matches (checked while it is streamed, in a worker thread), or a restore that
fails in any way (QEMU refusing the state, a failing ``cont``, an agent that does
not answer) discards the snapshot and rebuilds it; slots boot the ordinary way
meanwhile. The file is removed when the daemon exits.

With ``share_template_memory`` (the default), the template's guest RAM lives in a memfd
that is sealed (no writes, no resizing, F_SEAL_SEAL) once the template has exited; every
restored VM maps it privately (copy on write), through its own /proc/self/fd, and shares
every page it does not write with the others. Only the QEMUs it is passed to can reach it,
and none of them can change it (a write through any of their fds fails: the seal). Without
it, the template's RAM goes into the state file and every clone loads a private copy.

Both migration directions use a Unix socket between QEMU and us (QEMU 7.2 has
no ``file:`` migration, and ``exec:`` would need QEMU to spawn, which the
seccomp sandbox forbids).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

from .backoff import Backoff
from .config import VMSpec
from .errors import VMError
from .paths import make_private_dir
from .qemu import (
    VM,
    Registry,
    boot_vm,
    connect_control,
    connect_monitor,
    start_agent,
    start_vm,
)
from .qemu_binary import qemu_version

log = logging.getLogger("vmcache.snapshot")

CHUNK = 1 << 20
#: The template boots with init_on_free=1: freed guest pages are zeroed, so the snapshot
#: carries (and each restored VM allocates) only pages in use. Plain boots go without it:
#: zeroing all free memory at boot makes QEMU touch every guest page (numbers: the README,
#: "Measured choices in the code").
TEMPLATE_KERNEL_PARAMS = "init_on_free=1"
SAVE_TIMEOUT = 60.0
#: Run in the template before it is saved: its page cache (file pages of the root image,
#: which every VM would otherwise carry a private copy of) is dropped, and with
#: init_on_free=1 the pages freed are zero, so the snapshot and every restored VM are
#: smaller. A restored VM reads what it needs again from the shared image (host page cache).
TRIM_COMMAND = ("sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches")
TRIM_TIMEOUT = 20.0
#: QEMU's default migration bandwidth cap (128 MiB/s) would make saving take seconds.
MAX_BANDWIDTH = 64 << 30
#: Guest RAM that lives in a shared file (the template's) is left out of the migration
#: stream: the state file holds only the devices, and restored VMs map the RAM file.
IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


class SnapshotError(VMError):
    """The snapshot could not be made or used; vmcache falls back to plain boots."""


def _stat_key(path: Path) -> list[object]:
    try:
        info = path.stat()
    except OSError:
        return [str(path), None]
    return [str(path), info.st_size, info.st_mtime_ns]


async def snapshot_key(spec: VMSpec, accel: str) -> str:
    """A hash of everything that shapes the guest a snapshot holds."""
    shape = {
        "qemu": _stat_key(spec.qemu),
        "qemu_version": await qemu_version(spec.qemu),
        "kernel": _stat_key(spec.kernel),
        "initrd": _stat_key(spec.initrd),
        "rootfs": _stat_key(spec.rootfs) if spec.rootfs is not None else None,
        "image": spec.image,
        "vcpus": spec.vcpus,
        "memory": spec.memory_mib,
        "max_vcpus": spec.max_vcpus,
        "max_memory": spec.max_memory_mib,
        "machine": spec.machine_type,
        "accel": accel,
        "kernel_params": spec.kernel_params,
        "sandbox": spec.sandbox,
        "tb_size": spec.tb_size_mib,
        # Only when on, so that the key of a VM without a NIC is what it always was.
        **({"nic": True} if spec.nic else {}),
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@attrs.frozen
class Snapshot:
    """A saved template state: where it is, what it is for, and how to check it."""

    path: Path
    key: str
    accel: str
    size: int
    sha256: str
    boot_id: str
    #: The template's guest RAM, a sealed memfd (see VMSpec.memory_fd), or None, and that
    #: memfd's (st_dev, st_ino): a restore checks its own copy of the descriptor against it.
    memory_fd: int | None = None
    memory_id: tuple[int, int] = (0, 0)


async def _wait_migration(vm: VM, timeout: float, *, incoming: bool) -> None:
    """Poll QMP until the migration completed (or failed), at most ``timeout`` seconds."""
    assert vm.qmp is not None
    with trio.move_on_after(timeout):
        while True:
            if incoming:
                status = (await vm.qmp.execute("query-status"))["status"]
                if status in ("paused", "postmigrate"):
                    return
                if status not in ("inmigrate", "prelaunch"):
                    raise SnapshotError(f"restore ended in state {status}")
            else:
                info = await vm.qmp.execute("query-migrate")
                status = info.get("status", "")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise SnapshotError(f"saving the snapshot failed: {info.get('error-desc', status)}")
            await trio.sleep(0.005)
    raise SnapshotError(f"migration did not finish within {timeout:g} s")


async def save_snapshot(vm: VM, path: Path) -> Snapshot:
    """Stop ``vm`` and write its state to ``path`` (via a Unix socket we read).

    The whole save, QMP commands included, is bounded by :data:`SAVE_TIMEOUT`.
    """
    assert vm.qmp is not None
    sock_path = vm.run_dir / "save.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    digest = hashlib.sha256()
    size = 0
    partial = path.with_suffix(".partial")
    try:
        with trio.fail_after(SAVE_TIMEOUT), listener:
            await listener.bind(os.fspath(sock_path))
            if vm.uid != os.geteuid():  # a jailed QEMU connects as the VM's uid
                os.chown(sock_path, -1, vm.uid)
                os.chmod(sock_path, 0o660)
            listener.listen(1)
            await vm.qmp.execute("stop")
            if vm.spec.memory_fd is not None:
                await vm.qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
            await vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            await vm.qmp.execute("migrate", {"uri": f"unix:{sock_path}"})
            connection, _ = await listener.accept()
            with connection, open(partial, "wb") as out:  # noqa: ASYNC230 - local file
                while chunk := await connection.recv(CHUNK):
                    await trio.to_thread.run_sync(_write_and_hash, out, digest, chunk)
                    size += len(chunk)
            await _wait_migration(vm, SAVE_TIMEOUT, incoming=False)
    except trio.TooSlowError:
        partial.unlink(missing_ok=True)
        raise SnapshotError(f"saving the snapshot took longer than {SAVE_TIMEOUT:g} s") from None
    partial.replace(path)
    return Snapshot(path, "", vm.accel, size, digest.hexdigest(), vm.boot_id)


def _write_and_hash(out: BinaryIO, digest: hashlib._Hash, chunk: bytes) -> None:
    out.write(chunk)
    digest.update(chunk)


def _read_and_hash(source: BinaryIO, digest: hashlib._Hash) -> bytes:
    chunk = source.read(CHUNK)
    digest.update(chunk)
    return chunk


async def _stream_into(vm: VM, snapshot: Snapshot) -> None:
    """Feed the snapshot into the VM's ``migrate-incoming`` socket, checking it on the way."""
    assert vm.qmp is not None
    sock_path = vm.run_dir / "incoming.sock"
    await vm.qmp.execute("migrate-incoming", {"uri": f"unix:{sock_path}"})
    connection = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    digest = hashlib.sha256()
    size = 0
    with connection:
        await connection.connect(os.fspath(sock_path))
        try:
            with open(snapshot.path, "rb") as source:  # noqa: ASYNC230 - local file
                # Reading and hashing in a worker thread keeps the event loop free
                # (a hand-out must not wait behind 60 MB of SHA-256).
                while chunk := await trio.to_thread.run_sync(_read_and_hash, source, digest):
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        sent = await connection.send(view)
                        view = view[sent:]
        except OSError as error:
            raise SnapshotError(f"restore broke off: {error}") from None
    if size != snapshot.size or digest.hexdigest() != snapshot.sha256:
        raise SnapshotError(f"snapshot file {snapshot.path} is corrupt or truncated")


#: The seals of the template's RAM once it is saved: nobody may write, grow or shrink it,
#: or take the seals off.
TEMPLATE_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _template_memory(spec: VMSpec) -> int:
    """A memfd of the guest's RAM size for the template to write its RAM into."""
    fd = os.memfd_create("vmcache-template", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, spec.memory_mib << 20)
    except OSError:
        os.close(fd)
        raise
    return fd


def _seal(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, TEMPLATE_SEALS)
    except OSError as error:
        raise SnapshotError(f"cannot seal the template's memory: {error.strerror}") from None


def _file_id(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _own_copy(snapshot: Snapshot) -> int | None:
    """A descriptor of the snapshot's template RAM for one restore, checked to be that memfd:
    the snapshot may be discarded (its descriptor closed, the number reused) while a restore
    waits, and a clone must never map some other file as its RAM."""
    if snapshot.memory_fd is None:
        return None
    try:
        fd = os.dup(snapshot.memory_fd)
    except OSError:
        raise SnapshotError("the template's memory was discarded meanwhile") from None
    if _file_id(fd) != snapshot.memory_id:
        os.close(fd)
        raise SnapshotError("the template's memory was discarded meanwhile")
    return fd


class SnapshotManager:
    """Owns the template snapshot; boots VMs by restoring it, or plainly while it is missing."""

    def __init__(self, spec: VMSpec, directory: Path, registry: Registry | None = None,
                 plain_boot: Callable[[VMSpec], Awaitable[VM]] | None = None, *,
                 share_memory: bool = True) -> None:
        self.spec = spec
        #: Restored VMs share the template's RAM pages (factory.share_template_memory).
        self.share_memory = share_memory
        self._plain_boot = plain_boot if plain_boot is not None else boot_vm
        self.template_spec = attrs.evolve(
            spec, kernel_params=" ".join(filter(None, (spec.kernel_params, TEMPLATE_KERNEL_PARAMS))))
        self.directory = directory
        self.registry = registry
        self.snapshot: Snapshot | None = None
        self._wanted = trio.Event()
        self.builds = 0
        self.restores = 0
        self.fallbacks = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the snapshot at start and whenever it is discarded; remove it on exit."""
        make_private_dir(self.directory)
        for stale in self.directory.glob("template-*"):  # a killed daemon's, or an old key's
            stale.unlink(missing_ok=True)
        task_status.started()
        backoff = Backoff(1.0, 60.0)
        try:
            while True:
                if self.snapshot is None:
                    try:
                        await self._build()
                        backoff.reset()
                    except Exception as error:  # never fatal: plain boots go on meanwhile
                        delay = backoff.next()
                        log.warning("could not make the snapshot (%s); plain boots until it works; "
                                    "retrying in %.0f s", error, delay)
                        await trio.sleep(delay)
                        continue
                self._wanted = trio.Event()
                await self._wanted.wait()
        finally:
            self.discard()

    async def _build(self) -> None:
        started = time.monotonic()
        # The template's guest RAM goes to a memfd of its own: restored VMs map it
        # privately, sharing every page they do not write.
        memory_fd = _template_memory(self.spec) if self.share_memory else None
        template_spec = attrs.evolve(self.template_spec, memory_fd=memory_fd, memory_file_shared=True)
        try:
            template = await self._plain_boot(template_spec)
            try:
                key = await snapshot_key(self.template_spec, template.accel)
                path = self.directory / f"template-{key}.vmstate"
                await template.run(TRIM_COMMAND, check=True, timeout=TRIM_TIMEOUT)
                saved = await save_snapshot(template, path)
            finally:
                await template.stop()
            if memory_fd is not None:
                _seal(memory_fd)  # the template is gone: no writable mapping is left
        except BaseException:
            if memory_fd is not None:
                os.close(memory_fd)
            raise
        self.snapshot = attrs.evolve(saved, key=key, memory_fd=memory_fd,
                                     memory_id=_file_id(memory_fd) if memory_fd is not None else (0, 0))
        self.builds += 1
        log.info("snapshot %s saved: %.0f MB in %.2f s (template booted and stopped)",
                 key, saved.size / 1e6, time.monotonic() - started)

    def discard(self) -> None:
        """Forget the snapshot and remove its file (the run loop makes a new one)."""
        if self.snapshot is not None:
            self.snapshot.path.unlink(missing_ok=True)
            if self.snapshot.memory_fd is not None:  # restored VMs keep their mappings
                os.close(self.snapshot.memory_fd)
            self.snapshot = None
        self._wanted.set()

    async def boot(self, spec: VMSpec) -> VM:
        """The pool's boot function: restore when the snapshot is there and current."""
        snapshot = self.snapshot
        template_spec = attrs.evolve(spec, kernel_params=self.template_spec.kernel_params)
        if snapshot is not None and await snapshot_key(template_spec, snapshot.accel) != snapshot.key:
            log.info("the guest's configuration or image changed: rebuilding the snapshot")
            self.discard()
            snapshot = None
        if snapshot is None:
            self.fallbacks += 1
            return await self._plain_boot(spec)
        try:
            vm = await self.restore(template_spec, snapshot)
        except VMError as error:  # SnapshotError, BootError, QMPError, AgentError alike
            log.warning("restore failed (%s): discarding the snapshot, booting plainly", error)
            if self.snapshot is snapshot:
                self.discard()
            self.fallbacks += 1
            return await self._plain_boot(spec)
        self.restores += 1
        return vm

    async def restore(self, spec: VMSpec, snapshot: Snapshot) -> VM:
        """Start a VM from ``snapshot``: incoming migration, cont, fresh entropy and clock."""
        memory_fd = _own_copy(snapshot)
        try:
            return await self._restore(spec, snapshot, memory_fd)
        finally:
            if memory_fd is not None:
                os.close(memory_fd)

    async def _restore(self, spec: VMSpec, snapshot: Snapshot, memory_fd: int | None) -> VM:
        if memory_fd is not None:
            spec = attrs.evolve(spec, memory_fd=memory_fd, memory_file_shared=False)
        spec = attrs.evolve(spec, restored=True)

        async def become_ready(vm: VM) -> str:
            await connect_monitor(vm)
            if snapshot.memory_fd is not None:
                assert vm.qmp is not None
                await vm.qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
            # Connected before the guest runs, so its agent never sees the port closed.
            control = await connect_control(vm)
            marks = [time.monotonic()]
            await _stream_into(vm, snapshot)
            marks.append(time.monotonic())
            await _wait_migration(vm, spec.boot_timeout, incoming=True)
            marks.append(time.monotonic())
            assert vm.qmp is not None
            await vm.qmp.execute("cont")
            boot_id = await start_agent(vm, control)  # a new session: the template's is gone
            marks.append(time.monotonic())
            log.debug("VM %s restored: stream %.3f s, load %.3f s, resume+hello %.3f s", vm.id,
                      *(b - a for a, b in itertools.pairwise(marks)))
            assert vm.agent is not None
            await vm.agent.add_entropy()  # also reseeds the guest's CRNG at once; fails loudly
            await vm.agent.set_clock()
            return boot_id

        return await start_vm(spec, snapshot.accel, spec.boot_timeout, self.registry,
                              become_ready=become_ready, extra_args=("-incoming", "defer", "-S"),
                              what="restore")
