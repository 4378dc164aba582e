"""The Spark side of extraction: one task per input file, then ``pairs`` and ``ingest_log`` in the lake, one
slice of files at a time.

The driver lists files and reads the ingest log; it never opens an archive. The files still to read are cut
into slices of ``extract.files_per_slice``; each slice is extracted and committed before the next starts, so a
killed run loses at most the slice in flight, and its rerun skips every file the log says is ``ok``. Each file
of a slice becomes one partition of a small DataFrame of paths, and ``mapInArrow`` streams it in a Python worker
(worker.py), emitting pair rows in bounded batches and one status row per file in a single output schema. That
output is staged once (a Delta staging table in the lake, not ``persist``, which serverless compute refuses), so
the extraction runs once while two tables are written from it.

``pairs`` is partitioned by ``ingest_batch``, the slice that first read the file (``<run_id>-<slice>``), and
``ingest_log`` names it for every file. Writing a slice is one ``replaceWhere`` over its partitions and files:
for new files the partition is new and Delta has nothing to scan, and a file read again (a partial or failed
read, ``--force``, a slice killed before its log commit) is replaced inside the one partition its rows are in.
No commit ever names more files than one slice, however many the run reads.

Files that Python cannot open (a scheme with no fsspec implementation here, or ``extract.io: spark``) are read
with Spark's ``binaryFile`` source instead: the whole file is then one in-memory value (not streamed, and
limited to 2 GiB by Spark), which is why it is the fallback and not the default.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from laion_spark.config import Config, ConfigError, ExtractConfig
from laion_spark.extract.inputs import list_input_files, python_can_open
from laion_spark.extract.worker import OUTPUT_SCHEMA, PAIR, STATUS, ExtractRules, extract_partition
from laion_spark.remove.blocklist import Blocklist, drop_blocked_pairs, read_blocklist
from laion_spark.run.progress import stage_progress
from laion_spark.schemas import INGEST_LOG, INGEST_LOG_SCHEMA, PAIR_ROW_SCHEMA, PAIRS, PAIRS_SCHEMA
from laion_spark.storage import (
    StageCounter,
    append,
    ensure_table,
    new_run_id,
    read_table,
    replace_where,
    staged,
    table_exists,
)
from laion_spark.storage.audit import record_run
from laion_spark.storage.delta import sql_in
from laion_spark.storage.files import existing_files

log = logging.getLogger(__name__)

_PROBLEMS_SHOWN = 5
_STATUS_COLUMNS = [
    "source_file", "status", "records_read", "pairs_emitted", "error", "duration_s",
    "records_with_images", "images_found", "images_with_alt",
]  # fmt: skip
_BINARY_FILE_MAX_LENGTH = "spark.sql.sources.binaryFile.maxLength"


@dataclass
class ExtractResult:
    run_id: str
    files_listed: int = 0
    files_skipped: int = 0  # already ok in ingest_log (rerun with force=True to re-read them)
    files_ok: int = 0
    files_partial: int = 0
    files_failed: int = 0
    records_read: int = 0
    pairs_written: int = 0
    pairs_removed: int = 0  # pairs whose url or uid is in the lake's removals (a takedown): never written
    duration_s: float = 0.0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (file, status, error), a few
    counter: StageCounter | None = None

    @property
    def files_read(self) -> int:
        return self.files_ok + self.files_partial + self.files_failed

    def summary(self) -> str:
        lines = [
            f"extract (run {self.run_id}): {self.files_listed:,} file(s) listed, {self.files_skipped:,} skipped "
            f"(already ok), {self.files_read:,} read: {self.files_ok:,} ok, {self.files_partial:,} partial, "
            f"{self.files_failed:,} failed",
            f"  {self.records_read:,} records read, {self.pairs_written:,} pairs written in {self.duration_s:.1f}s",
        ]
        if self.pairs_removed:
            lines.append(f"  {self.pairs_removed:,} pairs not written: their url or uid is in the lake's removals")
        for source_file, status, error in self.problems:
            lines.append(f"  {status}: {source_file}: {error}")
        if self.files_partial + self.files_failed > len(self.problems):
            lines.append("  (every file's status and error is in the ingest_log table)")
        if self.counter is not None:
            lines.append(self.counter.summary())
        return "\n".join(lines)


def run_extract(
    spark: SparkSession,
    config: Config,
    lake: str,
    inputs: list[str],
    force: bool = False,
    run_id: str | None = None,
) -> ExtractResult:
    """Extract pairs from ``inputs`` (paths, globs, manifests) into ``<lake>/pairs`` and ``<lake>/ingest_log``,
    ``extract.files_per_slice`` files at a time, each slice committed before the next starts."""
    started = time.perf_counter()
    result = ExtractResult(run_id=run_id or new_run_id())
    if config.extract.files_per_slice < 1:
        raise ConfigError(f"extract.files_per_slice must be at least 1, got {config.extract.files_per_slice}")
    files = list_input_files(spark, inputs, config.extract.manifest_prefix)
    if not files:
        raise FileNotFoundError(f"no input files in {', '.join(inputs)}")
    logged = _logged_files(spark, lake, files)
    to_read = [f for f in files if force or logged.get(f, ("", ""))[0] != "ok"]
    result.files_listed, result.files_skipped = len(files), len(files) - len(to_read)
    counter = StageCounter(result.run_id, "extract")
    counter.add("files_not_yet_ok", len(files), len(to_read))
    totals = {"records_with_images": 0, "images_found": 0, "images_with_alt": 0}
    blocklist = read_blocklist(spark, lake)
    size = config.extract.files_per_slice
    slices = [to_read[i : i + size] for i in range(0, len(to_read), size)]
    if slices:
        ensure_table(spark, lake, PAIRS)
        ensure_table(spark, lake, INGEST_LOG)
    # A file read before keeps the partition its rows are in; a new one goes to its slice's.
    batch_of = {
        f: logged[f][1] if f in logged else f"{result.run_id}-{n:05d}" for n, sl in enumerate(slices, 1) for f in sl
    }
    new_files = [f for f in to_read if f not in logged]
    if new_files:
        # Every new file's row, status "started", naming its partition, before any pairs are written: one commit.
        markers = spark.createDataFrame(
            [(f, batch_of[f]) for f in new_files], "source_file string, ingest_batch string"
        )
        append(_started_rows(markers, result.run_id), lake, INGEST_LOG)
    with stage_progress(config, "extract", len(to_read), "files", result.run_id) as progress:
        for number, slice_files in enumerate(slices, 1):
            _extract_slice(spark, config, lake, {f: batch_of[f] for f in slice_files}, result, totals, blocklist)
            progress.advance(len(slice_files))
            log.info(
                "extract: slice %d of %d committed (%d files); %d pairs so far",
                number, len(slices), len(slice_files), result.pairs_written,
            )  # fmt: skip
    counter.add("files", len(to_read), result.files_ok + result.files_partial)
    counter.add("records", result.records_read, totals["records_with_images"])
    counter.add("images_with_alt_text", totals["images_found"], totals["images_with_alt"])
    counter.add("pairs", totals["images_with_alt"], result.pairs_written + result.pairs_removed)
    if not blocklist.empty:
        counter.add("not_removed", result.pairs_written + result.pairs_removed, result.pairs_written)
    counter.write(spark, lake)
    record_run(spark, lake, result.run_id, "extract", config)
    result.counter = counter
    result.duration_s = time.perf_counter() - started
    log.info("%s", result.summary())
    return result


def _extract_slice(
    spark: SparkSession,
    config: Config,
    lake: str,
    batches: dict[str, str],
    result: ExtractResult,
    totals: dict[str, int],
    blocklist: Blocklist,
) -> None:
    """Extract one slice of files and commit it, in an order that a kill at any moment leaves resumable (README,
    "Crawl scale"). Every file already has its ``ingest_log`` row naming its partition (``batches``), written
    before the first slice (status ``started`` for a new file). Then:

    1. ``pairs``: one ``replaceWhere`` over the slice's partitions and files (rows of an earlier, partial read of
       a file are replaced; a new partition holds nothing to scan);
    2. ``ingest_log``: the files' final status. Until then a file is not ``ok``, and a rerun reads it again into
       the same partition, replacing whatever step 1 left there.
    """
    files = list(batches)
    with staged(extract_dataframe(spark, files, config.extract), lake, "extract") as extracted:
        # One status row per file that was read: as many rows as the slice has files, not data.
        statuses = [row.asDict() for row in extracted.where(F.col("kind") == STATUS).select(*_STATUS_COLUMNS).collect()]
        reported = {row["source_file"] for row in statuses}
        statuses += [_unread_status(f) for f in files if f not in reported]
        condition = f"{sql_in('ingest_batch', sorted(set(batches.values())))} AND {sql_in('source_file', files)}"
        pairs = pairs_from_output(extracted).withColumn("ingest_batch", _batch_of_file(batches))
        if not blocklist.empty:  # a takedown's URLs and pairs never enter pairs again, whatever the crawl
            kept = pairs.transform(drop_blocked_pairs, blocklist)
            removed = pairs.count() - kept.count()
            pairs = kept
        replace_where(pairs.select(*PAIRS_SCHEMA.names), lake, PAIRS, condition)
    finished_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    log_rows = [
        tuple({**row, "run_id": result.run_id, "finished_at": finished_at, "ingest_batch": batches[row["source_file"]]}[name]
              for name in INGEST_LOG_SCHEMA.names)
        for row in statuses
    ]  # fmt: skip
    replace_where(spark.createDataFrame(log_rows, INGEST_LOG_SCHEMA), lake, INGEST_LOG, sql_in("source_file", files))
    _add_totals(statuses, result, totals)
    if not blocklist.empty:
        result.pairs_written -= removed
        result.pairs_removed += removed


def extract_dataframe(spark: SparkSession, files: list[str], config: ExtractConfig) -> DataFrame:
    """Pair rows and one status row per file (``OUTPUT_SCHEMA``, column ``kind``), one Spark task per file."""
    rules = ExtractRules.from_config(config)
    if config.io not in ("auto", "spark"):
        raise ConfigError(f"extract.io must be 'auto' or 'spark', got {config.io!r}")
    if config.reader not in ("auto", "fastwarc", "warcio"):
        raise ConfigError(f"extract.reader must be 'auto', 'fastwarc' or 'warcio', got {config.reader!r}")
    if config.rows_per_batch < 1:
        raise ConfigError(f"extract.rows_per_batch must be at least 1, got {config.rows_per_batch}")
    streamed = [f for f in files if config.io == "auto" and python_can_open(f)]
    streamed_set = set(streamed)
    by_spark = [f for f in files if f not in streamed_set]
    extract = functools.partial(extract_partition, rules=rules, rows_per_batch=config.rows_per_batch)
    frames = []
    if streamed:
        # One row per partition of a range, mapped to its file inside the task: exactly one file per task,
        # without an RDD (Spark Connect has none).
        by_index = functools.partial(_extract_file_by_index, files=streamed, extract=extract)
        frames.append(spark.range(0, len(streamed), 1, len(streamed)).mapInArrow(by_index, OUTPUT_SCHEMA))
    if by_spark:
        frames.append(_extract_with_binary_file(spark, by_spark, rules, config.rows_per_batch))
    return functools.reduce(DataFrame.unionByName, frames)


def pairs_from_output(output: DataFrame) -> DataFrame:
    """The pair rows of an extraction's output (``PAIR_ROW_SCHEMA``: the table adds ``ingest_batch``)."""
    return output.where(F.col("kind") == PAIR).select(*_cast_to(PAIR_ROW_SCHEMA))


