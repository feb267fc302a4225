"""The guest's DNS server: answers the allowed names (resolved on the host) and nothing else.

It listens on the gateway (10.0.2.2:53, UDP) inside the VM's network namespace and never forwards
a query anywhere: a name the policy does not allow gets NXDOMAIN without the host resolver ever
seeing it, so the guest cannot tunnel data through DNS to a server of its choosing (the only
names that reach the host resolver are the allowed ones; a wildcard rule ``*.DOMAIN`` does let
arbitrary subnames of DOMAIN through, to DOMAIN's own servers, which the policy's author chose).

Answers:

- ``A`` for an allowed name: its IPv4 addresses, resolved by the injectable ``resolver`` (default
  :func:`default_resolver`: the host's ``getaddrinfo``, IPv4, bounded), cached briefly;
- ``A`` for ``host.vmcache.internal``: the gateway, when the policy names a port for it;
- ``AAAA`` or any other type for an allowed name: NOERROR with no answer (the guest has no IPv6);
- a name the policy does not allow: NXDOMAIN; a class other than IN: REFUSED;
- a malformed query: FORMERR when its header can be read, else it is dropped.

Every address it answers for a name is recorded in :class:`ResolvedAddresses` (bounded), which the
egress proxy consults: a name rule only lets the guest reach an address our DNS gave it for that
name.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import trio

log = logging.getLogger(__name__)

IPv4 = ipaddress.IPv4Address

#: The name the guest reaches the host's loopback services by.
INTERNAL_NAME = "host.vmcache.internal"

MAX_QUERY = 512
#: Bound on the host resolution of one name.
RESOLVE_TIMEOUT = 5.0
#: How long a resolved name is reused before it is resolved again, and the TTL we answer.
CACHE_TTL = 30.0
CACHE_ENTRIES = 256
#: At most this many addresses in one answer (keeps it under 512 bytes).
MAX_ANSWERS = 16
#: Queries being resolved at once; more are dropped (the guest retries).
MAX_INFLIGHT = 32

TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1

NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

Resolver = Callable[[str], Awaitable[Sequence[IPv4]]]


class PolicyView(Protocol):
    """What the enforcement needs of a network policy (:class:`vmcache.network_policy.NetworkPolicy`
    provides it)."""

    def allows_name(self, name: str) -> bool: ...

    def allows_name_port(self, name: str, port: int) -> bool: ...

    def allows_ip_port(self, ip: ipaddress.IPv4Address, port: int) -> bool: ...

    def internal_ports(self) -> frozenset[int] | None: ...


#: Host lookups running at once, for every VM together and for one VM. They have worker threads
#: of their own, apart from trio's default limiter (the daemon's other thread jobs: run_in_netns,
#: open_tap, cgroups), so a guest flooding lookups of random subnames under a ``*.DOMAIN`` rule
#: cannot starve those, nor take every lookup slot from the other VMs. A lookup that times out is
#: abandoned but keeps its slot until ``getaddrinfo`` returns.
RESOLVE_THREADS = 16
RESOLVE_THREADS_PER_VM = 4
#: How long a failed lookup (no such name, the resolver failing or slow) is answered from the cache.
NEGATIVE_TTL = 5.0

_SHARED_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("vmcache_dns_limiter")


def _shared_limiter() -> trio.CapacityLimiter:
    try:
        return _SHARED_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(RESOLVE_THREADS)
        _SHARED_LIMITER.set(limiter)
        return limiter


class _BothLimiters:
    """A CapacityLimiter-like pair (what ``trio.to_thread.run_sync`` takes): a slot of the VM's
    own limiter and one of the shared one, released together when the thread really ends."""

    def __init__(self, own: trio.CapacityLimiter, shared: trio.CapacityLimiter) -> None:
        self.own = own
        self.shared = shared

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.own.acquire_on_behalf_of(borrower)
        try:
            await self.shared.acquire_on_behalf_of(borrower)
        except BaseException:
            self.own.release_on_behalf_of(borrower)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        self.shared.release_on_behalf_of(borrower)
        self.own.release_on_behalf_of(borrower)


class HostResolver:
    """The host's IPv4 addresses for a name (``getaddrinfo`` in a worker thread), for one VM:
    at most ``per_vm`` lookups of its own and :data:`RESOLVE_THREADS` in all at once, each within
    ``timeout``.

    The name is made absolute (a trailing dot): the host resolver's search list and ndots must
    not turn an allowed ``x.example.com`` into ``x.example.com.corp.internal``, whose address
    would be recorded as the allowed name's."""

    def __init__(self, *, per_vm: int = RESOLVE_THREADS_PER_VM, timeout: float = RESOLVE_TIMEOUT) -> None:
        self._own = trio.CapacityLimiter(per_vm)
        self.timeout = timeout

    async def __call__(self, name: str) -> list[IPv4]:
        limiter = cast(trio.CapacityLimiter, _BothLimiters(self._own, _shared_limiter()))
        with trio.fail_after(self.timeout):
            infos = await trio.to_thread.run_sync(
                socket.getaddrinfo, name.rstrip(".") + ".", None, socket.AF_INET, socket.SOCK_STREAM,
                limiter=limiter, abandon_on_cancel=True)
        out: list[IPv4] = []
        for info in infos:
            addr = IPv4(info[4][0])
            if addr not in out:
                out.append(addr)
        return out


