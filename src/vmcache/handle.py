"""A handed-out VM: the JSON handle its new owner gets, and what the owner can do with it.

The handle names the QEMU process (pid *and* start time, so a reused pid is
never taken for the VM), its QMP and agent sockets and its run directory. The
owner can run commands through the agent and stop the VM; the VM is not the
owner's child process, so it is watched and signalled through a pidfd.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import attrs
import cattrs
import trio

from ._proto import cache_pb2
from ._unix import connect_when_ready
from .cgroup import manager as cgroup_manager
from .errors import (
    CacheError,
    FailedPreconditionError,
    HandleError,
    NetworkPolicyError,
    PermissionDeniedError,
    VmcacheError,
    VMGoneError,
)
from .guest_api import Guest, GuestAPI
from .identity import open_verified
from .network_policy import NetworkPolicy
from .paths import default_run_dir, vm_run_dir
from .process import PidfdProcess, ProcessLike, stop_process
from .qmp import QMPClient
from .rpc.client import Channel, open_channel

CONNECT_TIMEOUT = 10.0
QMP_TIMEOUT = 3.0
#: How long the daemon gets to stop a VM it handed out (``StopVM``; its own bound is 15 s).
STOP_VM_WAIT = 20.0
#: The gRPC service (from the proto, as :data:`vmcache.wire.SERVICE`).
SERVICE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


async def quit_via_qmp(qmp_socket: Path) -> None:
    """Ask QEMU to quit through its monitor socket; at most :data:`QMP_TIMEOUT` s, errors ignored
    (the signals of :func:`stop_vm_process` follow anyway)."""
    with trio.move_on_after(QMP_TIMEOUT):
        try:
            stream = await connect_when_ready(qmp_socket, still_starting=lambda: False)
        except OSError:
            return
        try:
            qmp = await QMPClient.negotiate(stream)
        except VmcacheError:
            await stream.aclose()
            return
        try:
            await qmp.execute("quit")
        except VmcacheError:
            pass  # QEMU often closes the monitor before answering quit
        finally:
            await qmp.aclose()


async def stop_vm_process(process: ProcessLike, qmp_socket: Path) -> int | None:
    """Stop a VM we do not hold a monitor connection to: QMP quit, SIGTERM, SIGKILL (bounded)."""

    async def polite() -> None:
        await quit_via_qmp(qmp_socket)

    return await stop_process(process, polite)


@attrs.define(eq=False)
class VMHandle(GuestAPI):
    """A VM that belongs to whoever holds this handle.

    ``str(handle)`` / :meth:`to_json` is the JSON that ``vmcache get`` prints;
    :meth:`from_json` reads it back. ``async with handle:`` stops the VM on the
    way out. Processes and files: the methods of :class:`~vmcache.guest_api.GuestAPI`.
    """

    id: str
    pid: int
    start_time: int
    qmp_socket: str
    agent_socket: str
    console_log: str
    run_dir: str
    cpu: int
    memory: int
    accel: str = ""
    image: str = ""
    boot_id: str = ""
    #: User ports of the agent: ``agent-0.sock`` (``agent_socket``) to ``agent-<N-1>.sock``.
    agent_ports: int = 16
    #: The uid QEMU runs as (-1: not said, a handle from before this field).
    uid: int = -1
    #: The socket of the daemon that handed the VM out ("" = none: a VM of our own). ``stop``
    #: asks that daemon first (it knows who owns the VM); the handle's holder may edit it,
    #: so it only ever decides whom to ask, never what is stopped.
    endpoint: str = ""
    #: The network policy the VM was handed out with (none: no network; a handle from
    #: before this field says none). What the daemon enforces, for the holder to read.
    network: NetworkPolicy = attrs.Factory(NetworkPolicy)
    _owner: Guest | None = attrs.field(default=None, init=False, repr=False)
    #: The handle came from the daemon itself (not from a file a user may have edited):
    #: its run directory is trusted to be under the daemon's run root, whatever ours is.
    _from_daemon: bool = attrs.field(default=False, init=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _CONVERTER.unstructure(self)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMHandle:
        try:
            return _CONVERTER.structure(data, cls)
        except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as error:
            why = _policy_error(error) or error  # a bad network policy: its own words
            raise HandleError(f"not a VM handle: {why}; pass the JSON that `vmcache get` "
                              "printed, unedited") from None

    @classmethod
    def from_daemon(cls, data: dict[str, Any]) -> VMHandle:
        """A handle the daemon sent over its socket (see :meth:`stop` for what that changes)."""
        handle = cls.from_dict(data)
        handle._from_daemon = True
        return handle

    @classmethod
    def from_json(cls, text: str) -> VMHandle:
        try:
            data = json.loads(text)
        except ValueError:
            raise HandleError("not a VM handle: the text is not JSON; pass the JSON that "
                              "`vmcache get` printed (or the file it is in)") from None
        if not isinstance(data, dict):
            raise HandleError("not a VM handle: expected a JSON object, as `vmcache get` prints")
        return cls.from_dict(data)

    def run_dir_path(self, run_root: Path | None = None) -> Path:
        """The VM's run directory, checked: ``vm-<id>`` under ``run_root`` (the configured one
        by default), and the handle's socket paths inside it. A handle is user input: one that
        names anything else is a :class:`HandleError`, and nothing is done with it."""
        if run_root is not None:
            root = run_root
        elif self._from_daemon:
            root = Path(self.run_dir).parent
        else:
            root = default_run_dir()
        expected = vm_run_dir(root, self.id)
        if expected is None:
            raise HandleError(f"not a VM handle of ours: the id {self.id[:40]!r} is not a vmcache VM id")
        if Path(self.run_dir) != expected:
            raise HandleError(f"VM handle {self.id}: its run directory {self.run_dir[:200]} is not "
                              f"{expected}; not touching it")
        for name, value in (("qmp.sock", self.qmp_socket), ("agent-0.sock", self.agent_socket),
                            ("console.log", self.console_log)):
            if Path(value) != expected / name:
                raise HandleError(f"VM handle {self.id}: {value[:200]} is not {expected / name}; "
                                  "not touching it")
        return expected

    def _process(self, run_root: Path | None = None) -> PidfdProcess | None:
        """The VM's QEMU process, checked against the identity record its launcher wrote in
        its run directory (see :mod:`vmcache.identity`); None once it is not running. A
        handle that names anything else is a :class:`HandleError`."""
        return open_verified(self.run_dir_path(run_root).parent, self.id, self.pid, self.start_time)

    async def wait_stopped(self) -> None:
        """Wait until the VM's QEMU is gone (at once if it is not running)."""
        process = self._process()
        if process is not None:
            try:
                await process.wait()
            finally:
                process.close()

    def is_running(self) -> bool:
        """True while the VM's QEMU process (this pid and start time, as its identity record
        says) is alive."""
        process = self._process()
        if process is None:
            return False
        process.close()
        return True

    def _guest(self) -> Guest:
        """The guest connection (a user port of the VM's), made on first use, only to a VM
        whose run directory and QEMU process are the handle's (checked as for :meth:`stop`)."""
        if self._owner is None:
            run_dir = self.run_dir_path()
            process = self._process()
            if process is None:
                raise VMGoneError(f"VM {self.id} is not running (already stopped, or it died)")
            process.close()
            self._owner = Guest(self.id, run_dir, is_running=self.is_running,
                                wait_stopped=self.wait_stopped, ports=self.agent_ports)
        return self._owner

    async def ping(self) -> str:
        """Check the guest agent answers (on a user port); returns the guest's boot id."""
        async with self._explained() as connection:
            return await connection.ping()

    async def disconnect(self) -> None:
        """Close the connection to the agent (the VM keeps running; the port is freed)."""
        if self._owner is not None:
            await self._owner.aclose()
            self._owner = None

    async def stop(self, run_root: Path | None = None) -> None:
        """Stop the VM: QMP quit, then SIGTERM, then SIGKILL (bounded); remove its run directory.

        A VM a daemon handed out (:attr:`endpoint`) is stopped by that daemon (``StopVM``:
        it checks that we own the VM); a daemon that does not answer or does not know the
        VM leaves it to us. Here we act only on a VM whose run directory is ``vm-<id>``
        under ``run_root`` (by default the configured run root, or, for a handle the daemon
        sent, the daemon's) and whose QEMU the identity record there says is this pid and
        start time (see :mod:`vmcache.identity`): anything else is a :class:`HandleError`,
        and nothing is touched. Raises :class:`VMGoneError` if the VM was not running any more.
        """
        if vm_run_dir(Path("/"), self.id) is None:
            raise HandleError(f"not a VM handle of ours: the id {self.id[:40]!r} is not a vmcache VM id")
        await self.disconnect()
        # A daemon finds the VM by its id alone, and checks the rest against its own
        # records; our run root need not be its (a user's is not a root daemon's).
        if self.endpoint and run_root is None and await _stop_via_daemon(Path(self.endpoint), self):
            return
        run_dir = self.run_dir_path(run_root)
        process = self._process(run_root)
        if process is None:
            _remove_tree(run_dir)  # its record (if any) is the launcher's and names this QEMU
            raise VMGoneError(f"VM {self.id} is not running (already stopped, or it died)")
        try:
            await stop_vm_process(process, run_dir / "qmp.sock")
        finally:
            process.close()
        _remove_tree(run_dir)

    async def aclose(self) -> None:
        """Stop the VM if it is still running (what ``async with`` does on exit)."""
        try:
            await self.stop()
        except VMGoneError:
            pass

    async def __aenter__(self) -> VMHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _remove_tree(path: Path) -> None:
    """Remove a VM's run directory and its cgroup (which only root may remove: otherwise
    the daemon's next sweep does)."""
    shutil.rmtree(path, ignore_errors=True)
    if (cgroup := cgroup_manager().of(path.name.removeprefix("vm-"))) is not None:
        cgroup.remove()


