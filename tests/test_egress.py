"""Host-side enforcement of a guest network policy, without QEMU: a "vm" namespace (where the
ruleset, the proxy's listener and the DNS responder live, as in QEMU's) and a hostile "guest"
namespace joined by a veth, servers on the host's loopback, a fake resolver. Every packet stays in
those namespaces and on the host's loopback; no real DNS is ever asked.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from netns_pair import (
    VM_MAC,
    FakePolicy,
    FakeResolver,
    Pair,
    Permissive,
    Server,
    exchange,
    guest_connect,
    guest_socket,
    in_ns,
    netns_pair,
)

from vmcache import NetworkSetupError
from vmcache.dns_host import (
    FORMERR,
    NOERROR,
    NXDOMAIN,
    RESOLVE_THREADS_PER_VM,
    SERVFAIL,
    DnsResponder,
    MalformedQuery,
    ResolvedAddresses,
    default_resolver,
    is_host_address,
    parse_query,
)
from vmcache.egress import (
    MAX_TRACKED_FLOWS,
    NEW_FLOWS_PER_SECOND,
    EgressProxy,
    Sniffed,
    _RefusalLog,
    drop_all_ruleset,
    enforce,
    open_counts,
    prepare,
    ruleset,
    sniff,
)
from vmcache.netns import Netns, list_nft, run_in_netns
from vmcache.network_policy import NetworkPolicy

IPv4 = ipaddress.IPv4Address

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("nsenter") is None,
    reason="needs root, nft and nsenter (network namespaces)",
)


# --------------------------------------------------------------------------- helpers

def dns_query(name: str, qtype: int = 1, *, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return struct.pack("!6H", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def dns_answer(reply: bytes) -> tuple[int, list[str]]:
    """(rcode, the A records' addresses) of a response to one of our queries."""
    _ident, flags, _qd, ancount, _ns, _ar = struct.unpack("!6H", reply[:12])
    pos = 12
    while reply[pos]:
        pos += 1 + reply[pos]
    pos += 5
    addrs = []
    for _ in range(ancount):
        _ptr, rtype, _cls, _ttl, rdlen = struct.unpack("!HHHIH", reply[pos:pos + 12])
        pos += 12
        if rtype == 1:
            addrs.append(socket.inet_ntoa(reply[pos:pos + 4]))
        pos += rdlen
    return flags & 0xF, addrs


async def guest_dns(pair: Pair, query: bytes, server: str = "10.0.2.2", port: int = 53,
                    timeout: float = 1.0) -> bytes | None:
    sock = await guest_socket(pair, kind=socket.SOCK_DGRAM)
    with sock:
        await sock.sendto(query, (server, port))
        with trio.move_on_after(timeout):
            return await sock.recv(4096)
    return None


def client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def http_get(host: str | None, target: str = "/") -> bytes:
    head = f"GET {target} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host else "") + "\r\n"
    return head.encode()


@pytest.fixture
def pair() -> Iterator[Pair]:
    with netns_pair() as made:
        yield made
    assert not os.path.exists(f"/run/netns/{made.vm_name}")


def resolver() -> FakeResolver:
    return FakeResolver({"allowed.test": ["127.0.0.2"], "other.test": ["127.0.0.3"],
                         "evil.test": ["127.0.0.5"], "third.test": ["127.0.0.7"],
                         "shared.test": ["127.0.0.2"]})


# --------------------------------------------------------------------------- pure units

def test_parse_query_refuses_what_it_cannot_answer() -> None:
    query = parse_query(dns_query("Allowed.Test"))
    assert (query.name, query.qtype, query.plain) == ("allowed.test", 1, True)
    with pytest.raises(MalformedQuery):
        parse_query(b"\x12\x34")
    pointer = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1)
    with pytest.raises(MalformedQuery) as info:
        parse_query(pointer)
    assert info.value.header is not None  # FORMERR, not a loop
    with pytest.raises(MalformedQuery):  # two questions
        parse_query(struct.pack("!6H", 1, 0x0100, 2, 0, 0, 0) + b"\x01a\0\0\x01\0\x01" * 2)
    with pytest.raises(MalformedQuery):  # a response: never answered
        parse_query(struct.pack("!6H", 1, 0x8100, 1, 0, 0, 0) + b"\x01a\0\0\x01\0\x01")
    assert not parse_query(dns_query("a\x00b.test")).plain


