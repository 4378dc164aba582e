"""The driver's side of an export: which rows go into which file group, at which position, and which Spark task
writes each group. Nothing here collects table data: only one count per uid-prefix bucket, one row per file
group OUT holds, and one probe row per task.

Numbering without a global sort: the rows to export are cut into buckets by the first hex digits of their uid,
and counted per bucket; a row's index is its bucket's offset (the rows of the buckets before it) plus its rank
by uid inside its bucket, so the indexes run 0..n-1 in uid order and every file group but the last gets exactly
its size. A window over one bucket sorts a few thousandths of the rows, in parallel over buckets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from laion_spark.config import Config
from laion_spark.export.layout import ExportLayout
from laion_spark.schemas import CANDIDATES
from laion_spark.storage import read_table, table_exists
from laion_spark.storage.outputs import OutputDir

LICENSE_COLUMN = "license"  # of candidates: the page's CC licence (extract.licenses); null in lakes made before it
# Hex digits of the uid that make a bucket: 4096 buckets, about 100,000 rows each for 400 million rows.
BUCKET_DIGITS = 3
BUCKET = "export_bucket"
# Probe keys per task when looking for one hash-partitioning key per task (see one_task_per_group).
_PROBES_PER_TASK = 32


@dataclass
class ExportContext:
    format: str  # laion | laion5b | webdataset | embeddings
    spark: SparkSession
    lake: str
    config: Config
    dataset: DataFrame  # the dataset at the version this run exports
    dataset_version: int
    options: dict[str, Any] = field(default_factory=dict)  # the format's options, as the state file records them


def with_license(ctx: ExportContext, rows: DataFrame) -> DataFrame:
    """``rows`` with the pair's licence: from candidates once it has a ``license`` column, else null."""
    if table_exists(ctx.spark, ctx.lake, CANDIDATES):
        candidates = read_table(ctx.spark, ctx.lake, CANDIDATES)
        if LICENSE_COLUMN in candidates.columns:
            licenses = candidates.select("uid", F.col(LICENSE_COLUMN).cast("string").alias(LICENSE_COLUMN))
            return rows.join(licenses, "uid", "left")
    return rows.withColumn(LICENSE_COLUMN, F.lit(None).cast("string"))


def read_exported(
    spark: SparkSession, out: OutputDir, layout: ExportLayout, groups: list[int], key_digits: int = 0
) -> DataFrame:
    """(key, group, position) of every row OUT's complete groups hold, read from their completing files (one
    column each). ``position`` is only known where the file says it (a webdataset key); null elsewhere."""
    paths = [out.uri_of(layout.completing.path(n)) for n in groups]
    files = spark.read.parquet(*paths)
    group = F.regexp_extract(F.col("_metadata.file_name"), layout.completing.pattern, 1).cast("long")
    position = (
        F.substring(F.col("key"), -key_digits, key_digits).cast("long") if key_digits else F.lit(None).cast("long")
    )
    return files.select(F.col(layout.key_column).alias("key"), group.alias("group"), position.alias("position"))


def count_by_bucket(todo: DataFrame) -> list[tuple[int, int]]:
    """(bucket, rows) of the rows to export, in bucket order: at most 16**BUCKET_DIGITS rows."""
    counts = with_bucket(todo).groupBy(BUCKET).count().collect()
    return sorted((int(row[BUCKET]), int(row["count"])) for row in counts)


def with_bucket(df: DataFrame) -> DataFrame:
    return df.withColumn(BUCKET, F.conv(F.substring("uid", 1, BUCKET_DIGITS), 16, 10).cast("int"))


def number_rows(
    todo: DataFrame, buckets: list[tuple[int, int]], rows_per_group: int, gaps: list[int], next_number: int
) -> DataFrame:
    """(uid, group, position): the rows of ``todo`` cut in uid order into groups of ``rows_per_group``, numbered
    ``gaps`` first (numbers free below the highest complete group), then from ``next_number`` on."""
    spark = todo.sparkSession
    offsets, total = [], 0
    for bucket, rows in buckets:
        offsets.append((bucket, total))
        total += rows
    offset_table = spark.createDataFrame(offsets, f"{BUCKET} int, bucket_offset long")
    rank = F.row_number().over(Window.partitionBy(BUCKET).orderBy("uid"))
    indexed = (
        with_bucket(todo)
        .join(F.broadcast(offset_table), BUCKET)
        .select("uid", (F.col("bucket_offset") + rank - 1).alias("row_index"))
    )
    ordinal = F.floor(F.col("row_index") / rows_per_group).cast("int")
    group = (ordinal - len(gaps) + next_number).cast("long")
    if gaps:
        filled = F.element_at(F.array(*[F.lit(n).cast("long") for n in gaps]), ordinal + 1)
        group = F.when(ordinal < len(gaps), filled).otherwise(group)
    return indexed.select("uid", group.alias("group"), (F.col("row_index") % rows_per_group).alias("position"))


def one_task_per_group(rows: DataFrame, groups: list[int]) -> DataFrame:
    """``rows`` in ``len(groups)`` partitions, each holding exactly one group, sorted by position.

    Hash partitioning sends a row to partition ``pmod(hash(key), n)``, and ``hash`` is a SQL function: probing a
    few integers per partition finds, for every partition, one integer key that lands there, and each group gets
    the key of its own partition. (Range partitioning would balance as well, but it samples its input first, and
    that input is the rows joined to their image bytes.) A partition the probe missed (odds e^-32) only makes two
    groups share a task, which writes them one after the other.
    """
    spark = rows.sparkSession
    tasks = len(groups)
    probe = spark.range(0, tasks * _PROBES_PER_TASK).select(
        F.col("id").alias("task_key"), F.expr(f"pmod(hash(id), {tasks})").alias("task")
    )
    # One row per task.
    found = {
        int(row.task): int(row.task_key)
        for row in probe.groupBy("task").agg(F.min("task_key").alias("task_key")).collect()
    }
    spare = list(found.values())
    keys = [(group, found.get(task, spare[task % len(spare)])) for task, group in enumerate(sorted(groups))]
    assignment = spark.createDataFrame(keys, "group long, task_key long")
    return (
        rows.join(F.broadcast(assignment), "group")
        .repartition(tasks, "task_key")
        .sortWithinPartitions("group", "position")
        .drop("task_key")
    )
