"""The polite downloader against real loopback servers (no Spark): robots.txt, TDMRep, rate limits and Retry-After,
giving up on a failing host, DNS deadlines, a CONNECT proxy, and scheduling by host.

Several "hosts" are several loopback addresses (127.0.0.2, 127.0.0.3...), each let past the SSRF guard by
``download.allowed_hosts``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict

import pytest
from image_server import quick_download_config

from laion_spark.download import status
from laion_spark.download.dns import Resolver
from laion_spark.download.fetch import Fetcher, FetchSettings
from laion_spark.download.hosts import parse_retry_after
from laion_spark.download.proxy import ProxyRules
from laion_spark.download.robots import parse_robots_txt
from laion_spark.testing.server import ImageServer, SyntheticImageHandler, start_connect_proxy, start_server

# Scheduling jitter on a busy 2-core machine.
SLACK_S = 0.5
BODY = b"\xff\xd8 not decoded by these tests \xff\xd9"


class SiteServer(ImageServer):
    """Answers ``routes`` (path -> (code, headers, body), or a function of the hit number giving one), 404 otherwise;
    ``times`` holds when each path was asked for, ``delay_s`` slows the paths under /slow/."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routes: dict[str, object] = {}
        self.times: dict[str, list[float]] = defaultdict(list)
        self.delay_s = 0.0

    @property
    def host_port(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"


class SiteHandler(SyntheticImageHandler):
    server: SiteServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        self.server.count(path)
        self.server.times[path].append(time.monotonic())
        if path.startswith("/slow/"):
            time.sleep(self.server.delay_s)
        route = self.server.routes.get(path)
        if route is None and path.startswith(("/img/", "/slow/")):
            self.send_bytes(200, BODY, "image/jpeg")
            return
        if callable(route):
            route = route(self.server.hits[path])
        if route is None:
            self.send_plain(404, b"not found")
            return
        code, headers, body = route
        self.send_bytes(code, body, headers.pop("Content-Type", "text/plain"), headers)


def _site(host: str = "127.0.0.2", robots_txt: str | None = None) -> SiteServer:
    server = start_server(SiteHandler, host=host, server_class=SiteServer)
    if robots_txt is not None:
        server.routes["/robots.txt"] = (200, {}, robots_txt.encode())
    return server  # type: ignore[return-value]


@pytest.fixture
def sites():
    started: list[SiteServer] = []

    def make(host: str = "127.0.0.2", robots_txt: str | None = None) -> SiteServer:
        server = _site(host, robots_txt)
        started.append(server)
        return server

    yield make
    for server in started:
        server.shutdown()


def _fetcher(*servers: SiteServer, resolver: Resolver | None = None, **changes) -> Fetcher:
    allowed = [server.host_port for server in servers] + changes.pop("extra_allowed", [])
    config = quick_download_config(allowed_hosts=allowed, **changes)
    return Fetcher(FetchSettings.from_config(config), resolver=resolver)


def _url(server: SiteServer, path: str) -> str:
    return f"http://{server.host_port}{path}"


def test_robots_txt_disallows_for_star_and_for_our_product_token(sites) -> None:
    everyone = sites("127.0.0.2", "User-agent: *\nDisallow: /private/\n")
    for_us = sites(
        "127.0.0.3",
        "User-agent: otherbot\nDisallow: /\n\n"
        "User-agent: LAION_Spark/2.0\nDisallow: /no-laion/\nAllow: /no-laion/ok*.jpg$\n\n"
        "User-agent: *\nDisallow: /img/\n",
    )
    for_us.routes["/no-laion/ok-1.jpg"] = (200, {}, BODY)
    fetcher = _fetcher(everyone, for_us)
    try:
        verdicts = {
            url: fetcher.fetch(url).status
            for url in [
                _url(everyone, "/private/a.jpg"),
                _url(everyone, "/img/a.jpg"),
                _url(for_us, "/no-laion/a.jpg"),
                _url(for_us, "/no-laion/ok-1.jpg"),
                _url(for_us, "/img/a.jpg"),  # the * group does not apply: a group names us
            ]
        }
    finally:
        fetcher.close()
    assert list(verdicts.values()) == [
        status.DISALLOWED,
        status.SUCCESS,
        status.DISALLOWED,
        status.SUCCESS,
        status.SUCCESS,
    ], verdicts
    assert everyone.hits["/private/a.jpg"] == 0 and for_us.hits["/no-laion/a.jpg"] == 0


def test_robots_txt_is_fetched_once_per_host_for_many_urls(sites) -> None:
    site = sites("127.0.0.2", "User-agent: *\nAllow: /\n")
    fetcher = _fetcher(site, per_host_requests_per_s=0)
    try:
        results = list(fetcher.fetch_many([_url(site, f"/img/{i}.jpg") for i in range(24)]))
    finally:
        fetcher.close()
    assert [r.status for r in results] == [status.SUCCESS] * 24
    assert site.hits["/robots.txt"] == 1 and site.hits["/.well-known/tdmrep.json"] == 1


@pytest.mark.parametrize(
    ("code", "expected"),
    [(404, status.SUCCESS), (403, status.DISALLOWED), (401, status.DISALLOWED), (503, status.DISALLOWED)],
)
def test_robots_txt_answer_codes(sites, code: int, expected: str) -> None:
    site = sites()
    site.routes["/robots.txt"] = (code, {}, b"whatever")
    fetcher = _fetcher(site)
    try:
        assert fetcher.fetch(_url(site, "/img/a.jpg")).status == expected
    finally:
        fetcher.close()


def test_robots_txt_can_be_ignored_by_config(sites) -> None:
    site = sites("127.0.0.2", "User-agent: *\nDisallow: /\n")
    fetcher = _fetcher(site, respect_robots_txt=False)
    try:
        assert fetcher.fetch(_url(site, "/img/a.jpg")).status == status.SUCCESS
    finally:
        fetcher.close()
    assert site.hits["/robots.txt"] == 0


def test_robots_txt_rules_follow_rfc_9309_precedence() -> None:
    rules = parse_robots_txt(
        "user-agent: *\ndisallow: /a\nallow: /a/b\ndisallow: /*.gif$\nallow: /same\ndisallow: /same\n"
    )
    tokens = ("laion_spark",)
    assert not rules.allows("/a/x", tokens) and rules.allows("/a/b/x", tokens)
    assert not rules.allows("/img/x.gif", tokens) and rules.allows("/img/x.gif?v=1", tokens)
    assert rules.allows("/same", tokens)  # a tie goes to Allow
    assert rules.allows("/%7Euser", parse_robots_txt("User-agent: *\nDisallow: /~other\n").groups and tokens)


def test_tdm_reservation_header_means_disallowed(sites) -> None:
    site = sites()
    site.routes["/reserved.jpg"] = (200, {"Content-Type": "image/jpeg", "tdm-reservation": "1"}, BODY)
    site.routes["/not-reserved.jpg"] = (200, {"Content-Type": "image/jpeg", "tdm-reservation": "0"}, BODY)
    site.routes["/noml.jpg"] = (200, {"Content-Type": "image/jpeg", "X-Robots-Tag": "noml"}, BODY)
    fetcher = _fetcher(site)
    try:
        reserved = fetcher.fetch(_url(site, "/reserved.jpg"))
        assert reserved.status == status.DISALLOWED and "tdm-reservation" in reserved.error
        assert reserved.body is None
        assert fetcher.fetch(_url(site, "/not-reserved.jpg")).status == status.SUCCESS
        noml = fetcher.fetch(_url(site, "/noml.jpg"))
        assert noml.status == status.DISALLOWED and "noml" in noml.error
    finally:
        fetcher.close()


def test_tdmrep_json_reserves_the_paths_it_names(sites) -> None:
    site = sites()
    site.routes["/.well-known/tdmrep.json"] = (
        200,
        {"Content-Type": "application/json"},
        b'[{"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://example.com/policy"},'
        b' {"location": "/*", "tdm-reservation": 0}]',
    )
    fetcher = _fetcher(site)
    try:
        reserved = [fetcher.fetch(_url(site, f"/reserved/{i}.jpg")) for i in range(3)]
        free = fetcher.fetch(_url(site, "/img/free.jpg"))
    finally:
        fetcher.close()
    assert {r.status for r in reserved} == {status.DISALLOWED} and "tdmrep.json" in reserved[0].error
    assert free.status == status.SUCCESS
    assert sum(n for path, n in site.hits.items() if path.startswith("/reserved/")) == 0
    assert site.hits["/.well-known/tdmrep.json"] == 1


def test_429_retry_after_is_waited_for_within_a_bound(sites) -> None:
    site = sites()
    site.routes["/busy.jpg"] = lambda hit: (429, {"Retry-After": "1"}, b"slow down") if hit == 1 else (200, {}, BODY)
    # A Retry-After far above max_retry_after_s waits max_retry_after_s.
    site.routes["/very-busy.jpg"] = lambda hit: (503, {"Retry-After": "3600"}, b"") if hit == 1 else (200, {}, BODY)
    fetcher = _fetcher(site, total_timeout_s=4.0, max_retry_after_s=2.0, respect_robots_txt=False)
    try:
        busy = fetcher.fetch(_url(site, "/busy.jpg"))
        very_busy = fetcher.fetch(_url(site, "/very-busy.jpg"))
    finally:
        fetcher.close()
    assert (busy.status, busy.attempts) == (status.SUCCESS, 2), busy.error
    first, second = site.times["/busy.jpg"]
    assert 1.0 - 0.05 <= second - first <= 1.0 + SLACK_S
    assert (very_busy.status, very_busy.attempts) == (status.SUCCESS, 2), very_busy.error
    first, second = site.times["/very-busy.jpg"]
    assert 2.0 - 0.05 <= second - first <= 2.0 + SLACK_S


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 30) == 30.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_a_host_that_keeps_failing_is_given_up_with_one_row_per_url(sites) -> None:
    down, up = sites("127.0.0.2"), sites("127.0.0.3")
    for i in range(20):
        down.routes[f"/down/{i}.jpg"] = (500, {}, b"broken")
    fetcher = _fetcher(
        down, up, host_failure_limit=3, retries=0, per_host_connections=1, per_host_requests_per_s=0, threads=4
    )
    urls = [_url(down, f"/down/{i}.jpg") for i in range(20)] + [_url(up, f"/img/{i}.jpg") for i in range(5)]
    try:
        results = list(fetcher.fetch_many(urls))
    finally:
        fetcher.close()
    assert sorted(r.url for r in results) == sorted(urls)
    by_status: dict[str, int] = defaultdict(int)
    for result in results:
        if "/down/" in result.url:
            by_status[result.status] += 1
    assert dict(by_status) == {status.HTTP_ERROR: 3, status.HOST_GIVEN_UP: 17}
    assert sum(n for path, n in down.hits.items() if path.startswith("/down/")) == 3
    assert all(r.status == status.SUCCESS for r in results if "/img/" in r.url)


