"""The SSRF guard's address rules, the allow-list syntax and X-Robots-Tag parsing (no network)."""

from __future__ import annotations

import ipaddress

import pytest

from laion_spark.config import ConfigError
from laion_spark.download.safety import (
    address_before_lookup,
    address_kind,
    blocked_reason,
    parse_allow_list,
    parse_allowed_host,
    robots_disallows,
)


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-global"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("ff02::1", "multicast"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
    ],
)
def test_non_public_addresses_are_named(address: str, kind: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    "address, kind",
    [
        ("::127.0.0.1", "loopback"),  # IPv4-compatible
        ("::ffff:0:127.0.0.1", "loopback"),  # IPv4-translated (SIIT)
        ("2002:7f00:1::", "loopback"),  # 6to4
        ("64:ff9b::7f00:1", "loopback"),  # NAT64, well-known prefix
        ("64:ff9b:1::7f00:1", "loopback"),  # NAT64, local-use prefix
        ("2002:a00:1::", "private"),
        ("64:ff9b::a00:1", "private"),
        ("2002:c0a8:101::", "private"),
        ("64:ff9b::c0a8:101", "private"),
        ("2002:a9fe:a9fe::", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("::ffff:0:a9fe:a9fe", "link-local"),
    ],
)
def test_ipv6_wrappers_are_judged_by_the_ipv4_address_inside(address: str, kind: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) == kind
    reason = blocked_reason("example.com", address, 80, ())
    assert reason is not None and kind in reason and f"inside {ipaddress.ip_address(address)}" in reason


@pytest.mark.parametrize(
    "address",
    [
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo, client 192.0.2.45: never read, always refused
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "64:ff9b:1:808:8:800::",  # local-use NAT64 in a /48 layout: the IPv4 bits' place is the operator's choice
    ],
)
def test_ipv6_wrappers_we_cannot_read_are_refused(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) == "non-global"


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "::ffff:8.8.8.8",
        # A NAT64 gateway or 6to4 relay delivers these to 8.8.8.8: IPv6-only workers reach the IPv4 web this way.
        "64:ff9b::808:808",
        "64:ff9b:1::808:808",
        "2002:808:808::",
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) is None
    assert blocked_reason("example.com", address, 80, ()) is None


@pytest.mark.parametrize(
    "host, address",
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("LocalHost.", "127.0.0.1"),
        ("images.localhost", "127.0.0.1"),
        ("::127.0.0.1", "::7f00:1"),
        ("fe80::1%eth0", "fe80::1"),
        ("example.com", None),
        ("localhost.example.com", None),
        ("cafe", None),
        ("1.2.3.4.5", None),
    ],
)
def test_hosts_that_name_an_address_by_themselves(host: str, address: str | None) -> None:
    assert address_before_lookup(host) == (ipaddress.ip_address(address) if address else None)


def test_cloud_metadata_address_is_blocked_without_allow_list() -> None:
    reason = blocked_reason("169.254.169.254", "169.254.169.254", 80, ())
    assert reason is not None and "link-local" in reason


@pytest.mark.parametrize(
    "entry, host, network, port",
    [
        ("127.0.0.1:8123", None, "127.0.0.1/32", 8123),
        ("127.0.0.0/8", None, "127.0.0.0/8", None),
        ("10.0.0.0/8:8080", None, "10.0.0.0/8", 8080),
        ("localhost:8000", "localhost", None, 8000),
        ("Images.Example.COM", "images.example.com", None, None),
        ("[::1]:8080", None, "::1/128", 8080),
        ("::1", None, "::1/128", None),
        ("[fd00::/8]", None, "fd00::/8", None),
    ],
)
def test_allow_list_entries_parse(entry: str, host: str | None, network: str | None, port: int | None) -> None:
    parsed = parse_allowed_host(entry)
    assert parsed.host == host
    assert parsed.network == (ipaddress.ip_network(network) if network else None)
    assert parsed.port == port


@pytest.mark.parametrize("entry", ["", "localhost:http", "127.0.0.1:70000", "[::1]x", "bad host", "a/b:80"])
def test_bad_allow_list_entry_is_a_config_error_naming_it(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"allowed_hosts\[1\]"):
        parse_allow_list(["127.0.0.1", entry])


def test_allow_list_port_and_network_must_both_match() -> None:
    allowed = parse_allow_list(["127.0.0.1:8123", "10.0.0.0/8", "localhost:8000"])
    assert blocked_reason("127.0.0.1", "127.0.0.1", 8123, allowed) is None
    assert blocked_reason("127.0.0.1", "127.0.0.1", 8124, allowed) is not None
    assert blocked_reason("internal", "10.9.9.9", 443, allowed) is None
    assert blocked_reason("localhost", "127.0.0.1", 8000, allowed) is None
    assert blocked_reason("localhost", "::1", 8000, allowed) is None
    assert blocked_reason("evil.example", "127.0.0.1", 8000, allowed) is not None  # rebinding to loopback


DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]
AGENTS = ["laion_spark", "mytoken"]


@pytest.mark.parametrize(
    "values, disallowed",
    [
        (["noai"], True),
        (["NoImageAI"], True),
        (["noindex, nofollow"], True),
        (["nofollow", "noimageindex"], True),
        (["laion_spark: noai"], True),
        (["mytoken: noimageai, nofollow"], True),
        (["otherbot: noai"], False),
        (["otherbot: noai", "laion_spark: nofollow"], False),
        (["nofollow, noarchive"], False),
        (["unavailable_after: 25 Jun 2030 15:00:00 PST"], False),
        ([], False),
    ],
)
def test_x_robots_tag_opt_outs(values: list[str], disallowed: bool) -> None:
    assert robots_disallows(values, AGENTS, DIRECTIVES) is disallowed
