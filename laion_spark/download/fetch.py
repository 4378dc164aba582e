"""The HTTP client: one GET per URL, redirects followed by hand, every hop checked by the SSRF guard.

Built on ``http.client`` over a socket we connect ourselves, which gives full control of what matters against
hostile servers: the exact IP connected to (resolved and checked once, no second lookup), the connect and read
timeouts, a total deadline checked before every ``recv`` (a slow drip cannot stretch it), and the body size.
"""

from __future__ import annotations

import http.client
import io
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from laion_spark import __version__
from laion_spark.config import DownloadConfig
from laion_spark.download import status
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
READ_CHUNK = 64 * 1024


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
    """Ends one attempt with a final status (and whether trying again could help)."""

    def __init__(self, status_: str, error: str, transient: bool = False, http_status: int | None = None):
        super().__init__(error)
        self.status = status_
        self.error = error
        self.transient = transient
        self.http_status = http_status


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


class Fetcher:
    """Fetches URLs with a thread pool, a per-host connection limit, retries and the safety checks.

    Build one per Python worker (see :func:`laion_spark.download.stage.worker_fetcher`) and reuse it: the pool and
    the per-host slots live as long as the worker.
    """

    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="laion-fetch")
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()
        self._tls = ssl.create_default_context()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def fetch_many(self, urls: Iterable[str]) -> Iterator[FetchResult]:
        """Results in completion order; at most ``2 * threads`` URLs in flight, so the input can be a stream."""
        return self.map_unordered(self.fetch, urls)

    def map_unordered(self, work: Callable[[str], T], urls: Iterable[str]) -> Iterator[T]:
        """``work(url)`` on the pool (fetch, then decode in the same thread), results in completion order."""
        in_flight: set[Future[T]] = set()
        limit = 2 * self.settings.threads
        for url in urls:
            in_flight.add(self._pool.submit(work, url))
            if len(in_flight) >= limit:
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        while in_flight:
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in done)

    def fetch(self, url: str) -> FetchResult:
        """One URL, retried with exponential backoff on transient errors; never raises.

        ``total_timeout_s`` bounds the whole of it (redirects, retries and backoff included), counted from the
        moment the first connection slot to the URL's host is ours.
        """
        settings = self.settings
        started: float | None = None
        deadline = float("inf")
        attempts = 0
        while True:
            attempts += 1
            try:
                target = _parse_target(url)
                if started is None:
                    self._slot(target.host).acquire()
                    started = time.monotonic()
                    deadline = started + settings.total_timeout_s
                    first_slot_held = True
                else:
                    first_slot_held = False
                result = self._follow(url, target, deadline, first_slot_held)
            except _Stop as stop:
                result = FetchResult(url, stop.status, error=stop.error, http_status=stop.http_status)
                result.transient = stop.transient
            except Exception as exc:  # a bug or an exotic failure must cost one URL, never the task
                log.warning("unexpected error fetching %s", url, exc_info=True)
                result = FetchResult(url, status.FAILED_TO_DOWNLOAD, error=f"{type(exc).__name__}: {exc}")
            delay = settings.backoff_s * (2 ** (attempts - 1))
            if not result.transient or attempts > settings.retries or time.monotonic() + delay >= deadline:
                break
            time.sleep(delay)
        result.attempts = attempts
        result.elapsed_s = time.monotonic() - started if started is not None else 0.0
        return result

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._slots_lock:
            slot = self._host_slots.get(host)
            if slot is None:
                slot = self._host_slots[host] = threading.BoundedSemaphore(self.settings.per_host_connections)
            return slot

    def _acquire_slot(self, host: str, deadline: float) -> threading.BoundedSemaphore:
        slot = self._slot(host)
        if not slot.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _Stop(status.TIMEOUT, f"total timeout passed waiting for a connection slot to {host}")
        return slot

    def _follow(self, url: str, target: _Target, deadline: float, first_slot_held: bool) -> FetchResult:
        current = url
        for hop in range(self.settings.max_redirects + 1):
            if hop > 0:
                target = _parse_target(current)
            slot = self._slot(target.host) if first_slot_held else self._acquire_slot(target.host, deadline)
            first_slot_held = False
            try:
                result = self._request(current, target, deadline)
            finally:
                slot.release()
            if isinstance(result, str):
                current = result
                continue
            result.url, result.final_url = url, current
            return result
        raise _Stop(status.FAILED_TO_DOWNLOAD, f"more than {self.settings.max_redirects} redirects (last: {current})")

    def _request(self, url: str, target: _Target, deadline: float) -> FetchResult | str:
        """One GET: the final result, or the absolute URL of a redirect to follow."""
        settings = self.settings
        sock = self._connect(target, deadline)
        try:
            if target.scheme == "https":
                sock.settimeout(min(settings.connect_timeout_s, max(0.01, deadline - time.monotonic())))
                sock = self._tls.wrap_socket(sock, server_hostname=target.host)
            connection = http.client.HTTPConnection(target.host, target.port)
            connection.sock = _DeadlineSocket(sock, deadline, settings.read_timeout_s)  # type: ignore[assignment]
            connection.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
            connection.putheader("Host", target.host_header)
            connection.putheader("User-Agent", settings.user_agent)
            connection.putheader("Accept", "image/avif,image/webp,image/*,*/*;q=0.8")
            connection.putheader("Connection", "close")
            connection.endheaders()
            response = connection.getresponse()
            code = response.status
            content_type = response.getheader("Content-Type")
            if code in REDIRECT_CODES:
                location = response.getheader("Location")
                if not location:
                    raise _Stop(status.FAILED_TO_DOWNLOAD, f"HTTP {code} without a Location", http_status=code)
                return urljoin(url, location.strip())
            if code >= 400 or code < 200:
                raise _Stop(
                    status.HTTP_ERROR,
                    f"HTTP {code} {response.reason}".strip(),
                    transient=code in TRANSIENT_HTTP_CODES,
                    http_status=code,
                )
            if settings.honour_x_robots_tag and robots_disallows(
                response.headers.get_all("X-Robots-Tag") or [], settings.agent_tokens, settings.disallowed_robots_values
            ):
                tag = "; ".join(response.headers.get_all("X-Robots-Tag") or [])
                raise _Stop(status.DISALLOWED, f"X-Robots-Tag: {tag}", http_status=code)
            body = self._read_body(response)
            return FetchResult(url, status.SUCCESS, body=body, http_status=code, content_type=content_type)
        except _Stop:
            raise
        except TimeoutError:
            left = deadline - time.monotonic()
            what = "total timeout passed" if left <= 0 else f"no data for {settings.read_timeout_s:g}s"
            raise _Stop(status.TIMEOUT, what, transient=left > 0) from None
        except ssl.SSLError as exc:
            raise _Stop(status.FAILED_TO_DOWNLOAD, f"TLS error: {exc}") from None
        except (ConnectionError, http.client.IncompleteRead) as exc:
            raise _Stop(status.FAILED_TO_DOWNLOAD, f"{type(exc).__name__}: {exc}", transient=True) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Stop(status.FAILED_TO_DOWNLOAD, f"{type(exc).__name__}: {exc}") from None
        finally:
            sock.close()

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        limit = self.settings.max_body_bytes
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > limit:
            raise _Stop(status.TOO_LARGE, f"Content-Length {declared} above max_body_bytes {limit}", http_status=200)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read1(READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
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

    def _connect(self, target: _Target, deadline: float) -> socket.socket:
        """Resolve once, check every address, connect to a checked one: never a second lookup."""
        settings = self.settings
        named = address_before_lookup(target.host) if settings.ssrf_guard else None
        if named is not None:
            reason = blocked_reason(target.host, named, target.port, settings.allowed_hosts)
            if reason is not None:
                raise _Stop(status.BLOCKED_ADDRESS, reason)
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _Stop(status.FAILED_TO_DOWNLOAD, f"cannot resolve {target.host}: {exc}") from None
        if settings.ssrf_guard:
            for *_, sockaddr in infos:
                reason = blocked_reason(target.host, sockaddr[0], target.port, settings.allowed_hosts)
                if reason is not None:
                    raise _Stop(status.BLOCKED_ADDRESS, reason)
        errors = []
        for family, kind, proto, _, sockaddr in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Stop(status.TIMEOUT, "total timeout passed while connecting")
            sock = socket.socket(family, kind, proto)
            sock.settimeout(min(settings.connect_timeout_s, left))
            try:
                sock.connect(sockaddr)
                return sock
            except TimeoutError:
                sock.close()
                errors.append(f"{sockaddr[0]}: connect timeout")
            except OSError as exc:
                sock.close()
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
        timed_out = all(e.endswith("connect timeout") for e in errors)
        raise _Stop(
            status.TIMEOUT if timed_out else status.FAILED_TO_DOWNLOAD,
            f"cannot connect to {target.host}:{target.port} ({'; '.join(errors)})",
            transient=True,
        )
