"""Archive mode (``download.source: archive``) end to end: WARCs written with warcio -> run_download -> ``images``.

No network is used anywhere here: every image comes out of a WARC response record.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import pytest
from image_server import make_image, quick_download_config

from laion_spark.config import Config, ConfigError
from laion_spark.download import run_download, status
from laion_spark.download.archive import ArchiveInputError
from laion_spark.extract.archive import IMAGE_RECORDS, ReadCounts, TrackedStream, iter_records
from laion_spark.schemas import CANDIDATES, CANDIDATES_SCHEMA, IMAGES
from laion_spark.storage import append, read_table
from laion_spark.testing.archives import ArchivedResponse, write_responses

SITE = "http://example.com"
OLD, NEW = "2023-05-01T08:00:00Z", "2024-03-01T12:00:00Z"


def write_candidates(spark, lake: str, urls: list[str]) -> None:
    rows = []
    for url in urls:
        uid = hashlib.sha1(f"{url}\tcaption".encode()).hexdigest()
        text = f"a caption for {url}"
        values = {"uid": uid, "dedup_key": uid, "url": url, "text": text, "text_key": text, "source_file": "t.warc"}
        values.update(record_offset=0, language="en", language_confidence=0.99)
        rows.append(tuple(values.get(field.name) for field in CANDIDATES_SCHEMA.fields))
    append(spark.createDataFrame(rows, CANDIDATES_SCHEMA), lake, CANDIDATES)


def archive_config(*inputs: Path | str) -> Config:
    return Config(download=quick_download_config(source="archive", archive_inputs=[str(p) for p in inputs]))


def images_by_url(spark, lake: str) -> dict:
    # A test-sized table: collecting its handful of rows is how the test reads the result.
    rows = read_table(spark, lake, IMAGES).collect()
    assert len({row.url for row in rows}) == len(rows), "one row per candidate"
    return {row.url: row for row in rows}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gzip_member_starts(data: bytes) -> list[int]:
    starts, position = [], 0
    while position < len(data):
        starts.append(position)
        member = zlib.decompressobj(31)
        member.decompress(data[position:])
        position = len(data) - len(member.unused_data)
    return starts


def test_capture_uri_matches_the_candidate_after_url_normalisation(spark, lake: str, tmp_path: Path) -> None:
    jpeg = make_image("JPEG", seed=1)
    warc = write_responses(tmp_path / "site.warc.gz", [ArchivedResponse("HTTP://Example.COM:80/a.jpg", jpeg)])
    write_candidates(spark, lake, [f"{SITE}/a.jpg"])

    run_download(spark, archive_config(warc), lake)

    row = images_by_url(spark, lake)[f"{SITE}/a.jpg"]
    assert row.status == status.SUCCESS, row.error
    assert row.sha256 == sha256(jpeg) and row.http_status == 200


def test_a_200_image_wins_over_a_later_404_of_the_same_url(spark, lake: str, tmp_path: Path) -> None:
    jpeg = make_image("JPEG", seed=2)
    gone = ArchivedResponse(
        f"{SITE}/b.jpg", b"<html>gone</html>", "404 Not Found", [("Content-Type", "text/html")], NEW
    )
    warc = write_responses(tmp_path / "site.warc.gz", [gone, ArchivedResponse(f"{SITE}/b.jpg", jpeg, date=OLD)])
    write_candidates(spark, lake, [f"{SITE}/b.jpg"])

    run_download(spark, archive_config(warc), lake)

    row = images_by_url(spark, lake)[f"{SITE}/b.jpg"]
    assert (row.status, row.http_status, row.sha256) == (status.SUCCESS, 200, sha256(jpeg))


def test_of_two_200_captures_the_latest_wins(spark, lake: str, tmp_path: Path) -> None:
    old, new = make_image("JPEG", seed=3), make_image("JPEG", seed=4)
    responses = [ArchivedResponse(f"{SITE}/c.jpg", old, date=OLD), ArchivedResponse(f"{SITE}/c.jpg", new, date=NEW)]
    warc = write_responses(tmp_path / "site.warc.gz", responses)
    write_candidates(spark, lake, [f"{SITE}/c.jpg"])

    run_download(spark, archive_config(warc), lake)

    assert images_by_url(spark, lake)[f"{SITE}/c.jpg"].sha256 == sha256(new)


def test_rerun_over_the_same_archives_gives_identical_images_rows(spark, tmp_path: Path) -> None:
    """Captures of one URL on the same date in two files: the tiebreak (file, offset) decides, whatever the order."""
    urls = [f"{SITE}/d{i}.jpg" for i in range(4)]
    first = write_responses(
        tmp_path / "crawl-a.warc.gz", [ArchivedResponse(u, make_image("JPEG", seed=10 + i)) for i, u in enumerate(urls)]
    )
    second = write_responses(
        tmp_path / "crawl-b.warc.gz", [ArchivedResponse(u, make_image("PNG", seed=20 + i)) for i, u in enumerate(urls)]
    )
    results = []
    for run, inputs in enumerate([(first, second), (second, first), (first, second)]):
        lake = str(tmp_path / f"lake{run}")
        write_candidates(spark, lake, urls)
        run_download(spark, archive_config(*inputs), lake)
        rows = images_by_url(spark, lake)
        results.append(
            {
                url: {k: v for k, v in row.asDict().items() if k not in ("fetched_at", "fetch_batch")}
                for url, row in rows.items()
            }
        )
    assert results[0] == results[1] == results[2]
    assert {row["content_type"] for row in results[0].values()} == {"image/jpeg"}  # crawl-a, the smaller path


def test_missing_archive_input_is_an_error_naming_it(spark, lake: str, tmp_path: Path) -> None:
    warc = write_responses(tmp_path / "site.warc.gz", [ArchivedResponse(f"{SITE}/e.jpg", make_image("JPEG"))])
    write_candidates(spark, lake, [f"{SITE}/e.jpg"])

    with pytest.raises(FileNotFoundError, match=r"archive_inputs: .*gone\.warc\.gz does not exist"):
        run_download(spark, archive_config(warc, tmp_path / "gone.warc.gz"), lake)
    with pytest.raises(FileNotFoundError, match=r"archive_inputs: .*nothing-\*\.warc\.gz matches no file"):
        run_download(spark, archive_config(tmp_path / "nothing-*.warc.gz"), lake)


@pytest.mark.parametrize("content", [b"just some notes, not a crawl\n", b""])
def test_input_that_is_not_an_archive_is_an_error_naming_it(spark, lake: str, tmp_path: Path, content: bytes) -> None:
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    write_responses(crawl / "site.warc.gz", [ArchivedResponse(f"{SITE}/f.jpg", make_image("JPEG"))])
    (crawl / "notes.txt").write_bytes(content)
    write_candidates(spark, lake, [f"{SITE}/f.jpg"])

    with pytest.raises(ArchiveInputError, match=r"1 of 2 file\(s\) cannot be read .*notes\.txt") as raised:
        run_download(spark, archive_config(crawl), lake)  # a directory: both files are listed
    assert isinstance(raised.value, ConfigError)  # the CLI prints it as one line


def test_truncated_archive_keeps_the_images_before_the_damage(spark, lake: str, tmp_path: Path) -> None:
    images = [make_image("JPEG", seed=30 + i) for i in range(3)]
    urls = [f"{SITE}/g{i}.jpg" for i in range(3)]
    whole = write_responses(
        tmp_path / "whole.warc.gz", [ArchivedResponse(u, b) for u, b in zip(urls, images, strict=True)]
    )
    data = whole.read_bytes()
    last = gzip_member_starts(data)[-1]
    damaged = tmp_path / "damaged.warc.gz"
    damaged.write_bytes(data[: last + (len(data) - last) // 2])  # the file ends inside the third image
    write_candidates(spark, lake, urls)

    run_download(spark, archive_config(damaged), lake)  # a warning, not an error

    rows = images_by_url(spark, lake)
    assert [rows[u].status for u in urls] == [status.SUCCESS, status.SUCCESS, status.NOT_IN_ARCHIVE]
    assert [rows[u].sha256 for u in urls[:2]] == [sha256(b) for b in images[:2]]


@pytest.mark.parametrize("name", ["site.warc.gz", "site.warc"])
def test_both_readers_give_the_same_image_responses(tmp_path: Path, name: str) -> None:
    jpeg = make_image("JPEG", seed=40)
    robots = [("Content-Type", "image/jpeg"), ("X-Robots-Tag", "noai"), ("X-Robots-Tag", "otherbot: noindex")]
    responses = [
        ArchivedResponse(
            f"{SITE}/", b"<html><img src=h.jpg alt='a page'></html>", headers=[("Content-Type", "text/html")]
        ),
        ArchivedResponse(f"{SITE}/h.jpg", jpeg, headers=robots),
        ArchivedResponse(f"{SITE}/gone.jpg", b"", "404 Not Found", [("Content-Type", "text/html")]),
        ArchivedResponse(f"{SITE}/untyped", jpeg, headers=[]),
        ArchivedResponse(f"{SITE}/last.jpg", jpeg),
    ]
    whole = write_responses(tmp_path / name, responses).read_bytes()
    damaged = tmp_path / f"damaged-{name}"
    damaged.write_bytes(whole[: len(whole) - len(jpeg) // 2])  # the last image is cut short

    seen = {}
    for reader in ("fastwarc", "warcio"):
        with open(damaged, "rb") as handle:
            records = iter_records(TrackedStream(handle), reader, ReadCounts(), IMAGE_RECORDS)
            found = []
            with pytest.raises(OSError):  # the damage is reported after the records before it
                for record in records:
                    found.append(record)
        seen[reader] = [
            (r.target_uri, r.http_status, r.http_header_values("X-Robots-Tag"), r.payload == jpeg) for r in found
        ]
    assert (
        seen["fastwarc"]
        == seen["warcio"]
        == [
            (f"{SITE}/h.jpg", 200, ["noai", "otherbot: noindex"], True),
            (f"{SITE}/gone.jpg", 404, [], False),
            (f"{SITE}/untyped", 200, [], True),
        ]
    )
