"""The cache daemon: a VM pool plus Kata's ``cache.CacheService`` on a Unix socket.

Library use (the caller's nursery supervises; cancelling it purges the cache)::

    config = vmcache.load_config("vmcache.toml")
    async with trio.open_nursery() as nursery:
        await nursery.start(vmcache.serve, config)   # returns once the socket listens
        ...
        nursery.cancel_scope.cancel()                # kills every cached VM

:func:`serve` also returns by itself when a client calls ``Quit``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message as ProtoMessage

from ._proto import cache_pb2
from .config import Config, VMSpec, resolve_spec
from .errors import ConfigError
from .handle import VMHandle
from .notify import Notifier
from .pool import Backoff, CacheEvent, VMPool
from .procfs import rss_bytes
from .qemu import VM, boot_vm, make_private_dir
from .rpc import Reply, RpcServer, bind_unix_socket
from .security import PeerPolicy, raise_open_file_limit, resolve_group
from .snapshot import SnapshotManager
from .state import VMRegistry, state_dir_for

log = logging.getLogger("vmcache.server")

#: After Quit or a signal, how long in-flight replies may take to go out.
DRAIN_TIMEOUT = 1.0
AGENT_CONFIG = {"protocol": "vmcache-agent/1", "port": "vmcache.agent"}


def kata_hypervisor_json(handle: VMHandle) -> bytes:
    """``GrpcVM.hypervisor``: Kata's QEMU-handle key names where one fits, plus ours."""
    return json.dumps({
        "ID": handle.id,
        "QmpChannelpath": handle.qmp_socket,
        "State": {"Pid": handle.pid, "UUID": handle.boot_id},
        "vmcache": handle.to_dict(),
    }, sort_keys=True).encode()


def handle_from_grpc_vm(vm: cache_pb2.GrpcVM) -> VMHandle:
    """The VM handle inside a ``GrpcVM`` reply (our ``vmcache`` key in ``hypervisor``)."""
    data = json.loads(vm.hypervisor)
    return VMHandle.from_dict(data["vmcache"])


def event_message(event: CacheEvent) -> cache_pb2.GrpcEvent:
    return cache_pb2.GrpcEvent(kind=event.kind, vm_id=event.vm_id, pid=event.pid,
                               message=event.message, time=event.time, ready=event.ready,
                               cache_size=event.cache_size)


