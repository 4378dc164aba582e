"""The HTTP client: one GET per URL, redirects followed by hand, every hop checked by the SSRF guard, politely.

Built on ``http.client`` over a socket we connect ourselves, which gives full control of what matters against
hostile servers: the exact IP connected to (resolved and checked once, no second lookup), the connect and read
timeouts, a total deadline checked before every ``recv`` (a slow drip cannot stretch it), and the body size.

Politeness, per Python worker: robots.txt and TDMRep (:mod:`.robots`, :mod:`.tdmrep`), fetched once per host through
the same guard, caps and deadlines as an image; a connection and request-rate limit per host, ``Retry-After`` and
giving up on a failing host (:mod:`.hosts`); a DNS cache with a deadline (:mod:`.dns`); keep-alive connections that
never cross hosts (:mod:`.connections`); proxies (:mod:`.proxy`). ``map_unordered`` schedules by host: a URL is
handed to a thread only when its host has a free slot and turn, so a slow host never holds idle threads.
"""

from __future__ import annotations

import heapq
import http.client
import io
import logging
import queue
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from laion_spark import __version__
from laion_spark.config import DownloadConfig
from laion_spark.download import robots, status, tdmrep
from laion_spark.download.cache import ExpiringCache
from laion_spark.download.connections import ConnectionKey, ConnectionPool
from laion_spark.download.dns import LookupFailed, Resolver
from laion_spark.download.hosts import HostFailures, HostTable, parse_retry_after
from laion_spark.download.proxy import ProxyRefused, ProxyRules, open_tunnel
from laion_spark.download.safety import (
    AllowedHost,
    address_before_lookup,
    blocked_reason,
    parse_allow_list,
    robots_disallows,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

PRODUCT_TOKEN = "laion_spark"
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Only these answers are worth asking again; a 404 or a robots opt-out will not change in a second.
TRANSIENT_HTTP_CODES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Answers that say the host is in trouble: they count towards giving up on it (download.host_failure_limit).
HOST_FAILURE_CODES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_CODES = frozenset({429, 503})
READ_CHUNK = 64 * 1024
# A redirect's or an error page's body up to this size is read to the end so that the connection can be reused.
DRAIN_BYTES = 64 * 1024
# URLs read ahead of the threads, per thread: enough to find other hosts' URLs when the input is sorted by URL (and
# so grouped by host), a few MB at most.
READ_AHEAD_PER_THREAD = 200


def user_agent(token: str = "") -> str:
    """Names the project, so that site owners can find out who fetched and opt out; ``token`` is the user's."""
    extra = f"; {token}" if token else ""
    return f"Mozilla/5.0 (compatible; {PRODUCT_TOKEN}/{__version__}; image-text dataset builder{extra})"


@dataclass(frozen=True)
class FetchSettings:
    """What a worker needs from ``DownloadConfig`` to fetch; hashable, so workers can cache one client per value.

    No defaults here: ``DownloadConfig`` holds them, and ``from_config`` is the one way to build these.
    """

    threads: int
    per_host_connections: int
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_body_bytes: int
    retries: int
    backoff_s: float
    max_redirects: int
    user_agent: str
    agent_tokens: tuple[str, ...]
    honour_x_robots_tag: bool
    disallowed_robots_values: tuple[str, ...]
    ssrf_guard: bool
    allowed_hosts: tuple[AllowedHost, ...]
    respect_robots_txt: bool
    respect_tdmrep: bool
    robots_cache_hosts: int
    robots_cache_ttl_s: float
    per_host_requests_per_s: float
    max_retry_after_s: float
    host_failure_limit: int
    dns_timeout_s: float
    dns_cache_hosts: int
    ca_bundle: str
    proxy: str

    @classmethod
    def from_config(cls, config: DownloadConfig) -> FetchSettings:
        tokens = (PRODUCT_TOKEN, config.user_agent_token) if config.user_agent_token else (PRODUCT_TOKEN,)
        return cls(
            threads=max(1, config.threads),
            per_host_connections=max(1, config.per_host_connections),
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            total_timeout_s=config.total_timeout_s,
            max_body_bytes=config.max_body_bytes,
            retries=max(0, config.retries),
            backoff_s=config.backoff_s,
            max_redirects=config.max_redirects,
            user_agent=user_agent(config.user_agent_token),
            agent_tokens=tuple(t.lower() for t in tokens),
            honour_x_robots_tag=config.honour_x_robots_tag,
            disallowed_robots_values=tuple(config.disallowed_robots_values),
            ssrf_guard=config.ssrf_guard,
            allowed_hosts=parse_allow_list(config.allowed_hosts),
            respect_robots_txt=config.respect_robots_txt,
            respect_tdmrep=config.respect_tdmrep,
            robots_cache_hosts=max(1, config.robots_cache_hosts),
            robots_cache_ttl_s=config.robots_cache_ttl_s,
            per_host_requests_per_s=max(0.0, config.per_host_requests_per_s),
            max_retry_after_s=max(0.0, config.max_retry_after_s),
            host_failure_limit=max(0, config.host_failure_limit),
            dns_timeout_s=config.dns_timeout_s,
            dns_cache_hosts=max(1, config.dns_cache_hosts),
            ca_bundle=config.ca_bundle,
            proxy=config.proxy,
        )


@dataclass
class FetchResult:
    """The outcome of one URL. ``status`` is ``success`` when ``body`` holds the bytes of a 2xx answer."""

    url: str
    status: str
    body: bytes | None = None
    http_status: int | None = None
    content_type: str | None = None
    error: str | None = None
    attempts: int = 0
    elapsed_s: float = 0.0
    final_url: str | None = None
    transient: bool = False


class _Stop(Exception):
    """Ends one attempt with a final status (and whether trying again could help).

    ``failing_host`` names the host when the failure is the host's (no answer, 5xx, 429: see ``host_failure_limit``);
    ``retry_after_s`` is how long the host asked us to wait.
    """

    def __init__(
        self,
        status_: str,
        error: str,
        transient: bool = False,
        http_status: int | None = None,
        failing_host: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(error)
        self.status = status_
        self.error = error
        self.transient = transient
        self.http_status = http_status
        self.failing_host = failing_host
        self.retry_after_s = retry_after_s
        self.reusable = False  # the response was read to its end: the connection can serve another request

    def prefixed(self, prefix: str) -> _Stop:
        return _Stop(
            self.status,
            f"{prefix}{self.error}",
            self.transient,
            self.http_status,
            self.failing_host,
            self.retry_after_s,
        )


class _DeadlineRaw(io.RawIOBase):
    """A socket reader that re-arms the timeout before every ``recv``: min(read timeout, time left)."""

    def __init__(self, sock: socket.socket, deadline: float, read_timeout_s: float):
        self._sock = sock
        self._deadline = deadline
        self._read_timeout_s = read_timeout_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _Stop(status.TIMEOUT, "total timeout passed while reading")
        self._sock.settimeout(min(self._read_timeout_s, left))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """What ``http.client`` sees as its socket: every read and write is bounded by the fetch's deadline."""

    def __init__(self, sock: socket.socket, deadline: float, read_timeout_s: float):
        self._sock = sock
        self._deadline = deadline
        self._read_timeout_s = read_timeout_s

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineRaw(self._sock, self._deadline, self._read_timeout_s), READ_CHUNK)

    def sendall(self, data: bytes) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _Stop(status.TIMEOUT, "total timeout passed while sending")
        self._sock.settimeout(min(self._read_timeout_s, left))
        self._sock.sendall(data)

    def close(self) -> None:
        # http.client "closes" the connection as soon as it sees Connection: close, before the body is read;
        # the real socket is closed by the fetch that opened it.
        pass


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _parse_target(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _Stop(status.FAILED_TO_DOWNLOAD, f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Stop(status.FAILED_TO_DOWNLOAD, f"unsupported URL scheme {scheme!r}")
    if not parts.hostname:
        raise _Stop(status.FAILED_TO_DOWNLOAD, "URL has no host")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    # http.client refuses control characters and spaces in the request line; a browser would percent-encode them.
    path = "".join(c if 0x20 < ord(c) < 0x7F else _percent_encode(c) for c in path)
    return _Target(scheme, parts.hostname, port or (443 if scheme == "https" else 80), path)


def _percent_encode(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8"))


class _Policy:
    """What a request is for: an image (checked against the opt-outs) or a policy file (robots.txt, tdmrep.json)."""

    def __init__(self, accept: str, max_bytes: int, truncate: bool, check_opt_outs: bool):
        self.accept = accept
        self.max_bytes = max_bytes
        self.truncate = truncate
        self.check_opt_outs = check_opt_outs


_IMAGE_ACCEPT = "image/avif,image/webp,image/*,*/*;q=0.8"


class Fetcher:
    """Fetches URLs with a thread pool, per-host limits, retries, the safety checks and the politeness rules.

    Build one per Python worker (see :func:`laion_spark.download.stage.worker_fetcher`) and reuse it: the pool, the
    per-host slots, the DNS, robots.txt and tdmrep.json caches and the idle connections live as long as the worker.
    ``resolver`` replaces the DNS resolver (tests point it at a name server that never answers).
    """

    def __init__(self, settings: FetchSettings, resolver: Resolver | None = None):
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="laion-fetch")
        self._hosts = HostTable(settings.per_host_connections, settings.per_host_requests_per_s)
        self._resolver = resolver or Resolver(
            settings.dns_timeout_s, settings.dns_cache_hosts, threads=max(4, settings.threads // 4)
        )
        self._connections = ConnectionPool(settings.per_host_connections, max(16, 2 * settings.threads))
        self._robots: ExpiringCache[tuple[str, str, int], robots.RobotsRules | _Stop] = ExpiringCache(
            settings.robots_cache_hosts
        )
        self._tdmrep: ExpiringCache[tuple[str, str, int], tdmrep.TdmRules] = ExpiringCache(settings.robots_cache_hosts)
        # Read here, in the worker: the proxy environment that matters is the executors', not the driver's.
        self._proxies = ProxyRules.from_setting(settings.proxy)
        self._tls = ssl.create_default_context(cafile=settings.ca_bundle or None)
        self._local = threading.local()
        self._image = _Policy(_IMAGE_ACCEPT, settings.max_body_bytes, truncate=False, check_opt_outs=True)
        policy_bytes = min(settings.max_body_bytes, robots.MAX_ROBOTS_BYTES)
        self._policy_file = _Policy("text/plain,application/json,*/*;q=0.5", policy_bytes, True, False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._resolver.close()
        self._connections.close()

    def fetch_many(self, urls: Iterable[str]) -> Iterator[FetchResult]:
        """Results in completion order; the input is read a bounded way ahead, so it can be a stream."""
        return self.map_unordered(self.fetch, urls)

    # ----------------------------------------------------------------------------------------------- scheduling

    def map_unordered(self, work: Callable[[str], T], urls: Iterable[str]) -> Iterator[T]:
        """``work(url)`` on the pool (fetch, then decode in the same thread), one result per URL, in completion order.

        Scheduled by host: the URLs read ahead wait in one queue per host, and a thread is given a URL only when its
        host has a free connection slot and request turn, so threads always work for the hosts that can answer. A
        host given up on (``host_failure_limit``) gets its URLs' results without a request; that lasts for this call
        (one Spark task), not for the worker's life.
        """
        failures = HostFailures(self.settings.host_failure_limit)
        events: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()

        def on_release(host: str) -> None:
            events.put(("released", host))

        self._hosts.add_listener(on_release)
        waiting: dict[str | None, deque[str]] = {}  # host -> its URLs read ahead, not yet started
        ready: deque[str | None] = deque()  # hosts that may be able to start a URL now
        blocked: set[str] = set()  # hosts whose slots are all busy: a release puts them back in ready
        timed: list[tuple[float, str]] = []  # (when, host): hosts waiting for their next request turn
        source = iter(urls)
        exhausted = False
        buffered = in_flight = 0
        read_ahead = READ_AHEAD_PER_THREAD * self.settings.threads
        try:
            while True:
                while not exhausted and buffered < read_ahead:
                    try:
                        url = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    host = _host_of(url)
                    if host not in waiting:
                        waiting[host] = deque()
                        if host not in blocked and not any(h == host for _, h in timed):
                            ready.append(host)
                    waiting[host].append(url)
                    buffered += 1
                now = time.monotonic()
                while timed and timed[0][0] <= now:
                    _, host = heapq.heappop(timed)
                    if host in waiting:
                        ready.append(host)
                while ready and in_flight < self.settings.threads:
                    host = ready.popleft()
                    pending = waiting.get(host)
                    if not pending:
                        waiting.pop(host, None)
                        continue
                    slot = host is not None and not failures.given_up(host)
                    if slot:
                        wait_s = self._hosts.try_start(host)  # type: ignore[arg-type]
                        if wait_s is not None:
                            if wait_s == float("inf"):
                                blocked.add(host)  # type: ignore[arg-type]
                            else:
                                heapq.heappush(timed, (now + wait_s, host))  # type: ignore[arg-type]
                            continue
                    url = pending.popleft()
                    buffered -= 1
                    in_flight += 1
                    future = self._pool.submit(self._run_scheduled, work, url, host if slot else None, failures)
                    future.add_done_callback(lambda done: events.put(("done", done)))
                    if pending:
                        ready.append(host)  # round robin: the host's next URL after the other hosts' turn
                    else:
                        del waiting[host]
                if exhausted and not in_flight and not waiting:
                    return
                timeout = max(0.001, timed[0][0] - time.monotonic()) if timed else None
                try:
                    kind, item = events.get(timeout=timeout)
                except queue.Empty:
                    continue
                while True:
                    if kind == "done":
                        in_flight -= 1
                        yield item.result()  # type: ignore[attr-defined]
                    elif item in blocked:
                        blocked.discard(item)  # type: ignore[arg-type]
                        if item in waiting:
                            ready.append(item)  # type: ignore[arg-type]
                    try:
                        kind, item = events.get_nowait()
                    except queue.Empty:
                        break
        finally:
            self._hosts.remove_listener(on_release)

    def _run_scheduled(self, work: Callable[[str], T], url: str, host: str | None, failures: HostFailures) -> T:
        """One URL on a pool thread, holding the slot and request turn of ``host`` the scheduler took for it."""
        local = self._local
        local.failures = failures
        local.holding = {host} if host is not None else set()
        local.prepaid = host
        try:
            return work(url)
        finally:
            local.failures = None
            local.prepaid = None
            local.holding = set()
            if host is not None:
                self._hosts.release(host)

    @contextmanager
    def _hold(self, host: str, deadline: float) -> Iterator[None]:
        """A connection slot of ``host`` for the block, unless this thread holds one already."""
        holding: set[str] = getattr(self._local, "holding", None) or set()
        self._local.holding = holding
        if host in holding:
            yield
            return
        if not self._hosts.acquire(host, deadline):
            raise _Stop(status.TIMEOUT, f"total timeout passed waiting for a connection slot to {host}")
        holding.add(host)
        try:
            yield
        finally:
            holding.discard(host)
            self._hosts.release(host)

    def _take_turn(self, host: str, deadline: float) -> None:
        """Wait for the next request turn of ``host`` (the rate limit and any Retry-After pause)."""
        if getattr(self._local, "prepaid", None) == host:
            self._local.prepaid = None  # the scheduler took this turn when it started the URL
            return
        start = self._hosts.take_turn(host, deadline)
        if start is None:
            raise _Stop(
                status.TIMEOUT,
                f"total timeout would pass before the next request turn of {host} "
                "(download.per_host_requests_per_s, Retry-After)",
                transient=False,
            )
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    # ----------------------------------------------------------------------------------------------- one URL

    def fetch(self, url: str) -> FetchResult:
        """One URL, retried with capped exponential backoff on transient errors; never raises.

        ``total_timeout_s`` bounds the whole of it (robots.txt, redirects, retries and backoff included), counted
        from the moment the first connection slot to the URL's host is ours.
        """
        settings = self.settings
        failures: HostFailures | None = getattr(self._local, "failures", None)
        host = _host_of(url)
        if failures is not None and failures.given_up(host):
            return FetchResult(
                url,
                status.HOST_GIVEN_UP,
                error=f"{host} failed {settings.host_failure_limit} URLs in a row; no more requests in this task",
            )
        holding: set[str] = getattr(self._local, "holding", None) or set()
        self._local.holding = holding
        acquired = False
        if host is not None and host not in holding:
            self._hosts.acquire(host, float("inf"))
            holding.add(host)
            acquired = True
        started = time.monotonic()
        deadline = started + settings.total_timeout_s
        attempts = 0
        failing_host: str | None = None
        try:
            while True:
                attempts += 1
                retry_after_s: float | None = None
                failing_host = None
                try:
                    result = self._follow(url, deadline, self._image)
                except _Stop as stop:
                    result = FetchResult(url, stop.status, error=stop.error, http_status=stop.http_status)
                    result.transient = stop.transient
                    failing_host, retry_after_s = stop.failing_host, stop.retry_after_s
                except Exception as exc:  # a bug or an exotic failure must cost one URL, never the task
                    log.warning("unexpected error fetching %s", url, exc_info=True)
                    result = FetchResult(url, status.FAILED_TO_DOWNLOAD, error=f"{type(exc).__name__}: {exc}")
                delay = min(
                    settings.max_retry_after_s, max(settings.backoff_s * (2 ** (attempts - 1)), retry_after_s or 0)
                )
                if not result.transient or attempts > settings.retries or time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
        finally:
            if acquired:
                holding.discard(host)  # type: ignore[arg-type]
                self._hosts.release(host)  # type: ignore[arg-type]
        if failures is not None and host is not None:
            if failing_host is not None:
                failures.record(failing_host, failed=True)
            else:
                failures.record(host, failed=False)
        result.attempts = attempts
        result.elapsed_s = time.monotonic() - started
        return result

    def _follow(self, url: str, deadline: float, policy: _Policy) -> FetchResult:
        """Every hop: its host not given up, its address checked, its robots.txt and tdmrep.json, then the GET."""
        failures: HostFailures | None = getattr(self._local, "failures", None)
        current = url
        for _ in range(self.settings.max_redirects + 1):
            target = _parse_target(current)
            if failures is not None and failures.given_up(target.host):
                raise _Stop(status.HOST_GIVEN_UP, f"{target.host} is given up on for this task (redirect target)")
            addresses = self._checked_addresses(target, deadline)
            with self._hold(target.host, deadline):
                if policy.check_opt_outs:
                    self._check_site_rules(target, deadline)
                result = self._request(current, target, addresses, deadline, policy)
            if isinstance(result, str):
                current = result
                continue
            result.url, result.final_url = url, current
            return result
        raise _Stop(status.FAILED_TO_DOWNLOAD, f"more than {self.settings.max_redirects} redirects (last: {current})")

    # ----------------------------------------------------------------------------------------------- site rules

    def _check_site_rules(self, target: _Target, deadline: float) -> None:
        settings = self.settings
        key = (target.scheme, target.host, target.port)
        if settings.respect_robots_txt:
            try:
                rules = self._robots.get(key, lambda: self._fetch_robots(target, deadline), deadline - time.monotonic())
            except TimeoutError:
                raise _Stop(status.TIMEOUT, f"total timeout passed waiting for {_origin(target)}/robots.txt") from None
            if isinstance(rules, _Stop):
                raise rules.prefixed("robots.txt: ")
            if not rules.allows(target.path, settings.agent_tokens):
                raise _Stop(status.DISALLOWED, f"robots.txt of {target.host_header} disallows {target.path}")
        if settings.respect_tdmrep:
            try:
                tdm = self._tdmrep.get(key, lambda: self._fetch_tdmrep(target, deadline), deadline - time.monotonic())
            except TimeoutError:
                raise _Stop(
                    status.TIMEOUT, f"total timeout passed waiting for {_origin(target)}/.well-known/tdmrep.json"
                ) from None
            if tdm.reserves(target.path):
                raise _Stop(
                    status.DISALLOWED, f"tdmrep.json of {target.host_header} reserves TDM rights on {target.path}"
                )

    def _fetch_robots(self, target: _Target, deadline: float) -> tuple[robots.RobotsRules | _Stop, float]:
        ttl_s = self.settings.robots_cache_ttl_s
        try:
            fetched = self._follow(f"{_origin(target)}/robots.txt", deadline, self._policy_file)
        except _Stop as stop:
            if stop.status == status.HTTP_ERROR and stop.http_status is not None:
                return robots.rules_for_status(stop.http_status, None), ttl_s
            # Unreachable: this URL and those waiting with it fail with the network's status; not kept, so the next
            # URL asks again (a host that stays unreachable is given up on: host_failure_limit).
            return stop, 0.0
        return robots.rules_for_status(fetched.http_status or 200, fetched.body), ttl_s

    def _fetch_tdmrep(self, target: _Target, deadline: float) -> tuple[tdmrep.TdmRules, float]:
        ttl_s = self.settings.robots_cache_ttl_s
        try:
            fetched = self._follow(f"{_origin(target)}{tdmrep.WELL_KNOWN_PATH}", deadline, self._policy_file)
        except _Stop as stop:
            # An answer that is no file reserves nothing; no answer is not kept (the image fetch will tell).
            return tdmrep.NO_RESERVATION, ttl_s if stop.http_status is not None else 0.0
        return tdmrep.rules_for_status(fetched.http_status or 200, fetched.body), ttl_s

    # ----------------------------------------------------------------------------------------------- one request

    def _request(
        self, url: str, target: _Target, addresses: list[tuple], deadline: float, policy: _Policy
    ) -> FetchResult | str:
        """One GET: the final result, or the absolute URL of a redirect to follow."""
        self._take_turn(target.host, deadline)
        for last_try in (False, True):
            sock, key, reused = self._open(target, addresses, deadline)
            reusable = False
            try:
                try:
                    response = self._send(sock, target, deadline, policy)
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                    if reused and not last_try:
                        continue  # the server closed the idle connection first: once more on a new one
                    raise
                result, reusable = self._answer(url, target, response, policy)
                return result
            except _Stop as stop:
                reusable = stop.reusable
                raise
            except TimeoutError:
                left = deadline - time.monotonic()
                what = "total timeout passed" if left <= 0 else f"no data for {self.settings.read_timeout_s:g}s"
                raise _Stop(status.TIMEOUT, what, transient=left > 0, failing_host=target.host) from None
            except ssl.SSLCertVerificationError as exc:
                raise _Stop(
                    status.FAILED_TO_DOWNLOAD, _certificate_error(target, exc), failing_host=target.host
                ) from None
            except ssl.SSLError as exc:
                raise _Stop(status.FAILED_TO_DOWNLOAD, f"TLS error: {exc}", failing_host=target.host) from None
            except (ConnectionError, http.client.IncompleteRead) as exc:
                raise _Stop(
                    status.FAILED_TO_DOWNLOAD, f"{type(exc).__name__}: {exc}", transient=True, failing_host=target.host
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Stop(status.FAILED_TO_DOWNLOAD, f"{type(exc).__name__}: {exc}") from None
            finally:
                if reusable:
                    self._connections.put(key, sock)
                else:
                    sock.close()
        raise AssertionError("unreachable")

    def _send(self, sock: socket.socket, target: _Target, deadline: float, policy: _Policy) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = _DeadlineSocket(sock, deadline, self.settings.read_timeout_s)  # type: ignore[assignment]
        connection.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", target.host_header)
        connection.putheader("User-Agent", self.settings.user_agent)
        connection.putheader("Accept", policy.accept)
        connection.endheaders()
        return connection.getresponse()

    def _answer(
        self, url: str, target: _Target, response: http.client.HTTPResponse, policy: _Policy
    ) -> tuple[FetchResult | str, bool]:
        """The response read and judged, and whether its connection can serve another request."""
        settings = self.settings
        code = response.status
        content_type = response.getheader("Content-Type")
        if code in REDIRECT_CODES:
            location = response.getheader("Location")
            if not location:
                raise _Stop(status.FAILED_TO_DOWNLOAD, f"HTTP {code} without a Location", http_status=code)
            return urljoin(url, location.strip()), _drained(response)
        if code >= 400 or code < 200:
            retry_after_s = None
            if code in RETRY_AFTER_CODES:
                asked = parse_retry_after(response.getheader("Retry-After"))
                retry_after_s = min(settings.max_retry_after_s, asked if asked is not None else settings.backoff_s)
                self._hosts.defer(target.host, retry_after_s)
            stop = _Stop(
                status.HTTP_ERROR,
                f"HTTP {code} {response.reason}".strip(),
                transient=code in TRANSIENT_HTTP_CODES,
                http_status=code,
                failing_host=target.host if code in HOST_FAILURE_CODES else None,
                retry_after_s=retry_after_s,
            )
            stop.reusable = _drained(response)
            raise stop
        if policy.check_opt_outs:
            tags = response.headers.get_all("X-Robots-Tag") or []
            if settings.honour_x_robots_tag and robots_disallows(
                tags, settings.agent_tokens, settings.disallowed_robots_values
            ):
                raise _Stop(status.DISALLOWED, f"X-Robots-Tag: {'; '.join(tags)}", http_status=code)
            if settings.respect_tdmrep and tdmrep.header_reserves(response.headers.get_all("tdm-reservation") or []):
                raise _Stop(status.DISALLOWED, "tdm-reservation: 1 (TDMRep)", http_status=code)
        body = self._read_body(response, policy)
        # read1 leaves a Content-Length response open at its end (length 0): done all the same.
        reusable = not response.will_close and (response.isclosed() or response.length == 0)
        return FetchResult(url, status.SUCCESS, body=body, http_status=code, content_type=content_type), reusable

    def _read_body(self, response: http.client.HTTPResponse, policy: _Policy) -> bytes:
        limit = policy.max_bytes
        declared = response.getheader("Content-Length")
        if not policy.truncate and declared and declared.strip().isdigit() and int(declared) > limit:
            raise _Stop(status.TOO_LARGE, f"Content-Length {declared} above max_body_bytes {limit}", http_status=200)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read1(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                if policy.truncate:
                    chunks.append(chunk)
                    return b"".join(chunks)[:limit]
                raise _Stop(status.TOO_LARGE, f"body above max_body_bytes {limit}", http_status=response.status)
            chunks.append(chunk)
        if declared and declared.strip().isdigit() and size < int(declared):
            raise _Stop(
                status.FAILED_TO_DOWNLOAD,
                f"connection closed after {size} of {declared} bytes",
                transient=True,
                http_status=response.status,
            )
        return b"".join(chunks)

    # ----------------------------------------------------------------------------------------------- connections

    def _checked_addresses(self, target: _Target, deadline: float) -> list[tuple]:
        """Resolve once (cached, with a deadline) and check every address: the only addresses ever connected to."""
        settings = self.settings
        named = address_before_lookup(target.host) if settings.ssrf_guard else None
        if named is not None:
            reason = blocked_reason(target.host, named, target.port, settings.allowed_hosts)
            if reason is not None:
                raise _Stop(status.BLOCKED_ADDRESS, reason)
        try:
            infos = self._resolver.resolve(target.host, target.port, deadline)
        except LookupFailed as exc:
            raise _Stop(
                status.TIMEOUT if exc.timed_out else status.FAILED_TO_DOWNLOAD, str(exc), failing_host=target.host
            ) from None
        if settings.ssrf_guard:
            for *_, sockaddr in infos:
                reason = blocked_reason(target.host, sockaddr[0], target.port, settings.allowed_hosts)
                if reason is not None:
                    raise _Stop(status.BLOCKED_ADDRESS, reason)
        return infos

    def _open(
        self, target: _Target, addresses: list[tuple], deadline: float
    ) -> tuple[socket.socket, ConnectionKey, bool]:
        """A connection to one of the checked ``addresses``: an idle one of the same key, or a new one."""
        proxy = self._proxies.for_target(target.scheme, target.host, target.port)
        proxy_label = proxy.label if proxy is not None else ""
        for *_, sockaddr in addresses:
            key = (target.scheme, target.host, target.port, sockaddr[0], proxy_label)
            idle = self._connections.take(key)
            if idle is not None:
                return idle, key, True
        errors = []
        for family, kind, proto, _, sockaddr in addresses:
            key = (target.scheme, target.host, target.port, sockaddr[0], proxy_label)
            try:
                if proxy is None:
                    sock = self._connect(family, kind, proto, sockaddr, deadline)
                else:
                    sock = self._connect_via_proxy(proxy, sockaddr[0], target.port, deadline)
            except TimeoutError:
                errors.append(f"{sockaddr[0]}: connect timeout")
                continue
            except ProxyRefused as exc:
                errors.append(str(exc))
                continue
            except OSError as exc:
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            if target.scheme == "https":
                sock = self._start_tls(sock, target, deadline)
            return sock, key, False
        if deadline - time.monotonic() <= 0:
            raise _Stop(status.TIMEOUT, "total timeout passed while connecting", failing_host=target.host)
        timed_out = all(e.endswith("connect timeout") for e in errors)
        raise _Stop(
            status.TIMEOUT if timed_out else status.FAILED_TO_DOWNLOAD,
            f"cannot connect to {target.host}:{target.port} ({'; '.join(errors)})",
            transient=True,
            failing_host=target.host,
        )

    def _start_tls(self, sock: socket.socket, target: _Target, deadline: float) -> ssl.SSLSocket:
        """The TLS handshake, the certificate checked for the URL's host name (also sent as SNI)."""
        try:
            sock.settimeout(max(0.01, min(self.settings.connect_timeout_s, deadline - time.monotonic())))
            return self._tls.wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise _Stop(status.FAILED_TO_DOWNLOAD, _certificate_error(target, exc), failing_host=target.host) from None
        except ssl.SSLError as exc:
            sock.close()
            raise _Stop(status.FAILED_TO_DOWNLOAD, f"TLS error: {exc}", failing_host=target.host) from None
        except TimeoutError:
            sock.close()
            raise _Stop(status.TIMEOUT, "TLS handshake timed out", transient=True, failing_host=target.host) from None
        except OSError as exc:
            sock.close()
            raise _Stop(
                status.FAILED_TO_DOWNLOAD, f"TLS handshake failed: {exc}", transient=True, failing_host=target.host
            ) from None

    def _connect(self, family: int, kind: int, proto: int, sockaddr: tuple, deadline: float) -> socket.socket:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("total timeout passed")
        sock = socket.socket(family, kind, proto)
        sock.settimeout(min(self.settings.connect_timeout_s, left))
        try:
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect_via_proxy(self, proxy, address: str, port: int, deadline: float) -> socket.socket:
        """A CONNECT tunnel to the checked ``address``; the proxy itself is configuration, trusted, not guarded."""
        try:
            infos = self._resolver.resolve(proxy.host, proxy.port, deadline)
        except LookupFailed as exc:
            raise ProxyRefused(f"proxy {proxy.label}: {exc}") from None
        errors = []
        for family, kind, proto, _, sockaddr in infos:
            try:
                sock = self._connect(family, kind, proto, sockaddr, deadline)
            except OSError as exc:
                errors.append(f"{exc}")
                continue
            try:
                open_tunnel(sock, proxy, address, port, deadline, self.settings.read_timeout_s)
            except BaseException:
                sock.close()
                raise
            return sock
        raise ProxyRefused(f"cannot connect to proxy {proxy.label} ({'; '.join(errors)})")


def _host_of(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _origin(target: _Target) -> str:
    return f"{target.scheme}://{target.host_header}"


def _drained(response: http.client.HTTPResponse) -> bool:
    """Read a small leftover body to its end, so the connection can serve another request; whether it can."""
    declared = response.getheader("Content-Length")
    if response.will_close or not declared or not declared.strip().isdigit() or int(declared) > DRAIN_BYTES:
        return False
    try:
        response.read()
    except (OSError, http.client.HTTPException, _Stop):
        return False
    return response.isclosed()


def _certificate_error(target: _Target, exc: ssl.SSLCertVerificationError) -> str:
    reason = exc.verify_message or str(exc)
    return f"TLS certificate of {target.host_header} rejected: {reason}"
