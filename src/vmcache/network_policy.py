"""A VM's network policy: ``none`` (no network at all) or ``restricted`` to an allowlist.

Pure data and matching, no I/O: the config ([network], [pools.NAME.network]), the wire
(TakeAsk.network), the handle and the state files carry a :class:`NetworkPolicy`; the
daemon's egress proxy and DNS responder ask it what a guest may reach. At the end, the
hook the daemon enforces a policy through at hand-out (:class:`NetworkApplier`).

An allowlist entry (:class:`AllowEntry`) is one of::

    HOST:PORT                    pypi.org:443       that name, that port
    HOST                         pypi.org           that name, any port
    *.DOMAIN[:PORT]              *.github.com:443   any name under DOMAIN (not DOMAIN itself)
    CIDR[:PORT]                  10.1.0.0/16:80     IPv4 addresses; a bare address is a /32
    host.vmcache.internal[:PORT] the host's own loopback (127.0.0.1), on that port

Names are lower-cased DNS names (letters, digits, hyphens; no trailing dot). IPv6 is
refused: the guest has no IPv6. ``localhost``, CIDRs inside 127.0.0.0/8 or 0.0.0.0/8 and
other names under ``vmcache.internal`` are refused (and a wider CIDR never reaches them):
the host's loopback is reached only through ``host.vmcache.internal`` and on the ports
named for it, and a wildcard never matches it (``*.internal`` is refused too).

A request's policy must stay within the daemon's ceiling (``permit``):
:meth:`NetworkPolicy.beyond` lists the entries no permit entry :meth:`~AllowEntry.covers`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import NetworkPolicyError

#: The name the guest reaches the host's loopback services by (the gateway, 10.0.2.2).
INTERNAL_NAME = "host.vmcache.internal"
#: Names under this domain are ours: only INTERNAL_NAME exists.
_INTERNAL_DOMAIN = "vmcache.internal"
#: At most this many entries in one policy (a bound on what a request may send).
MAX_ENTRIES = 1024
#: Longest entry text accepted (a DNS name is at most 253 characters, plus *. and :PORT).
MAX_ENTRY_LENGTH = 300
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DIGITS = re.compile(r"[0-9]{1,5}")
_IPV4_LIKE = re.compile(r"[0-9.]+")
#: Addresses of the host itself: never reached by a CIDR rule (the proxy connects from the
#: host), only as host.vmcache.internal on the ports named for it.
_HOST_ITSELF = (ipaddress.IPv4Network("127.0.0.0/8"), ipaddress.IPv4Network("0.0.0.0/8"))
#: Link-local addresses (cloud metadata services at 169.254.169.254): reached only by a CIDR
#: entry inside this network, never by a wider one such as 0.0.0.0/0.
_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")


class NetworkMode(enum.StrEnum):
    """``none``: the VM has no network (the default). ``restricted``: it reaches what its
    allowlist names, through the host, and nothing else."""

    NONE = "none"
    RESTRICTED = "restricted"


class EntryKind(enum.StrEnum):
    """What an :class:`AllowEntry` names."""

    NAME = "name"            # one DNS name
    WILDCARD = "wildcard"    # every name under a domain
    CIDR = "cidr"            # IPv4 addresses
    INTERNAL = "internal"    # host.vmcache.internal: the host's loopback


def is_internal_name(name: str) -> bool:
    """Whether ``name`` (lower-cased, no trailing dot) is under ``vmcache.internal``: ours, never
    a wildcard's and never sent to the host's resolver (only INTERNAL_NAME exists)."""
    return name == _INTERNAL_DOMAIN or name.endswith("." + _INTERNAL_DOMAIN)


def _is_dns_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def _refuse(text: str, reason: str) -> NetworkPolicyError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return NetworkPolicyError(f"network allow entry {shown!r}: {reason}")


def _port_matches(rule: int | None, port: int) -> bool:
    return rule is None or rule == port


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One allowlist entry; build it with :meth:`parse`. ``port`` None = any port.

    ``name`` is the DNS name (NAME), the domain under the ``*.`` (WILDCARD) or
    :data:`INTERNAL_NAME` (INTERNAL); ``network`` is set for CIDR alone.
    """

    kind: EntryKind
    name: str = ""
    network: ipaddress.IPv4Network | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """Parse one entry (the forms in the module's docstring), or raise
        :class:`NetworkPolicyError` with one line saying what is wrong with it."""
        if not isinstance(text, str):
            raise NetworkPolicyError(f"network allow entry {text!r}: must be a string")
        if not text:
            raise _refuse(text, "empty")
        if len(text) > MAX_ENTRY_LENGTH:
            raise _refuse(text, f"longer than {MAX_ENTRY_LENGTH} characters")
        if not text.isascii() or not text.isprintable() or any(char.isspace() for char in text):
            raise _refuse(text, "must be printable ASCII without spaces "
                                "(write an international name in its xn-- form)")
        lowered = text.lower()
        if "[" in lowered or lowered.count(":") > 1:
            raise _refuse(text, "IPv6 is not supported: the guest has no IPv6 "
                                "(use an IPv4 CIDR or a name)")
        host, colon, port_text = lowered.partition(":")
        port: int | None = None
        if colon:
            if not _DIGITS.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
                raise _refuse(text, f"the port {port_text!r} must be a number from 1 to 65535")
            port = int(port_text)
        if not host:
            raise _refuse(text, "no host before the port")
        if "/" in host or _IPV4_LIKE.fullmatch(host):
            network = _network(text, host)
            if any(network.subnet_of(own) for own in _HOST_ITSELF):
                raise _refuse(text, f"the host's loopback is reached as {INTERNAL_NAME}:PORT")
            return cls(EntryKind.CIDR, network=network, port=port)
        if host == INTERNAL_NAME:
            return cls(EntryKind.INTERNAL, name=INTERNAL_NAME, port=port)
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if name.endswith("."):
            raise _refuse(text, "a name has no trailing dot here: drop it")
        if not _is_dns_name(name):
            what = "a wildcard is *.DOMAIN, with DOMAIN a" if wildcard or "*" in name else "not a"
            raise _refuse(text, f"{what} DNS name (letters, digits and hyphens, in dot-separated "
                                "labels of at most 63)")
        if name == "localhost" or name.endswith(".localhost"):
            raise _refuse(text, f"the host's loopback is reached as {INTERNAL_NAME}:PORT")
        if name == _INTERNAL_DOMAIN or name.endswith("." + _INTERNAL_DOMAIN):
            raise _refuse(text, f"the only name under {_INTERNAL_DOMAIN} is {INTERNAL_NAME}")
        if wildcard and _INTERNAL_DOMAIN.endswith("." + name):
            raise _refuse(text, f"a wildcard never covers {_INTERNAL_DOMAIN}: name {INTERNAL_NAME}"
                                f"[:PORT] for the host's loopback")
        return cls(EntryKind.WILDCARD if wildcard else EntryKind.NAME, name=name, port=port)

    def __str__(self) -> str:
        if self.kind is EntryKind.CIDR:
            assert self.network is not None
            host = (str(self.network.network_address) if self.network.prefixlen == 32
                    else str(self.network))
        elif self.kind is EntryKind.WILDCARD:
            host = f"*.{self.name}"
        else:
            host = self.name
        return host if self.port is None else f"{host}:{self.port}"

    def covers(self, other: AllowEntry) -> bool:
        """Whether this entry (of a ceiling) allows at least everything ``other`` allows:
        ``*.example.com`` covers ``api.example.com:443`` and ``*.api.example.com``;
        ``10.0.0.0/8`` covers ``10.1.2.0/24:80``; ``HOST`` covers ``HOST:PORT``; a port
        covers only that port. Names and CIDRs never cover each other (a name's addresses
        are not known in advance), and only ``host.vmcache.internal`` covers itself."""
        if self.port is not None and other.port != self.port:
            return False
        if self.kind is EntryKind.CIDR:
            return (other.kind is EntryKind.CIDR and self.network is not None
                    and other.network is not None and other.network.subnet_of(self.network))
        if self.kind is EntryKind.WILDCARD:
            if other.kind is EntryKind.NAME:
                return other.name.endswith("." + self.name)
            return other.kind is EntryKind.WILDCARD and (
                other.name == self.name or other.name.endswith("." + self.name))
        return other.kind is self.kind and other.name == self.name

    def matches_name(self, name: str) -> bool:
        """Whether this entry names ``name`` (a lower-cased DNS name), at whatever port."""
        if self.kind is EntryKind.WILDCARD:
            return name.endswith("." + self.name) and not is_internal_name(name)
        return self.kind in (EntryKind.NAME, EntryKind.INTERNAL) and name == self.name


