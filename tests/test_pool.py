"""The pool's logic with a fake QEMU, in virtual time: order, retries, deaths, hand-back."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.testing

from vmcache import pool as pool_module
from vmcache.backoff import Backoff
from vmcache.config import VMSpec
from vmcache.errors import AgentError, BootError, NoVMAvailableError, VMGoneError
from vmcache.handle import VMHandle
from vmcache.lifecycle import Phase, VMLife
from vmcache.pool import VMPool

SPEC = VMSpec(qemu=Path("/fake/qemu"), kernel=Path("/k"), initrd=Path("/i"), kernel_params="",
              machine_type="q35", vcpus=1, memory_mib=256, accel="tcg", boot_timeout=10,
              kvm_probe_timeout=5, run_root=Path("/tmp/fake"))
BOOT_SECONDS = 2.0


class FakeProcess:
    async def wait(self) -> int:
        await trio.sleep_forever()
        raise AssertionError


class FakeVM:
    """Enough of vmcache.qemu.VM for the pool."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.id = f"vm{pid}"
        self.spec = SPEC
        self.accel = "tcg"
        self.boot_seconds = BOOT_SECONDS
        self.alive = True
        self.answers_ping = True
        self.stopped = False
        self.released = False
        self.life = VMLife(self.id, pid, 1, Phase.READY)
        self.paused = False
        self.pings = 0
        self.resumes = 0
        self.signal_stopped = False
        self._exited = trio.Event()

    async def ping(self) -> str:
        self.pings += 1
        if not self.answers_ping or self.signal_stopped:
            raise AgentError("no answer")
        return "boot"

    async def pause(self) -> None:
        self.paused = True

    async def resume(self) -> None:
        self.resumes += 1
        self.paused = False
        await self.ping()

    async def run_state(self) -> str:
        if not self.alive or self.signal_stopped:
            await trio.sleep_forever()  # a stopped QEMU does not answer QMP
        return "paused" if self.paused else "running"

    def stopped_by_signal(self) -> bool:
        return self.signal_stopped

    async def sync_clock(self) -> None:
        pass

    def handle(self) -> VMHandle:
        return VMHandle(id=self.id, pid=self.pid, start_time=1, qmp_socket="q", agent_socket="a",
                        console_log="c", run_dir="r", cpu=1, memory=256)

    async def release(self) -> tuple[VMHandle, FakeProcess]:
        self.life.move(Phase.OFFERED)
        self.released = True
        return self.handle(), FakeProcess()

    async def stop(self) -> None:
        if not self.released:
            self.stopped = True
            self.die()

    def die(self) -> None:
        self.alive = False
        self._exited.set()

    async def wait_exited(self) -> int:
        await self._exited.wait()
        return -9


