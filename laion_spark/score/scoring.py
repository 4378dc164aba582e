"""Score image-text pairs with CLIP in Spark's Python workers: ``mapInArrow`` over :func:`worker.score_batches`.

The work done per row (decode, preprocess, tokenize, both encoders, NSFW tags) lives in
:mod:`laion_spark.score.worker`, which needs no Spark; this module only declares the output schema and hands
each task's Arrow batches to it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from laion_spark.score.worker import (
    FAILED_TO_DECODE,
    OK,
    ModelBatch,
    ScoredBatch,
    ScoringSettings,
    decode_image,
    prefetch,
    prepare_model_batches,
    round_embeddings,
    score_batches,
)

__all__ = [
    "FAILED_TO_DECODE",
    "OK",
    "SCORED_SCHEMA",
    "ModelBatch",
    "ScoredBatch",
    "ScoringSettings",
    "decode_image",
    "prefetch",
    "prepare_model_batches",
    "round_embeddings",
    "score_batches",
    "score_pairs",
    "score_record_batches",
]

# What the Python workers return for each (uid, image, text) row; worker.arrow_schema() is its Arrow twin.
SCORED_SCHEMA = StructType(
    [
        StructField("uid", StringType(), False),
        StructField("image_embedding", ArrayType(FloatType()), True),
        StructField("text_embedding", ArrayType(FloatType()), True),
        StructField("similarity", FloatType(), True),
        StructField("status", StringType(), False),
        StructField("error", StringType(), True),
        StructField("nsfw", StringType(), True),
        StructField("punsafe", FloatType(), True),
    ]
)


def score_pairs(pairs: DataFrame, settings: ScoringSettings) -> DataFrame:
    """(uid, image bytes, text) rows -> :data:`SCORED_SCHEMA` rows: embeddings, similarity, status, NSFW tags."""
    return pairs.select("uid", "image", "text").mapInArrow(
        functools.partial(score_record_batches, settings=settings), SCORED_SCHEMA
    )


def score_record_batches(batches: Iterable[pa.RecordBatch], settings: ScoringSettings) -> Iterator[pa.RecordBatch]:
    """The worker side of :func:`score_pairs`: Arrow batches in, scored Arrow batches out."""
    for scored in score_batches(batches, settings):
        yield scored.to_arrow()
