"""The network policy contract: allowlist entries (parse, round trip, covers), policies (the
ceiling, JSON for handles and state files) and the matching the egress proxy relies on."""

from __future__ import annotations

import ipaddress
import json

import pytest
import trio

import vmcache
from vmcache.errors import DaemonError, NetworkPolicyError
from vmcache.network_host import UnenforcedNetwork
from vmcache.network_policy import (
    INTERNAL_NAME,
    MAX_ENTRIES,
    AllowEntry,
    EntryKind,
    NetworkMode,
    NetworkPolicy,
    parse_entries,
)

IP = ipaddress.IPv4Address


@pytest.mark.parametrize(("text", "kind", "name", "network", "port", "canonical"), [
    ("pypi.org:443", EntryKind.NAME, "pypi.org", None, 443, "pypi.org:443"),
    ("PyPI.Org", EntryKind.NAME, "pypi.org", None, None, "pypi.org"),
    ("pypi", EntryKind.NAME, "pypi", None, None, "pypi"),
    ("a-b.c0.example:1", EntryKind.NAME, "a-b.c0.example", None, 1, "a-b.c0.example:1"),
    ("*.Example.com:65535", EntryKind.WILDCARD, "example.com", None, 65535, "*.example.com:65535"),
    ("*.com", EntryKind.WILDCARD, "com", None, None, "*.com"),
    ("10.0.0.0/8", EntryKind.CIDR, "", "10.0.0.0/8", None, "10.0.0.0/8"),
    ("10.1.2.0/24:80", EntryKind.CIDR, "", "10.1.2.0/24", 80, "10.1.2.0/24:80"),
    ("10.1.2.3", EntryKind.CIDR, "", "10.1.2.3/32", None, "10.1.2.3"),
    ("10.1.2.3/32:22", EntryKind.CIDR, "", "10.1.2.3/32", 22, "10.1.2.3:22"),
    ("0.0.0.0/0:443", EntryKind.CIDR, "", "0.0.0.0/0", 443, "0.0.0.0/0:443"),
    ("host.vmcache.internal:8080", EntryKind.INTERNAL, INTERNAL_NAME, None, 8080,
     "host.vmcache.internal:8080"),
    ("HOST.vmcache.internal", EntryKind.INTERNAL, INTERNAL_NAME, None, None, "host.vmcache.internal"),
    ("x" * 63 + ".com", EntryKind.NAME, "x" * 63 + ".com", None, None, "x" * 63 + ".com"),
])
def test_each_form_parses_and_round_trips(text: str, kind: EntryKind, name: str, network: str | None,
                                          port: int | None, canonical: str) -> None:
    entry = AllowEntry.parse(text)
    assert entry.kind is kind
    assert entry.name == name
    assert entry.network == (ipaddress.IPv4Network(network) if network else None)
    assert entry.port == port
    assert str(entry) == canonical
    assert AllowEntry.parse(str(entry)) == entry


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty"),
    ("::1", "IPv6 is not supported: the guest has no IPv6"),
    ("[::1]:80", "IPv6 is not supported: the guest has no IPv6"),
    ("fd00::/8", "IPv6 is not supported: the guest has no IPv6"),
    ("2001:db8::1", "IPv6 is not supported"),
    ("example.com:0", "the port '0' must be a number from 1 to 65535"),
    ("example.com:65536", "must be a number from 1 to 65535"),
    ("example.com:+1", "must be a number from 1 to 65535"),
    ("example.com:-1", "must be a number from 1 to 65535"),
    ("example.com:", "must be a number from 1 to 65535"),
    ("example.com:80x", "must be a number from 1 to 65535"),
    ("example.com:0x50", "must be a number from 1 to 65535"),
    (":80", "no host before the port"),
    ("example.com :80", "without spaces"),
    (" example.com", "without spaces"),
    ("example.com\n", "without spaces"),
    ("exa\0mple.com", "printable ASCII"),
    ("bücher.de", "xn-- form"),
    ("a..b", "not a DNS name"),
    ("-a.com", "not a DNS name"),
    ("a-.com", "not a DNS name"),
    ("a_b.com", "not a DNS name"),
    ("http://example.com", "must be a number from 1 to 65535"),  # a URL is no entry
    ("example.com/path", "is not an IPv4 address"),
    ("x" * 64 + ".com", "not a DNS name"),
    (".".join(["a" * 60] * 4) + ".abcdefghij", "not a DNS name"),  # 254 characters
    ("x" * 301, "longer than 300"),
    ("example.com.", "no trailing dot"),
    ("*", "a wildcard is *.DOMAIN"),
    ("*.", "a wildcard is *.DOMAIN"),
    ("*example.com", "a wildcard is *.DOMAIN"),
    ("a.*.com", "a wildcard is *.DOMAIN"),
    ("*.*.com", "a wildcard is *.DOMAIN"),
    ("10.0.0", "'10.0.0' is not an IPv4 address"),
    ("300.1.1.1", "is not an IPv4 address"),
    ("010.1.1.1", "is not an IPv4 address"),
    ("10.0.0.1/8", "has host bits set: did you mean 10.0.0.0/8?"),
    ("10.0.0.0/33", "the prefix length '33' must be a number from 0 to 32"),
    ("10.0.0.0/", "the prefix length '' must be"),
    ("10.0.0.0/8/8", "the prefix length '8/8'"),
    ("localhost", "reached as host.vmcache.internal:PORT"),
    ("LOCALHOST:80", "reached as host.vmcache.internal:PORT"),
    ("a.localhost", "reached as host.vmcache.internal:PORT"),
    ("127.0.0.1:80", "reached as host.vmcache.internal:PORT"),
    ("127.0.0.0/8", "reached as host.vmcache.internal:PORT"),
    ("0.0.0.0", "reached as host.vmcache.internal:PORT"),
    ("vmcache.internal", "the only name under vmcache.internal is host.vmcache.internal"),
    ("db.vmcache.internal:5432", "the only name under vmcache.internal"),
    ("*.vmcache.internal", "the only name under vmcache.internal"),
    ("*.host.vmcache.internal", "the only name under vmcache.internal"),
    ("*.internal", "a wildcard never covers vmcache.internal"),
    ("*.internal:8080", "a wildcard never covers vmcache.internal"),
])
def test_bad_entries_are_refused_with_one_line_naming_them(text: str, reason: str) -> None:
    with pytest.raises(NetworkPolicyError) as caught:
        AllowEntry.parse(text)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message
    assert message.startswith("network allow entry ")
    assert caught.value.exit_status == 2


