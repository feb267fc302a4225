"""Between the wire's protobuf messages and vmcache's Python objects, both ways.

The daemon and the client both speak through this module, so that neither
imports the other, and Kata's field names stay in one place.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from ._proto import cache_pb2
from .errors import CacheError, NetworkPolicyError, printable
from .handle import VMHandle
from .lifecycle import Phase
from .network_policy import NetworkPolicy

SERVICE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


@attrs.frozen
class CacheEvent:
    """One change in the cache, as ``Watch`` streams it."""

    #: A :class:`~vmcache.lifecycle.EventKind` from this daemon; a plain str as read off the
    #: wire (a newer daemon's kinds must not break an older watcher).
    kind: str
    vm_id: str
    pid: int
    message: str
    time: float
    ready: int
    cache_size: int
    pool: str = ""


@attrs.frozen
class CachedVMStatus:
    """A cached VM, ready to be handed out."""

    pid: int
    cpu: int
    memory: int
    id: str = ""
    rss_bytes: int = 0
    pool: str = ""
    accel: str = ""  # "kvm" or "tcg": what its QEMU was started with


@attrs.frozen
class PoolStatus:
    """One pool: its shape and how full it is."""

    name: str
    cpu: int
    memory: int
    cache_size: int
    ready: int
    booting: int
    boot_mode: str
    paused: int = 0


@attrs.frozen
class HandedOutVMStatus:
    """A VM the daemon handed out and keeps track of (its ledger)."""

    id: str
    pid: int
    owner_uid: int
    handed_at: float
    #: offered, leased, claimed (stopping while it is being stopped); a newer daemon's phase
    #: this client does not know stays the daemon's word, so Status keeps working.
    state: Phase | str
    expires_at: float = 0.0  # Unix time; 0 = no TTL
    cpu: int = 0
    memory: int = 0
    accel: str = ""
    #: The policy it was handed out with; a newer daemon's this client cannot read stays
    #: the daemon's words (:meth:`NetworkPolicy.describe`'s form), so Status keeps working.
    network: NetworkPolicy | str = attrs.Factory(NetworkPolicy)


@attrs.frozen
class CacheStatus:
    """What ``Status`` says: the daemon's pid, its cached ready VMs, the ledger, counters."""

    pid: int
    vms: list[CachedVMStatus]
    cache_size: int = 0
    booting: int = 0
    last_boot_error: str = ""
    boot_failures_in_row: int = 0
    boots: int = 0
    boot_failures: int = 0
    handed_out: int = 0
    median_boot_seconds: float = 0.0
    median_handout_seconds: float = 0.0
    uptime_seconds: float = 0.0
    boot_mode: str = ""
    handed_out_vms: list[HandedOutVMStatus] = attrs.Factory(list)
    pools: list[PoolStatus] = attrs.Factory(list)
    p99_handout_seconds: float = 0.0
    #: What VMs boot with ("kvm", "tcg"; "" while auto's KVM probe is pending), and why.
    accel: str = ""
    accel_reason: str = ""
    require_hardware_accel: bool = False
    #: "" or the message hand-outs are refused with (FAILED_PRECONDITION).
    refusal: str = ""
    confinement: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, value_serializer=_plain)


def _plain(_instance: object, _field: object, value: Any) -> Any:
    """``to_dict``'s values, JSON-able: a network policy as its own dict."""
    return value.to_dict() if isinstance(value, NetworkPolicy) else value


# ---------------------------------------------------------------- network policies


def policy_message(policy: NetworkPolicy) -> cache_pb2.NetworkPolicy:
    return cache_pb2.NetworkPolicy(mode=str(policy.mode), allow=[str(entry) for entry in policy.allow])


def policy_from_message(message: cache_pb2.NetworkPolicy) -> NetworkPolicy:
    """The policy a message carries; :class:`NetworkPolicyError` (one line) if it is not valid."""
    return NetworkPolicy.parse(message.mode, list(message.allow))


def _status_policy(message: cache_pb2.NetworkPolicy) -> NetworkPolicy | str:
    try:
        return policy_from_message(message)
    except NetworkPolicyError:
        words = f"{message.mode}: {', '.join(message.allow)}" if message.allow else message.mode
        return printable(words[:200])


# ---------------------------------------------------------------- VMs


def kata_hypervisor_json(handle: VMHandle) -> bytes:
    """``GrpcVM.hypervisor``: Kata's QEMU-handle key names where one fits, plus ours."""
    return json.dumps({
        "ID": handle.id,
        "QmpChannelpath": handle.qmp_socket,
        "State": {"Pid": handle.pid, "UUID": handle.boot_id},
        "vmcache": handle.to_dict(),
    }, sort_keys=True).encode()


def grpc_vm(handle: VMHandle) -> cache_pb2.GrpcVM:
    """The ``GrpcVM`` a client gets for a VM (Kata's fields, our handle inside).

    ``cpu`` and ``memory`` are the size handed out (grown if the client asked for more than
    its pool's shape); ``cpuDelta``, in Kata the vCPUs hot-added but not yet onlined, is 0:
    vmcache onlines them before the hand-out."""
    return cache_pb2.GrpcVM(
        id=handle.id,
        hypervisor=kata_hypervisor_json(handle),
        proxyPid=0,
        proxyURL=f"unix://{handle.agent_socket}",
        cpu=handle.cpu,
        memory=handle.memory,
        cpuDelta=0,
    )


