"""The ledger's own guarantees, with a fake QEMU process and Trio's autojump clock."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from fakes import FakeProcess

from vmcache import ledger as ledger_module
from vmcache.errors import VMGoneError
from vmcache.handle import VMHandle
from vmcache.ledger import Ledger
from vmcache.lifecycle import Phase, StopReason
from vmcache.state import VMRegistry


def handle(run_root: Path) -> VMHandle:
    run_dir = run_root / "vm-0123456789ab"
    return VMHandle(id="0123456789ab", pid=4242, start_time=1, qmp_socket=str(run_dir / "qmp.sock"),
                    agent_socket=str(run_dir / "agent-0.sock"), console_log=str(run_dir / "console.log"),
                    run_dir=str(run_dir), cpu=1, memory=256)


@asynccontextmanager
async def running_ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    registry = VMRegistry(tmp_path / "state", tmp_path)
    registry.prepare()
    ledger = Ledger(registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        yield ledger
        nursery.cancel_scope.cancel()


async def test_an_offer_nobody_resolves_is_stopped_by_its_watcher(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Whatever happens to the call that offered it, an unclaimed VM does not outlive the deadline."""
    qemu = FakeProcess(dies_of={signal.SIGTERM, signal.SIGKILL})
    async with running_ledger(tmp_path) as ledger:
        started = trio.current_time()
        entry = ledger.adopt(handle(tmp_path), qemu, 0, Phase.OFFERED)
        with trio.fail_after(ledger_module.OFFER_DEADLINE + 30):
            await entry.gone.wait()
        assert trio.current_time() - started >= ledger_module.OFFER_DEADLINE
        assert qemu.returncode is not None
        assert "not claimed" in entry.stop_reason
        assert ledger.entries() == []


async def test_a_claimed_vm_is_not_stopped_by_the_offer_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    qemu = FakeProcess(dies_of={signal.SIGTERM, signal.SIGKILL})
    async with running_ledger(tmp_path) as ledger:
        entry = ledger.adopt(handle(tmp_path), qemu, 0, Phase.OFFERED)
        ledger.claim(entry, lease=False, ttl=0)
        await trio.sleep(ledger_module.OFFER_DEADLINE * 3)
        assert qemu.returncode is None and qemu.signals == []
        assert ledger.entries() == [entry]
    assert qemu.returncode is None  # claimed VMs outlive the daemon


async def test_a_claim_after_a_stop_was_asked_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A VM being stopped (the daemon stopping, say) is not told claimed to its client."""
    qemu = FakeProcess(dies_of={signal.SIGTERM, signal.SIGKILL})
    async with running_ledger(tmp_path) as ledger:
        entry = ledger.adopt(handle(tmp_path), qemu, 0, Phase.OFFERED)
        ledger.request_stop(entry, StopReason.DAEMON_STOPPING)
        with pytest.raises(VMGoneError, match=r"being stopped \(the daemon is stopping\); ask again"):
            ledger.claim(entry, lease=False, ttl=0)
        with trio.fail_after(ledger_module.STOP_WAIT):
            await entry.gone.wait()
        assert entry.phase is Phase.GONE and qemu.returncode is not None