def ingest_log_from_output(output: DataFrame, run_id: str) -> DataFrame:
    """One ``ingest_log`` row per file of an extraction's output, every column but ``ingest_batch``."""
    statuses = output.where(F.col("kind") == STATUS)
    statuses = statuses.withColumn("run_id", F.lit(run_id)).withColumn("finished_at", F.current_timestamp())
    return statuses.select(*_cast_to(_without(INGEST_LOG_SCHEMA, "ingest_batch")))


def _without(schema: StructType, name: str) -> StructType:
    return StructType([f for f in schema.fields if f.name != name])


def _batch_of_file(batches: dict[str, str]):
    """The ``ingest_batch`` of each row's ``source_file`` (a slice names a few files: a literal map is enough)."""
    pairs = [F.lit(v) for item in batches.items() for v in item]
    return F.create_map(*pairs)[F.col("source_file")]


def _started_rows(files: DataFrame, run_id: str) -> DataFrame:
    """(source_file, ingest_batch) -> ``ingest_log`` rows of status ``started``."""
    values = {
        "status": F.lit("started"),
        "records_read": F.lit(0),
        "pairs_emitted": F.lit(0),
        "duration_s": F.lit(0.0),
        "run_id": F.lit(run_id),
        "finished_at": F.current_timestamp(),
    }
    return files.select(
        [values.get(f.name, F.col(f.name) if f.name in files.columns else F.lit(None)).cast(f.dataType).alias(f.name)
         for f in INGEST_LOG_SCHEMA.fields]
    )  # fmt: skip


