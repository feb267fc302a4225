"""The daemon's network applier: a handed-out VM's restricted policy, enforced on the host.

This joins the three parts of issue 18's enforcement, each in its own module:

- :mod:`vmcache.vm_nic`: the VM booted with a NIC on ``tap0`` in QEMU's own network
  namespace, behind a drop-all ruleset, and :func:`~vmcache.vm_nic.configure_guest`;
- :mod:`vmcache.egress`: :func:`~vmcache.egress.enforce`, the policy's nftables ruleset,
  DNS responder and egress proxy inside that namespace;
- :mod:`vmcache.network_policy`: the policy, and its matching rules.

:class:`NetworkApplier` is what the daemon calls; :class:`HostNetwork` is the one that
enforces, :class:`UnenforcedNetwork` the one of a daemon none of whose pools can grant
network (restricted is refused, never silently unenforced).

For each VM given a restricted policy, :class:`HostNetwork` runs one task, in its own
nursery (started by the daemon before the ledger, so it lives as long as the daemon): the
task holds the VM's namespace open and the enforcement up until :meth:`release` (the VM is
gone) or the daemon stops. A daemon that dies takes the proxy and the DNS responder with it:
the guest's network then fails closed (the ruleset sends every connection to a proxy that is
no longer there); the next daemon, adopting the VM, enforces the recorded policy again
(:meth:`adopt`).

A namespace is reached through ``/proc/PID/ns/net`` and then checked: the process must
still be the VM's (same start time, after the namespace was opened, so a recycled pid is
never taken for it) and the namespace must not be the daemon's own (a ruleset meant for a
VM never lands on the host).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .egress import enforce
from .errors import DaemonError, NetworkSetupError
from .netns import Netns
from .network_policy import NetworkPolicy
from .procfs import process_start_time
from .qemu import VM

log = logging.getLogger("vmcache.network")

#: How long :meth:`HostNetwork.release` waits for an enforcement to come down (its own
#: teardown is bounded too; this bounds the wait of the ledger's shielded cleanup).
RELEASE_TIMEOUT = 15.0
#: How long setting up one VM's enforcement may take (ruleset, sockets in its namespace).
ENFORCE_TIMEOUT = 20.0


def open_vm_netns(pid: int, start_time: int) -> Netns:
    """The network namespace of the VM whose QEMU is ``pid`` (started at ``start_time``,
    clock ticks since boot), opened and then checked (see the module's docstring)."""
    netns = Netns(f"/proc/{pid}/ns/net")
    try:
        if not start_time or process_start_time(pid) != start_time:
            raise NetworkSetupError(f"VM process {pid} is gone: its network cannot be set up")
        if os.fstat(netns.fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            raise NetworkSetupError(f"VM process {pid} shares the daemon's network namespace "
                                    "(not a confined VM): its network is not set up there")
    except BaseException:
        netns.close()
        raise
    return netns


class NetworkApplier(Protocol):
    """What the daemon calls to enforce a VM's policy. The enforcement (egress proxy, DNS,
    nftables in the VM's network namespace) plugs in here; the daemon calls:

    * :meth:`check` before it takes a VM for a request: refuse (raise) a policy this
      applier cannot enforce, so that no VM is spent on it;
    * :meth:`apply` on the VM while it is still set aside, before its handle goes out;
      if it raises, the VM is discarded (stopped and replaced), never handed out;
    * :meth:`release` once a VM that went through :meth:`apply` is gone (stopped, died,
      or discarded), whatever ended it, and for every handed-out VM the ledger forgets (an
      id it never applied to is a no-op). It must not raise, and must be bounded;
    * :meth:`run` for the daemon's life, started before the first hand-out: the applier's
      own tasks (a VM's proxy and DNS responder) live in it, and die with the daemon;
    * :meth:`adopt` (synchronous: it may only start work in :meth:`run`'s tasks) for a VM a
      previous daemon handed out with ``policy``, adopted by this daemon's ledger: enforce it
      again (the guest was configured before).
    """

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...

    def check(self, policy: NetworkPolicy) -> None: ...

    async def apply(self, vm: VM, policy: NetworkPolicy) -> None: ...

    async def release(self, vm_id: str) -> None: ...

    def adopt(self, vm_id: str, pid: int, start_time: int, policy: NetworkPolicy) -> None: ...


class UnenforcedNetwork:
    """The applier of a build without enforcement: mode none passes, ``restricted`` is
    refused, so that a policy is never silently left unenforced."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def check(self, policy: NetworkPolicy) -> None:
        if policy.is_restricted:
            raise DaemonError("network mode restricted is not enforced in this build of vmcache "
                              "(no egress proxy): ask for network none")

    async def apply(self, vm: VM, policy: NetworkPolicy) -> None:
        self.check(policy)

    async def release(self, vm_id: str) -> None:
        return None

    def adopt(self, vm_id: str, pid: int, start_time: int, policy: NetworkPolicy) -> None:
        if policy.is_restricted:
            log.warning("VM %s was handed out with network %s, which this daemon does not enforce: "
                        "its network stays closed", vm_id, policy.describe())


@dataclass
class _Held:
    """One VM's running enforcement: its task's scope, and when it is down."""

    policy: NetworkPolicy
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    started: bool = False
    done: trio.Event = field(default_factory=trio.Event)


class HostNetwork:
    """The :class:`NetworkApplier` of a daemon that enforces
    restricted policies (it must run as root: the VMs' namespaces are entered)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._held: dict[str, _Held] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def check(self, policy: NetworkPolicy) -> None:
        """Every policy can be enforced here (the daemon's root check is at start)."""

    async def apply(self, vm: VM, policy: NetworkPolicy) -> None:
        """Enforce ``policy`` before the VM is handed out (its guest configured its NIC at
        boot: vmcache.qemu.wait_for_boot). Mode none leaves the NIC behind its drop-all
        ruleset: the guest reaches nothing."""
        if not policy.is_restricted:
            return
        await self._start(vm.id, vm.pid, vm.start_time, policy)

    def adopt(self, vm_id: str, pid: int, start_time: int, policy: NetworkPolicy) -> None:
        """Enforce again the policy of a VM a previous daemon handed out (its guest is
        configured already). A failure is logged: that VM's network stays closed.

        The VM is held from this call on, before its enforcement is up: a :meth:`release`
        that comes first (the VM exited at once) then waits for it and takes it down, and
        never leaves an enforcement behind for a VM the ledger has already forgotten."""
        if not policy.is_restricted or self._nursery is None:
            return
        if vm_id in self._held:
            log.warning("VM %s has its network set up already (a vmcache bug)", vm_id)
            return
        held = self._held[vm_id] = _Held(policy)

        async def again() -> None:
            try:
                await self._start(vm_id, pid, start_time, policy, held)
            except Exception as error:  # never the daemon's end: that VM's network stays closed
                log.warning("VM %s keeps no network: %s", vm_id, error)

        self._nursery.start_soon(again, name=f"vmcache network adopt {vm_id}")

    async def _start(self, vm_id: str, pid: int, start_time: int, policy: NetworkPolicy,
                     adopted: _Held | None = None) -> None:
        assert self._nursery is not None, "HostNetwork.run is not running"
        if adopted is None and vm_id in self._held:
            raise NetworkSetupError(f"VM {vm_id} has its network set up already (a vmcache bug)")
        held = self._held[vm_id] = adopted or _Held(policy)
        try:
            netns = open_vm_netns(pid, start_time)
        except BaseException:
            self._held.pop(vm_id, None)
            held.done.set()
            raise
        try:
            with trio.fail_after(ENFORCE_TIMEOUT):
                await self._nursery.start(self._hold, vm_id, netns, held)
        except BaseException as error:
            if self._held.get(vm_id) is held:
                del self._held[vm_id]
            held.done.set()
            netns.close()
            if isinstance(error, trio.TooSlowError):
                raise NetworkSetupError(f"VM {vm_id}'s network took more than {ENFORCE_TIMEOUT:g} s "
                                        "to set up") from None
            raise

    async def _hold(self, vm_id: str, netns: Netns, held: _Held, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with held.scope:
                async with enforce(netns, held.policy, vm=vm_id):
                    log.info("VM %s network: %s", vm_id, held.policy.describe())
                    held.started = True
                    task_status.started()
                    await trio.sleep_forever()
            if not held.started:  # released (the VM went) while being set up
                raise NetworkSetupError(f"VM {vm_id} went while its network was being set up")
        finally:
            netns.close()
            held.done.set()
            if self._held.get(vm_id) is held:
                del self._held[vm_id]

    async def release(self, vm_id: str) -> None:
        """Take down the enforcement of ``vm_id`` (a no-op for a VM never applied to)."""
        held = self._held.get(vm_id)
        if held is None:
            return
        held.scope.cancel()
        with trio.move_on_after(RELEASE_TIMEOUT):
            await held.done.wait()

    def held(self) -> int:
        """How many VMs have an enforcement up (the soak and chaos runs count these)."""
        return len(self._held)
