"""What a Python worker does with one input file: read it record by record and emit pairs, then its status.

Everything here is plain Python over a byte stream, so the benchmark and the tests call it without Spark. The
Spark side (stage.py) feeds it one file per task through ``mapInArrow``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import pyarrow as pa
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType, TimestampType

from laion_spark.config import ExtractConfig
from laion_spark.extract.archive import ArchiveRecord, NotAnArchive, ReadCounts, TrackedStream, iter_records
from laion_spark.extract.inputs import open_input
from laion_spark.extract.text import clean_alt_text, text_key
from laion_spark.extract.urls import PageUrlResolver, allowed_image_url, clean_target_uri
from laion_spark.extract.warc_html import parse_html_page
from laion_spark.extract.wat import parse_wat_record

log = logging.getLogger(__name__)

PAIR, STATUS = "pair", "status"

# One schema for both kinds of rows, so a file's pairs and its status come out of a single pass over it.
OUTPUT_SCHEMA = StructType(
    [
        StructField("kind", StringType()),  # pair | status
        StructField("uid", StringType()),
        StructField("url", StringType()),
        StructField("text", StringType()),
        StructField("text_key", StringType()),
        StructField("page_url", StringType()),
        StructField("source_file", StringType()),
        StructField("record_offset", LongType()),
        StructField("crawl_date", TimestampType()),
        StructField("source_format", StringType()),
        StructField("license", StringType()),
        StructField("status", StringType()),
        StructField("records_read", LongType()),
        StructField("pairs_emitted", LongType()),
        StructField("error", StringType()),
        StructField("duration_s", DoubleType()),
        StructField("records_with_images", LongType()),
        StructField("images_found", LongType()),
        StructField("images_with_alt", LongType()),
    ]
)
_TIMESTAMP = pa.timestamp("us", tz="UTC")
ARROW_SCHEMA = pa.schema(
    [
        pa.field(
            f.name,
            {StringType(): pa.string(), LongType(): pa.int64(), DoubleType(): pa.float64()}.get(f.dataType, _TIMESTAMP),
        )
        for f in OUTPUT_SCHEMA.fields
    ]
)
# The order of extract_pairs' tuples; newer fields come last so the positions of the older ones stay put.
_PAIR_COLUMNS = (
    "uid",
    "url",
    "text",
    "page_url",
    "record_offset",
    "crawl_date",
    "source_format",
    "text_key",
    "license",
)
_MAX_ERRORS_KEPT = 3


@dataclass(frozen=True)
class ExtractRules:
    """The LAION extraction rules, in the form the hot loop wants them."""

    min_alt_chars: int = 5
    max_alt_chars: int = 4096
    max_url_chars: int = 2048
    allowed_schemes: frozenset[str] = frozenset({"http", "https"})
    fallback_encoding: str = "cp1252"
    reader: str = "auto"

    @classmethod
    def from_config(cls, config: ExtractConfig) -> ExtractRules:
        return cls(
            min_alt_chars=config.min_alt_chars,
            max_alt_chars=config.max_alt_chars,
            max_url_chars=config.max_url_chars,
            allowed_schemes=frozenset(s.lower() for s in config.allowed_schemes),
            fallback_encoding=config.fallback_encoding,
            reader=config.reader,
        )


@dataclass
class FileStatus:
    """One file's row in ``ingest_log``, plus the funnel counters of the ``extract`` stage."""

    source_file: str
    status: str = "ok"  # ok | partial | failed
    records_read: int = 0
    pairs_emitted: int = 0
    error: str | None = None
    duration_s: float = 0.0
    records_with_images: int = 0
    images_found: int = 0
    images_with_alt: int = 0
    bad_records: int = 0
    record_errors: list[str] = field(default_factory=list)

    def note_bad_record(self, offset: int, reason: str) -> None:
        self.bad_records += 1
        if len(self.record_errors) < _MAX_ERRORS_KEPT:
            self.record_errors.append(f"record at byte {offset:,}: {reason}")


