"""DNS for the fetcher: one lookup per host per worker (cached, failures included), each with a deadline.

``socket.getaddrinfo`` has no timeout of its own: a name server that never answers holds the calling thread for as
long as the C resolver's retries last. Lookups therefore run on a small pool of their own, and the fetch waits at most
``download.dns_timeout_s`` for the answer; a lookup that outlives it finishes (or not) on the lookup pool, never on a
fetch thread.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from laion_spark.download.cache import ExpiringCache

# getaddrinfo gives no TTL; five minutes is the order of most records' and bounds how stale an address can be.
ANSWER_TTL_S = 300.0
# A failed or timed-out lookup is remembered for a minute: the host's other URLs fail at once, not one timeout each.
FAILURE_TTL_S = 60.0

AddressInfo = tuple  # one getaddrinfo entry: (family, type, proto, canonname, sockaddr)
Lookup = Callable[..., list]


class LookupFailed(Exception):
    """A name that does not resolve (``timed_out``: no answer within the deadline)."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class _Failure:
    message: str
    timed_out: bool


class Resolver:
    """Resolves host names with a per-worker cache and a deadline; ``lookup`` is ``socket.getaddrinfo`` by default."""

    def __init__(self, timeout_s: float, cache_hosts: int, lookup: Lookup = socket.getaddrinfo, threads: int = 8):
        self.timeout_s = timeout_s
        self._lookup = lookup
        self._cache: ExpiringCache[tuple[str, int], list[AddressInfo] | _Failure] = ExpiringCache(cache_hosts)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="laion-dns")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def resolve(self, host: str, port: int, deadline: float) -> list[AddressInfo]:
        """getaddrinfo's answer for ``host``:``port`` (TCP), within ``min(timeout_s, deadline)``; or LookupFailed."""
        name = host.lower().rstrip(".")
        if name == "invalid" or name.endswith(".invalid"):
            # RFC 6761: never resolves, so no query is sent.
            raise LookupFailed(f"cannot resolve {host}: .invalid names never resolve (RFC 6761)")
        wait_s = max(0.0, min(self.timeout_s, deadline - time.monotonic()))
        try:
            answer = self._cache.get((name, port), lambda: self._ask(host, port, wait_s), wait_s)
        except TimeoutError:
            raise LookupFailed(f"DNS lookup of {host} gave no answer within {wait_s:.3g}s", timed_out=True) from None
        if isinstance(answer, _Failure):
            raise LookupFailed(answer.message, answer.timed_out)
        return answer

    def _ask(self, host: str, port: int, wait_s: float) -> tuple[list[AddressInfo] | _Failure, float]:
        future = self._pool.submit(self._lookup, host, port, type=socket.SOCK_STREAM)
        try:
            return list(future.result(timeout=wait_s)), ANSWER_TTL_S
        except FutureTimeout:
            message = f"DNS lookup of {host} gave no answer within {wait_s:.3g}s"
            # Only a full-length wait says the name server is silent; a URL's last fraction of a second does not.
            return _Failure(message, timed_out=True), FAILURE_TTL_S if wait_s >= self.timeout_s else 0.0
        except (OSError, UnicodeError) as exc:
            return _Failure(f"cannot resolve {host}: {exc}", timed_out=False), FAILURE_TTL_S
