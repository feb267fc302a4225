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

A VM's phase (offered, leased, claimed, stopping, gone) and why it was stopped are its
:class:`~vmcache.lifecycle.VMLife`, the record the cache moved before.

When the daemon stops, offered and leased VMs are stopped (nobody can hold them
without the daemon), while claimed VMs live on: they belong to their clients,
and the next daemon on the endpoint adopts their records.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from .console import start_drain
from .errors import VMGoneError
from .handle import VMHandle, stop_vm_process
from .lifecycle import OFFER_DEADLINE as OFFER_DEADLINE  # the watcher enforces it
from .lifecycle import EventKind, Phase, StopReason, VMLife
from .network_policy import NetworkPolicy
from .process import ProcessLike, describe_exit, open_vm_process
from .state import VMRegistry

log = logging.getLogger("vmcache.ledger")

#: How long stopping one VM may take: QMP quit, SIGTERM and SIGKILL graces, and a margin.
STOP_WAIT = 15.0


@attrs.define(eq=False)
class HandedOut:
    """One VM in the ledger: its life (phase, owner, TTL, handle) and its QEMU process."""

    life: VMLife
    process: ProcessLike
    exit_status: int | None = None
    #: Trio time after which an entry still offered is stopped.
    offer_deadline: float = math.inf
    gone: trio.Event = attrs.Factory(trio.Event)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def id(self) -> str:
        return self.life.id

    @property
    def handle(self) -> VMHandle:
        assert self.life.handle is not None, "a handed-out VM has a handle"
        return self.life.handle

    @property
    def phase(self) -> Phase:
        return self.life.phase

    @property
    def owner_uid(self) -> int:
        return self.life.owner_uid

    @property
    def handed_at(self) -> float:
        return self.life.handed_at

    @property
    def expires_at(self) -> float:
        """Unix time; 0 = no TTL."""
        return self.life.expires_at

    @property
    def stop_reason(self) -> str:
        """Why the daemon stops it, in words ("" if it does not)."""
        return self.life.stop_text

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self.gone.is_set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


EventSink = Callable[[EventKind, HandedOut, str], None]
#: Called (shielded) with a VM's id once its QEMU has exited, before it is forgotten: the
#: cleanup of its network (NetworkApplier.release).
GoneHook = Callable[[str], Awaitable[None]]
#: Called with (id, QEMU pid, its start time, network policy) of each claimed VM adopted from
#: a previous daemon: its network enforced again (NetworkApplier.adopt).
AdoptHook = Callable[[str, int, int, NetworkPolicy], None]


