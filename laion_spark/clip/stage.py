"""The score stage: images + candidates -> ``embeddings`` and ``dataset``.

Incremental and idempotent: only uids that have no row in ``embeddings`` yet are scored, so a rerun scores
nothing twice. Rows that fail to decode get a ``failed_to_decode`` row in ``embeddings`` (and are not retried).
``dataset`` gets every pair at or above ``clip.threshold`` that it lacks (insert-only MERGE on uid, so a run that
stopped between the two writes is completed by the next). In top-k% mode the cut depends on
every score, so ``dataset`` is rebuilt from ``embeddings`` instead; :func:`rebuild_dataset` also re-cuts an
existing lake after a threshold change, without rescoring.
"""

from __future__ import annotations

import datetime as dt
import logging

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.clip.model import check_loadable
from laion_spark.clip.nsfw import load_nsfw_detector
from laion_spark.clip.scoring import FAILED_TO_DECODE, OK, ScoringSettings, score_pairs
from laion_spark.config import ClipConfig, Config, ConfigError
from laion_spark.schemas import CANDIDATES, DATASET, DATASET_SCHEMA, EMBEDDINGS, EMBEDDINGS_SCHEMA, IMAGES
from laion_spark.storage import (
    StageCounter,
    append,
    merge_insert_new,
    new_run_id,
    overwrite,
    read_table,
)

log = logging.getLogger(__name__)

STAGE = "score"


def run_score(spark: SparkSession, config: Config, lake: str, run_id: str | None = None) -> StageCounter:
    """Score every successfully downloaded image that has no embedding yet; write ``embeddings`` and ``dataset``."""
    clip = config.clip
    _validate(clip)
    settings = ScoringSettings.from_config(clip)
    # Fail before any Spark job: a wrong model name or path is one error here, not one per task.
    embed_dim = check_loadable(settings.spec)
    if settings.nsfw_detector_path:
        load_nsfw_detector(settings.nsfw_detector_path, "cpu", expected_input_size=embed_dim)

    run_id = run_id or new_run_id()
    counter = StageCounter(run_id, STAGE)
    images = read_table(spark, lake, IMAGES)
    candidates = read_table(spark, lake, CANDIDATES)
    scored_uids = read_table(spark, lake, EMBEDDINGS, missing_ok=True).select("uid")

    successful = images.where(F.col("status") == "success")
    to_score = successful.join(candidates.select("uid", "text"), "uid").join(scored_uids, "uid", "left_anti")
    funnel = _input_funnel(images, candidates, scored_uids)
    counter.add("images_in", funnel["images"], funnel["successful"])
    counter.add("with_candidate_text", funnel["successful"], funnel["with_text"])
    counter.add("not_yet_scored", funnel["with_text"], funnel["to_score"])
    to_score_count = funnel["to_score"]

    if to_score_count:
        if clip.partitions > 0:
            to_score = to_score.repartition(clip.partitions)
        embeddings = to_embeddings_rows(score_pairs(to_score, settings), settings, run_id)
        # Plain append: the anti-join above already left out every uid in the table, and a MERGE could
        # evaluate the (expensive) scoring plan twice.
        append(embeddings, lake, EMBEDDINGS)
    outcome = _run_outcome(read_table(spark, lake, EMBEDDINGS, missing_ok=True), run_id, clip.threshold)
    failed = outcome["failed"]
    counter.add("failed_to_decode", to_score_count, to_score_count - failed)
    counter.add("scored", to_score_count - failed, outcome["scored"])

    if clip.top_k_percent > 0:
        kept, considered = rebuild_dataset(spark, config, lake)
        counter.add("top_k_percent", considered, kept)
    else:
        counter.add("above_threshold", outcome["scored"], outcome["above_threshold"])
        # Every passing pair that dataset lacks, not only this run's: a run that stopped between the two writes
        # is completed by the next one. Only uid and score columns are read from embeddings.
        passing = build_dataset(
            read_table(spark, lake, EMBEDDINGS, missing_ok=True),
            images,
            candidates,
            F.col("similarity") >= F.lit(clip.threshold),
        )
        merge_insert_new(passing, lake, DATASET, ["uid"])
    counter.write(spark, lake)
    return counter


