"""Archive mode: images come from WARC ``response`` records (a site's own crawl), matched by WARC-Target-URI.

No network at all. The driver lists ``download.archive_inputs`` as extraction lists its inputs (paths, globs,
directories, manifests, Hadoop URIs) and stops with one clear error when a file is missing, cannot be opened, or
is not an archive; that check reads the first bytes of each file in a small Spark job. Then one Spark task per
file reads it with extraction's reader (fastwarc with the warcio fallback and the damage checks) and emits the
responses that may be images, their URL normalised as extraction normalises the candidates' URLs. A damaged file
keeps the records before the damage, with a warning. A URL captured more than once gets the same capture on every
run (:func:`one_capture_per_url`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import BinaryIO

import pandas as pd
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from laion_spark.config import ConfigError
from laion_spark.download import status
from laion_spark.download.fetch import FetchResult, FetchSettings
from laion_spark.download.safety import robots_disallows
from laion_spark.extract.archive import (
    IMAGE_RECORDS,
    NotAnArchive,
    ReadCounts,
    TrackedStream,
    iter_records,
    sniff_stream,
)
from laion_spark.extract.inputs import list_input_files, local_path, open_input
from laion_spark.extract.urls import clean_target_uri, normalize_url
from laion_spark.storage.files import existing_files

log = logging.getLogger(__name__)

ARCHIVE_RESPONSES_SCHEMA = StructType(
    [
        StructField("url", StringType(), False),  # WARC-Target-URI, normalised as extraction normalises URLs
        StructField("http_status", IntegerType(), True),
        StructField("content_type", StringType(), True),
        StructField("x_robots_tag", StringType(), True),  # every X-Robots-Tag value, one per line
        StructField("body", BinaryType(), True),
        StructField("capture_date", TimestampType(), True),  # WARC-Date
        StructField("source_file", StringType(), False),
        StructField("record_offset", LongType(), False),
    ]
)
ROWS_PER_BATCH = 256
ARCHIVE_READER = "auto"  # fastwarc, and warcio for what fastwarc cannot read
_FILES_NAMED = 5


class ArchiveInputError(ConfigError):
    """Files in ``download.archive_inputs`` that exist but cannot be read as archives."""


def list_archive_inputs(spark: SparkSession, inputs: list[str]) -> list[str]:
    """The files of ``download.archive_inputs``, each checked to exist and to open as a WARC or ARC archive.

    Raises FileNotFoundError for a missing file (or a pattern that matches none) and :class:`ArchiveInputError`
    for a file that cannot be opened or is not an archive, naming the files either way.
    """
    files: list[str] = []
    for entry in inputs:
        try:
            files.extend(list_input_files(spark, [entry]))
        except FileNotFoundError:
            raise FileNotFoundError(f"download.archive_inputs: {entry} matches no file") from None
    files = list(dict.fromkeys(files))
    if not files:
        raise FileNotFoundError(f"download.archive_inputs: no files in {', '.join(inputs)}")
    missing = _missing_files(spark, files)
    if missing:
        verb = "does not exist" if len(missing) == 1 else "do not exist"
        raise FileNotFoundError(f"download.archive_inputs: {_name_files(missing)} {verb}")
    problems = unreadable_archives(spark, files)
    if problems:
        named = _name_files([f"{path} ({problem})" for path, problem in problems])
        raise ArchiveInputError(
            f"download.archive_inputs: {len(problems)} of {len(files)} file(s) cannot be read as WARC or ARC "
            f"archives: {named}; fix them or take them off the list"
        )
    return files


def unreadable_archives(spark: SparkSession, files: list[str]) -> list[tuple[str, str]]:
    """(file, why) for each file a Python worker cannot open or does not recognise as an archive.

    A Spark job reads the first bytes of each file where the archives will be read, in the workers: a path the
    driver sees but the executors do not is caught here too. One row per bad file comes back.
    """
    frame = spark.createDataFrame([(path,) for path in files], "path string")
    problems = frame.mapInPandas(_problems_partition, "path string, problem string")
    return sorted((row.path, row.problem) for row in problems.collect())


def archive_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as an archive, or None when it opens and starts like a WARC or ARC file."""
    try:
        with open_input(path) as handle:
            sniff_stream(TrackedStream(handle))
    except NotAnArchive as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - whatever stops the open is the reason to report
        return f"cannot be opened: {type(exc).__name__}: {exc}"
    return None


