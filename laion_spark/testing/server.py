"""A small loopback image server for the demo, the benchmark and the tests.

``/img/{slug}-{seed}.{jpg|png|webp}`` draws the synthetic image ``slug`` (``red-circle-pale_blue``) with ``seed``
on request; ``/pool/{index}.jpg`` serves pre-encoded bytes by index (the benchmark's realistic JPEGs). Every
request is counted in ``server.hits``. It is a test fixture, not a web server: bind it to loopback only.
"""

from __future__ import annotations

import functools
import select
import socket
import socketserver
import ssl
import threading
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from laion_spark.download.tdmrep import WELL_KNOWN_PATH
from laion_spark.testing.synthetic import SyntheticImage, all_kinds, draw, encode

CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
# What the downloader asks each host for before its first image (download.respect_robots_txt, respect_tdmrep).
SITE_RULE_PATHS = ("/robots.txt", WELL_KNOWN_PATH)


@functools.cache
def _kinds_by_slug() -> dict[str, SyntheticImage]:
    return {kind.slug: kind for kind in all_kinds()}


@functools.lru_cache(maxsize=1024)
def synthetic_image_bytes(slug: str, seed: int, ext: str) -> bytes | None:
    """The encoded image for ``/img/{slug}-{seed}.{ext}``, or None when the slug or extension is unknown."""
    kind = _kinds_by_slug().get(slug)
    if kind is None or ext not in PIL_FORMATS:
        return None
    return encode(draw(kind, seed=seed), PIL_FORMATS[ext])


def synthetic_image_path(kind: SyntheticImage, seed: int = 0, ext: str = "jpg") -> str:
    return f"/img/{kind.slug}-{seed}.{ext}"


class ImageServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a hit counter and an optional pool of pre-encoded images."""

    daemon_threads = True
    # The downloader opens dozens of connections at once; the default backlog of 5 would refuse some.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], pool: Sequence[bytes] = ()):
        super().__init__(address, handler)
        self.pool = list(pool)
        self.hits: Counter[str] = Counter()
        self._hits_lock = threading.Lock()
        self.connections = 0  # TCP connections accepted: keep-alive tests count them
        self.tls: ssl.SSLContext | None = None  # set by serve_tls
        self.server_names: list[str | None] = []  # the SNI of every TLS handshake, None when the client sent none
        self.failed_handshakes = 0

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        with self._hits_lock:
            self.connections += 1
        if self.tls is not None:
            # The handshake happens in the request's thread (finish_request), not in the accept loop.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(5.0)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ssl.SSLError):
                with self._hits_lock:
                    self.failed_handshakes += 1
                return
        super().finish_request(request, client_address)

    def count(self, path: str) -> None:
        with self._hits_lock:
            self.hits[path] += 1

    def image_hits(self) -> Counter[str]:
        """The requests by path, without the site rules a polite fetcher asks each host for (robots.txt, TDMRep)."""
        with self._hits_lock:
            return Counter({path: n for path, n in self.hits.items() if path not in SITE_RULE_PATHS})

    @property
    def total_hits(self) -> int:
        with self._hits_lock:
            return sum(self.hits.values())

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"{'https' if self.tls is not None else 'http'}://{host}:{port}"


class SyntheticImageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ImageServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # thousands of requests per benchmark; the hit counter is the log

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.count(self.path)
        self.serve_image(self.path.split("?", 1)[0])

    def serve_image(self, path: str) -> None:
        body, content_type = self.resolve(path)
        if body is None:
            self.send_plain(404, b"not found")
            return
        self.send_bytes(200, body, content_type)

    def resolve(self, path: str) -> tuple[bytes | None, str]:
        if path.startswith("/pool/") and self.server.pool:
            index = path[len("/pool/") :].rsplit(".", 1)[0]
            if index.isdigit():
                return self.server.pool[int(index) % len(self.server.pool)], "image/jpeg"
        if path.startswith("/img/"):
            name, _, ext = path[len("/img/") :].rpartition(".")
            slug, _, seed = name.rpartition("-")
            if seed.isdigit():
                return synthetic_image_bytes(slug, int(seed), ext), CONTENT_TYPES.get(ext, "")
        return None, ""

    def send_bytes(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_plain(self, code: int, body: bytes) -> None:
        self.send_bytes(code, body, "text/plain")


def start_server(
    handler: type[BaseHTTPRequestHandler] = SyntheticImageHandler,
    host: str = "127.0.0.1",
    port: int = 0,
    pool: Sequence[bytes] = (),
    server_class: type[ImageServer] = ImageServer,
) -> ImageServer:
    """Start ``handler`` on ``host``:``port`` (0: any free port) in a daemon thread; ``server.shutdown()`` stops it."""
    server = server_class((host, port), handler, pool)
    threading.Thread(target=server.serve_forever, name=f"image-server-{server.server_address[1]}", daemon=True).start()
    return server


def serve_synthetic_images(
    host: str = "127.0.0.1", port: int = 0, pool: Sequence[bytes] = ()
) -> tuple[ImageServer, str]:
    """Start the synthetic image server in a thread and return it with its base URL (``http://127.0.0.1:PORT``)."""
    server = start_server(SyntheticImageHandler, host, port, pool)
    return server, server.base_url


def serve_tls(
    context: ssl.SSLContext,
    handler: type[BaseHTTPRequestHandler] = SyntheticImageHandler,
    host: str = "127.0.0.1",
    server_class: type[ImageServer] = ImageServer,
) -> ImageServer:
    """``handler`` over TLS with ``context`` (its certificate and key loaded); ``server.server_names`` records SNI."""
    server = start_server(handler, host, server_class=server_class)

    def record_server_name(_connection: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        server.server_names.append(name)

    context.sni_callback = record_server_name
    server.tls = context
    return server


class ConnectProxy(socketserver.ThreadingTCPServer):
    """A small HTTP proxy that only speaks CONNECT, as the ones VPCs route egress through; ``targets`` lists what it
    was asked to connect to. It connects wherever it is told: judging targets is the client's job."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]):
        super().__init__(address, _ConnectHandler)
        self.targets: list[str] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _ConnectHandler(socketserver.BaseRequestHandler):
    server: ConnectProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(5.0)
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = request_line.partition(" ")
        authority = rest.split(" ", 1)[0]
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        self.server.targets.append(authority)
        host, _, port = authority.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=5.0)
        except (OSError, ValueError):
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        _pipe(client, upstream)


def _pipe(one: socket.socket, other: socket.socket, idle_s: float = 15.0) -> None:
    """Copy bytes both ways until either side closes or both are idle for ``idle_s``."""
    peers = {one: other, other: one}
    try:
        while True:
            readable, _, _ = select.select(list(peers), [], [], idle_s)
            if not readable:
                return
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)
    except OSError:
        pass
    finally:
        one.close()
        other.close()


def start_connect_proxy(host: str = "127.0.0.1") -> ConnectProxy:
    """Start a CONNECT proxy on a free port of ``host`` in a daemon thread; ``proxy.shutdown()`` stops it."""
    proxy = ConnectProxy((host, 0))
    threading.Thread(target=proxy.serve_forever, name="connect-proxy", daemon=True).start()
    return proxy
