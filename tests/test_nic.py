"""A VM's NIC (vmcache.vm_nic): the QEMU arguments, the tap made in QEMU's network namespace at
the jail's gate, the drop-all until hand-out, the guest configured through its agent, snapshot
clones, and nothing left on the host. Network traffic here only ever reaches listeners the
test itself opens inside the VM's own network namespace."""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from conftest import write_config

from vmcache.agent_client import CompletedProcess
from vmcache.config import VMSpec, load_config, resolve_spec
from vmcache.errors import BootError, ConfigError, NetworkSetupError
from vmcache.qemu import VM, launch_vm
from vmcache.qemu_argv import qemu_argv
from vmcache.snapshot import SnapshotManager, snapshot_key
from vmcache.vm_nic import (
    GATEWAY_ADDRESS,
    GUEST_ADDRESS,
    GUEST_MAC,
    GUEST_SCRIPT,
    HOLD_TABLE,
    PREFIX_LENGTH,
    TAP_NAME,
    attach_tap,
    check_nic,
    configure_guest,
    lift_hold,
    open_tap,
)

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def spec_for(tmp_path: Path, run_dir: Path, *, nic: bool) -> VMSpec:
    config = write_config(tmp_path / "vmcache.toml")
    return attrs.evolve(resolve_spec(load_config(config), run_root=run_dir), nic=nic)


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def host_netns() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def live_netns_inodes() -> set[int]:
    inodes = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                inodes.add(os.stat(f"/proc/{entry}/ns/net").st_ino)
            except OSError:
                pass
    return inodes


def open_fds() -> dict[str, str]:
    """Our open descriptors; after a collection: a cancelled trio.run_process leaves its pipes
    to the garbage collector (in reference cycles with the Cancelled's traceback)."""
    gc.collect()
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return found


def in_netns(pid: int, *command: str) -> str:
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", *command],
                          capture_output=True, text=True, check=True, timeout=10).stdout


# --------------------------------------------------------------------------- QEMU-free


def test_no_nic_is_todays_argv_and_a_nic_is_a_tap_by_name(tmp_path: Path, run_dir: Path) -> None:
    plain = spec_for(tmp_path, run_dir, nic=False)
    argv = qemu_argv(plain, run_dir / "vm-x", "tcg", "n")
    assert not any("netdev" in arg or "virtio-net" in arg for arg in argv)
    assert qemu_argv(plain, run_dir / "vm-x", "tcg", "n", tap_fd=9) == argv, "the switch decides"
    with_nic = qemu_argv(attrs.evolve(plain, nic=True), run_dir / "vm-x", "tcg", "n", tap_fd=9)
    extra = [arg for arg in with_nic if arg not in argv]
    assert extra == ["-netdev", "tap,id=vmcache-net,fd=9",
                     f"virtio-net-pci,netdev=vmcache-net,id=vmcache-nic,mac={GUEST_MAC}"]
    restored = qemu_argv(attrs.evolve(plain, nic=True, restored=True), run_dir / "vm-x", "tcg", "n",
                         tap_fd=9)
    assert "-netdev" in restored, "a snapshot clone has the template's NIC"
    with pytest.raises(ValueError):
        qemu_argv(attrs.evolve(plain, nic=True), run_dir / "vm-x", "tcg", "n")


async def test_a_nic_changes_the_snapshot_key_and_no_nic_keeps_it(tmp_path: Path, run_dir: Path) -> None:
    plain = spec_for(tmp_path, run_dir, nic=False)
    assert await snapshot_key(plain, "tcg") != await snapshot_key(attrs.evolve(plain, nic=True), "tcg")


def test_a_nic_this_daemon_cannot_make_is_one_line(tmp_path: Path, run_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_for(tmp_path, run_dir, nic=True)
    check_nic(spec)
    check_nic(attrs.evolve(spec, nic=False, jail=None))
    with pytest.raises(ConfigError, match="jail") as no_jail:
        check_nic(attrs.evolve(spec, jail=None))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="root") as not_root:
        check_nic(spec)
    check_nic(attrs.evolve(spec, nic=False))
    for error in (no_jail, not_root):
        assert "\n" not in str(error.value)


