"""The download stage in Spark: candidates -> ``images``, one row per candidate, fetched inside Python workers.

Each Spark task streams its URLs through the worker's :class:`Fetcher` (a thread pool built once per Python worker
and reused by every task it runs), decodes and resizes in the same threads, and yields rows a few hundred at a time.

The URLs still to fetch (candidates with no final row in ``images``: an anti-join over the key columns) are staged
once, narrow, and fetched ``download.urls_per_slice`` at a time; each slice is one commit to ``images``, in a
partition of its own (``fetch_batch`` = ``<run_id>-<slice>``). A killed run loses at most the slice in flight: the
rerun's anti-join no longer finds the URLs of committed slices. The outcomes are counted at the end from the
partitions this run wrote, so no URL is fetched twice for counting.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.config import Config, ConfigError
from laion_spark.download import status
from laion_spark.download.archive import (
    archive_responses,
    judge_archived_response,
    list_archive_inputs,
    one_capture_per_url,
)
from laion_spark.download.fetch import Fetcher, FetchResult, FetchSettings
from laion_spark.download.images import ImageSettings, ProcessedImage, process_image
from laion_spark.remove.blocklist import drop_blocked_pairs, read_blocklist, withhold_blocked_images
from laion_spark.run.progress import stage_progress
from laion_spark.schemas import CANDIDATES, IMAGE_ROW_SCHEMA, IMAGES, IMAGES_SCHEMA
from laion_spark.storage import StageCounter, append, ensure_table, new_run_id, read_table, upsert
from laion_spark.storage.audit import record_rejections, record_run, rejection_rows
from laion_spark.storage.slices import BUCKET, plan_slices, staged_work, with_bucket
from laion_spark.storage.stats import count_drops

log = logging.getLogger(__name__)

ROWS_PER_BATCH = 256
# Enough URLs per task that the thread pool stays busy, few enough that a lost task costs little to redo.
URLS_PER_PARTITION = 20_000
SOURCES = ("http", "archive")
_FAILED_OUTCOMES = [name for name in status.ALL if name != status.SUCCESS]


@functools.cache
def worker_fetcher(settings: FetchSettings) -> Fetcher:
    """One Fetcher (thread pool, per-host slots) per Python worker and settings, reused across tasks."""
    return Fetcher(settings)


def mark_settled(candidates: DataFrame, images: DataFrame, retry_failed: bool = False) -> DataFrame:
    """(uid, url, settled): ``settled`` when ``images`` already holds a final row for the uid.

    Every row is final unless ``retry_failed``, which reopens the failures (``status.FAILURES``).
    """
    wanted = candidates.select("uid", "url").dropDuplicates(["uid"])
    final = images.where(~F.col("status").isin(*status.FAILURES)) if retry_failed else images
    done = final.select("uid", F.lit(True).alias("settled"))
    return wanted.join(done, "uid", "left").select("uid", "url", F.coalesce("settled", F.lit(False)).alias("settled"))


def urls_to_fetch(candidates: DataFrame, images: DataFrame, retry_failed: bool = False) -> DataFrame:
    """Candidates (uid, url) without a final row in ``images``; with ``retry_failed`` the failures come back too."""
    return mark_settled(candidates, images, retry_failed).where(~F.col("settled")).select("uid", "url")


def fetch_images(to_fetch: DataFrame, fetch_settings: FetchSettings, image_settings: ImageSettings) -> DataFrame:
    """(uid, url) -> ``IMAGE_ROW_SCHEMA`` rows, fetched over HTTP inside the Python workers."""

    def fetch_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        yield from _fetch_partition(batches, fetch_settings, image_settings)

    # Sorted, each task sees the rows of one URL together, so it fetches every URL once (see _fetch_partition).
    return to_fetch.select("uid", "url").sortWithinPartitions("url").mapInPandas(fetch_partition, IMAGE_ROW_SCHEMA)


def images_from_archive(
    to_fetch: DataFrame, responses: DataFrame, fetch_settings: FetchSettings, image_settings: ImageSettings
) -> DataFrame:
    """(uid, url) + archived responses -> ``IMAGE_ROW_SCHEMA`` rows; URLs with no record get ``not_in_archive``.

    Only the captures of wanted URLs are kept before one is chosen per URL (the same one on every run).
    """
    wanted = to_fetch.select("url").distinct()
    captures = one_capture_per_url(responses.join(wanted, "url", "left_semi"))
    answers = captures.select("url", "http_status", "content_type", "x_robots_tag", "body")
    joined = to_fetch.select("uid", "url").join(answers, "url", "left")

    def judge_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        rows: list[dict] = []
        for batch in batches:
            for row in batch.itertuples(index=False):
                code = None if pd.isna(row.http_status) else int(row.http_status)
                body = None if row.body is None or (not isinstance(row.body, bytes) and pd.isna(row.body)) else row.body
                fetched = judge_archived_response(
                    row.url, code, _text(row.content_type), _text(row.x_robots_tag), body, fetch_settings
                )
                rows.append(_image_row(row.uid, fetched, _check(fetched, image_settings)))
                if len(rows) >= ROWS_PER_BATCH:
                    yield _frame(rows)
                    rows = []
        if rows:
            yield _frame(rows)

    return joined.mapInPandas(judge_partition, IMAGE_ROW_SCHEMA)


def run_download(
    spark: SparkSession, config: Config, lake: str, run_id: str | None = None, retry_failed: bool = False
) -> StageCounter:
    """Fetch every candidate URL with no final status yet and upsert one row per candidate into ``images``,
    ``download.urls_per_slice`` URLs at a time, each slice committed before the next starts."""
    settings = config.download
    if settings.source not in SOURCES:
        raise ConfigError(f"download.source = {settings.source!r}: use 'http' or 'archive'")
    if settings.source == "archive" and not settings.archive_inputs:
        raise ConfigError("download.source is 'archive' but download.archive_inputs is empty: list the WARC files")
    if settings.urls_per_slice < 1:
        raise ConfigError(f"download.urls_per_slice must be at least 1, got {settings.urls_per_slice}")
    fetch_settings = FetchSettings.from_config(settings)
    image_settings = ImageSettings.from_config(settings)
    counter = StageCounter(run_id or new_run_id(), "download")

    # A URL or pair in the lake's removals is never fetched; an image whose hash is there is never stored.
    blocklist = read_blocklist(spark, lake)
    candidates = read_table(spark, lake, CANDIDATES).transform(drop_blocked_pairs, blocklist)
    images = read_table(spark, lake, IMAGES, missing_ok=True)
    marked = mark_settled(candidates, images, retry_failed)
    wanted = counter.count_drops(marked, F.when(F.col("settled"), F.lit("to_fetch")), ["to_fetch"])
    wanted_count, fetch_count = wanted.rows_in, wanted.rows_out
    if fetch_count == 0:
        counter.write(spark, lake)
        return counter
    to_fetch = with_bucket(marked.where(~F.col("settled")).select("uid", "url"), "url")
    ensure_table(spark, lake, IMAGES)
    slices = plan_slices([(None, fetch_count)], settings.urls_per_slice)
    # Every URL of the run, narrow (uid, url), staged once: each slice then reads its own bucket range of it,
    # instead of joining candidates with images again. One slice reads the join once anyway: no staging table
    # (its write, read and drop are a fixed cost that a small run felt most: bench/download.py).
    staging = (
        nullcontext(to_fetch)
        if len(slices) == 1
        else staged_work(to_fetch, lake, "download_todo", [BUCKET, "url"], fetch_count)
    )
    with stage_progress(config, "download", fetch_count, "urls", counter.run_id) as progress, staging as todo:
        for piece in slices:
            batch = f"{counter.run_id}-{piece.number:05d}"
            rows = todo.where(piece.condition()).select("uid", "url")
            fetched = _fetch_slice(spark, config, rows, piece.rows, fetch_settings, image_settings)
            fetched = withhold_blocked_images(fetched, blocklist, status.REMOVED)
            _commit_slice(fetched, lake, batch, retry_failed)
            progress.advance(piece.rows)
            log.info(
                "download: slice %d of %d committed (~%d URLs, batch %s)", piece.number, len(slices), piece.rows, batch
            )

    # The outcomes of this run, from the partitions it wrote (narrow columns, partition-pruned).
    this_run = read_table(spark, lake, IMAGES).where(F.col("fetch_batch").startswith(f"{counter.run_id}-"))
    outcomes = count_drops(this_run, F.when(F.col("status") != status.SUCCESS, F.col("status")), _FAILED_OUTCOMES)
    # Not a chain of filters: every URL ends with one outcome, so the failures are a breakdown of one step.
    counter.add(status.SUCCESS, fetch_count, outcomes.rows_out)
    for name, count in outcomes.dropped:
        if count:
            counter.add_outcome(name, fetch_count, count)
    counter.write(spark, lake)
    if config.dataset.rejections:
        failed = this_run.where(F.col("status") != status.SUCCESS)
        detail = F.coalesce(F.col("error"), F.col("status"))
        record_rejections(rejection_rows(failed, "download", counter.run_id, F.col("status"), detail), lake)
    record_run(spark, lake, counter.run_id, "download", config)
    log.info("download: %d of %d candidates fetched, %d succeeded", fetch_count, wanted_count, outcomes.rows_out)
    return counter


def _fetch_slice(
    spark: SparkSession,
    config: Config,
    to_fetch: DataFrame,
    rows: int,
    fetch_settings: FetchSettings,
    image_settings: ImageSettings,
) -> DataFrame:
    """One slice's (uid, url) -> ``IMAGE_ROW_SCHEMA`` rows, over HTTP or from the archives."""
    settings = config.download
    if settings.source == "http":
        partitions = settings.partitions or max(_default_parallelism(spark), math.ceil(rows / URLS_PER_PARTITION))
        # Hashing by URL puts every uid of one URL in the same task, which then fetches the URL once.
        return fetch_images(to_fetch.repartition(partitions, "url"), fetch_settings, image_settings)
    # Raises on the driver, before any archive is read, when an input is missing or is not an archive.
    archives = list_archive_inputs(spark, settings.archive_inputs)
    responses = archive_responses(spark, archives)
    return images_from_archive(to_fetch, responses, fetch_settings, image_settings)


