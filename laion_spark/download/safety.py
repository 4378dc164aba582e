"""What the downloader may connect to and what it may keep: the SSRF guard, the allow-list and X-Robots-Tag opt-outs.

The guard judges the address a socket is about to connect to, never the host name in the URL: the fetcher resolves
DNS itself, calls :func:`blocked_reason` for every resolved address, then connects to that exact address, so a
second lookup cannot hand it a different one (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
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
            return _unmapped(address) in self.network or address in self.network
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


def _unmapped(address: IPAddress) -> IPAddress:
    """IPv4-mapped (::ffff:a.b.c.d) and 6to4/NAT64-free: judge the IPv4 address the packets really go to."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_kind(address: IPAddress) -> str | None:
    """Why ``address`` must not be connected to (``"loopback"``, ``"private"``...), or None for a public address."""
    address = _unmapped(address)
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        # Catches what the flags above miss: shared address space (100.64/10), benchmarking and documentation
        # ranges, Teredo and other special-purpose blocks.
        ("non-global", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def blocked_reason(host: str, address: str | IPAddress, port: int, allowed: tuple[AllowedHost, ...]) -> str | None:
    """None when connecting to ``address``:``port`` for ``host`` is fine; otherwise the reason it is blocked."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if any(entry.matches(host, ip, port) for entry in allowed):
        return None
    kind = address_kind(ip)
    return None if kind is None else f"{host} resolves to {kind} address {ip}"


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