async def test_dns_responder_answers_only_allowed_names() -> None:
    fake = resolver()
    policy = FakePolicy(names={"allowed.test": None}, internal=frozenset({8080}))
    dns = DnsResponder(policy, IPv4("10.0.2.2"), resolver=fake)

    async def ask(name: str, qtype: int = 1) -> tuple[int, list[str]]:
        reply = await dns.answer(dns_query(name, qtype))
        assert reply is not None
        return dns_answer(reply)

    assert await ask("allowed.test") == (NOERROR, ["127.0.0.2"])
    assert await ask("ALLOWED.test.") == (NOERROR, ["127.0.0.2"])
    assert await ask("host.vmcache.internal") == (NOERROR, ["10.0.2.2"])
    assert await ask("allowed.test", 28) == (NOERROR, [])  # AAAA
    assert await ask("allowed.test", 16) == (NOERROR, [])  # TXT
    assert await ask("evil.test") == (NXDOMAIN, [])
    assert await ask("x" * 63 + "." + "y" * 63 + ".evil.test", 16) == (NXDOMAIN, [])
    assert fake.asked == ["allowed.test"]  # cached; nothing else ever left
    assert dns.resolved.names_for(IPv4("127.0.0.2")) == ["allowed.test"]
    garbage = await dns.answer(b"\x12\x34\x01\x00" + b"\xff" * 28)
    assert await dns.answer(b"\x12\x34" + b"\xff" * 30) is None  # a "response": never answered
    assert garbage is not None and garbage[3] & 0xF == FORMERR
    closed = DnsResponder(FakePolicy(internal=frozenset()), IPv4("10.0.2.2"), resolver=fake)
    reply = await closed.answer(dns_query("host.vmcache.internal"))
    assert reply is not None and dns_answer(reply) == (NXDOMAIN, [])


def host_addresses() -> list[IPv4]:
    """The host's own IPv4 addresses (read only: nothing is sent to them)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], check=True, capture_output=True,
                         text=True, timeout=10).stdout
    return [IPv4(line.split()[3].split("/")[0]) for line in out.splitlines()]


def test_is_host_address_knows_the_hosts_own_addresses() -> None:
    own = host_addresses()
    assert IPv4("127.0.0.1") in own
    for ip in own:
        assert is_host_address(ip), ip
    assert IPv4("198.51.100.7") not in own
    assert not is_host_address(IPv4("198.51.100.7"))


async def test_the_proxy_never_connects_to_the_host_itself_or_link_local() -> None:
    """A CIDR as wide as 0.0.0.0/0 would otherwise let the guest reach, through the daemon's
    connection from the host, any host service bound to 0.0.0.0 on a LAN or docker0 address.
    Decided without connecting: no packet goes anywhere."""
    policy = NetworkPolicy.parse("restricted", ["0.0.0.0/0:22"])
    proxy = EgressProxy(policy, ResolvedAddresses())
    stream: trio.SocketStream = None  # type: ignore[assignment]  # a CIDR decision never reads it
    for ip in [*(a for a in host_addresses() if a not in ipaddress.IPv4Network("127.0.0.0/8")),
               IPv4("169.254.169.254")]:
        target, _, reason = await proxy._decide(stream, ip, 22)
        assert target is None, ip
        assert reason
    target, _, _ = await proxy._decide(stream, IPv4("198.51.100.7"), 22)
    assert target == ("198.51.100.7", 22)  # the control: an outside address is allowed


async def test_dns_answers_drop_host_and_link_local_addresses() -> None:
    own = [a for a in host_addresses() if a not in ipaddress.IPv4Network("127.0.0.0/8")]
    fake = FakeResolver({"meta.test": ["169.254.169.254", *map(str, own), "198.51.100.7"],
                         "only-host.test": ["169.254.169.254", "0.0.0.1"]})
    dns = DnsResponder(FakePolicy(names={"meta.test": None, "only-host.test": None}),
                       IPv4("10.0.2.2"), resolver=fake)
    reply = await dns.answer(dns_query("meta.test"))
    assert reply is not None and dns_answer(reply) == (NOERROR, ["198.51.100.7"])
    reply = await dns.answer(dns_query("only-host.test"))
    assert reply is not None and dns_answer(reply) == (NXDOMAIN, [])
    assert dns.resolved.names_for(IPv4("169.254.169.254")) == []


async def test_the_host_resolver_is_asked_for_the_absolute_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """No search list may turn an allowed name into another: the lookup is for ``name.``."""
    asked: list[str] = []

    def fake_getaddrinfo(host: str, *args: object, **kwargs: object) -> list[object]:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("198.51.100.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert await default_resolver("x.example.test") == [IPv4("198.51.100.7")]
    assert asked == ["x.example.test."]


async def test_a_dns_flood_never_takes_the_daemons_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest asking for many random subnames at once (a ``*.DOMAIN`` rule) gets at most
    RESOLVE_THREADS_PER_VM host lookups, none from trio's default thread limiter (the daemon's
    other thread jobs), and a hung lookup's slot is not handed to the next one."""
    release = threading.Event()
    running: list[str] = []

    def hung_getaddrinfo(host: str, *args: object, **kwargs: object) -> list[object]:
        running.append(host)
        release.wait(30)
        raise socket.gaierror("no such name")

    monkeypatch.setattr(socket, "getaddrinfo", hung_getaddrinfo)
    dns = DnsResponder(FakePolicy(names={f"n{i}.test": None for i in range(20)}), IPv4("10.0.2.2"),
                       resolve_timeout=1.0)
    default = trio.to_thread.current_default_thread_limiter()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(dns.answer, dns_query(f"n{i}.test"))
                await trio.sleep(0.3)
                assert default.borrowed_tokens == 0
                assert len(running) == RESOLVE_THREADS_PER_VM
        assert len(running) == RESOLVE_THREADS_PER_VM  # timed out; the hung threads keep their slots
        reply = await dns.answer(dns_query("n0.test"))  # a failure is answered from the cache
        assert reply is not None and reply[3] & 0xF == SERVFAIL
        assert len(running) == RESOLVE_THREADS_PER_VM
    finally:
        release.set()


