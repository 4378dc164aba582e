"""Per-host politeness: connection slots, a request rate, ``Retry-After``, and giving up on a host that keeps failing.

One :class:`HostTable` per fetcher (so per Python worker) holds every host's slots and pacing; the scheduler asks it
which hosts can start a URL now instead of parking pool threads on a busy host. :class:`HostFailures` lives for one
``map_unordered`` call (one Spark task): a host given up on stays given up for the rest of that task only.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Hosts idle this long are forgotten once the table is large, so a worker that sees millions of hosts stays small.
FORGET_IDLE_S = 600.0
FORGET_ABOVE_HOSTS = 50_000


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date), or None when unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class _Host:
    active: int = 0
    next_turn: float = 0.0  # the earliest time the next request may start (the rate limit)
    not_before: float = 0.0  # Retry-After or backoff: no request before this
    last_used: float = 0.0


class HostTable:
    """Connection slots (``connections`` per host) and request pacing (``requests_per_s`` per host, 0: no limit)."""

    def __init__(self, connections: int, requests_per_s: float):
        self.connections = max(1, connections)
        self.interval_s = 1.0 / requests_per_s if requests_per_s > 0 else 0.0
        self._hosts: dict[str, _Host] = {}
        self._changed = threading.Condition()
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(host)`` is called whenever a slot of ``host`` is released."""
        with self._changed:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[str], None]) -> None:
        with self._changed:
            self._listeners.remove(listener)

    def _host(self, host: str, now: float) -> _Host:
        state = self._hosts.get(host)
        if state is None:
            if len(self._hosts) >= FORGET_ABOVE_HOSTS:
                self._forget_idle(now)
            state = self._hosts[host] = _Host()
        state.last_used = now
        return state

    def _forget_idle(self, now: float) -> None:
        for name in [n for n, s in self._hosts.items() if s.active == 0 and now - s.last_used > FORGET_IDLE_S]:
            del self._hosts[name]

    def try_start(self, host: str) -> float | None:
        """Take a slot and the next request turn of ``host`` if both are free now: None when taken; otherwise how
        long until the turn comes (``inf`` when every slot is busy, so only a release can help)."""
        now = time.monotonic()
        with self._changed:
            state = self._host(host, now)
            if state.active >= self.connections:
                return float("inf")
            ready_at = max(state.next_turn, state.not_before)
            if ready_at > now:
                return ready_at - now
            state.active += 1
            state.next_turn = now + self.interval_s
            return None

    def acquire(self, host: str, deadline: float) -> bool:
        """Wait for a slot of ``host`` until ``deadline``; False when none came."""
        with self._changed:
            while True:
                state = self._host(host, time.monotonic())
                if state.active < self.connections:
                    state.active += 1
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 60.0))  # an infinite deadline is allowed; Condition.wait's is not

    def release(self, host: str) -> None:
        with self._changed:
            state = self._host(host, time.monotonic())
            state.active = max(0, state.active - 1)
            self._changed.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(host)

    def take_turn(self, host: str, deadline: float) -> float | None:
        """Reserve the next request turn of ``host``: the time it starts, or None when it would start after
        ``deadline`` (nothing is reserved then)."""
        now = time.monotonic()
        with self._changed:
            state = self._host(host, now)
            start = max(now, state.next_turn, state.not_before)
            if start > deadline:
                return None
            state.next_turn = start + self.interval_s
            return start

    def defer(self, host: str, delay_s: float) -> None:
        """No request to ``host`` for ``delay_s`` (a ``Retry-After``, or backoff after a 429 or 503)."""
        now = time.monotonic()
        with self._changed:
            state = self._host(host, now)
            state.not_before = max(state.not_before, now + delay_s)


class HostFailures:
    """Consecutive failures per host for one run; at ``limit`` the host is given up on (0: never)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._failures: dict[str, int] = {}
        self._given_up: set[str] = set()
        self._lock = threading.Lock()

    def given_up(self, host: str | None) -> bool:
        return host is not None and host in self._given_up

    def record(self, host: str, failed: bool) -> None:
        with self._lock:
            if not failed:
                self._failures.pop(host, None)
                return
            count = self._failures[host] = self._failures.get(host, 0) + 1
            if self.limit > 0 and count >= self.limit:
                self._given_up.add(host)

    def failures(self, host: str) -> int:
        with self._lock:
            return self._failures.get(host, 0)