async def default_resolver(name: str) -> list[IPv4]:
    """One host lookup as :class:`HostResolver` makes it (a :class:`DnsResponder` without a
    resolver makes its own HostResolver, so that its VM's lookups are bounded apart)."""
    return await HostResolver()(name)


#: Addresses a name rule never reaches, whatever a name resolves to: "this network", link-local
#: (cloud metadata services at 169.254.169.254), multicast and reserved. (The host's loopback is
#: refused by the egress proxy itself, which tests let reach their stand-in servers there.)
NOT_FOR_NAMES = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def is_host_address(ip: IPv4) -> bool:
    """Whether ``ip`` is an address of this host in the caller's network namespace (a LAN or
    docker0 address, say): the egress proxy connects from the host, so reaching one would reach
    the host's services bound to 0.0.0.0. A scratch socket's ``bind((ip, 0))`` succeeds exactly
    when the address is local; it sends nothing and does not block (a bind is one syscall)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((str(ip), 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def usable_for_names(addrs: Sequence[IPv4]) -> list[IPv4]:
    """``addrs`` without those a name rule must never lead to (:data:`NOT_FOR_NAMES`, the host's
    own addresses): an allowed name whose DNS points at the host or at 169.254.169.254 gives the
    guest nothing there."""
    return [a for a in addrs if not any(a in n for n in NOT_FOR_NAMES)
            and (a in _LOOPBACK or not is_host_address(a))]


class ResolvedAddresses:
    """Which addresses our DNS answered for which names: the proxy's resolved-IP sets.

    Bounded: at most ``max_names`` names (the least recently answered is forgotten first) and
    ``max_per_name`` addresses each (the oldest first). Entries do not expire with the DNS TTL: a
    guest may keep using an address it was given; it only ever holds addresses the policy's names
    resolved to.
    """

    def __init__(self, *, max_names: int = 1024, max_per_name: int = 32) -> None:
        self._names: OrderedDict[str, OrderedDict[IPv4, None]] = OrderedDict()
        self._max_names = max_names
        self._max_per_name = max_per_name

    def record(self, name: str, addrs: Sequence[IPv4]) -> None:
        entry = self._names.pop(name, None)
        if entry is None:
            entry = OrderedDict()
        for addr in addrs:
            entry.pop(addr, None)
            entry[addr] = None
        while len(entry) > self._max_per_name:
            entry.popitem(last=False)
        self._names[name] = entry
        while len(self._names) > self._max_names:
            self._names.popitem(last=False)

    def has(self, name: str, addr: IPv4) -> bool:
        entry = self._names.get(name)
        return entry is not None and addr in entry

    def names_for(self, addr: IPv4) -> list[str]:
        return [name for name, entry in self._names.items() if addr in entry]

    def __len__(self) -> int:
        return len(self._names)


class MalformedQuery(Exception):
    """A query we cannot answer; ``header`` is set when a FORMERR can still be sent."""

    def __init__(self, reason: str, header: bytes | None = None) -> None:
        super().__init__(reason)
        self.header = header


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    #: The question as it was on the wire (echoed in the answer).
    question: bytes
    #: ``name`` is made of letters, digits, ``-`` and ``_`` labels only.
    plain: bool


def parse_query(data: bytes) -> Query:
    """The one question of a standard query; :class:`MalformedQuery` for anything else.

    Compression pointers in the question are refused (no sane client sends them there), so the
    parser never follows a pointer and cannot loop.
    """
    if len(data) < 12:
        raise MalformedQuery("shorter than a DNS header")
    if len(data) > MAX_QUERY:
        raise MalformedQuery("longer than 512 bytes", data[:12])
    ident, flags, qdcount, ancount, nscount, _arcount = struct.unpack("!6H", data[:12])
    header = data[:12]
    if flags & 0x8000:
        raise MalformedQuery("a response, not a query")  # never answer answers: no loops
    if (flags >> 11) & 0xF != 0:
        raise MalformedQuery("not a standard query", header)
    if qdcount != 1 or ancount or nscount:
        raise MalformedQuery("not exactly one question", header)
    pos = 12
    labels: list[bytes] = []
    total = 0
    while True:
        if pos >= len(data):
            raise MalformedQuery("truncated name", header)
        length = data[pos]
        if length & 0xC0:
            raise MalformedQuery("compression pointer or reserved label type in the question", header)
        pos += 1
        if length == 0:
            break
        if pos + length > len(data):
            raise MalformedQuery("truncated label", header)
        total += length + 1
        if total > 254:
            raise MalformedQuery("name longer than 255 bytes", header)
        labels.append(data[pos:pos + length])
        pos += length
    if pos + 4 > len(data):
        raise MalformedQuery("truncated question", header)
    qtype, qclass = struct.unpack("!HH", data[pos:pos + 4])
    question = data[12:pos + 4]
    plain = all(label and all(c in _LDH for c in label) for label in labels)
    name = b".".join(labels).decode("latin-1").lower()
    return Query(ident, flags, name, qtype, qclass, question, plain)


_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def build_response(query: Query, rcode: int, addrs: Sequence[IPv4] = (), *, ttl: int = 30) -> bytes:
    """The answer to ``query``: authoritative, recursion "available", ``addrs`` as A records."""
    addrs = list(addrs)[:MAX_ANSWERS]
    flags = 0x8000 | 0x0400 | (query.flags & 0x0100) | 0x0080 | (rcode & 0xF)
    out = [struct.pack("!6H", query.id, flags, 1, len(addrs), 0, 0), query.question]
    for addr in addrs:
        out.append(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4) + addr.packed)
    return b"".join(out)


def formerr(header: bytes) -> bytes:
    ident, flags = struct.unpack("!HH", header[:4])
    return struct.pack("!6H", ident, 0x8000 | (flags & 0x7900) | FORMERR, 0, 0, 0, 0)


class DnsResponder:
    """Answers one VM's DNS queries by its policy (see the module's docstring)."""

    def __init__(self, policy: PolicyView, gateway: IPv4, *, resolver: Resolver | None = None,
                 resolved: ResolvedAddresses | None = None, resolve_timeout: float = RESOLVE_TIMEOUT,
                 cache_ttl: float = CACHE_TTL, cache_entries: int = CACHE_ENTRIES,
                 max_inflight: int = MAX_INFLIGHT) -> None:
        self.policy = policy
        self.gateway = gateway
        self.resolver: Resolver = resolver if resolver is not None else HostResolver(timeout=resolve_timeout)
        self.resolved = resolved if resolved is not None else ResolvedAddresses()
        self.resolve_timeout = resolve_timeout
        self.cache_ttl = cache_ttl
        self.cache_entries = cache_entries
        #: name -> (expiry, addresses; None: the lookup failed, answered SERVFAIL until expiry).
        self._cache: OrderedDict[str, tuple[float, list[IPv4] | None]] = OrderedDict()
        #: Lookups under way: a second query of the same name waits for the first's.
        self._pending: dict[str, trio.Event] = {}
        self._inflight = trio.Semaphore(max_inflight)
        #: Counts for tests and Status: queries answered / dropped.
        self.answered = 0
        self.dropped = 0

    async def answer(self, data: bytes) -> bytes | None:
        """The response to the datagram ``data`` (None: drop it)."""
        try:
            query = parse_query(data)
        except MalformedQuery as exc:
            return formerr(exc.header) if exc.header is not None else None
        if query.qclass != CLASS_IN:
            return build_response(query, REFUSED)
        name = query.name.rstrip(".")
        if not query.plain or not name:
            return build_response(query, NXDOMAIN)
        if name == INTERNAL_NAME:
            if self.policy.internal_ports() == frozenset():
                return build_response(query, NXDOMAIN)
            if query.qtype != TYPE_A:
                return build_response(query, NOERROR)
            return build_response(query, NOERROR, [self.gateway], ttl=int(self.cache_ttl))
        if name.endswith(".vmcache.internal") or name == "vmcache.internal" \
                or not self.policy.allows_name(name):
            return build_response(query, NXDOMAIN)  # names under vmcache.internal are ours alone
        if query.qtype != TYPE_A:
            return build_response(query, NOERROR)
        addrs = await self._resolve(name)
        if addrs is None:
            return build_response(query, SERVFAIL)
        addrs = addrs[:MAX_ANSWERS]
        if not addrs:
            return build_response(query, NXDOMAIN)
        self.resolved.record(name, addrs)
        return build_response(query, NOERROR, addrs, ttl=max(1, int(self.cache_ttl)))

    async def _resolve(self, name: str) -> list[IPv4] | None:
        hit = self._cache.get(name)
        if hit is not None and hit[0] > trio.current_time():
            return hit[1]
        pending = self._pending.get(name)
        if pending is not None:  # merged with the lookup under way
            with trio.move_on_after(self.resolve_timeout):
                await pending.wait()
            hit = self._cache.get(name)
            return hit[1] if hit is not None and hit[0] > trio.current_time() else None
        done = self._pending[name] = trio.Event()
        try:
            addrs: list[IPv4] | None
            try:
                with trio.fail_after(self.resolve_timeout):
                    found = await self.resolver(name)
            except (OSError, trio.TooSlowError) as exc:
                log.info("DNS: could not resolve the allowed name %s on the host: %s", name, exc or "timeout")
                addrs, ttl = None, NEGATIVE_TTL
            else:
                addrs = usable_for_names([IPv4(a) for a in found if isinstance(a, IPv4)])
                ttl = self.cache_ttl if addrs else min(self.cache_ttl, NEGATIVE_TTL)
            self._cache.pop(name, None)
            self._cache[name] = (trio.current_time() + ttl, addrs)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
            return addrs
        finally:
            del self._pending[name]
            done.set()

    async def serve(self, sock: trio.socket.SocketType, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer datagrams on ``sock`` until cancelled (each in its own bounded task)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    data, peer = await sock.recvfrom(MAX_QUERY + 1)
                except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error: keep going
                    log.debug("DNS: recvfrom: %s", exc)
                    await trio.sleep(0.01)  # not a busy loop if the error persists
                    continue
                try:
                    self._inflight.acquire_nowait()
                except trio.WouldBlock:
                    self.dropped += 1
                    continue
                nursery.start_soon(self._one, sock, data, peer)

    async def _one(self, sock: trio.socket.SocketType, data: bytes, peer: tuple[object, ...]) -> None:
        try:
            reply = await self.answer(data)
            if reply is None:
                self.dropped += 1
                return
            self.answered += 1
            try:
                await sock.sendto(reply, peer)
            except OSError as exc:
                log.debug("DNS: sendto: %s", exc)
        finally:
            self._inflight.release()


__all__ = [
    "INTERNAL_NAME",
    "DnsResponder",
    "HostResolver",
    "MalformedQuery",
    "PolicyView",
    "Query",
    "ResolvedAddresses",
    "Resolver",
    "build_response",
    "default_resolver",
    "is_host_address",
    "parse_query",
    "usable_for_names",
]
