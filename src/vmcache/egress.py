"""Host-side enforcement of a VM's network policy: the nftables ruleset, the egress proxy, and
:func:`enforce`, which runs both (with the DNS responder) inside the VM's network namespace.

How the guest's traffic is confined. The VM's network namespace (QEMU's own) has ``lo`` and the
tap, and no route anywhere: nothing the guest sends is ever routed. Its nftables ruleset
(:func:`ruleset`) keeps, from the tap, only IPv4 from the guest's own address that is TCP, or UDP
to the gateway's port 53; IPv6, ICMP, other UDP, forged source addresses and anything on another
interface are dropped before connection tracking. Every TCP connection from the guest, to any
address and port, is redirected (``nat prerouting redirect``) to the egress proxy's listener in the
namespace; the only other thing the guest can reach is the DNS responder
(:mod:`vmcache.dns_host`). The proxy reads where the guest meant to go (``SO_ORIGINAL_DST``) and
decides by the policy, then connects *from the host's namespace* (the daemon's) and splices:

- the gateway (``host.vmcache.internal``) on a port the policy names for it: the host's
  ``127.0.0.1:PORT``;
- an address a CIDR rule covers on that port: that address;
- an address our DNS answered for an allowed name (the resolved-IP sets, see
  :class:`vmcache.dns_host.ResolvedAddresses`): the first bytes are peeked (at most
  :data:`PEEK_LIMIT`, :data:`PEEK_TIMEOUT`) for a TLS ClientHello's SNI or an HTTP/1.x ``Host``
  header (and an absolute request URI). When one is there it must be an allowed name for that port
  *and* the address must be among the ones our DNS gave for that name (so another name's SNI or
  Host on an allowed address is refused, and so is a name's address the guest found elsewhere).
  When there is none (another protocol, or a server-speaks-first one after the timeout) the
  connection is let through since some allowed name with that port resolved to that address;
- anything else, and any destination in the host's loopback range other than through the gateway,
  the guest's own subnet, multicast or broadcast: refused (reset), with a rate-limited log line.

Both layers hold on their own: with the proxy gone (a dead daemon) the SYNs still go to a listener
that no longer exists, and the namespace routes nothing, so the guest's network fails closed.

What it cannot see: inside a TLS connection to an allowed name's address, the guest may ask the
server for another of its virtual hosts (domain fronting); a plain-HTTP keep-alive connection is
checked on its first request only. Both reach only servers that an allowed name resolved to.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum

import trio

from vmcache.dns_host import (
    INTERNAL_NAME,
    DnsResponder,
    PolicyView,
    ResolvedAddresses,
    Resolver,
    is_host_address,
)
from vmcache.errors import NetworkSetupError
from vmcache.netns import Netns, apply_nft, as_netns, run_in_netns_command, socket_in_netns

log = logging.getLogger(__name__)

IPv4 = ipaddress.IPv4Address

GATEWAY = IPv4("10.0.2.2")
GUEST = IPv4("10.0.2.15")
PREFIX = 24
DNS_PORT = 53
SO_ORIGINAL_DST = 80

#: Bound on the bytes peeked for an SNI or Host header, and on the time to wait for them.
PEEK_LIMIT = 16 * 1024
PEEK_TIMEOUT = 5.0
#: Bound on connecting to the destination from the host.
CONNECT_TIMEOUT = 10.0
#: Size of one read in the splice (each direction holds at most one such buffer).
SPLICE_BUFFER = 128 * 1024
#: Connections one VM may have open through the proxy at once.
MAX_CONNECTIONS = 256
#: Bounds on the connection-tracking entries a guest makes in its namespace (each new UDP source
#: port to :53 and each SYN is one; the only other bound is the host-wide nf_conntrack_max): new
#: flows beyond this rate (after a burst of twice as many) are dropped, and so is any new flow
#: while this many are tracked (above MAX_CONNECTIONS: the proxy's cap is what a guest sees).
NEW_FLOWS_PER_SECOND = 100
MAX_TRACKED_FLOWS = 512
#: Bound on tearing down: restoring the drop-all ruleset.
TEARDOWN_TIMEOUT = 10.0
#: At most this many refusal lines per :data:`LOG_INTERVAL` seconds per VM; the rest are counted.
LOG_BURST = 10
LOG_INTERVAL = 10.0


# --------------------------------------------------------------------------- the rulesets

def ruleset(interface: str, proxy_port: int, *, gateway: IPv4 = GATEWAY, guest: IPv4 = GUEST,
            dns_port: int = DNS_PORT) -> str:
    """The nftables ruleset (``nft -f`` text) of an enforced VM namespace.

    It replaces the namespace's whole ruleset in one transaction (``flush ruleset``: the
    namespace is the VM's alone). From ``interface`` (the tap) only IPv4 from ``guest`` is
    accepted, and of that only TCP (every new connection is redirected to ``proxy_port``) and UDP
    to ``gateway``:``dns_port``; IPv6, ICMP, other UDP, other protocols, forged sources and other
    interfaces are dropped in prerouting, before conntrack. Input accepts only the proxy's port
    and DNS on the gateway, and drops new flows beyond :data:`NEW_FLOWS_PER_SECOND` or while
    :data:`MAX_TRACKED_FLOWS` are tracked (a dropped new flow's entry is never confirmed);
    forward drops everything (there is nowhere to forward to); output
    only lets replies of tracked connections go back to the tap.
    """
    _check_interface(interface)
    return f"""flush ruleset
table inet vmcache {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy drop;
        iifname "lo" accept
        iifname != "{interface}" drop
        meta nfproto != ipv4 drop
        ip saddr != {guest} drop
        ip protocol tcp accept
        ip daddr {gateway} udp dport {dns_port} accept
    }}
    chain to_proxy {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{interface}" ip protocol tcp redirect to :{proxy_port}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state invalid drop
        iifname "{interface}" ct state new limit rate over {NEW_FLOWS_PER_SECOND}/second \
            burst {2 * NEW_FLOWS_PER_SECOND} packets drop
        iifname "{interface}" ct state new ct count over {MAX_TRACKED_FLOWS} drop
        iifname "{interface}" ip daddr {gateway} tcp dport {proxy_port} accept
        iifname "{interface}" ip daddr {gateway} udp dport {dns_port} accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
    }}
    chain output {{
        type filter hook output priority filter; policy drop;
        oifname "lo" accept
        oifname "{interface}" ip daddr {guest} ct state established accept
    }}
}}
"""


def drop_all_ruleset() -> str:
    """The ruleset of a VM namespace after release (before hand-out it holds
    :data:`vmcache.vm_nic.HOLD_RULESET`, which the enforced ruleset's ``flush ruleset`` replaces):
    every packet not on ``lo`` is dropped, both ways, ARP included."""
    return """flush ruleset
table inet vmcache {
    chain prerouting {
        type filter hook prerouting priority raw; policy drop;
        iifname "lo" accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
    }
    chain output {
        type filter hook output priority raw; policy drop;
        oifname "lo" accept
    }
}
table arp vmcache {
    chain input { type filter hook input priority -300; policy drop; }
    chain output { type filter hook output priority -300; policy drop; }
}
"""


def _check_interface(interface: str) -> None:
    if not interface or len(interface) > 15 or not all(c.isalnum() or c in "-_." for c in interface):
        raise NetworkSetupError(f"invalid interface name {interface!r} (a vmcache bug)")


async def configure_gateway(netns: Netns, interface: str, *, gateway: IPv4 = GATEWAY,
                            prefix: int = PREFIX) -> None:
    """``lo`` up, ``gateway/prefix`` on ``interface`` (idempotent) and ``interface`` up, in one ``ip``."""
    _check_interface(interface)
    batch = (f"link set dev lo up\naddr replace {gateway}/{prefix} dev {interface}\n"
             f"link set dev {interface} up\n")
    await run_in_netns_command(netns, ["ip", "-batch", "-"], stdin=batch.encode())


async def prepare(netns: Netns | int | str | os.PathLike[str], interface: str = "tap0", *,
                  gateway: IPv4 = GATEWAY, prefix: int = PREFIX) -> None:
    """A namespace as the tests' stand-in for a VM's before hand-out: the drop-all ruleset, the
    gateway address on ``interface``. Raises :class:`NetworkSetupError`. (The daemon does not
    call it: a real VM's namespace holds vmcache.vm_nic.HOLD_RULESET from the tap's creation;
    the egress tests keep it.)"""
    ns, owned = as_netns(netns)
    try:
        await apply_nft(ns, drop_all_ruleset())
        await configure_gateway(ns, interface, gateway=gateway, prefix=prefix)
    finally:
        if owned:
            ns.close()


# --------------------------------------------------------------------------- peeking

class Sniffed(Enum):
    """What the first bytes of a connection are."""

    MORE = "more"  # not enough bytes yet to say
    TLS = "tls"
    HTTP = "http"
    OTHER = "other"  # neither: another protocol
    BAD = "bad"  # looks like TLS or HTTP but is malformed or ambiguous: refuse


@dataclass(frozen=True)
class Sniff:
    kind: Sniffed
    #: The name the client asks for (SNI / Host), lower case, no port, no trailing dot.
    name: str | None = None


def sniff(data: bytes) -> Sniff:
    """Classify the first bytes a client sent: a TLS ClientHello (and its SNI), an HTTP/1.x request
    (and its Host), another protocol, or not enough bytes yet."""
    if not data:
        return Sniff(Sniffed.MORE)
    if data[0] == 0x16:
        return _sniff_tls(data)
    return _sniff_http(data)


def _sniff_tls(data: bytes) -> Sniff:
    # Handshake messages may span records: join the payloads of the leading handshake records.
    handshake = bytearray()
    pos = 0
    needed: int | None = None
    while True:
        if len(data) < pos + 5:
            return Sniff(Sniffed.MORE)
        rtype, major, _minor, length = struct.unpack("!BBBH", data[pos:pos + 5])
        if rtype != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            return Sniff(Sniffed.BAD if pos else Sniffed.OTHER)
        if len(data) < pos + 5 + length:
            return Sniff(Sniffed.MORE)
        handshake += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if needed is None and len(handshake) >= 4:
            if handshake[0] != 1:
                return Sniff(Sniffed.BAD)
            needed = 4 + int.from_bytes(handshake[1:4], "big")
        if needed is not None and len(handshake) >= needed:
            break
    try:
        return Sniff(Sniffed.TLS, _client_hello_sni(bytes(handshake[4:needed])))
    except (ValueError, IndexError, struct.error):
        return Sniff(Sniffed.BAD)


def _client_hello_sni(body: bytes) -> str | None:
    pos = 2 + 32  # client_version, random
    pos += 1 + body[pos]  # session_id
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")  # cipher_suites
    pos += 1 + body[pos]  # compression_methods
    if pos == len(body):
        return None  # no extensions
    end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    if end != len(body):
        raise ValueError("extensions length")
    pos += 2
    name: str | None = None
    seen = False
    while pos < end:
        etype, elen = struct.unpack("!HH", body[pos:pos + 4])
        pos += 4
        ext = body[pos:pos + elen]
        if len(ext) != elen:
            raise ValueError("truncated extension")
        pos += elen
        if etype != 0:
            continue
        if seen:
            raise ValueError("two server_name extensions")
        seen = True
        listlen = int.from_bytes(ext[0:2], "big")
        if listlen + 2 != len(ext):
            raise ValueError("server_name list length")
        p = 2
        while p < len(ext):
            ntype, nlen = struct.unpack("!BH", ext[p:p + 3])
            raw = ext[p + 3:p + 3 + nlen]
            if len(raw) != nlen:
                raise ValueError("truncated server name")
            p += 3 + nlen
            if ntype == 0:
                if name is not None:
                    raise ValueError("two host names")
                name = _clean_name(raw)
    return name


def _clean_name(raw: bytes) -> str:
    text = raw.decode("ascii")  # UnicodeDecodeError is a ValueError: refused
    if not text or any(c.isspace() or c in "/\\@?#\x00" for c in text):
        raise ValueError("not a host name")
    return text.lower().rstrip(".")


#: The longest request line we wait for before deciding the connection is not HTTP.
_LINE_MAX = 8192


def _sniff_http(data: bytes) -> Sniff:
    """HTTP/1.x is recognised by its request line (``TOKEN SP TARGET SP HTTP/1.x``, any case, after
    any empty lines a lenient server would skip); anything whose first line is not that is
    another protocol. Heads a lenient server could read differently from us (bare CR or LF,
    folded or space-padded header names, two Hosts, an absolute URI naming another host, another
    HTTP version) are refused rather than guessed at."""
    body = data.lstrip(b"\r\n")
    if not body:
        return Sniff(Sniffed.MORE if len(data) < _LINE_MAX else Sniffed.OTHER)
    newline = body.find(b"\n")
    if newline < 0:
        if not _could_be_request_line(body):
            return Sniff(Sniffed.OTHER)
        if len(body) >= _LINE_MAX:  # a request line too long to read: refused, not waved through
            return Sniff(Sniffed.BAD if _REQUEST_START.match(body) else Sniffed.OTHER)
        return Sniff(Sniffed.MORE)
    first = body[:newline].rstrip(b"\r")
    if not _REQUEST_START.match(first) or b"HTTP/" not in first.upper():
        return Sniff(Sniffed.OTHER)
    # It looks like a request line to a lenient server (which skips repeated spaces, takes tabs
    # as separators, has methods with - or _): only the exact form is read, the rest refused.
    if not _REQUEST_LINE.fullmatch(first):
        return Sniff(Sniffed.BAD)  # also HTTP/2 prior knowledge: cannot see the authority
    end = body.find(b"\r\n\r\n")
    if end < 0:
        return Sniff(Sniffed.MORE)
    head = body[:end]
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n") \
            or b"\0" in head:
        return Sniff(Sniffed.BAD)
    try:
        lines = head.decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1]
        uri_host: str | None = None
        if "://" in target:
            authority = target.split("://", 1)[1].split("/", 1)[0]
            uri_host = _host_of(authority)
        host: str | None = None
        for line in lines[1:]:
            if line[:1] in (" ", "\t") or ":" not in line:
                return Sniff(Sniffed.BAD)  # obsolete line folding or garbage: servers differ
            key, value = line.split(":", 1)
            if key.strip().lower() == "host":
                if key != key.strip() or host is not None:
                    return Sniff(Sniffed.BAD)
                host = _host_of(value.strip())
        if uri_host is not None and host is not None and uri_host != host:
            return Sniff(Sniffed.BAD)
        return Sniff(Sniffed.HTTP, uri_host or host)
    except ValueError:
        return Sniff(Sniffed.BAD)


#: RFC 9110 token characters (a method), and how a request line starts for a lenient server.
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_START = re.compile(_TCHAR + rb"+[ \t]")
#: The one request-line form read: METHOD SP TARGET SP HTTP/1.x (the version in any case).
_REQUEST_LINE = re.compile(_TCHAR + rb"+ [\x21-\x7e]+ [Hh][Tt][Tt][Pp]/1\.[0-9]")
_METHOD_SO_FAR = re.compile(_TCHAR + rb"{0,32}")


def _could_be_request_line(partial: bytes) -> bool:
    """``partial`` (no newline yet) could still become an HTTP request line: a method being
    typed, or a method and a separator (then only the whole line can tell)."""
    return bool(_METHOD_SO_FAR.fullmatch(partial) or _REQUEST_START.match(partial))


def _host_of(authority: str) -> str:
    if "@" in authority:
        raise ValueError("userinfo in authority")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise ValueError("bad IPv6 literal")
        return authority[:close + 1].lower()
    host, sep, port = authority.rpartition(":")
    if sep:
        if not port.isdigit():
            raise ValueError("bad port")
        authority = host
    return _clean_name(authority.encode("latin-1"))


# --------------------------------------------------------------------------- the proxy

@dataclass
class Counts:
    """What enforcement holds open: for the soak and chaos runs' leak counts."""

    enforcements: int = 0
    sockets: int = 0
    connections: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"enforcements": self.enforcements, "sockets": self.sockets,
                "connections": self.connections}


