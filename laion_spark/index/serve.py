"""``laion-spark serve``: the kNN index over HTTP, speaking clip-retrieval's back-end API (``clip_back.py``).

Endpoints, with clip_back's request and response shapes, so that clip-retrieval's front end and ``ClipClient`` can
point at it:

- ``POST /knn-service``: ``{"text" | "image" (base64) | "image_url" | "embedding_input", "modality": "image"|"text",
  "num_images", "num_result_ids", "indice_name", "deduplicate", ...}`` -> a JSON list of results, best first, each
  ``{"id", "similarity", "url", "caption", "uid", ...metadata}`` (metadata on the first ``num_images``, ids and
  similarities only after them, as clip_back does). Given several query inputs, their vectors are averaged, as
  ``laion-spark search --text --image`` does. ``use_mclip``, ``use_safety_model``, ``use_violence_detector``,
  ``aesthetic_score`` and ``aesthetic_weight`` are accepted and ignored (no such models here).
- ``POST /metadata``: ``{"ids": [...], "indice_name"}`` -> ``[{"id", "metadata": {...}}]`` for the ids the index
  holds.
- ``GET /indices-list``: ``["<index name>"]``.

Errors are JSON, ``{"message": "..."}``, with a 4xx status for everything a client can cause; anything else is a
500 whose trace goes to the server log only. Every answer carries CORS headers (the front end runs in a browser).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from laion_spark.config import Config
from laion_spark.index.layout import index_location
from laion_spark.index.query import BadQuery, combine_queries, encoder_for, normalise_embedding
from laion_spark.index.search import Match, find_matches
from laion_spark.index.store import IndexStore, LoadedIndex

log = logging.getLogger(__name__)

KNN_PATH = "/knn-service"
METADATA_PATH = "/metadata"
INDICES_PATH = "/indices-list"
ROUTES = {KNN_PATH: "POST", METADATA_PATH: "POST", INDICES_PATH: "GET"}
# Metadata columns as the API names them: the pair's own CLIP similarity would collide with the query similarity
# (clip_back overwrites it); LAION's released parquet spells the NSFW tag "NSFW", which clip_back returns by default.
RENAMED_COLUMNS = {"similarity": "pair_similarity"}
IGNORED_FIELDS = ("use_mclip", "use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight")


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the message the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class SearchService:
    """What the endpoints do, without HTTP: the index (reloaded when it changes), the query encoder, the limits."""

    def __init__(self, config: Config, lake: str):
        self.config = config
        self.name = config.serve.index_name or index_name(lake)
        self.store = IndexStore(
            index_location(lake, config.index.path),
            nprobe=config.index.nprobe,
            check_interval_s=config.serve.reload_interval_s,
        )
        self._fetcher = None
        self._fetcher_lock = threading.Lock()
        self.encoder()  # load the model now: a model that cannot be loaded stops the server before it listens

    def encoder(self, index: LoadedIndex | None = None):
        index = index or self.store.current()
        return encoder_for(index.manifest, self.config.clip, self.config.download.max_pixels)

    def indices(self) -> list[str]:
        return [self.name]

    def knn(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        limit = self.config.serve.max_results
        num_images = _count(request, "num_images", default=100, limit=limit)
        num_result_ids = _count(request, "num_result_ids", default=num_images, limit=limit)
        modality = request.get("modality") or "image"
        if modality not in ("image", "text"):
            raise ApiError(400, f"modality must be 'image' or 'text', got {modality!r}")
        self._check_indice_name(request)
        deduplicate = _flag(request, "deduplicate")
        for name in IGNORED_FIELDS:
            if request.get(name):
                log.debug("%s=%r is not supported here and ignored", name, request[name])
        index = self.store.current()
        query = self._query_vector(request, index)
        try:
            matches = self._find(index, query, num_result_ids, modality, deduplicate)
        except OSError:
            # A rebuild deleted files of the version this query had loaded (metadata is read on demand): the
            # manifest already names the new ones.
            self.store.refresh(force=True)
            matches = self._find(self.store.current(), query, num_result_ids, modality, deduplicate)
        return [_result(match, with_metadata=position < num_images) for position, match in enumerate(matches)]

    def _find(self, index: LoadedIndex, query: np.ndarray, k: int, modality: str, deduplicate: bool) -> list[Match]:
        return find_matches(index, query, k, modality, deduplicate, self.config.serve.dedup_similarity)

    def metadata(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        ids = request.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ApiError(400, "ids must be a list of integer ids")
        if len(ids) > self.config.serve.max_results:
            raise ApiError(400, f"at most {self.config.serve.max_results} ids a request (serve.max_results)")
        self._check_indice_name(request)
        try:
            found = self.store.current().metadata(ids)
        except OSError:
            self.store.refresh(force=True)
            found = self.store.current().metadata(ids)
        return [{"id": i, "metadata": _api_metadata(found[i])} for i in ids if i in found]

    def _check_indice_name(self, request: dict[str, Any]) -> None:
        name = request.get("indice_name")
        if name not in (None, "", self.name):
            raise ApiError(400, f"unknown indice_name {name!r}; this server has {self.indices()}")

    def _query_vector(self, request: dict[str, Any], index: LoadedIndex) -> np.ndarray:
        text = request.get("text")
        image = request.get("image")
        image_url = request.get("image_url")
        embedding = request.get("embedding_input")
        for name, value in (("text", text), ("image", image), ("image_url", image_url)):
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"{name} must be a string")
        if not (text or image or image_url or embedding is not None):
            raise ApiError(400, "no query: give text, image (base64), image_url or embedding_input")
        vectors = []
        try:
            if text:
                vectors.append(self.encoder(index).encode_text(text))
            if image:
                vectors.append(self.encoder(index).encode_image(_decode_base64(image)))
            if image_url:
                vectors.append(self.encoder(index).encode_image(self._fetch(image_url)))
            if embedding is not None:
                vectors.append(normalise_embedding(embedding, index.dim))
            return combine_queries(vectors)
        except BadQuery as exc:
            raise ApiError(400, str(exc)) from None

    def _fetch(self, url: str) -> bytes:
        """``image_url`` through the download stage's client: its SSRF guard, allow-list, timeouts and size cap."""
        if not self.config.serve.allow_image_url:
            raise ApiError(403, "image_url is disabled on this server (serve.allow_image_url); send the image itself")
        from laion_spark.download import status
        from laion_spark.download.fetch import Fetcher, FetchSettings

        with self._fetcher_lock:
            if self._fetcher is None:
                self._fetcher = Fetcher(FetchSettings.from_config(self.config.download))
        result = self._fetcher.fetch(url)
        if result.status == status.SUCCESS and result.body is not None:
            return result.body
        if result.status == status.BLOCKED_ADDRESS:
            raise ApiError(403, f"image_url refused: {result.error}")
        raise ApiError(400, f"image_url could not be fetched: {result.status}: {result.error}")

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()