def _network(text: str, host: str) -> ipaddress.IPv4Network:
    address, slash, prefix = host.partition("/")
    try:
        parsed = ipaddress.IPv4Address(address)
    except ValueError:
        raise _refuse(text, f"{address!r} is not an IPv4 address (four numbers 0-255 with dots)"
                      ) from None
    if not slash:
        return ipaddress.IPv4Network(parsed)
    if not re.fullmatch(r"[0-9]{1,2}", prefix) or int(prefix) > 32:
        raise _refuse(text, f"the prefix length {prefix!r} must be a number from 0 to 32")
    try:
        return ipaddress.IPv4Network(f"{parsed}/{int(prefix)}")
    except ValueError:
        network = ipaddress.IPv4Network(f"{parsed}/{int(prefix)}", strict=False)
        raise _refuse(text, f"has host bits set: did you mean {network}?") from None


def _normal_name(name: str) -> str | None:
    """A DNS name as asked (any case, one trailing dot allowed) in our form, or None."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    return name if _is_dns_name(name) else None


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """A VM's network: its mode and, for ``restricted``, what it may reach.

    ``NetworkPolicy("restricted", ["pypi.org:443", "host.vmcache.internal:8080"])`` works:
    a str mode and str entries are parsed (:class:`NetworkPolicyError` if bad); duplicate
    entries are dropped. Mode ``none`` has no entries.
    """

    mode: NetworkMode = NetworkMode.NONE
    allow: tuple[AllowEntry, ...] = field(default=())

    def __post_init__(self) -> None:
        try:
            mode = NetworkMode(self.mode)
        except ValueError:
            raise NetworkPolicyError(f"network mode {str(self.mode)[:40]!r}: must be none or "
                                     "restricted") from None
        if isinstance(self.allow, str | bytes):
            raise NetworkPolicyError("network allow entries must be a list of strings, not one string")
        entries = list(self.allow)
        if len(entries) > MAX_ENTRIES:
            raise NetworkPolicyError(f"{len(entries)} network allow entries: at most {MAX_ENTRIES}")
        parsed = [entry if isinstance(entry, AllowEntry) else AllowEntry.parse(entry)
                  for entry in entries]
        if mode is NetworkMode.NONE and parsed:
            raise NetworkPolicyError(f"network mode none allows nothing, yet {len(parsed)} allow "
                                     "entries were given: use mode restricted")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "allow", tuple(dict.fromkeys(parsed)))

    @classmethod
    def none(cls) -> NetworkPolicy:
        """No network: the default."""
        return cls()

    @classmethod
    def parse(cls, mode: str, entries: Iterable[str] = ()) -> NetworkPolicy:
        """A policy from its words (the CLI's ``--network``/``--allow``, the wire's strings)."""
        return cls(NetworkMode.NONE if mode == "" else mode, tuple(entries))  # type: ignore[arg-type]

    @property
    def is_restricted(self) -> bool:
        return self.mode is NetworkMode.RESTRICTED

    def beyond(self, permit: Iterable[AllowEntry]) -> list[AllowEntry]:
        """The entries of this policy that no entry of ``permit`` covers (empty: within it)."""
        ceiling = list(permit)
        return [entry for entry in self.allow if not any(rule.covers(entry) for rule in ceiling)]

    def describe(self) -> str:
        """One line: ``none``, ``restricted (nothing allowed)`` or ``restricted: a, b``."""
        if not self.is_restricted:
            return "none"
        if not self.allow:
            return "restricted (nothing allowed)"
        return "restricted: " + ", ".join(str(entry) for entry in self.allow)

    def __str__(self) -> str:
        return self.describe()

    # ------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """``{"mode": "restricted", "allow": ["pypi.org:443"]}``: for handles and state files."""
        return {"mode": str(self.mode), "allow": [str(entry) for entry in self.allow]}

    @classmethod
    def from_dict(cls, data: object) -> NetworkPolicy:
        """The inverse of :meth:`to_dict`; anything else (an edited or hostile file) is a
        :class:`NetworkPolicyError` saying what is wrong, never another exception."""
        if not isinstance(data, Mapping):
            raise NetworkPolicyError(f"not a network policy: expected an object, not "
                                     f"{type(data).__name__}")
        unknown = set(data) - {"mode", "allow"}
        if unknown:
            raise NetworkPolicyError(f"not a network policy: unknown key "
                                     f"{', '.join(sorted(map(str, unknown)))[:80]}")
        mode = data.get("mode", "none")
        allow = data.get("allow", [])
        if not isinstance(mode, str):
            raise NetworkPolicyError("not a network policy: mode must be a string")
        if not isinstance(allow, list) or not all(isinstance(entry, str) for entry in allow):
            raise NetworkPolicyError("not a network policy: allow must be a list of strings")
        return cls.parse(mode, allow)

    # ------------------------------------------------------------ matching (the egress proxy's)

    def allows_name(self, name: str) -> bool:
        """DNS: whether ``name`` may be reached on at least one port (then the DNS responder
        answers it). ``name`` as a query carries it: any case, one trailing dot ignored; a
        name that is not DNS syntax is never allowed. Mode none: False."""
        normal = _normal_name(name)
        return normal is not None and any(entry.matches_name(normal) for entry in self.allow)

    def allows_name_port(self, name: str, port: int) -> bool:
        """Whether a connection to ``name`` (as for :meth:`allows_name`; the SNI or Host a
        connection names) on TCP ``port`` is allowed by a name, wildcard or
        host.vmcache.internal entry. CIDR entries play no part: see :meth:`allows_ip_port`."""
        normal = _normal_name(name)
        return normal is not None and any(
            entry.matches_name(normal) and _port_matches(entry.port, port) for entry in self.allow)

    def allows_ip_port(self, ip: ipaddress.IPv4Address, port: int) -> bool:
        """Whether a CIDR entry allows TCP to ``ip`` on ``port``. Only CIDR entries count: an
        address a name resolved to is the proxy's to check (with :meth:`allows_name_port`).
        The host's own addresses (127.0.0.0/8, 0.0.0.0/8) are never allowed here, not even
        by 0.0.0.0/0: the host's loopback is host.vmcache.internal (:meth:`internal_ports`).
        Link-local 169.254.0.0/16 only by an entry inside it (the proxy also refuses every
        other address of the host itself)."""
        if any(ip in own for own in _HOST_ITSELF):
            return False
        link_local = ip in _LINK_LOCAL
        return any(entry.kind is EntryKind.CIDR and entry.network is not None and ip in entry.network
                   and (not link_local or entry.network.subnet_of(_LINK_LOCAL))
                   and _port_matches(entry.port, port) for entry in self.allow)

    def internal_ports(self) -> frozenset[int] | None:
        """The host loopback ports the guest may reach as host.vmcache.internal: None = every
        port (an entry without a port); an empty set = host.vmcache.internal is not allowed."""
        ports: set[int] = set()
        for entry in self.allow:
            if entry.kind is EntryKind.INTERNAL:
                if entry.port is None:
                    return None
                ports.add(entry.port)
        return frozenset(ports)


def parse_entries(entries: Iterable[str]) -> tuple[AllowEntry, ...]:
    """Parse a list of entries (a ceiling, say); :class:`NetworkPolicyError` for the first bad one."""
    return tuple(dict.fromkeys(AllowEntry.parse(entry) for entry in entries))
