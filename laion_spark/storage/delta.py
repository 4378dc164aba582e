"""Reads, writes and merges of the lake's Delta tables, through DataFrame and SQL APIs only.

A lake is either a directory (any Hadoop URI: a local path, ``s3a://``, ``abfss://``, ``dbfs:/``) holding one Delta
table per name at ``<lake>/<name>``, or a catalog schema (``catalog.schema``, e.g. Unity Catalog's
``main.laion``) holding managed tables ``catalog.schema.name``. Every operation is written so that it also runs on
Spark Connect (Databricks serverless and shared clusters): Delta through SQL (``MERGE INTO``, ``DESCRIBE
HISTORY``, ``CREATE TABLE``), never the ``DeltaTable`` Python API, which needs Delta Connect's server plugin there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from laion_spark.schemas import SCHEMAS

log = logging.getLogger(__name__)

# catalog.schema (two parts) or schema (one part qualified by the session's current catalog is not accepted: a
# bare word is far more likely a relative directory).
_CATALOG_LAKE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
STAGING_PREFIX = "_staging_"


def is_catalog_lake(lake: str) -> bool:
    """``catalog.schema`` names tables in the session's catalog; anything else is a directory or URI.

    A local directory that happens to be called ``a.b`` and exists is still a directory.
    """
    text = str(lake)
    return bool(_CATALOG_LAKE.match(text)) and not os.path.exists(text)


def table_path(lake: str, name: str) -> str:
    """``<lake>/<name>`` for a directory lake; a catalog lake's tables have no path of ours."""
    if is_catalog_lake(lake):
        raise ValueError(f"lake {lake} is a catalog schema: its table {name} has no path; use table_ref")
    return f"{str(lake).rstrip('/')}/{name}"


def table_ref(lake: str, name: str) -> str:
    """The table as SQL names it: ``delta.`<lake>/<name>``` or ``catalog.schema.name``."""
    if is_catalog_lake(lake):
        catalog, schema = str(lake).split(".")
        return f"`{catalog}`.`{schema}`.`{name}`"
    return "delta.`" + table_path(lake, name).replace("`", "``") + "`"


def table_exists(spark: SparkSession, lake: str, name: str) -> bool:
    if is_catalog_lake(lake):
        return spark.catalog.tableExists(f"{lake}.{name}")
    try:
        # Resolving the schema reads the Delta log's last checkpoint, not data; it fails for a missing path or a
        # directory that is not a Delta table.
        spark.read.format("delta").load(table_path(lake, name)).schema  # noqa: B018
    except AnalysisException:
        return False
    return True


def ensure_table(spark: SparkSession, lake: str, name: str, schema: StructType | None = None) -> None:
    """Create the table empty with its declared schema (NOT NULL columns stay NOT NULL in Delta)."""
    if table_exists(spark, lake, name):
        return
    schema = schema or SCHEMAS[name]
    if is_catalog_lake(lake):
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {lake}")
    columns = ", ".join(
        f"`{field.name}` {field.dataType.simpleString()}{'' if field.nullable else ' NOT NULL'}"
        for field in schema.fields
    )
    spark.sql(f"CREATE TABLE IF NOT EXISTS {table_ref(lake, name)} ({columns}) USING DELTA")


def read_table(spark: SparkSession, lake: str, name: str, missing_ok: bool = False) -> DataFrame:
    """The table as a DataFrame; with ``missing_ok``, an empty frame of its schema when it does not exist."""
    if not table_exists(spark, lake, name):
        if missing_ok:
            return spark.createDataFrame([], SCHEMAS[name])
        where = f"{lake}.{name}" if is_catalog_lake(lake) else table_path(lake, name)
        raise FileNotFoundError(f"no Delta table '{name}' at {where}: run the stage that writes it first")
    if is_catalog_lake(lake):
        return spark.table(f"{lake}.{name}")
    return spark.read.format("delta").load(table_path(lake, name))


def _save(df: DataFrame, lake: str, name: str, mode: str, **options: str) -> None:
    writer = df.write.format("delta").mode(mode)
    for key, value in options.items():
        writer = writer.option(key, value)
    if is_catalog_lake(lake):
        df.sparkSession.sql(f"CREATE SCHEMA IF NOT EXISTS {lake}")
        writer.saveAsTable(f"{lake}.{name}")
    else:
        writer.save(table_path(lake, name))


def append(df: DataFrame, lake: str, name: str) -> None:
    _save(df, lake, name, "append")


