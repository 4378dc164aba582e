"""Records from older crawls (WARC/0.18, the ClueWeb era) whose HTTP heads are not what RFC 7230 says.

The WARC bytes are written by hand here, byte by byte, because no writer produces these heads on purpose. Every
page is EUC-JP and starts with its first ``<img>`` right after the HTTP head, with a CRLF blank line further down:
a reader that knows only CRLF heads takes everything up to that blank line for headers, so the charset and the
first image vanish and the rest decodes as cp1252 mojibake.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from laion_spark.extract import ExtractRules, FileStatus, extract_file
from laion_spark.extract.archive import ReadCounts, TrackedStream, iter_records

SITE = "http://www.example.jp"
FIRST_ALT = "日本語の説明文です"
SECOND_ALT = "二枚目の写真の説明です"
EXPECTED = {(f"{SITE}/photos/first.jpg", FIRST_ALT), (f"{SITE}/photos/second.jpg", SECOND_ALT)}
READERS = ("auto", "fastwarc", "warcio")


def page_body() -> bytes:
    return (
        f'<img src="/photos/first.jpg" alt="{FIRST_ALT}">\r\n'
        '<html><head><meta http-equiv="Content-Type" content="text/html; charset=EUC-JP">\r\n'
        "<title>写真</title></head>\r\n"
        "\r\n"
        f'<body><p>本文です。</p><img src="/photos/second.jpg" alt="{SECOND_ALT}"></body></html>\r\n'
    ).encode("euc-jp")


def page_without_meta() -> bytes:
    """The header's charset is then the only thing that says EUC-JP."""
    return (
        f'<img src="/photos/first.jpg" alt="{FIRST_ALT}">\r\n<p>本文です。</p>\r\n\r\n'
        f'<img src="/photos/second.jpg" alt="{SECOND_ALT}">\r\n'
    ).encode("euc-jp")


BARE_LF_HEAD = b"HTTP/1.1 200 OK\nServer: Apache/2.2.3\nContent-Type: text/html; charset=EUC-JP\n\n"
# A line that is not "Name: value" ("Server Apache/1.3", a proxy's mangling) among bare-LF lines.
NOT_A_HEADER_HEAD = b"HTTP/1.0 200 OK\r\nServer Apache/1.3.41\nContent-Type: text/html; charset=EUC-JP\n\n"


def warc_record(version: str, uri: str, http_block: bytes, number: int) -> bytes:
    header = (
        f"WARC/{version}\r\n"
        "WARC-Type: response\r\n"
        f"WARC-Target-URI: {uri}\r\n"
        "WARC-Date: 2009-01-13T18:05:10Z\r\n"
        f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{number:012d}>\r\n"
        f"WARC-TREC-ID: clueweb09-ja0000-00-{number:05d}\r\n"
        "Content-Type: application/http;msgtype=response\r\n"
        f"Content-Length: {len(http_block)}\r\n"
        "\r\n"
    ).encode("ascii")
    return header + http_block + b"\r\n\r\n"


def warcinfo(version: str) -> bytes:
    block = b"software: Nutch 1.0-dev (modified for clueweb09)\r\n"
    header = (
        f"WARC/{version}\r\nWARC-Type: warcinfo\r\nWARC-Date: 2009-01-13T18:05:10Z\r\n"
        "WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-999999999999>\r\n"
        f"Content-Type: application/warc-fields\r\nContent-Length: {len(block)}\r\n\r\n"
    ).encode("ascii")
    return header + block + b"\r\n\r\n"


def write_records(path: Path, records: list[bytes]) -> Path:
    """Plain, or one gzip member per record (as crawlers write them) when the name ends in .gz."""
    with open(path, "wb") as out:
        for record in records:
            out.write(gzip.compress(record) if path.name.endswith(".gz") else record)
    return path


def pairs_of(path: Path, reader: str) -> tuple[set[tuple[str, str]], FileStatus]:
    pairs, statuses = [], []
    for item in extract_file(str(path), ExtractRules(reader=reader)):
        (statuses.append if isinstance(item, FileStatus) else pairs.extend)(item)
    return {(pair[1], pair[2]) for pair in pairs}, statuses[0]


@pytest.mark.parametrize("name", ["clueweb.warc.gz", "clueweb.warc"])
@pytest.mark.parametrize("version", ["0.18", "1.0"])
def test_bare_lf_http_head_keeps_charset_and_first_image(tmp_path: Path, version: str, name: str) -> None:
    path = write_records(
        tmp_path / name,
        [warcinfo(version), warc_record(version, f"{SITE}/index.html", BARE_LF_HEAD + page_body(), 1)],
    )
    for reader in READERS:
        pairs, status = pairs_of(path, reader)
        assert pairs == EXPECTED, reader
        assert status.status == "ok" and status.records_read == 2, (reader, status.error)


