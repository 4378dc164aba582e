"""Embeddings in clip-retrieval's layout, which its ``index`` (autofaiss) and ``back`` commands read as they are:
``img_emb/img_emb_{i}.npy`` and ``text_emb/text_emb_{i}.npy`` ([n, dim] arrays, float16 when the lake rounded its
embeddings to float16, else float32) and ``metadata/metadata_{i}.parquet``, whose row j describes row j of both
arrays. Rows are in uid order within a file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.export.plan import LICENSE_COLUMN, ExportContext, with_license
from laion_spark.export.schemas import EMBEDDINGS_METADATA_SCHEMA
from laion_spark.export.writers import GroupStatus, GroupWriter
from laion_spark.schemas import EMBEDDINGS
from laion_spark.storage import read_table
from laion_spark.storage.outputs import OutputDir

OK = "ok"
FLOAT16 = "float16"
FLOAT32 = "float32"


def scored_embeddings(spark: SparkSession, lake: str) -> DataFrame:
    return (
        read_table(spark, lake, EMBEDDINGS)
        .where((F.col("status") == OK) & F.col("image_embedding").isNotNull() & F.col("text_embedding").isNotNull())
        .select("uid", "image_embedding", "text_embedding", "embedding_dtype")
    )


def export_dtype(spark: SparkSession, lake: str) -> str:
    """float16 when every embedding of the lake was rounded to float16 (score's default), else float32: the
    arrays then hold what the lake holds, with no precision lost or made up."""
    # At most two rows: the distinct precisions.
    dtypes = {
        row.embedding_dtype for row in scored_embeddings(spark, lake).select("embedding_dtype").distinct().collect()
    }
    return FLOAT16 if dtypes == {FLOAT16} else FLOAT32


def embedded_keys(ctx: ExportContext) -> DataFrame:
    """The dataset's rows that have an embedding: the rows this format can export (uid, key)."""
    embedded = scored_embeddings(ctx.spark, ctx.lake).select("uid")
    return ctx.dataset.select("uid").join(embedded, "uid", "left_semi").withColumn("key", F.col("uid"))


def embeddings_rows(ctx: ExportContext, numbered: DataFrame) -> DataFrame:
    vectors = scored_embeddings(ctx.spark, ctx.lake).select("uid", "image_embedding", "text_embedding")
    rows = with_license(ctx, numbered.join(ctx.dataset, "uid")).join(vectors, "uid")
    return rows.select(
        "group",
        "position",
        "image_embedding",
        "text_embedding",
        "url",
        F.col("text").alias("caption"),
        F.col("nsfw").alias("NSFW"),
        F.col("similarity").cast("double").alias("similarity"),
        F.col(LICENSE_COLUMN).alias("LICENSE"),
        F.col("language").alias("LANGUAGE"),
        "punsafe",
        "width",
        "height",
        "original_width",
        "original_height",
        "uid",
    )


@dataclass(frozen=True)
class EmbeddingsSettings:
    out: OutputDir
    dtype: str  # float16 | float32
    dimension: int  # known from an earlier run (0 before the first): the shape of an empty array


class EmbeddingsWriter(GroupWriter):
    """One (img_emb, text_emb, metadata) triple: the arrays' bodies grow on local disk, and their npy headers,
    which state the row count, are written when the group ends."""

    def __init__(self, settings: EmbeddingsSettings, number: int, spool: Path) -> None:
        super().__init__(settings.out, number, spool)
        self.dtype = np.dtype(settings.dtype)
        self.status.dimension = settings.dimension
        self.bodies = {"img": spool / "img.body", "text": spool / "text.body"}
        self.streams = {name: open(path, "wb") for name, path in self.bodies.items()}  # noqa: SIM115 - closed in publish
        self.metadata_path = spool / "metadata.parquet"
        self.metadata = pq.ParquetWriter(self.metadata_path, EMBEDDINGS_METADATA_SCHEMA)

    def add(self, batch: pa.RecordBatch) -> None:
        for name, column in (("img", "image_embedding"), ("text", "text_embedding")):
            vectors = self._matrix(batch.column(column))
            self.streams[name].write(vectors.astype(self.dtype, copy=False).tobytes())
        table = pa.Table.from_batches([batch]).select(EMBEDDINGS_METADATA_SCHEMA.names)
        self.metadata.write_table(table.cast(EMBEDDINGS_METADATA_SCHEMA))
        self.status.rows += batch.num_rows
        self.status.written += batch.num_rows

    def _matrix(self, column: pa.Array) -> np.ndarray:
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        dimension = int(lengths[0]) if len(lengths) else self.status.dimension
        if (lengths != dimension).any() or (self.status.dimension and dimension != self.status.dimension):
            raise ValueError(f"embeddings of different dimensions in export file {self.number}")
        self.status.dimension = dimension
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(column), dimension)

    def publish(self) -> GroupStatus:
        for stream in self.streams.values():
            stream.close()
        self.metadata.close()
        header = _npy_header(self.dtype, (self.status.rows, self.status.dimension))
        for name, folder in (("img", "img_emb"), ("text", "text_emb")):
            self.publish_file(f"{folder}/{folder}_{self.number}.npy", self.bodies[name], header=header)
        # The metadata last: its presence is what marks the triple complete.
        self.publish_file(f"metadata/metadata_{self.number}.parquet", self.metadata_path)
        return self.status


def _npy_header(dtype: np.dtype, shape: tuple[int, int]) -> bytes:
    """The header of an .npy file (format 1.0, C order) whose body is the raw rows: the body was written first,
    without knowing the row count the header states."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return header.getvalue()
