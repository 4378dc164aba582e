"""The released LAION parquet, ``part-{n:05d}.parquet``: LAION-400M's columns (``laion``) or LAION-5B's
(``laion5b``: laion2B-multi's, with ``LANGUAGE``, or laion2B-en's with ``export.laion5b_columns: en``).

Names and types are exactly the released files' (export/schemas.py). ``SAMPLE_ID`` and ``hash`` are the pair's
sample id (laion_spark.storage.ids). ``WIDTH``/``HEIGHT`` are the image's size as downloaded (the dataset's
original_width/original_height), as in the releases. ``LICENSE`` is the candidates' ``license``: the page's
Creative Commons licence in short form (``by-sa/4.0``), null where none was found (LAION wrote ``"?"``). What we
have no source for is null: ``pwatermark`` (no watermark model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from laion_spark.export.plan import LICENSE_COLUMN, ExportContext, with_license
from laion_spark.export.schemas import LAION5B_SCHEMAS, LAION400M_SCHEMA
from laion_spark.export.writers import GroupStatus, GroupWriter
from laion_spark.storage.ids import sample_id_column
from laion_spark.storage.outputs import OutputDir


def laion_rows(ctx: ExportContext, numbered: DataFrame) -> DataFrame:
    rows = with_license(ctx, numbered.join(ctx.dataset, "uid"))
    return rows.select(
        "group",
        "position",
        sample_id_column().alias("SAMPLE_ID"),
        F.col("url").alias("URL"),
        F.col("text").alias("TEXT"),
        F.col("original_height").alias("HEIGHT"),
        F.col("original_width").alias("WIDTH"),
        F.col(LICENSE_COLUMN).alias("LICENSE"),
        F.col("nsfw").alias("NSFW"),
        F.col("similarity").cast("double").alias("similarity"),
    )


def laion5b_rows(ctx: ExportContext, numbered: DataFrame) -> DataFrame:
    columns: dict[str, Column] = {
        "URL": F.col("url"),
        "TEXT": F.col("text"),
        "WIDTH": F.col("original_width"),
        "HEIGHT": F.col("original_height"),
        "similarity": F.col("similarity").cast("double"),
        "LANGUAGE": F.col("language"),
        "hash": sample_id_column(),
        "punsafe": F.col("punsafe").cast("float"),
        "pwatermark": F.lit(None).cast("float"),  # no watermark model in this pipeline
    }
    schema = LAION5B_SCHEMAS[ctx.options["columns"]]
    rows = numbered.join(ctx.dataset, "uid")
    return rows.select("group", "position", *(columns[name].alias(name) for name in schema.names))


@dataclass(frozen=True)
class PartSettings:
    out: OutputDir
    schema: pa.Schema


class PartWriter(GroupWriter):
    """One ``part-{n:05d}.parquet``, written with pyarrow so that names and types are the schema's exactly."""

    def __init__(self, settings: PartSettings, number: int, spool: Path) -> None:
        super().__init__(settings.out, number, spool)
        self.schema = settings.schema
        self.path = spool / "part.parquet"
        self.writer = pq.ParquetWriter(self.path, self.schema)

    def add(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch]).select(self.schema.names).cast(self.schema)
        self.writer.write_table(table)
        self.status.rows += table.num_rows
        self.status.written += table.num_rows

    def publish(self) -> GroupStatus:
        self.writer.close()
        self.publish_file(f"part-{self.number:05d}.parquet", self.path)
        return self.status


def laion_schema(fmt: str, laion5b_columns: str) -> pa.Schema:
    return LAION400M_SCHEMA if fmt == "laion" else LAION5B_SCHEMAS[laion5b_columns]