class Ledger:
    """Handed-out VMs, each watched by a task in :meth:`run`'s nursery."""

    def __init__(self, registry: VMRegistry, on_event: EventSink | None = None,
                 on_gone: GoneHook | None = None, on_adopt: AdoptHook | None = None) -> None:
        self.registry = registry
        self._entries: dict[str, HandedOut] = {}
        self._nursery: trio.Nursery | None = None
        self._on_event = on_event
        self._on_gone = on_gone
        self._on_adopt = on_adopt

    def entries(self) -> list[HandedOut]:
        return sorted(self._entries.values(), key=lambda entry: entry.handed_at)

    def get(self, vm_id: str) -> HandedOut | None:
        """The entry of VM ``vm_id``, if this ledger holds it."""
        return self._entries.get(vm_id)

    def held_by(self, uid: int) -> int:
        """How many VMs ``uid`` holds now (offered, leased or claimed)."""
        return sum(entry.owner_uid == uid for entry in self._entries.values())

    async def run(self, claimed: list[VMLife] = (),  # type: ignore[assignment]
                  *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch handed-out VMs until cancelled, starting with ``claimed`` ones a previous
        daemon left (from :meth:`VMRegistry.recover`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for record in claimed:
                self._adopt_record(record)
            task_status.started()
            await trio.sleep_forever()

    def _adopt_record(self, record: VMLife) -> None:
        handle = record.handle  # a record we wrote ourselves, but never trusted blindly: checked
        process = open_vm_process(record.id, record.pid, record.start_time)
        if handle is None or process is None or handle.id != record.id:
            if process is not None:
                process.close()
            log.warning("forgetting claimed VM %s: its record or process does not match", record.id)
            self.registry.remove_run_dir(record.id)
            self.registry.remove(record.id)
            return
        entry = HandedOut(record, process)
        log.info("adopted claimed VM %s (pid %d) from a previous daemon%s", entry.id, handle.pid,
                 self._ttl_note(entry))
        # The previous daemon's console drain died with it (QEMU dropped the output since).
        start_drain(Path(handle.run_dir), lambda: process.returncode is None)
        self._start(entry)
        if self._on_adopt is not None:
            self._on_adopt(entry.id, handle.pid, handle.start_time, handle.network)

    def adopt(self, handle: VMHandle, process: ProcessLike, owner_uid: int, phase: Phase) -> HandedOut:
        """Take over a VM that has just left the cache (``offered`` or ``claimed``). Its
        record is rewritten at once, except for an offer: the next daemon kills offered VMs
        as it kills cached ones, so the record goes on saying ``booting`` until the claim,
        and an offer costs no file system write before the client sees it."""
        life = self.registry.life(handle.id) or VMLife(handle.id, handle.pid, handle.start_time,
                                                       Phase.OFFERED)  # not started through it
        life.owner_uid, life.handed_at, life.handle = owner_uid, time.time(), handle
        if phase is not life.phase:
            life.move(phase)
        entry = HandedOut(life, process)
        if phase is Phase.OFFERED:
            entry.offer_deadline = trio.current_time() + OFFER_DEADLINE
        self._start(entry, record=phase is not Phase.OFFERED)
        return entry

    def _start(self, entry: HandedOut, *, record: bool = True) -> None:
        assert self._nursery is not None, "Ledger.run is not running"
        self._entries[entry.id] = entry
        if record:
            self.registry.write(entry.life)
        self._nursery.start_soon(self._watch, entry, name=f"vmcache ledger {entry.id}")

    def claim(self, entry: HandedOut, *, lease: bool, ttl: float) -> None:
        """The client acknowledged the VM: it is leased (bound to the call) or claimed (theirs)."""
        if entry.phase is not Phase.OFFERED or entry.life.stop is not None:
            raise VMGoneError(f"VM {entry.id} is being stopped ({entry.stop_reason}); ask again")
        entry.life.move(Phase.LEASED if lease else Phase.CLAIMED)
        entry.life.expires_at = time.time() + ttl if ttl > 0 else 0.0
        self.registry.write(entry.life)
        entry._wake()
        log.info("VM %s %s by uid %d%s", entry.id, entry.phase, entry.owner_uid, self._ttl_note(entry))

    def set_ttl(self, entry: HandedOut, ttl: float) -> None:
        """A claimed VM now stops ``ttl`` seconds from now (0: never), sooner or later than it
        would have (E2B's set_timeout); recorded, so that a restarted daemon keeps it."""
        if entry.phase is not Phase.CLAIMED or entry.life.stop is not None:
            raise VMGoneError(f"VM {entry.id} is not a claimed VM any more "
                              f"({entry.stop_reason or entry.phase})")
        entry.life.expires_at = time.time() + ttl if ttl > 0 else 0.0
        self.registry.write(entry.life)
        entry._wake()
        log.info("VM %s: TTL set%s", entry.id, self._ttl_note(entry) or " to none")

    def request_stop(self, entry: HandedOut, reason: StopReason, *, by: int = -1) -> None:
        """Have the VM stopped (by its watcher) for ``reason`` (``by``: the uid that asked,
        for StopVM); see :meth:`stop` to wait for it."""
        entry.life.ask_stop(reason, by=by)
        entry._wake()

    async def stop(self, entry: HandedOut, reason: StopReason, *, by: int = -1) -> None:
        """Stop the VM and wait, at most :data:`STOP_WAIT` s, until it and its traces are gone."""
        self.request_stop(entry, reason, by=by)
        with trio.move_on_after(STOP_WAIT):
            await entry.gone.wait()

    @staticmethod
    def _ttl_note(entry: HandedOut) -> str:
        if not entry.expires_at:
            return ""
        return f"; TTL ends in {max(0.0, entry.expires_at - time.time()):.0f} s"

    def _emit(self, kind: EventKind, entry: HandedOut, message: str) -> None:
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
                life = entry.life
                while entry.process.returncode is None:
                    if life.expires_at and time.time() >= life.expires_at:
                        life.ask_stop(StopReason.TTL)
                    if life.phase is Phase.OFFERED and trio.current_time() >= entry.offer_deadline:
                        life.ask_stop(StopReason.OFFER_DEADLINE)
                    if life.stop is not None:
                        stopped_by_us = True
                        log.info("stopping handed-out VM %s: %s", entry.id, entry.stop_reason)
                        life.move(Phase.STOPPING)
                        await stop_vm_process(entry.process, Path(entry.handle.run_dir) / "qmp.sock")
                        break
                    deadline = entry.offer_deadline if life.phase is Phase.OFFERED else math.inf
                    if entry.expires_at:
                        ttl_left = max(0.0, entry.expires_at - time.time())
                        deadline = min(deadline, trio.current_time() + ttl_left)
                    changed = entry._changed
                    with trio.move_on_at(deadline):
                        await changed.wait()
                nursery.cancel_scope.cancel()
        finally:
            if entry.process.returncode is None and entry.phase is not Phase.CLAIMED:
                # Cancelled (the daemon stops): an unclaimed or leased VM dies with it.
                with trio.CancelScope(shield=True):
                    stopped_by_us = True
                    entry.life.ask_stop(StopReason.DAEMON_STOPPED)
                    if entry.phase is not Phase.STOPPING:
                        entry.life.move(Phase.STOPPING)
                    await stop_vm_process(entry.process, Path(entry.handle.run_dir) / "qmp.sock")
            if entry.process.returncode is not None:
                if self._on_gone is not None:  # before ``gone``: its network is gone with it
                    with trio.CancelScope(shield=True):
                        await self._on_gone(entry.id)
                self._forget(entry, stopped_by_us)

    def _forget(self, entry: HandedOut, stopped_by_us: bool) -> None:
        entry.exit_status = entry.process.returncode
        self.registry.remove_run_dir(entry.id)
        self.registry.remove(entry.id)
        self._entries.pop(entry.id, None)
        close = getattr(entry.process, "close", None)
        if close is not None:
            close()
        entry.life.move(Phase.GONE)
        message = f"stopped: {entry.stop_reason}" if stopped_by_us else describe_exit(entry.exit_status)
        log.info("handed-out VM %s (pid %d) %s", entry.id, entry.handle.pid, message)
        self._emit(EventKind.of_stop(entry.life.stop if stopped_by_us else None), entry, message)
        entry.gone.set()