@pytest.fixture
def silent_name_server():
    """A UDP socket on loopback that takes DNS queries and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    yield server
    server.close()


def _lookup_through(name_server: socket.socket, asked: list[str]):
    """A getaddrinfo that asks ``name_server`` (one A query) and waits for its answer, as the C resolver would."""

    def lookup(host: str, port: int, *args, **kwargs):
        asked.append(host)
        query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        query += b"".join(bytes([len(label)]) + label.encode() for label in host.split(".")) + b"\x00\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(20.0)
            client.sendto(query, name_server.getsockname())
            client.recvfrom(512)  # never comes
        raise socket.gaierror("no answer")

    return lookup


def test_a_name_server_that_never_answers_is_a_timeout_on_time(silent_name_server) -> None:
    asked: list[str] = []
    resolver = Resolver(timeout_s=0.5, cache_hosts=100, lookup=_lookup_through(silent_name_server, asked))
    fetcher = _fetcher(resolver=resolver, dns_timeout_s=0.5)
    try:
        started = time.monotonic()
        first = fetcher.fetch("http://images.example.test/a.jpg")
        first_s = time.monotonic() - started
        started = time.monotonic()
        second = fetcher.fetch("http://images.example.test/b.jpg")
        second_s = time.monotonic() - started
        invalid = fetcher.fetch("http://images.example.invalid/c.jpg")
    finally:
        fetcher.close()
        resolver.close()
    assert first.status == status.TIMEOUT and "DNS" in first.error, first.error
    assert 0.5 - 0.05 <= first_s <= 0.5 + SLACK_S
    assert second.status == status.TIMEOUT and second_s < 0.2  # the failure is cached: no second wait
    assert invalid.status == status.FAILED_TO_DOWNLOAD and ".invalid" in invalid.error
    assert asked == ["images.example.test"]
    assert silent_name_server.recv(512)  # the query really went out


def test_proxy_tunnels_to_the_checked_address_and_never_to_an_internal_one(sites) -> None:
    site = sites("127.0.0.2")
    proxy = start_connect_proxy()
    port = site.server_address[1]
    names = {"site.example": "127.0.0.2", "internal.example": "10.0.0.1", "metadata.example": "169.254.169.254"}

    def lookup(host: str, port: int, *args, **kwargs):
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return socket.getaddrinfo(host, port, *args, **kwargs)

    resolver = Resolver(timeout_s=1.0, cache_hosts=100, lookup=lookup)
    fetcher = _fetcher(resolver=resolver, proxy=proxy.url, extra_allowed=[f"site.example:{port}"])
    try:
        fetched = fetcher.fetch(f"http://site.example:{port}/img/a.jpg")
        blocked = [
            fetcher.fetch(url)
            for url in (
                f"http://internal.example:{port}/img/a.jpg",
                f"http://metadata.example:{port}/latest/meta-data/",
                "http://10.0.0.1/x.jpg",
                "http://169.254.169.254/latest/meta-data/",
                f"http://localhost:{port}/img/a.jpg",
            )
        ]
    finally:
        fetcher.close()
        resolver.close()
        proxy.shutdown()
    assert fetched.status == status.SUCCESS and fetched.body == BODY, fetched.error
    assert site.hits["/img/a.jpg"] == 1
    assert [r.status for r in blocked] == [status.BLOCKED_ADDRESS] * 5
    # Asked for the checked IP (robots.txt, tdmrep.json and the image: kept alive, one tunnel), never a name.
    assert proxy.targets and set(proxy.targets) == {f"127.0.0.2:{port}"}


def test_proxy_from_the_environment_and_no_proxy(sites, monkeypatch) -> None:
    through, around = sites("127.0.0.2"), sites("127.0.0.3")
    proxy = start_connect_proxy()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.3")
    fetcher = _fetcher(through, around)
    try:
        assert fetcher.fetch(_url(through, "/img/a.jpg")).status == status.SUCCESS
        assert fetcher.fetch(_url(around, "/img/a.jpg")).status == status.SUCCESS
    finally:
        fetcher.close()
        proxy.shutdown()
    assert set(proxy.targets) == {through.host_port}
    rules = ProxyRules.from_setting("", {"https_proxy": "http://u:p@proxy:3128", "no_proxy": ".internal,10.0.0.0/8"})
    assert rules.for_target("https", "a.example", 443).authorization == "Basic dTpw"
    assert rules.for_target("http", "a.example", 80) is None  # no HTTP_PROXY
    assert rules.for_target("https", "x.internal", 443) is None and rules.for_target("https", "10.1.2.3", 443) is None


def test_a_slow_host_does_not_starve_the_others(sites) -> None:
    slow, fast = sites("127.0.0.2"), sites("127.0.0.3")
    slow.delay_s = 2.0
    fetcher = _fetcher(
        slow,
        fast,
        threads=4,
        per_host_connections=2,
        per_host_requests_per_s=0,
        total_timeout_s=8.0,
        read_timeout_s=4.0,
    )
    # Sorted input, as the stage gives it: every slow URL before the first fast one.
    urls = [_url(slow, f"/slow/{i}.jpg") for i in range(4)] + [_url(fast, f"/img/{i}.jpg") for i in range(12)]
    done_at: dict[str, float] = {}
    started = time.monotonic()
    try:
        for result in fetcher.fetch_many(urls):
            done_at[result.url] = time.monotonic() - started
            assert result.status == status.SUCCESS, result.error
    finally:
        fetcher.close()
    fast_done = [t for url, t in done_at.items() if "/img/" in url]
    slow_done = [t for url, t in done_at.items() if "/slow/" in url]
    assert len(fast_done) == 12 and len(slow_done) == 4
    assert max(fast_done) < 1.5, sorted(fast_done)  # the fast host never waited for a slow answer
    assert min(slow_done) >= 2.0
    assert max(len(v) for v in _concurrent(slow.times, 2.0)) <= 2  # and the slow host got 2 connections at most


def _concurrent(times: dict[str, list[float]], duration_s: float) -> list[list[float]]:
    starts = sorted(t for path, hits in times.items() if path.startswith("/slow/") for t in hits)
    return [[s for s in starts if start <= s < start + duration_s - 0.05] for start in starts]


def test_per_host_rate_limit_spaces_requests(sites) -> None:
    site = sites()
    fetcher = _fetcher(site, per_host_requests_per_s=5, respect_robots_txt=False, respect_tdmrep=False)
    try:
        results = list(fetcher.fetch_many([_url(site, f"/img/{i}.jpg") for i in range(6)]))
    finally:
        fetcher.close()
    assert [r.status for r in results] == [status.SUCCESS] * 6
    starts = sorted(t for path, hits in site.times.items() for t in hits)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.2 - 0.03, gaps


def test_the_scheduler_gives_one_result_per_url_for_many_hosts_and_bad_urls(sites) -> None:
    servers = [sites(f"127.0.0.{i}") for i in range(2, 6)]
    fetcher = _fetcher(*servers, threads=3, per_host_requests_per_s=0)
    urls = [_url(s, f"/img/{i}.jpg") for i in range(10) for s in servers] + ["not a url", "http://[bad/x"]
    seen: list[str] = []
    lock = threading.Lock()

    def work(url: str) -> str:
        with lock:
            seen.append(url)
        return fetcher.fetch(url).status

    try:
        statuses = list(fetcher.map_unordered(work, urls))
    finally:
        fetcher.close()
    assert sorted(seen) == sorted(urls) and len(statuses) == len(urls)
    assert statuses.count(status.SUCCESS) == 40 and statuses.count(status.FAILED_TO_DOWNLOAD) == 2
