"""One record of a VM's life: where it is (a :class:`Phase`), and the one table of moves.

A VM's :class:`VMLife` is made when its QEMU is about to start and follows it to the
end: the VM (:mod:`vmcache.qemu`) moves it while it boots and stops, the cache
(:mod:`vmcache.pool`) while it is in line and set aside for a client, the ledger
(:mod:`vmcache.ledger`) once it is handed out; the state directory
(:mod:`vmcache.state`) stores it and Status (:mod:`vmcache.wire`) reports its phase.
Every move goes through :meth:`VMLife.move`, which refuses one that :data:`MOVES` does
not list (a :class:`~vmcache.errors.LifecycleError`: a bug, caught where it happens).

Pausing is not a phase: whether QEMU's vCPUs run (``VM.paused``) is orthogonal to who
answers for the VM. A cached VM is paused or not; one set aside for a client may still
be paused (it is resumed before it leaves). Folding it in would double the phases.
"""

from __future__ import annotations

import enum

import attrs

from .errors import LifecycleError
from .handle import VMHandle

#: An offered VM still unclaimed this long after the offer is stopped by its watcher,
#: whatever became of the call that offered it (the call itself allows 10 s for the claim).
OFFER_DEADLINE = 20.0


class Phase(enum.StrEnum):
    """Where a VM is in its life, and who answers for it. The values are those Status
    shows and the state directory stores."""

    #: QEMU is starting, the guest agent has not answered yet (the VM answers for it).
    BOOTING = "booting"
    #: Booted and in the cache's line (its slot answers for it).
    READY = "ready"
    #: Set aside by the cache for one client: proven alive, grown, then it leaves or goes
    #: back in line. (Not ``offered``: a Kata hand-out is never offered.)
    RESERVED = "reserved"
    #: Out of the cache, sent to a ``TakeVM`` client that has not claimed it yet (the
    #: daemon's ledger answers for it from here on); also a VM released by a library caller.
    OFFERED = "offered"
    #: Bound to a client's open ``TakeVM`` call: it stops when the call ends.
    LEASED = "leased"
    #: Its client's (a claim, or a Kata ``GetBaseVM``): it outlives the daemon.
    CLAIMED = "claimed"
    #: Being stopped (QMP quit, SIGTERM, SIGKILL).
    STOPPING = "stopping"
    #: Its QEMU process is gone (and reaped).
    GONE = "gone"


_ENDS = frozenset({Phase.STOPPING, Phase.GONE})

#: Every legal move: from a phase to the phases it may go to next. Any live VM may be
#: stopped, and any may exit (GONE) on its own, killed from outside.
MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.BOOTING: frozenset({Phase.READY}) | _ENDS,
    # READY -> OFFERED: a VM booted for one request (no pool), or released by a library caller.
    Phase.READY: frozenset({Phase.RESERVED, Phase.OFFERED}) | _ENDS,
    # RESERVED -> READY: the client went away or the reply was not written: back in line.
    Phase.RESERVED: frozenset({Phase.READY, Phase.OFFERED}) | _ENDS,
    # OFFERED -> CLAIMED: a claim, or a Kata hand-out whose reply was written.
    Phase.OFFERED: frozenset({Phase.LEASED, Phase.CLAIMED}) | _ENDS,
    Phase.LEASED: _ENDS,
    Phase.CLAIMED: _ENDS,
    Phase.STOPPING: frozenset({Phase.GONE}),
    Phase.GONE: frozenset(),
}

#: In the cache (a slot or the VM itself answers for it): stopped with the cache.
CACHED = frozenset({Phase.BOOTING, Phase.READY, Phase.RESERVED})
#: Booted, and ours to use (pinged, paused, grown): in line or set aside.
USABLE = frozenset({Phase.READY, Phase.RESERVED})
#: Out of the cache, in the ledger's hands.
HANDED_OUT = frozenset({Phase.OFFERED, Phase.LEASED, Phase.CLAIMED})


class StopReason(enum.Enum):
    """Why the daemon stopped a handed-out VM. The value is what logs, ``StopVM`` and a
    lease's end say (``{uid}`` is the asker's)."""

    TTL = "its TTL passed"
    OFFER_DEADLINE = f"it was offered and not claimed within {OFFER_DEADLINE:g} s"
    NOT_CLAIMED = "it was not claimed"
    OFFER_UNWRITTEN = "its offer could not be written"
    CONFIRMATION_UNWRITTEN = "its confirmation could not be written"
    CLIENT_GONE = "the client went away"
    CLIENT_RELEASED = "the client released it"
    CLIENT_CONFUSED = "the client sent something else than a release"
    VM_EXITED = "its VM exited"
    ASKED = "uid {uid} asked (StopVM)"
    DAEMON_STOPPING = "the daemon is stopping"
    DAEMON_STOPPED = "the daemon stopped"

    def text(self, uid: int = -1) -> str:
        return self.value.format(uid=uid)


class EventKind(enum.StrEnum):
    """What a ``Watch`` event says happened (its ``kind`` on the wire)."""

    WATCHING = "watching"
    BOOTING = "booting"
    READY = "ready"
    BOOT_FAILED = "boot_failed"
    HANDED_OUT = "handed_out"
    DIED = "died"
    KILLED = "killed"
    RELEASED = "released"
    EXPIRED = "expired"

    @classmethod
    def of_stop(cls, reason: StopReason | None) -> EventKind:
        """The ledger's event when a handed-out VM is gone, stopped for ``reason``
        (None: it exited by itself)."""
        return cls.EXPIRED if reason is StopReason.TTL else cls.RELEASED


@attrs.define(eq=False)
class VMLife:
    """One VM, from its QEMU's start to its end: what the daemon knows and stores of it."""

    id: str
    #: 0 until QEMU runs.
    pid: int = 0
    #: The QEMU process's start time (clock ticks since boot), with ``pid`` its identity.
    start_time: int = 0
    phase: Phase = Phase.BOOTING
    #: Once handed out: who holds it, since when (Unix time), until when (0 = no TTL).
    owner_uid: int = -1
    handed_at: float = 0.0
    expires_at: float = 0.0
    #: What its client got (a handed-out VM's): how a next daemon stops it at its TTL.
    handle: VMHandle | None = None
    #: Why the daemon stops it (None: it was not asked to), and for ``ASKED``, by whom.
    stop: StopReason | None = None
    stop_by: int = -1

    def move(self, to: Phase) -> None:
        """Go to phase ``to``; a LifecycleError if :data:`MOVES` does not allow it."""
        if to not in MOVES[self.phase]:
            raise LifecycleError(f"VM {self.id} cannot go from {self.phase} to {to} (a vmcache bug: "
                                 "please report it, with the daemon's log)")
        self.phase = to

    def ask_stop(self, reason: StopReason, *, by: int = -1) -> bool:
        """Record why the VM is to stop; the first reason stays. True if this one is it."""
        if self.stop is not None:
            return False
        self.stop, self.stop_by = reason, by
        return True

    @property
    def stop_text(self) -> str:
        """Why the daemon stops the VM, in words ("" if it does not)."""
        return self.stop.text(self.stop_by) if self.stop is not None else ""
