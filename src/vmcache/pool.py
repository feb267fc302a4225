"""The cache: N slots, each a Trio task that keeps one VM booted and ready.

Task tree (see docs/architecture.md)::

    VMPool.run            nursery
    ├── slot 0            boots a VM, offers it, waits until it is taken or dies, repeats
    ├── slot 1 ...

A slot owns its VM while it is cached (its :class:`~vmcache.lifecycle.VMLife` is
``ready``, or ``reserved`` while set aside for one client): cancelling the pool
(Ctrl-C, Quit, a library caller's nursery) cancels the slot, whose ``finally``
stops the VM, shielded and bounded. A VM that is handed out is *released* first
(``offered``), so that ``finally`` leaves it running: the daemon's ledger
(:mod:`vmcache.ledger`) answers for it from then on.

Hand-outs are first come, first served: a ready VM goes to the longest-waiting
client. A VM leaves only with proof of life: its QEMU process is running (not
exited, not stopped by a signal) and its agent answered within the last
``FRESH_FOR`` seconds; otherwise it is pinged (a paused VM is resumed, reseeded and
given the clock) first. A VM that fails is killed and replaced, and the client
gets the next one.

Idle VMs (``idle_vms = "paused"``) are paused with QMP ``stop`` once ready, so
that a full cache costs no CPU; their health check asks QEMU (``query-status``)
instead of the guest. The first ``hot_vms`` VMs in line are kept running and
pinged every ``HOT_PING_INTERVAL`` s, so that a hand-out normally needs no ping
and no resume: see docs/architecture.md, "Proof of life".
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from .backoff import Backoff
from .config import VMSpec
from .errors import NoVMAvailableError, VmcacheError, VMGoneError
from .handle import VMHandle
from .lifecycle import CACHED, EventKind, Phase, VMLife
from .process import ProcessLike, describe_exit
from .procfs import rss_bytes
from .qemu import VM, boot_vm
from .wire import CacheEvent

log = logging.getLogger("vmcache.pool")

PING_TIMEOUT = 2.0
#: A VM whose agent answered this recently, and whose QEMU runs, leaves without a ping.
FRESH_FOR = 1.0
#: How often the hot VMs (the next ones to leave) are pinged, to stay fresh.
HOT_PING_INTERVAL = 0.5
#: After the line moves, the keeper waits this long before resuming the next VM, so that
#: its QMP and agent traffic does not compete with the reply of the hand-out in flight.
HOT_SETTLE = 0.02
#: The longest a slot waits, after its VM left, for the hand-out to be over before it
#: starts the replacement (see :meth:`Lease.commit`).
REFILL_HOLD = 1.0
IDLE_MODES = ("running", "paused")
NO_ANSWER = "does not answer its agent"
NO_ANSWER_PAUSED = "does not answer its monitor (paused)"
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0
HEALTH_INTERVAL = 5.0
#: Boot failures in a row (at least the cache size) after which clients are told
#: UNAVAILABLE at once instead of waiting for a VM that cannot come.
FAILING_AFTER = 3
WATCH_BUFFER = 256


@attrs.define(eq=False)
class _Entry:
    """A booted VM while its slot offers it. ``done`` ends the offer."""

    vm: VM
    done: trio.Event = attrs.Factory(trio.Event)
    #: When (trio time) the agent last answered or the VM was resumed.
    last_contact: float = -math.inf
    #: Held while the VM is paused, resumed or checked, so that none of these overlap.
    transition: trio.Lock = attrs.Factory(trio.Lock)
    #: Set by the hand-out once it is over: the slot starts the replacement then.
    refill_when: trio.Event | None = None
    #: QEMU's resident memory as of the last health check (Status reports this sample:
    #: reading /proc for every cached VM on each Status made it grow with the cache).
    rss_bytes: int = 0

    @property
    def life(self) -> VMLife:
        """The VM's phase: ready (in line), reserved (set aside for a client), offered (gone)."""
        return self.vm.life


