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
from laion_spark.curate.chain import (
    DECONTAMINATE,
    IMAGE_CLUSTER,
    NEAR_DUP,
    SEMDEDUP,
    THRESHOLD,
    apply_filter_chain,
    validate_filters,
)
from laion_spark.curate.chain import STAGE as CHAIN_STAGE
from laion_spark.run.progress import stage_progress
from laion_spark.schemas import CANDIDATES, DATASET, DATASET_SCHEMA, EMBEDDINGS, EMBEDDINGS_SCHEMA, IMAGES, RUNS
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
from laion_spark.storage.audit import file_checksum, record_rejections, record_run, rejection_rows, replace_rejections
from laion_spark.storage.slices import BUCKET, plan_slices, staged_work, with_bucket
from laion_spark.storage.stats import count_drops

log = logging.getLogger(__name__)

STAGE = "score"


def run_score(spark: SparkSession, config: Config, lake: str, run_id: str | None = None) -> StageCounter:
    """Score every successfully downloaded image that has no embedding yet; write ``embeddings`` and ``dataset``."""
    clip = config.clip
    _validate(clip)
    filters = validate_filters(config)
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
        with (
            stage_progress(config, STAGE, to_score_count, "images", run_id) as progress,
            staged_work(with_bucket(to_score, "uid"), lake, "score_todo", order, to_score_count) as todo,
        ):
            # One row per download slice that left work: metadata-sized.
            per_batch = [(row.fetch_batch, row["count"]) for row in todo.groupBy("fetch_batch").count().collect()]
            slices = plan_slices(per_batch, clip.images_per_slice)
            for piece in slices:
                rows = todo.where(piece.condition("fetch_batch"))
                _score_slice(spark, lake, rows, piece.groups, settings, run_id, clip.partitions)
                progress.advance(piece.rows)
                log.info("score: slice %d of %d committed (~%d images)", piece.number, len(slices), piece.rows)
    this_run = read_table(spark, lake, EMBEDDINGS, missing_ok=True).where(F.col("run_id") == run_id)
    incremental = filters == [THRESHOLD]
    below_threshold = (F.col("similarity") < F.lit(clip.threshold)) if incremental else F.lit(False)
    reason = F.when(F.col("status") != OK, F.lit("failed_to_decode")).when(below_threshold, F.lit("above_threshold"))
    reasons = ["failed_to_decode", "above_threshold"] if incremental else ["failed_to_decode"]
    outcome = count_drops(this_run, reason, reasons)
    counter.add("scored", to_score_count, outcome.rows_in)
    counter.add_drops(outcome.rows_in, outcome.dropped)
    audit = config.dataset.rejections
    if audit and to_score_count:
        failed = this_run.where(F.col("status") != OK)
        record_rejections(rejection_rows(failed, STAGE, run_id, "failed_to_decode", F.col("error")), lake)
    record_run(spark, lake, run_id, STAGE, config, settings.spec.describe(), model_checksum(clip))

    if incremental:
        # Every passing pair that dataset lacks, not only this run's: a run that stopped between the two writes
        # is completed by the next one. Only uid and score columns are read from embeddings.
        passing = build_dataset(
            read_table(spark, lake, EMBEDDINGS, missing_ok=True),
            images,
            candidates,
            F.col("similarity") >= F.lit(clip.threshold),
            read_table(spark, lake, RUNS, missing_ok=True),
        )
        merge_insert_new(passing, lake, DATASET, ["uid"])
        if audit and to_score_count:
            below = this_run.where((F.col("status") == OK) & below_threshold)
            record_rejections(_threshold_rejections(below, clip.threshold, run_id), lake)
    else:
        rebuild_dataset(spark, config, lake, run_id, counter, recut=False)
    counter.write(spark, lake)
    return counter


def _threshold_rejections(below: DataFrame, threshold: float, run_id: str) -> DataFrame:
    detail = F.format_string(f"similarity %.4f below clip.threshold {threshold:g}", F.col("similarity"))
    return rejection_rows(below, CHAIN_STAGE, run_id, THRESHOLD, detail, value=F.col("similarity"), bound=threshold)


def model_checksum(clip: ClipConfig) -> str | None:
    """sha256 of the checkpoint the scores come from, when ``clip.pretrained`` is a local file."""
    from laion_spark.score.model import resolve_local_path

    try:
        return file_checksum(resolve_local_path(clip.pretrained))
    except (OSError, ValueError):
        return None


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


