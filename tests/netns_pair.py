"""A QEMU-free stand-in for a VM's network: a "vm" namespace and a "guest" namespace joined by a
veth pair, for the egress tests and bench/egress.py.

The vm end is named like the tap (``tap0``) and gets the gateway address from the code under test;
the guest end is ``eth0``, 10.0.2.15/24, default route via 10.0.2.2. The guest's ``lo`` stays
down and it accepts loopback destinations on eth0 (``route_localnet``), so that the guest can aim
at 127.0.0.x: the test's stand-ins for outside servers run on the HOST's loopback, and only the
egress proxy (which connects from the host) can reach them. Nothing here sends a packet anywhere
but these two namespaces and the host's loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from vmcache.netns import Netns, run_in_netns

T = TypeVar("T")
IPv4 = ipaddress.IPv4Address


#: The vm end's MAC address (a hostile guest may send anything to it).
VM_MAC = "02:00:00:00:00:02"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Pair:
    tag: str
    vm: Netns
    guest: Netns

    @property
    def vm_name(self) -> str:
        return f"{self.tag}-vm"

    @property
    def guest_name(self) -> str:
        return f"{self.tag}-guest"


@contextmanager
def netns_pair(tag: str | None = None, *, interface: str = "tap0") -> Iterator[Pair]:
    """Make the two namespaces and the veth; remove them (and so every socket and rule in them)
    on exit."""
    tag = tag or f"vmcache-test-eg{os.getpid()}"
    vm, guest = f"{tag}-vm", f"{tag}-guest"
    made: list[str] = []
    try:
        for name in (vm, guest):
            _ip("netns", "add", name)
            made.append(name)
        _ip("link", "add", interface, "netns", vm, "type", "veth", "peer", "name", "eth0", "netns", guest)
        _ip("-n", vm, "link", "set", interface, "address", VM_MAC)
        _ip("-n", guest, "addr", "add", "10.0.2.15/24", "dev", "eth0")
        _ip("-n", guest, "link", "set", "eth0", "up")
        _ip("-n", guest, "route", "add", "default", "via", "10.0.2.2")
        for key in ("all", "eth0"):
            subprocess.run(["ip", "netns", "exec", guest, "sysctl", "-q", "-w",
                            f"net.ipv4.conf.{key}.route_localnet=1"], check=True, timeout=10)
        with Netns(f"/run/netns/{vm}") as vm_ns, Netns(f"/run/netns/{guest}") as guest_ns:
            yield Pair(tag, vm_ns, guest_ns)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)


@dataclass
class FakePolicy:
    """A PolicyView: exact names with their ports (None: any), CIDRs with a port, the internal ports."""

    names: dict[str, frozenset[int] | None] = field(default_factory=dict)
    cidrs: list[tuple[ipaddress.IPv4Network, int | None]] = field(default_factory=list)
    internal: frozenset[int] | None = frozenset()

    def allows_name(self, name: str) -> bool:
        return name in self.names

    def allows_name_port(self, name: str, port: int) -> bool:
        if name not in self.names:
            return False
        ports = self.names[name]
        return ports is None or port in ports

    def allows_ip_port(self, ip: ipaddress.IPv4Address, port: int) -> bool:
        return any(ip in net and (p is None or p == port) for net, p in self.cidrs)

    def internal_ports(self) -> frozenset[int] | None:
        return self.internal


class Permissive(FakePolicy):
    """Allows every address and port (the control: shows a test's target is reachable)."""

    def allows_ip_port(self, ip: ipaddress.IPv4Address, port: int) -> bool:
        return True

    def internal_ports(self) -> frozenset[int] | None:
        return None


class FakeResolver:
    """Test names to loopback addresses; records every name it was asked (no real DNS ever)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, name: str) -> list[IPv4]:
        self.asked.append(name)
        await trio.lowlevel.checkpoint()
        return [IPv4(a) for a in self.table.get(name, [])]


async def in_ns(ns: Netns, fn: Callable[[], T]) -> T:
    return await run_in_netns(ns, fn)


async def guest_socket(pair: Pair, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM,
                       proto: int = 0) -> trio.socket.SocketType:
    """A socket of the guest's namespace (it keeps it), for trio I/O from the test's thread."""

    def make() -> socket.socket:
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        sock.setblocking(False)
        return sock

    return trio.socket.from_stdlib_socket(await in_ns(pair.guest, make))


async def guest_connect(pair: Pair, ip: str, port: int) -> trio.SocketStream:
    sock = await guest_socket(pair)
    try:
        await sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange(pair: Pair, ip: str, port: int, payload: bytes, *, timeout: float = 5.0,
                   limit: int = 1 << 20) -> bytes | None:
    """Connect from the guest, send ``payload``, read to EOF: the bytes read, or None when the
    connection was refused or reset."""
    with trio.fail_after(timeout):
        try:
            stream = await guest_connect(pair, ip, port)
        except OSError:
            return None
        async with stream:
            try:
                if payload:
                    await stream.send_all(payload)
                got = b""
                while len(got) < limit:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    got += chunk
            except (trio.BrokenResourceError, OSError):
                return None
            return got


@dataclass
class Server:
    """A TCP server on the host's loopback: answers ``hello from LABEL`` to whatever it gets."""

    label: str
    host: str
    port: int = 0
    received: list[bytes] = field(default_factory=list)
    accepted: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        async with stream:
            with trio.move_on_after(5):
                try:
                    data = await stream.receive_some(65536)
                    self.received.append(data)
                    await stream.send_all(b"hello from " + self.label.encode())
                except (trio.BrokenResourceError, OSError):
                    pass
