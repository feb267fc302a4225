"""One QEMU VM under Trio: launch, wait for the guest agent, use, stop.

A VM lives inside :func:`launch_vm`, an async context manager. Leaving it, by
return, error or cancellation at any point (while QEMU starts, while waiting for
the agent, while running), stops QEMU (QMP ``quit``, then SIGTERM, then
SIGKILL, each step bounded in time), reaps it and removes its run directory,
unless the VM was :meth:`VM.release`\\ d to a new owner first.

QEMU runs in its own session (a terminal's Ctrl-C reaches only us, and we
decide what to kill), its output goes to files in the run directory (never to a
pipe that would break when we exit), and it is started from an argv list,
never through a shell.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ._unix import connect_when_ready
from .accel import AccelChooser
from .agent_client import AgentConnection
from .cgroup import Cgroup, remove_when_empty
from .config import VMSpec
from .console import (
    console_tail,
    limit_qemu_output,
    start_drain,
)
from .console import telling_console_line as telling_console_line
from .errors import BootError, ConfigError, NetworkSetupError, VmcacheError, VMGoneError
from .guest_api import (
    CONTROL_SOCKET,
    USER_PORTS,
    Guest,
    GuestAPI,
    user_socket,
)
from .handle import VMHandle
from .hugepages import no_huge_pages_for_children
from .identity import write_identity
from .jail import JailedProcess, limits, pick_uid, prepare_run_dir, start_jailed
from .lifecycle import CACHED, USABLE, Phase, VMLife
from .paths import make_private_dir
from .process import TERM_GRACE, ProcessLike, stop_process
from .procfs import process_start_time, process_state
from .qemu_argv import qemu_argv
from .qemu_binary import usable_spec
from .qmp import QMPClient
from .vm_nic import Tap, check_nic, configure_guest, open_tap

log = logging.getLogger("vmcache.qemu")

SOCKET_PATH_MAX = 107
#: The longest name of a socket we put in a VM's run directory (see vmcache.snapshot).
LONGEST_SOCKET_NAME = "incoming.sock"

#: How long a QEMU that never became ready gets after SIGTERM before SIGKILL.
STARTING_TERM_GRACE = 0.2
#: After QEMU exited: how long its console's drain may take to read what is left.
CONSOLE_DRAIN_WAIT = 0.5

T = TypeVar("T")

class Registry(Protocol):
    """Where a daemon records the VMs it is responsible for (see vmcache.state)."""

    def add(self, vm_id: str) -> VMLife: ...

    def write(self, life: VMLife) -> None: ...

    def remove(self, vm_id: str) -> None: ...


def write_pidfile(run_dir: Path, pid: int) -> None:
    """``qemu.pid``: QEMU's host pid, written by us (QEMU in its pid namespace would write
    its own view, 1), never through a symlink, in a directory QEMU cannot replace it in."""
    fd = os.open(run_dir / "qemu.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    with os.fdopen(fd, "w") as file:
        file.write(f"{pid}\n")


class VM(GuestAPI):
    """A QEMU VM this process started and supervises. Made by :func:`launch_vm`.

    Its owner runs processes and moves files with the methods of
    :class:`~vmcache.guest_api.GuestAPI` (``run``, ``open_process``, ``write_file``, ...),
    over a user port; the supervisor's own pings, clock and entropy go over the
    control port (:attr:`agent`).
    """

    def __init__(self, spec: VMSpec, vm_id: str, run_dir: Path, accel: str,
                 registry: Registry | None = None, life: VMLife | None = None) -> None:
        self.spec = spec
        self.registry = registry
        self.id = vm_id
        self.run_dir = run_dir
        self.accel = accel
        #: Its phase (booting, ready, reserved...): the one record the pool and ledger move too.
        self.life = life if life is not None else VMLife(vm_id)
        self.process: trio.Process | JailedProcess | None = None
        #: The uid QEMU runs as (a VM's own, under the jail as root; else ours).
        self.uid = os.geteuid()
        self.cgroup: Cgroup | None = None
        self.qmp: QMPClient | None = None
        self.agent: AgentConnection | None = None
        self._owner: Guest | None = None
        self.boot_id = ""
        #: The current size: the spec's until vmcache.hotplug.grow adds vCPUs or memory.
        self.vcpus = spec.vcpus
        self.memory_mib = spec.memory_mib
        self.started_at = time.monotonic()
        self.boot_seconds = 0.0
        #: True while QMP ``stop`` holds the vCPUs (an idle cached VM; see :meth:`pause`).
        self.paused = False
        #: Set when the console's drain is over (see vmcache.console.start_drain).
        self.console_drained: trio.Event | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @functools.cached_property
    def start_time(self) -> int:
        """The QEMU process's start time (clock ticks since boot), read once."""
        return process_start_time(self.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def handle(self) -> VMHandle:
        """What a new owner needs to find, use and stop this VM."""
        return VMHandle(
            id=self.id,
            pid=self.pid,
            start_time=self.start_time,
            qmp_socket=str(self.run_dir / "qmp.sock"),
            agent_socket=str(user_socket(self.run_dir, 0)),
            console_log=str(self.run_dir / "console.log"),
            run_dir=str(self.run_dir),
            cpu=self.vcpus,
            memory=self.memory_mib,
            accel=self.accel,
            image=self.spec.image,
            boot_id=self.boot_id,
            agent_ports=USER_PORTS,
            uid=self.uid,
        )

    def _guest(self) -> Guest:
        if self.life.phase not in USABLE:
            raise VMGoneError(f"VM {self.id} is {self.life.phase}, not ready")
        if self._owner is None:
            self._owner = Guest(self.id, self.run_dir, is_running=lambda: self.alive,
                                wait_stopped=self.wait_exited)
        return self._owner

    def _require_ready(self) -> AgentConnection:
        if self.life.phase not in USABLE or self.agent is None:
            raise VMGoneError(f"VM {self.id} is {self.life.phase}, not ready")
        if not self.alive:
            raise VMGoneError(f"VM {self.id} is not running any more")
        return self.agent

    async def ping(self) -> str:
        """Check the guest agent answers; returns the boot id."""
        return await self._require_ready().ping()

    async def add_entropy(self) -> None:
        """Mix fresh host entropy into the guest and reseed its CRNG (the agent reports failure)."""
        await self._require_ready().add_entropy()

    async def sync_clock(self) -> None:
        """Set the guest's clock to the host's (guests drift, restored ones jump back)."""
        await self._require_ready().set_clock()

    def _require_monitor(self) -> QMPClient:
        if self.life.phase not in USABLE or self.qmp is None:
            raise VMGoneError(f"VM {self.id} is {self.life.phase}, not ready")
        return self.qmp

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``): an idle cached VM then costs no CPU at all."""
        await self._require_monitor().execute("stop")
        self.paused = True

    async def resume(self) -> None:
        """Run the vCPUs again (QMP ``cont``), then give the guest fresh entropy and the
        host's clock: its clock stood still while it was paused. The two agent calls are
        also the proof that the guest answers."""
        await self._require_monitor().execute("cont")
        self.paused = False
        await self.add_entropy()
        await self.sync_clock()

    async def run_state(self) -> str:
        """QEMU's own view of the VM (``running``, ``paused``, ``guest-panicked``...): QMP
        ``query-status``, which answers while the vCPUs are stopped."""
        reply = await self._require_monitor().execute("query-status")
        return str(reply["status"])

    def stopped_by_signal(self) -> bool:
        """True if the QEMU process is stopped (SIGSTOP) or traced: it cannot answer."""
        return process_state(self.pid) in ("T", "t")

    async def wait_exited(self) -> int:
        """Wait until QEMU exits (for whatever reason) and return its status; by then the
        console's last lines are in its log (its drain is given a moment to read them)."""
        assert self.process is not None
        status = await self.process.wait()
        if self.console_drained is not None:
            with trio.move_on_after(CONSOLE_DRAIN_WAIT):
                await self.console_drained.wait()
        return status

    async def _close_connections(self) -> None:
        for connection in (self.qmp, self.agent, self._owner):
            if connection is not None:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
        self.qmp = self.agent = self._owner = None

    async def release(self) -> tuple[VMHandle, ProcessLike]:
        """Give up supervision: close our connections and keep QEMU running.

        Returns the handle for the new owner and the process object (still our
        child: whoever keeps it should reap it when it exits, so no zombie stays).
        After this, leaving :func:`launch_vm` leaves the VM alone. The VM's record in
        the registry (if any) stays: the new keeper (the daemon's ledger) rewrites it.
        """
        handle = self.handle()
        assert self.process is not None
        self.life.move(Phase.OFFERED)  # at once: from now on, nothing of ours acts on it
        await self._close_connections()
        return handle, self.process

    async def stop(self) -> None:
        """Stop QEMU (bounded escalation), reap it and remove the run directory."""
        if self.life.phase not in CACHED:  # handed out, or stopping or stopped already
            return
        started = self.life.phase is not Phase.BOOTING
        self.life.move(Phase.STOPPING)
        qmp = self.qmp

        async def polite_quit() -> None:
            if qmp is not None:
                await qmp.execute("quit")

        with trio.CancelScope(shield=True):
            if self.process is not None:
                # A QEMU still starting has no guest to let down gently, and may not even
                # look at SIGTERM yet (it waits for its console's drain to connect).
                await stop_process(self.process, polite_quit if qmp is not None else None,
                                   term_grace=TERM_GRACE if started else STARTING_TERM_GRACE)
            await self._close_connections()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            if self.cgroup is not None:
                await remove_when_empty(self.cgroup)  # else it goes at a sweep
        reaped = self.process is None or self.process.returncode is not None
        if reaped and isinstance(self.process, JailedProcess):
            self.process.close()
        if reaped and self.registry is not None:
            self.registry.remove(self.id)  # kept otherwise: the next daemon tries again
        if reaped:
            self.life.move(Phase.GONE)