async def test_non_root_refuses_a_nic_before_starting_anything(tmp_path: Path, run_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="root"):
        async with launch_vm(spec_for(tmp_path, run_dir, nic=True)):
            pass
    assert not [p for p in run_dir.iterdir() if p.name.startswith("vm-")]


@asynccontextmanager
async def namespace_process(own: bool = True) -> AsyncIterator[trio.Process]:
    """A process in a network namespace of its own (as bubblewrap gives QEMU; ``own=False``:
    in the daemon's), killed after."""
    process = await trio.lowlevel.open_process(["unshare", "--net", "--", "sleep", "60"] if own
                                               else ["sleep", "60"])
    try:
        with trio.fail_after(10):
            while own and netns_inode(process.pid) == os.stat("/proc/self/ns/net").st_ino:
                await trio.sleep(0.01)
        yield process
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def test_the_tap_is_moved_into_the_namespace_behind_a_drop_all_and_dies_with_its_fd() -> None:
    links = host_links()
    async with namespace_process() as process:
        pid = process.pid
        with trio.fail_after(30):
            tap = await open_tap()
            try:
                assert TAP_NAME not in host_links(), "made in a holding namespace, not the host's"
                await attach_tap(tap, pid, process)
            finally:
                fd = os.dup(tap.fd)  # as QEMU keeps it
                tap.close()
        details = in_netns(pid, "ip", "-d", "link", "show", TAP_NAME)
        assert "tun type tap" in details and "vnet_hdr on persist off" in details
        assert "UP" in details
        assert f"inet {GATEWAY_ADDRESS}/24" in in_netns(pid, "ip", "-4", "addr", "show", TAP_NAME)
        assert in_netns(pid, "ip", "-6", "addr", "show", TAP_NAME).strip() == "", "no IPv6 at all"
        ruleset = in_netns(pid, "nft", "list", "ruleset")
        assert f"table inet {HOLD_TABLE}" in ruleset and f"table arp {HOLD_TABLE}" in ruleset
        assert ruleset.count("policy drop") == 5
        assert TAP_NAME not in host_links()
        with trio.fail_after(30):
            await lift_hold(pid)
        assert HOLD_TABLE not in in_netns(pid, "nft", "list", "ruleset")
        os.close(fd)
        assert TAP_NAME not in in_netns(pid, "ip", "-o", "link"), "gone with its last descriptor"
    assert host_links() == links


async def test_a_tap_that_cannot_be_attached_is_a_boot_error() -> None:
    async with namespace_process() as process:
        pid = process.pid
        with trio.fail_after(30):
            first, second = await open_tap(), await open_tap()
            try:
                await attach_tap(first, pid, process)
                with pytest.raises(BootError, match="ip link"):
                    await attach_tap(second, pid, process)  # a tap0 is there already
            finally:
                first.close()
                second.close()
    with trio.fail_after(30):
        tap = await open_tap()
        try:
            with pytest.raises(BootError, match="cannot open QEMU's network namespace"):
                await attach_tap(tap, pid, process)  # its namespace is gone
        finally:
            tap.close()


async def test_the_tap_never_goes_into_the_daemons_own_namespace() -> None:
    """A process that turns out to be in the host's namespace (a recycled pid, a jail without
    its network namespace) gets no tap and no drop-all: the host's links and ruleset stay."""
    links = host_links()
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                             timeout=10).stdout
    async with namespace_process(own=False) as process:
        with trio.fail_after(30):
            tap = await open_tap()
            try:
                with pytest.raises(BootError, match="daemon's own network namespace"):
                    await attach_tap(tap, process.pid, process)
            finally:
                tap.close()
    assert host_links() == links
    assert subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                          timeout=10).stdout == ruleset


@attrs.define
class FakeGuest:
    """A guest whose configuration script answers ``returncode`` (or never)."""

    returncode: int | None
    stderr: bytes = b""
    argv: list[str | bytes] = attrs.Factory(list)

    async def run(self, argv: Sequence[str | bytes], *, capture_stdout: bool = True,
                  capture_stderr: bool = True, timeout: float | None = None,
                  max_output: int = 0) -> CompletedProcess:
        self.argv = list(argv)
        if self.returncode is None:
            await trio.sleep_forever()
        return CompletedProcess(list(argv), self.returncode, None, self.stderr)


