"""The client side: talk to a daemon, get VMs that are then yours.

::

    async with vmcache.connect("/run/vmcache/cache.sock") as cache:
        async with cache.lease_vm() as vm:          # stopped when the block ends,
            result = await vm.exec(["uname", "-r"])  # or when this process dies
        vm = await cache.get_vm(ttl=600)             # yours until you stop it (or 10 min pass)

Every VM comes through the acknowledged hand-out (``TakeVM``): the daemon offers
a VM, this client claims it, and only then is the VM the client's. A client that
dies before claiming costs a VM nothing: the daemon kills it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from google.protobuf.empty_pb2 import Empty

from ._proto import cache_pb2
from .errors import (
    CacheError,
    HandOutAbortedError,
    LeaseLostError,
    VmcacheError,
    raise_unwrapped,
)
from .handle import STOP_VM_WAIT, VMHandle, request_stop
from .network_policy import NetworkPolicy
from .process import PidfdProcess
from .rpc.client import Call, Channel, open_channel
from .wire import (
    SERVICE,
    CacheEvent,
    CacheStatus,
    event_from_message,
    handle_from_grpc_vm,
    policy_message,
    status_from_message,
)

DEFAULT_GET_TIMEOUT = 60.0
DEFAULT_CALL_TIMEOUT = 10.0
QUIT_WAIT = 60.0
#: How long the daemon may take to confirm a claim, and to stop a released lease's VM.
CLAIM_WAIT = 10.0
RELEASE_WAIT = 20.0
#: Offers of a VM that died before the claim are retried this many times.
TAKE_ATTEMPTS = 3


@attrs.frozen
class VMSize:
    """What a client asks of a VM's size: vCPUs, memory (MiB), a pool; 0 / "" = don't care."""

    vcpus: int = 0
    memory_mib: int = 0
    pool: str = ""


ANY_SIZE = VMSize()


class CacheClient:
    """The daemon's rpcs, over one connection."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    # ------------------------------------------------------------ hand-outs

    async def get_vm(self, timeout: float = DEFAULT_GET_TIMEOUT, *, ttl: float | None = None,
                     size: VMSize = ANY_SIZE, on_offer: Callable[[VMHandle], None] | None = None,
                     network: NetworkPolicy | None = None) -> VMHandle:
        """Take a ready VM; it is yours from now on: stop it, or it runs on (for ``ttl``
        seconds at most, if given: then the daemon stops it).

        Waits up to ``timeout`` seconds for one to be ready. ``size`` asks for vCPUs,
        memory and/or a pool (the VM is grown to the size before the hand-out).
        ``on_offer`` sees the VM before it is claimed (the CLI prints the handle there,
        so that a VM is never claimed by a client that could not pass it on).
        ``network``: the VM's network policy (None: its pool's default); one beyond what the
        daemon permits is :class:`PermissionDeniedError`. ``handle.network`` says what it got.
        """
        async with self._taken(timeout, ttl, size, lease=False, on_offer=on_offer,
                               network=network) as (call, handle):
            await _expect_end(call)
            return handle

    @asynccontextmanager
    async def lease_vm(self, timeout: float = DEFAULT_GET_TIMEOUT, *, ttl: float | None = None,
                       size: VMSize = ANY_SIZE, network: NetworkPolicy | None = None,
                       ) -> AsyncIterator[VMHandle]:
        """A VM for the block's duration, bound to this client's life.

        When the block ends (by return, error or cancellation) the daemon stops the VM;
        if this process dies first, by any path (SIGKILL included), its connection closes
        and the daemon stops the VM then. If the VM ends first (it died, its ``ttl``
        passed, the daemon went away), the block is cancelled and :class:`LeaseLostError`
        says why. ``network``: as for :meth:`get_vm`.
        """
        async with self._taken(timeout, ttl, size, lease=True, network=network) as (call, handle):
            lost: list[str] = []
            try:
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        try:
                            reply = await call.receive()
                        except CacheError as error:
                            lost.append(str(error))
                        else:
                            lost.append(_ended_reason(reply, "the daemon ended the lease"))
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch)
                    try:
                        yield handle
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise_unwrapped(group)
            finally:
                with trio.CancelScope(shield=True):
                    await self._end_lease(call, handle, bool(lost))
            if lost:
                raise LeaseLostError(f"lost VM {handle.id}: {lost[0]}")

    @asynccontextmanager
    async def _taken(self, timeout: float, ttl: float | None, size: VMSize, *, lease: bool,
                     on_offer: Callable[[VMHandle], None] | None = None,
                     network: NetworkPolicy | None = None) -> AsyncIterator[tuple[Call, VMHandle]]:
        """A TakeVM call with a claimed VM; a VM that died before its claim is asked for again."""
        for attempt in range(TAKE_ATTEMPTS):
            async with self._channel.open_call("TakeVM", cache_pb2.TakeReply) as call:
                try:
                    handle = await self._take(call, timeout, ttl, size, lease=lease, on_offer=on_offer,
                                              network=network)
                except HandOutAbortedError:
                    if attempt == TAKE_ATTEMPTS - 1:
                        raise
                    continue
                yield call, handle
                return

    async def _take(self, call: Call, timeout: float, ttl: float | None, size: VMSize, *, lease: bool,
                    on_offer: Callable[[VMHandle], None] | None = None,
                    network: NetworkPolicy | None = None) -> VMHandle:
        """Ask, receive the offer, claim, and wait for the daemon to confirm."""
        with trio.fail_after(timeout + CLAIM_WAIT):
            ask = cache_pb2.TakeAsk(wait_seconds=timeout, ttl_seconds=ttl or 0.0, lease=lease,
                                    cpu=size.vcpus, memory=size.memory_mib, pool=size.pool)
            if network is not None:
                ask.network.CopyFrom(policy_message(network))
            await call.send(cache_pb2.TakeRequest(ask=ask))
            offer = await call.receive()
            if offer is None or offer.WhichOneof("step") != "offer":
                raise CacheError("TakeVM: the daemon sent no offer")
            handle = self._ours(handle_from_grpc_vm(offer.offer))  # type: ignore[attr-defined]
            if network is not None and handle.network != network:
                # Not claimed: the daemon stops it. A daemon older than network policies
                # hands out VMs without a network whatever was asked.
                raise CacheError(f"TakeVM: asked for network {network.describe()}, the daemon offered "
                                 f"VM {handle.id} with {handle.network.describe()} (a daemon too old "
                                 "for network policies?); it was not claimed")
            if on_offer is not None:
                on_offer(handle)
            await call.send(cache_pb2.TakeRequest(claim=cache_pb2.TakeClaim(vm_id=handle.id)))
            confirmed = await call.receive()
            if confirmed is None or confirmed.WhichOneof("step") != "claimed":
                raise CacheError(f"TakeVM: the daemon did not confirm the claim of VM {handle.id}")
        return handle

    async def _end_lease(self, call: Call, handle: VMHandle, lost: bool) -> None:
        """Release the VM and wait (bounded) until the daemon says it is stopped."""
        if not lost:
            with trio.move_on_after(RELEASE_WAIT):
                try:
                    await call.send(cache_pb2.TakeRequest(release=cache_pb2.TakeRelease()))
                    await call.done_sending()
                    await _expect_end(call)
                    return
                except VmcacheError:
                    pass  # the daemon went away: stop the VM ourselves below
        # The daemon could not be told (or it is gone): stop the VM ourselves, if it still runs.
        with trio.move_on_after(RELEASE_WAIT):
            try:
                await handle.stop()
            except VmcacheError:
                pass

    async def get_base_vm(self, timeout: float = DEFAULT_GET_TIMEOUT) -> VMHandle:
        """Kata's hand-out (``GetBaseVM``), without a claim: for clients built from Kata's proto."""
        reply = await self._channel.unary("GetBaseVM", Empty(), cache_pb2.GrpcVM, timeout)
        return self._ours(handle_from_grpc_vm(reply))

    def _ours(self, handle: VMHandle) -> VMHandle:
        """A handle from this daemon: it names the daemon, whom ``stop`` asks first."""
        handle.endpoint = os.path.abspath(self._channel.endpoint)
        return handle

    async def stop_vm(self, handle: VMHandle, timeout: float = STOP_VM_WAIT) -> bool:
        """Have the daemon stop a VM it handed out (``StopVM``; it checks we own the VM and
        that the handle's pid, start time and run directory are the VM's). True if it was
        still running; :class:`UnknownVMError` if the daemon does not hold it."""
        return await request_stop(self._channel, handle, timeout)

    # ------------------------------------------------------------ the rest

    async def status(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> CacheStatus:
        reply = await self._channel.unary("Status", Empty(), cache_pb2.GrpcStatus, timeout)
        return status_from_message(reply)

    async def watch(self) -> AsyncIterator[CacheEvent]:
        """Every change in the cache from now on, until the daemon stops."""
        async for message in self._channel.server_stream("Watch", Empty(), cache_pb2.GrpcEvent):
            yield event_from_message(message)

    async def config(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> dict[str, Any]:
        """The daemon's VM configuration (``Config.Data``)."""
        reply = await self._channel.unary("Config", Empty(), cache_pb2.GrpcVMConfig, timeout)
        data: dict[str, Any] = json.loads(reply.Data or b"{}")
        return data

    async def quit(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        """Ask the daemon to stop (it replies first, then purges its cache)."""
        await self._channel.unary("Quit", Empty(), Empty, timeout)


def _ended_reason(reply: object, default: str) -> str:
    if isinstance(reply, cache_pb2.TakeReply) and reply.WhichOneof("step") == "ended":
        return reply.ended.reason or default
    return default


async def _expect_end(call: Call) -> None:
    """Read the rest of a TakeVM call (a TakeEnded, then the end), bounded."""
    with trio.fail_after(RELEASE_WAIT):
        while await call.receive() is not None:
            pass


@asynccontextmanager
async def connect(endpoint: Path | str) -> AsyncIterator[CacheClient]:
    """Connect to the daemon at ``endpoint`` (its Unix socket)."""
    async with open_channel(Path(endpoint), SERVICE) as channel:
        yield CacheClient(channel)


async def quit_and_wait(endpoint: Path | str, timeout: float = QUIT_WAIT) -> int:
    """Ask the daemon to stop and wait until its process is gone. Returns its pid."""
    async with connect(endpoint) as cache:
        pid = (await cache.status()).pid
        process = PidfdProcess(pid, 0)
        try:
            await cache.quit()
        except CacheError:
            pass  # it may close the connection as it goes; we check the process below
    try:
        with trio.move_on_after(timeout):
            await process.wait()
        if process.returncode is None:
            raise CacheError(f"the daemon (pid {pid}) did not stop within {timeout:g} s")
    finally:
        process.close()
    return pid
