"""`laion-spark serve`: clip-retrieval's back-end API over real HTTP on loopback, on the real index of the demo lake
(laion_spark.index.run_index), with the tiny CLIP model."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from laion_spark.cli import build_parser, main
from laion_spark.config import Config, ConfigError, apply_override
from laion_spark.index.search import search_lake
from laion_spark.index.serve import SearchServer, index_name, make_server
from laion_spark.testing.server import serve_synthetic_images

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served_lake(spark, demo_lake, tmp_path_factory) -> str:
    """A copy of the demo lake with its kNN index built by `laion-spark index`'s library function."""
    from laion_spark.index import run_index

    lake = str(tmp_path_factory.mktemp("serve") / "demo-lake")
    shutil.copytree(demo_lake.lake, lake)
    run_index(spark, demo_lake.config, lake)
    return lake


@pytest.fixture(scope="module")
def rows(spark, served_lake):
    """The dataset's rows with their image bytes and how many uids share each URL."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from laion_spark.storage import read_table

    dataset = read_table(spark, served_lake, "dataset").select("uid", "url", "text", "language")
    images = read_table(spark, served_lake, "images").where("status = 'success'").select("uid", "image")
    joined = dataset.join(images, "uid").withColumn("pairs_with_url", F.count("*").over(Window.partitionBy("url")))
    return joined.orderBy("uid").toPandas()


def configured(demo_lake, *overrides: str) -> Config:
    config = copy.deepcopy(demo_lake.config)
    for override in overrides:
        apply_override(config, override)
    return config


def start(config: Config, lake: str, token: str | None = None, host: str = "127.0.0.1") -> SearchServer:
    server = make_server(config, lake, host=host, port=0, token=token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server: SearchServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(demo_lake, served_lake):
    running = start(configured(demo_lake), served_lake)
    yield running
    stop(running)


def request(
    server: SearchServer,
    path: str,
    body: Any = None,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPMessage]:
    """One HTTP request on a fresh connection: (status, the JSON answer or None, the response headers)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode("utf-8")
        connection.request(method or ("GET" if data is None else "POST"), path, body=data, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None, response.headers
    finally:
        connection.close()


def knn(server: SearchServer, **fields: Any) -> tuple[int, Any]:
    status, payload, _ = request(server, "/knn-service", {"modality": "image", "num_images": 5, **fields})
    return status, payload


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def slug(url: str) -> str:
    """``red-circle`` from ``.../img/red-circle-gray-3.jpg``: the colour and shape a synthetic image shows."""
    return "-".join(url.rsplit("/", 1)[1].split("-")[:2])


def an_english_row(rows):
    english = rows[rows.language == "en"]
    return english.iloc[len(english) // 2]


def test_indices_list_names_the_lake(server, served_lake):
    status, payload, headers = request(server, "/indices-list")
    assert status == 200 and payload == ["demo-lake"] == [index_name(served_lake)]
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Content-Type"] == "application/json"


def test_a_text_query_finds_its_colour_and_shape(server, rows):
    row = an_english_row(rows)
    status, results = knn(server, text=row.text, indice_name="demo-lake")
    assert status == 200 and len(results) == 5
    assert any(r["caption"] == row.text or slug(r["url"]) == slug(row.url) for r in results), results
    similarities = [r["similarity"] for r in results]
    assert similarities == sorted(similarities, reverse=True)
    first = results[0]
    # clip_back's fields, then the rest of the metadata.
    assert {"id", "similarity", "url", "caption"} <= set(first)
    assert {"uid", "width", "height", "language", "nsfw", "NSFW", "punsafe", "pair_similarity"} <= set(first)
    assert isinstance(first["id"], int) and first["id"] >= 0


def test_an_image_query_finds_that_image(server, rows):
    row = rows[rows.pairs_with_url == 1].iloc[0]
    status, results = knn(server, image=b64(row.image))
    assert status == 200
    assert results[0]["uid"] == row.uid and results[0]["similarity"] > 0.99


def test_an_embedding_query_is_searched_as_given(server, rows):
    row = rows[rows.pairs_with_url == 1].iloc[0]
    status, by_image = knn(server, image=b64(row.image), num_images=1)
    assert status == 200
    # Find the stored image embedding of that row through /metadata's id, then query with it scaled: the search
    # normalises it, so the answer is the same.
    index = server.service.store.current()
    stored = index.search(np.zeros(index.dim, dtype=np.float32) + 1.0, index.count, with_vectors=True)[0]
    vector = next(hit.vector for hit in stored if hit.id == by_image[0]["id"])
    status, by_embedding = knn(server, embedding_input=[float(v) * 3 for v in vector], num_images=1)
    assert status == 200
    assert by_embedding[0]["id"] == by_image[0]["id"] and by_embedding[0]["similarity"] == pytest.approx(1, abs=1e-4)


def test_modality_text_searches_the_captions(server, rows):
    row = an_english_row(rows)
    status, results = knn(server, text=row.text, modality="text", num_images=3)
    assert status == 200 and results[0]["caption"] == row.text and results[0]["similarity"] > 0.99


def test_num_images_and_num_result_ids_shape_the_answer(server, rows):
    row = an_english_row(rows)
    status, results = knn(server, text=row.text, num_images=2, num_result_ids=6)
    assert status == 200 and len(results) == 6
    # As clip_back: metadata on the first num_images, ids and similarities after them (the front end asks
    # /metadata for those).
    assert all("url" in r for r in results[:2]) and not any("url" in r for r in results[2:])
    assert all(set(r) >= {"id", "similarity"} for r in results)
    status, results = knn(server, text=row.text, num_images=3)
    assert status == 200 and len(results) == 3


def test_deduplicate_drops_the_same_image_under_other_urls_and_captions(server, rows):
    shared = rows[rows.pairs_with_url > 1].iloc[0]  # the demo has images under several captions
    status, plain = knn(server, image=b64(shared.image), num_images=10)
    assert status == 200
    tied = [r for r in plain if r["url"] == shared.url]
    assert len(tied) == shared.pairs_with_url
    status, deduplicated = knn(server, image=b64(shared.image), num_images=10, deduplicate=True)
    assert status == 200 and len(deduplicated) == 10
    assert sum(r["url"] == shared.url for r in deduplicated) == 1
    assert deduplicated[0]["id"] == plain[0]["id"]
    ids = [r["id"] for r in deduplicated]
    assert len(set(ids)) == len(ids)


def test_metadata_answers_as_clip_back_does(server, rows):
    row = an_english_row(rows)
    _, results = knn(server, text=row.text, num_images=3)
    ids = [r["id"] for r in results]
    status, payload, _ = request(server, "/metadata", {"ids": [*ids, 42], "indice_name": "demo-lake"})
    assert status == 200
    assert [item["id"] for item in payload] == ids  # 42 is no pair's id: left out
    for item, result in zip(payload, results, strict=True):
        assert item["metadata"]["url"] == result["url"] and item["metadata"]["caption"] == result["caption"]
    assert request(server, "/metadata", {"ids": [], "indice_name": "demo-lake"})[:2] == (200, [])


def test_cors_preflight_is_answered(server):
    status, payload, headers = request(
        server,
        "/knn-service",
        method="OPTIONS",
        headers={"Origin": "http://front.example", "Access-Control-Request-Headers": "content-type"},
    )
    assert status == 204 and payload is None
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "content-type"


BAD_REQUESTS = [
    ("malformed JSON", "/knn-service", b'{"text": "a red circle",', 400, "not valid JSON"),
    ("not an object", "/knn-service", b"[1, 2]", 400, "JSON object"),
    ("no query", "/knn-service", {"num_images": 5}, 400, "no query"),
    ("bad base64", "/knn-service", {"image": "%%%not base64%%%", "num_images": 5}, 400, "base64"),
    ("not an image", "/knn-service", {"image": b64(b"GIF89a but not really"), "num_images": 5}, 400, "image"),
    ("too many results", "/knn-service", {"text": "a red circle", "num_images": 1001}, 400, "serve.max_results"),
    ("too many ids", "/knn-service", {"text": "a", "num_images": 5, "num_result_ids": 5000}, 400, "max_results"),
    ("num_images not a number", "/knn-service", {"text": "a red circle", "num_images": "ten"}, 400, "num_images"),
    ("num_images zero", "/knn-service", {"text": "a red circle", "num_images": 0}, 400, "num_images"),
    ("bad modality", "/knn-service", {"text": "a red circle", "modality": "audio"}, 400, "modality"),
    ("unknown index", "/knn-service", {"text": "a red circle", "indice_name": "laion5B"}, 400, "indice_name"),
    ("text not a string", "/knn-service", {"text": ["a", "b"]}, 400, "text must be a string"),
    ("bad deduplicate", "/knn-service", {"text": "a red circle", "deduplicate": "yes"}, 400, "deduplicate"),
    ("short embedding", "/knn-service", {"embedding_input": [0.1, 0.2]}, 400, "dimensions"),
    ("image_url is off", "/knn-service", {"image_url": "http://example.com/a.jpg"}, 403, "allow_image_url"),
    ("ids not a list", "/metadata", {"ids": "1,2"}, 400, "ids"),
    ("unknown path", "/search", {"text": "a"}, 404, "no such endpoint"),
    ("GET of a POST endpoint", "/knn-service", None, 405, "takes POST"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"), [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_requests_get_a_4xx_with_a_json_message(server, path, body, status, message):
    got, payload, headers = request(server, path, body)
    assert got == status, payload
    assert message in payload["message"] and len(payload["message"].splitlines()) == 1
    assert headers["Access-Control-Allow-Origin"] == "*"


def test_wrong_methods_get_405_with_allow(server):
    for method, path in (("POST", "/indices-list"), ("DELETE", "/metadata"), ("PUT", "/knn-service")):
        status, payload, headers = request(server, path, b"{}", method=method)
        assert status == 405 and "takes" in payload["message"]
        assert headers["Allow"].split(",")[0] in ("GET", "POST")


def test_a_body_beyond_the_cap_is_refused_before_it_is_read_and_a_stalled_one_times_out(demo_lake, served_lake):
    small = start(configured(demo_lake, "serve.max_body_bytes=1000", "serve.client_timeout_s=0.5"), served_lake)
    try:
        host, port = small.server_address[:2]
        connection = http.client.HTTPConnection(host, port, timeout=10)
        # Headers announce 50 MB; none of it is sent. An answer proves the server did not wait for the body.
        connection.putrequest("POST", "/knn-service")
        connection.putheader("Content-Length", str(50 * 1024 * 1024))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert "serve.max_body_bytes" in json.loads(response.read())["message"]
        assert response.getheader("Connection") == "close"
        connection.close()
        # curl's way: ask first (Expect: 100-continue); the answer is the refusal, not "100 Continue".
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.putrequest("POST", "/knn-service")
        connection.putheader("Content-Length", "5000")
        connection.putheader("Expect", "100-continue")
        connection.endheaders()
        assert connection.getresponse().status == 413
        connection.close()
        status, payload = knn(small, image=b64(b"x" * 2000))  # a real body over the cap
        assert status == 413
        status, payload, _ = request(small, "/knn-service", b"{}", headers={"Transfer-Encoding": "chunked"})
        assert status in (400, 411)
        # A client that announces 100 bytes and stalls after 10 is answered 408 once client_timeout_s passes.
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.putrequest("POST", "/knn-service")
        connection.putheader("Content-Length", "100")
        connection.endheaders(b'{"text": "')
        response = connection.getresponse()
        assert response.status == 408 and "client_timeout_s" in json.loads(response.read())["message"]
        connection.close()
    finally:
        stop(small)


def test_a_token_is_required_on_every_request(demo_lake, served_lake, rows):
    guarded = start(configured(demo_lake), served_lake, token="s3cret-token")
    try:
        status, payload, headers = request(guarded, "/indices-list")
        assert status == 401 and "Bearer" in payload["message"] and headers["WWW-Authenticate"].startswith("Bearer")
        for header in ("Bearer wrong-token", "Basic s3cret-token", "Bearer ", "s3cret-token"):
            assert request(guarded, "/indices-list", headers={"Authorization": header})[0] == 401
        assert request(guarded, "/knn-service", {"text": "a"}, headers={"Authorization": "Bearer nope"})[0] == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert request(guarded, "/indices-list", headers=good)[:2] == (200, ["demo-lake"])
        row = an_english_row(rows)
        status, results, _ = request(guarded, "/knn-service", {"text": row.text, "num_images": 2}, headers=good)
        assert status == 200 and len(results) == 2
        # A browser's CORS preflight carries no credentials and returns no data: it is answered without the token.
        assert request(guarded, "/knn-service", method="OPTIONS")[0] == 204
    finally:
        stop(guarded)


def test_it_binds_to_loopback_unless_told_otherwise(server, demo_lake, served_lake):
    assert server.server_address[0] == "127.0.0.1"
    assert build_parser().parse_args(["serve", "--lake", "lake"]).host == "127.0.0.1"
    if not socket.has_ipv6:
        return
    try:
        ipv6 = start(configured(demo_lake), served_lake, host="::1")
    except ConfigError as exc:  # no IPv6 loopback on this machine
        pytest.skip(str(exc))
    try:
        assert ipv6.server_address[0] == "::1"
        assert request(ipv6, "/indices-list")[:2] == (200, ["demo-lake"])
    finally:
        stop(ipv6)


def test_image_url_goes_through_the_ssrf_guard(demo_lake, served_lake):
    images, base_url = serve_synthetic_images()
    url = f"{base_url}/img/red-circle-gray-0.jpg"
    open_but_guarded = start(configured(demo_lake, "serve.allow_image_url=true"), served_lake)
    allowed = start(
        configured(demo_lake, "serve.allow_image_url=true", f"download.allowed_hosts=['{urlsplit(base_url).netloc}']"),
        served_lake,
    )
    try:
        status, payload = knn(open_but_guarded, image_url=url)
        assert status == 403 and "loopback" in payload["message"]
        assert images.total_hits == 0  # refused before connecting
        status, payload = knn(open_but_guarded, image_url="http://169.254.169.254/latest/meta-data/")
        assert status == 403 and "link-local" in payload["message"]
        status, payload = knn(open_but_guarded, image_url="file:///etc/passwd")
        assert status == 400 and "scheme" in payload["message"]

        status, results = knn(allowed, image_url=url)
        assert status == 200 and images.image_hits() == {"/img/red-circle-gray-0.jpg": 1}
        assert slug(results[0]["url"]) == "red-circle" and results[0]["similarity"] > 0.9
        status, payload = knn(allowed, image_url=f"{base_url}/img/no-such-image-0.jpg")
        assert status == 400 and "could not be fetched" in payload["message"]
    finally:
        stop(open_but_guarded)
        stop(allowed)
        images.shutdown()


def test_an_unexpected_error_is_a_500_with_one_line_and_the_trace_in_the_log(demo_lake, served_lake, caplog):
    broken = start(configured(demo_lake), served_lake)
    try:
        broken.service.store._current = None  # a bug: the loaded index is gone
        with caplog.at_level(logging.ERROR, logger="laion_spark.index.serve"):
            status, payload = knn(broken, text="a red circle")
        assert status == 500
        assert payload == {"message": "internal server error; the server log has the details"}
        assert "Traceback" in caplog.text and "AttributeError" in caplog.text
    finally:
        stop(broken)


def test_fifty_queries_from_ten_threads_are_all_right_and_fast(server, rows):
    english = rows[rows.language == "en"]
    queries: list[dict[str, Any]] = []
    for i in range(50):
        if i % 2:
            queries.append({"text": english.iloc[i % len(english)].text})
        else:
            queries.append({"image": b64(rows.iloc[i % len(rows)].image)})
    # The right answers, one request at a time.
    expected = [[r["id"] for r in knn(server, **query, num_images=5)[1]] for query in queries[:20]]

    def timed(query: dict[str, Any]) -> tuple[int, list[int], float]:
        started = time.perf_counter()
        status, results = knn(server, **query, num_images=5)
        return status, [r["id"] for r in results], time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(timed, queries))
    wall = time.perf_counter() - started
    latencies = sorted(latency for _, _, latency in answers)
    p95 = latencies[int(0.95 * len(latencies)) - 1]
    print(
        f"\n50 queries from 10 threads: {wall:.2f} s wall, latency median {statistics.median(latencies) * 1000:.0f} ms,"
        f" p95 {p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    assert all(status == 200 for status, _, _ in answers)
    assert all(len(ids) == 5 for _, ids, _ in answers)
    for (_, ids, _), right in zip(answers, expected, strict=False):  # the first 20 against the sequential answers
        assert ids == right
    for query, (_, ids, _) in zip(queries, answers, strict=True):  # identical queries, identical answers
        same = [other for q, (_, other, _) in zip(queries, answers, strict=True) if q == query]
        assert all(other == ids for other in same)
    assert latencies[-1] < 10.0 and p95 < 5.0


def test_removed_pairs_never_appear_even_on_a_running_server(spark, demo_lake, served_lake, rows, tmp_path):
    """A pair deleted from dataset leaves the index at the next `laion-spark index`; a running server reloads."""
    from laion_spark.index import run_index

    lake = str(tmp_path / "lake")
    shutil.copytree(served_lake, lake)  # the lake and its index
    config = configured(demo_lake, "serve.reload_interval_s=0.2")
    running = start(config, lake)
    try:
        removed = rows[rows.pairs_with_url == 1].iloc[1]
        query = {"image": b64(removed.image), "num_images": 100}
        status, before = knn(running, **query)
        assert status == 200 and before[0]["uid"] == removed.uid
        removed_id = before[0]["id"]

        spark.sql(f"DELETE FROM delta.`{Path(lake) / 'dataset'}` WHERE uid = '{removed.uid}'")
        result = run_index(spark, demo_lake.config, lake)
        assert result.removed == 1

        deadline = time.monotonic() + 20
        while running.service.store.reloads == 0 and time.monotonic() < deadline:
            knn(running, **query)  # a query after the interval triggers the check
            time.sleep(0.2)
        assert running.service.store.reloads >= 1
        status, after = knn(running, **query)
        assert status == 200 and after
        assert removed.uid not in {r["uid"] for r in after}
        assert removed_id not in {r["id"] for r in after}
        assert request(running, "/metadata", {"ids": [removed_id]})[:2] == (200, [])
        matches = search_lake(config, lake, image_path=_write(tmp_path / "q.jpg", removed.image), k=100)
        assert removed.uid not in {m.uid for m in matches}
    finally:
        stop(running)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_serve_command_prints_its_url_serves_without_java_and_stops_on_ctrl_c(served_lake, tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin), "JAVA_HOME": str(tmp_path / "no-java"), "SPARK_HOME": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "laion_spark", "serve", "--lake", served_lake, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
        first = lines.get(timeout=120)
        assert "serving the kNN index" in first and "'demo-lake'" in first
        url = re.search(r"http://127\.0\.0\.1:(\d+)", first)
        assert url is not None, first
        connection = http.client.HTTPConnection("127.0.0.1", int(url.group(1)), timeout=30)
        connection.request("GET", "/indices-list")
        assert json.loads(connection.getresponse().read()) == ["demo-lake"]
        connection.close()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_with_a_model_that_is_not_available_is_one_line_exit_2(served_lake, tmp_path, capsys):
    index_copy = tmp_path / "index"
    shutil.copytree(Path(served_lake) / "_index", index_copy)
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["model"]["pretrained"] = str(tmp_path / "gone" / "tiny_clip.pt")
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    code = main(["serve", "--lake", served_lake, "--set", f"index.path={index_copy}", "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err
