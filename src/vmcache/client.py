"""The client side: talk to a daemon, get VMs that are then yours.

::

    async with vmcache.connect("/run/vmcache/cache.sock") as cache:
        async with await cache.get_vm() as vm:      # stopped when the block ends
            result = await vm.exec(["uname", "-r"])
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from ._proto import cache_pb2
from .errors import CacheError
from .handle import VMHandle
from .pool import CacheEvent
from .process import PidfdProcess
from .rpc import RESPONSE_TYPES, Channel, open_channel
from .server import handle_from_grpc_vm

DEFAULT_GET_TIMEOUT = 60.0
DEFAULT_CALL_TIMEOUT = 10.0
QUIT_WAIT = 60.0


@attrs.frozen
class CachedVMStatus:
    pid: int
    cpu: int
    memory: int
    id: str = ""
    rss_bytes: int = 0


@attrs.frozen
class CacheStatus:
    """What ``Status`` says: the daemon's pid, its cached ready VMs, and counters."""

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

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_message(cls, reply: cache_pb2.GrpcStatus) -> CacheStatus:
        return cls(
            pid=reply.pid,
            vms=[CachedVMStatus(vm.pid, vm.cpu, vm.memory, vm.id, vm.rss_bytes) for vm in reply.vmstatus],
            cache_size=reply.cache_size,
            booting=reply.booting,
            last_boot_error=reply.last_boot_error,
            boot_failures_in_row=reply.boot_failures_in_row,
            boots=reply.boots,
            boot_failures=reply.boot_failures,
            handed_out=reply.handed_out,
            median_boot_seconds=reply.median_boot_seconds,
            median_handout_seconds=reply.median_handout_seconds,
            uptime_seconds=reply.uptime_seconds,
            boot_mode=reply.boot_mode,
        )

    def summary_lines(self) -> list[str]:
        """What ``vmcache status`` prints after Kata's lines."""
        lines = [
            f"Cache: {len(self.vms)}/{self.cache_size} ready, {self.booting} booting, "
            f"boot mode {self.boot_mode or 'boot'}",
            f"Counters: {self.boots} boots, {self.boot_failures} boot failures, "
            f"{self.handed_out} handed out, median boot {self.median_boot_seconds:.2f} s, "
            f"median hand-out {self.median_handout_seconds * 1000:.1f} ms, "
            f"uptime {self.uptime_seconds:.0f} s",
        ]
        if self.last_boot_error:
            lines.append(f"Failing: {self.boot_failures_in_row} boot failures in a row; "
                         f"last boot error: {self.last_boot_error}")
        return lines


class CacheClient:
    """The daemon's four rpcs, over one connection."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def _call(self, method: str, timeout: float) -> Any:
        return await self._channel.call(method, RESPONSE_TYPES[method], timeout)

    async def get_vm(self, timeout: float = DEFAULT_GET_TIMEOUT) -> VMHandle:
        """Take a ready VM; it is yours from now on (stop it, or it runs on).

        Waits up to ``timeout`` seconds for one to be ready.
        """
        reply: cache_pb2.GrpcVM = await self._call("GetBaseVM", timeout)
        try:
            return handle_from_grpc_vm(reply)
        except (ValueError, KeyError) as error:
            raise CacheError(f"the daemon's GetBaseVM reply has no vmcache handle: {error}") from None

    async def status(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> CacheStatus:
        reply: cache_pb2.GrpcStatus = await self._call("Status", timeout)
        return CacheStatus.from_message(reply)

    async def watch(self) -> AsyncIterator[CacheEvent]:
        """Every change in the cache from now on, until the daemon stops."""
        async for message in self._channel.stream("Watch", RESPONSE_TYPES["Watch"]):
            yield CacheEvent(message.kind, message.vm_id, message.pid, message.message,
                             message.time, message.ready, message.cache_size)

    async def config(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> dict[str, Any]:
        """The daemon's VM configuration (``Config.Data``)."""
        reply: cache_pb2.GrpcVMConfig = await self._call("Config", timeout)
        data: dict[str, Any] = json.loads(reply.Data or b"{}")
        return data

    async def quit(self, timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        """Ask the daemon to stop (it replies first, then purges its cache)."""
        await self._call("Quit", timeout)


@asynccontextmanager
async def connect(endpoint: Path | str) -> AsyncIterator[CacheClient]:
    """Connect to the daemon at ``endpoint`` (its Unix socket)."""
    async with open_channel(Path(endpoint)) as channel:
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


async def run_warm(
    endpoint: Path | str, command: list[str], *, timeout: int = 0, keep: bool = False,
    wait: float = DEFAULT_GET_TIMEOUT,
) -> tuple[bytes, bytes, int, str | None]:
    """Take a warm VM, run ``command``, stop the VM (unless ``keep``).

    Returns stdout, stderr, exit status, and the kept VM's handle JSON (or None).
    """
    async with connect(endpoint) as cache:
        vm = await cache.get_vm(timeout=wait)
    if keep:
        result = await vm.exec(command, timeout)
        return result.stdout, result.stderr, result.exit_status, vm.to_json()
    async with vm:
        result = await vm.exec(command, timeout)
    return result.stdout, result.stderr, result.exit_status, None