def build_dataset(
    embeddings: DataFrame,
    images: DataFrame,
    candidates: DataFrame,
    keep: Column,
    runs: DataFrame | None = None,
) -> DataFrame:
    """Scored pairs that pass ``keep`` -> the ``dataset`` table's columns: url, size and language joined back, and
    the lineage (source record, the run of each stage, the model's checksum and each stage's config hash from
    ``runs``; null where ``runs`` is not given or lacks the run)."""
    passing = embeddings.where((F.col("status") == OK) & keep).select(
        "uid", "similarity", "nsfw", "punsafe", "model", F.col("run_id").alias("score_run_id")
    )
    image_columns = images.where(F.col("status") == "success").select(
        "uid",
        "url",
        "width",
        "height",
        "original_width",
        "original_height",
        F.regexp_extract("fetch_batch", SLICE_RUN, 1).alias("download_run_id"),
    )
    candidate_columns = candidates.select(
        "uid",
        "text",
        "language",
        "source_file",
        "record_offset",
        "crawl_date",
        "page_url",
        _column_or_null(candidates, "ingest_batch").alias("ingest_batch"),
        _column_or_null(candidates, "run_id").alias("candidates_run_id"),
    ).withColumn("extract_run_id", F.nullif(F.regexp_extract("ingest_batch", SLICE_RUN, 1), F.lit("")))
    joined = passing.join(image_columns, "uid").join(candidate_columns, "uid")
    joined = joined.withColumn("download_run_id", F.nullif(F.col("download_run_id"), F.lit("")))
    joined = _with_run_hashes(joined, runs)
    return joined.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in DATASET_SCHEMA.fields])


# <run id>-<slice number>: the partition column of pairs and images names the run that wrote it.
SLICE_RUN = r"^(.*)-[0-9]+$"
RUN_STAGES = {"extract": "extract_run_id", "candidates": "candidates_run_id", "download": "download_run_id"}


def _column_or_null(df: DataFrame, name: str) -> Column:
    return F.col(name) if name in df.columns else F.lit(None).cast("string")


def _with_run_hashes(rows: DataFrame, runs: DataFrame | None) -> DataFrame:
    """``model_checksum`` and ``config_hashes`` (stage -> config hash) from the runs table (one row per run and
    stage: small, broadcast)."""
    stages = {**RUN_STAGES, STAGE: "score_run_id"}
    if runs is None:
        return rows.withColumn("model_checksum", F.lit(None).cast("string")).withColumn(
            "config_hashes", F.lit(None).cast("map<string,string>")
        )
    for stage, run_column in stages.items():
        of_stage = runs.where(F.col("stage") == stage).select(
            F.col("run_id").alias(run_column),
            F.col("config_hash").alias(f"_hash_{stage}"),
            *([F.col("model_checksum")] if stage == STAGE else []),
        )
        of_stage = of_stage.dropDuplicates([run_column])
        rows = rows.join(F.broadcast(of_stage), run_column, "left")
    entries = [F.struct(F.lit(stage).alias("key"), F.col(f"_hash_{stage}").alias("value")) for stage in stages]
    present = F.filter(F.array(*entries), lambda entry: entry["value"].isNotNull())
    return rows.withColumn("config_hashes", F.map_from_entries(present)).drop(*(f"_hash_{s}" for s in stages))


def rebuild_dataset(
    spark: SparkSession,
    config: Config,
    lake: str,
    run_id: str | None = None,
    counter: StageCounter | None = None,
    recut: bool = True,
) -> tuple[int, int]:
    """Rewrite ``dataset`` from every scored pair through the filter chain (``dataset.filters``), without
    rescoring; returns (rows kept, rows considered). The chain's rejections replace the ``dataset`` partition of
    ``rejections``; each step is counted in ``counter`` (a new ``score`` counter, written here, when None). A
    re-cut (not a score run's rebuild, ``recut=False``) records its config in ``runs`` as a ``dataset`` run.
    """
    run_id = run_id or (counter.run_id if counter else new_run_id())
    own_counter = counter is None
    counter = counter or StageCounter(run_id, STAGE)
    filters = validate_filters(config)
    embeddings = read_table(spark, lake, EMBEDDINGS)
    images = read_table(spark, lake, IMAGES)
    candidates = read_table(spark, lake, CANDIDATES)
    needs_vectors = any(name in filters for name in (SEMDEDUP, DECONTAMINATE, IMAGE_CLUSTER))
    needs_phash = any(name in filters for name in (NEAR_DUP, DECONTAMINATE))
    pool = embeddings.where(F.col("status") == OK).select(
        "uid", "similarity", *(["image_embedding"] if needs_vectors else [])
    )
    if needs_phash:
        phash = _column_or_null(images, "phash").cast("long").alias("phash")
        pool = pool.join(images.where(F.col("status") == "success").select("uid", phash), "uid")
    pool = pool.join(candidates.select("uid", "crawl_date"), "uid")
    with apply_filter_chain(spark, config, lake, pool, run_id) as chain:
        kept_uids = chain.kept.select("uid")
        rows = build_dataset(
            embeddings.join(kept_uids, "uid", "left_semi"),
            images,
            candidates,
            F.lit(True),
            read_table(spark, lake, RUNS, missing_ok=True),
        )
        overwrite(rows, lake, DATASET)
        replace_rejections(chain.rejections, lake, CHAIN_STAGE, config.dataset.rejections)
        for name, rows_in, rows_out in chain.steps:
            counter.add(f"{CHAIN_STAGE}.{name}", rows_in, rows_out)
            for step, what, removed in chain.breakdown:
                if step == name:
                    counter.add_outcome(f"{step}:{what}", rows_in, removed)
        considered = chain.steps[0][1] if chain.steps else 0
    if recut:  # `laion-spark dataset`: its config is now the lake's cut (the report marks it)
        record_run(spark, lake, run_id, "dataset", config)
    if own_counter:
        counter.write(spark, lake)
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
