"""Reads, writes and merges of the lake's Delta tables. Every table lives at ``<lake>/<name>``."""

from __future__ import annotations

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from laion_spark.schemas import SCHEMAS


def table_path(lake: str, name: str) -> str:
    """``<lake>/<name>``; the lake may be a local directory or any Hadoop URI (s3a://, abfss://, dbfs:/)."""
    return f"{str(lake).rstrip('/')}/{name}"


def table_exists(spark: SparkSession, lake: str, name: str) -> bool:
    return DeltaTable.isDeltaTable(spark, table_path(lake, name))


def ensure_table(spark: SparkSession, lake: str, name: str, schema: StructType) -> None:
    """Create the table empty with its declared schema, so NOT NULL columns stay NOT NULL in Delta."""
    if not table_exists(spark, lake, name):
        # DataFrameWriter.save would store every column as nullable; the builder keeps the declared schema.
        DeltaTable.createIfNotExists(spark).location(table_path(lake, name)).addColumns(schema).execute()


def read_table(spark: SparkSession, lake: str, name: str, missing_ok: bool = False) -> DataFrame:
    """The table as a DataFrame; with ``missing_ok``, an empty frame of its schema when it does not exist."""
    if not table_exists(spark, lake, name):
        if missing_ok:
            return spark.createDataFrame([], SCHEMAS[name])
        raise FileNotFoundError(
            f"no Delta table '{name}' at {table_path(lake, name)}: run the stage that writes it first"
        )
    return spark.read.format("delta").load(table_path(lake, name))


def append(df: DataFrame, lake: str, name: str) -> None:
    df.write.format("delta").mode("append").save(table_path(lake, name))


def overwrite(df: DataFrame, lake: str, name: str) -> None:
    df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(table_path(lake, name))


def replace_where(df: DataFrame, lake: str, name: str, condition: str) -> None:
    """Atomically replace the rows matching ``condition`` with ``df`` (one Delta commit)."""
    spark = df.sparkSession
    if not table_exists(spark, lake, name):
        append(df, lake, name)
        return
    df.write.format("delta").mode("overwrite").option("replaceWhere", condition).save(table_path(lake, name))


def upsert(df: DataFrame, lake: str, name: str, keys: list[str]) -> None:
    """MERGE: update rows whose ``keys`` match, insert the others. ``df`` must be unique on ``keys``."""
    _merge(df, lake, name, keys, update_matched=True)


def merge_insert_new(df: DataFrame, lake: str, name: str, keys: list[str]) -> None:
    """MERGE that only inserts rows whose ``keys`` are not in the table yet (incremental, idempotent)."""
    _merge(df, lake, name, keys, update_matched=False)


def _merge(df: DataFrame, lake: str, name: str, keys: list[str], update_matched: bool) -> None:
    spark = df.sparkSession
    if not table_exists(spark, lake, name):
        append(df, lake, name)
        return
    condition = " AND ".join(f"target.`{k}` <=> source.`{k}`" for k in keys)
    merge = DeltaTable.forPath(spark, table_path(lake, name)).alias("target").merge(df.alias("source"), condition)
    if update_matched:
        merge = merge.whenMatchedUpdateAll()
    merge.whenNotMatchedInsertAll().execute()