def index_name(lake: str) -> str:
    """The name ``/indices-list`` gives the index: the lake's last path component (``laion_spark`` if none)."""
    path = urlsplit(lake).path if "://" in lake else lake
    return os.path.basename(path.rstrip("/")) or "laion_spark"


def _count(request: dict[str, Any], name: str, default: int, limit: int) -> int:
    value = request.get(name)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be a whole number, got {value!r}")
    if value < 1:
        raise ApiError(400, f"{name} must be at least 1, got {value}")
    if value > limit:
        raise ApiError(400, f"{name} is {value}; this server returns at most {limit} (serve.max_results)")
    return value


def _flag(request: dict[str, Any], name: str) -> bool:
    value = request.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}")
    return value


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL, as a browser's FileReader gives it
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image is not valid base64") from None


def _api_metadata(row: dict[str, Any]) -> dict[str, Any]:
    metadata = {RENAMED_COLUMNS.get(key, key): value for key, value in row.items() if key != "id"}
    metadata["NSFW"] = row.get("nsfw")
    return metadata


def _result(match: Match, with_metadata: bool) -> dict[str, Any]:
    result = _api_metadata(match.metadata) if with_metadata else {}
    result["id"] = match.id
    result["similarity"] = match.similarity
    return result


class SearchServer(ThreadingHTTPServer):
    """One thread per connection; the index and the model are shared by all of them."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: SearchService, token: str | None):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET  # --host ::1 works too
        self.service = service
        self.token = token
        self.max_body_bytes = service.config.serve.max_body_bytes
        super().__init__(address, SearchHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        self.service.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up or stalled is routine for a server; anything else is logged with its trace.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("connection from %s ended: %s", client_address, error)
            return
        log.error("unexpected error serving %s", client_address, exc_info=True)


class SearchHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the front end and ClipClient send one request after another
    server_version = "laion_spark-serve"
    server: SearchServer

    def setup(self) -> None:
        # A client that stops sending in the middle of a request must not hold its thread forever.
        self.timeout = self.server.service.config.serve.client_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        log.info("%s %s", self.address_string(), format % args)

    def handle_expect_100(self) -> bool:
        # curl asks before sending a body over 1 KB: refuse an oversized one (or a missing token) before it comes.
        self._body_read = False
        try:
            self._authorize()
            self._check_length(self.headers.get("Content-Length"))
        except ApiError as exc:
            self._error(exc.status, exc.message)
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802
        # A CORS preflight: browsers send it without credentials, so it needs no token (it returns no data).
        self._body_read = not self._announces_body()
        path = urlsplit(self.path).path
        if path not in ROUTES:
            self._error(404, f"no such endpoint {path}; there are {', '.join(sorted(ROUTES))}")
            return
        requested = self.headers.get("Access-Control-Request-Headers") or "Content-Type, Authorization"
        self._send(
            204,
            b"",
            {
                "Access-Control-Allow-Methods": f"{ROUTES[path]}, OPTIONS",
                "Access-Control-Allow-Headers": requested,
                "Access-Control-Max-Age": "600",
            },
        )

    def _handle(self, method: str) -> None:
        started = time.perf_counter()
        self._body_read = not self._announces_body()  # whether the connection can carry another request after ours
        try:
            self._authorize()
            path = urlsplit(self.path).path
            expected = ROUTES.get(path)
            if expected is None:
                raise ApiError(404, f"no such endpoint {path}; there are {', '.join(sorted(ROUTES))}")
            if method != expected:
                raise ApiError(405, f"{path} takes {expected}, not {method}")
            if path == INDICES_PATH:
                payload: Any = self.server.service.indices()
            else:
                request = self._read_json()
                if path == KNN_PATH:
                    payload = self.server.service.knn(request)
                else:
                    payload = self.server.service.metadata(request)
        except ApiError as exc:
            extra = {"Allow": f"{ROUTES[urlsplit(self.path).path]}, OPTIONS"} if exc.status == 405 else {}
            if exc.status == 401:
                extra["WWW-Authenticate"] = 'Bearer realm="laion_spark"'
            self._error(exc.status, exc.message, extra)
            return
        except Exception:
            log.error("%s %s failed:\n%s", method, self.path, traceback.format_exc())
            self._error(500, "internal server error; the server log has the details")
            return
        self._send(200, json.dumps(payload).encode("utf-8"), {"Content-Type": "application/json"})
        log.debug("%s %s answered in %.1f ms", method, self.path, 1000 * (time.perf_counter() - started))

    def _authorize(self) -> None:
        token = self.server.token
        if not token:
            return
        header = self.headers.get("Authorization") or ""
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "this server needs 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
            raise ApiError(401, "wrong token")

    def _read_json(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise ApiError(411, "a POST needs a Content-Length")
        length = self._check_length(declared)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, "the body did not arrive in time (serve.client_timeout_s)") from None
        if len(body) < length:
            raise ApiError(400, f"the body ended after {len(body)} of {length} bytes")
        self._body_read = True
        try:
            # clip-retrieval's front end posts JSON as text/plain (no preflight), as clip_back's force=True accepts.
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise ApiError(400, "the body must be a JSON object")
        return request

    def _announces_body(self) -> bool:
        declared = (self.headers.get("Content-Length") or "0").strip()
        return bool(self.headers.get("Transfer-Encoding")) or declared != "0"

    def _check_length(self, declared: str | None) -> int:
        if declared is None:
            return 0
        if not declared.strip().isdigit():
            raise ApiError(400, f"bad Content-Length {declared!r}")
        length = int(declared)
        limit = self.server.max_body_bytes
        if length > limit:
            raise ApiError(413, f"the body is {length} bytes; this server takes at most {limit} (serve.max_body_bytes)")
        return length

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"message": message}).encode("utf-8")
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        if not getattr(self, "_body_read", True):
            # The body of this request is still in the socket (refused before reading it): the connection cannot
            # carry a next request, so it is closed after the answer.
            self.close_connection = True
            headers = {**headers, "Connection": "close"}
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", "*")
        if status != 204:  # a 204 has no body, and no Content-Length (RFC 9110)
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def make_server(
    config: Config, lake: str, host: str = "127.0.0.1", port: int = 1234, token: str | None = None
) -> SearchServer:
    """A server bound to ``host``:``port`` (0: a free port), index and model loaded; ``serve_forever()`` runs it.

    Raises :class:`~laion_spark.index.layout.IndexMissing` without an index and a ConfigError (ModelLoadError) when
    the index's model cannot be loaded, before binding anything.
    """
    service = SearchService(config, lake)
    try:
        return SearchServer((host, port), service, token or None)
    except OSError as exc:
        from laion_spark.config import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _set_torch_threads() -> None:
    """Queries are one image or caption each and run one at a time (the model's lock): a few threads give the same
    latency as all of them and leave the other cores to faiss and to the requests being parsed."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))


def serve_forever(
    config: Config, lake: str, host: str = "127.0.0.1", port: int = 1234, token: str | None = None
) -> None:
    """Serve the lake's index until interrupted (Ctrl-C); prints the URL first."""
    _set_torch_threads()
    server = make_server(config, lake, host, port, token)
    index = server.service.store.current()
    print(
        f"serving the kNN index of {lake} ({index.count} vectors, {index.manifest.index_type}, "
        f"model {index.manifest.model.name}) as '{server.service.name}' on {server.url} "
        f"(POST {KNN_PATH}, POST {METADATA_PATH}, GET {INDICES_PATH})",
        flush=True,
    )
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --token: anyone who can reach it can query the index", host)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