async def _until_exit(process: ProcessLike, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()``, but give up with a BootError as soon as QEMU exits."""
    result: list[T] = []
    failure: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await process.wait()
            nursery.cancel_scope.cancel()

        async def run() -> None:
            try:
                result.append(await work())
            except (VmcacheError, OSError) as error:
                failure.append(error)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        nursery.start_soon(run)
    if result:
        return result[0]
    if failure and process.returncode is None:
        with trio.move_on_after(1.0):  # an EOF usually means QEMU is exiting right now
            await process.wait()
    if process.returncode is not None:
        raise BootError(f"QEMU exited with status {process.returncode} during start-up")
    raise failure[0]


async def connect_monitor(vm: VM) -> None:
    """Connect to the VM's QMP socket as soon as QEMU has made it."""
    process = vm.process
    assert process is not None
    stream = await connect_when_ready(vm.run_dir / "qmp.sock",
                                      still_starting=lambda: process.returncode is None)
    vm.qmp = await QMPClient.negotiate(stream)


async def connect_control(vm: VM) -> trio.SocketStream:
    """Connect to the VM's control port socket as soon as QEMU has made it."""
    process = vm.process
    assert process is not None
    return await connect_when_ready(vm.run_dir / CONTROL_SOCKET,
                                    still_starting=lambda: process.returncode is None)


async def start_agent(vm: VM, stream: trio.SocketStream) -> str:
    """Greet the guest agent on the control port (HELLO, retried until it answers, bounded
    by the caller); returns the guest's boot id."""
    try:
        vm.agent = await AgentConnection.start(stream, timeout=vm.spec.boot_timeout)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return vm.agent.boot_id


async def wait_for_boot(vm: VM) -> str:
    """A cold boot is ready when the agent answers on the control port (and, for a VM with
    a NIC, once its guest has configured the NIC); returns the boot id.

    The NIC is configured here, at boot, not at hand-out: its address is the same for every
    VM (each is alone in its namespace) and its namespace drops everything until a policy is
    applied, so a configured NIC in a cached VM reaches nothing; a snapshot template is
    configured before it is saved, so its clones are too. At hand-out only the host's
    enforcement remains to be set up (python3 in a guest fresh from the cache costs 0.4-1 s
    under TCG: bench/README.md)."""
    await connect_monitor(vm)
    boot_id = await start_agent(vm, await connect_control(vm))
    if vm.spec.nic:
        assert vm.agent is not None
        try:
            await configure_guest(vm.agent)  # the agent itself: the VM is not READY yet
        except NetworkSetupError as error:
            raise BootError(f"VM {vm.id}: {error}") from None
    return boot_id


async def start_vm(
    spec: VMSpec,
    accel: str,
    timeout: float,
    registry: Registry | None,
    *,
    become_ready: Callable[[VM], Awaitable[str]],
    extra_args: tuple[str, ...] = (),
    what: str = "become ready",
) -> VM:
    """Start QEMU and run ``become_ready`` within ``timeout``; on any failure, leave nothing.

    ``become_ready`` (a cold boot's wait for READY, or a snapshot restore) returns the
    guest's boot id. QEMU exiting meanwhile is a BootError quoting the console.
    """
    check_nic(spec)  # before anything exists: a NIC this daemon cannot make is a ConfigError
    spec = await usable_spec(spec)
    vm_id = secrets.token_hex(6)
    run_dir = spec.run_root / f"vm-{vm_id}"
    if len(str(run_dir / LONGEST_SOCKET_NAME)) > SOCKET_PATH_MAX:
        raise ConfigError(f"run directory path too long for a Unix socket: {spec.run_root}")
    make_private_dir(spec.run_root, enforce=False)
    # Recorded before anything exists: a crash at any instant leaves a trace.
    life = registry.add(vm_id) if registry is not None else None
    vm = VM(spec, vm_id, run_dir, accel, registry, life)
    tap: Tap | None = None
    try:
        make_private_dir(run_dir)
        if spec.nic:
            tap = await open_tap()
        argv = [*qemu_argv(spec, run_dir, accel, f"vmcache-{vm_id}",
                           tap_fd=tap.fd if tap is not None else None), *extra_args]
        try:
            # A local file in the directory we just made: no need to leave the event loop.
            with open(run_dir / "qemu.log", "wb") as qemu_log, no_huge_pages_for_children:  # noqa: ASYNC230
                if spec.jail is not None:
                    vm.uid = pick_uid(spec.jail, spec.run_root)
                    prepare_run_dir(run_dir, vm.uid)
                    try:
                        vm.process, vm.cgroup = await start_jailed(
                            spec, vm_id, run_dir, accel, vm.uid, argv, qemu_log,
                            cgroup_limits=limits(spec, accel), tap=tap)
                    finally:
                        if tap is not None:
                            tap.close()  # QEMU has its own copy, or is gone
                else:
                    vm.process = await trio.lowlevel.open_process(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=qemu_log,
                        stderr=qemu_log,
                        start_new_session=True,
                        pass_fds=() if spec.memory_fd is None else (spec.memory_fd,),
                        restore_signals=False,  # SIGXFSZ stays ignored: see limit_qemu_output
                    )
                    limit_qemu_output(vm.process.pid)
        except OSError as error:  # ENOMEM, EMFILE, a binary that vanished...
            raise BootError(f"cannot start QEMU ({spec.qemu}): {error.strerror or error}") from None
        write_pidfile(run_dir, vm.pid)
        process = vm.process
        vm.console_drained = start_drain(run_dir, lambda: process.returncode is None)
        vm.life.pid, vm.life.start_time = vm.pid, vm.start_time
        if registry is not None:
            registry.write(vm.life)
        write_identity(run_dir, vm.id, vm.pid, vm.uid, spec.qemu, vm.start_time)
        with trio.move_on_after(timeout) as deadline:
            vm.boot_id = await _until_exit(vm.process, functools.partial(become_ready, vm))
        if deadline.cancelled_caught:
            raise BootError(
                f"VM {vm_id} did not {what} within {timeout:g} s (accel {accel}); "
                f"last console lines: {console_tail(run_dir)}"
            )
    except BootError as error:
        tail = "" if "console lines" in str(error) else f"; last console lines: {console_tail(run_dir)}"
        await vm.stop()
        raise BootError(f"{error}{tail}") from None
    except BaseException:
        await vm.stop()
        raise
    finally:
        if tap is not None:
            tap.close()
    vm.life.move(Phase.READY)
    vm.boot_seconds = time.monotonic() - vm.started_at
    return vm


async def boot_vm(spec: VMSpec, registry: Registry | None = None,
                  accel: AccelChooser | None = None) -> VM:
    """Boot a VM and return it ready. The caller must ``stop()`` or ``release()`` it.

    ``registry`` (if any) gets the VM as soon as its QEMU process exists. ``accel``
    decides between KVM and TCG (``auto``: and remembers; ``require_hardware_accel``:
    refuses TCG); without one, a chooser that keeps its verdict in the run root's state
    directory.
    """

    async def boot(accel_name: str, timeout: float | None) -> VM:
        return await start_vm(spec, accel_name, timeout if timeout is not None else spec.boot_timeout,
                              registry, become_ready=wait_for_boot)

    chooser = accel if accel is not None else AccelChooser(
        kvm_probe_file(spec.run_root), spec.accel, spec.require_hardware_accel)
    return await chooser.boot(spec.qemu, min(spec.kvm_probe_timeout, spec.boot_timeout), boot)


def kvm_probe_file(run_root: Path) -> Path:
    """Where the KVM probe's verdict for this host is kept."""
    return run_root / "state" / "kvm-probe.json"


@asynccontextmanager
async def launch_vm(spec: VMSpec) -> AsyncIterator[VM]:
    """Boot a VM, yield it ready, and stop it on the way out unless it was released."""
    vm = await boot_vm(spec)
    try:
        yield vm
    finally:
        await vm.stop()
