"""Whole archives through the worker function (no Spark): formats, damage, streaming memory."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from laion_spark.extract import ExtractRules, FileStatus, extract_file
from laion_spark.testing.archives import WatPage, html_page, truncate, write_arc, write_warc, write_wat

RULES = ExtractRules()

PAGE = "http://example.com/dir/page.html"
HTML = (
    "<html><head><title>t</title></head><body>"
    '<IMG SRC="images/red.jpg" ALT="A red circle on a gray background">'
    '<img src="/abs/blue.png" alt="  A  blue\n square &amp; more ">'
    '<img src="data:image/png;base64,iVBORw0KGgo=" alt="an inline data image">'
    '<img src="javascript:alert(1)" alt="a javascript image">'
    '<img src="empty.jpg" alt="">'
    '<img src="short.jpg" alt="logo">'
    '<img src="noalt.jpg">'
    "</body></html>"
)
EXPECTED_HTML_PAIRS = {
    ("http://example.com/dir/images/red.jpg", "A red circle on a gray background"),
    ("http://example.com/abs/blue.png", "A blue square & more"),
}


def run(path: Path, rules: ExtractRules = RULES, rows_per_batch: int = 10000) -> tuple[list[tuple], FileStatus]:
    pairs, statuses = [], []
    for item in extract_file(str(path), rules, rows_per_batch):
        (statuses.append if isinstance(item, FileStatus) else pairs.extend)(item)
    assert len(statuses) == 1, "every file ends with exactly one status"
    return pairs, statuses[0]


def url_text(pairs: list[tuple]) -> set[tuple[str, str]]:
    return {(p[1], p[2]) for p in pairs}


def wat_pages(n: int, images_per_page: int = 3) -> list[WatPage]:
    return [
        WatPage(
            f"http://site{i}.example.com/page.html",
            [(f"img/{i}-{j}.jpg", f"photo number {j} of page {i}") for j in range(images_per_page)],
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["page.warc.gz", "page.warc"])
def test_warc_html_pairs_from_gzip_and_plain_files(tmp_path, name):
    path = write_warc(tmp_path / name, [html_page(PAGE, HTML)])
    pairs, status = run(path)
    assert url_text(pairs) == EXPECTED_HTML_PAIRS
    assert status.status == "ok" and status.records_read == 3 and status.pairs_emitted == 2
    uid, url, text, page_url, offset, crawl_date, source_format, *_ = pairs[0]
    assert page_url == PAGE and source_format == "warc" and crawl_date.isoformat() == "2024-03-01T12:00:00"
    assert len(uid) == 40 and offset > 0


def test_record_offsets_point_at_the_records_in_the_compressed_file(tmp_path):
    pages = [html_page(f"http://example.com/{i}.html", HTML) for i in range(3)]
    path = write_warc(tmp_path / "three.warc.gz", pages)
    pairs, _ = run(path)
    data = path.read_bytes()
    for offset in {p[4] for p in pairs}:
        member = gzip.GzipFile(fileobj=__import__("io").BytesIO(data[offset:])).read(200)
        assert member.startswith(b"WARC/1.") and b"WARC-Type: response" in member


def test_base_href_applies_to_relative_images(tmp_path):
    html = '<html><head><base href="https://cdn.example.org/assets/"></head><img src="x.jpg" alt="an image with base">'
    pairs, _ = run(write_warc(tmp_path / "base.warc.gz", [html_page(PAGE, html)]))
    assert url_text(pairs) == {("https://cdn.example.org/assets/x.jpg", "an image with base")}


def test_non_utf8_pages_decode_by_header_meta_and_fallback(tmp_path):
    pages = [
        html_page("http://de.example/", '<img src="a.jpg" alt="Größe und Maße">', charset="iso-8859-1"),
        html_page(
            "http://ru.example/",
            '<meta charset="koi8-r"><img src="b.jpg" alt="Красный круг">',
            charset="koi8-r",
            content_type="text/html",
        ),
        html_page(
            "http://fr.example/",
            '<img src="c.jpg" alt="Crème brûlée à côté">',
            charset="cp1252",
            content_type="text/html",
        ),
    ]
    pairs, status = run(write_warc(tmp_path / "charsets.warc.gz", pages))
    assert {text for _, text in url_text(pairs)} == {"Größe und Maße", "Красный круг", "Crème brûlée à côté"}
    assert status.status == "ok"


@pytest.mark.parametrize("name", ["old.arc", "old.arc.gz"])
def test_arc_files_give_pairs(tmp_path, name):
    pairs, status = run(write_arc(tmp_path / name, [html_page(PAGE, HTML)]))
    assert url_text(pairs) == EXPECTED_HTML_PAIRS
    assert {p[6] for p in pairs} == {"arc"} and status.status == "ok"


@pytest.mark.parametrize("name", ["meta.wat.gz", "meta.wat"])
def test_wat_pairs_resolve_against_head_base(tmp_path, name):
    page = WatPage(
        "http://example.com/a/b.html",
        [
            ("x.jpg", "a picture with &amp; sign"),
            ("/y.png", "  spaced   out  "),
            ("z.jpg", None),
            ("data:x", "data uri"),
        ],
        base="/static/",
    )
    pairs, status = run(write_wat(tmp_path / name, [page]))
    assert url_text(pairs) == {
        ("http://example.com/static/x.jpg", "a picture with & sign"),
        ("http://example.com/y.png", "spaced out"),
    }
    assert status.records_read == 3 and status.images_found == 4 and status.status == "ok"
    assert {p[6] for p in pairs} == {"wat"}


def test_rules_are_configurable(tmp_path):
    rules = ExtractRules(min_alt_chars=2, max_alt_chars=8, allowed_schemes=frozenset({"https"}))
    page = WatPage(
        "https://example.com/", [("a.jpg", "logo"), ("b.jpg", "a very long alt text"), ("http://x/c.jpg", "xyz")]
    )
    pairs, _ = run(write_wat(tmp_path / "r.wat.gz", [page]), rules)
    assert url_text(pairs) == {("https://example.com/a.jpg", "logo"), ("https://example.com/b.jpg", "a very l")}


def test_pairs_come_in_bounded_batches(tmp_path):
    path = write_wat(tmp_path / "many.wat.gz", wat_pages(20, images_per_page=5))
    batches = [item for item in extract_file(str(path), RULES, rows_per_batch=7) if not isinstance(item, FileStatus)]
    assert sum(map(len, batches)) == 100 and max(map(len, batches)) == 7


def test_truncated_gzip_keeps_pairs_before_damage(tmp_path):
    whole = write_wat(tmp_path / "whole.wat.gz", wat_pages(40))
    cut = truncate(whole, 0.6, tmp_path / "cut.wat.gz")
    pairs, status = run(cut)
    assert status.status == "partial" and "truncated" in status.error
    assert 0 < len(pairs) < 120
    assert url_text(pairs) <= url_text(run(whole)[0])


def test_truncated_plain_warc_is_partial(tmp_path):
    whole = write_warc(tmp_path / "whole.warc", [html_page(f"http://e.com/{i}", HTML) for i in range(5)])
    pairs, status = run(truncate(whole, 0.9, tmp_path / "cut.warc"))
    assert status.status == "partial" and len(pairs) >= 6


def test_corrupt_record_in_the_middle_keeps_earlier_pairs(tmp_path):
    path = write_warc(tmp_path / "ok.warc", [html_page(f"http://e.com/{i}", HTML) for i in range(6)])
    data = bytearray(path.read_bytes())
    middle = data.index(b"WARC/1.0", len(data) // 2)
    data[middle : middle + 8] = b"GARBAGE!"
    broken = tmp_path / "corrupt.warc"
    broken.write_bytes(bytes(data))
    pairs, status = run(broken)
    assert status.status == "partial" and status.error
    assert len(pairs) >= 4


def test_invalid_json_record_is_skipped_and_logged(tmp_path):
    good = wat_pages(3)
    path = write_wat(tmp_path / "badjson.wat.gz", [good[0], b'{"Envelope": {"IMG@/src" oops', good[1], good[2]])
    pairs, status = run(path)
    assert len(pairs) == 9, "the records after the bad one are still read"
    assert status.status == "partial" and "1 bad record" in status.error and "JSONDecodeError" in status.error


def test_non_utf8_bytes_in_wat_are_replaced_and_logged(tmp_path):
    payload = json.dumps(
        {
            "Envelope": {
                "Payload-Metadata": {
                    "HTTP-Response-Metadata": {
                        "HTML-Metadata": {
                            "Links": [{"path": "IMG@/src", "url": "http://e.com/a.jpg", "alt": "caf\udce9 au lait"}]
                        }
                    }
                }
            }
        },
        ensure_ascii=False,
    ).encode("utf-8", "surrogateescape")
    pairs, status = run(write_wat(tmp_path / "latin.wat.gz", [payload, *wat_pages(1)]))
    assert ("http://e.com/a.jpg", "caf\ufffd au lait") in url_text(pairs)
    assert len(pairs) == 4 and status.status == "partial" and "not UTF-8" in status.error


def test_missing_file_is_failed(tmp_path):
    pairs, status = run(tmp_path / "nope.warc.gz")
    assert pairs == [] and status.status == "failed" and "FileNotFoundError" in status.error


def test_unreadable_file_is_failed(tmp_path):
    path = write_wat(tmp_path / "secret.wat.gz", wat_pages(1))
    path.chmod(0)
    try:
        if path.open("rb"):  # running as root: permissions do not apply
            pytest.skip("permissions are not enforced for this user")
    except PermissionError:
        pass
    pairs, status = run(path)
    assert status.status == "failed" and "PermissionError" in status.error


def test_path_that_cannot_be_read_as_a_file_is_failed(tmp_path):
    # Holds for every user, root included: opening a directory fails at the OS level like an unreadable file.
    path = tmp_path / "crawl.warc.gz"
    path.mkdir()
    pairs, status = run(path)
    assert pairs == [] and status.status == "failed" and "IsADirectoryError" in status.error


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"just some text, not an archive\n" * 10,
        gzip.compress(b"<html>not an archive</html>"),
        b"\x1f\x8b\x08garbage",
    ],
)
def test_file_that_is_not_an_archive_is_failed(tmp_path, content):
    path = tmp_path / "notes.warc.gz"
    path.write_bytes(content)
    pairs, status = run(path)
    assert pairs == [] and status.status == "failed" and status.error


def test_warcio_reader_gives_the_same_pairs_as_fastwarc(tmp_path):
    wat = write_wat(tmp_path / "x.wat.gz", wat_pages(5))
    warc = write_warc(tmp_path / "x.warc", [html_page(PAGE, HTML)])
    for path in (wat, warc):
        fast, fast_status = run(path, ExtractRules(reader="fastwarc"))
        slow, slow_status = run(path, ExtractRules(reader="warcio"))
        assert sorted(fast) == sorted(slow) and fast_status.records_read == slow_status.records_read


def test_memory_does_not_grow_with_file_size(tmp_path):
    def peak_bytes(pages: int) -> int:
        path = write_wat(tmp_path / f"{pages}.wat.gz", wat_pages(pages, images_per_page=10))
        tracemalloc.start()
        emitted = 0
        for item in extract_file(str(path), RULES, rows_per_batch=500):
            emitted += item.pairs_emitted if isinstance(item, FileStatus) else 0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert emitted == pages * 10
        return peak

    small, large = peak_bytes(300), peak_bytes(3000)
    assert large < small * 1.5, f"peak traced memory grew from {small:,} to {large:,} bytes with a 10x file"