async def test_configure_guest_trusts_only_the_guests_status(autojump_clock: trio.abc.Clock) -> None:
    guest = FakeGuest(0, b"anything at all")
    await configure_guest(guest)
    assert guest.argv[:2] == ["python3", "-I"] and GUEST_MAC in guest.argv
    with pytest.raises(NetworkSetupError, match=r"status 1.*bad\\x1b") as failed:
        await configure_guest(FakeGuest(1, b"bad\x1b[2J"))
    assert "\n" not in str(failed.value)
    with pytest.raises(NetworkSetupError, match="within"):
        await configure_guest(FakeGuest(None))


SCRIPT_SANDBOX = """
set -e
mount -t sysfs none /sys
mount -t tmpfs none /etc
ip tuntap add eth7 mode tap
ip link set eth7 address "$1"
ip tuntap add other mode tap
shift
"$@"
ip -4 -o addr show eth7
ip -6 -o addr show eth7
ip -o addr show other
ip route
cat /etc/resolv.conf
"""


def test_the_guest_script_configures_the_interface_with_our_mac_only() -> None:
    """The script configure_guest runs, on this kernel, in a network and a mount namespace
    of its own (a tmpfs /etc): the interface found by its MAC, its address, the default
    route, the nameserver; the other interface untouched."""
    argv = ["unshare", "--net", "--mount", "--", "sh", "-c", SCRIPT_SANDBOX, "sandbox", GUEST_MAC,
            sys.executable, "-I", "-c", GUEST_SCRIPT, GUEST_MAC, GUEST_ADDRESS, str(PREFIX_LENGTH),
            GATEWAY_ADDRESS]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    lines = out.splitlines()
    assert f"inet {GUEST_ADDRESS}/24" in lines[0] and "eth7" in lines[0]
    assert [line for line in lines if " inet" in line] == [lines[0]], "no IPv6, the other untouched"
    assert f"default via {GATEWAY_ADDRESS} dev eth7" in out
    assert out.endswith(f"nameserver {GATEWAY_ADDRESS}\n")


# --------------------------------------------------------------------------- real QEMU


def _listen_in(pid: int) -> socket.socket:
    """A TCP listener on the gateway address inside ``pid``'s network namespace (this worker
    thread enters it, makes the socket, which keeps the namespace, and comes back)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((GATEWAY_ADDRESS, 0))
            listener.listen(4)
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                os.abort()  # a worker thread left in another namespace: never go on
        return listener
    finally:
        os.close(own)
        os.close(target)


GUEST_CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.sendall(b"ping")
    print(s.recv(16).decode())
except OSError as error:
    print(type(error).__name__)
    sys.exit(1)
"""


async def guest_reaches_gateway(vm: VM, listener: trio.socket.SocketType) -> bool:
    """Whether a TCP connection from the guest to the gateway reaches ``listener`` (and back)."""
    port = listener.getsockname()[1]
    accepted: list[bytes] = []

    async def serve() -> None:
        connection, _ = await listener.accept()
        with connection:
            accepted.append(await connection.recv(16))
            await connection.send(b"pong")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        result = await vm.run(["python3", "-c", GUEST_CLIENT, GATEWAY_ADDRESS, str(port)], timeout=30)
        with trio.move_on_after(1):
            while result.returncode == 0 and not accepted:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    if result.returncode == 0:
        assert result.stdout == b"pong\n" and accepted == [b"ping"]
        return True
    assert accepted == [], "nothing reached the listener"
    return False


async def check_nic_end_to_end(vm: VM) -> None:
    """The tap in QEMU's netns, the guest's interface configured at boot (a snapshot clone:
    in its template), the drop-all, then the plumbing."""
    devices = Path(f"/proc/{vm.pid}/net/dev").read_text()
    assert TAP_NAME in devices
    listener = trio.socket.from_stdlib_socket(await trio.to_thread.run_sync(_listen_in, vm.pid))
    with listener:
        shown = await vm.run(["cat", "/etc/resolv.conf", "/proc/net/route"])
        assert shown.stdout is not None
        assert shown.stdout.startswith(f"nameserver {GATEWAY_ADDRESS}\n".encode())
        assert b"\t00000000\t0202000A\t0003\t" in shown.stdout, "default route via 10.0.2.2"
        assert not await guest_reaches_gateway(vm, listener), "dropped until hand-out"
        await lift_hold(vm.pid)  # what enforcement will replace with its own ruleset
        assert await guest_reaches_gateway(vm, listener), "the plumbing works end to end"