_CONVERTER = cattrs.Converter()
_CONVERTER.register_unstructure_hook(NetworkPolicy, NetworkPolicy.to_dict)
_CONVERTER.register_structure_hook(NetworkPolicy, lambda data, _type: NetworkPolicy.from_dict(data))


def _policy_error(error: BaseException) -> NetworkPolicyError | None:
    """The NetworkPolicyError inside a cattrs validation error (its ``network`` field), if any."""
    if isinstance(error, NetworkPolicyError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := _policy_error(inner)) is not None:
                return found
    return None


async def request_stop(channel: Channel, handle: VMHandle, timeout: float = STOP_VM_WAIT) -> bool:
    """Ask the daemon on ``channel`` to stop the VM it handed out (``StopVM``; it checks
    that we own the VM and that the handle's pid, start time and run directory are the
    VM's). True if it was still running."""
    reply = await channel.unary("StopVM", cache_pb2.StopVMRequest(
        vm_id=handle.id, pid=handle.pid, start_time=max(0, handle.start_time), run_dir=handle.run_dir,
    ), cache_pb2.StopVMReply, timeout)
    return bool(reply.was_running)


async def _stop_via_daemon(endpoint: Path, handle: VMHandle) -> bool:
    """``VMHandle.stop`` for a VM a daemon handed out: True once the daemon stopped it;
    False if the daemon cannot (it does not answer, does not know the VM, or is too old for
    StopVM): the caller then stops the VM itself, with every check of its own. A refusal
    (not our VM, an edited handle) is raised: nothing is to be touched then. Spoken here
    rather than through :class:`~vmcache.client.CacheClient`, which hands out handles and
    so imports this module."""
    try:
        async with open_channel(endpoint, SERVICE) as channel:
            was_running = await request_stop(channel, handle)
    except PermissionDeniedError:
        raise
    except FailedPreconditionError as error:
        raise HandleError(error.detail) from None
    except CacheError:
        return False  # no daemon, not its VM, UNIMPLEMENTED, a broken connection: ours to do
    if not was_running:
        raise VMGoneError(f"VM {handle.id} is not running (already stopped, or it died)")
    return True