@pytest.mark.parametrize("name", ["clueweb.warc.gz", "clueweb.warc"])
def test_header_charset_alone_decodes_a_bare_lf_page(tmp_path: Path, name: str) -> None:
    path = write_records(
        tmp_path / name, [warc_record("0.18", f"{SITE}/a.html", BARE_LF_HEAD + page_without_meta(), 1)]
    )
    for reader in READERS:
        assert pairs_of(path, reader)[0] == EXPECTED, reader


@pytest.mark.parametrize("name", ["clueweb.warc.gz", "clueweb.warc"])
def test_head_line_that_is_not_name_value_is_dropped_and_the_page_kept(tmp_path: Path, name: str) -> None:
    path = write_records(tmp_path / name, [warc_record("1.0", f"{SITE}/b.html", NOT_A_HEADER_HEAD + page_body(), 1)])
    for reader in READERS:
        assert pairs_of(path, reader)[0] == EXPECTED, reader


def test_quirky_and_clean_records_in_one_file_give_every_pair(tmp_path: Path) -> None:
    clean_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=EUC-JP\r\n\r\n"
    records = [warcinfo("0.18")]
    for number, head in enumerate((BARE_LF_HEAD, clean_head, NOT_A_HEADER_HEAD, clean_head)):
        records.append(warc_record("0.18", f"{SITE}/dir{number}/page.html", head + page_without_meta(), number))
    path = write_records(tmp_path / "mixed.warc.gz", records)
    expected = {(f"{SITE}/photos/{n}.jpg", alt) for n, alt in (("first", FIRST_ALT), ("second", SECOND_ALT))}
    for reader in READERS:
        pairs, status = pairs_of(path, reader)
        assert pairs == expected and status.status == "ok", reader
        assert status.pairs_emitted == 8, reader


@pytest.mark.parametrize("reader", ["auto", "fastwarc"])
def test_page_sent_without_the_blank_line_after_its_head(tmp_path: Path, reader: str) -> None:
    """Markup in the head: the server never sent the blank line, so the page starts at the first tag."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=EUC-JP\r\n"
    path = write_records(tmp_path / "nohead.warc.gz", [warc_record("1.0", f"{SITE}/c.html", head + page_body(), 1)])
    assert pairs_of(path, reader)[0] == EXPECTED


def chunked(data: bytes, size: int = 100) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)]
    return b"".join(parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("lf", [b"\r\n", b"\n"])
def test_chunked_and_gzip_encoded_pages_are_decoded(tmp_path: Path, lf: bytes) -> None:
    """fastwarc hands back the bytes as stored (so a misread head can be split again): bodies are decoded here."""
    fields = [b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Content-Encoding: gzip"]
    head = lf.join([*fields, b"Content-Type: text/html; charset=EUC-JP", b"", b""])
    body = chunked(gzip.compress(page_body()))
    path = write_records(tmp_path / "encoded.warc.gz", [warc_record("1.0", f"{SITE}/d.html", head + body, 1)])
    for reader in READERS:
        assert pairs_of(path, reader)[0] == EXPECTED, reader


def test_reparsed_heads_are_counted(tmp_path: Path) -> None:
    clean_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=EUC-JP\r\n\r\n"
    records = [
        warc_record("0.18", f"{SITE}/{n}.html", head + page_body(), n)
        for n, head in enumerate([BARE_LF_HEAD, clean_head, NOT_A_HEADER_HEAD])
    ]
    path = write_records(tmp_path / "counted.warc.gz", records)
    counts = ReadCounts()
    with open(path, "rb") as handle:
        pages = list(iter_records(TrackedStream(handle), "fastwarc", counts))
    assert len(pages) == 3 and counts.records_read == 3 and counts.http_heads_reparsed == 2
    assert {page.http_charset.lower() for page in pages} == {"euc-jp"}


def test_long_bare_lf_page_without_a_crlf_blank_line_is_read_whole(tmp_path: Path) -> None:
    """fastwarc would take the whole page for its head, and stop the file once that passed 32 KiB."""
    filler = "<p>本文です。</p>\n" * 4000  # about 80 KiB, no CRLF anywhere
    body = f'<img src="/photos/first.jpg" alt="{FIRST_ALT}">\n{filler}<img src="/photos/second.jpg" alt="{SECOND_ALT}">'
    page = warc_record("0.18", f"{SITE}/long.html", BARE_LF_HEAD + body.encode("euc-jp"), 1)
    after = warc_record("0.18", f"{SITE}/after.html", BARE_LF_HEAD + page_without_meta(), 2)
    path = write_records(tmp_path / "long.warc.gz", [page, after])
    for reader in READERS:
        pairs, status = pairs_of(path, reader)
        assert pairs == EXPECTED and status.status == "ok" and status.pairs_emitted == 4, (reader, status.error)