def handle_from_grpc_vm(message: cache_pb2.GrpcVM) -> VMHandle:
    """The VM handle inside a ``GrpcVM`` (our ``vmcache`` key in ``hypervisor``)."""
    try:
        data = json.loads(message.hypervisor)
        return VMHandle.from_daemon(data["vmcache"])
    except (ValueError, KeyError, TypeError) as error:
        raise CacheError(f"the daemon's GrpcVM carries no vmcache handle: {error}") from None


# ---------------------------------------------------------------- events


def event_message(event: CacheEvent) -> cache_pb2.GrpcEvent:
    return cache_pb2.GrpcEvent(kind=event.kind, vm_id=event.vm_id, pid=event.pid,
                               message=event.message, time=event.time, ready=event.ready,
                               cache_size=event.cache_size, pool=event.pool)


def event_from_message(message: cache_pb2.GrpcEvent) -> CacheEvent:
    return CacheEvent(message.kind, message.vm_id, message.pid, message.message,
                      message.time, message.ready, message.cache_size, message.pool)


# ---------------------------------------------------------------- status


def status_message(status: CacheStatus) -> cache_pb2.GrpcStatus:
    return cache_pb2.GrpcStatus(
        pid=status.pid,
        vmstatus=[
            cache_pb2.GrpcVMStatus(pid=vm.pid, cpu=vm.cpu, memory=vm.memory, id=vm.id,
                                   rss_bytes=vm.rss_bytes, pool=vm.pool, accel=vm.accel)
            for vm in status.vms
        ],
        cache_size=status.cache_size,
        booting=status.booting,
        last_boot_error=status.last_boot_error,
        boot_failures_in_row=status.boot_failures_in_row,
        boots=status.boots,
        boot_failures=status.boot_failures,
        handed_out=status.handed_out,
        median_boot_seconds=status.median_boot_seconds,
        median_handout_seconds=status.median_handout_seconds,
        p99_handout_seconds=status.p99_handout_seconds,
        uptime_seconds=status.uptime_seconds,
        boot_mode=status.boot_mode,
        confinement=status.confinement,
        handed_out_vms=[
            cache_pb2.GrpcHandedOutVM(id=vm.id, pid=vm.pid, owner_uid=vm.owner_uid,
                                      handed_at=vm.handed_at, state=str(vm.state),
                                      expires_at=vm.expires_at, cpu=vm.cpu, memory=vm.memory,
                                      accel=vm.accel, network=_network_field(vm.network))
            for vm in status.handed_out_vms
        ],
        pools=[
            cache_pb2.GrpcPool(name=pool.name, cpu=pool.cpu, memory=pool.memory,
                               cache_size=pool.cache_size, ready=pool.ready, booting=pool.booting,
                               boot_mode=pool.boot_mode, paused=pool.paused)
            for pool in status.pools
        ],
        accel=status.accel,
        accel_reason=status.accel_reason,
        require_hardware_accel=status.require_hardware_accel,
        refusal=status.refusal,
    )


def status_from_message(message: cache_pb2.GrpcStatus) -> CacheStatus:
    return CacheStatus(
        pid=message.pid,
        vms=[CachedVMStatus(vm.pid, vm.cpu, vm.memory, vm.id, vm.rss_bytes, vm.pool, vm.accel)
             for vm in message.vmstatus],
        cache_size=message.cache_size,
        booting=message.booting,
        last_boot_error=message.last_boot_error,
        boot_failures_in_row=message.boot_failures_in_row,
        boots=message.boots,
        boot_failures=message.boot_failures,
        handed_out=message.handed_out,
        median_boot_seconds=message.median_boot_seconds,
        median_handout_seconds=message.median_handout_seconds,
        p99_handout_seconds=message.p99_handout_seconds,
        uptime_seconds=message.uptime_seconds,
        boot_mode=message.boot_mode,
        confinement=message.confinement,
        handed_out_vms=[
            HandedOutVMStatus(vm.id, vm.pid, vm.owner_uid, vm.handed_at, _phase(vm.state),
                              vm.expires_at, vm.cpu, vm.memory, vm.accel, _status_policy(vm.network))
            for vm in message.handed_out_vms
        ],
        pools=[PoolStatus(pool.name, pool.cpu, pool.memory, pool.cache_size, pool.ready, pool.booting,
                          pool.boot_mode, pool.paused) for pool in message.pools],
        accel=message.accel,
        accel_reason=message.accel_reason,
        require_hardware_accel=message.require_hardware_accel,
        refusal=message.refusal,
    )


def _network_field(policy: NetworkPolicy | str) -> cache_pb2.NetworkPolicy:
    if isinstance(policy, NetworkPolicy):
        return policy_message(policy)
    return cache_pb2.NetworkPolicy(mode=policy)


def _phase(text: str) -> Phase | str:
    try:
        return Phase(text)
    except ValueError:
        return printable(text[:40])