def test_a_non_string_entry_is_refused() -> None:
    with pytest.raises(NetworkPolicyError, match="must be a string"):
        AllowEntry.parse(443)  # type: ignore[arg-type]


@pytest.mark.parametrize(("ceiling", "request_", "covered"), [
    ("*.example.com", "api.example.com:443", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "*.api.example.com:443", True),
    ("*.example.com", "*.example.com", True),
    ("*.example.com", "example.com", False),        # a wildcard is for the names under DOMAIN
    ("*.example.com", "badexample.com", False),
    ("*.example.com", "example.com.evil.org", False),
    ("*.example.com:443", "api.example.com:443", True),
    ("*.example.com:443", "api.example.com:80", False),
    ("*.example.com:443", "api.example.com", False),  # any port is more than port 443
    ("*.example.com", "10.0.0.1", False),
    ("*.org", "host.vmcache.internal:80", False),
    ("*.com", "*.example.com:1", True),
    ("10.0.0.0/8", "10.1.2.0/24:80", True),
    ("10.0.0.0/8", "10.1.2.3", True),
    ("10.0.0.0/8", "10.0.0.0/8", True),
    ("10.0.0.0/8", "10.0.0.0/7", False),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("10.0.0.0/8:80", "10.1.2.3:80", True),
    ("10.0.0.0/8:80", "10.1.2.3:81", False),
    ("10.0.0.0/8:80", "10.1.2.3", False),
    ("0.0.0.0/0", "192.168.1.0/24:443", True),
    ("10.0.0.0/8", "ten.example.com", False),       # a name's addresses are not known ahead
    ("pypi.org", "pypi.org:443", True),
    ("pypi.org", "pypi.org", True),
    ("pypi.org:443", "pypi.org:443", True),
    ("pypi.org:443", "pypi.org", False),
    ("pypi.org:443", "pypi.org:80", False),
    ("pypi.org", "files.pypi.org", False),
    ("pypi.org", "*.pypi.org", False),
    ("host.vmcache.internal", "host.vmcache.internal:8080", True),
    ("host.vmcache.internal:8080", "host.vmcache.internal:8080", True),
    ("host.vmcache.internal:8080", "host.vmcache.internal:8081", False),
    ("host.vmcache.internal:8080", "host.vmcache.internal", False),
    ("pypi.org", "host.vmcache.internal", False),
])
def test_covers_is_the_ceiling(ceiling: str, request_: str, covered: bool) -> None:
    assert AllowEntry.parse(ceiling).covers(AllowEntry.parse(request_)) is covered


def test_an_entry_covers_itself() -> None:
    for text in ("pypi.org", "pypi.org:1", "*.a.b", "*.a.b:2", "1.2.3.4", "1.2.0.0/16:3",
                 "host.vmcache.internal", "host.vmcache.internal:4"):
        entry = AllowEntry.parse(text)
        assert entry.covers(entry), text