async def test_simultaneous_queries_of_one_name_are_one_lookup() -> None:
    gate = trio.Event()
    asked: list[str] = []

    async def slow(name: str) -> list[IPv4]:
        asked.append(name)
        await gate.wait()
        return [IPv4("198.51.100.7")]

    dns = DnsResponder(FakePolicy(names={"a.test": None}), IPv4("10.0.2.2"), resolver=slow)
    replies: list[bytes | None] = []

    async def ask() -> None:
        replies.append(await dns.answer(dns_query("a.test")))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert asked == ["a.test"]
    assert [dns_answer(r) for r in replies if r is not None] == [(NOERROR, ["198.51.100.7"])] * 5


async def test_names_under_vmcache_internal_never_reach_the_host_resolver() -> None:
    fake = resolver()
    policy = FakePolicy(names={"foo.vmcache.internal": None, "vmcache.internal": None},
                        internal=frozenset({8080}))
    dns = DnsResponder(policy, IPv4("10.0.2.2"), resolver=fake)
    for name in ("foo.vmcache.internal", "vmcache.internal"):
        reply = await dns.answer(dns_query(name))
        assert reply is not None and dns_answer(reply) == (NXDOMAIN, [])
    assert fake.asked == []


def test_resolved_addresses_are_bounded() -> None:
    resolved = ResolvedAddresses(max_names=3, max_per_name=2)
    for i in range(5):
        resolved.record(f"n{i}.test", [IPv4(f"127.0.1.{i}"), IPv4("127.0.2.1"), IPv4(f"127.0.3.{i}")])
    assert len(resolved) == 3
    assert not resolved.has("n0.test", IPv4("127.0.2.1"))
    assert resolved.has("n4.test", IPv4("127.0.3.4")) and not resolved.has("n4.test", IPv4("127.0.1.4"))