def to_embeddings_rows(scored: DataFrame, settings: ScoringSettings, run_id: str) -> DataFrame:
    """Scored rows -> the ``embeddings`` table's columns."""
    constants = {
        "embedding_dtype": F.lit(settings.embedding_dtype),
        "model": F.lit(settings.spec.name),
        "run_id": F.lit(run_id),
        "scored_at": F.lit(dt.datetime.now(dt.UTC).replace(tzinfo=None)).cast("timestamp"),
    }
    return scored.select([constants.get(name, F.col(name)).alias(name) for name in EMBEDDINGS_SCHEMA.fieldNames()])


def build_dataset(embeddings: DataFrame, images: DataFrame, candidates: DataFrame, keep: Column) -> DataFrame:
    """Scored pairs that pass ``keep`` -> the ``dataset`` table's columns (url, size and language joined back)."""
    passing = embeddings.where((F.col("status") == OK) & keep).select("uid", "similarity", "nsfw", "punsafe", "model")
    image_columns = images.where(F.col("status") == "success").select(
        "uid", "url", "width", "height", "original_width", "original_height"
    )
    joined = passing.join(image_columns, "uid").join(candidates.select("uid", "text", "language"), "uid")
    return joined.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in DATASET_SCHEMA.fields])


def rebuild_dataset(spark: SparkSession, config: Config, lake: str) -> tuple[int, int]:
    """Rewrite ``dataset`` from every scored pair with the configured cut; returns (rows kept, rows considered).

    Top-k% keeps the ``clip.top_k_percent`` most similar pairs (an approximate quantile of all similarities).
    """
    clip = config.clip
    embeddings = read_table(spark, lake, EMBEDDINGS)
    ok = embeddings.where(F.col("status") == OK)
    considered = ok.count()
    if clip.top_k_percent > 0:
        quantile = max(0.0, 1.0 - clip.top_k_percent / 100.0)
        cuts = ok.approxQuantile("similarity", [quantile], 0.001) if considered else []
        keep = F.col("similarity") >= F.lit(cuts[0]) if cuts else F.lit(False)
    else:
        keep = F.col("similarity") >= F.lit(clip.threshold)
    rows = build_dataset(embeddings, read_table(spark, lake, IMAGES), read_table(spark, lake, CANDIDATES), keep)
    overwrite(rows, lake, DATASET)
    return read_table(spark, lake, DATASET).count(), considered


def _input_funnel(images: DataFrame, candidates: DataFrame, scored_uids: DataFrame) -> dict[str, int]:
    """Rows at each input step, in one Spark job (only uid and status columns are read)."""
    flags = (
        images.select("uid", (F.col("status") == "success").alias("success"))
        .join(candidates.select("uid", F.lit(True).alias("has_text")), "uid", "left")
        .join(scored_uids.select("uid", F.lit(True).alias("was_scored")), "uid", "left")
    )
    with_text = F.col("success") & F.col("has_text").isNotNull()
    row = flags.agg(
        F.count(F.lit(1)).alias("images"),
        F.count(F.when(F.col("success"), 1)).alias("successful"),
        F.count(F.when(with_text, 1)).alias("with_text"),
        F.count(F.when(with_text & F.col("was_scored").isNull(), 1)).alias("to_score"),
    ).first()
    return row.asDict()


def _run_outcome(embeddings: DataFrame, run_id: str, threshold: float) -> dict[str, int]:
    # One row of counts: collecting it is collecting stats, not data.
    row = (
        embeddings.where(F.col("run_id") == run_id)
        .agg(
            F.count(F.when(F.col("status") == OK, 1)).alias("scored"),
            F.count(F.when(F.col("status") == FAILED_TO_DECODE, 1)).alias("failed"),
            F.count(F.when((F.col("status") == OK) & (F.col("similarity") >= threshold), 1)).alias("above_threshold"),
        )
        .first()
    )
    return row.asDict()


def _validate(clip: ClipConfig) -> None:
    if not 0.0 <= clip.top_k_percent <= 100.0:
        raise ConfigError(f"clip.top_k_percent must be between 0 and 100, got {clip.top_k_percent}")
    if not -1.0 <= clip.threshold <= 1.0:
        raise ConfigError(f"clip.threshold is a cosine similarity between -1 and 1, got {clip.threshold}")