def test_beyond_lists_what_no_permit_entry_covers() -> None:
    permit = parse_entries(["*.example.com:443", "10.0.0.0/8", "host.vmcache.internal:8080"])
    policy = NetworkPolicy.parse("restricted", [
        "api.example.com:443", "api.example.com:80", "10.1.0.0/16:22", "11.0.0.1",
        "host.vmcache.internal:8080", "host.vmcache.internal:22"])
    assert [str(entry) for entry in policy.beyond(permit)] == [
        "api.example.com:80", "11.0.0.1", "host.vmcache.internal:22"]
    assert NetworkPolicy.parse("restricted", ["a.example.com:443"]).beyond(permit) == []
    assert NetworkPolicy.none().beyond([]) == []
    assert NetworkPolicy.parse("restricted").beyond([]) == []  # nothing asked, nothing beyond
    assert [str(e) for e in NetworkPolicy.parse("restricted", ["a.b"]).beyond([])] == ["a.b"]


def test_policies_construct_from_words_and_from_entries() -> None:
    assert NetworkPolicy() == NetworkPolicy.none() == NetworkPolicy.parse("none") == NetworkPolicy.parse("")
    assert NetworkPolicy.none().mode is NetworkMode.NONE and NetworkPolicy.none().allow == ()
    by_words = NetworkPolicy("restricted", ["Pypi.org:443", "pypi.org:443", "10.0.0.1"])  # type: ignore[arg-type]
    by_entries = NetworkPolicy(NetworkMode.RESTRICTED, (AllowEntry.parse("pypi.org:443"),
                                                        AllowEntry.parse("10.0.0.1/32")))
    assert by_words == by_entries  # parsed, lower-cased, the duplicate dropped
    assert by_words.is_restricted and not NetworkPolicy.none().is_restricted
    assert hash(by_words) == hash(by_entries)
    assert vmcache.NetworkPolicy is NetworkPolicy
    assert vmcache.NetworkMode is NetworkMode and vmcache.AllowEntry is AllowEntry


@pytest.mark.parametrize(("mode", "allow", "message"), [
    ("open", [], "network mode 'open': must be none or restricted"),
    ("NONE", [], "must be none or restricted"),
    ("none", ["pypi.org"], "network mode none allows nothing, yet 1 allow entries were given"),
    ("restricted", ["pypi.org", "::1"], "network allow entry '::1': IPv6"),
    ("restricted", "pypi.org", "must be a list of strings, not one string"),
    ("restricted", ["a.b"] * (MAX_ENTRIES + 1), f"at most {MAX_ENTRIES}"),
])
def test_bad_policies_are_one_line(mode: str, allow: object, message: str) -> None:
    with pytest.raises(NetworkPolicyError) as caught:
        NetworkPolicy(mode, allow)  # type: ignore[arg-type]
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_describe_is_one_line() -> None:
    assert NetworkPolicy.none().describe() == "none"
    assert NetworkPolicy.parse("restricted").describe() == "restricted (nothing allowed)"
    policy = NetworkPolicy.parse("restricted", ["pypi.org:443", "*.github.com", "host.vmcache.internal:8080"])
    assert policy.describe() == "restricted: pypi.org:443, *.github.com, host.vmcache.internal:8080"
    assert str(policy) == policy.describe()


def test_json_round_trip() -> None:
    for policy in (NetworkPolicy.none(), NetworkPolicy.parse("restricted"),
                   NetworkPolicy.parse("restricted", ["pypi.org:443", "*.a.b", "10.0.0.0/8:1",
                                                      "host.vmcache.internal"])):
        text = json.dumps(policy.to_dict())
        assert NetworkPolicy.from_dict(json.loads(text)) == policy
    assert NetworkPolicy.none().to_dict() == {"mode": "none", "allow": []}
    assert NetworkPolicy.from_dict({}) == NetworkPolicy.none()  # an old record's missing keys


