"""An older crawl ingested later replaces a stored candidate and keeps its download: no URL is fetched twice.

Real archives, real extraction, real Delta tables and a real loopback image server: the second crawl holds the
same image URLs with alt text that differs only by case or character width (so another uid, the same dedup
key) and an earlier crawl date, which makes its pairs the new survivors of their keys.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from image_server import quick_download_config

from laion_spark.candidates import run_candidates
from laion_spark.config import Config
from laion_spark.download import run_download
from laion_spark.extract import run_extract
from laion_spark.schemas import CANDIDATES, IMAGES
from laion_spark.storage import read_table
from laion_spark.testing.archives import WatPage, write_wat
from laion_spark.testing.server import serve_synthetic_images

# (image path on the server, alt text of the later crawl, alt text of the earlier crawl)
IMAGES_SEEN_TWICE = [
    ("/img/red-circle-gray-0.jpg", "A red circle on a gray background", "a RED circle on a GRAY background"),
    ("/img/blue-square-gray-1.jpg", "ａ ｂｌｕｅ ｓｑｕａｒｅ ｏｎ ｇｒａｙ", "a blue square on gray"),
    ("/img/green-triangle-gray-2.jpg", "Ein grünes Dreieck an der Straße", "EIN GRÜNES DREIECK AN DER STRASSE"),
]
LATER, EARLIER = "2024-05-01T12:00:00Z", "2023-11-01T12:00:00Z"


def crawl(path: Path, base_url: str, column: int, date: str) -> Path:
    page = WatPage(
        "https://shop.example/gallery.html",
        [(f"{base_url}{image}", texts[column - 1]) for image, *texts in IMAGES_SEEN_TWICE],
        date=date,
    )
    return write_wat(path, [page])


@pytest.mark.slow
def test_an_earlier_capture_ingested_later_keeps_the_download_of_its_key(spark, lake, tmp_path):
    server, base_url = serve_synthetic_images()
    try:
        host_port = base_url.removeprefix("http://")
        config = Config(download=quick_download_config(allowed_hosts=[host_port]))

        run_extract(spark, config, lake, [str(crawl(tmp_path / "later.wat.gz", base_url, 1, LATER))])
        run_candidates(spark, config, lake, run_id="candidates-1")
        run_download(spark, config, lake, run_id="download-1")
        first = {row.url: row for row in read_table(spark, lake, CANDIDATES).collect()}
        assert len(first) == len(IMAGES_SEEN_TWICE)
        assert {url: server.hits[url.removeprefix(base_url)] for url in first} == dict.fromkeys(first, 1)

        run_extract(spark, config, lake, [str(crawl(tmp_path / "earlier.wat.gz", base_url, 2, EARLIER))])
        second_candidates = run_candidates(spark, config, lake, run_id="candidates-2")
        run_download(spark, config, lake, run_id="download-2")

        # every image URL reached the server exactly once, over both runs
        assert dict(server.image_hits()) == {image: 1 for image, *_ in IMAGES_SEEN_TWICE}
        assert dict((step, out) for step, _, out in second_candidates.steps)["dedup_against_lake"] == 3
        candidates = read_table(spark, lake, CANDIDATES).collect()
        assert len(candidates) == len(IMAGES_SEEN_TWICE), "one candidate per key"
        by_url = {row.url: row for row in candidates}
        for image, _, earlier_text in IMAGES_SEEN_TWICE:
            row = by_url[base_url + image]
            assert row.crawl_date.date() == dt.date(2023, 11, 1) < first[base_url + image].crawl_date.date()
            assert row.text == earlier_text and row.source_file.endswith("earlier.wat.gz")

        images = read_table(spark, lake, IMAGES).collect()
        candidate_uids = {row.uid for row in candidates}
        assert {row.uid for row in images} == candidate_uids  # every candidate has its row, and no row is orphaned
        assert len(images) == len(candidate_uids)
        assert all(row.status == "success" for row in images)
    finally:
        server.shutdown()