#: Process-wide counts (every :func:`enforce` of this process).
COUNTS = Counts()


def open_counts() -> dict[str, int]:
    """``{"enforcements", "sockets", "connections"}`` open in this process now (all 0 when no VM
    has a network)."""
    return COUNTS.snapshot()


class _RefusalLog:
    """Refusal log lines, at most ``burst`` per ``interval`` seconds; the rest counted and
    summed up in the next line let through."""

    def __init__(self, vm: str, burst: int = LOG_BURST, interval: float = LOG_INTERVAL) -> None:
        self.vm = vm
        self.burst = burst
        self.interval = interval
        self._window = -float("inf")
        self._in_window = 0
        self.suppressed = 0
        self.total = 0

    def refused(self, dest: str, reason: str) -> None:
        self.total += 1
        now = trio.current_time()
        if now - self._window >= self.interval:
            self._window = now
            self._in_window = 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return
        self._in_window += 1
        more = f" ({self.suppressed} more refused before this, not logged)" if self.suppressed else ""
        self.suppressed = 0
        log.info("network: %s: refused a connection to %s: %s%s", self.vm, dest, reason, more)


def original_destination(sock: trio.socket.SocketType) -> tuple[IPv4, int]:
    """Where the guest meant to connect before the redirect (``SO_ORIGINAL_DST``)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = int.from_bytes(raw[2:4], "big")
    return IPv4(raw[4:8]), port


def _reset(stream: trio.SocketStream) -> None:
    """Make closing ``stream`` send a RST (the guest sees "connection refused/reset" at once)."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