class FakeBooter:
    """Boots FakeVMs in BOOT_SECONDS of virtual time; can be told to fail."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.pids = itertools.count(100)
        self.vms: list[FakeVM] = []
        self.attempts: list[float] = []

    async def __call__(self, spec: VMSpec) -> FakeVM:
        self.attempts.append(trio.current_time())
        await trio.sleep(BOOT_SECONDS)
        if self.failures:
            self.failures -= 1
            raise BootError("kernel panic")
        vm = FakeVM(next(self.pids))
        self.vms.append(vm)
        return vm


async def wait_ready(pool: VMPool, count: int = 1) -> None:
    while len(pool.ready_vms()) < count:
        await trio.sleep(0.1)


async def start_pool(nursery: trio.Nursery, booter: FakeBooter, size: int, *,
                     idle: str = "running", hot: int = 1) -> VMPool:
    pool = VMPool(SPEC, size, boot=booter, idle=idle, hot=hot)  # type: ignore[arg-type]
    await nursery.start(pool.run)
    return pool


async def test_waiting_clients_are_served_first_come_first_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    served: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)

        async def client(index: int) -> None:
            await trio.sleep(index * 0.01)
            lease = await pool.lease()
            handle, _ = await lease.commit()
            served.append((index, handle.pid))

        async with trio.open_nursery() as clients:
            for index in range(4):
                clients.start_soon(client, index)
        nursery.cancel_scope.cancel()
    assert served == [(0, 100), (1, 101), (2, 102), (3, 103)]
    assert all(vm.released for vm in booter.vms[:4])
    assert all(vm.stopped for vm in booter.vms if not vm.released), "cached VMs die with the pool"


async def test_failed_boots_back_off_up_to_a_cap_and_recover(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter(failures=6)
    async with trio.open_nursery() as nursery:
        pool = VMPool(SPEC, 1, boot=booter,  # type: ignore[arg-type]
                      backoff=lambda: Backoff(initial=1, cap=4))
        await nursery.start(pool.run)
        await trio.sleep(3 * BOOT_SECONDS + 1 + 2 + 0.5)  # just after the third failure
        assert pool.failing()
        with pytest.raises(NoVMAvailableError, match=r"3 failures in a row.*kernel panic"):
            await pool.lease()
        await wait_ready(pool)
        assert not pool.failing()
        assert pool.stats.boot_failures == 6 and pool.stats.failures_in_row == 0
        assert pool.stats.last_error == ""
        lease = await pool.lease()
        await lease.commit()
        nursery.cancel_scope.cancel()
    gaps = [b - a - BOOT_SECONDS for a, b in itertools.pairwise(booter.attempts)]
    assert gaps[:6] == [1, 2, 4, 4, 4, 4]


async def test_a_vm_that_fails_its_ping_is_replaced_not_handed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1, hot=0)
        await wait_ready(pool)
        booter.vms[0].answers_ping = False
        await trio.sleep(pool_module.FRESH_FOR)  # its last answer is no longer proof of life
        lease = await pool.lease()
        assert lease.handle.pid == 101
        assert booter.vms[0].stopped
        await lease.commit()
        nursery.cancel_scope.cancel()


async def test_a_hot_vm_leaves_without_a_ping_and_a_stale_one_is_pinged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=2, hot=1)
        await wait_ready(pool, 2)
        await trio.sleep(2 * pool_module.FRESH_FOR)
        hot, cold = booter.vms
        assert hot.pings >= 2  # kept fresh by the hot keeper
        pings = hot.pings, cold.pings
        await (await pool.lease()).commit()  # the hot one: fresh, no ping needed
        await (await pool.lease()).commit()  # the other was last checked at boot: pinged
        assert (hot.pings, cold.pings) == (pings[0], pings[1] + 1)
        assert (hot.released, cold.released) == (True, True)
        nursery.cancel_scope.cancel()


async def test_a_fresh_but_sigstopped_vm_is_pinged_and_never_handed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1, hot=0)
        await wait_ready(pool)
        booter.vms[0].signal_stopped = True  # fresh contact, but QEMU cannot run
        lease = await pool.lease()
        assert lease.handle.pid == 101
        assert booter.vms[0].stopped and not booter.vms[0].released
        nursery.cancel_scope.cancel()


async def test_paused_idle_vms_are_resumed_when_they_move_up_the_line(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=3, idle="paused", hot=1)
        await wait_ready(pool, 3)
        await trio.sleep(0.1)
        assert [vm.paused for vm in booter.vms] == [False, True, True]
        assert pool.paused_count() == 2
        await (await pool.lease()).commit()
        await trio.sleep(0.1)  # the keeper resumes the next in line at once
        assert [vm.paused for vm in booter.vms[1:]] == [False, True]
        assert booter.vms[1].resumes == 1
        pool.hot = 0  # now nobody resumes ahead: the hand-out itself resumes
        await (await pool.lease()).commit()
        third = await pool.lease()
        assert third.handle.pid == booter.vms[2].pid and not booter.vms[2].paused
        assert booter.vms[2].resumes == 1
        await third.commit()
        nursery.cancel_scope.cancel()


async def test_a_paused_vm_that_died_or_hangs_is_never_handed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=3, idle="paused", hot=0)
        await wait_ready(pool, 3)
        await trio.sleep(0.1)
        assert all(vm.paused for vm in booter.vms)
        booter.vms[0].die()  # QEMU gone while paused
        booter.vms[1].signal_stopped = True  # QEMU stopped: its health check gets no answer
        await trio.sleep(pool_module.HEALTH_INTERVAL * 2 + pool_module.PING_TIMEOUT)
        assert booter.vms[1].stopped
        lease = await pool.lease()
        assert lease.handle.pid == booter.vms[2].pid
        nursery.cancel_scope.cancel()


async def test_a_cached_vm_that_dies_is_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)
        await wait_ready(pool)
        booter.vms[0].die()
        await trio.sleep(0.1)
        assert pool.ready_vms() == []
        await trio.sleep(BOOT_SECONDS)
        assert [vm.pid for vm in pool.ready_vms()] == [101]
        nursery.cancel_scope.cancel()


async def test_an_undelivered_reply_puts_the_vm_back_first_in_line(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=2)
        await wait_ready(pool, 2)
        lease = await pool.lease()
        first = lease.handle.pid
        await lease.abort()
        again = await pool.lease()
        assert again.handle.pid == first
        await again.commit()
        nursery.cancel_scope.cancel()


async def test_a_client_cancelled_as_its_vm_arrives_passes_it_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)
        with trio.move_on_after(BOOT_SECONDS - 0.5):
            await pool.lease()  # gives up before the first boot ends
        lease = await pool.lease()
        assert lease.handle.pid == 100
        assert len(booter.vms) == 1
        await lease.commit()
        nursery.cancel_scope.cancel()


async def test_waiting_clients_learn_when_boots_keep_failing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter(failures=100)
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)
        start = trio.current_time()
        with pytest.raises(NoVMAvailableError, match="kernel panic"):
            await pool.lease()
        assert trio.current_time() - start < 3 * BOOT_SECONDS + 1 + 2 + 1  # bounded, not forever
        nursery.cancel_scope.cancel()


async def test_watchers_see_events_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = VMPool(SPEC, 1, boot=booter)  # type: ignore[arg-type]
        events = pool.watch()
        await nursery.start(pool.run)
        lease = await pool.lease()
        await lease.commit()
        await wait_ready(pool)
        nursery.cancel_scope.cancel()
    kinds = []
    while True:
        try:
            kinds.append(events.receive_nowait().kind)
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    assert kinds[:6] == ["watching", "booting", "ready", "handed_out", "booting", "ready"]


async def test_close_fails_waiting_clients_with_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter(failures=100)
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)

        async def close_soon() -> None:
            await trio.sleep(1)
            pool.close("shutting down")

        nursery.start_soon(close_soon)
        with pytest.raises(NoVMAvailableError, match="shutting down"):
            await pool.lease()
        with pytest.raises(NoVMAvailableError):
            await pool.lease()
        nursery.cancel_scope.cancel()


class ExplodingBooter(FakeBooter):
    """Boots that fail with errors that are not VmcacheErrors (ENOMEM from fork, a missing binary)."""

    def __init__(self, errors: list[Exception]) -> None:
        super().__init__()
        self.errors = errors

    async def __call__(self, spec: VMSpec) -> FakeVM:
        if self.errors:
            self.attempts.append(trio.current_time())
            raise self.errors.pop(0)
        return await super().__call__(spec)


async def test_a_boot_failing_with_any_exception_is_retried_not_fatal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = ExplodingBooter([OSError(12, "Cannot allocate memory"), FileNotFoundError("qemu"),
                              TimeoutError("qemu -version")])
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)
        await wait_ready(pool)
        assert pool.stats.boot_failures == 3
        lease = await pool.lease()
        handle, _ = await lease.commit()
        assert handle.pid == 100
        nursery.cancel_scope.cancel()


async def test_a_vm_that_dies_while_set_aside_is_died_not_handed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)
        await wait_ready(pool)
        lease = await pool.lease()
        booter.vms[0].die()
        await trio.sleep(0.1)
        with pytest.raises(VMGoneError):
            await lease.commit()
        assert (pool.stats.died, pool.stats.handed_out) == (1, 0)
        assert not booter.vms[0].released
        await wait_ready(pool)
        nursery.cancel_scope.cancel()


async def test_boots_at_once_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    """A cache filled at once boots at most so many VMs at a time (they share the cores)."""
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = VMPool(SPEC, 4, boot=booter, boots=trio.CapacityLimiter(2))  # type: ignore[arg-type]
        await nursery.start(pool.run)
        await wait_ready(pool, 4)
        nursery.cancel_scope.cancel()
    assert booter.attempts == [0.0, 0.0, BOOT_SECONDS, BOOT_SECONDS]


async def test_the_replacement_starts_once_the_hand_out_is_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A TakeVM's claim must not compete with a QEMU start: the slot waits for the
    hand-out to end (bounded by REFILL_HOLD) before it boots the next VM."""
    booter = FakeBooter()
    async with trio.open_nursery() as nursery:
        pool = await start_pool(nursery, booter, size=1)
        await wait_ready(pool)
        handed_out = trio.Event()
        await (await pool.lease()).commit(refill_when=handed_out)
        committed_at = trio.current_time()
        await trio.sleep(pool_module.REFILL_HOLD / 2)
        assert len(booter.attempts) == 1, "no boot while the hand-out is in progress"
        handed_out.set()
        await trio.sleep(0.01)
        assert len(booter.attempts) == 2 and booter.attempts[1] - committed_at < pool_module.REFILL_HOLD

        await wait_ready(pool)
        await (await pool.lease()).commit(refill_when=trio.Event())  # a hand-out that never says
        committed_at = trio.current_time()
        while len(booter.attempts) < 3:
            await trio.sleep(0.01)
        assert booter.attempts[2] - committed_at == pytest.approx(pool_module.REFILL_HOLD, abs=0.02)
        nursery.cancel_scope.cancel()