@attrs.define(eq=False)
class _Waiter:
    """A client waiting for a VM, in arrival order."""

    event: trio.Event = attrs.Factory(trio.Event)
    entry: _Entry | None = None
    error: VmcacheError | None = None


def default_backoff() -> Backoff:
    return Backoff(BACKOFF_INITIAL, BACKOFF_CAP)


@attrs.define
class PoolStats:
    """Counters for Status and the exit summary."""

    boots: int = 0
    boot_failures: int = 0
    failures_in_row: int = 0
    last_error: str = ""
    handed_out: int = 0
    killed: int = 0
    died: int = 0
    booting: int = 0
    boot_seconds: list[float] = attrs.Factory(list)
    handout_seconds: list[float] = attrs.Factory(list)

    def note_handout(self, seconds: float) -> None:
        """A hand-out's server-side time: from the request's bytes read off the socket (before
        the HTTP/2 parse) to its reply written to the socket."""
        self.handout_seconds.append(seconds)
        del self.handout_seconds[:-1000]


def total_stats(pools: Iterable[VMPool]) -> PoolStats:
    """Every pool's counters added up (Status, the exit summary); the last error and the
    failures in a row are those of the pool that fails the most."""
    stats = [pool.stats for pool in pools]
    failing = max(stats, key=lambda each: each.failures_in_row, default=PoolStats())
    return PoolStats(
        boots=sum(each.boots for each in stats),
        boot_failures=sum(each.boot_failures for each in stats),
        failures_in_row=failing.failures_in_row,
        last_error=failing.last_error,
        handed_out=sum(each.handed_out for each in stats),
        killed=sum(each.killed for each in stats),
        died=sum(each.died for each in stats),
        booting=sum(each.booting for each in stats),
        boot_seconds=[value for each in stats for value in each.boot_seconds],
        handout_seconds=[value for each in stats for value in each.handout_seconds],
    )


class Lease:
    """A ready VM set aside for one client (``reserved``) until :meth:`commit`,
    :meth:`discard` or :meth:`abort`: each calls the pool's public method of that name."""

    def __init__(self, pool: VMPool, entry: _Entry) -> None:
        self._pool = pool
        self._entry = entry
        self.handle: VMHandle = entry.vm.handle()

    async def commit(self, *, refill_when: trio.Event | None = None) -> tuple[VMHandle, ProcessLike]:
        """The VM leaves the cache (the slot boots a replacement); returns its handle and
        process, for the ledger to keep. Raises :class:`VMGoneError` if it died meanwhile
        (it is then counted as died, not handed out).

        ``refill_when``: the slot starts the replacement once it is set (within
        ``REFILL_HOLD`` s), so that the hand-out's last round trips (a TakeVM claim) do not
        compete with a QEMU start for the host's cores (see the README, "Measured choices in the code").
        """
        return await self._pool.hand_out(self._entry, refill_when=refill_when)

    @property
    def vm(self) -> VM:
        """The VM set aside (to grow it before the hand-out)."""
        return self._entry.vm

    async def discard(self) -> None:
        """The VM is not fit to hand out (it failed to grow): the slot stops and replaces it."""
        self._pool.discard(self._entry)

    async def abort(self) -> None:
        """The reply did not go out: offer the VM again, to the next client in line."""
        self._pool.offer_again(self._entry)


class EventHub:
    """Where the pools' (and the ledger's) events go, for every watcher (``Watch``)."""

    def __init__(self) -> None:
        self._watchers: set[trio.MemorySendChannel[CacheEvent]] = set()

    def watch(self, opening: list[CacheEvent]) -> trio.MemoryReceiveChannel[CacheEvent]:
        """A channel of ``opening`` and every event from now on. A watcher that falls
        ``WATCH_BUFFER`` events behind is dropped (its channel closes)."""
        send, receive = trio.open_memory_channel[CacheEvent](WATCH_BUFFER + len(opening))
        for event in opening:
            send.send_nowait(event)
        self._watchers.add(send)
        return receive

    def publish(self, event: CacheEvent) -> None:
        for channel in list(self._watchers):
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.discard(channel)
                channel.close()

    @property
    def watched(self) -> bool:
        return bool(self._watchers)

    def close(self) -> None:
        """End every watcher's stream."""
        for channel in list(self._watchers):
            channel.close()
        self._watchers.clear()