@pytest.mark.qemu
async def test_a_booted_vm_with_a_nic_reaches_only_its_own_namespace(
        tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    links, namespaces = host_links(), host_netns()
    spec = spec_for(tmp_path, run_dir, nic=True)
    with trio.fail_after(240):
        async with launch_vm(spec) as vm:
            inode = netns_inode(vm.pid)
            await check_nic_end_to_end(vm)
            assert host_links() == links
        assert inode not in live_netns_inodes(), "the namespace, and the tap, died with QEMU"
        async with launch_vm(spec) as vm:  # ended by a crash, not by stop()
            inode = netns_inode(vm.pid)
            vm.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            await vm.process.wait()  # type: ignore[union-attr]
        assert inode not in live_netns_inodes()
    assert (host_links(), host_netns()) == (links, namespaces), "nothing left on the host"


@pytest.mark.qemu
async def test_a_vm_without_the_switch_has_no_nic(tmp_path: Path, run_dir: Path,
                                                  guest_image: Path) -> None:
    with trio.fail_after(120):
        async with launch_vm(spec_for(tmp_path, run_dir, nic=False)) as vm:
            interfaces = [line.split(":")[0].strip() for line in
                          Path(f"/proc/{vm.pid}/net/dev").read_text().splitlines()[2:]]
            assert interfaces == ["lo"]
            guest = await vm.run(["ls", "/sys/class/net"])
            assert guest.stdout is not None and guest.stdout.split() == [b"lo"]


@pytest.mark.qemu
async def test_snapshot_clones_each_have_their_own_working_nic(
        tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    links, namespaces = host_links(), host_netns()
    spec = spec_for(tmp_path, run_dir, nic=True)
    manager = SnapshotManager(spec, run_dir / "snapshots")
    inodes = []
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            while manager.snapshot is None:
                await trio.sleep(0.05)
            first = await manager.boot(spec)
            second = await manager.boot(spec)
            try:
                assert manager.restores == 2
                inodes = [netns_inode(first.pid), netns_inode(second.pid)]
                assert inodes[0] != inodes[1]
                for vm in (first, second):
                    await check_nic_end_to_end(vm)
            finally:
                await first.stop()
                await second.stop()
            nursery.cancel_scope.cancel()
    assert not set(inodes) & live_netns_inodes()
    assert (host_links(), host_netns()) == (links, namespaces)


@pytest.mark.qemu
async def test_a_nic_boot_cancelled_at_any_moment_of_its_set_up_leaves_nothing(
        tmp_path: Path, run_dir: Path, guest_image: Path) -> None:
    """Cancelled every 5 ms through the tap's making, bubblewrap's set-up, the tap's attaching
    at the gate and QEMU's first moments: no QEMU, jail, namespace, tap or descriptor is left."""
    from vmcache.procfs import jail_pids, qemu_pids
    from vmcache.qemu import boot_vm

    spec = spec_for(tmp_path, run_dir, nic=True)
    links, namespaces = host_links(), host_netns()
    before, jails, inodes = qemu_pids(), jail_pids(), live_netns_inodes()
    fds = open_fds()
    for step in range(0, 150, 5):
        with trio.move_on_after(step / 1000) as scope:
            await boot_vm(spec)
        assert scope.cancelled_caught
        assert (qemu_pids(), jail_pids()) == (before, jails), f"left after a cancel at {step} ms"
        assert live_netns_inodes() <= inodes, f"a namespace left after a cancel at {step} ms"
        assert open_fds() == fds, f"a descriptor left at {step} ms"
        assert [name for name in os.listdir(run_dir) if name.startswith("vm-")] == []
    assert (host_links(), host_netns()) == (links, namespaces)
