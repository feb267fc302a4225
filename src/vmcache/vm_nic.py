"""A VM's NIC: a virtio-net device whose backend is a tap in QEMU's own network namespace.

A VM whose pool may ever grant network (``VMSpec.nic``) boots with one NIC. Its backend is
a tap, ``tap0``, that the daemon (root) makes and QEMU, unprivileged, never opens itself:

1. before the jail starts, :func:`open_tap` opens /dev/net/tun in a worker thread that has
   entered a new, empty network namespace of its own (a holding namespace, kept alive only
   by the tap's descriptor), so the tap never appears in the host's namespace, not for an
   instant; the descriptor is passed to QEMU (``-netdev tap,fd=N``), so QEMU needs no
   /dev/net/tun (often root-only) and no privilege at all;
2. while the jail's gate still holds QEMU back (vmcache.jail), :func:`attach_tap`, in the
   network namespace that bubblewrap gave QEMU (``/proc/PID/ns/net``), installs a drop-all
   ruleset, turns IPv6 off, moves the tap in from its holding namespace, gives it the
   gateway's address and brings it up; then the daemon closes its copies.

That namespace has no other interface than lo and no route anywhere: nothing the guest
sends is ever routed off it. Until hand-out the drop-all ruleset (:data:`HOLD_TABLE`, in
the ``inet`` and ``arp`` families) drops every packet, so a guest reaches nothing, not even
the gateway address; what is allowed at hand-out replaces it (:func:`lift_hold`).

Nothing is global on the host: the tap is not persistent (it exists while QEMU holds its
descriptor) and lives, with the rulesets, in QEMU's namespace, which dies when QEMU, its
last process, exits, however the VM ends; a tap is never handed back to the host's
namespace when its namespace dies.

At hand-out the guest's interface is configured through the agent, with no protocol of
its own: :func:`configure_guest` runs a short python3 script in the guest (ioctls; the
image has no iproute2) that finds the interface by its MAC, gives it
:data:`GUEST_ADDRESS`/24, a default route and a nameserver at :data:`GATEWAY_ADDRESS`.
The guest is not trusted: of what it answers, only success or failure counts.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from collections.abc import Sequence
from typing import Protocol

import trio

from .agent_client import CompletedProcess
from .config import VMSpec
from .errors import BootError, ConfigError, GuestOutputLimitError, NetworkSetupError, printable

#: The tap's name inside QEMU's network namespace (the only one there: the name is fixed).
TAP_NAME = "tap0"
#: The host side of the guest's link, the gateway and the DNS server the guest is given.
GATEWAY_ADDRESS = "10.0.2.2"
#: The guest's address on its link.
GUEST_ADDRESS = "10.0.2.15"
PREFIX_LENGTH = 24
#: The guest NIC's MAC (QEMU's own prefix). The same in every VM and every snapshot clone:
#: each VM is alone on its link, in its own namespace, and a clone's device state is its
#: template's.
GUEST_MAC = "52:54:00:76:6d:01"
#: QEMU's ids of the NIC's backend and device.
NETDEV_ID = "vmcache-net"
DEVICE_ID = "vmcache-nic"
#: Name of the drop-all ruleset's tables (inet and arp) that hold the guest's network
#: closed until hand-out.
HOLD_TABLE = "vmcache_hold"
#: The tun/tap control device (opened by the daemon only: QEMU is given the tap's descriptor).
TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
#: How long one host command setting up the namespace (ip, sysctl, nft) may take.
COMMAND_TIMEOUT = 5.0
#: How long configuring the guest's interface may take (python3's start under TCG included).
CONFIGURE_TIMEOUT = 15.0
#: How much of a failed command's output (ours or the guest's) is quoted in an error.
QUOTED_OUTPUT = 300

#: The drop-all ruleset (``nft -f``): every packet in, out or through, IPv4, IPv6 and ARP.
HOLD_RULESET = f"""\
table inet {HOLD_TABLE} {{
    chain input {{ type filter hook input priority -300; policy drop; }}
    chain forward {{ type filter hook forward priority -300; policy drop; }}
    chain output {{ type filter hook output priority -300; policy drop; }}
}}
table arp {HOLD_TABLE} {{
    chain input {{ type filter hook input priority -300; policy drop; }}
    chain output {{ type filter hook output priority -300; policy drop; }}
}}
"""

#: Run in the guest (``python3 -c``) with the MAC, the address, the prefix length and
#: the gateway as arguments: find the interface by its MAC, turn IPv6 off on it, give it
#: the address, bring it up, add the default route, write /etc/resolv.conf (replaced,
#: not written through: it may be a symlink). Exit status 0 is success.
GUEST_SCRIPT = r"""
import fcntl, os, socket, struct, sys
mac, address, prefix, gateway = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK, SIOCADDRT = (
    0x8913, 0x8914, 0x8916, 0x891C, 0x890B)
IFF_UP, RTF_UP, RTF_GATEWAY = 0x1, 0x1, 0x2
names = [n for n in sorted(os.listdir("/sys/class/net"))
         if open(f"/sys/class/net/{n}/address").read().strip() == mac]
