"""A per-worker cache with a size cap and a time to live, that computes each missing key once.

Robots.txt, tdmrep.json and DNS answers are each fetched once per host: when several threads want the same missing
key, one computes it and the others wait for its answer (up to their own deadline) instead of asking the host again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class _Computation(Generic[V]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.finished = False
        self.value: V | None = None


class ExpiringCache(Generic[K, V]):
    """At most ``capacity`` entries (least recently used dropped first), each kept for the TTL its computation gave.

    A computation with a TTL of 0 is not kept, but the threads that waited for it still get its value.
    """

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._computing: dict[K, _Computation[V]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: K, compute: Callable[[], tuple[V, float]], wait_s: float) -> V:
        """The cached value, or ``compute()`` -> (value, ttl_s) run by this thread or another one computing it.

        Raises TimeoutError when another thread's computation is not done within ``wait_s``; when it raised, this
        thread computes in its turn.
        """
        give_up_at = time.monotonic() + wait_s
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] > time.monotonic():
                    self._entries.move_to_end(key)
                    return entry[1]
                running = self._computing.get(key)
                if running is None:
                    mine = self._computing[key] = _Computation()
                    break
            if not running.done.wait(max(0.0, give_up_at - time.monotonic())):
                raise TimeoutError("waited too long for another thread's answer")
            if running.finished:
                return running.value  # type: ignore[return-value]
        try:
            value, ttl_s = compute()
            mine.value, mine.finished = value, True
            if ttl_s > 0:
                with self._lock:
                    self._entries[key] = (time.monotonic() + ttl_s, value)
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)
            return value
        finally:
            with self._lock:
                self._computing.pop(key, None)
            mine.done.set()
