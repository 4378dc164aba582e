"""The Spark side of extraction: one task per input file, then ``pairs`` and ``ingest_log`` in the lake.

The driver lists files and reads the ingest log; it never opens an archive. Each file becomes one partition of
a small DataFrame of paths, and ``mapInArrow`` streams it in a Python worker (worker.py), emitting pair rows
in bounded batches and one status row per file in a single output schema. That output is staged once (a Delta
staging table in the lake, not ``persist``, which serverless compute refuses), so the extraction runs once while
two tables are written from it: ``pairs`` with one ``replaceWhere`` commit over the
files of this run (re-reading a partial file replaces its rows), and ``ingest_log`` the same way, which upserts
it by ``source_file`` without the join of a MERGE.

Files that Python cannot open (a scheme with no fsspec implementation here, or ``extract.io: spark``) are read
with Spark's ``binaryFile`` source instead: the whole file is then one in-memory value (not streamed, and
limited to 2 GiB by Spark), which is why it is the fallback and not the default.
"""

from __future__ import annotations

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
from laion_spark.schemas import INGEST_LOG, INGEST_LOG_SCHEMA, PAIRS, PAIRS_SCHEMA
from laion_spark.storage import (
    StageCounter,
    ensure_table,
    new_run_id,
    read_table,
    replace_where,
    staged,
    table_exists,
)
from laion_spark.storage.files import existing_files

log = logging.getLogger(__name__)

_PROBLEMS_SHOWN = 5
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
    """Extract pairs from ``inputs`` (paths, globs, manifests) into ``<lake>/pairs`` and ``<lake>/ingest_log``."""
    started = time.perf_counter()
    result = ExtractResult(run_id=run_id or new_run_id())
    files = list_input_files(spark, inputs, config.extract.manifest_prefix)
    if not files:
        raise FileNotFoundError(f"no input files in {', '.join(inputs)}")
    done = set() if force else _files_already_ok(spark, lake, files)
    to_read = [f for f in files if f not in done]
    result.files_listed, result.files_skipped = len(files), len(done)
    counter = StageCounter(result.run_id, "extract")
    counter.add("files_not_yet_ok", len(files), len(to_read))
    totals = {"records_with_images": 0, "images_found": 0, "images_with_alt": 0}
    if to_read:
        # Staged once: pairs, the log and the totals all read the one extraction (no persist: serverless refuses it).
        with staged(extract_dataframe(spark, to_read, config.extract), lake, "extract") as extracted:
            output = extracted.unionByName(_statuses_of_unread_files(spark, extracted, to_read))
            ensure_table(spark, lake, PAIRS, PAIRS_SCHEMA)
            condition = sql_in("source_file", to_read)
            replace_where(pairs_from_output(output), lake, PAIRS, condition)
            # Replacing the log rows of exactly the files read is the upsert by source_file, as one cheap commit
            # (a MERGE would join against the whole log).
            ensure_table(spark, lake, INGEST_LOG, INGEST_LOG_SCHEMA)
            replace_where(ingest_log_from_output(output, result.run_id), lake, INGEST_LOG, condition)
            _collect_totals(output, result, totals)
    counter.add("files", len(to_read), result.files_ok + result.files_partial)
    counter.add("records", result.records_read, totals["records_with_images"])
    counter.add("images_with_alt_text", totals["images_found"], totals["images_with_alt"])
    counter.add("pairs", totals["images_with_alt"], result.pairs_written)
    counter.write(spark, lake)
    result.counter = counter
    result.duration_s = time.perf_counter() - started
    log.info("%s", result.summary())
    return result


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
    return output.where(F.col("kind") == PAIR).select(*_cast_to(PAIRS_SCHEMA))


def ingest_log_from_output(output: DataFrame, run_id: str) -> DataFrame:
    statuses = output.where(F.col("kind") == STATUS)
    statuses = statuses.withColumn("run_id", F.lit(run_id)).withColumn("finished_at", F.current_timestamp())
    return statuses.select(*_cast_to(INGEST_LOG_SCHEMA))


def sql_in(column: str, values: list[str]) -> str:
    """``column IN ('a', 'b')`` with Spark SQL string escaping, for Delta's ``replaceWhere``."""
    quoted = ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values)
    return f"`{column}` IN ({quoted})"


def _cast_to(schema: StructType) -> list:
    return [F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields]


def _files_already_ok(spark: SparkSession, lake: str, files: list[str]) -> set[str]:
    if not table_exists(spark, lake, INGEST_LOG):
        return set()
    ingest_log = read_table(spark, lake, INGEST_LOG)
    files_df = spark.createDataFrame([(f,) for f in files], "source_file string")
    ok = ingest_log.where(F.col("status") == "ok").select("source_file").join(files_df, "source_file")
    # One name per already-done input file: the listing we already hold, not data.
    return {row.source_file for row in ok.collect()}


def _collect_totals(output: DataFrame, result: ExtractResult, totals: dict[str, int]) -> None:
    statuses = output.where(F.col("kind") == STATUS)
    sums = [F.sum(name).alias(name) for name in ("records_read", "pairs_emitted", *totals)]
    for row in statuses.groupBy("status").agg(F.count("*").alias("files"), *sums).collect():
        setattr(result, f"files_{row.status}", row.files)
        result.records_read += row.records_read or 0
        result.pairs_written += row.pairs_emitted or 0
        for name in totals:
            totals[name] += row[name] or 0
    problems = statuses.where(F.col("status") != "ok").select("source_file", "status", "error")
    result.problems = [(r.source_file, r.status, r.error) for r in problems.limit(_PROBLEMS_SHOWN).collect()]


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


def _statuses_of_unread_files(spark: SparkSession, output: DataFrame, files: list[str]) -> DataFrame:
    """A ``failed`` status row for every file that got none (Spark skipped it as unreadable)."""
    reported = output.where(F.col("kind") == STATUS).select("source_file")
    unread = spark.createDataFrame([(f,) for f in files], "source_file string").join(
        reported, "source_file", "left_anti"
    )
    return _failed_status_rows(
        unread.withColumn("error", F.lit("Spark could not read the file (see the executor log)"))
    )


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
