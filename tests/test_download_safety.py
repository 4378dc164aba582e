"""The SSRF guard's address rules, the allow-list syntax and X-Robots-Tag parsing (no network)."""

from __future__ import annotations

import ipaddress

import pytest

from laion_spark.config import ConfigError
from laion_spark.download.safety import (
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


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_kind(ipaddress.ip_address(address)) is None
    assert blocked_reason("example.com", address, 80, ()) is None


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