_NEVER = [ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")]
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


class EgressProxy:
    """One VM's egress proxy (see the module's docstring for what it lets through)."""

    def __init__(self, policy: PolicyView, resolved: ResolvedAddresses, *, vm: str = "vm",
                 gateway: IPv4 = GATEWAY, prefix: int = PREFIX,
                 max_connections: int = MAX_CONNECTIONS, peek_timeout: float = PEEK_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, loopback_targets: bool = False,
                 counts: Counts | None = None) -> None:
        self.policy = policy
        self.resolved = resolved
        self.gateway = gateway
        self.subnet = ipaddress.IPv4Network(f"{gateway}/{prefix}", strict=False)
        self.max_connections = max_connections
        self.peek_timeout = peek_timeout
        self.connect_timeout = connect_timeout
        self.loopback_targets = loopback_targets
        self.counts = counts if counts is not None else Counts()
        self.refusals = _RefusalLog(vm)
        self.accepted = 0
        self.active = 0

    async def serve(self, listener: trio.SocketListener, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and proxy connections until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and the like: do not spin
                    log.warning("network: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if not isinstance(stream, trio.SocketStream):  # pragma: no cover
                    await stream.aclose()
                    continue
                self.accepted += 1
                if self.active >= self.max_connections:
                    self.refusals.refused("?", f"more than {self.max_connections} connections at once")
                    _reset(stream)
                    await stream.aclose()
                    continue
                self.active += 1
                self.counts.connections += 1
                COUNTS.connections += 1
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                try:
                    ip, port = original_destination(stream.socket)
                except OSError as exc:
                    self.refusals.refused("?", f"no original destination ({exc})")
                    _reset(stream)
                    return
                dest = f"{ip}:{port}"
                target, first, reason = await self._decide(stream, ip, port)
                if target is None:
                    self.refusals.refused(dest, reason)
                    _reset(stream)
                    return
                try:
                    upstream = await _connect(target, self.connect_timeout)
                except (OSError, trio.TooSlowError) as exc:
                    log.info("network: could not connect to %s for a guest: %s", dest, exc or "timeout")
                    _reset(stream)
                    return
                async with upstream:
                    if first:
                        await upstream.send_all(first)
                    await _splice(stream, upstream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.active -= 1
            self.counts.connections -= 1
            COUNTS.connections -= 1

    async def _decide(self, stream: trio.SocketStream, ip: IPv4,
                      port: int) -> tuple[tuple[str, int] | None, bytes, str]:
        """``(target, peeked bytes, reason)``; target None: refused for ``reason``."""
        if ip == self.gateway:
            ports = self.policy.internal_ports()
            if ports is None or port in ports:
                return ("127.0.0.1", port), b"", ""
            return None, b"", f"{INTERNAL_NAME}:{port} is not allowed"
        if ip in self.subnet or ip == self.subnet.broadcast_address or any(ip in n for n in _NEVER):
            return None, b"", "not a destination"
        if ip in _LOOPBACK and not self.loopback_targets:
            return None, b"", f"the host's loopback is reached only as {INTERNAL_NAME}"
        if ip not in _LOOPBACK and is_host_address(ip):
            return None, b"", f"an address of the host itself (reached only as {INTERNAL_NAME})"
        if self.policy.allows_ip_port(ip, port):
            return (str(ip), port), b"", ""
        candidates = [n for n in self.resolved.names_for(ip) if self.policy.allows_name_port(n, port)]
        if not candidates:
            return None, b"", "no allowed rule for this address and port"
        data, found = await self._peek(stream)
        if found.kind in (Sniffed.BAD, Sniffed.MORE):
            what = "malformed" if found.kind is Sniffed.BAD else "incomplete"
            return None, data, f"{what} TLS ClientHello or HTTP request"
        if found.name is not None:
            if not self.policy.allows_name_port(found.name, port):
                return None, data, f"{found.kind.value} names {found.name!r}, which is not allowed"
            if not self.resolved.has(found.name, ip):
                return None, data, f"{found.kind.value} names {found.name!r}, which did not resolve here"
        return (str(ip), port), data, ""

    async def _peek(self, stream: trio.abc.ReceiveStream) -> tuple[bytes, Sniff]:
        data = b""
        found = Sniff(Sniffed.MORE)
        with trio.move_on_after(self.peek_timeout):
            while len(data) < PEEK_LIMIT:
                chunk = await stream.receive_some(PEEK_LIMIT - len(data))
                if not chunk:
                    break
                data += chunk
                found = sniff(data)
                if found.kind is not Sniffed.MORE:
                    return data, found
        if not data:
            return data, Sniff(Sniffed.OTHER)  # nothing sent: a server-speaks-first protocol
        return data, found  # MORE: a TLS or HTTP start that did not complete in time or in bounds


async def _connect(target: tuple[str, int], timeout: float) -> trio.SocketStream:
    """A TCP connection from the daemon's (the host's) namespace to the numeric ``target``: one
    socket, no resolution and no happy-eyeballs machinery (the address is already chosen)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with trio.fail_after(timeout):
            await sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _splice(a: trio.SocketStream, b: trio.SocketStream) -> None:
    """Copy both ways until both directions end; a half-close is passed on as one."""

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, cancel: trio.CancelScope) -> None:
        try:
            while True:
                data = await src.receive_some(SPLICE_BUFFER)
                if not data:
                    break
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            cancel.cancel()  # one side reset: end the other direction too

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, nursery.cancel_scope)
        nursery.start_soon(pump, b, a, nursery.cancel_scope)


# --------------------------------------------------------------------------- enforce()

@dataclass
class Enforcement:
    """A running enforcement (what :func:`enforce` yields)."""

    netns: Netns
    interface: str
    proxy_port: int
    dns: DnsResponder
    proxy: EgressProxy
    resolved: ResolvedAddresses
    counts: Counts = field(default_factory=Counts)


@asynccontextmanager
async def enforce(netns: Netns | int | str | os.PathLike[str], policy: PolicyView, *,
                  interface: str = "tap0", resolver: Resolver | None = None,
                  vm: str = "vm", gateway: IPv4 = GATEWAY, guest: IPv4 = GUEST, prefix: int = PREFIX,
                  max_connections: int = MAX_CONNECTIONS, peek_timeout: float = PEEK_TIMEOUT,
                  connect_timeout: float = CONNECT_TIMEOUT,
                  loopback_targets: bool = False) -> AsyncIterator[Enforcement]:
    """Enforce ``policy`` in ``netns`` for the body of the ``async with``.

    Configures the gateway address on ``interface``, opens the proxy's listener and the DNS
    socket on the gateway inside the namespace, loads :func:`ruleset`, and runs the proxy and the
    DNS responder in its own nursery. On exit, whatever ends it, they are cancelled, the drop-all
    ruleset is restored (shielded, bounded by :data:`TEARDOWN_TIMEOUT`; it may fail if the
    namespace's processes are gone, which fails closed too) and every socket is closed.

    ``loopback_targets`` is for tests, whose stand-ins for outside servers live on the host's
    loopback: it lets name and CIDR rules reach 127.0.0.0/8 (otherwise only the gateway does).
    ``vm`` names the VM in log lines. Raises :class:`NetworkSetupError`.
    """
    ns, owned = as_netns(netns)
    counts = Counts()
    sockets: list[trio.socket.SocketType] = []
    COUNTS.enforcements += 1
    counts.enforcements += 1

    def track(sock: trio.socket.SocketType) -> trio.socket.SocketType:
        sockets.append(sock)
        counts.sockets += 1
        COUNTS.sockets += 1
        return sock

    try:
        await configure_gateway(ns, interface, gateway=gateway, prefix=prefix)
        listen = track(await socket_in_netns(ns, socket.SOCK_STREAM, str(gateway), 0))
        proxy_port = listen.getsockname()[1]
        udp = track(await socket_in_netns(ns, socket.SOCK_DGRAM, str(gateway), DNS_PORT))
        await apply_nft(ns, ruleset(interface, proxy_port, gateway=gateway, guest=guest))
        resolved = ResolvedAddresses()
        dns = DnsResponder(policy, gateway, resolver=resolver, resolved=resolved)
        proxy = EgressProxy(policy, resolved, vm=vm, gateway=gateway, prefix=prefix,
                            max_connections=max_connections, peek_timeout=peek_timeout,
                            connect_timeout=connect_timeout, loopback_targets=loopback_targets,
                            counts=counts)
        enforcement = Enforcement(ns, interface, proxy_port, dns, proxy, resolved, counts)
        async with trio.open_nursery() as nursery:
            await nursery.start(dns.serve, udp)
            await nursery.start(proxy.serve, trio.SocketListener(listen))
            try:
                yield enforcement
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            try:
                if not ns.closed:
                    await apply_nft(ns, drop_all_ruleset(), timeout=TEARDOWN_TIMEOUT)
            except NetworkSetupError as exc:
                log.warning("network: %s: could not restore the drop-all ruleset: %s", vm, exc)
            for sock in sockets:
                sock.close()
                counts.sockets -= 1
                COUNTS.sockets -= 1
            if owned:
                ns.close()
            counts.enforcements -= 1
            COUNTS.enforcements -= 1


__all__ = [
    "COUNTS",
    "GATEWAY",
    "GUEST",
    "Counts",
    "EgressProxy",
    "Enforcement",
    "Sniff",
    "Sniffed",
    "configure_gateway",
    "drop_all_ruleset",
    "enforce",
    "open_counts",
    "original_destination",
    "prepare",
    "ruleset",
    "sniff",
]
