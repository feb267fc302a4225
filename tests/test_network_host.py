"""HostNetwork's bookkeeping, without QEMU: an enforcement never outlives its VM's release."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from vmcache import network_host
from vmcache.netns import Netns
from vmcache.network_host import HostNetwork
from vmcache.network_policy import NetworkPolicy

POLICY = NetworkPolicy.parse("restricted", ["host.vmcache.internal:8080"])


async def test_a_vm_released_before_its_adopted_enforcement_is_up_keeps_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    up: list[str] = []

    @asynccontextmanager
    async def enforce(netns: Netns, policy: NetworkPolicy, *, vm: str) -> AsyncIterator[None]:
        await trio.lowlevel.checkpoint()
        up.append(vm)
        try:
            yield
        finally:
            up.remove(vm)

    monkeypatch.setattr(network_host, "enforce", enforce)
    monkeypatch.setattr(network_host, "open_vm_netns", lambda pid, start_time: Netns("/proc/self/ns/net"))
    network = HostNetwork()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(network.run)
            # Adopted, and gone at once: the ledger releases it before its enforcement is up.
            network.adopt("quick", 1, 1, POLICY)
            await network.release("quick")
            await trio.testing.wait_all_tasks_blocked()
            assert (network.held(), up) == (0, [])
            # Adopted and kept: up until released, then down.
            network.adopt("kept", 1, 1, POLICY)
            await trio.testing.wait_all_tasks_blocked()
            assert (network.held(), up) == (1, ["kept"])
            await network.release("kept")
            assert (network.held(), up) == (0, [])
            nursery.cancel_scope.cancel()
