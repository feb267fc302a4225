"""What one client may take and do: the per-uid cap, cold boots under max_parallel_boots,
Quit for root and the daemon's uid only. The daemon's logic, with fakes, in virtual time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing
from fakes import FakeProcess
from google.protobuf.empty_pb2 import Empty

from vmcache.config import VMSpec, load_config
from vmcache.errors import NotAllowedError, QuotaReachedError
from vmcache.handle import VMHandle
from vmcache.ledger import HandedOut
from vmcache.lifecycle import Phase, VMLife
from vmcache.placement import Placement
from vmcache.security import PeerCredentials
from vmcache.server import CacheDaemon


def spec(run_root: Path) -> VMSpec:
    return VMSpec(qemu=Path("/fake/qemu"), kernel=Path("/k"), initrd=Path("/i"), kernel_params="",
                  machine_type="q35", vcpus=1, memory_mib=256, accel="tcg", boot_timeout=10,
                  kvm_probe_timeout=5, run_root=run_root)


def make_daemon(tmp_path: Path, **factory: int) -> CacheDaemon:
    path = tmp_path / "c.toml"
    path.write_text("[factory]\n" + f'vm_cache_endpoint = "{tmp_path / "s.sock"}"\n'
                    + "".join(f"{key} = {value}\n" for key, value in factory.items()))
    return CacheDaemon(load_config(path), spec(tmp_path))


def handle(vm_id: str) -> VMHandle:
    return VMHandle(id=vm_id, pid=1, start_time=1, qmp_socket="q", agent_socket="a", console_log="c",
                    run_dir="r", cpu=1, memory=256)


def hold(daemon: CacheDaemon, vm_id: str, uid: int, phase: Phase = Phase.CLAIMED) -> None:
    life = VMLife(vm_id, 1, 1, phase, owner_uid=uid, handed_at=time.time(), handle=handle(vm_id))
    entry = HandedOut(life, FakeProcess(dies_of=set()))
    daemon.ledger._entries[vm_id] = entry


def test_a_uid_at_its_cap_is_refused_with_what_to_do(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, max_vms_per_uid=2)
    hold(daemon, "0123456789aa", 1000)
    hold(daemon, "0123456789ab", 1000, Phase.LEASED)
    hold(daemon, "0123456789ac", 2000, Phase.OFFERED)
    with pytest.raises(QuotaReachedError, match=r"uid 1000 already holds 2 VMs .*max_vms_per_uid = 2.*"
                       r"stop one \(vmcache stop HANDLE\)"), daemon._hand_out_to(1000):
        pass
    # Another uid has room; hand-outs under way count, so concurrent asks cannot overrun it.
    with daemon._hand_out_to(2000):
        second = daemon._hand_out_to(2000)
        with pytest.raises(QuotaReachedError, match="uid 2000 already holds 2"):
            second.__enter__()
    assert not daemon._asking  # nothing left counted once the hand-outs are over
    with daemon._hand_out_to(2000):
        pass


def test_no_cap_by_default(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    for index in range(20):
        hold(daemon, f"0123456789{index:02x}", 1000)
    with daemon._hand_out_to(1000):
        pass


async def test_cold_boots_wait_for_their_turn_among_max_parallel_boots(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, max_parallel_boots=1)
    booted: list[VMSpec] = []

    class Booted:
        def handle(self) -> VMHandle:
            return handle("0123456789ff")

        async def release(self) -> tuple[VMHandle, FakeProcess]:
            return handle("0123456789ff"), FakeProcess(dies_of=set())

    async def fake_boot(spec: VMSpec) -> Booted:
        booted.append(spec)
        return Booted()

    daemon._plain_boot = fake_boot  # type: ignore[assignment]
    placement = Placement(pool=None, vcpus=1, memory_mib=128)
    async with trio.open_nursery() as nursery:
        async with daemon.boots:  # a pool's boot holds the only token
            nursery.start_soon(daemon._boot_cold, placement)
            await trio.testing.wait_all_tasks_blocked()
            assert booted == [], "a cold boot started beside the boot holding max_parallel_boots"
        with trio.fail_after(5):
            while not booted:
                await trio.sleep(0.01)
    assert [(s.vcpus, s.memory_mib) for s in booted] == [(1, 128)]
    assert daemon.cold_boots == 1 and daemon.boots.borrowed_tokens == 0


async def test_quit_is_for_root_and_the_daemons_uid(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    with pytest.raises(NotAllowedError, match=r"Quit is for root and uid 0 .*uid 65534 may not"):
        await daemon._quit(Empty(), PeerCredentials(pid=1, uid=65534, gid=65534))
    assert not daemon._stop.is_set()
    await daemon._quit(Empty(), PeerCredentials(pid=1, uid=0, gid=0))
    assert daemon._stop.is_set()