def _commit_slice(fetched: DataFrame, lake: str, batch: str, retry_failed: bool) -> None:
    """One commit to ``images``: the slice's rows, in the partition ``batch``."""
    results = fetched.withColumn("fetch_batch", F.lit(batch)).select(*IMAGES_SCHEMA.names)
    if retry_failed:
        # Retried rows replace their failures: deletion vectors mark the old rows, no data file is rewritten.
        upsert(results, lake, IMAGES, ["uid", "url"])
    else:
        # Every uid here was anti-joined against images: a plain append is the same as a MERGE, and cheaper.
        append(results, lake, IMAGES)


def _default_parallelism(spark: SparkSession) -> int:
    """The cluster's parallelism as the session's config states it (Spark Connect has no SparkContext to ask)."""
    for key in ("spark.default.parallelism", "spark.sql.shuffle.partitions"):
        value = spark.conf.get(key, None)
        if value and str(value).isdigit():
            return int(value)
    return 8


def _fetch_partition(
    batches: Iterator[pd.DataFrame], fetch_settings: FetchSettings, image_settings: ImageSettings
) -> Iterator[pd.DataFrame]:
    fetcher = worker_fetcher(fetch_settings)
    uids_by_url: dict[str, list[str]] = {}
    # Rows come sorted by URL: once the feeder has moved past a URL, no later row has it. A URL's result that
    # arrives while the feeder is still on that URL is kept until it moves on, for the URL's rows still to come;
    # they become rows here instead of a second request to the same server.
    current_url: list[str | None] = [None]
    finished: dict[str, tuple[FetchResult, ProcessedImage | None]] = {}
    late_rows: list[dict] = []

    def new_urls() -> Iterator[str]:
        # Pulled lazily by the pool's feeder, in this thread: the dicts need no lock.
        for batch in batches:
            for uid, url in zip(batch["uid"], batch["url"], strict=True):
                if url != current_url[0]:
                    finished.pop(current_url[0], None)
                    current_url[0] = url
                done = finished.get(url)
                if done is not None:
                    late_rows.append(_image_row(uid, *done))
                    continue
                waiting = uids_by_url.get(url)
                if waiting is not None:
                    waiting.append(uid)
                    continue
                uids_by_url[url] = [uid]
                yield url

    def fetch_and_check(url: str) -> tuple[FetchResult, ProcessedImage | None]:
        fetched = fetcher.fetch(url)
        checked = _check(fetched, image_settings)
        fetched.body = None  # the re-encoded image is what we keep
        return fetched, checked

    rows: list[dict] = []
    for fetched, checked in fetcher.map_unordered(fetch_and_check, new_urls()):
        for uid in uids_by_url.pop(fetched.url):
            rows.append(_image_row(uid, fetched, checked))
        if fetched.url == current_url[0]:
            finished[fetched.url] = (fetched, checked)
        rows.extend(late_rows)
        late_rows.clear()
        if len(rows) >= ROWS_PER_BATCH:
            yield _frame(rows)
            rows = []
    rows.extend(late_rows)
    if rows:
        yield _frame(rows)


