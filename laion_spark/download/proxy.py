"""Reaching the web through an HTTP proxy (``download.proxy``, or ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``).

Every request through the proxy is a CONNECT tunnel, for http as well as https, and the tunnel is asked for the IP
address the fetcher resolved and the SSRF guard checked, never for the host name: a proxy that resolved names itself
would let a hostile DNS answer (or a redirect) reach an internal address behind it. The name still travels inside
the tunnel (Host header, TLS SNI and certificate check), so virtual hosting works as without a proxy.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from laion_spark.config import ConfigError

MAX_PROXY_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = None  # a Proxy-Authorization value, from user:password in the proxy URL

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


def parse_proxy(url: str, source: str) -> Proxy:
    """``http://[user:password@]host[:port]``; ``source`` names the setting in the error."""
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{source} = {url!r}: {exc}; expected http://host:port") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"{source} = {url!r}: expected http://host:port (only HTTP proxies with CONNECT)")
    authorization = None
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(secret).decode("ascii")
    return Proxy(parts.hostname, port or 80, authorization)


@dataclass(frozen=True)
class ProxyRules:
    """Which proxy a URL goes through: by scheme, except hosts that ``NO_PROXY`` lists."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_setting(cls, proxy: str, environ: dict[str, str] | None = None) -> ProxyRules:
        """``download.proxy`` for both schemes when set; otherwise the environment of this (worker) process."""
        env = os.environ if environ is None else environ

        def read(name: str) -> str:
            return env.get(name.lower()) or env.get(name.upper()) or ""

        no_proxy = tuple(entry.strip().lower() for entry in read("no_proxy").split(",") if entry.strip())
        if proxy:
            configured = parse_proxy(proxy, "download.proxy")
            return cls(configured, configured, no_proxy)
        http_proxy, https_proxy = read("http_proxy"), read("https_proxy")
        return cls(
            parse_proxy(http_proxy, "HTTP_PROXY") if http_proxy else None,
            parse_proxy(https_proxy, "HTTPS_PROXY") if https_proxy else None,
            no_proxy,
        )

    def for_target(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self._bypassed(host, port):
            return None
        return proxy

    def _bypassed(self, host: str, port: int) -> bool:
        name = host.lower().rstrip(".")
        for entry in self.no_proxy:
            if entry == "*":
                return True
            pattern, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if entry_port and entry_port.isdigit() and int(entry_port) != port:
                continue
            pattern = pattern.lstrip("*").lstrip(".")
            try:
                if ipaddress.ip_address(name) in ipaddress.ip_network(pattern, strict=False):
                    return True
                continue
            except ValueError:
                pass
            if name == pattern or name.endswith("." + pattern):
                return True
        return False


class ProxyRefused(Exception):
    """The proxy answered CONNECT with something other than 2xx, or not at all."""


def open_tunnel(sock: socket.socket, proxy: Proxy, address: str, port: int, deadline: float, read_timeout_s: float):
    """Ask the proxy on ``sock`` for a tunnel to ``address`` (an IP literal) and ``port``; raises ProxyRefused."""
    authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.authorization:
        request += f"Proxy-Authorization: {proxy.authorization}\r\n"
    sock.settimeout(max(0.01, min(read_timeout_s, deadline - time.monotonic())))
    sock.sendall((request + "\r\n").encode("ascii"))
    answer = b""
    # Byte by byte up to the blank line: whatever follows belongs to the tunnel, not to the proxy.
    while not answer.endswith(b"\r\n\r\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("total timeout passed waiting for the proxy")
        sock.settimeout(min(read_timeout_s, left))
        byte = sock.recv(1)
        if not byte:
            raise ProxyRefused(f"proxy {proxy.label} closed the connection during CONNECT {authority}")
        answer += byte
        if len(answer) > MAX_PROXY_ANSWER_BYTES:
            raise ProxyRefused(f"proxy {proxy.label} sent an endless answer to CONNECT")
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit() or not 200 <= int(parts[1]) < 300:
        raise ProxyRefused(f"proxy {proxy.label} refused CONNECT {authority}: {status_line}")
