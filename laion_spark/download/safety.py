"""What the downloader may connect to and what it may keep: the SSRF guard, the allow-list and X-Robots-Tag opt-outs.

The guard judges the address a socket is about to connect to, never the host name in the URL: the fetcher resolves
DNS itself, calls :func:`blocked_reason` for every resolved address, then connects to that exact address, so a
second lookup cannot hand it a different one (DNS rebinding). Hosts that name an address by themselves (IP literals
in every spelling a resolver accepts, and localhost names) are judged before any lookup: see
:func:`address_before_lookup`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from laion_spark.config import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AllowedHost:
    """One ``download.allowed_hosts`` entry: a host name or a network, and optionally one port."""

    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches(self, host: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return _unwrapped(address) in self.network or address in self.network
        return self.host == host.lower().rstrip(".")


def parse_allowed_host(entry: str) -> AllowedHost:
    """``host``, ``host:port``, ``1.2.3.4``, ``10.0.0.0/8:8080``, ``::1``, ``[::1]:8080`` or ``[fd00::/8]:80``."""
    text = entry.strip()
    port: int | None = None
    if text.startswith("["):
        inner, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"unexpected text after ']' in {entry!r}")
            port = _parse_port(rest[1:], entry)
        host = inner
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _parse_port(port_text, entry)
    else:
        host = text  # a bare host, IPv4 address or CIDR, or an unbracketed IPv6 address (no port possible)
    if not host:
        raise ValueError(f"no host in {entry!r}")
    try:
        return AllowedHost(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if "/" in host or ":" in host or any(c.isspace() for c in host):
        raise ValueError(f"{host!r} is neither a host name nor an IP address or CIDR")
    return AllowedHost(host=host.lower().rstrip("."), port=port)


def parse_allow_list(entries: Iterable[str]) -> tuple[AllowedHost, ...]:
    """Parse every entry, or raise a ConfigError that names the bad one."""
    parsed = []
    for i, entry in enumerate(entries):
        try:
            parsed.append(parse_allowed_host(entry))
        except ValueError as exc:
            raise ConfigError(
                f"download.allowed_hosts[{i}] = {entry!r}: {exc}; expected a host or CIDR with an optional port, "
                'e.g. "127.0.0.1:8123", "10.0.0.0/8", "localhost:8000", "[::1]:8080"'
            ) from None
    return tuple(parsed)


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in {entry!r}")
    return int(text)


# IPv6 prefixes whose last 32 bits are the IPv4 address the packets end up at: IPv4-compatible (RFC 4291, deprecated,
# :: and ::1 excepted), IPv4-translated (SIIT, RFC 2765), NAT64's well-known prefix (RFC 6052) and the /96 form of its
# local-use prefix (RFC 8215). IPv4-mapped (::ffff:0:0/96) and 6to4 (2002::/16) come from the ipaddress properties.
_IPV4_IN_LAST_32_BITS = tuple(
    ipaddress.IPv6Network(prefix) for prefix in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/96")
)
# Addresses that carry an IPv4 address we cannot read with certainty, so they are refused whatever it is. Teredo
# (RFC 4380) hides the client's address XOR-ed next to a server's and reaches it over a UDP relay; the local-use NAT64
# prefix outside its /96 form puts the IPv4 bits where the operator's prefix length says, which we do not know.
_OPAQUE_IPV4_CARRIERS = (ipaddress.IPv6Network("2001::/32"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _unwrapped(address: IPAddress) -> IPAddress:
    """The IPv4 address that an IPv6 address embeds, which is where its packets really go; any other address as is.

    Covers IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), IPv4-translated (``::ffff:0:a.b.c.d``),
    6to4 (``2002:aabb:ccdd::/48``) and NAT64 (``64:ff9b::a.b.c.d``, ``64:ff9b:1::a.b.c.d``). Only the IPv4 address
    inside is judged, so a public one stays public: a NAT64 gateway delivers ``64:ff9b::8.8.8.8`` to 8.8.8.8, and
    refusing it would cut IPv6-only workers off the IPv4 web. Python's ``is_global`` is not used on the wrapper itself:
    which of these prefixes it calls global changes between Python versions (``2002:7f00:1::`` is global in 3.11).
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if int(address) > 1 and any(address in prefix for prefix in _IPV4_IN_LAST_32_BITS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def address_kind(address: IPAddress) -> str | None:
    """Why ``address`` must not be connected to (``"loopback"``, ``"private"``...), or None for a public address.

    An IPv6 address that embeds an IPv4 address is judged by the IPv4 address (see :func:`_unwrapped`). Teredo
    addresses, and local-use NAT64 ones outside ``64:ff9b:1::/96``, are always ``"non-global"``.
    """
    address = _unwrapped(address)
    if isinstance(address, ipaddress.IPv6Address) and any(address in carrier for carrier in _OPAQUE_IPV4_CARRIERS):
        return "non-global"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        # Catches what the flags above miss: shared address space (100.64/10), benchmarking and documentation
        # ranges and other special-purpose blocks.
        ("non-global", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def address_before_lookup(host: str) -> IPAddress | None:
    """The address ``host`` names by itself, or None when only a DNS answer can tell.

    IP literals in every spelling the C resolver accepts (``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``, ``127.1``,
    a trailing dot, an IPv6 zone), and ``localhost`` names, which RFC 6761 reserves for loopback. Judging these before
    the lookup means a resolver that does not know ``localhost.`` or ``foo.localhost`` cannot turn a blocked address
    into a mere lookup failure, and no such name is ever sent to a DNS server.
    """
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name
    if name == "localhost" or name.endswith(".localhost"):
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        pass
    if not name.isascii() or not name.replace(".", "").isalnum():
        return None
    try:
        # inet_aton is what getaddrinfo itself uses to read numeric hosts, so it agrees with the connection made.
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None


def blocked_reason(host: str, address: str | IPAddress, port: int, allowed: tuple[AllowedHost, ...]) -> str | None:
    """None when connecting to ``address``:``port`` for ``host`` is fine; otherwise the reason it is blocked."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if any(entry.matches(host, ip, port) for entry in allowed):
        return None
    kind = address_kind(ip)
    if kind is None:
        return None
    inside = _unwrapped(ip)
    shown = f"{inside} (inside {ip})" if inside != ip else f"{ip}"
    return f"{host} resolves to {kind} address {shown}"


def robots_disallows(header_values: Iterable[str], agent_tokens: Iterable[str], directives: Iterable[str]) -> bool:
    """True when an ``X-Robots-Tag`` header opts out: a listed directive, bare or addressed to one of our agents.

    ``X-Robots-Tag: noai`` applies to everyone; ``X-Robots-Tag: otherbot: noai`` only to otherbot. Values that are
    not user agents but contain a colon (``unavailable_after: 25 Jun 2030``) never match an agent token.
    """
    wanted = {d.strip().lower() for d in directives}
    agents = {a.strip().lower() for a in agent_tokens if a.strip()}
    for value in header_values:
        agent: str | None = None
        rules = value
        head, sep, tail = value.partition(":")
        if sep and "," not in head and head.strip().lower() not in wanted:
            agent, rules = head.strip().lower(), tail
        if agent is not None and agent not in agents:
            continue
        if any(rule.strip().lower() in wanted for rule in rules.split(",")):
            return True
    return False
