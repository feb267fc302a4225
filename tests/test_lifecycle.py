"""A VM's life (vmcache.lifecycle): the table of moves, the enums' words, and the state
directory's records, old and new, read back by a restarted daemon. No QEMU."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from vmcache.errors import LifecycleError, VmcacheError
from vmcache.handle import VMHandle
from vmcache.ledger import Ledger
from vmcache.lifecycle import CACHED, HANDED_OUT, MOVES, EventKind, Phase, StopReason, VMLife
from vmcache.procfs import process_start_time
from vmcache.state import VMRegistry

#: Every move a VM makes in the daemon, spelled out here apart from the table it tests.
LEGAL = {
    (Phase.BOOTING, Phase.READY),
    (Phase.READY, Phase.RESERVED), (Phase.READY, Phase.OFFERED),
    (Phase.RESERVED, Phase.READY), (Phase.RESERVED, Phase.OFFERED),
    (Phase.OFFERED, Phase.LEASED), (Phase.OFFERED, Phase.CLAIMED),
    (Phase.STOPPING, Phase.GONE),
} | {(phase, end) for phase in Phase if phase not in (Phase.STOPPING, Phase.GONE)
     for end in (Phase.STOPPING, Phase.GONE)}


@pytest.mark.parametrize(("start", "end"), sorted(LEGAL))
def test_every_legal_move_is_made(start: Phase, end: Phase) -> None:
    life = VMLife("0123456789ab", phase=start)
    life.move(end)
    assert life.phase is end


@pytest.mark.parametrize(("start", "end"), sorted(set(itertools.product(Phase, Phase)) - LEGAL))
def test_every_other_move_is_refused_where_it_is_made(start: Phase, end: Phase) -> None:
    life = VMLife("0123456789ab", phase=start)
    with pytest.raises(LifecycleError, match=f"VM 0123456789ab cannot go from {start} to {end}"):
        life.move(end)
    assert life.phase is start  # nothing changed
    assert issubclass(LifecycleError, VmcacheError)


def test_the_table_knows_every_phase_and_gone_is_the_end() -> None:
    assert set(MOVES) == set(Phase)
    assert MOVES[Phase.GONE] == frozenset()
    assert CACHED.isdisjoint(HANDED_OUT)


def test_stop_reasons_say_why_and_the_first_one_stays() -> None:
    life = VMLife("0123456789ab", phase=Phase.CLAIMED)
    assert life.stop_text == ""
    assert life.ask_stop(StopReason.ASKED, by=1000)
    assert not life.ask_stop(StopReason.TTL)
    assert (life.stop, life.stop_text) == (StopReason.ASKED, "uid 1000 asked (StopVM)")
    assert StopReason.OFFER_DEADLINE.text() == "it was offered and not claimed within 20 s"


def test_an_event_kind_comes_from_the_stop_reason_not_its_words() -> None:
    assert EventKind.of_stop(StopReason.TTL) is EventKind.EXPIRED
    assert all(EventKind.of_stop(reason) is EventKind.RELEASED
               for reason in StopReason if reason is not StopReason.TTL)
    assert EventKind.of_stop(None) is EventKind.RELEASED
    assert f"{EventKind.HANDED_OUT}" == "handed_out"  # the wire's word


# ---------------------------------------------------------------- the state directory

VM_ID = "0123456789ab"


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line names VM ``VM_ID``, as a QEMU's does (``-name vmcache-<id>``)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-name",
                                f"vmcache-{VM_ID}"], start_new_session=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def old_record(run_root: Path, process: subprocess.Popen[bytes], role: str,
               **handle: object) -> dict[str, object]:
    """A record as daemons before vmcache.lifecycle wrote it: a role, the identity twice."""
    run_dir = run_root / f"vm-{VM_ID}"
    start_time = process_start_time(process.pid)
    full = VMHandle(id=VM_ID, pid=process.pid, start_time=start_time, qmp_socket=str(run_dir / "qmp.sock"),
                    agent_socket=str(run_dir / "agent-0.sock"), console_log=str(run_dir / "console.log"),
                    run_dir=str(run_dir), cpu=1, memory=256).to_dict()
    return {"id": VM_ID, "pid": process.pid, "start_time": start_time, "role": role, "owner_uid": 1000,
            "handed_at": time.time(), "expires_at": 0.0, "handle": {**full, **handle}}


def registry_with(tmp_path: Path, record: dict[str, object]) -> VMRegistry:
    registry = VMRegistry(tmp_path / "state", tmp_path)
    registry.prepare()
    (tmp_path / f"vm-{VM_ID}").mkdir()
    (registry.path / f"vm-{VM_ID}.json").write_text(json.dumps(record))
    return registry


async def test_a_daemon_restarted_on_an_older_state_file_adopts_its_claimed_vm(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    registry = registry_with(tmp_path, old_record(tmp_path, fake_qemu, "claimed"))
    killed, claimed = await registry.recover()
    assert (killed, [(life.id, life.phase, life.owner_uid) for life in claimed]) == (
        0, [(VM_ID, Phase.CLAIMED, 1000)])
    ledger = Ledger(registry)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(ledger.run, claimed)
            [entry] = ledger.entries()
            assert (entry.id, entry.phase, entry.handle.pid) == (VM_ID, Phase.CLAIMED, fake_qemu.pid)
            assert fake_qemu.poll() is None  # adopted, not killed
            # Rewritten in today's form: a phase, and the identity once.
            stored = json.loads((registry.path / f"vm-{VM_ID}.json").read_text())
            assert stored["phase"] == "claimed" and "role" not in stored
            assert not {"id", "pid", "start_time"} & set(stored["handle"])
            # ...which a next daemon reads back the same.
            [again] = registry.load()
            assert again.phase is Phase.CLAIMED and again.handle is not None
            assert again.handle.to_dict() == entry.handle.to_dict()
            await ledger.stop(entry, StopReason.ASKED, by=0)
            assert entry.gone.is_set() and entry.life.phase is Phase.GONE
            assert "uid 0 asked (StopVM)" in entry.stop_reason
            nursery.cancel_scope.cancel()
    assert fake_qemu.poll() is not None
    assert registry.load() == [] and not (tmp_path / f"vm-{VM_ID}").exists()


async def test_an_older_daemons_cached_vm_is_killed(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    registry = registry_with(tmp_path, old_record(tmp_path, fake_qemu, "cached"))
    with trio.fail_after(20):
        assert await registry.recover() == (1, [])
    assert fake_qemu.wait(timeout=5) is not None
    assert registry.load() == []


async def test_an_older_record_whose_handle_disagrees_is_not_adopted(
    tmp_path: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    registry = registry_with(tmp_path, old_record(tmp_path, fake_qemu, "claimed", pid=os.getpid()))
    with trio.fail_after(20):
        _killed, claimed = await registry.recover()
    assert [life.handle for life in claimed] == [None]
    ledger = Ledger(registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run, claimed)
        assert ledger.entries() == []
        nursery.cancel_scope.cancel()
    assert fake_qemu.poll() is None, "a process we cannot vouch for is never signalled"
    assert registry.load() == []
