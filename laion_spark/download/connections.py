"""Idle keep-alive connections, kept per (scheme, host, port, checked address, proxy) and never shared across them.

The key holds the host name as well as the address: a TLS connection was verified for one name, and the allow-list
is judged per name, so a connection opened for ``a.example`` is never lent to ``b.example`` on the same address. A
connection is only ever taken after the fetcher resolved and checked the new target, so reuse never skips the SSRF
guard: the checked address is part of the key.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import OrderedDict

# Servers commonly close idle keep-alive connections after 5 to 15 seconds; reusing one they closed costs a retry.
IDLE_S = 4.0

ConnectionKey = tuple[str, str, int, str, str]  # scheme, host, port, address, proxy ("" for none)


class ConnectionPool:
    """At most ``per_key`` idle connections per key and ``total`` in all (the longest idle closed first)."""

    def __init__(self, per_key: int, total: int, idle_s: float = IDLE_S):
        self.per_key = max(1, per_key)
        self.total = max(1, total)
        self.idle_s = idle_s
        self._idle: OrderedDict[tuple[ConnectionKey, int], tuple[socket.socket, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: ConnectionKey) -> socket.socket | None:
        """An idle connection for ``key`` still open at our end and quiet at the server's, or None."""
        while True:
            with self._lock:
                found = next((k for k in reversed(self._idle) if k[0] == key), None)
                if found is None:
                    return None
                sock, since = self._idle.pop(found)
            if time.monotonic() - since <= self.idle_s and _quiet(sock):
                return sock
            sock.close()

    def put(self, key: ConnectionKey, sock: socket.socket) -> None:
        with self._lock:
            if sum(1 for k in self._idle if k[0] == key) >= self.per_key:
                sock.close()
                return
            self._idle[(key, id(sock))] = (sock, time.monotonic())
            while len(self._idle) > self.total:
                _, (oldest, _) = self._idle.popitem(last=False)
                oldest.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle.values()), OrderedDict()
        for sock, _ in idle:
            sock.close()


def _quiet(sock: socket.socket) -> bool:
    """An idle connection has nothing to read: end of stream is the server's close, data would be garbage.

    A non-blocking read rather than ``select``: a TLS 1.3 server sends session tickets after the handshake, which
    make the socket readable without any application data; the TLS layer consumes them here.
    """
    try:
        sock.setblocking(False)
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.recv(1)
            else:
                sock.recv(1, socket.MSG_PEEK)
        finally:
            sock.setblocking(True)
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except (OSError, ValueError):
        return False
    return False  # closed (b"") or unexpected bytes: either way, not reusable
