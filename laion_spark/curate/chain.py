"""The dataset as a filter chain: ``dataset.filters`` applied in order to the scored pairs, each step counting rows
in and out and naming the pairs it removed, and why (the ``rejections`` rows of stage ``dataset``).

Steps:

- ``threshold``: CLIP similarity >= ``clip.threshold``;
- ``top_k_percent``: the ``clip.top_k_percent`` most similar of all scored pairs;
- ``near_dup``: one survivor per group of images within ``dedup.phash_distance`` bits of pHash;
- ``semdedup``: one survivor per group of image embeddings with cosine >= 1 - ``dedup.semdedup_epsilon``;
- ``decontaminate``: no image near one of ``dedup.eval_sets``;
- ``image_cluster``: DataComp's image-based filter, the k-means clusters of ``dataset.image_cluster.reference``.

``threshold`` and ``top_k_percent`` cut at a similarity computed over all scored pairs (the pool), so that listing
both, or either with ``image_cluster``, is their intersection whatever the order. The dedup steps choose among the
rows still in: the survivor of a group is its most similar pair (then the earliest crawl, then the smallest uid),
and a removed pair's rejection names it.

A step's result is staged (a Delta staging table) before the next step reads it, so the plan of a later step does
not re-run the joins of the earlier ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.config import Config, ConfigError
from laion_spark.storage.audit import rejection_rows
from laion_spark.storage.delta import staged

log = logging.getLogger(__name__)

STAGE = "dataset"
THRESHOLD, TOP_K_PERCENT = "threshold", "top_k_percent"
NEAR_DUP, SEMDEDUP, DECONTAMINATE, IMAGE_CLUSTER = "near_dup", "semdedup", "decontaminate", "image_cluster"
FILTERS = (THRESHOLD, TOP_K_PERCENT, NEAR_DUP, SEMDEDUP, DECONTAMINATE, IMAGE_CLUSTER)
# What the pool must hold for a step, beyond uid and similarity.
POOL_COLUMNS = ("uid", "similarity", "crawl_date", "phash", "image_embedding")


def effective_filters(config: Config) -> list[str]:
    """``dataset.filters``; the default (``[threshold]``) with ``clip.top_k_percent`` set means ``[top_k_percent]``,
    as it did before the chain existed."""
    filters = list(config.dataset.filters)
    if filters == [THRESHOLD] and config.clip.top_k_percent > 0:
        return [TOP_K_PERCENT]
    return filters


def validate_filters(config: Config) -> list[str]:
    """The effective chain, or a ConfigError naming what is wrong with it (before any Spark job)."""
    filters = effective_filters(config)
    unknown = [name for name in filters if name not in FILTERS]
    if unknown:
        raise ConfigError(f"dataset.filters: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(FILTERS)}")
    if len(set(filters)) != len(filters):
        raise ConfigError(f"dataset.filters lists a step twice: {filters}")
    dedup = config.dedup
    if TOP_K_PERCENT in filters and not 0 < config.clip.top_k_percent <= 100:
        raise ConfigError("dataset.filters has top_k_percent: set clip.top_k_percent (0 < k <= 100)")
    if NEAR_DUP in filters and not 0 <= dedup.phash_distance <= 31:
        raise ConfigError(f"dedup.phash_distance must be between 0 and 31, got {dedup.phash_distance}")
    if SEMDEDUP in filters and not 0 < dedup.semdedup_epsilon < 1:
        raise ConfigError(f"dedup.semdedup_epsilon must be between 0 and 1, got {dedup.semdedup_epsilon}")
    if DECONTAMINATE in filters and not dedup.eval_sets:
        raise ConfigError("dataset.filters has decontaminate but dedup.eval_sets is empty: list the eval image sets")
    if IMAGE_CLUSTER in filters and not config.dataset.image_cluster.reference:
        raise ConfigError(
            "dataset.filters has image_cluster but dataset.image_cluster.reference is empty: give reference images"
        )
    return filters


@dataclass
class ChainResult:
    """The pool's rows that passed every step (``kept``: the pool's columns), what each step removed
    (``rejections``, ``rejections`` table rows) and (step, rows in, rows out) per step, in order."""

    kept: DataFrame
    rejections: DataFrame
    steps: list[tuple[str, int, int]] = field(default_factory=list)
    # (step, what, rows): a breakdown of a step's removals, e.g. decontaminate's per eval set.
    breakdown: list[tuple[str, str, int]] = field(default_factory=list)


@contextlib.contextmanager
def apply_filter_chain(spark: SparkSession, config: Config, lake: str, pool: DataFrame, run_id: str):
    """Run the chain over ``pool`` (POOL_COLUMNS; those a step does not need may be absent) and yield a
    :class:`ChainResult` whose frames stay readable inside the ``with`` block (they are staged in the lake)."""
    filters = validate_filters(config)
    with contextlib.ExitStack() as stack:
        current = pool
        rows_in = pool.count()
        removed: list[DataFrame] = []
        steps: list[tuple[str, int, int]] = []
        breakdown: list[tuple[str, str, int]] = []
        for number, name in enumerate(filters):
            rejected = STEPS[name](spark, config, pool, current, run_id)
            rejected = stack.enter_context(staged(rejected, lake, f"chain_{number}_{name}"))
            current = stack.enter_context(
                staged(current.join(rejected.select("uid"), "uid", "left_anti"), lake, f"chain_{number}_kept")
            )
            rows_out = current.count()
            steps.append((name, rows_in, rows_out))
            if name == DECONTAMINATE:  # which eval set each removal matched: one row per eval set
                per_set = rejected.groupBy("eval_set").count().orderBy("eval_set").collect()
                breakdown += [(name, row.eval_set, int(row["count"])) for row in per_set]
            log.info("dataset: %s kept %d of %d", name, rows_out, rows_in)
            rows_in = rows_out
            removed.append(rejected)
        empty = rejection_rows(pool.limit(0), STAGE, run_id, THRESHOLD)
        rejections = empty
        for frame in removed:
            rejections = rejections.unionByName(frame)
        yield ChainResult(current, rejections, steps, breakdown)


def _threshold(spark: SparkSession, config: Config, pool: DataFrame, current: DataFrame, run_id: str) -> DataFrame:
    threshold = config.clip.threshold
    below = current.where(F.col("similarity") < F.lit(threshold))
    detail = F.format_string(f"similarity %.4f below clip.threshold {threshold:g}", F.col("similarity"))
    return rejection_rows(below, STAGE, run_id, THRESHOLD, detail, value=F.col("similarity"), bound=threshold)


def top_k_cut(pool: DataFrame, top_k_percent: float) -> float | None:
    """The similarity at which the ``top_k_percent`` most similar rows of ``pool`` begin (approximate quantile,
    relative error 0.001); None for an empty pool."""
    quantile = max(0.0, 1.0 - top_k_percent / 100.0)
    cuts = pool.approxQuantile("similarity", [quantile], 0.001)
    return cuts[0] if cuts else None


def _top_k_percent(spark: SparkSession, config: Config, pool: DataFrame, current: DataFrame, run_id: str) -> DataFrame:
    k = config.clip.top_k_percent
    cut = top_k_cut(pool, k)
    if cut is None:
        return rejection_rows(current.limit(0), STAGE, run_id, TOP_K_PERCENT)
    below = current.where(F.col("similarity") < F.lit(cut))
    detail = F.format_string(f"similarity %.4f below the top {k:g}%% cut {cut:.4f}", F.col("similarity"))
    return rejection_rows(below, STAGE, run_id, TOP_K_PERCENT, detail, value=F.col("similarity"), bound=cut)


def _near_dup(spark: SparkSession, config: Config, pool: DataFrame, current: DataFrame, run_id: str) -> DataFrame:
    from laion_spark.curate.near_dup import phash_duplicates

    d = config.dedup.phash_distance
    found = phash_duplicates(current.select("uid", "phash", "similarity", "crawl_date"), d)
    detail = F.format_string("pHash within %d bits of %s", F.col("distance"), F.col("survivor_uid"))
    return rejection_rows(
        found, STAGE, run_id, NEAR_DUP, detail, survivor_uid=F.col("survivor_uid"), value=F.col("distance"), bound=d
    )


def _semdedup(spark: SparkSession, config: Config, pool: DataFrame, current: DataFrame, run_id: str) -> DataFrame:
    from laion_spark.curate.kmeans import default_clusters
    from laion_spark.curate.near_dup import semdedup_duplicates

    dedup = config.dedup
    rows = current.select("uid", "image_embedding", "similarity", "crawl_date")
    clusters = dedup.semdedup_clusters or min(50_000, default_clusters(rows.count()))
    found = semdedup_duplicates(rows, dedup.semdedup_epsilon, clusters, dedup.kmeans_sample)
    bound = 1.0 - dedup.semdedup_epsilon
    detail = F.format_string("image embedding cosine %.4f with %s", F.col("cosine"), F.col("survivor_uid"))
    return rejection_rows(
        found, STAGE, run_id, SEMDEDUP, detail, survivor_uid=F.col("survivor_uid"), value=F.col("cosine"), bound=bound
    )


def _decontaminate(spark: SparkSession, config: Config, pool: DataFrame, current: DataFrame, run_id: str) -> DataFrame:
    from laion_spark.curate.decontaminate import contaminated
    from laion_spark.curate.eval_sets import load_signatures

    dedup = config.dedup
    evals = load_signatures(spark, dedup.eval_sets, config.clip, what="dedup.eval_sets")
    found = contaminated(
        current.select("uid", "phash", "image_embedding"), evals.rows, dedup.eval_phash_distance, dedup.eval_min_cosine
    )
    by_phash = F.col("match") == "phash"
    detail = F.when(
        by_phash,
        F.format_string("pHash within %d bits of %s in eval set %s", "distance", "eval_image", "eval_set"),
    ).otherwise(
        F.format_string("image embedding cosine %.4f with %s in eval set %s", "cosine", "eval_image", "eval_set")
    )
    value = F.when(by_phash, F.col("distance").cast("double")).otherwise(F.col("cosine").cast("double"))
    bound = F.when(by_phash, F.lit(float(dedup.eval_phash_distance))).otherwise(F.lit(dedup.eval_min_cosine))
    return rejection_rows(
        found, STAGE, run_id, DECONTAMINATE, detail, eval_set=F.col("eval_set"), value=value, bound=bound
    )


def _image_cluster(spark: SparkSession, config: Config, pool: DataFrame, current: DataFrame, run_id: str) -> DataFrame:
    from laion_spark.curate.eval_sets import load_signatures
    from laion_spark.curate.image_cluster import image_cluster_count, keep_reference_clusters, reference_clusters
    from laion_spark.curate.kmeans import train_kmeans

    settings = config.dataset.image_cluster
    # Clusters of the whole scored pool, as DataComp clusters its whole pool before intersecting.
    embedded = pool.select("uid", "image_embedding")
    k = image_cluster_count(embedded.count(), settings.clusters)
    centroids = train_kmeans(embedded, "image_embedding", k, config.dedup.kmeans_sample)
    reference = load_signatures(spark, settings.reference, config.clip, what="dataset.image_cluster.reference")
    kept_clusters = reference_clusters(reference.rows, centroids)
    found = keep_reference_clusters(current.select("uid", "image_embedding"), centroids, kept_clusters)
    detail = F.format_string(f"image cluster %d of {len(centroids)} holds no reference image", F.col("cluster"))
    return rejection_rows(found, STAGE, run_id, IMAGE_CLUSTER, detail, value=F.col("cluster").cast("double"))


STEPS: dict[str, Callable[[SparkSession, Config, DataFrame, DataFrame, str], DataFrame]] = {
    THRESHOLD: _threshold,
    TOP_K_PERCENT: _top_k_percent,
    NEAR_DUP: _near_dup,
    SEMDEDUP: _semdedup,
    DECONTAMINATE: _decontaminate,
    IMAGE_CLUSTER: _image_cluster,
}