class CacheDaemon:
    """One daemon: the pool, the rpc handlers, crash recovery, and an orderly stop."""

    def __init__(self, config: Config, spec: VMSpec | None = None,
                 boot: Callable[[VMSpec], Awaitable[VM]] | None = None) -> None:
        self.config = config
        self.spec = spec if spec is not None else resolve_spec(config)
        self.endpoint = config.endpoint()
        factory = config.factory
        self.group_gid = resolve_group(factory.socket_group)
        state_dir = state_dir_for(self.spec.run_root, self.endpoint)
        self.registry = VMRegistry(state_dir)
        self.snapshots: SnapshotManager | None = None
        if boot is None and factory.boot_mode == "snapshot":
            self.snapshots = SnapshotManager(self.spec, state_dir / "snapshots", self.registry)
            boot = self.snapshots.boot
        self.pool = VMPool(
            self.spec,
            factory.vm_cache_number,
            boot=boot if boot is not None else functools.partial(boot_vm, registry=self.registry),
            backoff=lambda: Backoff(factory.boot_retry_initial, factory.boot_retry_max),
            health_interval=factory.health_interval,
        )
        self.started = time.monotonic()
        self.notifier = Notifier()
        self._stop = trio.Event()
        self.rpc = RpcServer({
            "Config": self._config,
            "GetBaseVM": self._get_base_vm,
            "Status": self._status,
            "Quit": self._quit,
            "Watch": self._watch,
        }, check_peer=PeerPolicy(self.group_gid).check)

    def request_stop(self) -> None:
        """Stop as Ctrl-C does: kill cached VMs, remove the socket, return."""
        self._stop.set()

    def _prepare_directories(self) -> None:
        make_private_dir(self.spec.run_root)
        if not os.access(self.spec.run_root, os.W_OK):
            raise ConfigError(f"run directory {self.spec.run_root} is not writable")
        self.registry.prepare()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._prepare_directories()
        sock = bind_unix_socket(self.endpoint, self.group_gid)
        inode = os.stat(self.endpoint).st_ino
        raise_open_file_limit()
        try:
            # Only now, holding the endpoint, do we know no live daemon owns these records.
            if killed := await self.registry.recover():
                log.warning("killed %d cached VMs a previous daemon on %s left behind",
                            killed, self.endpoint)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_progress, self.pool.watch())
                if self.snapshots is not None:
                    await nursery.start(self.snapshots.run)
                await nursery.start(self.pool.run)
                await nursery.start(self.rpc.serve, sock)
                log.info("listening on %s; filling a cache of %d VMs (pid %d)",
                         self.endpoint, self.pool.size, os.getpid())
                task_status.started()
                await self._stop.wait()
                log.info("stopping: purging the cache")
                self.notifier.send(STOPPING="1", STATUS="stopping: purging the cache")
                self.pool.close()
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self.rpc.wait_idle()
                    await trio.sleep(0.05)  # let the connection writers flush the last replies
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            self._remove_socket(inode)
            self.notifier.close()
            stats = self.pool.stats
            log.info("stopped: %d VMs handed out, %d cached VMs killed",
                     stats.handed_out, stats.killed)

    async def _report_progress(self, events: trio.MemoryReceiveChannel[CacheEvent]) -> None:
        """Tell systemd (if it is there) how full the cache is; READY=1 at the first VM."""
        announced = False
        async for event in events:
            fields = {"STATUS": f"{event.ready}/{event.cache_size} VMs ready"}
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

    # ------------------------------------------------------------ rpcs

    async def _config(self, _request: ProtoMessage) -> cache_pb2.GrpcVMConfig:
        spec = self.spec
        data = {
            "qemu": str(spec.qemu), "kernel": str(spec.kernel), "initrd": str(spec.initrd),
            "kernel_params": spec.kernel_params, "machine_type": spec.machine_type,
            "vcpus": spec.vcpus, "memory": spec.memory_mib, "accel": spec.accel,
            "boot_timeout": spec.boot_timeout, "image": spec.image,
            "vm_cache_number": self.pool.size, "boot_mode": self.config.factory.boot_mode,
        }
        return cache_pb2.GrpcVMConfig(
            Data=json.dumps(data, sort_keys=True).encode(),
            AgentConfig=json.dumps(AGENT_CONFIG, sort_keys=True).encode(),
        )

    async def _get_base_vm(self, _request: ProtoMessage) -> Reply:
        lease = await self.pool.lease()
        handle = lease.handle
        message = cache_pb2.GrpcVM(
            id=handle.id,
            hypervisor=kata_hypervisor_json(handle),
            proxyPid=0,
            proxyURL=f"unix://{handle.agent_socket}",
            cpu=handle.cpu,
            memory=handle.memory,
            cpuDelta=0,
        )

        async def delivered() -> None:
            await lease.commit()

        return Reply(message, delivered, lease.abort)

    async def _status(self, _request: ProtoMessage) -> cache_pb2.GrpcStatus:
        stats = self.pool.stats
        return cache_pb2.GrpcStatus(
            pid=os.getpid(),
            vmstatus=[
                cache_pb2.GrpcVMStatus(pid=vm.pid, cpu=vm.spec.vcpus, memory=vm.spec.memory_mib,
                                       id=vm.id, rss_bytes=rss_bytes(vm.pid))
                for vm in self.pool.ready_vms()
            ],
            cache_size=self.pool.size,
            booting=stats.booting,
            last_boot_error=stats.last_error,
            boot_failures_in_row=stats.failures_in_row,
            boots=stats.boots,
            boot_failures=stats.boot_failures,
            handed_out=stats.handed_out,
            median_boot_seconds=stats.median_boot(),
            median_handout_seconds=stats.median_handout(),
            uptime_seconds=time.monotonic() - self.started,
            boot_mode=self.config.factory.boot_mode,
        )

    async def _quit(self, _request: ProtoMessage) -> Empty:
        log.info("Quit requested by a client")
        self.request_stop()
        return Empty()

    async def _watch(self, _request: ProtoMessage) -> AsyncIterator[cache_pb2.GrpcEvent]:
        events = self.pool.watch()

        async def stream() -> AsyncIterator[cache_pb2.GrpcEvent]:
            async with events:
                async for event in events:
                    yield event_message(event)

        return stream()


async def serve(config: Config, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the cache daemon until cancelled or until a client calls Quit.

    ``task_status.started()`` fires once the socket listens (VMs are still
    booting then). Cancellation kills every cached VM; handed-out VMs live on.
    """
    await CacheDaemon(config).run(task_status=task_status)


async def serve_until_signalled(config: Config) -> None:
    """``vmcache serve``: like :func:`serve`, stopping cleanly on SIGINT or SIGTERM."""
    daemon = CacheDaemon(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("got %s", signal.Signals(signum).name)
                    daemon.request_stop()

            nursery.start_soon(on_signal)
            await daemon.run()
            nursery.cancel_scope.cancel()