def archive_responses(spark: SparkSession, files: list[str]) -> DataFrame:
    """The responses in ``files`` that may be images (``ARCHIVE_RESPONSES_SCHEMA``), one Spark task per file."""
    if not files:
        return spark.createDataFrame([], ARCHIVE_RESPONSES_SCHEMA)
    paths = spark.createDataFrame([(path,) for path in files], "path string").repartition(len(files))
    return paths.mapInPandas(_read_archives, ARCHIVE_RESPONSES_SCHEMA)


def one_capture_per_url(responses: DataFrame) -> DataFrame:
    """One response per URL, the same one on every run: a 2xx typed as an image first, then any other 2xx, then
    the rest; among those the latest capture; then the smallest (source file, record offset)."""
    success = F.col("http_status").between(200, 299)
    image_typed = F.lower(F.col("content_type")).startswith("image/")
    preference = F.when(success & image_typed, 0).when(success, 1).otherwise(2)
    order = Window.partitionBy("url").orderBy(
        preference, F.col("capture_date").desc_nulls_last(), F.col("source_file"), F.col("record_offset")
    )
    return responses.withColumn("_rank", F.row_number().over(order)).where(F.col("_rank") == 1).drop("_rank")


def iter_image_responses(path: str, stream: BinaryIO | None = None) -> Iterator[dict]:
    """Rows of ``ARCHIVE_RESPONSES_SCHEMA`` for the responses of one archive that may be images.

    Damage ends the file with a warning, keeping the responses read before it; nothing is raised.
    """
    counts = ReadCounts()
    emitted = 0
    try:
        handle = stream if stream is not None else open_input(path)
        with handle:
            for record in iter_records(TrackedStream(handle), ARCHIVE_READER, counts, IMAGE_RECORDS):
                url = normalize_url(clean_target_uri(record.target_uri))
                if not url:
                    continue
                emitted += 1
                yield {
                    "url": url,
                    "http_status": record.http_status,
                    "content_type": record.http_header("Content-Type"),
                    "x_robots_tag": "\n".join(record.http_header_values("X-Robots-Tag")) or None,
                    "body": record.payload,
                    "capture_date": record.date,
                    "source_file": path,
                    "record_offset": record.offset,
                }
    except BaseException as exc:  # noqa: BLE001 - a damaged file keeps what was read; interrupts still stop
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        log.warning(
            "archive %s: stopped after %d image responses (%d records read): %s",
            path,
            emitted,
            counts.records_read,
            reason,
        )


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


def _read_archives(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        for path in batch["path"]:
            rows: list[dict] = []
            for row in iter_image_responses(path):
                rows.append(row)
                if len(rows) >= ROWS_PER_BATCH:
                    yield _responses_frame(rows)
                    rows = []
            if rows:
                yield _responses_frame(rows)


def _responses_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=ARCHIVE_RESPONSES_SCHEMA.fieldNames())
    frame["http_status"] = pd.array(frame["http_status"].tolist(), dtype="Int32")
    # WARC-Date is UTC; naive values would be read in the session's time zone.
    frame["capture_date"] = pd.to_datetime(frame["capture_date"], utc=True)
    return frame


def _problems_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        problems = [(path, problem) for path in batch["path"] if (problem := archive_problem(path))]
        if problems:
            yield pd.DataFrame(problems, columns=["path", "problem"])


def _missing_files(spark: SparkSession, files: list[str]) -> list[str]:
    """Local files are looked at directly, the others in one listing job."""
    remote = [path for path in files if local_path(path) is None]
    listed = existing_files(spark, remote) if remote else {}
    missing = []
    for path in files:
        on_disk = local_path(path)
        if not os.path.exists(on_disk) if on_disk is not None else path not in listed:
            missing.append(path)
    return missing


def _name_files(names: list[str]) -> str:
    shown = ", ".join(names[:_FILES_NAMED])
    return shown if len(names) <= _FILES_NAMED else f"{shown} and {len(names) - _FILES_NAMED} more"
