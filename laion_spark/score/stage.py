"""The score stage: images + candidates -> ``embeddings`` and ``dataset``.

Incremental and idempotent: only uids that have no row in ``embeddings`` yet are scored, so a rerun scores
nothing twice. The uids to score are found over key columns (images' uid, status and fetch_batch; embeddings'
uid), staged once with their text, and scored ``clip.images_per_slice`` at a time: each slice joins its rows to
the image bytes of its own partitions of ``images`` (the download slices that fetched them) and appends its
embeddings in one commit, so a killed run loses at most the slice in flight. Rows that fail to decode get a ``failed_to_decode`` row in ``embeddings`` (and are not retried).
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

from laion_spark.config import ClipConfig, Config, ConfigError
from laion_spark.schemas import CANDIDATES, DATASET, DATASET_SCHEMA, EMBEDDINGS, EMBEDDINGS_SCHEMA, IMAGES
from laion_spark.score.model import check_loadable
from laion_spark.score.nsfw import load_nsfw_detector
from laion_spark.score.scoring import OK, ScoringSettings, score_pairs
from laion_spark.storage import (
    StageCounter,
    append,
    merge_insert_new,
    new_run_id,
    overwrite,
    read_table,
)
from laion_spark.storage.slices import BUCKET, plan_slices, staged_work, with_bucket
from laion_spark.storage.stats import count_drops

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

    to_score = (
        images.where(F.col("status") == "success")
        .select("uid", "fetch_batch")
        .join(candidates.select("uid", "text"), "uid")
        .join(scored_uids, "uid", "left_anti")
    )
    to_score_count = _count_inputs(counter, images, candidates, scored_uids).rows_out

    if to_score_count:
        if clip.images_per_slice < 1:
            raise ConfigError(f"clip.images_per_slice must be at least 1, got {clip.images_per_slice}")
        # Narrow (uid, text, fetch_batch), staged once; each slice joins its rows to the image bytes of its own
        # partitions of images only, so the bytes are read once, by the slice that scores them.
        order = ["fetch_batch", BUCKET]
        with staged_work(with_bucket(to_score, "uid"), lake, "score_todo", order, to_score_count) as todo:
            # One row per download slice that left work: metadata-sized.
            per_batch = [(row.fetch_batch, row["count"]) for row in todo.groupBy("fetch_batch").count().collect()]
            slices = plan_slices(per_batch, clip.images_per_slice)
            for piece in slices:
                rows = todo.where(piece.condition("fetch_batch"))
                _score_slice(spark, lake, rows, piece.groups, settings, run_id, clip.partitions)
                log.info("score: slice %d of %d committed (~%d images)", piece.number, len(slices), piece.rows)
    this_run = read_table(spark, lake, EMBEDDINGS, missing_ok=True).where(F.col("run_id") == run_id)
    threshold_cut = clip.top_k_percent <= 0
    below_threshold = (F.col("similarity") < F.lit(clip.threshold)) if threshold_cut else F.lit(False)
    reason = F.when(F.col("status") != OK, F.lit("failed_to_decode")).when(below_threshold, F.lit("above_threshold"))
    reasons = ["failed_to_decode", "above_threshold"] if threshold_cut else ["failed_to_decode"]
    outcome = count_drops(this_run, reason, reasons)
    counter.add("scored", to_score_count, outcome.rows_in)
    counter.add_drops(outcome.rows_in, outcome.dropped)

    if clip.top_k_percent > 0:
        kept, considered = rebuild_dataset(spark, config, lake)
        counter.add("top_k_percent", considered, kept)
    else:
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


def _score_slice(
    spark: SparkSession,
    lake: str,
    rows: DataFrame,
    batches: list[str],
    settings: ScoringSettings,
    run_id: str,
    clip_partitions: int,
) -> None:
    """Score one slice's (uid, text) against its image bytes and append the rows to ``embeddings``: one commit."""
    image_bytes = read_table(spark, lake, IMAGES).where(F.col("fetch_batch").isin(*batches)).select("uid", "image")
    to_score = rows.select("uid", "text").join(image_bytes, "uid")
    if clip_partitions > 0:
        to_score = to_score.repartition(clip_partitions)
    # Plain append: the anti-join already left out every uid in the table, and a MERGE could evaluate the
    # (expensive) scoring plan twice.
    append(to_embeddings_rows(score_pairs(to_score, settings), settings, run_id), lake, EMBEDDINGS)


def to_embeddings_rows(scored: DataFrame, settings: ScoringSettings, run_id: str) -> DataFrame:
    """Scored rows -> the ``embeddings`` table's columns."""
    constants = {
        "embedding_dtype": F.lit(settings.embedding_dtype),
        "model": F.lit(settings.spec.name),
        "run_id": F.lit(run_id),
        "scored_at": F.lit(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)).cast("timestamp"),
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


def _count_inputs(counter: StageCounter, images: DataFrame, candidates: DataFrame, scored_uids: DataFrame):
    """The input steps (downloaded, with_candidate_text, not_yet_scored) in one Spark job over key columns."""
    flags = (
        images.select("uid", "status")
        .join(candidates.select("uid", F.lit(True).alias("has_text")), "uid", "left")
        .join(scored_uids.select("uid", F.lit(True).alias("was_scored")), "uid", "left")
    )
    reason = (
        F.when(F.col("status") != "success", F.lit("downloaded"))
        .when(F.col("has_text").isNull(), F.lit("with_candidate_text"))
        .when(F.col("was_scored").isNotNull(), F.lit("not_yet_scored"))
    )
    return counter.count_drops(flags, reason, ["downloaded", "with_candidate_text", "not_yet_scored"])


def _validate(clip: ClipConfig) -> None:
    if not 0.0 <= clip.top_k_percent <= 100.0:
        raise ConfigError(f"clip.top_k_percent must be between 0 and 100, got {clip.top_k_percent}")
    if not -1.0 <= clip.threshold <= 1.0:
        raise ConfigError(f"clip.threshold is a cosine similarity between -1 and 1, got {clip.threshold}")
