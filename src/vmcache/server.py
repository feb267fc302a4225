"""The cache daemon: a VM pool, a ledger of handed-out VMs, and ``cache.CacheService``.

Library use (the caller's nursery supervises; cancelling it purges the cache)::

    config = vmcache.load_config("vmcache.toml")
    async with trio.open_nursery() as nursery:
        await nursery.start(vmcache.serve, config)   # returns once the socket listens
        ...
        nursery.cancel_scope.cancel()                # kills every cached VM

:func:`serve` also returns by itself when a client calls ``Quit``.

Task tree::

    CacheDaemon.run       nursery
    ├── network           the NetworkApplier's own tasks (a VM's egress proxy, its DNS)
    ├── ledger            one watcher per handed-out VM (reap, TTL, stop on request)
    ├── snapshots         (boot_mode = "snapshot") the template snapshot
    ├── pool              one task per cache slot
    └── rpc server        one task per connection, one per call
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import attrs
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message as ProtoMessage

from ._proto import cache_pb2
from .accel import AccelChooser
from .backoff import Backoff
from .cgroup import manager as cgroup_manager
from .config import DEFAULT_POOL, Config, NetworkConfig, VMSpec, is_loopback_host, resolve_spec
from .e2b_sandbox import RECORDS_DIR, SandboxManager
from .e2b_server import E2BServer, load_api_keys, serve_e2b
from .errors import (
    BadRequestError,
    ConfigError,
    DaemonError,
    HandleError,
    HardwareAccelRequiredError,
    NetworkPolicyError,
    NoSuchVMError,
    NotAllowedError,
    NoVMAvailableError,
    QuotaReachedError,
    VmcacheError,
    VMGoneError,
    WaitExpiredError,
)
from .handle import VMHandle
from .hotplug import grow
from .jail import check_jail_paths, describe_confinement
from .ledger import HandedOut, Ledger
from .lifecycle import EventKind, Phase, StopReason
from .network_host import HostNetwork, NetworkApplier, UnenforcedNetwork
from .network_policy import NetworkPolicy
from .notify import Notifier
from .paths import make_private_dir
from .placement import Placement, place
from .pool import EventHub, Lease, VMPool, total_stats
from .process import ProcessLike
from .qemu import VM, boot_vm, kvm_probe_file
from .rpc.endpoint import bind_unix_socket
from .rpc.server import CallGone, Method, RpcCall, RpcServer, server_streaming, unary, unary_with_peer
from .security import PeerCredentials, PeerPolicy, raise_open_file_limit, resolve_group
from .snapshot import SnapshotManager
from .state import VMRegistry, state_dir_for
from .wire import (
    SERVICE,
    CachedVMStatus,
    CacheEvent,
    CacheStatus,
    HandedOutVMStatus,
    PoolStatus,
    event_message,
    grpc_vm,
    policy_from_message,
    status_message,
)

log = logging.getLogger("vmcache.server")

#: After Quit or a signal, how long calls may take to end (leases end as their VMs stop).
DRAIN_TIMEOUT = 3.0
#: How long a TakeVM client has to claim the VM it was offered, and how long any hand-out
#: reply (Kata's, an offer, a confirmation) may take to be written.
CLAIM_TIMEOUT = 10.0
#: How long a TakeVM ask waits for a ready VM when it does not say.
DEFAULT_WAIT = 60.0
#: The longest wait or TTL a client may ask for.
MAX_SECONDS = 30 * 24 * 3600.0
#: How long growing a VM (hot-add, then the guest's own view of it) may take.
GROW_TIMEOUT = 20.0
AGENT_CONFIG = {"protocol": "vmcache-agent/1", "port": "vmcache.agent"}


class CacheDaemon:
    """One daemon: the pool, the ledger, the rpc handlers, crash recovery, an orderly stop."""

    def __init__(self, config: Config, spec: VMSpec | None = None,
                 network: NetworkApplier | None = None) -> None:
        self.config = config
        self.spec = spec if spec is not None else resolve_spec(config)
        self.endpoint = config.endpoint()
        factory = config.factory
        self.group_gid = resolve_group(factory.socket_group)
        state_dir = state_dir_for(self.spec.run_root, self.endpoint)
        self.registry = VMRegistry(state_dir, self.spec.run_root)
        self.accel = AccelChooser(kvm_probe_file(self.spec.run_root), self.spec.accel,
                                  self.spec.require_hardware_accel, daemon=True)
        self._plain_boot = functools.partial(boot_vm, registry=self.registry, accel=self.accel)
        self.snapshots: list[SnapshotManager] = []
        self.events = EventHub()
        self.shapes = config.pool_shapes()
        if network is None:  # enforced on the host where a pool's VMs can be given network
            can_grant = config.network.needs_nic or any(shape.network.needs_nic for shape in self.shapes)
            network = HostNetwork() if can_grant else UnenforcedNetwork()
        #: Enforces a VM's network policy at hand-out.
        self._network: NetworkApplier = network
        self.pools: dict[str, VMPool] = {}
        #: Boots at once, across pools: 0 = one per host CPU.
        self.boots = trio.CapacityLimiter(factory.max_parallel_boots or os.cpu_count() or 1)
        for shape in self.shapes:
            spec_for_pool = attrs.evolve(self.spec, vcpus=shape.vcpus, memory_mib=shape.memory_mib,
                                         nic=shape.network.needs_nic)
            boot_for_pool = self._fill_boot
            if shape.boot_mode == "snapshot":
                manager = SnapshotManager(spec_for_pool, state_dir / "snapshots" / shape.name,
                                          self.registry, plain_boot=self._fill_boot,
                                          share_memory=factory.share_template_memory)
                self.snapshots.append(manager)
                boot_for_pool = manager.boot
            self.pools[shape.name] = VMPool(
                spec_for_pool, shape.size, boot=boot_for_pool,
                backoff=lambda: Backoff(factory.boot_retry_initial, factory.boot_retry_max),
                health_interval=factory.health_interval, name=shape.name, events=self.events,
                boots=self.boots, idle=factory.idle_vms, hot=factory.hot_vms,
            )
        #: The default pool: Kata's keys, and what GetBaseVM hands out.
        self.pool = self.pools[DEFAULT_POOL]
        self.ledger = Ledger(self.registry, on_event=self._ledger_event, on_gone=self._network.release,
                             on_adopt=self._network.adopt)
        #: VMs booted cold, at a size no pool could grow to, and handed out.
        self.cold_boots = 0
        self.started = time.monotonic()
        self.notifier = Notifier()
        self._stop = trio.Event()
        #: Where the E2B API listens, once it does (its port when [e2b] listen says 0).
        self.e2b_address: tuple[str, int] | None = None
        self.peer_policy = PeerPolicy(self.group_gid)
        #: Per uid, hand-outs under way (asked, not yet in the ledger): they count against
        #: max_vms_per_uid too, so that concurrent asks cannot overrun it.
        self._asking: collections.Counter[int] = collections.Counter()
        #: E2B's sandboxes, when [e2b] listen is set (vmcache.e2b_server).
        self.e2b: SandboxManager | None = (
            SandboxManager(self, state_dir / RECORDS_DIR) if config.e2b.address is not None else None)
        self.rpc = RpcServer(SERVICE, {
            "Config": Method(Empty, unary(self._config)),
            "GetBaseVM": Method(Empty, self._get_base_vm),
            "Status": Method(Empty, unary(self._status)),
            "Quit": Method(Empty, unary_with_peer(self._quit)),
            "Watch": Method(Empty, server_streaming(self._watch)),
            "TakeVM": Method(cache_pb2.TakeRequest, self._take_vm),
            "StopVM": Method(cache_pb2.StopVMRequest, unary_with_peer(self._stop_vm)),
        }, check_peer=self.peer_policy.check)

    def request_stop(self) -> None:
        """Stop as Ctrl-C does: kill cached VMs, remove the socket, return."""
        self._stop.set()

    def _prepare_directories(self) -> None:
        make_private_dir(self.spec.run_root)
        if not os.access(self.spec.run_root, os.W_OK):
            raise ConfigError(f"run directory {self.spec.run_root} is not writable")
        if self.spec.jail is not None:
            check_jail_paths(self.spec)
        self.registry.prepare()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._prepare_directories()
        api_keys = (await trio.to_thread.run_sync(load_api_keys, self.config.e2b.api_keys_file)
                    if self.e2b is not None else [])
        sock = bind_unix_socket(self.endpoint, self.group_gid)
        inode = os.stat(self.endpoint).st_ino
        raise_open_file_limit()
        try:
            # Only now, holding the endpoint, do we know no live daemon owns these records.
            killed, claimed = await self.registry.recover()
            if killed:
                log.warning("killed %d VMs a previous daemon on %s left behind", killed, self.endpoint)
            self.accel.announce_at_start(self.spec.qemu)
            async with trio.open_nursery() as nursery:
                await nursery.start(self._network.run)
                await nursery.start(self.ledger.run, claimed)
                nursery.start_soon(self._report_progress, self._watch_all())
                await nursery.start(self._fill)
                await nursery.start(self.rpc.serve, sock)
                if self.e2b is not None:
                    await nursery.start(self._serve_e2b, self.e2b, api_keys)
                if self.spec.jail is not None:
                    await trio.to_thread.run_sync(cgroup_manager().check)
                log.info("QEMU confinement: %s", describe_confinement(self.spec))
                log.info("listening on %s; filling %s (pid %d)", self.endpoint, ", ".join(
                    f"{shape.name}: {shape.size} x {shape.vcpus} vCPU {shape.memory_mib} MiB"
                    for shape in self.shapes), os.getpid())
                task_status.started()
                await self._stop.wait()
                log.info("stopping: purging the cache")
                self.notifier.send(STOPPING="1", STATUS="stopping: purging the cache")
                for pool in self.pools.values():
                    pool.close()
                self.events.close()
                for entry in self.ledger.entries():
                    if entry.phase is not Phase.CLAIMED:
                        self.ledger.request_stop(entry, StopReason.DAEMON_STOPPING)
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self.rpc.wait_idle()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            self._remove_socket(inode)
            self.notifier.close()
            totals = total_stats(self.pools.values())
            log.info("stopped: %d VMs handed out, %d cached VMs killed, %d handed-out VMs left running",
                     totals.handed_out, totals.killed,
                     sum(entry.phase is Phase.CLAIMED for entry in self.ledger.entries()))

    async def _serve_e2b(self, manager: SandboxManager, api_keys: list[str], *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """E2B's API ([e2b] listen): the sandboxes and the listener, until cancelled. A
        daemon's stop ends the listener, not the sandboxes: they are claimed hand-outs."""
        address = self.config.e2b.address
        assert address is not None
        host, port = address
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            listeners = await nursery.start(serve_e2b, E2BServer(manager, api_keys), host, port)
            bound = listeners[0].socket.getsockname()
            self.e2b_address = (bound[0], bound[1])
            if not is_loopback_host(host):
                log.warning("the E2B API listens on %s, which is not loopback: anyone who can reach "
                            "it and holds an API key of %s can take VMs ([e2b] listen)", host,
                            self.config.e2b.api_keys_file)
            log.info("E2B API listening on http://%s:%d (E2B_API_URL and E2B_SANDBOX_URL; %d API "
                     "keys from %s)", host if ":" not in host else f"[{host}]", bound[1],
                     len(api_keys), self.config.e2b.api_keys_file)
            task_status.started()

    # ------------------------------------------------------------ E2B's hand-out (VMSource)

    @property
    def pool_names(self) -> list[str]:
        return list(self.pools)

    async def hand_out_claimed(self, pool: str, *, ttl: float, wait: float = DEFAULT_WAIT) -> HandedOut:
        """A VM of ``pool`` claimed at once by the daemon's own uid with ``ttl``: TakeVM's
        hand-out (lease, network policy default, quota) with the offer and claim in one step,
        for E2B's create, waiting at most ``wait`` s for one. A VM is in the ledger before this
        returns, or back in the cache (a cancelled wait claims nothing)."""
        uid = self.peer_policy.own_uid
        placement = place(self.shapes, pool=pool, max_vcpus=self.spec.max_vcpus,
                          max_memory_mib=self.spec.max_memory_mib)
        policy = self._network_policy(None, placement.pool)
        handed_out = trio.Event()
        started = trio.current_time()
        try:
            with self._hand_out_to(uid):
                with trio.move_on_after(wait) as waited:
                    handle, process = await self._take_from_pool(self.pools[pool], placement,
                                                                 handed_out, policy)
                if waited.cancelled_caught:
                    raise WaitExpiredError(f"no VM of pool {pool!r} became ready within {wait:g} s")
                handle.network = policy
                entry = self.ledger.adopt(handle, process, uid, Phase.OFFERED)
            try:
                self.ledger.claim(entry, lease=False, ttl=ttl)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.ledger.stop(entry, StopReason.NOT_CLAIMED)
                raise
        finally:
            handed_out.set()
        self.pools[pool].stats.note_handout(trio.current_time() - started)
        return entry

    def set_ttl(self, entry: HandedOut, ttl: float) -> None:
        self.ledger.set_ttl(entry, ttl)

    async def stop(self, entry: HandedOut) -> None:
        log.info("VM %s: stop asked through the E2B API", entry.id)
        await self.ledger.stop(entry, StopReason.ASKED, by=self.peer_policy.own_uid)

    def ledger_entry(self, vm_id: str) -> HandedOut | None:
        return self.ledger.get(vm_id)

    async def _fill(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the snapshot managers and the pools, until hand-outs are refused: then no VM
        can be booted (only TCG here, and ``require_hardware_accel``), so nothing is tried
        again and again; the refusal was logged in one line."""
        if self.accel.refusal() is None:
            async with trio.open_nursery() as fill:
                for manager in self.snapshots:
                    await fill.start(manager.run)
                for pool in self.pools.values():
                    await fill.start(pool.run)
                task_status.started()
                await self.accel.refused.wait()
                fill.cancel_scope.cancel()
        else:
            task_status.started()
        refusal = self.accel.refusal()
        for pool in self.pools.values():
            pool.close(refusal or "no VM can be booted")  # fails the clients waiting for one

    async def _fill_boot(self, spec: VMSpec) -> VM:
        """A boot for the cache: one refused for want of KVM (require_hardware_accel) is no
        boot failure to retry; it waits for :meth:`_fill` to stop the pools, at once."""
        try:
            return await self._plain_boot(spec)
        except HardwareAccelRequiredError:
            await trio.sleep_forever()

    def _check_accel(self, handle: VMHandle | None = None) -> None:
        """Refuse a hand-out (FAILED_PRECONDITION) when only TCG is available and the config
        requires hardware acceleration; with ``handle``, also a VM that does not run on KVM
        whatever made it (a check on the VM itself, not only on the daemon's verdict)."""
        refusal = self.accel.refusal()
        if refusal is not None:
            raise HardwareAccelRequiredError(refusal)
        if handle is not None and self.spec.require_hardware_accel and handle.accel != "kvm":
            raise HardwareAccelRequiredError(
                f"VM {handle.id} runs on {handle.accel or 'an unknown accelerator'}, not KVM, and "
                "this daemon hands out only hardware-accelerated VMs (require_hardware_accel = "
                "true); it was stopped")

    async def _lease_from(self, pool: VMPool) -> Lease:
        """``pool.lease()``, refused (see :meth:`_check_accel`) before and after."""
        self._check_accel()
        try:
            lease = await pool.lease()
        except NoVMAvailableError:
            self._check_accel()  # closed because of the refusal: say so, not UNAVAILABLE
            raise
        try:
            self._check_accel(lease.handle)
        except HardwareAccelRequiredError:
            await lease.discard()
            raise
        return lease

    async def _report_progress(self, events: trio.MemoryReceiveChannel[CacheEvent]) -> None:
        """Tell systemd (if it is there) how full the cache is; READY=1 at the first VM."""
        announced = False
        async for event in events:
            if event.kind == "watching":
                continue
            ready = sum(pool.ready_count() for pool in self.pools.values())
            fields = {"STATUS": f"{ready}/{self._cache_size()} VMs ready"}
            if event.kind == "boot_failed":
                fields["STATUS"] += f"; boot failed: {event.message[:200]}"
            if event.kind == "ready" and not announced:
                fields["READY"] = "1"
                announced = True
            self.notifier.send(**fields)

    def _remove_socket(self, inode: int) -> None:
        """Remove our socket file, but not one a newer daemon put in its place."""
        try:
            if os.stat(self.endpoint).st_ino == inode:
                self.endpoint.unlink()
        except FileNotFoundError:
            pass

    def _cache_size(self) -> int:
        return sum(pool.size for pool in self.pools.values())

    def _watch_all(self) -> trio.MemoryReceiveChannel[CacheEvent]:
        """Every pool's events (and the ledger's), opening with one ``watching`` per pool."""
        return self.events.watch([pool.watching_event() for pool in self.pools.values()])

    def _ledger_event(self, kind: EventKind, entry: HandedOut, message: str) -> None:
        if self.events.watched:
            self.events.publish(CacheEvent(kind, entry.id, entry.handle.pid, message, time.time(),
                                           self.pool.ready_count(), self.pool.size, ""))

    # ------------------------------------------------------------ rpcs

    async def _config(self, _request: ProtoMessage) -> cache_pb2.GrpcVMConfig:
        spec = self.spec
        data = {
            "qemu": str(spec.qemu), "kernel": str(spec.kernel), "initrd": str(spec.initrd),
            "kernel_params": spec.kernel_params, "machine_type": spec.machine_type,
            "vcpus": spec.vcpus, "memory": spec.memory_mib, "accel": spec.accel,
            "require_hardware_accel": spec.require_hardware_accel,
            "boot_timeout": spec.boot_timeout, "image": spec.image,
            "vm_cache_number": self.pool.size, "boot_mode": self.config.factory.boot_mode,
            "max_vcpus": spec.max_vcpus, "max_memory": spec.max_memory_mib,
            "pools": {shape.name: {"vcpus": shape.vcpus, "memory": shape.memory_mib,
                                   "vm_cache_number": shape.size, "boot_mode": shape.boot_mode}
                      for shape in self.shapes},
        }
        return cache_pb2.GrpcVMConfig(
            Data=json.dumps(data, sort_keys=True).encode(),
            AgentConfig=json.dumps(AGENT_CONFIG, sort_keys=True).encode(),
        )

    async def _get_base_vm(self, call: RpcCall[ProtoMessage]) -> None:
        """Kata's hand-out: the VM changes owner once the reply's bytes are written to the socket.

        Kata's rpc has no acknowledgement (TakeVM's claim), so the reply is written only while
        the client still waits for it (no reset from it, its deadline not passed): otherwise
        the VM would go to nobody. A reply not written leaves the VM in the cache: its handle
        was never seen."""
        await call.receive_one()
        uid = call.peer.uid
        policy = self._network_policy(None, DEFAULT_POOL)
        with self._hand_out_to(uid):
            lease = await self._lease_from(self.pool)
            applied = await self._apply_network(self.pool, lease, policy)
            lease.handle.network = policy
            written = False
            try:
                try:
                    with trio.fail_after(CLAIM_TIMEOUT):
                        await call.reply(grpc_vm(lease.handle))  # one write, trailers too
                except trio.TooSlowError:
                    raise CallGone("the client does not read its replies") from None
                except CallGone as error:
                    log.info("VM %s stays in the cache: its reply was not written (%s)",
                             lease.handle.id, error)
                    raise
                written = True
                self.pool.stats.note_handout(trio.current_time() - call.arrived_at)
            finally:
                with trio.CancelScope(shield=True):
                    if not written and applied:
                        await lease.discard()  # its network was set up for this client's policy
                        await self._network.release(lease.vm.id)
                    elif not written:
                        await lease.abort()
                    else:
                        try:
                            handle, process = await lease.commit()
                        except VMGoneError as error:
                            log.warning("%s; the client got a VM that is gone", error)
                            await self._network.release(lease.vm.id)
                        else:
                            handle.network = policy
                            self.ledger.adopt(handle, process, uid, Phase.CLAIMED)

    @contextlib.contextmanager
    def _hand_out_to(self, uid: int) -> Iterator[None]:
        """A hand-out to ``uid`` under way: refused (QuotaReachedError, RESOURCE_EXHAUSTED)
        if ``uid`` already holds ``max_vms_per_uid`` VMs, counting those being handed out.
        Leave the block once the VM is in the ledger (or not handed out)."""
        limit = self.config.factory.max_vms_per_uid
        # Counted only when there is a limit: the ledger is walked on the hand-out path.
        held = self.ledger.held_by(uid) + self._asking[uid] if limit else 0
        if limit and held >= limit:
            raise QuotaReachedError(
                f"uid {uid} already holds {held} VMs of this daemon, the most one user may "
                f"(factory.max_vms_per_uid = {limit}): stop one (vmcache stop HANDLE) and ask again")
        self._asking[uid] += 1
        try:
            yield
        finally:
            self._asking[uid] -= 1
            if not self._asking[uid]:
                del self._asking[uid]

    async def _take_vm(self, call: RpcCall[ProtoMessage]) -> None:
        """The acknowledged hand-out (see protos/cache.proto): offer, claim, and for a lease, hold."""
        first = await call.receive_one()
        assert isinstance(first, cache_pb2.TakeRequest)
        if first.WhichOneof("step") != "ask":
            raise BadRequestError("TakeVM must start with an ask")
        ask = first.ask
        wait = _seconds(ask.wait_seconds, "wait_seconds") or DEFAULT_WAIT
        ttl = _seconds(ask.ttl_seconds, "ttl_seconds")
        placement = place(self.shapes, vcpus=ask.cpu, memory_mib=ask.memory, pool=ask.pool,
                          max_vcpus=self.spec.max_vcpus, max_memory_mib=self.spec.max_memory_mib)
        try:
            asked = policy_from_message(ask.network) if ask.HasField("network") else None
        except NetworkPolicyError as error:
            raise BadRequestError(f"TakeAsk.network: {error}") from None
        policy = self._network_policy(asked, placement.pool)
        handed_out = trio.Event()  # the pool's slot starts the replacement then
        try:
            await self._offer_and_claim(call, ask, ttl, wait, placement, handed_out, policy)
        finally:
            handed_out.set()

    async def _offer_and_claim(self, call: RpcCall[ProtoMessage], ask: cache_pb2.TakeAsk, ttl: float,
                               wait: float, placement: Placement, handed_out: trio.Event,
                               policy: NetworkPolicy) -> None:
        entry = await self._offer(call, wait, placement, handed_out, policy)
        claimed = False
        reply: ProtoMessage | None = None
        try:
            with trio.move_on_after(CLAIM_TIMEOUT):
                reply = await call.receive()
            if reply is None or reply.WhichOneof("step") != "claim":
                why = "no claim came in time" if reply is None and not call.client_gone else "no claim"
                raise BadRequestError(f"VM {entry.id} was not claimed ({why}); it was stopped: claim "
                                      f"an offer within {CLAIM_TIMEOUT:g} s")
            if cast(cache_pb2.TakeRequest, reply).claim.vm_id != entry.id:
                raise BadRequestError(f"the claim names another VM than {entry.id}; it was stopped: "
                                      "claim the VM offered")
            if not entry.alive:
                raise VMGoneError(f"VM {entry.id} died before it was claimed; ask again")
            self.ledger.claim(entry, lease=ask.lease, ttl=ttl)
            claimed = True
        finally:
            if not claimed:
                with trio.CancelScope(shield=True):
                    await self.ledger.stop(entry, StopReason.NOT_CLAIMED)
        if not ask.lease:
            # From here the VM is the client's: it asked for it, got it and claimed it.
            with contextlib.suppress(CallGone):  # the VM is theirs either way
                await _write_in_time(call, cache_pb2.TakeReply(claimed=cache_pb2.TakeClaimed(
                    vm_id=entry.id, expires_at=entry.expires_at)), last=True)
            return
        await self._hold_lease(call, entry, handed_out)

    async def _offer(self, call: RpcCall[ProtoMessage], wait: float, placement: Placement,
                     handed_out: trio.Event, policy: NetworkPolicy) -> HandedOut:
        """Get a VM of the size placed (from its pool, grown if need be, or booted cold), move
        it to the ledger and send the client the offer. A pool replaces the VM once
        ``handed_out`` is set."""
        with self._hand_out_to(call.peer.uid):
            with trio.move_on_after(wait) as waited:
                if placement.pool is None:
                    handle, process = await self._boot_cold(placement, policy)
                else:
                    handle, process = await self._take_from_pool(self.pools[placement.pool], placement,
                                                                 handed_out, policy)
            if waited.cancelled_caught:
                raise WaitExpiredError(f"no VM became ready within {wait:g} s")
            handle.network = policy
            entry = self.ledger.adopt(handle, process, call.peer.uid, Phase.OFFERED)
        try:
            await _write_in_time(call, cache_pb2.TakeReply(offer=grpc_vm(handle)))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.ledger.stop(entry, StopReason.OFFER_UNWRITTEN)
            raise
        if placement.pool is not None:
            self.pools[placement.pool].stats.note_handout(trio.current_time() - call.arrived_at)
        return entry

    async def _take_from_pool(self, pool: VMPool, placement: Placement, handed_out: trio.Event,
                              policy: NetworkPolicy) -> tuple[VMHandle, ProcessLike]:
        """The next ready VM of ``pool`` (first come, first served), grown to the size placed
        while it is still set aside (a VM that fails to grow is replaced, not handed out)."""
        while True:
            lease = await self._lease_from(pool)
            if (placement.vcpus, placement.memory_mib) != (pool.spec.vcpus, pool.spec.memory_mib):
                started = time.monotonic()
                try:
                    seen = await grow(lease.vm, placement.vcpus, placement.memory_mib, timeout=GROW_TIMEOUT)
                    log.info("VM %s of pool %s grown to %d vCPUs and %d MiB in %.2f s (the guest sees "
                             "%d CPUs, MemTotal %d MiB)", lease.vm.id, pool.name, placement.vcpus,
                             placement.memory_mib, time.monotonic() - started, seen.online_cpus,
                             seen.mem_total_kib // 1024)
                except VmcacheError as error:
                    await lease.discard()
                    raise DaemonError(f"could not grow a VM of pool {pool.name!r} to {placement.vcpus} "
                                      f"vCPUs and {placement.memory_mib} MiB: {error}; ask again (the "
                                      "next VM is tried) or for a pool's own size") from None
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await lease.discard()  # half grown: not for the cache any more
                    raise
            applied = await self._apply_network(pool, lease, policy)
            try:
                return await lease.commit(refill_when=handed_out)
            except VMGoneError as error:
                log.info("%s; offering the next one", error)
                if applied:
                    await self._network.release(lease.vm.id)
            except BaseException:
                if applied:  # not handed out: its network goes (fails closed)
                    with trio.CancelScope(shield=True):
                        await self._network.release(lease.vm.id)
                raise

    async def _boot_cold(self, placement: Placement,
                         policy: NetworkPolicy | None = None) -> tuple[VMHandle, ProcessLike]:
        """A VM of a size no pool can grow to, booted for this request alone (with the top
        [network]'s NIC, if it has one, and ``policy`` applied)."""
        spec = attrs.evolve(self.spec, vcpus=placement.vcpus, memory_mib=placement.memory_mib)
        # A boot like any other: it waits for its turn among max_parallel_boots.
        async with self.boots:
            log.info("booting a VM of %d vCPUs and %d MiB for a request no pool can serve",
                     placement.vcpus, placement.memory_mib)
            vm = await self._plain_boot(spec)
            try:
                self._check_accel(vm.handle())
            except HardwareAccelRequiredError:
                with trio.CancelScope(shield=True):
                    await vm.stop()
                raise
        if spec.nic and policy is not None:
            try:
                await self._network.apply(vm, policy)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await vm.stop()
                    await self._network.release(vm.id)
                raise
        handed = await vm.release()
        self.cold_boots += 1
        return handed

    def _network_config(self, pool: str | None) -> tuple[NetworkConfig, str]:
        """The network config of ``pool`` (None: a cold boot, the top [network]'s) and its key."""
        if pool is None or pool == DEFAULT_POOL:
            return self.config.network, "network"
        shape = next(shape for shape in self.shapes if shape.name == pool)
        return shape.network, ("network" if self.config.pools[pool].network is None
                               else f"pools.{pool}.network")

    def _network_policy(self, asked: NetworkPolicy | None, pool: str | None) -> NetworkPolicy:
        """The policy a hand-out from ``pool`` gets: the one asked, or the pool's default.
        One beyond the pool's ceiling (its ``permit``), or restricted in a pool whose VMs
        have no NIC, is refused (NotAllowedError: PERMISSION_DENIED); one the applier cannot
        enforce too (before any VM is spent on it)."""
        network, key = self._network_config(pool)
        policy = asked if asked is not None else network.policy
        where = f"pool {pool!r}" if pool is not None else "a VM booted for this size"
        beyond = policy.beyond(network.ceiling)
        if beyond:
            ceiling = ", ".join(str(entry) for entry in network.ceiling) or "nothing"
            raise NotAllowedError(
                f"network allow {', '.join(str(entry) for entry in beyond)} is beyond what {where} "
                f"permits ({key}.permit: {ceiling}); ask within it, or have its permit widened")
        if policy.is_restricted and not network.needs_nic:
            raise NotAllowedError(
                f"{where} has no network: its VMs boot without a NIC; network mode restricted needs "
                f"{key}.mode = \"restricted\" or a {key}.permit in the daemon's config")
        self._network.check(policy)
        return policy

    async def _apply_network(self, pool: VMPool, lease: Lease, policy: NetworkPolicy) -> bool:
        """Apply ``policy`` to a VM set aside, if its pool's VMs have a NIC (True then). A VM
        the applier fails on is discarded (its slot replaces it), never handed out."""
        if not pool.spec.nic:
            return False
        try:
            await self._network.apply(lease.vm, policy)
        except BaseException:
            with trio.CancelScope(shield=True):
                await lease.discard()
                await self._network.release(lease.vm.id)
            raise
        return True

    async def _hold_lease(self, call: RpcCall[ProtoMessage], entry: HandedOut,
                          handed_out: trio.Event) -> None:
        """Confirm the lease (then the pool may start the replacement: ``handed_out``), keep
        the VM while the client holds the call, stop it when either side ends."""
        reason = StopReason.CLIENT_GONE
        try:
            await _write_in_time(call, cache_pb2.TakeReply(claimed=cache_pb2.TakeClaimed(
                vm_id=entry.id, expires_at=entry.expires_at)))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.ledger.stop(entry, StopReason.CONFIRMATION_UNWRITTEN)
            raise
        handed_out.set()
        try:
            async with trio.open_nursery() as nursery:

                async def client_side() -> None:
                    nonlocal reason
                    try:
                        message = await call.receive()
                    except CallGone:
                        message = None
                    if call.client_gone:
                        reason = StopReason.CLIENT_GONE
                    elif message is None or message.WhichOneof("step") == "release":
                        reason = StopReason.CLIENT_RELEASED
                    else:
                        reason = StopReason.CLIENT_CONFUSED
                    nursery.cancel_scope.cancel()

                async def vm_side() -> None:
                    nonlocal reason
                    await entry.gone.wait()
                    reason = entry.life.stop or StopReason.VM_EXITED
                    nursery.cancel_scope.cancel()

                nursery.start_soon(client_side)
                nursery.start_soon(vm_side)
        finally:
            with trio.CancelScope(shield=True):
                await self.ledger.stop(entry, reason)
        await call.send(cache_pb2.TakeReply(ended=cache_pb2.TakeEnded(
            vm_id=entry.id, reason=reason.text(entry.life.stop_by))), last=True)
        await call.finish()

    async def _status(self, _request: ProtoMessage) -> cache_pb2.GrpcStatus:
        pools = list(self.pools.values())
        totals = total_stats(pools)
        verdict = self.accel.verdict
        status = CacheStatus(
            pid=os.getpid(),
            vms=[CachedVMStatus(vm.pid, vm.spec.vcpus, vm.spec.memory_mib, vm.id, rss, pool.name, vm.accel)
                 for pool in pools for vm, rss in pool.ready_with_rss()],
            cache_size=self._cache_size(),
            booting=totals.booting,
            last_boot_error=totals.last_error,
            boot_failures_in_row=totals.failures_in_row,
            boots=totals.boots,
            boot_failures=totals.boot_failures,
            handed_out=totals.handed_out + self.cold_boots,
            median_boot_seconds=statistics.median(totals.boot_seconds) if totals.boot_seconds else 0.0,
            median_handout_seconds=(statistics.median(totals.handout_seconds)
                                    if totals.handout_seconds else 0.0),
            p99_handout_seconds=_percentile(totals.handout_seconds, 0.99),
            uptime_seconds=time.monotonic() - self.started,
            boot_mode=self.config.factory.boot_mode,
            confinement=describe_confinement(self.spec),
            handed_out_vms=[
                HandedOutVMStatus(entry.id, entry.handle.pid, entry.owner_uid, entry.handed_at,
                                  entry.phase, entry.expires_at, entry.handle.cpu, entry.handle.memory,
                                  entry.handle.accel, entry.handle.network)
                for entry in self.ledger.entries()
            ],
            pools=[PoolStatus(pool.name, pool.spec.vcpus, pool.spec.memory_mib, pool.size,
                              pool.ready_count(), pool.stats.booting, shape.boot_mode,
                              pool.paused_count())
                   for pool, shape in zip(pools, self.shapes, strict=True)],
            accel=verdict.accel if verdict is not None else "",
            accel_reason=verdict.reason if verdict is not None else "the first boot probes KVM",
            require_hardware_accel=self.spec.require_hardware_accel,
            refusal=self.accel.refusal() or "",
        )
        return status_message(status)

    def _is_admin(self, uid: int) -> bool:
        """Root and the daemon's own uid: they may stop the daemon and any VM."""
        return uid in (0, self.peer_policy.own_uid)

    async def _quit(self, _request: ProtoMessage, peer: PeerCredentials) -> Empty:
        if not self._is_admin(peer.uid):
            raise NotAllowedError(f"Quit is for root and uid {self.peer_policy.own_uid} (the "
                                  f"daemon's own); uid {peer.uid} may not stop the daemon")
        log.info("Quit requested by a client (pid %d, uid %d)", peer.pid, peer.uid)
        self.request_stop()
        return Empty()

    async def _stop_vm(self, request: ProtoMessage, peer: PeerCredentials) -> cache_pb2.StopVMReply:
        """Stop a VM we handed out, for its owner (or root, or our own uid)."""
        assert isinstance(request, cache_pb2.StopVMRequest)
        entry = self.ledger.get(request.vm_id)
        if entry is None:
            raise NoSuchVMError(f"no VM {request.vm_id[:40]!r} handed out by this daemon (stopped "
                                "already, or never its): `vmcache stop HANDLE` stops a VM of yours")
        if peer.uid != entry.owner_uid and not self._is_admin(peer.uid):
            raise NotAllowedError(f"VM {entry.id} belongs to uid {entry.owner_uid}; uid {peer.uid} "
                                  f"may not stop it (only its owner, root and uid "
                                  f"{self.peer_policy.own_uid})")
        handle = entry.handle
        for name, given, ours in (("pid", request.pid, handle.pid),
                                  ("start time", request.start_time, handle.start_time),
                                  ("run directory", request.run_dir, handle.run_dir)):
            if given and given != ours:
                raise HandleError(f"VM handle {entry.id}: its {name} is not that VM's (was the handle "
                                  "edited?); not touching it")
        was_running = entry.alive
        log.info("VM %s: stop asked by pid %d (uid %d)", entry.id, peer.pid, peer.uid)
        await self.ledger.stop(entry, StopReason.ASKED, by=peer.uid)
        if not entry.gone.is_set():
            raise DaemonError(f"VM {entry.id} did not stop in time; it is still being stopped: "
                              "`vmcache status` shows when it is gone")
        return cache_pb2.StopVMReply(vm_id=entry.id, was_running=was_running,
                                     message=f"stopped: {entry.stop_reason}")

    async def _watch(self, _request: ProtoMessage) -> AsyncIterator[cache_pb2.GrpcEvent]:
        events = self._watch_all()

        async def stream() -> AsyncIterator[cache_pb2.GrpcEvent]:
            async with events:
                async for event in events:
                    yield event_message(event)

        return stream()


async def _write_in_time(call: RpcCall[ProtoMessage], message: ProtoMessage, *, last: bool = False) -> None:
    """Write one hand-out reply (with ``last``, the call's end too, in the same write) within
    ``CLAIM_TIMEOUT``: a client that does not read its replies is gone (CallGone), so that no
    VM waits on it. The caller decides what becomes of the VM."""
    try:
        with trio.fail_after(CLAIM_TIMEOUT):
            await call.send(message, last=last)
            if last:
                await call.finish()
    except trio.TooSlowError:
        raise CallGone("the client does not read its replies") from None


def _seconds(value: float, name: str) -> float:
    if not math.isfinite(value) or value < 0 or value > MAX_SECONDS:
        raise BadRequestError(f"{name} must be between 0 and {MAX_SECONDS:g} seconds, not {value}")
    return value


async def serve(config: Config, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the cache daemon until cancelled or until a client calls Quit.

    ``task_status.started()`` fires once the socket listens (VMs are still
    booting then). Cancellation kills every cached VM; handed-out VMs live on.
    """
    await CacheDaemon(config).run(task_status=task_status)


async def serve_until_signalled(config: Config) -> None:
    """``vmcache serve``: like :func:`serve`, stopping cleanly on SIGINT or SIGTERM."""
    daemon = CacheDaemon(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("got %s", signal.Signals(signum).name)
                    daemon.request_stop()

            nursery.start_soon(on_signal)
            await daemon.run()
            nursery.cancel_scope.cancel()


def _percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank), 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]