@pytest.mark.parametrize(("data", "message"), [
    (None, "not a network policy: expected an object, not NoneType"),
    ("restricted", "expected an object, not str"),
    ([], "expected an object, not list"),
    ({"mode": 1}, "mode must be a string"),
    ({"mode": "restricted", "allow": "a.b"}, "allow must be a list of strings"),
    ({"mode": "restricted", "allow": [1]}, "allow must be a list of strings"),
    ({"mode": "restricted", "allow": ["a.b"], "extra": True}, "unknown key extra"),
    ({"mode": "wide-open"}, "network mode 'wide-open'"),
    ({"mode": "restricted", "allow": ["a.b", "[::1]"]}, "IPv6"),
    ({"mode": "none", "allow": ["a.b"]}, "mode none allows nothing"),
])
def test_a_hostile_or_old_record_is_a_clear_error(data: object, message: str) -> None:
    with pytest.raises(NetworkPolicyError) as caught:
        NetworkPolicy.from_dict(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


POLICY = NetworkPolicy.parse("restricted", [
    "pypi.org:443", "files.example", "*.github.com:443", "10.1.0.0/16:80", "192.168.7.7",
    "host.vmcache.internal:8080", "host.vmcache.internal:9090",
])


@pytest.mark.parametrize(("name", "allowed"), [
    ("pypi.org", True), ("PYPI.org.", True), ("files.example", True),
    ("api.github.com", True), ("a.b.github.com", True), ("github.com", False),
    ("notgithub.com", False), ("host.vmcache.internal", True), ("other.org", False),
    ("www.pypi.org", False), ("10.1.0.1", False), ("", False), ("pypi.org..", False),
    ("bad name", False), ("*.github.com", False),
])
def test_allows_name(name: str, allowed: bool) -> None:
    assert POLICY.allows_name(name) is allowed


@pytest.mark.parametrize(("name", "port", "allowed"), [
    ("pypi.org", 443, True), ("pypi.org", 80, False), ("files.example", 1, True),
    ("files.example", 65535, True), ("api.github.com", 443, True), ("api.github.com", 80, False),
    ("host.vmcache.internal", 8080, True), ("host.vmcache.internal", 9090, True),
    ("host.vmcache.internal", 22, False), ("Host.VMcache.Internal.", 8080, True),
    ("other.org", 443, False), ("192.168.7.7", 80, False),  # an address is no name: CIDR rules
])
def test_allows_name_port(name: str, port: int, allowed: bool) -> None:
    assert POLICY.allows_name_port(name, port) is allowed


@pytest.mark.parametrize(("ip", "port", "allowed"), [
    ("10.1.2.3", 80, True), ("10.1.2.3", 81, False), ("10.2.0.1", 80, False),
    ("192.168.7.7", 1, True), ("192.168.7.7", 65535, True), ("192.168.7.8", 80, False),
    ("10.0.2.2", 8080, False),  # the gateway's ports are host.vmcache.internal's, by name
])
def test_allows_ip_port_uses_cidr_rules_only(ip: str, port: int, allowed: bool) -> None:
    assert POLICY.allows_ip_port(IP(ip), port) is allowed


def test_the_hosts_own_addresses_are_never_reached_by_a_cidr_rule() -> None:
    everything = NetworkPolicy.parse("restricted", ["0.0.0.0/0"])
    assert everything.allows_ip_port(IP("93.184.216.34"), 443)
    for ip in ("127.0.0.1", "127.1.2.3", "0.0.0.0", "0.1.2.3"):
        assert not everything.allows_ip_port(IP(ip), 80), ip
    assert everything.internal_ports() == frozenset()


def test_link_local_is_reached_only_by_a_cidr_entry_inside_it() -> None:
    metadata = IP("169.254.169.254")
    assert not NetworkPolicy.parse("restricted", ["0.0.0.0/0"]).allows_ip_port(metadata, 80)
    assert not NetworkPolicy.parse("restricted", ["169.0.0.0/8:80"]).allows_ip_port(metadata, 80)
    assert NetworkPolicy.parse("restricted", ["169.254.169.254:80"]).allows_ip_port(metadata, 80)
    assert NetworkPolicy.parse("restricted", ["169.254.0.0/16"]).allows_ip_port(metadata, 80)


def test_internal_ports() -> None:
    assert POLICY.internal_ports() == frozenset({8080, 9090})
    assert NetworkPolicy.parse("restricted", ["host.vmcache.internal:1", "host.vmcache.internal"]
                               ).internal_ports() is None
    assert NetworkPolicy.parse("restricted", ["pypi.org", "*.com"]).internal_ports() == frozenset()
    assert NetworkPolicy.none().internal_ports() == frozenset()


def test_mode_none_allows_nothing() -> None:
    none = NetworkPolicy.none()
    assert not none.allows_name("pypi.org")
    assert not none.allows_name_port("host.vmcache.internal", 8080)
    assert not none.allows_ip_port(IP("10.0.0.1"), 80)


async def test_the_default_applier_never_leaves_a_policy_unenforced() -> None:
    applier = UnenforcedNetwork()
    applier.check(NetworkPolicy.none())
    await applier.apply(None, NetworkPolicy.none())  # type: ignore[arg-type]
    await applier.release("0123456789ab")
    restricted = NetworkPolicy.parse("restricted", ["pypi.org:443"])
    with pytest.raises(DaemonError, match="restricted is not enforced in this build"):
        applier.check(restricted)
    with pytest.raises(DaemonError, match="not enforced in this build"):
        await applier.apply(None, restricted)  # type: ignore[arg-type]


async def test_the_default_applier_runs_until_cancelled() -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(UnenforcedNetwork().run)
        nursery.cancel_scope.cancel()
