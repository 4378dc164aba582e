"""The HTTP client against a real loopback server with hostile endpoints (no Spark)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from image_server import TOTAL_TIMEOUT_S, make_image, quick_download_config, start_hostile_server

from laion_spark.download import status
from laion_spark.download.fetch import Fetcher, FetchSettings
from laion_spark.testing.server import ImageServer, serve_synthetic_images

# Scheduling jitter on a busy 2-core machine; a fetch that ignored the deadline would overrun by seconds.
SLACK_S = 0.5


@pytest.fixture(scope="module")
def servers():
    other, other_url = serve_synthetic_images()
    hostile = start_hostile_server(f"{other_url}/img/red-circle-gray-0.jpg")
    for fmt, ext, content_type in [
        ("JPEG", "jpg", "image/jpeg"),
        ("PNG", "png", "image/png"),
        ("WEBP", "webp", "image/webp"),
        ("GIF", "gif", "image/gif"),
    ]:
        hostile.files[f"/real.{ext}"] = (make_image(fmt), content_type)
    yield hostile, other
    hostile.shutdown()
    other.shutdown()


def _settings(hostile: ImageServer, **changes) -> FetchSettings:
    changes = {"user_agent_token": "test-run-42", "allowed_hosts": [f"127.0.0.1:{hostile.server_port}"], **changes}
    return FetchSettings.from_config(quick_download_config(**changes))


@pytest.fixture
def fetcher(servers):
    hostile, _ = servers
    fetcher = Fetcher(_settings(hostile))
    yield fetcher
    fetcher.close()


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "gif"])
def test_real_images_arrive_byte_for_byte(servers, fetcher, ext: str) -> None:
    hostile, _ = servers
    result = fetcher.fetch(f"{hostile.base_url}/real.{ext}")
    assert result.status == status.SUCCESS, result.error
    assert result.body == hostile.files[f"/real.{ext}"][0]
    assert result.http_status == 200 and result.content_type.startswith("image/")


def test_slow_drip_stops_at_the_total_timeout(servers, fetcher) -> None:
    hostile, _ = servers
    result = fetcher.fetch(f"{hostile.base_url}/slow-drip.jpg")
    assert result.status == status.TIMEOUT
    assert TOTAL_TIMEOUT_S - 0.1 <= result.elapsed_s <= TOTAL_TIMEOUT_S + SLACK_S


def test_endless_body_stops_at_max_body_bytes(servers, fetcher) -> None:
    hostile, _ = servers
    result = fetcher.fetch(f"{hostile.base_url}/endless.jpg")
    assert result.status == status.TOO_LARGE and "max_body_bytes" in result.error
    assert result.body is None
    assert result.elapsed_s <= TOTAL_TIMEOUT_S + SLACK_S


def test_redirect_loop_gives_up_after_max_redirects(servers, fetcher) -> None:
    hostile, _ = servers
    before = hostile.hits["/redirect-loop"] + hostile.hits["/redirect-loop-again"]
    result = fetcher.fetch(f"{hostile.base_url}/redirect-loop")
    assert result.status == status.FAILED_TO_DOWNLOAD and "redirects" in result.error
    assert hostile.hits["/redirect-loop"] + hostile.hits["/redirect-loop-again"] - before == 6  # 1 + max_redirects


def test_not_found_is_final_and_server_error_is_retried(servers, fetcher) -> None:
    hostile, _ = servers
    missing = fetcher.fetch(f"{hostile.base_url}/status/404")
    assert (missing.status, missing.http_status, missing.attempts) == (status.HTTP_ERROR, 404, 1)
    broken = fetcher.fetch(f"{hostile.base_url}/status/500")
    assert (broken.status, broken.http_status, broken.attempts) == (status.HTTP_ERROR, 500, 3)


def test_503_then_200_succeeds_on_retry(servers, fetcher) -> None:
    hostile, _ = servers
    result = fetcher.fetch(f"{hostile.base_url}/flaky.jpg")
    assert result.status == status.SUCCESS and result.attempts == 2
    assert result.body == hostile.image


def test_x_robots_tag_opt_outs_are_honoured(servers, fetcher) -> None:
    hostile, _ = servers
    assert fetcher.fetch(f"{hostile.base_url}/noai.jpg").status == status.DISALLOWED
    ours = fetcher.fetch(f"{hostile.base_url}/noai-for-us.jpg")
    assert ours.status == status.DISALLOWED and "noimageai" in ours.error
    assert fetcher.fetch(f"{hostile.base_url}/noai-for-others.jpg").status == status.SUCCESS
    ignoring = Fetcher(_settings(hostile, honour_x_robots_tag=False))
    assert ignoring.fetch(f"{hostile.base_url}/noai.jpg").status == status.SUCCESS
    ignoring.close()


def test_user_agent_names_the_project_and_the_users_token(servers, fetcher) -> None:
    hostile, _ = servers
    fetcher.fetch(f"{hostile.base_url}/real.jpg")
    agent = hostile.user_agents[-1]
    assert "laion_spark/" in agent and "test-run-42" in agent


def test_redirect_to_a_server_off_the_allow_list_never_reaches_it(servers, fetcher) -> None:
    hostile, other = servers
    redirected = fetcher.fetch(f"{hostile.base_url}/to-other-server.jpg")
    assert redirected.status == status.BLOCKED_ADDRESS and "loopback" in redirected.error
    assert hostile.hits["/to-other-server.jpg"] == 1
    direct = fetcher.fetch(f"{other.base_url}/img/red-circle-gray-0.jpg")
    assert direct.status == status.BLOCKED_ADDRESS
    by_name = fetcher.fetch(f"http://localhost:{other.server_port}/img/red-circle-gray-0.jpg")
    assert by_name.status == status.BLOCKED_ADDRESS
    assert other.total_hits == 0


# Every spelling of a loopback, private, link-local or metadata address an attacker can put in a URL. Each is fetched
# on a real loopback server's port, so a guard that let one through would show up in that server's hit count.
BLOCKED_HOSTS = [
    "127.0.0.1",
    "2130706433",  # 127.0.0.1 as one decimal number
    "0x7f000001",  # ... as one hex number
    "0x7f.0.0.1",
    "0177.0.0.1",  # octal
    "127.1",  # short forms
    "127.0.1",
    "127.0.0.1.",
    "0.0.0.0",
    "[::]",
    "[::1]",
    "localhost",
    "localhost.",
    "images.localhost",
    "10.0.0.1",
    "192.168.1.1",
    "169.254.1.1",
    "[fe80::1]",
    "169.254.169.254",  # cloud metadata, IPv4 and AWS's IPv6
    "[fd00:ec2::254]",
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",  # IPv4-compatible
    "[2002:7f00:1::]",  # 6to4
    "[64:ff9b::7f00:1]",  # NAT64
    "[64:ff9b:1::7f00:1]",  # NAT64, local-use prefix
    "[2002:a00:1::]",
    "[64:ff9b::a00:1]",
    "[2002:c0a8:101::]",
    "[64:ff9b::c0a8:101]",
    "[2002:a9fe:a9fe::]",
    "[64:ff9b::a9fe:a9fe]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo
]


def test_every_spelling_of_a_non_public_address_is_blocked_before_connecting() -> None:
    server = start_hostile_server("http://127.0.0.1:9/")
    fetcher = Fetcher(FetchSettings.from_config(quick_download_config(allowed_hosts=[])))
    try:
        verdicts = {}
        for host in BLOCKED_HOSTS:
            started = time.monotonic()
            result = fetcher.fetch(f"http://{host}:{server.server_port}/real.jpg")
            verdicts[host] = (result.status, time.monotonic() - started < 0.5, result.error)
        assert {host: v[:2] for host, v in verdicts.items()} == {
            host: (status.BLOCKED_ADDRESS, True) for host in BLOCKED_HOSTS
        }, verdicts
        assert server.total_hits == 0
    finally:
        fetcher.close()
        server.shutdown()


def test_allow_list_by_host_name(servers) -> None:
    hostile, _ = servers
    fetcher = Fetcher(_settings(hostile, allowed_hosts=[f"localhost:{hostile.server_port}"]))
    assert fetcher.fetch(f"http://localhost:{hostile.server_port}/real.png").status == status.SUCCESS
    assert fetcher.fetch(f"{hostile.base_url}/real.png").status == status.BLOCKED_ADDRESS  # the IP is not listed
    fetcher.close()


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "http:///nohost.jpg", "http://[bad/x.jpg", "not a url"])
def test_malformed_urls_fail_without_raising(fetcher, url: str) -> None:
    result = fetcher.fetch(url)
    assert result.status == status.FAILED_TO_DOWNLOAD and result.error


def test_connection_refused_is_a_download_failure(fetcher) -> None:
    fetcher_settings = fetcher.settings
    closed = Fetcher(replace(fetcher_settings, allowed_hosts=fetcher_settings.allowed_hosts + _port_9()))
    result = closed.fetch("http://127.0.0.1:9/x.jpg")
    assert result.status == status.FAILED_TO_DOWNLOAD and result.attempts == 3
    closed.close()


def _port_9():
    from laion_spark.download.safety import parse_allow_list

    return parse_allow_list(["127.0.0.1:9"])


def test_fetching_everything_at_once_gives_one_result_per_url_within_the_deadline(servers, fetcher) -> None:
    hostile, _ = servers
    paths = [f"/real.{ext}" for ext in ("jpg", "png", "webp", "gif")] + [
        "/slow-drip.jpg",
        "/endless.jpg",
        "/redirect-loop",
        "/status/404",
        "/status/500",
        "/noai.jpg",
        "/to-other-server.jpg",
        "/nothing-here.jpg",
    ]
    urls = [hostile.base_url + path for path in paths]
    started = time.monotonic()
    results = list(fetcher.fetch_many(urls))
    wall = time.monotonic() - started
    assert sorted(r.url for r in results) == sorted(urls)
    assert all(r.elapsed_s <= TOTAL_TIMEOUT_S + SLACK_S for r in results)
    assert wall <= TOTAL_TIMEOUT_S + 2 * SLACK_S  # they ran side by side
