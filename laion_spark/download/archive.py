"""Archive mode: images come from WARC ``response`` records (a site's own crawl), matched by WARC-Target-URI.

No network at all: one Spark task per WARC file emits the image-like responses, which are then joined to the URLs
to fetch. A damaged file keeps the records read before the damage; an unreadable one is logged and skipped.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import BinaryType, IntegerType, StringType, StructField, StructType

from laion_spark.download import status
from laion_spark.download.fetch import FetchResult, FetchSettings
from laion_spark.download.safety import robots_disallows

log = logging.getLogger(__name__)

ARCHIVE_RESPONSES_SCHEMA = StructType(
    [
        StructField("url", StringType(), False),
        StructField("http_status", IntegerType(), True),
        StructField("content_type", StringType(), True),
        StructField("x_robots_tag", StringType(), True),  # every X-Robots-Tag value, one per line
        StructField("body", BinaryType(), True),
    ]
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif")
ROWS_PER_BATCH = 256


def expand_archive_inputs(inputs: list[str]) -> list[str]:
    """Local globs are expanded; anything else (a file, a Hadoop or fsspec URI) is taken as it is."""
    paths: list[str] = []
    for entry in inputs:
        if "://" not in entry and glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
            if not matches:
                log.warning("download.archive_inputs: %s matches no file", entry)
            paths.extend(matches)
        else:
            paths.append(entry)
    return paths


def archive_responses(spark: SparkSession, inputs: list[str]) -> DataFrame:
    """Image-like response records of the WARC files in ``inputs``: url, http_status, content_type, body."""
    paths = expand_archive_inputs(inputs)
    if not paths:
        return spark.createDataFrame([], ARCHIVE_RESPONSES_SCHEMA)
    files = spark.createDataFrame([(p,) for p in paths], "path string").repartition(len(paths))
    return files.mapInPandas(_read_archives, ARCHIVE_RESPONSES_SCHEMA)


def _read_archives(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        for path in batch["path"]:
            rows: list[dict] = []
            for row in iter_image_responses(path):
                rows.append(row)
                if len(rows) >= ROWS_PER_BATCH:
                    yield pd.DataFrame(rows, columns=ARCHIVE_RESPONSES_SCHEMA.fieldNames())
                    rows = []
            if rows:
                yield pd.DataFrame(rows, columns=ARCHIVE_RESPONSES_SCHEMA.fieldNames())


def iter_image_responses(path: str) -> Iterator[dict]:
    """Yield the response records of one WARC that could be images; log and stop at damage, never raise."""
    import fsspec
    from warcio.archiveiterator import ArchiveIterator

    emitted = 0
    try:
        with fsspec.open(path, "rb") as stream:
            for record in ArchiveIterator(stream):
                if record.rec_type != "response" or record.http_headers is None:
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI")
                if not url:
                    continue
                headers = record.http_headers
                content_type = headers.get_header("Content-Type")
                if not _may_be_image(url, content_type):
                    continue
                code = headers.get_statuscode()
                robots = [value for name, value in headers.headers if name.lower() == "x-robots-tag"]
                emitted += 1
                yield {
                    "url": url.strip("<>"),
                    "http_status": int(code) if code and code.isdigit() else None,
                    "content_type": content_type,
                    "x_robots_tag": "\n".join(robots) or None,
                    "body": record.content_stream().read(),
                }
    except Exception as exc:  # truncated gzip, bad record headers: keep what was read before
        log.warning("archive %s: stopped after %d image responses: %s: %s", path, emitted, type(exc).__name__, exc)


def _may_be_image(url: str, content_type: str | None) -> bool:
    """Skip pages, scripts and styles; keep anything typed as an image, untyped, or named like one."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind.startswith("image/") or kind in ("", "application/octet-stream", "binary/octet-stream"):
        return True
    return url.split("?", 1)[0].lower().endswith(IMAGE_EXTENSIONS)


def judge_archived_response(
    url: str,
    http_status: int | None,
    content_type: str | None,
    x_robots_tag: str | None,
    body: bytes | None,
    settings: FetchSettings,
) -> FetchResult:
    """The same verdicts the HTTP client gives a live answer, for an archived one (or its absence)."""
    if body is None and http_status is None:
        return FetchResult(url, status.NOT_IN_ARCHIVE, error="no response record for this URL in the archives")
    result = FetchResult(url, status.SUCCESS, http_status=http_status, content_type=content_type, attempts=1)
    if http_status is not None and not 200 <= http_status < 300:
        result.status, result.error = status.HTTP_ERROR, f"archived HTTP {http_status}"
    elif settings.honour_x_robots_tag and robots_disallows(
        (x_robots_tag or "").splitlines(), settings.agent_tokens, settings.disallowed_robots_values
    ):
        result.status, result.error = status.DISALLOWED, f"X-Robots-Tag: {x_robots_tag}"
    elif body is not None and len(body) > settings.max_body_bytes:
        result.status, result.error = status.TOO_LARGE, f"body above max_body_bytes {settings.max_body_bytes}"
    else:
        result.body = body or b""
    return result