@dataclass
class _CheckedImage(ProcessedImage):
    """A processed image with the md5 of its body as downloaded, by which takedown lists name images."""

    md5: str | None = None


def _check(fetched: FetchResult, image_settings: ImageSettings) -> ProcessedImage | None:
    if fetched.status != status.SUCCESS or fetched.body is None:
        return None
    processed = process_image(fetched.body, image_settings)
    facts = {f.name: getattr(processed, f.name) for f in fields(processed)}
    return _CheckedImage(**facts, md5=hashlib.md5(fetched.body, usedforsecurity=False).hexdigest())


def _image_row(uid: str, fetched: FetchResult, checked: ProcessedImage | None) -> dict:
    row = {
        "uid": uid,
        "url": fetched.url,
        "status": fetched.status,
        "error": fetched.error,
        "http_status": fetched.http_status,
        "content_type": fetched.content_type,
        "original_width": None,
        "original_height": None,
        "width": None,
        "height": None,
        "sha256": None,
        "phash": None,
        "image": None,
        "attempts": max(1, fetched.attempts),
        "md5": None,
    }
    if checked is not None:
        row.update(
            status=checked.status,
            error=checked.error,
            original_width=checked.original_width,
            original_height=checked.original_height,
            width=checked.width,
            height=checked.height,
            sha256=checked.sha256,
            phash=checked.phash,
            image=checked.image,
            md5=getattr(checked, "md5", None),
        )
    return row


_INT_COLUMNS = ("http_status", "original_width", "original_height", "width", "height", "attempts")


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=[f for f in IMAGE_ROW_SCHEMA.fieldNames() if f != "fetched_at"])
    for column in _INT_COLUMNS:
        frame[column] = pd.array(frame[column].tolist(), dtype="Int32")
    # From the dicts, not the frame's column: pandas makes ints mixed with Nones float64, which rounds 64-bit hashes.
    frame["phash"] = pd.array([row["phash"] for row in rows], dtype="Int64")
    frame["fetched_at"] = pd.Timestamp.now(tz="UTC")
    return frame


def _text(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
