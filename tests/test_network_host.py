"""HostNetwork, the daemon's applier, without QEMU: its enforcement tasks against a fake
``enforce`` (the real one is tested in test_egress.py, the whole in test_network_daemon.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import vmcache.network_host as network_host
from vmcache.errors import NetworkSetupError
from vmcache.netns import Netns
from vmcache.network_host import ENFORCE_TIMEOUT, HostNetwork
from vmcache.network_policy import NetworkPolicy

POLICY = NetworkPolicy.parse("restricted", ["host.vmcache.internal:8080"])


class FakeNetns:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[FakeNetns]:
    """Every namespace HostNetwork opens (a fake), and an enforce() that takes a second to
    come up and then holds until cancelled."""
    namespaces: list[FakeNetns] = []

    def open_vm_netns(pid: int, start_time: int) -> FakeNetns:
        namespaces.append(FakeNetns())
        return namespaces[-1]

    @asynccontextmanager
    async def enforce(netns: Any, policy: Any, **kwargs: Any) -> AsyncIterator[None]:
        await trio.sleep(1.0)
        yield

    monkeypatch.setattr(network_host, "open_vm_netns", open_vm_netns)
    monkeypatch.setattr(network_host, "enforce", enforce)
    return namespaces


async def test_a_vm_released_while_its_adopted_network_comes_up_costs_the_daemon_nothing(
        opened: list[FakeNetns], autojump_clock: trio.testing.MockClock) -> None:
    """Adopted, then gone (its TTL had passed) before its enforcement was up: the applier's
    task tree goes on (before: RuntimeError from nursery.start, the daemon's end)."""
    network = HostNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        network.adopt("vm-1", 1234, 5678, POLICY)
        await trio.sleep(0.1)
        await network.release("vm-1")
        await trio.sleep(2)
        assert network.held() == 0 and opened[0].closed
        network.adopt("vm-2", 1235, 5679, POLICY)  # and the next one still comes up
        await trio.sleep(2)
        assert network.held() == 1
        await network.release("vm-2")
        assert network.held() == 0 and opened[1].closed
        nursery.cancel_scope.cancel()


async def test_a_network_that_does_not_come_up_in_time_is_a_setup_error(
        opened: list[FakeNetns], monkeypatch: pytest.MonkeyPatch,
        autojump_clock: trio.testing.MockClock) -> None:
    """Not a TooSlowError (an 'internal error' with a traceback): the VM is discarded."""
    monkeypatch.setattr(network_host, "ENFORCE_TIMEOUT", 0.5)
    network = HostNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        with pytest.raises(NetworkSetupError, match=r"took more than 0\.5 s"):
            await network._start("vm-1", 1234, 5678, POLICY)
        assert network.held() == 0 and opened[0].closed
        nursery.cancel_scope.cancel()
    assert ENFORCE_TIMEOUT > 1


async def test_release_during_set_up_at_hand_out_is_a_setup_error(
        opened: list[FakeNetns], autojump_clock: trio.testing.MockClock) -> None:
    network = HostNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)

        async def release_soon() -> None:
            await trio.sleep(0.1)
            await network.release("vm-1")

        nursery.start_soon(release_soon)
        with pytest.raises(NetworkSetupError, match="went while its network was being set up"):
            await network._start("vm-1", 1234, 5678, POLICY)
        assert network.held() == 0 and opened[0].closed
        nursery.cancel_scope.cancel()


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