class VMPool:
    """Keeps ``size`` VMs of ``spec`` booted; hands them out in arrival order."""

    def __init__(
        self,
        spec: VMSpec,
        size: int,
        boot: Callable[[VMSpec], Awaitable[VM]] = boot_vm,
        backoff: Callable[[], Backoff] = default_backoff,
        health_interval: float = HEALTH_INTERVAL,
        name: str = "default",
        events: EventHub | None = None,
        boots: trio.CapacityLimiter | None = None,
        idle: str = "running",
        hot: int = 1,
    ) -> None:
        if idle not in IDLE_MODES:
            raise ValueError(f"idle must be one of {IDLE_MODES}, not {idle!r}")
        self.name = name
        self.spec = spec
        self.size = size
        self._boot = boot
        self._backoff = backoff
        self._health_interval = health_interval
        #: Boots in progress at once, shared by every pool of a daemon: a boot takes a whole
        #: core under TCG, and refills must not starve hand-outs (or each other).
        self._boots = boots
        #: Idle VMs are paused ("paused") or left running ("running").
        self.idle = idle
        #: The first ``hot`` ready VMs are kept running and fresh for a hand-out without waiting.
        self.hot = hot
        self._line_changed = trio.Event()
        self._ready: deque[_Entry] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._closed: str | None = None
        self._own_events = events is None
        self.events = events if events is not None else EventHub()
        self.stats = PoolStats()

    # ---------------------------------------------------------- supervision

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the slots until cancelled. Cancellation stops every cached and booting VM."""
        async with trio.open_nursery() as nursery:
            for index in range(self.size):
                nursery.start_soon(self._slot, index, name=f"vmcache slot {index}")
            if self.hot:
                nursery.start_soon(self._keep_hot, name="vmcache hot VMs")
            task_status.started()

    async def _slot(self, index: int) -> None:
        backoff = self._backoff()
        while True:
            self._publish(EventKind.BOOTING, message=f"slot {index}")
            self.stats.booting += 1
            try:
                if self._boots is None:
                    vm = await self._boot(self.spec)
                else:
                    async with self._boots:
                        vm = await self._boot(self.spec)
            except Exception as error:  # any failure to boot is retried, never fatal
                if not isinstance(error, VmcacheError):
                    log.debug("slot %d: unexpected boot failure", index, exc_info=True)
                delay = backoff.next()
                self._boot_failed(index, error, delay)
                await trio.sleep(delay)
                continue
            finally:
                self.stats.booting -= 1
            backoff.reset()
            self.stats.boots += 1
            self.stats.failures_in_row = 0
            self.stats.last_error = ""
            self.stats.boot_seconds.append(vm.boot_seconds)
            del self.stats.boot_seconds[:-100]
            entry = _Entry(vm)
            try:
                await self._serve_entry(entry)
            finally:
                left = entry.life.phase not in CACHED  # handed out: the ledger's now
                if not left:
                    self._forget(entry)
                    was_alive = vm.alive
                    await vm.stop()
                    if was_alive:
                        self.stats.killed += 1
                        log.info("VM %s killed (pid %d)", vm.id, vm.pid)
                        self._publish(EventKind.KILLED, vm)
            if left and entry.refill_when is not None:
                with trio.move_on_after(REFILL_HOLD):
                    await entry.refill_when.wait()

    def _boot_failed(self, index: int, error: Exception, delay: float) -> None:
        self.stats.boot_failures += 1
        self.stats.failures_in_row += 1
        self.stats.last_error = str(error) if isinstance(error, VmcacheError) else (
            f"{type(error).__name__}: {error}")
        log.warning("slot %d: boot failed (%d in a row): %s; retrying in %.1f s",
                    index, self.stats.failures_in_row, error, delay)
        self._publish(EventKind.BOOT_FAILED, message=self.stats.last_error)
        if self.failing():
            self._fail_waiters(NoVMAvailableError(self.failure_reason()))

    def failing(self) -> bool:
        """True when boots keep failing: clients get UNAVAILABLE instead of waiting."""
        return self.stats.failures_in_row >= max(FAILING_AFTER, self.size) and not self._ready

    def failure_reason(self) -> str:
        return (f"no VM could be booted ({self.stats.failures_in_row} failures in a row; "
                f"retrying): {self.stats.last_error}")

    async def _serve_entry(self, entry: _Entry) -> None:
        """Offer the VM until it is handed out or discarded; notice if it dies or hangs."""
        vm = entry.vm
        entry.last_contact = trio.current_time()  # its agent has just said READY
        entry.rss_bytes = rss_bytes(vm.pid)
        self._offer(entry)
        log.info("VM %s booted in %.2f s (pid %d, accel %s); %d/%d ready",
                 vm.id, vm.boot_seconds, vm.pid, vm.accel, self.ready_count(), self.size)
        self._publish(EventKind.READY, vm, message=f"booted in {vm.boot_seconds:.2f} s")
        async with trio.open_nursery() as nursery:

            async def watch_exit() -> None:
                status = await vm.wait_exited()
                if entry.life.phase in CACHED:
                    self.stats.died += 1
                    log.warning("cached VM %s %s; replacing it", vm.id, describe_exit(status))
                    self._publish(EventKind.DIED, vm, message=describe_exit(status))
                    entry.done.set()

            async def check_health() -> None:
                """Check the idle VM now and then: a running one's agent answers (and its
                clock is kept on the host's); a paused one's QEMU answers and says paused.

                The first check comes at a random point of the first interval, so that the
                VMs of a cache filled at once are not all checked in the same instant."""
                await trio.sleep(random.uniform(0, self._health_interval))
                while True:
                    await trio.sleep(self._health_interval)
                    failing = NO_ANSWER_PAUSED if vm.paused else NO_ANSWER
                    if not await self._checked(entry, functools.partial(self._check, entry), failing):
                        return

            nursery.start_soon(watch_exit)
            nursery.start_soon(check_health)
            if self.idle == "paused":
                await self._pause_unless_hot(entry)
            await entry.done.wait()
            nursery.cancel_scope.cancel()

    async def _check(self, entry: _Entry) -> None:
        """One health check (the caller holds ``entry.transition`` and a deadline)."""
        vm = entry.vm
        entry.rss_bytes = rss_bytes(vm.pid)
        if vm.paused:
            state = await vm.run_state()
            if state != "paused":
                raise VMGoneError(f"QEMU says the paused VM is {state!r}")
            return
        await vm.ping()
        await vm.sync_clock()
        entry.last_contact = trio.current_time()

    async def _checked(self, entry: _Entry, work: Callable[[], Awaitable[None]], failing: str) -> bool:
        """Run ``work`` on a cached VM, holding its transition lock, within PING_TIMEOUT.

        Nothing is done to a VM that is set aside or leaving (not ``ready``). A VM whose
        ``work`` fails or hangs is condemned (described as ``failing``): returns False then,
        else True."""
        try:
            with trio.fail_after(PING_TIMEOUT):
                async with entry.transition:
                    if entry.life.phase is Phase.READY:
                        await work()
        except (VmcacheError, trio.TooSlowError) as error:
            if entry.life.phase is Phase.READY:
                self._condemn(entry, failing, error)
                return False
        return True

    async def _pause_unless_hot(self, entry: _Entry) -> None:
        """Pause a ready VM that is not among the next ``hot`` to leave."""

        async def pause() -> None:
            if entry in self._ready and self._position(entry) >= self.hot:
                await entry.vm.pause()

        await self._checked(entry, pause, "could not be paused")

    def _position(self, entry: _Entry) -> int:
        """Where ``entry`` is in line (0 = next to leave); only the first few are looked at."""
        for position, queued in enumerate(itertools.islice(self._ready, self.hot)):
            if queued is entry:
                return position
        return self.hot

    async def _keep_hot(self) -> None:
        """Keep the next ``hot`` VMs to leave running and fresh: resume a paused one as
        soon as it moves up the line, ping the running ones every ``HOT_PING_INTERVAL``."""
        while True:
            for entry in list(itertools.islice(self._ready, self.hot)):
                await self._checked(entry, functools.partial(self._freshen, entry), NO_ANSWER)
            with trio.move_on_after(HOT_PING_INTERVAL):
                await self._line_changed.wait()
                await trio.sleep(HOT_SETTLE)
            self._line_changed = trio.Event()

    async def _freshen(self, entry: _Entry) -> None:
        """Resume a paused hot VM, or ping a running one whose last answer is getting old."""
        if entry.vm.paused:
            await entry.vm.resume()
        elif trio.current_time() - entry.last_contact >= HOT_PING_INTERVAL:
            await entry.vm.ping()
        else:
            return
        entry.last_contact = trio.current_time()

    def _condemn(self, entry: _Entry, what: str, error: BaseException) -> None:
        """A cached VM failed a check: take it out of line; its slot stops and replaces it."""
        self._forget(entry)
        vm = entry.vm
        log.warning("cached VM %s %s (%s); replacing it", vm.id, what, error or "timeout")
        self._publish(EventKind.DIED, vm, message=what)
        entry.done.set()

    def _forget(self, entry: _Entry) -> None:
        if entry in self._ready:
            self._ready.remove(entry)
            self._line_changed.set()

    # ---------------------------------------------------------- hand-out

    def _offer(self, entry: _Entry, front: bool = False) -> None:
        """Give a ready VM to the longest-waiting client, or keep it ready."""
        if self._waiters:
            waiter = self._waiters.popleft()
            entry.life.move(Phase.RESERVED)
            waiter.entry = entry
            waiter.event.set()
            return
        if front:
            self._ready.appendleft(entry)
        else:
            self._ready.append(entry)
        self._line_changed.set()

    async def _take(self) -> _Entry:
        if self._closed is not None:
            raise NoVMAvailableError(self._closed)
        if self.failing():
            raise NoVMAvailableError(self.failure_reason())
        if self._ready and not self._waiters:
            entry = self._ready.popleft()
            entry.life.move(Phase.RESERVED)
            self._line_changed.set()
            return entry
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.entry is not None:  # a VM arrived as we were cancelled: pass it on
                self.offer_again(waiter.entry)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        assert waiter.entry is not None
        return waiter.entry

    async def lease(self) -> Lease:
        """Wait (first come, first served) for a ready VM with proof of life.

        Proof of life: QEMU runs (not exited, not stopped by a signal) and the agent
        answered within ``FRESH_FOR`` s; else the VM is pinged now (a paused one is
        resumed, reseeded and given the clock). The caller bounds the wait with a
        cancel scope; cancellation leaves the VM in the cache. Raises
        :class:`NoVMAvailableError` once the pool closes.
        """
        while True:
            entry = await self._take()
            if self._fresh(entry):  # the common case: no await, nothing else gets in between
                return Lease(self, entry)
            try:
                with trio.fail_after(PING_TIMEOUT):
                    async with entry.transition:
                        await self._prove_alive(entry)
            except (VmcacheError, trio.TooSlowError) as error:
                log.warning("VM %s failed its check before hand-out (%s); replacing it",
                            entry.vm.id, error or "timeout")
                entry.done.set()  # its slot stops it
                continue
            except BaseException:
                self.offer_again(entry)
                raise
            return Lease(self, entry)

    @staticmethod
    def _answered_lately(entry: _Entry) -> bool:
        """Proof of life without a round trip: QEMU runs, is neither paused nor stopped by
        a signal, and the agent answered within ``FRESH_FOR`` s."""
        vm = entry.vm
        return (vm.alive and not entry.done.is_set() and not vm.paused
                and trio.current_time() - entry.last_contact < FRESH_FOR and not vm.stopped_by_signal())

    @classmethod
    def _fresh(cls, entry: _Entry) -> bool:
        """Proven alive already, and no pause, resume or check in progress."""
        return not entry.transition.locked() and cls._answered_lately(entry)

    async def _prove_alive(self, entry: _Entry) -> None:
        """Proof of life with a round trip if need be: a paused VM is resumed (which
        includes the agent's answer), a running one whose answer is old is pinged."""
        vm = entry.vm
        if not vm.alive or entry.done.is_set():
            raise VMGoneError(f"VM {vm.id} is not running any more")
        if self._answered_lately(entry):
            return
        if vm.paused:
            await vm.resume()
        else:
            await vm.ping()
        entry.last_contact = trio.current_time()

    async def hand_out(self, entry: _Entry, *,
                       refill_when: trio.Event | None = None) -> tuple[VMHandle, ProcessLike]:
        """A reserved VM leaves the cache (see :meth:`Lease.commit`); VMGoneError if it died."""
        if entry.done.is_set() or not entry.vm.alive:
            raise VMGoneError(f"VM {entry.vm.id} died before it could be handed out")
        entry.refill_when = refill_when
        handle, process = await entry.vm.release()  # offered: the ledger's from here on
        entry.done.set()
        self.stats.handed_out += 1
        log.info("VM %s handed out (pid %d)", handle.id, handle.pid)
        self._publish(EventKind.HANDED_OUT, entry.vm)
        return handle, process

    def discard(self, entry: _Entry) -> None:
        """A reserved VM is not fit to hand out: its slot stops and replaces it."""
        self._forget(entry)
        entry.done.set()

    def offer_again(self, entry: _Entry) -> None:
        """A reserved VM was not handed out: back in line, first, for the next client. One that
        died or began to stop meanwhile (its phase moved on) is left to its slot."""
        if entry.life.phase is Phase.RESERVED:
            entry.life.move(Phase.READY)
        if entry.life.phase is Phase.READY and entry.vm.alive:
            self._offer(entry, front=True)
        else:
            entry.done.set()

    # ---------------------------------------------------------- state

    def ready_vms(self) -> list[VM]:
        """Cached VMs that are ready and not set aside for a client."""
        return [entry.vm for entry in self._ready if entry.vm.alive]

    def ready_with_rss(self) -> list[tuple[VM, int]]:
        """:meth:`ready_vms`, each with its resident memory as of its last health check."""
        return [(entry.vm, entry.rss_bytes) for entry in self._ready if entry.vm.alive]

    def ready_count(self) -> int:
        return len(self.ready_vms())

    def paused_count(self) -> int:
        """Ready VMs whose vCPUs are stopped (``idle_vms = "paused"``)."""
        return sum(1 for entry in self._ready if entry.vm.paused)

    def close(self, reason: str = "the daemon is shutting down") -> None:
        """Refuse new clients and fail the waiting ones with UNAVAILABLE."""
        self._closed = reason
        self._fail_waiters(NoVMAvailableError(reason))
        if self._own_events:
            self.events.close()

    def _fail_waiters(self, error: NoVMAvailableError) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.event.set()

    # ---------------------------------------------------------- events

    def watching_event(self) -> CacheEvent:
        """The event a new watcher gets first: this pool as it is now."""
        return CacheEvent(EventKind.WATCHING, "", 0, "", time.time(), self.ready_count(), self.size,
                          self.name)

    def watch(self) -> trio.MemoryReceiveChannel[CacheEvent]:
        """A channel of every event from now on, opening with a ``watching`` event (the
        cache as it is: from then on nothing is missed)."""
        return self.events.watch([self.watching_event()])

    def _publish(self, kind: EventKind, vm: VM | None = None, message: str = "") -> None:
        self.publish(kind, vm.id if vm else "", vm.pid if vm else 0, message)

    def publish(self, kind: EventKind, vm_id: str = "", pid: int = 0, message: str = "") -> None:
        """Send an event about this pool to every watcher."""
        if self.events.watched:
            self.events.publish(CacheEvent(kind, vm_id, pid, message, time.time(), self.ready_count(),
                                           self.size, self.name))
