"""A real loopback HTTP server with the endpoints a hostile or broken web throws at the downloader.

Built on :mod:`laion_spark.testing.server` (threads, hit counter, ``/img/...`` synthetic images); the tests put the
images they make with Pillow into ``server.files`` and the server answers everything else from ``HOSTILE_PATHS``.
"""

from __future__ import annotations

import io
import time
from dataclasses import replace

from PIL import Image

from laion_spark.config import DownloadConfig
from laion_spark.testing.server import ImageServer, SyntheticImageHandler, start_server
from laion_spark.testing.synthetic import SyntheticImage, draw

DRIP_INTERVAL_S = 0.2
# Long enough to outlast any test timeout, short enough that a leaked handler thread ends on its own.
HOSTILE_STREAM_LIMIT_S = 15.0

HOSTILE_PATHS = (
    "/slow-drip.jpg",
    "/endless.jpg",
    "/redirect-loop",
    "/status/404",
    "/status/500",
    "/flaky.jpg",
    "/noai.jpg",
    "/noai-for-us.jpg",
    "/noai-for-others.jpg",
    "/to-other-server.jpg",
)


def make_image(fmt: str, kind: SyntheticImage | None = None, seed: int = 0, size: int = 400) -> bytes:
    """A real image above LAION's 5 KB minimum in ``fmt`` (JPEG, PNG, WEBP or GIF)."""
    image = draw(kind or SyntheticImage("red", "circle", "gray"), size=size, seed=seed)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format=fmt, quality=92)
    elif fmt == "WEBP":
        image.save(buffer, format=fmt, lossless=True)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_decompression_bomb() -> bytes:
    """A 20000 x 20000 PNG: about 48 KB on the wire, 400 million pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


class HostileHandler(SyntheticImageHandler):
    server: HostileServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        self.server.count(path)
        self.server.user_agents.append(self.headers.get("User-Agent", ""))
        if path in self.server.files:
            body, content_type = self.server.files[path]
            self.send_bytes(200, body, content_type)
        elif path == "/slow-drip.jpg":
            self.drip()
        elif path == "/endless.jpg":
            self.endless()
        elif path == "/redirect-loop":
            self.redirect("/redirect-loop-again")
        elif path == "/redirect-loop-again":
            self.redirect("/redirect-loop")
        elif path.startswith("/status/"):
            self.send_plain(int(path.rsplit("/", 1)[1]), b"error page")
        elif path == "/flaky.jpg":
            if self.server.hits[path] == 1:
                self.send_plain(503, b"try again later")
            else:
                self.send_bytes(200, self.server.image, "image/jpeg")
        elif path == "/noai.jpg":
            self.send_bytes(200, self.server.image, "image/jpeg", {"X-Robots-Tag": "noai"})
        elif path == "/noai-for-us.jpg":
            self.send_bytes(200, self.server.image, "image/jpeg", {"X-Robots-Tag": "laion_spark: noimageai, nofollow"})
        elif path == "/noai-for-others.jpg":
            self.send_bytes(200, self.server.image, "image/jpeg", {"X-Robots-Tag": "otherbot: noai"})
        elif path == "/to-other-server.jpg":
            self.redirect(self.server.other_server_url)
        else:
            self.serve_image(path)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def drip(self) -> None:
        """Promises 100 KB, then sends one byte every DRIP_INTERVAL_S: each read is quick, the whole never ends."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.stream(lambda: b"\xff", DRIP_INTERVAL_S)

    def endless(self) -> None:
        """No Content-Length, a body that never stops, as fast as the client reads."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        chunk = b"\xff\xd8" + b"\x00" * 65534
        self.stream(lambda: chunk, 0.0)

    def stream(self, chunk, interval_s: float) -> None:
        stop = time.monotonic() + HOSTILE_STREAM_LIMIT_S
        try:
            while time.monotonic() < stop:
                self.wfile.write(chunk())
                self.wfile.flush()
                if interval_s:
                    time.sleep(interval_s)
        except OSError:
            pass  # the client gave up, which is the point
        self.close_connection = True


class HostileServer(ImageServer):
    """The files the tests put up (path -> bytes, content type), the image behind the header tests, a redirect target."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.user_agents: list[str] = []
        self.image = make_image("JPEG", seed=99)
        self.other_server_url = "http://127.0.0.1:9/"


def start_hostile_server(other_server_url: str) -> HostileServer:
    """Start the hostile server on a free loopback port; ``/to-other-server.jpg`` redirects to ``other_server_url``."""
    server = start_server(HostileHandler, server_class=HostileServer)
    server.other_server_url = other_server_url
    return server  # type: ignore[return-value]


# Short deadlines keep the hostile-server tests quick; the slow drip runs far longer than this.
TOTAL_TIMEOUT_S = 1.5


def quick_download_config(**changes) -> DownloadConfig:
    """The download settings every download test starts from: small pool, 1 s timeouts, fast backoff."""
    base = DownloadConfig(
        threads=8,
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
        total_timeout_s=TOTAL_TIMEOUT_S,
        max_body_bytes=2 * 1024 * 1024,
        retries=2,
        backoff_s=0.05,
        per_host_requests_per_s=0,  # one loopback host serves every test URL; tests of the rate limit set it
    )
    return replace(base, **changes)