def _cast_to(schema: StructType) -> list:
    return [F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields]


def _logged_files(spark: SparkSession, lake: str, files: list[str]) -> dict[str, tuple[str, str]]:
    """{source_file: (status, ingest_batch)} for the listed files that ``ingest_log`` has a row for."""
    if not table_exists(spark, lake, INGEST_LOG):
        return {}
    ingest_log = read_table(spark, lake, INGEST_LOG)
    files_df = spark.createDataFrame([(f,) for f in files], "source_file string")
    logged = ingest_log.select("source_file", "status", "ingest_batch").join(files_df, "source_file")
    # One row per listed input file: the listing the driver already holds, not data.
    return {row.source_file: (row.status, row.ingest_batch) for row in logged.collect()}


def _add_totals(statuses: list[dict], result: ExtractResult, totals: dict[str, int]) -> None:
    for row in statuses:
        name = f"files_{row['status']}"
        setattr(result, name, getattr(result, name) + 1)
        result.records_read += row["records_read"] or 0
        result.pairs_written += row["pairs_emitted"] or 0
        for key in totals:
            totals[key] += row[key] or 0
        if row["status"] != "ok" and len(result.problems) < _PROBLEMS_SHOWN:
            result.problems.append((row["source_file"], row["status"], row["error"]))