def overwrite(df: DataFrame, lake: str, name: str) -> None:
    _save(df, lake, name, "overwrite", overwriteSchema="true")


def replace_where(df: DataFrame, lake: str, name: str, condition: str) -> None:
    """Atomically replace the rows matching ``condition`` with ``df`` (one Delta commit)."""
    if not table_exists(df.sparkSession, lake, name):
        append(df, lake, name)
        return
    _save(df, lake, name, "overwrite", replaceWhere=condition)


@dataclass(frozen=True)
class MergeCounts:
    inserted: int = 0
    updated: int = 0


def merge(
    df: DataFrame,
    lake: str,
    name: str,
    keys: Sequence[str],
    update: str | Sequence[str] | None = None,
    update_condition: str | None = None,
) -> MergeCounts:
    """``MERGE INTO`` the table on ``keys``: insert the rows whose keys are new; with ``update`` (``"*"`` or the
    columns to set), also update the matched rows for which ``update_condition`` (SQL over ``source.`` and
    ``target.``) holds. Returns the commit's own counts (no recount)."""
    spark = df.sparkSession
    ensure_table(spark, lake, name, None if name in SCHEMAS else df.schema)
    view = f"laion_spark_merge_source_{uuid.uuid4().hex}"
    df.createOrReplaceTempView(view)
    target = table_ref(lake, name)
    on = " AND ".join(f"target.`{key}` <=> source.`{key}`" for key in keys)
    clauses = []
    if update:
        condition = f" AND ({update_condition})" if update_condition else ""
        assignments = "*" if update == "*" else ", ".join(f"`{c}` = source.`{c}`" for c in update)
        clauses.append(f"WHEN MATCHED{condition} THEN UPDATE SET {assignments}")
    clauses.append("WHEN NOT MATCHED THEN INSERT *")
    before = latest_version(spark, lake, name)
    try:
        spark.sql(f"MERGE INTO {target} AS target USING {view} AS source ON {on} {' '.join(clauses)}")
    finally:
        spark.catalog.dropTempView(view)
    commit = latest_commit(spark, lake, name)
    if commit is None or commit["version"] == before:
        return MergeCounts()  # Delta commits nothing when a MERGE changes nothing
    if commit["operation"] != "MERGE":
        log.warning("%s: expected our MERGE as the latest commit, found %s", name, commit["operation"])
        return MergeCounts()
    metrics = commit["operationMetrics"] or {}
    return MergeCounts(int(metrics.get("numTargetRowsInserted", 0)), int(metrics.get("numTargetRowsUpdated", 0)))


def upsert(df: DataFrame, lake: str, name: str, keys: list[str]) -> MergeCounts:
    """MERGE: update rows whose ``keys`` match, insert the others. ``df`` must be unique on ``keys``."""
    return merge(df, lake, name, keys, update="*")


def merge_insert_new(df: DataFrame, lake: str, name: str, keys: list[str]) -> MergeCounts:
    """MERGE that only inserts rows whose ``keys`` are not in the table yet (incremental, idempotent)."""
    return merge(df, lake, name, keys)


def latest_commit(spark: SparkSession, lake: str, name: str):
    """The table's latest commit (version, operation, operationMetrics), or None when it has none."""
    history = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, name)} LIMIT 1")
    return history.select("version", "operation", "operationMetrics").first()


def latest_version(spark: SparkSession, lake: str, name: str) -> int | None:
    commit = latest_commit(spark, lake, name)
    return None if commit is None else int(commit["version"])


@contextlib.contextmanager
def staged(df: DataFrame, lake: str, name: str) -> Iterator[DataFrame]:
    """Write ``df`` once to the lake's staging table ``_staging_<name>`` and yield it read back, so that several
    writes and counts use one evaluation of an expensive plan (a fetch, an extraction) without ``persist``, which
    serverless compute refuses. The table is emptied afterwards; VACUUM (``laion-spark`` maintenance) reclaims the
    files. A failure to empty it is logged, never raised over the block's own error."""
    spark = df.sparkSession
    table = STAGING_PREFIX + name
    overwrite(df, lake, table)
    try:
        yield read_table(spark, lake, table)
    finally:
        try:
            _empty_staging(spark, lake, table)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not empty staging table %s: %s: %s", table, type(exc).__name__, exc)


def _empty_staging(spark: SparkSession, lake: str, table: str) -> None:
    spark.sql(f"DELETE FROM {table_ref(lake, table)}")