def test_sniff_reads_sni_and_host() -> None:
    hello = client_hello("allowed.test")
    assert sniff(hello).kind is Sniffed.TLS and sniff(hello).name == "allowed.test"
    assert sniff(hello[:40]).kind is Sniffed.MORE
    assert sniff(client_hello(None)).name is None
    assert sniff(http_get("Allowed.Test:8080")).name == "allowed.test"
    assert sniff(http_get(None)).kind is Sniffed.HTTP and sniff(http_get(None)).name is None
    assert sniff(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").kind is Sniffed.BAD
    assert sniff(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n").kind is Sniffed.BAD
    assert sniff(http_get("allowed.test", "http://other.test/")).kind is Sniffed.BAD
    assert sniff(http_get(None, "http://other.test/")).name == "other.test"
    assert sniff(b"GE").kind is Sniffed.MORE
    assert sniff(b"GET /x HT").kind is Sniffed.MORE
    # what a lenient server would read as a request for other.test is a request for other.test
    assert sniff(b"get / http/1.1\r\nhost: other.test\r\n\r\n").name == "other.test"
    assert sniff(b"\r\n\r\nGET / HTTP/1.1\r\nHost: other.test\r\n\r\n").name == "other.test"
    assert sniff(b"GET / HTTP/1.1\r\nX: y\nHost: other.test\r\n\r\n").kind is Sniffed.BAD
    assert sniff(b"GET / HTTP/1.1\r\nHost: a\r\n x\r\n\r\n").kind is Sniffed.BAD
    assert sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").kind is Sniffed.BAD
    assert sniff(b"SET key value\r\n").kind is Sniffed.OTHER  # a line protocol is not HTTP
    assert sniff(b"PING").kind is Sniffed.MORE and sniff(b"PING\r\n").kind is Sniffed.OTHER
    assert sniff(b"SSH-2.0-x\r\n").kind is Sniffed.OTHER
    assert sniff(b"\x00\x01binary").kind is Sniffed.OTHER


@pytest.mark.parametrize("line", [
    b"GET  / HTTP/1.1",            # two spaces: nginx skips them and reads the Host
    b"GET / HTTP/1.1 ",            # a trailing space
    b"GET\t/\tHTTP/1.1",           # tabs as separators
    b"GET /  HTTP/1.1",
    b"VERSION-CONTROL / HTTP/1.1", # a method with - (a token, not letters only) ...
    b"M_SEARCH / HTTP/1.1",        # ... or _
])
def test_a_request_line_a_lenient_server_accepts_is_never_waved_through(line: bytes) -> None:
    """Any first line a server could take for a request naming another virtual host on the
    allowed address is either read exactly (its Host checked) or refused: never "another
    protocol", which passes without a name check."""
    head = line + b"\r\nHost: other-vhost.test\r\n\r\n"
    found = sniff(head)
    assert found.kind is Sniffed.BAD or found.name == "other-vhost.test", found
    for cut in range(1, len(line)):  # arriving in pieces changes nothing
        assert sniff(head[:cut]).kind is Sniffed.MORE, head[:cut]
    assert sniff(b"VERSION-CONTROL / HTTP/1.1\r\nHost: x.test\r\n\r\n").name == "x.test"
    assert sniff(b"GET /" + b"a" * 9000).kind is Sniffed.BAD  # too long a line to read


async def test_a_hung_host_resolver_is_servfail_in_bounded_time(autojump_clock: trio.abc.Clock) -> None:
    async def hang(name: str) -> list[IPv4]:
        await trio.sleep_forever()
        raise AssertionError

    dns = DnsResponder(FakePolicy(names={"allowed.test": None}), IPv4("10.0.2.2"), resolver=hang,
                       resolve_timeout=5)
    start = trio.current_time()
    reply = await dns.answer(dns_query("allowed.test"))
    assert reply is not None and dns_answer(reply) == (SERVFAIL, [])
    assert trio.current_time() - start == pytest.approx(5)
    assert len(dns.resolved) == 0


async def test_peek_is_bounded_in_time_and_bytes(autojump_clock: trio.abc.Clock) -> None:
    proxy = EgressProxy(FakePolicy(), ResolvedAddresses(), peek_timeout=5)

    async def peek(data: bytes, *, close: bool = False) -> tuple[bytes, Sniffed, float]:
        send, receive = trio.testing.memory_stream_pair()
        await send.send_all(data)
        if close:
            await send.aclose()
        start = trio.current_time()
        got, found = await proxy._peek(receive)
        return got, found.kind, round(trio.current_time() - start, 6)

    assert await peek(b"") == (b"", Sniffed.OTHER, 5.0)  # a server-speaks-first protocol
    hello = client_hello("allowed.test")
    assert (await peek(hello[:50]))[1:] == (Sniffed.MORE, 5.0)  # incomplete: refused
    assert (await peek(hello))[1:] == (Sniffed.TLS, 0.0)
    endless = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 40_000
    got, kind, elapsed = await peek(endless)
    assert len(got) == 16 * 1024 and kind is Sniffed.MORE and elapsed < 5


async def test_refusal_lines_are_rate_limited(autojump_clock: trio.abc.Clock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    refusals = _RefusalLog("vm-1", burst=3, interval=10)
    with caplog.at_level(logging.INFO, logger="vmcache.egress"):
        for _ in range(100):
            refusals.refused("127.0.0.9:1", "no allowed rule")
        await trio.sleep(10)
        refusals.refused("127.0.0.9:1", "no allowed rule")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and refusals.total == 101
    assert "97 more refused before this" in lines[-1]


def test_parsers_survive_garbage() -> None:
    """Whatever a guest sends, the DNS parser raises only MalformedQuery and the sniffer only
    classifies: no other exception, no loop."""
    rng = random.Random(18)
    hello = client_hello("allowed.test")
    seeds = [dns_query("allowed.test"), hello, http_get("allowed.test")]
    for _ in range(3000):
        seed = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 8)):
            seed[rng.randrange(len(seed))] = rng.randrange(256)
        data = bytes(seed[:rng.randrange(len(seed) + 1)])
        try:
            parse_query(data)
        except MalformedQuery:
            pass
        assert sniff(data).kind in Sniffed


def test_rulesets_are_what_nft_loads() -> None:
    text = ruleset("tap0", 4321)
    assert "redirect to :4321" in text and "meta nfproto != ipv4 drop" in text
    assert "udp dport 53" in text and "ip saddr != 10.0.2.15 drop" in text
    assert "redirect" not in drop_all_ruleset()
    with pytest.raises(NetworkSetupError):
        ruleset('tap0" accept', 1)


# --------------------------------------------------------------------------- netns helpers

@needs_root
async def test_run_in_netns_always_restores_the_thread(pair: Pair) -> None:
    def here() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    host = os.stat("/proc/self/ns/net").st_ino
    vm = os.fstat(pair.vm.fd).st_ino
    assert host != vm

    def boom() -> None:
        raise RuntimeError("inside")

    for _ in range(20):
        assert await run_in_netns(pair.vm, here) == vm
        with pytest.raises(RuntimeError):
            await run_in_netns(pair.vm, boom)
        assert await trio.to_thread.run_sync(here) == host  # the cached thread is back home
    with pytest.raises(NetworkSetupError):
        Netns("/proc/self/ns/definitely-not")


# --------------------------------------------------------------------------- hostile guest: packets

async def probes(pair: Pair) -> dict[str, bool]:
    """Send each forbidden kind of packet from the guest at a bait in the vm namespace; which
    baits got something."""
    subprocess_ip = ["ip", "-n", pair.vm_name]
    await trio.run_process([*subprocess_ip, "addr", "add", "10.0.2.3/24", "dev", "tap0"], check=False)
    await trio.run_process([*subprocess_ip, "-6", "addr", "add", "fd00:2::2/64", "dev", "tap0", "nodad"],
                           check=False)
    await trio.run_process(["ip", "-n", pair.guest_name, "-6", "addr", "add", "fd00:2::15/64", "dev",
                            "eth0", "nodad"], check=False)

    def bait(family: int, kind: int, addr: tuple[str, int]) -> socket.socket:
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND (IPv6 too): the v6 address may be tentative
        sock.bind(addr)
        if kind == socket.SOCK_STREAM:
            sock.listen()
        sock.setblocking(False)
        return sock

    baits = {
        "udp": (socket.AF_INET, socket.SOCK_DGRAM, ("10.0.2.2", 9999)),
        "other resolver": (socket.AF_INET, socket.SOCK_DGRAM, ("10.0.2.3", 53)),
        "ipv6 udp": (socket.AF_INET6, socket.SOCK_DGRAM, ("fd00:2::2", 9999)),
        "forged udp": (socket.AF_INET, socket.SOCK_DGRAM, ("10.0.2.2", 9998)),
        "ipv6 tcp": (socket.AF_INET6, socket.SOCK_STREAM, ("fd00:2::2", 9997)),
    }
    socks = {key: trio.socket.from_stdlib_socket(await in_ns(pair.vm, lambda v=v: bait(*v)))  # type: ignore[misc]
             for key, v in baits.items()}
    got = dict.fromkeys([*baits, "icmp"], False)
    try:
        udp = await guest_socket(pair, kind=socket.SOCK_DGRAM)
        with udp:
            await udp.sendto(b"x", ("10.0.2.2", 9999))
            await udp.sendto(dns_query("allowed.test"), ("10.0.2.3", 53))
        udp6 = await guest_socket(pair, socket.AF_INET6, socket.SOCK_DGRAM)
        with udp6:
            await udp6.sendto(b"x", ("fd00:2::2", 9999))
        raw = await guest_socket(pair, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with raw:
            await raw.sendto(forged_udp("10.0.2.99", "10.0.2.2", 9998, b"forged"), ("10.0.2.2", 0))
        icmp = await guest_socket(pair, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        tcp6 = await guest_socket(pair, socket.AF_INET6, socket.SOCK_STREAM)
        with icmp, tcp6:
            echo = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + b"ping"
            await icmp.sendto(echo[:2] + struct.pack("!H", _checksum(echo)) + echo[4:], ("10.0.2.2", 0))
            with trio.move_on_after(1.0):
                async with trio.open_nursery() as nursery:
                    async def tcp6_connect() -> None:
                        try:
                            await tcp6.connect(("fd00:2::2", 9997))
                            got["ipv6 tcp"] = True
                        except OSError:
                            pass

                    async def icmp_reply() -> None:
                        while True:
                            data = await icmp.recv(1024)
                            if data[20] == 0:  # echo reply
                                got["icmp"] = True
                                return

                    nursery.start_soon(tcp6_connect)
                    nursery.start_soon(icmp_reply)
                    for key, sock in socks.items():
                        if key != "ipv6 tcp":
                            async def recv(key: str = key, sock: trio.socket.SocketType = sock) -> None:
                                await sock.recv(1024)
                                got[key] = True
                            nursery.start_soon(recv)
    finally:
        for sock in socks.values():
            sock.close()
    return got


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def forged_udp(src: str, dst: str, port: int, payload: bytes) -> bytes:
    udp_len = 8 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + struct.pack("!HHHH", 40000, port, udp_len, 0) + payload


@needs_root
async def test_control_without_enforcement_the_guest_reaches_every_bait(pair: Pair) -> None:
    """The probes work: with no ruleset every one of them gets through to its bait."""
    await trio.run_process(["ip", "-n", pair.vm_name, "addr", "add", "10.0.2.2/24", "dev", "tap0"])
    await trio.run_process(["ip", "-n", pair.vm_name, "link", "set", "tap0", "up"])
    with trio.fail_after(20):
        got = await probes(pair)
    assert all(got.values()), got


@needs_root
async def test_hostile_packets_are_dropped(pair: Pair) -> None:
    """UDP, another resolver, IPv6 (UDP and TCP), ICMP and a raw forged-source packet: nothing
    reaches its bait, and a forged-source DNS query is not answered."""
    fake = resolver()
    policy = FakePolicy(names={"allowed.test": None}, internal=None)
    with trio.fail_after(30):
        async with enforce(pair.vm, policy, resolver=fake, loopback_targets=True) as enf:
            got = await probes(pair)
            assert not any(got.values()), got
            raw = await guest_socket(pair, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            with raw:
                await raw.sendto(forged_udp("10.0.2.99", "10.0.2.2", 53, dns_query("allowed.test")),
                                 ("10.0.2.2", 0))
            reply = await guest_dns(pair, dns_query("allowed.test"))  # after the forged one
            assert reply is not None and dns_answer(reply) == (NOERROR, ["127.0.0.2"])
            assert enf.dns.answered == 1  # the forged query never arrived


# --------------------------------------------------------------------------- hostile guest: DNS

@needs_root
async def test_guest_dns_answers_allowed_names_only(pair: Pair) -> None:
    fake = resolver()
    policy = FakePolicy(names={"allowed.test": frozenset({80})}, internal=frozenset({8080}))
    with trio.fail_after(30):
        async with enforce(pair.vm, policy, resolver=fake, loopback_targets=True):
            async def ask(name: str, qtype: int = 1) -> tuple[int, list[str]]:
                reply = await guest_dns(pair, dns_query(name, qtype))
                assert reply is not None
                return dns_answer(reply)

            assert await ask("host.vmcache.internal") == (NOERROR, ["10.0.2.2"])
            assert await ask("allowed.test") == (NOERROR, ["127.0.0.2"])
            assert await ask("allowed.test", 28) == (NOERROR, [])
            assert await ask("allowed.test", 16) == (NOERROR, [])
            assert await ask("evil.test") == (NXDOMAIN, [])
            tunnel = ".".join(["a" * 63] * 3) + ".evil.test"
            assert await ask(tunnel, 16) == (NXDOMAIN, [])
            assert await guest_dns(pair, b"\x00" * 3) is None  # not even a header: dropped
            assert fake.asked == ["allowed.test"]  # nothing else ever reached a resolver
            # DNS over TCP is a TCP connection like any other: refused
            assert await exchange(pair, "10.0.2.2", 53, b"\x00\x1d" + dns_query("evil.test")) is None


@needs_root
async def test_a_guest_cannot_fill_its_namespaces_conntrack_table(pair: Pair) -> None:
    """Each datagram to :53 from a new source port is a new tracked flow; a guest sending many
    gets only a bounded number tracked (the rest are dropped before their entry is confirmed)."""
    query = dns_query("host.vmcache.internal")

    def flood() -> None:
        for _ in range(1500):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(query, ("10.0.2.2", 53))

    def tracked() -> int:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
            return int(f.read())

    with trio.fail_after(60):
        async with enforce(pair.vm, FakePolicy(internal=frozenset({8080})), resolver=resolver(),
                           loopback_targets=True):
            await run_in_netns(pair.guest, flood)
            count = await run_in_netns(pair.vm, tracked)
    assert 10 <= count <= 2 * NEW_FLOWS_PER_SECOND + 100, count
    assert count <= MAX_TRACKED_FLOWS


# --------------------------------------------------------------------------- hostile guest: TCP




@needs_root
async def test_proxy_lets_through_the_allowlist_and_nothing_else(pair: Pair) -> None:
    servers = {label: Server(label, host) for label, host in [
        ("internal", "127.0.0.1"), ("internal-closed", "127.0.0.1"), ("allowed", "127.0.0.2"),
        ("other", "127.0.0.3"), ("cidr", "127.0.0.4"), ("cidr-other", "127.0.0.4"), ("never", "127.0.0.5"),
        ("unresolved", "127.0.0.6"),
    ]}
    async with trio.open_nursery() as nursery:
        for server in servers.values():
            await nursery.start(server.run)
        p = {label: server.port for label, server in servers.items()}

        policy = FakePolicy(
            names={"allowed.test": frozenset({p["allowed"]}), "other.test": frozenset({p["other"]}),
                   "third.test": frozenset({p["allowed"]}), "shared.test": frozenset({p["other"]})},
            cidrs=[(ipaddress.IPv4Network("127.0.0.4/32"), p["cidr"])],
            internal=frozenset({p["internal"]}),
        )
        hello = client_hello
        # (what, ip, payload, the server that must answer or None: refused)
        allowed: list[tuple[str, str, int, bytes, str]] = [
            ("host.vmcache.internal", "10.0.2.2", p["internal"], http_get("host.vmcache.internal"),
             "internal"),
            ("right Host", "127.0.0.2", p["allowed"], http_get("allowed.test"), "allowed"),
            ("right SNI", "127.0.0.2", p["allowed"], hello("allowed.test"), "allowed"),
            ("no SNI, another protocol", "127.0.0.2", p["allowed"], b"\x00binary", "allowed"),
            ("CIDR rule", "127.0.0.4", p["cidr"], b"anything", "cidr"),
        ]
        refused: list[tuple[str, str, int, bytes, str]] = [
            ("internal port not allowed", "10.0.2.2", p["internal-closed"], b"GET /", "internal-closed"),
            ("address not allowed", "127.0.0.5", p["never"], http_get("allowed.test"), "never"),
            ("CIDR on another port", "127.0.0.4", p["cidr-other"], b"x", "cidr-other"),
            ("another name's Host", "127.0.0.2", p["allowed"], http_get("other.test"), "allowed"),
            ("another name's SNI", "127.0.0.2", p["allowed"], hello("other.test"), "allowed"),
            ("a disallowed SNI", "127.0.0.2", p["allowed"], hello("evil.test"), "allowed"),
            ("a name allowed on this port that resolved elsewhere", "127.0.0.2", p["allowed"],
             http_get("third.test"), "allowed"),
            ("a name of this address allowed on another port", "127.0.0.2", p["allowed"],
             hello("shared.test"), "allowed"),
            ("absolute URI of another", "127.0.0.2", p["allowed"],
             http_get(None, f"http://other.test:{p['allowed']}/"), "allowed"),
            ("never resolved here", "127.0.0.6", p["unresolved"], http_get("allowed.test"), "unresolved"),
            ("a name's IP before resolving it", "127.0.0.3", p["other"], http_get("other.test"), "other"),
            ("the guest's own subnet", "10.0.2.77", p["allowed"], b"x", "allowed"),
        ]

        async def run_cases(pol: FakePolicy, cases: list[tuple[str, str, int, bytes, str]],
                            expect_through: bool) -> None:
            async with enforce(pair.vm, pol, resolver=resolver(), loopback_targets=True,
                               peek_timeout=2) as enf:
                reply = await guest_dns(pair, dns_query("allowed.test"))
                assert reply is not None and dns_answer(reply) == (NOERROR, ["127.0.0.2"])
                for name in ("third.test", "shared.test"):
                    assert await guest_dns(pair, dns_query(name)) is not None
                for what, ip, port, payload, label in cases:
                    if isinstance(pol, Permissive) and ip.startswith("10.0.2."):
                        continue  # not a destination at all, even for the control
                    before = servers[label].accepted
                    got = await exchange(pair, ip, port, payload)
                    if expect_through:
                        assert got == f"hello from {label}".encode(), what
                        assert servers[label].received[-1] == payload, what
                    else:
                        assert got is None, what
                        assert servers[label].accepted == before, what
                if not expect_through:
                    assert enf.proxy.refusals.total == len(cases)

        # a hostile guest sends to a neighbour of its own subnet through the vm's MAC
        await trio.run_process(["ip", "-n", pair.guest_name, "neigh", "replace", "10.0.2.77", "lladdr",
                                VM_MAC, "dev", "eth0"])
        with trio.fail_after(60):
            # the control: a proxy that lets everything through reaches every target
            await run_cases(Permissive(names={"allowed.test": None}), refused, True)
            await run_cases(policy, allowed, True)
            await run_cases(policy, refused, False)
            async with enforce(pair.vm, policy, resolver=resolver(), loopback_targets=True):
                assert await exchange(pair, "127.0.0.3", p["other"], http_get("other.test")) is None
                reply = await guest_dns(pair, dns_query("other.test"))
                assert reply is not None and dns_answer(reply) == (NOERROR, ["127.0.0.3"])
                got = await exchange(pair, "127.0.0.3", p["other"], http_get("other.test"))
                assert got == b"hello from other"
            # without loopback_targets (production), a name or CIDR rule never reaches the host's loopback
            async with enforce(pair.vm, policy, resolver=resolver()):
                await guest_dns(pair, dns_query("allowed.test"))
                assert await exchange(pair, "127.0.0.4", p["cidr"], b"x") is None
                assert await exchange(pair, "127.0.0.2", p["allowed"], http_get("allowed.test")) is None
                assert await exchange(pair, "10.0.2.2", p["internal"], b"x") == b"hello from internal"
        nursery.cancel_scope.cancel()


@needs_root
async def test_connections_per_vm_are_capped_and_all_closed_on_exit(pair: Pair) -> None:
    held = trio.Event()
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await held.wait()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        policy = FakePolicy(internal=frozenset({port}))
        assert open_counts() == {"enforcements": 0, "sockets": 0, "connections": 0}
        with trio.fail_after(30):
            async with enforce(pair.vm.fd, policy, max_connections=2) as enf:  # a bare fd works too
                assert open_counts()["sockets"] == 2
                first = await guest_connect(pair, "10.0.2.2", port)
                second = await guest_connect(pair, "10.0.2.2", port)
                while len(accepted) < 2:
                    await trio.sleep(0.01)
                assert await exchange(pair, "10.0.2.2", port, b"x") is None  # the third: reset
                assert enf.proxy.active == 2 and open_counts()["connections"] == 2
            # leaving enforce() ended both spliced connections and closed every socket
            assert open_counts() == {"enforcements": 0, "sockets": 0, "connections": 0}
            for stream in (first, second):
                with pytest.raises((trio.BrokenResourceError, OSError)):
                    while await stream.receive_some(100):
                        pass
                    raise OSError("EOF")  # a clean EOF is fine too: the proxy closed it
                await stream.aclose()
            text = await list_nft(pair.vm)
            assert "redirect" not in text and "policy drop" in text
            # and the drop-all state: nothing is answered any more
            assert await guest_dns(pair, dns_query("host.vmcache.internal"), timeout=0.5) is None
        held.set()
        nursery.cancel_scope.cancel()


@needs_root
async def test_prepare_drops_everything_and_splice_half_closes(pair: Pair) -> None:
    with trio.fail_after(30):
        await prepare(pair.vm, "tap0")
        text = await list_nft(pair.vm)
        assert "redirect" not in text and "policy drop" in text
        assert "table arp vmcache" in text  # ARP too: the guest learns no neighbour
        with trio.move_on_after(0.5) as scope:
            await guest_connect(pair, "10.0.2.2", 22)  # the SYN is dropped: no answer at all
        assert scope.cancelled_caught

        async def echo_after_eof(stream: trio.SocketStream) -> None:
            async with stream:
                got = b""
                while chunk := await stream.receive_some(65536):
                    got += chunk
                await stream.send_all(b"got %d" % len(got))

        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, echo_after_eof, listeners)
            async with enforce(pair.vm, FakePolicy(internal=None)):
                stream = await guest_connect(pair, "10.0.2.2", port)
                async with stream:
                    await stream.send_all(b"z" * 300_000)
                    await stream.send_eof()  # the half-close reaches the server...
                    reply = b""
                    while chunk := await stream.receive_some(100):
                        reply += chunk
                    assert reply == b"got 300000"  # ...which can still answer
            nursery.cancel_scope.cancel()


@needs_root
async def test_enforce_fails_with_a_clear_error(pair: Pair) -> None:
    with trio.fail_after(30), pytest.raises(NetworkSetupError, match="nosuch0"):
        async with enforce(pair.vm, FakePolicy(), interface="nosuch0"):
            pytest.fail("enforced on a missing interface")
    assert open_counts() == {"enforcements": 0, "sockets": 0, "connections": 0}





@needs_root
async def test_a_process_namespace_like_qemus_and_its_process_dying() -> None:
    """The namespace given as /proc/PID/ns/net of a process (as QEMU's is): enforcement starts
    there, and ends cleanly even when the process died meanwhile (we hold the namespace)."""
    proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "600"])
    try:
        path = f"/proc/{proc.pid}/ns/net"
        with trio.fail_after(10):
            while os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
                await trio.sleep(0.01)
            pid = str(proc.pid)
            await trio.run_process(["ip", "link", "add", "tap0", "netns", pid, "type", "veth", "peer",
                                    "name", "tap0p", "netns", pid])
            await prepare(path)
            async with enforce(path, FakePolicy(internal=None)) as enf:
                assert f"redirect to :{enf.proxy_port}" in await list_nft(enf.netns)
                proc.kill()
                proc.wait()
            assert open_counts() == {"enforcements": 0, "sockets": 0, "connections": 0}
            assert enf.netns.closed
    finally:
        proc.kill()
        proc.wait()