def _extract_with_binary_file(
    spark: SparkSession, files: list[str], rules: ExtractRules, rows_per_batch: int
) -> DataFrame:
    """The ``binaryFile`` path. Every input ends with a status row: a file Spark lists but cannot read (above
    binaryFile's length limit, an I/O or permission error, a directory) is logged ``failed``, never fatal."""
    existing = existing_files(spark, files)
    readable = {qualified: source_file for source_file, qualified in existing.items()}
    failed = [(f, "FileNotFoundError: no file there (missing, or a directory)") for f in files if f not in existing]
    frames = []
    if readable:
        names = spark.createDataFrame(list(readable.items()), "path string, source_file string")
        max_length = int(spark.conf.get(_BINARY_FILE_MAX_LENGTH, str(2**31 - 1)))
        # binaryFile applies a length filter before it reads a file, so a file above its limit is logged here
        # instead of failing the job; ignoreCorruptFiles turns a read error into a missing row, which
        # run_extract logs as failed (every file read gets a status row).
        files_frame = spark.read.format("binaryFile").option("ignoreCorruptFiles", "true").load(list(readable))
        content = files_frame.where(F.col("length") <= max_length).join(names, "path")
        extract = functools.partial(extract_partition, rules=rules, rows_per_batch=rows_per_batch)
        frames.append(content.select("source_file", "content").mapInArrow(extract, OUTPUT_SCHEMA))
        too_long = files_frame.where(F.col("length") > max_length).select("path", "length").join(names, "path")
        error = F.format_string(
            f"binaryFile cannot read %d bytes (above {_BINARY_FILE_MAX_LENGTH} = %d)", "length", F.lit(max_length)
        )
        frames.append(_failed_status_rows(too_long.select("source_file", error.alias("error"))))
    if failed:
        frames.append(_failed_status_rows(spark.createDataFrame(failed, "source_file string, error string")))
    return functools.reduce(DataFrame.unionByName, frames)


def _extract_file_by_index(batches, files: list[str], extract) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        sources = pa.array([files[i] for i in batch.column("id").to_pylist()], pa.string())
        yield from extract(iter([pa.RecordBatch.from_arrays([sources], names=["source_file"])]))


def _unread_status(source_file: str) -> dict:
    """The ``failed`` status of a file that got no status row (Spark skipped it as unreadable)."""
    row = {name: 0 for name in _STATUS_COLUMNS if name not in ("source_file", "status", "error", "duration_s")}
    error = "Spark could not read the file (see the executor log)"
    return {**row, "source_file": source_file, "status": "failed", "error": error, "duration_s": 0.0}


def _failed_status_rows(files: DataFrame) -> DataFrame:
    """(source_file, error) -> ``failed`` status rows of ``OUTPUT_SCHEMA``."""
    values = {"kind": F.lit(STATUS), "status": F.lit("failed"), "duration_s": F.lit(0.0)}
    zero_counts = ("records_read", "pairs_emitted", "records_with_images", "images_found", "images_with_alt")
    columns = []
    for f in OUTPUT_SCHEMA.fields:
        if f.name in ("source_file", "error"):
            value = F.col(f.name)
        elif f.name in zero_counts:
            value = F.lit(0)
        else:
            value = values.get(f.name, F.lit(None))
        columns.append(value.cast(f.dataType).alias(f.name))
    return files.select(columns)
