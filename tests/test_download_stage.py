"""The download stage end to end: candidates Delta table -> Spark -> loopback servers -> ``images`` Delta table."""

from __future__ import annotations

import hashlib
import io
import time

import pytest
from image_server import (
    make_decompression_bomb,
    make_image,
    quick_download_config,
    start_hostile_server,
)
from PIL import Image
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from laion_spark.config import Config, ConfigError
from laion_spark.download import run_download, status
from laion_spark.extract.text import text_key
from laion_spark.schemas import CANDIDATES, CANDIDATES_SCHEMA, IMAGES, STAGE_STATS
from laion_spark.storage import append, read_table, table_ref
from laion_spark.testing.server import serve_synthetic_images


def _write_candidates(spark, lake: str, pairs: list[tuple[str, str]]) -> None:
    rows = []
    for url, text in pairs:
        uid = hashlib.sha1(f"{url}\t{text}".encode()).hexdigest()
        rows.append((uid, uid, url, text, text_key(text), None, "test.warc.gz", 0, None, "en", 0.99, None, None, None))
    append(spark.createDataFrame(rows, CANDIDATES_SCHEMA), lake, CANDIDATES)


def _config(**download) -> Config:
    return Config(download=quick_download_config(**download))


def _rows_by_url(spark, lake: str) -> dict[str, list]:
    by_url: dict[str, list] = {}
    # A test-sized table: collecting its handful of rows is how the test reads the result.
    for row in read_table(spark, lake, IMAGES).collect():
        by_url.setdefault(row.url, []).append(row)
    return by_url


EXPECTED = {
    "/real.jpg": status.SUCCESS,
    "/real.png": status.SUCCESS,
    "/real.webp": status.SUCCESS,
    "/real.gif": status.SUCCESS,
    "/bomb.png": status.TOO_LARGE,
    "/html-as.jpg": status.FAILED_TO_DECODE,
    "/truncated.jpg": status.FAILED_TO_DECODE,
    "/tiny.png": status.TOO_SMALL,
    "/slow-drip.jpg": status.TIMEOUT,
    "/endless.jpg": status.TOO_LARGE,
    "/redirect-loop": status.FAILED_TO_DOWNLOAD,
    "/status/404": status.HTTP_ERROR,
    "/status/500": status.HTTP_ERROR,
    "/flaky.jpg": status.SUCCESS,
    "/noai.jpg": status.DISALLOWED,
    "/to-other-server.jpg": status.BLOCKED_ADDRESS,
}