if len(names) != 1:
    sys.exit(f"no single interface with MAC {mac}: {names}")
name = names[0]
try:
    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
        f.write("1")
except OSError:
    pass
def sockaddr(ip):
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(ip))
mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifname = name.encode()
fcntl.ioctl(s, SIOCSIFADDR, struct.pack("16s16s8x", ifname, sockaddr(address)))
fcntl.ioctl(s, SIOCSIFNETMASK, struct.pack("16s16s8x", ifname, sockaddr(mask)))
flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh22x", ifname, 0))[:18])[1]
fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", ifname, flags | IFF_UP))
route = struct.pack("L16s16s16sHhLPhPLLH0L", 0, sockaddr("0.0.0.0"), sockaddr(gateway),
                    sockaddr("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
try:
    fcntl.ioctl(s, SIOCADDRT, route)
except FileExistsError:
    pass
temporary = "/etc/.resolv.conf.vmcache"
with open(temporary, "w") as f:
    f.write(f"nameserver {gateway}\n")
os.replace(temporary, "/etc/resolv.conf")
"""


class GuestRunner(Protocol):
    """What :func:`configure_guest` needs: ``run``, as the agent connection has it
    (vmcache.agent_client.AgentConnection; a VM's GuestAPI has it too)."""

    async def run(self, argv: Sequence[str | bytes], *, capture_stdout: bool = ...,
                  capture_stderr: bool = ..., timeout: float | None = ...,
                  max_output: int = ...) -> CompletedProcess: ...


def check_nic(spec: VMSpec) -> None:
    """A ConfigError (one line) if this daemon cannot give ``spec``'s VMs a NIC: only root
    can make a tap in QEMU's namespace, and only the jail gives QEMU a namespace of its own."""
    if not spec.nic:
        return
    if os.geteuid() != 0:
        raise ConfigError(
            "a pool that may grant network needs its VMs' NIC, which only a daemon running as "
            "root can make (a tap in each QEMU's own network namespace): run vmcache as root, "
            'or give the pool network mode "none"')
    if spec.jail is None:
        raise ConfigError(
            "a pool that may grant network needs the jail (jail.enabled = true): without it "
            "QEMU has no network namespace of its own to hold the VM's NIC")


def qemu_nic_args(tap_fd: int) -> list[str]:
    """QEMU's arguments for the NIC (pure): the tap as the descriptor ``tap_fd`` (see
    :func:`open_tap`), and a virtio-net device with :data:`GUEST_MAC`."""
    return ["-netdev", f"tap,id={NETDEV_ID},fd={tap_fd}",
            "-device", f"virtio-net-pci,netdev={NETDEV_ID},id={DEVICE_ID},mac={GUEST_MAC}"]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class Tap:
    """A tap made by :func:`open_tap`: its descriptor (for QEMU) and its holding namespace's."""

    def __init__(self, fd: int, holding_netns: int) -> None:
        self.fd = fd
        self.holding_netns = holding_netns

    def close(self) -> None:
        """Close our descriptors (QEMU keeps its own copy of the tap's); idempotent."""
        for fd in (self.fd, self.holding_netns):
            if fd >= 0:
                os.close(fd)
        self.fd = self.holding_netns = -1


def _open_tap() -> Tap:
    """In this (worker) thread: enter a new network namespace, make :data:`TAP_NAME` there
    (not persistent: it lasts while a descriptor of it is open), and come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fds: list[int] = []
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise BootError(f"cannot make a network namespace for the VM's tap: {os.strerror(error)}")
        try:
            fds.append(os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC))
            request = struct.pack("16sH22x", TAP_NAME.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fds[0], TUNSETIFF, request)
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        finally:
            try:
                _setns(own)
            except OSError:
                os.abort()  # a thread of the daemon left in another namespace: never go on
        tap = Tap(fds[0], fds[1])
        fds = []
        return tap
    except OSError as error:
        raise BootError(f"cannot make the VM's tap ({TUN_DEVICE}): {error.strerror or error}") from None
    finally:
        for fd in (own, *fds):
            os.close(fd)


async def open_tap() -> Tap:
    """A new tap, in a holding namespace of its own, for :func:`attach_tap` (a BootError if
    it cannot be made). The caller closes it once QEMU has its copy."""
    return await trio.to_thread.run_sync(_open_tap)


async def _in_namespace(pid: int, command: Sequence[str], stdin: bytes = b"", *,
                        netns: str | None = None, pass_fds: Sequence[int] = ()) -> None:
    """Run ``command`` in ``pid``'s network namespace (or the one at path ``netns``) with
    nsenter, bounded; a BootError quoting its output if it fails."""
    argv = ["nsenter", f"--net={netns or f'/proc/{pid}/ns/net'}", "--", *command]
    try:
        with trio.fail_after(COMMAND_TIMEOUT):
            done = await trio.run_process(argv, stdin=stdin, capture_stdout=True,
                                          capture_stderr=True, check=False, pass_fds=pass_fds)
    except trio.TooSlowError:
        raise BootError(f"{' '.join(command[:2])} in QEMU's network namespace took more than "
                        f"{COMMAND_TIMEOUT:g} s") from None
    except OSError as error:
        raise BootError(f"cannot run {argv[0]} for the VM's NIC: {error.strerror or error} "
                        "(are util-linux, iproute2 and nftables installed?)") from None
    if done.returncode != 0:
        output = printable((done.stderr or done.stdout).decode(errors="replace").strip())
        raise BootError(f"{' '.join(command[:2])} in QEMU's network namespace failed "
                        f"(status {done.returncode}): {output[:QUOTED_OUTPUT]}")


#: Run by ``sh -e`` in QEMU's network namespace once the tap is there, the drop-all ruleset on
#: its standard input: the ruleset, IPv6 off (``all`` reaches the tap, there already, and
#: comes before the tap is up: it never has an IPv6 address), the gateway's address, up.
ATTACH_SCRIPT = (
    "nft -f -; "
    "sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1; "
    f"ip addr add {GATEWAY_ADDRESS}/{PREFIX_LENGTH} dev {TAP_NAME}; "
    f"ip link set {TAP_NAME} up"
)


class _Alive(Protocol):
    """The gate's process as the jail holds it (a pidfd): ``returncode`` None while it runs."""

    @property
    def returncode(self) -> int | None: ...


def _open_qemu_netns(pid: int, process: _Alive) -> int:
    """A descriptor of ``pid``'s network namespace, opened and then checked: the process is
    still the one the jail holds by its pidfd (so a recycled pid is never taken for it) and the
    namespace is not the daemon's own (the tap and the drop-all never land on the host)."""
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise BootError(f"cannot open QEMU's network namespace (pid {pid}): "
                        f"{error.strerror or error}") from None
    try:
        if process.returncode is not None:
            raise BootError(f"QEMU's sandbox (pid {pid}) ended before its NIC was attached")
        if os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            raise BootError(f"QEMU (pid {pid}) is in the daemon's own network namespace: its NIC "
                            "is not attached there (is the jail's network namespace missing?)")
    except BaseException:
        os.close(fd)
        raise
    return fd


async def attach_tap(tap: Tap, pid: int, process: _Alive) -> None:
    """Into the network namespace of ``pid`` (QEMU held at its gate; ``process`` its pidfd):
    ``tap`` moved in from its holding namespace, the drop-all ruleset, IPv6 off, the gateway's
    address, up (two commands: the gate holds QEMU meanwhile). The namespace is opened once and
    checked (:func:`_open_qemu_netns`); both commands reach it by that descriptor, never by
    pid again. Not one packet can pass before the ruleset: QEMU does not run yet and the tap
    is down. A BootError if any step fails (the caller then ends the sandbox, and its
    namespace with it)."""
    netns = await trio.to_thread.run_sync(_open_qemu_netns, pid, process)
    try:
        await _in_namespace(pid, ["ip", "link", "set", "dev", TAP_NAME, "netns", f"/proc/self/fd/{netns}"],
                            netns=f"/proc/self/fd/{tap.holding_netns}", pass_fds=[tap.holding_netns, netns])
        await _in_namespace(pid, ["sh", "-ec", ATTACH_SCRIPT], HOLD_RULESET.encode(),
                            netns=f"/proc/self/fd/{netns}", pass_fds=[netns])
    finally:
        os.close(netns)


async def lift_hold(pid: int) -> None:
    """Remove the drop-all ruleset from ``pid``'s network namespace, in one transaction
    (what may pass from then on is the caller's to install first)."""
    await _in_namespace(pid, ["nft", "-f", "-"],
                        f"delete table inet {HOLD_TABLE}\ndelete table arp {HOLD_TABLE}\n".encode())


async def configure_guest(vm: GuestRunner) -> None:
    """Configure the guest's NIC through its agent (bounded by :data:`CONFIGURE_TIMEOUT`):
    :data:`GUEST_ADDRESS`/24 on the interface with :data:`GUEST_MAC`, up, a default route
    and a nameserver at :data:`GATEWAY_ADDRESS`. A NetworkSetupError if the guest fails
    or does not answer in time; nothing it says is trusted beyond that."""
    argv = ["python3", "-I", "-c", GUEST_SCRIPT, GUEST_MAC, GUEST_ADDRESS, str(PREFIX_LENGTH),
            GATEWAY_ADDRESS]
    try:
        with trio.fail_after(CONFIGURE_TIMEOUT):
            done = await vm.run(argv, capture_stdout=False, capture_stderr=True,
                                timeout=CONFIGURE_TIMEOUT, max_output=4096)
    except trio.TooSlowError:
        raise NetworkSetupError(
            f"the guest did not configure its network within {CONFIGURE_TIMEOUT:g} s: "
            "the VM is not usable with network; ask for another") from None
    except GuestOutputLimitError:
        raise NetworkSetupError(
            "the guest printed too much while configuring its network: the VM is not usable "
            "with network; ask for another") from None
    if done.returncode != 0:
        said = printable(done.stderr.decode(errors="replace").strip()[-QUOTED_OUTPUT:]) \
            if done.stderr else ""
        raise NetworkSetupError(
            f"the guest could not configure its network (status {done.returncode}): the VM "
            f"is not usable with network; ask for another. The guest said: {said}")
