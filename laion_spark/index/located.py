"""Located vectors: the index tasks read the embeddings from the table's parquet files instead of receiving them.

Spark hands ``array<float>`` to a Python worker element by element (ColumnarToRow, then Arrow): 13-17 s of a
2-core machine for 1M rows of two 512-float embeddings, while pyarrow decodes the same row groups into flat buffers
in 2-3 s (bench/index.py). So when it can, the index stage carries each row's file (Spark's ``_metadata.file_path``)
and key (``uid`` in the embeddings table) through its joins instead of the vectors, groups the rows by file (only
the small columns move), and the tasks read their files with pyarrow (laion_spark.index.shards.with_vectors). Rows
a Delta table has deleted are not in the scan, so they are never asked for, whatever the files still hold.
"""

from __future__ import annotations

import logging
import math

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from laion_spark.config import ConfigError
from laion_spark.index.shards import VECTOR_COLUMNS, VECTOR_FILE, VECTOR_KEY, VectorFiles, resolve_file_uri

log = logging.getLogger(__name__)

PARTITION_KEY = "_partition_key"
HASH_RANGE = 1 << 31


def located_columns(key: str) -> list:
    """Where a file scan's row lies: its parquet file (Spark's hidden _metadata column, on a parquet or Delta scan,
    before a join or a projection drops it) and its ``key``."""
    return [F.col("_metadata.file_path").alias(VECTOR_FILE), F.col(key).alias(VECTOR_KEY)]


def locate_vectors(
    scan: DataFrame, columns: dict[str, str] | None = None, key: str = "uid", mode: str = "auto"
) -> VectorFiles | None:
    """Whether the tasks will read the vectors of ``scan`` (a parquet or Delta scan; ``columns``: modality -> its
    column, VECTOR_COLUMNS by default; ``key``: a column that tells its rows apart) from its files with pyarrow,
    rather than receive them from Spark.

    ``mode`` "spark" says no. "auto" says yes when the scan reads files, and the driver can open one of them with
    pyarrow and finds the key there and the columns as lists of floats; otherwise no, with the reason logged: a
    source that is not files, a catalog table whose storage only the JVM may read, column mapping's physical names.
    "files" is "auto" that raises instead of saying no."""
    columns = dict(columns or VECTOR_COLUMNS)
    if mode == "spark":
        return None
    try:
        reason = _unreadable_reason(scan, columns, key)
    except Exception as error:  # noqa: BLE001 - any failure to look is a reason to let Spark read
        first_line = str(error).splitlines()[0] if str(error) else ""
        reason = f"{type(error).__name__}: {first_line}"
    if reason is None:
        return VectorFiles(columns, key)
    if mode == "files":
        raise ConfigError(f"index.read_vectors=files, but the tasks cannot read the embeddings' files: {reason}")
    log.info("index: Spark hands the vectors to the tasks (%s)", reason)
    return None


def _unreadable_reason(scan: DataFrame, columns: dict[str, str], key: str) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not scan.inputFiles():  # asked first: _metadata of a source that is not files is an analysis error
        return "the embeddings are not read from files"
    row = scan.select(*located_columns(key)).limit(1).first()
    if row is None:
        return "no rows"
    filesystem, path = resolve_file_uri(row[VECTOR_FILE])
    with filesystem.open_input_file(path) as handle:
        schema = pq.ParquetFile(handle).schema_arrow
    if key not in schema.names:
        return f"{row[VECTOR_FILE]} has no column {key}"
    for column in sorted(set(columns.values())):
        if column not in schema.names:
            return f"{row[VECTOR_FILE]} has no column {column}"
        kind = schema.field(column).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_floating(kind.value_type):
            return f"{row[VECTOR_FILE]}: column {column} is {kind}, not a list of floats"
    return None


def plan_file_partitions(files: list[tuple[str, int]], max_rows: int) -> tuple[list[tuple[str, int, int]], int]:
    """Each of ``files`` ((path, rows), in path order) with the rows of the files before it, and the partition
    count: ceil(rows / ``max_rows``) partitions, cut from the files' order at even row counts."""
    spans, before = [], 0
    for path, rows in files:
        spans.append((path, before, rows))
        before += rows
    return spans, math.ceil(before / max_rows) if before else 0


def by_file(rows: DataFrame, max_rows: int) -> tuple[DataFrame, int]:
    """``rows`` of located vectors in ceil(rows / ``max_rows``) partitions of about equal size, each a run of the
    files (:func:`plan_file_partitions`): a task reads its own files, and a file across a cut is shared by two
    tasks, its rows split by a hash of their key. Returns (rows, partition count).

    Only the small columns move. The plan comes from one aggregation, a row per file (bounded by the table's file
    count, not its rows); each partition is then reached through hash partitioning on a key that Spark's own hash
    sends there, so that partitions are as planned (a range partitioner's sampled bounds left them 5-10% uneven,
    and a partition over ``max_rows`` cuts a second, small shard)."""
    spark = rows.sparkSession
    counts = rows.groupBy(VECTOR_FILE).count().orderBy(VECTOR_FILE).collect()
    spans, partitions = plan_file_partitions([(r[0], int(r[1])) for r in counts], max_rows)
    if partitions == 0:
        return rows.coalesce(1), 1
    total = spans[-1][1] + spans[-1][2]
    keys = partition_keys(spark, partitions)
    placed = spark.createDataFrame(spans, f"{VECTOR_FILE} string, _before long, _rows long")
    share = F.pmod(F.xxhash64(VECTOR_KEY), F.lit(HASH_RANGE)) / float(HASH_RANGE)  # uniform in [0, 1)
    position = F.col("_before") + share * F.col("_rows")
    planned_partition = F.least(F.lit(partitions - 1), F.floor(position * partitions / total))
    # A file the plan did not see (a source that changed between the two reads: a plain directory, not a pinned
    # Delta version) still gets a partition, by its name: a row is never dropped for it.
    unplanned_partition = F.pmod(F.xxhash64(VECTOR_FILE), F.lit(partitions))
    partition = F.when(F.col("_rows").isNull(), unplanned_partition).otherwise(planned_partition).cast("int")
    # Longs, as partition_keys hashed them: a small literal would be an int, whose hash differs.
    key = F.element_at(F.array(*(F.lit(k).cast("long") for k in keys)), partition + 1)
    planned = (
        rows.join(F.broadcast(placed), VECTOR_FILE, "left")
        .withColumn(PARTITION_KEY, key)
        .repartition(partitions, PARTITION_KEY)
        .drop("_before", "_rows", PARTITION_KEY)
    )
    return planned, partitions


def partition_keys(spark, partitions: int) -> list[int]:
    """For each partition p of ``partitions``, a long key that hash partitioning sends to p: Spark's
    ``pmod(hash(key), partitions)``, the expression HashPartitioning evaluates, computed by Spark."""
    found: dict[int, int] = {}
    span = 32 * partitions
    start = 0
    while len(found) < partitions:
        candidates = (
            spark.range(start, start + span)
            .select("id", F.pmod(F.hash("id"), F.lit(partitions)).alias("p"))
            .groupBy("p")
            .agg(F.min("id").alias("key"))
            .collect()
        )
        for row in candidates:
            found.setdefault(int(row["p"]), int(row["key"]))
        start += span
    return [found[p] for p in range(partitions)]