@pytest.mark.slow
def test_download_writes_one_row_per_candidate_incrementally_and_safely(spark, lake: str) -> None:
    other, other_url = serve_synthetic_images()
    hostile = start_hostile_server(f"{other_url}/img/red-circle-gray-0.jpg")
    try:
        jpeg = make_image("JPEG")
        big_jpeg = make_image("JPEG", size=800)
        tiny = io.BytesIO()
        Image.new("RGB", (40, 40), (1, 2, 3)).save(tiny, format="PNG")
        hostile.files.update(
            {
                "/real.jpg": (jpeg, "image/jpeg"),
                "/real.png": (make_image("PNG"), "image/png"),
                "/real.webp": (make_image("WEBP"), "image/webp"),
                "/real.gif": (make_image("GIF"), "image/gif"),
                "/bomb.png": (make_decompression_bomb(), "image/png"),
                "/html-as.jpg": (b"<html><body>" + b"<p>surprise</p>" * 500 + b"</body></html>", "image/jpeg"),
                "/truncated.jpg": (big_jpeg[: len(big_jpeg) * 2 // 3], "image/jpeg"),
                "/tiny.png": (tiny.getvalue(), "image/png"),
            }
        )
        base = hostile.base_url
        pairs = [(base + path, f"caption for {path}") for path in EXPECTED]
        pairs.append((base + "/real.jpg", "a second caption for the same image"))
        pairs.append((f"{other_url}/img/blue-square-gray-1.jpg", "a server that is not on the allow-list"))
        _write_candidates(spark, lake, pairs)
        config = _config(allowed_hosts=[f"127.0.0.1:{hostile.server_port}"])

        started = time.monotonic()
        first = run_download(spark, config, lake, run_id="first")
        first_wall = time.monotonic() - started

        by_url = _rows_by_url(spark, lake)
        assert sum(len(rows) for rows in by_url.values()) == len(pairs)
        for path, expected in EXPECTED.items():
            rows = by_url[base + path]
            assert [r.status for r in rows] == [expected] * len(rows), (path, [r.error for r in rows])
        assert len(by_url[base + "/real.jpg"]) == 2 and hostile.hits["/real.jpg"] == 1  # fetched once for both
        assert by_url[f"{other_url}/img/blue-square-gray-1.jpg"][0].status == status.BLOCKED_ADDRESS
        assert other.total_hits == 0  # the SSRF guard never let a request reach the second server

        for path in ("/real.jpg", "/real.png", "/real.webp", "/real.gif"):
            row = by_url[base + path][0]
            assert (row.original_width, row.original_height, row.width, row.height) == (400, 400, 256, 256)
            assert Image.open(io.BytesIO(row.image)).size == (256, 256)
            assert row.sha256 == hashlib.sha256(hostile.files[path][0]).hexdigest()
            assert row.http_status == 200 and row.content_type.startswith("image/")
        flaky = by_url[base + "/flaky.jpg"][0]
        assert flaky.attempts == 2
        assert by_url[base + "/status/404"][0].http_status == 404
        assert "timeout" in by_url[base + "/slow-drip.jpg"][0].error
        assert all(row.image is None for rows in by_url.values() for row in rows if row.status != status.SUCCESS)
        # Sixteen URLs, several of them hostile, fetched side by side: a fetch that ignored its deadline (the
        # drip runs for 15 s) would show here; the rest is Spark's fixed cost.
        assert first_wall < 60

        steps = {step: (rows_in, rows_out) for step, rows_in, rows_out in first.steps}
        assert steps["to_fetch"] == (len(pairs), len(pairs))
        assert steps[status.SUCCESS] == (len(pairs), 6)
        assert steps["status:" + status.BLOCKED_ADDRESS] == (len(pairs), 2)
        recorded = read_table(spark, lake, STAGE_STATS).where("run_id = 'first' AND stage = 'download'").count()
        assert recorded == len(first.steps)

        hits_before = hostile.total_hits
        again = run_download(spark, config, lake, run_id="again")
        assert again.steps == [("to_fetch", len(pairs), 0)]
        assert hostile.total_hits == hits_before

        retried = run_download(spark, config, lake, run_id="retry", retry_failed=True)
        failures = [p for p in EXPECTED if EXPECTED[p] in status.FAILURES] + ["blocked"]
        assert dict((s, o) for s, _, o in retried.steps)["to_fetch"] == len(failures)
        by_url_after = _rows_by_url(spark, lake)
        assert sum(len(rows) for rows in by_url_after.values()) == len(pairs)
        assert hostile.hits["/status/404"] == 2  # a failure: asked again
        assert hostile.hits["/noai.jpg"] == 1  # an opt-out is final
        assert hostile.hits["/bomb.png"] == 1  # so is a verdict on the content
        assert other.total_hits == 0
        # The retry's MERGE marked the failed rows deleted (deletion vectors) and rewrote no data file of images,
        # whose files hold the image bytes.
        history = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, IMAGES)}").where("operation = 'MERGE'").collect()
        assert len(history) == 1
        metrics = history[0].operationMetrics
        assert int(metrics["numTargetFilesRemoved"]) == 0 and int(metrics["numTargetDeletionVectorsAdded"]) > 0
        assert int(metrics["numTargetRowsUpdated"]) == len(failures)
    finally:
        hostile.shutdown()
        other.shutdown()


def _write_warc(path, responses: list[tuple[str, str, dict[str, str], bytes]]) -> None:
    with open(path, "wb") as stream:
        writer = WARCWriter(stream, gzip=True)
        for url, status_line, headers, body in responses:
            http_headers = StatusAndHeaders(status_line, list(headers.items()), protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http_headers)
            writer.write_record(record)


