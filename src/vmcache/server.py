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

import json
import logging
import os
import signal

import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message as ProtoMessage

from ._proto import cache_pb2
from .config import Config, VMSpec, resolve_spec
from .handle import VMHandle
from .pool import VMPool
from .rpc import Reply, RpcServer, bind_unix_socket

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


class CacheDaemon:
    """One daemon: the pool, the rpc handlers, and an orderly stop."""

    def __init__(self, config: Config, spec: VMSpec | None = None) -> None:
        self.config = config
        self.spec = spec if spec is not None else resolve_spec(config)
        self.endpoint = config.endpoint()
        self.pool = VMPool(self.spec, config.factory.vm_cache_number)
        self._stop = trio.Event()
        self.rpc = RpcServer({
            "Config": self._config,
            "GetBaseVM": self._get_base_vm,
            "Status": self._status,
            "Quit": self._quit,
        })

    def request_stop(self) -> None:
        """Stop as Ctrl-C does: kill cached VMs, remove the socket, return."""
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = bind_unix_socket(self.endpoint)
        inode = os.stat(self.endpoint).st_ino
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pool.run)
                await nursery.start(self.rpc.serve, sock)
                log.info("listening on %s; filling a cache of %d VMs (pid %d)",
                         self.endpoint, self.pool.size, os.getpid())
                task_status.started()
                await self._stop.wait()
                log.info("stopping: purging the cache")
                self.pool.close()
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self.rpc.wait_idle()
                    await trio.sleep(0.05)  # let the connection writers flush the last replies
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            self._remove_socket(inode)
            stats = self.pool.stats
            log.info("stopped: %d VMs handed out, %d cached VMs killed",
                     stats.handed_out, stats.killed)

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
            "vm_cache_number": self.pool.size,
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
        return cache_pb2.GrpcStatus(
            pid=os.getpid(),
            vmstatus=[
                cache_pb2.GrpcVMStatus(pid=vm.pid, cpu=vm.spec.vcpus, memory=vm.spec.memory_mib)
                for vm in self.pool.ready_vms()
            ],
        )

    async def _quit(self, _request: ProtoMessage) -> Empty:
        log.info("Quit requested by a client")
        self.request_stop()
        return Empty()


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