def extract_pairs(records: Iterable[ArchiveRecord], rules: ExtractRules, status: FileStatus) -> Iterator[tuple]:
    """(uid, url, text, page_url, record_offset, crawl_date, source_format, text_key, license) for every pair the
    rules keep; ``license`` is the page's Creative Commons licence (extract.licenses), shared by its pairs.

    Records that cannot be parsed are counted on ``status`` and skipped; the rest of the file goes on.
    """
    min_chars, max_chars, max_url = rules.min_alt_chars, rules.max_alt_chars, rules.max_url_chars
    schemes = rules.allowed_schemes
    sha1 = hashlib.sha1
    for record in records:
        try:
            if record.source_format == "wat":
                # The JSON's own target URI is looked up only when the WARC header lacks one.
                page = parse_wat_record(record.payload, want_target_uri=not record.target_uri)
                if page is not None and page.invalid_utf8:
                    status.note_bad_record(record.offset, "bytes that are not UTF-8 (replaced, pairs kept)")
                decode_entities = True
            else:
                page = parse_html_page(record.payload, record.http_charset, rules.fallback_encoding)
                decode_entities = False  # the HTML parser already decoded them; decoding twice would corrupt "&amp;lt;"
        except Exception as exc:  # noqa: BLE001 - one bad record never costs the rest of the file
            status.note_bad_record(record.offset, f"{type(exc).__name__}: {exc}")
            continue
        if page is None or not page.images:
            continue
        status.records_with_images += 1
        status.images_found += len(page.images)
        page_url = clean_target_uri(record.target_uri or getattr(page, "target_uri", None))
        resolve = PageUrlResolver(page_url, page.base).resolve
        offset, date, source_format = record.offset, record.date, record.source_format
        page_url_or_none = page_url or None
        license = page.license
        with_alt = emitted = 0
        # Per pair, the common case (ASCII alt text without entities) is written out inline: this loop runs for
        # every image of every page, and the calls it saves were a quarter of the extraction's time.
        for src, alt in page.images:
            if not alt:
                continue
            if alt.isascii() and not (decode_entities and "&" in alt):
                text = " ".join(alt.split())  # normalize_text: NFC changes nothing in ASCII
            else:
                text = clean_alt_text(alt, decode_entities)
            if len(text) < min_chars:
                continue
            with_alt += 1
            if len(text) > max_chars:
                text = text[:max_chars].rstrip()
            url = allowed_image_url(resolve(src), schemes)
            if url is None or len(url) > max_url:
                continue
            emitted += 1
            uid = sha1((url + "\t" + text).encode("utf-8", "surrogatepass")).hexdigest()
            # text_key of normalised ASCII text is its lower case: lowering adds no whitespace to collapse.
            key = text.lower() if text.isascii() else text_key(text)
            yield uid, url, text, page_url_or_none, offset, date, source_format, key, license
        status.images_with_alt += with_alt
        status.pairs_emitted += emitted


def extract_file(
    source_file: str, rules: ExtractRules, rows_per_batch: int = 10000, stream: BinaryIO | None = None
) -> Iterator[list[tuple] | FileStatus]:
    """Lists of at most ``rows_per_batch`` pair tuples, then the file's :class:`FileStatus` (always, last).

    ``stream`` defaults to opening ``source_file``. Whatever goes wrong, the pairs read before the damage have
    been yielded and the status says ``partial`` or ``failed`` with the reason; nothing is raised.
    """
    started = time.perf_counter()
    status = FileStatus(source_file)
    counts = ReadCounts()
    batch: list[tuple] = []
    try:
        handle = stream if stream is not None else open_input(source_file)
        with handle:
            records = iter_records(TrackedStream(handle), rules.reader, counts)
            for pair in extract_pairs(records, rules, status):
                batch.append(pair)
                if len(batch) >= rows_per_batch:
                    yield batch
                    batch = []
    except NotAnArchive as exc:
        status.status, status.error = "failed", f"NotAnArchive: {exc}"
    except BaseException as exc:  # noqa: BLE001 - a damaged file is logged, never fatal
        # fastwarc reports some malformed input as a Rust panic, which is a BaseException; interrupts still stop.
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        status.status = "partial" if counts.records_read else "failed"
        status.error = " ".join(f"{type(exc).__name__}: {exc}".split())
    if batch:
        yield batch
    status.records_read = counts.records_read
    if status.bad_records:
        detail = f"{status.bad_records} bad record(s): " + "; ".join(status.record_errors)
        status.error = f"{status.error}; {detail}" if status.error else detail
        if status.status == "ok":
            status.status = "partial"
    if status.status != "ok":
        log.warning("extract %s: %s (%s)", source_file, status.status, status.error)
    status.duration_s = time.perf_counter() - started
    yield status


def pairs_to_arrow(pairs: list[tuple], source_file: str) -> pa.RecordBatch:
    columns = dict(zip(_PAIR_COLUMNS, zip(*pairs, strict=True), strict=True))
    n = len(pairs)
    arrays = []
    for f in ARROW_SCHEMA:
        if f.name == "kind":
            arrays.append(pa.array([PAIR] * n, pa.string()))
        elif f.name == "source_file":
            arrays.append(pa.array([source_file] * n, pa.string()))
        elif f.name in columns:
            arrays.append(pa.array(columns[f.name], f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=ARROW_SCHEMA)


def status_to_arrow(status: FileStatus) -> pa.RecordBatch:
    row = {name: [getattr(status, name, None)] for name in ARROW_SCHEMA.names}
    row["kind"] = [STATUS]
    return pa.RecordBatch.from_pydict(row, schema=ARROW_SCHEMA)


def extract_file_to_arrow(
    source_file: str, rules: ExtractRules, rows_per_batch: int, stream: BinaryIO | None = None
) -> Iterator[pa.RecordBatch]:
    for item in extract_file(source_file, rules, rows_per_batch, stream):
        if isinstance(item, FileStatus):
            yield status_to_arrow(item)
        else:
            yield pairs_to_arrow(item, source_file)


def extract_partition(
    batches: Iterator[pa.RecordBatch], rules: ExtractRules, rows_per_batch: int
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: input rows carry ``source_file`` (and ``content`` on the binaryFile path)."""
    for batch in batches:
        files = batch.column("source_file").to_pylist()
        contents = batch.column("content") if "content" in batch.schema.names else None
        for i, source_file in enumerate(files):
            stream = io.BytesIO(contents[i].as_py()) if contents is not None else None
            yield from extract_file_to_arrow(source_file, rules, rows_per_batch, stream)