def test_archive_mode_resolves_images_from_warc_responses_without_network(spark, lake: str, tmp_path) -> None:
    site = "http://images.example.invalid"  # .invalid never resolves: any network use would fail differently
    jpeg = make_image("JPEG", seed=3)
    warc = tmp_path / "site.warc.gz"
    _write_warc(
        warc,
        [
            (f"{site}/", "200 OK", {"Content-Type": "text/html"}, b"<html><img src='/cat.jpg' alt='a cat'></html>"),
            (f"{site}/cat.jpg", "200 OK", {"Content-Type": "image/jpeg"}, jpeg),
            (f"{site}/optout.jpg", "200 OK", {"Content-Type": "image/jpeg", "X-Robots-Tag": "noimageai"}, jpeg),
            (f"{site}/gone.jpg", "404 Not Found", {"Content-Type": "image/jpeg"}, b""),
            (f"{site}/page.jpg", "200 OK", {"Content-Type": "image/jpeg"}, b"<html>" + b"x" * 9000 + b"</html>"),
        ],
    )
    urls = ["/cat.jpg", "/optout.jpg", "/gone.jpg", "/page.jpg", "/never-crawled.jpg"]
    _write_candidates(spark, lake, [(site + u, f"caption {u}") for u in urls])
    config = _config(source="archive", archive_inputs=[str(tmp_path / "*.warc.gz")], resize_mode="center_crop")

    run_download(spark, config, lake, run_id="archive")

    by_url = {url: rows[0] for url, rows in _rows_by_url(spark, lake).items()}
    assert {u: by_url[site + u].status for u in urls} == {
        "/cat.jpg": status.SUCCESS,
        "/optout.jpg": status.DISALLOWED,
        "/gone.jpg": status.HTTP_ERROR,
        "/page.jpg": status.FAILED_TO_DECODE,
        "/never-crawled.jpg": status.NOT_IN_ARCHIVE,
    }
    cat = by_url[site + "/cat.jpg"]
    assert cat.sha256 == hashlib.sha256(jpeg).hexdigest() and (cat.width, cat.height) == (256, 256)
    assert by_url[site + "/gone.jpg"].http_status == 404


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": "ftp"}, "download.source"),
        ({"source": "archive"}, "archive_inputs"),
        ({"allowed_hosts": ["127.0.0.1:notaport"]}, "allowed_hosts"),
        ({"resize_mode": "stretch"}, "resize_mode"),
    ],
)
def test_config_mistakes_are_one_clear_error_before_any_work(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_download(None, _config(**change), "/nonexistent-lake")  # type: ignore[arg-type]


def test_a_failing_cleanup_never_hides_the_real_error(spark, lake: str, monkeypatch) -> None:
    """Emptying the staging table fails too, but the error that reached the cleanup is the one raised."""
    server, base_url = serve_synthetic_images()
    try:
        _write_candidates(spark, lake, [(f"{base_url}/img/red-circle-gray-0.jpg", "a red circle on gray")])
        config = _config(allowed_hosts=[base_url.split("//", 1)[1]])

        def failing_append(*args, **kwargs):
            raise RuntimeError("the real error: the images commit failed")

        def failing_cleanup(*args, **kwargs):
            raise OSError("the staging table cannot be emptied either")

        monkeypatch.setattr("laion_spark.download.stage.append", failing_append)
        monkeypatch.setattr("laion_spark.storage.delta._empty_staging", failing_cleanup)
        with pytest.raises(RuntimeError, match="the real error"):
            run_download(spark, config, lake, run_id="cleanup")
    finally:
        server.shutdown()


def test_a_url_shared_by_many_uids_is_fetched_once_wherever_its_rows_are(spark) -> None:
    """The rows of one URL far apart in a task (its first fetch long finished when the next row comes) still make
    one request: the task sorts its rows by URL, and a result that finishes before the URL's last row is reused."""
    from laion_spark.download import FetchSettings, ImageSettings, fetch_images

    hostile = start_hostile_server("http://127.0.0.1:9/")
    try:
        hostile.files["/shared.jpg"] = (make_image("JPEG"), "image/jpeg")
        base = hostile.base_url
        others = [(f"other-{i}", f"{base}/img/red-circle-gray-{i}.jpg") for i in range(24)]
        rows = [("shared-0", base + "/shared.jpg"), *others[:12], ("shared-1", base + "/shared.jpg"), *others[12:]]
        rows.append(("shared-2", base + "/shared.jpg"))
        config = quick_download_config(threads=2, allowed_hosts=[f"127.0.0.1:{hostile.server_port}"])
        frame = spark.createDataFrame(rows, "uid string, url string").coalesce(1)
        fetched = fetch_images(frame, FetchSettings.from_config(config), ImageSettings.from_config(config))
        statuses = {row.uid: row.status for row in fetched.select("uid", "status").collect()}
    finally:
        hostile.shutdown()
    assert set(statuses.values()) == {status.SUCCESS} and len(statuses) == len(rows)
    assert hostile.hits["/shared.jpg"] == 1
