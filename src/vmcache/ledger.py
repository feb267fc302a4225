"""The daemon's ledger of handed-out VMs: who holds each, until when, and what is left of it.

A VM leaves the cache as soon as a client is offered it; from then on the ledger,
not a cache slot, answers for it. For each VM it keeps a record in the state
directory (see :mod:`vmcache.state`) and a watcher task that

* reaps the QEMU process when it exits, whoever stopped it, and removes its run
  directory and its record, so nothing of a VM killed from outside stays behind;
* stops it when its TTL passes (also after a daemon restart: the TTL is in the
  record as a Unix time);
* stops it when asked: an offer that was never claimed, a lease whose client
  released it or went away.

When the daemon stops, offered and leased VMs are stopped (nobody can hold them
without the daemon), while claimed VMs live on: they belong to their clients,
and the next daemon on the endpoint adopts their records.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from .console import start_drain
from .handle import VMHandle, stop_vm_process
from .process import ProcessLike, describe_exit, open_vm_process
from .state import VMRecord, VMRegistry

log = logging.getLogger("vmcache.ledger")

#: How long stopping one VM may take: QMP quit, SIGTERM and SIGKILL graces, and a margin.
STOP_WAIT = 15.0
#: An offered VM still unclaimed this long after the offer is stopped by its watcher,
#: whatever became of the call that offered it (the call itself allows 10 s for the claim).
OFFER_DEADLINE = 20.0


@attrs.define(eq=False)
class HandedOut:
    """One VM in the ledger."""

    handle: VMHandle
    process: ProcessLike
    owner_uid: int
    handed_at: float
    role: str  # offered, leased, claimed
    expires_at: float = 0.0  # Unix time; 0 = no TTL
    stop_reason: str = ""
    exit_status: int | None = None
    #: Trio time after which an entry still "offered" is stopped.
    offer_deadline: float = math.inf
    gone: trio.Event = attrs.Factory(trio.Event)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def id(self) -> str:
        return self.handle.id

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self.gone.is_set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def record(self) -> VMRecord:
        return VMRecord(self.handle.id, self.handle.pid, self.handle.start_time, role=self.role,
                        owner_uid=self.owner_uid, handed_at=self.handed_at,
                        expires_at=self.expires_at, handle=self.handle.to_dict())


EventSink = Callable[[str, HandedOut, str], None]


class Ledger:
    """Handed-out VMs, each watched by a task in :meth:`run`'s nursery."""

    def __init__(self, registry: VMRegistry, on_event: EventSink | None = None) -> None:
        self.registry = registry
        self._entries: dict[str, HandedOut] = {}
        self._nursery: trio.Nursery | None = None
        self._on_event = on_event
        self.expired = 0
        self.reaped = 0

    def entries(self) -> list[HandedOut]:
        return sorted(self._entries.values(), key=lambda entry: entry.handed_at)

    def get(self, vm_id: str) -> HandedOut | None:
        """The entry of VM ``vm_id``, if this ledger holds it."""
        return self._entries.get(vm_id)

    def held_by(self, uid: int) -> int:
        """How many VMs ``uid`` holds now (offered, leased or claimed)."""
        return sum(entry.owner_uid == uid for entry in self._entries.values())

    async def run(self, claimed: list[VMRecord] = (),  # type: ignore[assignment]
                  *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch handed-out VMs until cancelled, starting with ``claimed`` ones a previous
        daemon left (from :meth:`VMRegistry.recover`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for record in claimed:
                self._adopt_record(record)
            task_status.started()
            await trio.sleep_forever()

    def _adopt_record(self, record: VMRecord) -> None:
        try:
            handle = VMHandle.from_dict(record.handle or {})
        except Exception:  # a record we wrote ourselves, but never trust it blindly
            handle = None
        process = open_vm_process(record.id, record.pid, record.start_time)
        if handle is None or process is None or handle.id != record.id:
            if process is not None:
                process.close()
            log.warning("forgetting claimed VM %s: its record or process does not match", record.id)
            self.registry.remove_run_dir(record.id)
            self.registry.remove(record.id)
            return
        entry = HandedOut(handle, process, record.owner_uid, record.handed_at, "claimed",
                          record.expires_at)
        log.info("adopted claimed VM %s (pid %d) from a previous daemon%s", entry.id, handle.pid,
                 self._ttl_note(entry))
        # The previous daemon's console drain died with it (QEMU dropped the output since).
        start_drain(Path(handle.run_dir), lambda: process.returncode is None)
        self._start(entry)

    def adopt(self, handle: VMHandle, process: ProcessLike, owner_uid: int, role: str) -> HandedOut:
        """Take over a VM that has just left the cache. Its record changes role at once,
        except for an offer: the next daemon kills offered VMs as it kills cached ones, so
        the record goes on saying ``cached`` until the claim, and an offer costs no file
        system write before the client sees it (0.5-1 ms here)."""
        entry = HandedOut(handle, process, owner_uid, time.time(), role)
        if role == "offered":
            entry.offer_deadline = trio.current_time() + OFFER_DEADLINE
        self._start(entry, record=role != "offered")
        return entry

    def _start(self, entry: HandedOut, *, record: bool = True) -> None:
        assert self._nursery is not None, "Ledger.run is not running"
        self._entries[entry.id] = entry
        if record:
            self.registry.write(entry.record())
        self._nursery.start_soon(self._watch, entry, name=f"vmcache ledger {entry.id}")

    def claim(self, entry: HandedOut, *, lease: bool, ttl: float) -> None:
        """The client acknowledged the VM: it is leased (bound to the call) or claimed (theirs)."""
        entry.role = "leased" if lease else "claimed"
        entry.expires_at = time.time() + ttl if ttl > 0 else 0.0
        self.registry.write(entry.record())
        entry._wake()
        log.info("VM %s %s by uid %d%s", entry.id, entry.role, entry.owner_uid, self._ttl_note(entry))

    def request_stop(self, entry: HandedOut, reason: str) -> None:
        """Have the VM stopped (by its watcher); see :meth:`stop` to wait for it."""
        if not entry.stop_reason:
            entry.stop_reason = reason
        entry._wake()

    async def stop(self, entry: HandedOut, reason: str) -> None:
        """Stop the VM and wait, at most :data:`STOP_WAIT` s, until it and its traces are gone."""
        self.request_stop(entry, reason)
        with trio.move_on_after(STOP_WAIT):
            await entry.gone.wait()

    @staticmethod
    def _ttl_note(entry: HandedOut) -> str:
        if not entry.expires_at:
            return ""
        return f"; TTL ends in {max(0.0, entry.expires_at - time.time()):.0f} s"

    def _emit(self, kind: str, entry: HandedOut, message: str) -> None:
        if self._on_event is not None:
            self._on_event(kind, entry, message)

    async def _watch(self, entry: HandedOut) -> None:
        """Wait for the VM to exit, its TTL to pass or a stop request; then clean up."""
        stopped_by_us = False
        try:
            async with trio.open_nursery() as nursery:

                async def wait_exit() -> None:
                    await entry.process.wait()
                    entry._wake()

                nursery.start_soon(wait_exit)
                while entry.process.returncode is None:
                    if entry.expires_at and time.time() >= entry.expires_at and not entry.stop_reason:
                        entry.stop_reason = "its TTL passed"
                        self.expired += 1
                    if (entry.role == "offered" and trio.current_time() >= entry.offer_deadline
                            and not entry.stop_reason):
                        entry.stop_reason = f"it was offered and not claimed within {OFFER_DEADLINE:g} s"
                    if entry.stop_reason:
                        stopped_by_us = True
                        log.info("stopping handed-out VM %s: %s", entry.id, entry.stop_reason)
                        await stop_vm_process(entry.process, Path(entry.handle.run_dir) / "qmp.sock")
                        break
                    deadline = entry.offer_deadline if entry.role == "offered" else math.inf
                    if entry.expires_at:
                        ttl_left = max(0.0, entry.expires_at - time.time())
                        deadline = min(deadline, trio.current_time() + ttl_left)
                    changed = entry._changed
                    with trio.move_on_at(deadline):
                        await changed.wait()
                nursery.cancel_scope.cancel()
        finally:
            if entry.process.returncode is None and entry.role != "claimed":
                # Cancelled (the daemon stops): an unclaimed or leased VM dies with it.
                with trio.CancelScope(shield=True):
                    stopped_by_us = True
                    entry.stop_reason = entry.stop_reason or "the daemon stopped"
                    await stop_vm_process(entry.process, Path(entry.handle.run_dir) / "qmp.sock")
            if entry.process.returncode is not None:
                self._forget(entry, stopped_by_us)

    def _forget(self, entry: HandedOut, stopped_by_us: bool) -> None:
        entry.exit_status = entry.process.returncode
        self.registry.remove_run_dir(entry.id)
        self.registry.remove(entry.id)
        self._entries.pop(entry.id, None)
        close = getattr(entry.process, "close", None)
        if close is not None:
            close()
        self.reaped += 1
        message = f"stopped: {entry.stop_reason}" if stopped_by_us else describe_exit(entry.exit_status)
        log.info("handed-out VM %s (pid %d) %s", entry.id, entry.handle.pid, message)
        self._emit("expired" if entry.stop_reason == "its TTL passed" else "released", entry, message)
        entry.gone.set()
