"""What ``laion-spark report`` shows, computed with Spark: aggregates of the lake's tables and small samples of it.

Nothing here collects a table. Each ``collect`` is of an aggregate (histogram buckets, one row per status, language,
host or rejection reason, the top hosts) or of a sample bounded by ``limit`` (the thumbnail grids: a few dozen
rows). Image bytes are read only for those sampled uids, and made into small thumbnails in the driver.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import io
import json
import logging
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.config import Config
from laion_spark.curate.chain import THRESHOLD, TOP_K_PERCENT, effective_filters, top_k_cut
from laion_spark.report.funnel import TABLES_IN_FLOW, funnel_rows
from laion_spark.schemas import DATASET, EMBEDDINGS, IMAGES, PAIRS, REJECTIONS, RUNS
from laion_spark.score.nsfw import DETECTOR_NSFW_CUT, NSFW, UNSURE
from laion_spark.score.scoring import OK
from laion_spark.storage import read_table, table_exists
from laion_spark.storage.stats import OUTCOME_PREFIX

log = logging.getLogger(__name__)

# The alternative cuts the similarity section counts, beside the configured one: LAION-400M's 0.28 (ViT-B/32), a
# step either side of it, and DataComp's "CLIP score top 30%".
ALTERNATIVE_THRESHOLDS = (0.26, 0.28, 0.30)
ALTERNATIVE_TOP_K_PERCENT = 30.0
SIMILARITY_BUCKET = 0.01
PUNSAFE_BUCKET = 0.05
# Rows shown in each thumbnail grid; thumbnails are at most this many pixels on their longer side.
GRID_SIZE = 12
REJECTION_SAMPLE = 6
THUMBNAIL_SIDE = 128
TOP_HOSTS = 10
TOP_LANGUAGES = 15
# A fixed seed: the "random" rejections shown are the same on every build of the report over the same lake.
SAMPLE_SEED = 14
NOT_TAGGED = "not tagged"
# Steps of the dataset filter chain whose removals the curation section counts.
CURATION_STEPS = ("near_dup", "semdedup", "decontaminate", "image_cluster")

GRIDS = ("top", "above_cut", "below_cut", "rejected")


@dataclass
class SampledPair:
    """One pair of a thumbnail grid, with what the report prints under its thumbnail."""

    uid: str
    text: str | None = None
    url: str | None = None
    similarity: float | None = None
    nsfw: str | None = None
    punsafe: float | None = None
    detail: str | None = None  # why it was removed, for a rejection
    thumbnail: str | None = None  # a data: URI (JPEG), or None where there is no decodable image
    image_failed: bool = False  # image bytes were stored but did not decode into a thumbnail

    @property
    def nsfw_label(self) -> str:
        return self.nsfw or NOT_TAGGED

    @property
    def unsafe(self) -> bool:
        """Blurred unless the report is built with show_nsfw: tagged NSFW or UNSURE, or punsafe at the cut."""
        return self.nsfw in (NSFW, UNSURE) or (self.punsafe is not None and self.punsafe >= DETECTOR_NSFW_CUT)


@dataclass
class Grid:
    key: str  # top | above_cut | below_cut | rejected:<stage>.<step>
    title: str
    caption: str
    pairs: list[SampledPair] = field(default_factory=list)


@dataclass
class FunnelStep:
    stage: str
    step: str
    rows_in: int
    rows_out: int
    outcomes: list[tuple[str, int]] = field(default_factory=list)  # download.status:<outcome> breakdowns

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.step}"

    @property
    def dropped(self) -> int:
        return self.rows_in - self.rows_out


@dataclass
class Cut:
    label: str  # "clip.threshold 0.28", "top 30%"
    similarity: float | None  # the similarity it cuts at (None: an empty pool)
    kept: int  # scored pairs at or above it
    configured: bool = False


@dataclass
class ReportData:
    """Everything the report shows: small, so it renders without Spark (``render_report``)."""

    lake: str
    generated_at: str
    table_counts: dict[str, int] = field(default_factory=dict)
    funnel: list[FunnelStep] = field(default_factory=list)
    rejection_reasons: list[tuple[str, str, int]] = field(default_factory=list)  # (stage, step, rows)
    scored: int = 0  # embeddings with status ok: the pool every cut is taken from
    similarity_buckets: list[tuple[float, int]] = field(default_factory=list)  # (lower bound, rows)
    cut: Cut | None = None
    alternatives: list[Cut] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    languages: list[tuple[str, int, int]] = field(default_factory=list)  # (language, candidates, dataset)
    download_statuses: list[tuple[str, int]] = field(default_factory=list)
    failing_hosts: list[tuple[str, int, int]] = field(default_factory=list)  # (host, failed, fetched)
    side_buckets: list[tuple[int, int]] = field(default_factory=list)  # (longer side from, images): powers of two
    aspect_buckets: list[tuple[float, int]] = field(default_factory=list)  # (log2 of width/height from, images)
    nsfw_tags: list[tuple[str, int]] = field(default_factory=list)  # dataset rows per tag (NOT_TAGGED for null)
    punsafe_buckets: list[tuple[float, int]] = field(default_factory=list)
    curation: list[tuple[str, str, int]] = field(default_factory=list)  # (step, eval set or "", rows removed)
    grids: list[Grid] = field(default_factory=list)
    thumbnails_failed: int = 0  # sampled images that did not decode (shown without a thumbnail)

    def table_count(self, name: str) -> int | None:
        return self.table_counts.get(name)


def report_data(spark: SparkSession, config: Config, lake: str) -> ReportData:
    """Aggregate the lake's tables and sample them for the report: a few small Spark jobs, no table collected."""
    data = ReportData(lake=lake, generated_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    tables = {
        name: read_table(spark, lake, name) for name in (*TABLES_IN_FLOW, REJECTIONS) if table_exists(spark, lake, name)
    }
    data.table_counts = {name: tables[name].count() for name in TABLES_IN_FLOW if name in tables}
    data.funnel = _funnel(spark, lake)
    if REJECTIONS in tables:
        data.rejection_reasons = _rejection_reasons(tables[REJECTIONS])
        data.curation = _curation(tables[REJECTIONS])
    config, source = lake_cut_config(spark, lake, config)
    data.filters = effective_filters(config)
    pool = _pool(tables)
    if pool is not None:
        _similarity(data, pool, config, source)
    if "candidates" in tables:
        data.languages = _languages(tables["candidates"], tables.get(DATASET))
    if IMAGES in tables:
        _downloads(data, tables[IMAGES])
    if DATASET in tables:
        _nsfw(data, tables[DATASET])
    data.grids = sample_grids(spark, lake, config, GRIDS, tables=tables, pool=pool, cut=data.cut)
    data.thumbnails_failed = sum(1 for grid in data.grids for pair in grid.pairs if pair.image_failed)
    return data


def _pool(tables: dict[str, DataFrame]) -> DataFrame | None:
    """Scored pairs (embeddings with status ok): what every cut is taken over, as the filter chain takes it."""
    if EMBEDDINGS not in tables:
        return None
    return tables[EMBEDDINGS].where(F.col("status") == OK).select("uid", "similarity", "nsfw", "punsafe")


def _funnel(spark: SparkSession, lake: str) -> list[FunnelStep]:
    steps: list[FunnelStep] = []
    for stage, step, rows_in, rows_out in funnel_rows(spark, lake):
        if step.startswith(OUTCOME_PREFIX) and steps:
            steps[-1].outcomes.append((step[len(OUTCOME_PREFIX) :], rows_out))
        else:
            steps.append(FunnelStep(stage, step, rows_in, rows_out))
    return steps


def _rejection_reasons(rejections: DataFrame) -> list[tuple[str, str, int]]:
    rows = rejections.groupBy("stage", "step").count().collect()  # one row per reason
    return sorted(((r.stage, r.step, int(r["count"])) for r in rows), key=lambda r: (-r[2], r[0], r[1]))


def _curation(rejections: DataFrame) -> list[tuple[str, str, int]]:
    removed = rejections.where((F.col("stage") == "dataset") & F.col("step").isin(*CURATION_STEPS))
    rows = removed.groupBy("step", F.coalesce("eval_set", F.lit("")).alias("eval_set")).count().collect()
    return sorted((r.step, r.eval_set, int(r["count"])) for r in rows)


# Where the configured cut comes from, in its label: the config given, or the lake's own last cut (runs).
CONFIGURED = "configured"
LAKE_CUT = "the lake's last cut"
CUT_STAGES = ("score", "dataset")  # the runs whose config cut dataset: a score run, a `laion-spark dataset` re-cut


def lake_cut_config(spark: SparkSession, lake: str, config: Config) -> tuple[Config, str]:
    """``config`` with the clip and dataset sections that the lake's ``dataset`` was last cut with (the newest
    score or dataset run in ``runs``), and LAKE_CUT; ``config`` and CONFIGURED when ``runs`` has no such run. A
    report rendered with another config than the last run's still marks the cut the table holds."""
    if not table_exists(spark, lake, RUNS):
        return config, CONFIGURED
    newest = (
        read_table(spark, lake, RUNS)
        .where(F.col("stage").isin(*CUT_STAGES))
        .orderBy(F.col("recorded_at").desc())
        .select("config")
        .limit(1)
        .first()
    )
    if newest is None:
        return config, CONFIGURED
    try:
        sections = json.loads(newest["config"])
    except ValueError:
        log.warning("report: the newest run's config in %s/runs is not JSON; the cut shown is the given config's", lake)
        return config, CONFIGURED
    recorded = copy.deepcopy(config)
    for name in ("clip", "dataset"):
        section = getattr(recorded, name)
        for key, value in (sections.get(name) or {}).items():
            if hasattr(section, key):
                setattr(section, key, value)
    return recorded, LAKE_CUT


def configured_cut(pool: DataFrame, config: Config, source: str = CONFIGURED) -> tuple[str, float | None] | None:
    """(label, similarity) of the cut dataset.filters takes (top_k_percent before threshold), None without one."""
    filters = effective_filters(config)
    if TOP_K_PERCENT in filters:
        k = config.clip.top_k_percent
        return f"clip.top_k_percent {k:g}% ({source})", top_k_cut(pool, k)
    if THRESHOLD in filters:
        return f"clip.threshold {config.clip.threshold:g} ({source})", config.clip.threshold
    return None


def _similarity(data: ReportData, pool: DataFrame, config: Config, source: str = CONFIGURED) -> None:
    data.similarity_buckets = similarity_buckets(pool)
    data.scored, data.cut, data.alternatives = similarity_cuts(pool, config, source)


def similarity_cuts(pool: DataFrame, config: Config, source: str = CONFIGURED) -> tuple[int, Cut | None, list[Cut]]:
    """(scored pairs, the configured cut, the alternative cuts), each cut with the pairs it keeps, in one job."""
    configured = configured_cut(pool, config, source)
    cuts: list[tuple[str, float | None, bool]] = [(f"{t:.2f}", t, False) for t in ALTERNATIVE_THRESHOLDS]
    cuts.append((f"top {ALTERNATIVE_TOP_K_PERCENT:g}%", top_k_cut(pool, ALTERNATIVE_TOP_K_PERCENT), False))
    if configured:
        cuts.append((*configured, True))
    kept = [
        F.count(F.when(F.col("similarity") >= F.lit(float(s)), True)) if s is not None else F.lit(0) for _, s, _ in cuts
    ]
    row = pool.agg(F.count(F.lit(1)), *kept).first()  # one row of counts
    built = [Cut(label, s, int(row[i + 1] or 0), is_configured) for i, (label, s, is_configured) in enumerate(cuts)]
    return int(row[0]), next((c for c in built if c.configured), None), [c for c in built if not c.configured]


def similarity_buckets(pool: DataFrame) -> list[tuple[float, int]]:
    """(lower bound, rows) per SIMILARITY_BUCKET of similarity: at most 200 rows, whatever the pool's size."""
    bucket = F.floor(F.col("similarity") / F.lit(SIMILARITY_BUCKET)).cast("int").alias("bucket")
    rows = pool.where(F.col("similarity").isNotNull()).groupBy(bucket).count().collect()
    return sorted((round(r.bucket * SIMILARITY_BUCKET, 4), int(r["count"])) for r in rows)


def _languages(candidates: DataFrame, dataset: DataFrame | None) -> list[tuple[str, int, int]]:
    in_candidates = {r.language: int(r["count"]) for r in candidates.groupBy("language").count().collect()}
    in_dataset = {}
    if dataset is not None:
        language = F.coalesce("language", F.lit("none")).alias("language")
        in_dataset = {r.language: int(r["count"]) for r in dataset.groupBy(language).count().collect()}
    languages = sorted(set(in_candidates) | set(in_dataset), key=lambda k: (-in_candidates.get(k, 0), k))
    rows = [(lang, in_candidates.get(lang, 0), in_dataset.get(lang, 0)) for lang in languages]
    if len(rows) > TOP_LANGUAGES:
        rest = rows[TOP_LANGUAGES:]
        rows = rows[:TOP_LANGUAGES] + [("other", sum(r[1] for r in rest), sum(r[2] for r in rest))]
    return rows


def _host(url: str) -> Column:
    """The host of a URL, or "" (a regular expression rather than parse_url, which fails the whole query on one
    malformed URL under ANSI mode)."""
    return F.lower(F.regexp_extract(url, r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?([^/:?#]+)", 1))


def _downloads(data: ReportData, images: DataFrame) -> None:
    statuses = images.groupBy("status").count().collect()
    data.download_statuses = sorted(((r.status, int(r["count"])) for r in statuses), key=lambda r: (-r[1], r[0]))
    failed = F.col("status") != F.lit("success")
    hosts = (
        images.groupBy(_host("url").alias("host"))
        .agg(F.count(F.when(failed, True)).alias("failed"), F.count(F.lit(1)).alias("fetched"))
        .where(F.col("failed") > 0)
        .orderBy(F.desc("failed"), "host")
        .limit(TOP_HOSTS)
        .collect()
    )
    data.failing_hosts = [(r.host or "(no host)", int(r.failed), int(r.fetched)) for r in hosts]
    sized = images.where(
        (F.col("status") == "success") & (F.col("original_width") > 0) & (F.col("original_height") > 0)
    )
    longer = F.greatest("original_width", "original_height")
    side = F.pow(F.lit(2), F.floor(F.log2(longer))).cast("int").alias("side")
    data.side_buckets = sorted((int(r.side), int(r["count"])) for r in sized.groupBy(side).count().collect())
    # Quarter steps of log2(width / height): 0 is square, 1 twice as wide as high, -1 twice as high.
    ratio = F.log2(F.col("original_width").cast("double") / F.col("original_height").cast("double"))
    aspect = (F.floor(ratio * 4) / 4).alias("aspect")
    data.aspect_buckets = sorted((float(r.aspect), int(r["count"])) for r in sized.groupBy(aspect).count().collect())


def _nsfw(data: ReportData, dataset: DataFrame) -> None:
    tags = dataset.groupBy(F.coalesce("nsfw", F.lit(NOT_TAGGED)).alias("tag")).count().collect()
    data.nsfw_tags = sorted(((r.tag, int(r["count"])) for r in tags), key=lambda r: (-r[1], r[0]))
    bucket = F.floor(F.col("punsafe") / F.lit(PUNSAFE_BUCKET)).cast("int").alias("bucket")
    rows = dataset.where(F.col("punsafe").isNotNull()).groupBy(bucket).count().collect()
    data.punsafe_buckets = sorted((round(r.bucket * PUNSAFE_BUCKET, 4), int(r["count"])) for r in rows)


def sample_grids(
    spark: SparkSession,
    lake: str,
    config: Config,
    which: tuple[str, ...] = GRIDS,
    size: int = GRID_SIZE,
    tables: dict[str, DataFrame] | None = None,
    pool: DataFrame | None = None,
    cut: Cut | None = None,
) -> list[Grid]:
    """The thumbnail grids named in ``which`` (top, above_cut, below_cut, rejected: one grid per rejection
    reason), each at most ``size`` pairs (REJECTION_SAMPLE per reason), with thumbnails."""
    unknown = [name for name in which if name not in GRIDS]
    if unknown:
        raise ValueError(f"unknown thumbnail grid(s) {', '.join(unknown)}; the grids are {', '.join(GRIDS)}")
    if tables is None:
        tables = {
            n: read_table(spark, lake, n) for n in (DATASET, EMBEDDINGS, REJECTIONS) if table_exists(spark, lake, n)
        }
    if pool is None:
        pool = _pool(tables)
    if cut is None and pool is not None and ("above_cut" in which or "below_cut" in which):
        configured = configured_cut(pool, config)
        cut = Cut(configured[0], configured[1], 0, True) if configured else None
    keys: list[tuple[Grid, DataFrame]] = []  # each grid and the (uid, detail) rows that fill it, in order
    if "top" in which and DATASET in tables:
        grid = Grid("top", "Highest similarity in dataset", "the pairs of dataset with the highest CLIP similarity")
        top = tables[DATASET].orderBy(F.desc("similarity"), "uid").limit(size)
        keys.append((grid, top.select("uid", F.lit(None).cast("string").alias("detail"))))
    if cut is not None and cut.similarity is not None and pool is not None:
        at = F.lit(float(cut.similarity))
        if "above_cut" in which:
            grid = Grid("above_cut", "Just above the cut", f"the scored pairs closest above {cut.label}: kept")
            rows = pool.where(F.col("similarity") >= at).orderBy("similarity", "uid").limit(size)
            keys.append((grid, rows.select("uid", F.lit(None).cast("string").alias("detail"))))
        if "below_cut" in which:
            grid = Grid("below_cut", "Just below the cut", f"the scored pairs closest below {cut.label}: cut")
            rows = pool.where(F.col("similarity") < at).orderBy(F.desc("similarity"), "uid").limit(size)
            keys.append((grid, rows.select("uid", F.lit(None).cast("string").alias("detail"))))
    if "rejected" in which and REJECTIONS in tables:
        rejections = tables[REJECTIONS]
        for stage, step, count in _rejection_reasons(rejections):
            grid = Grid(
                f"rejected:{stage}.{step}",
                f"Rejected by {stage}.{step}",
                f"a random sample of the {count:,} pairs removed by {stage}.{step}",
            )
            # Ordered by a seeded hash of the uid: a random sample that is the same on every build.
            rows = (
                rejections.where((F.col("stage") == stage) & (F.col("step") == step))
                .orderBy(F.xxhash64("uid", F.lit(SAMPLE_SEED)))
                .limit(min(size, REJECTION_SAMPLE))
            )
            keys.append((grid, rows.select("uid", "detail")))
    if not keys:
        return []
    # The samples' keys only (uids and a sentence each), in one job; then the columns shown, for those uids only.
    labelled = [
        rows.withColumn("_grid", F.lit(i)).withColumn("_order", F.monotonically_increasing_id())
        for i, (_, rows) in enumerate(keys)
    ]
    union = labelled[0]
    for rows in labelled[1:]:
        union = union.unionByName(rows)
    sampled = union.collect()  # a few dozen rows: bounded by the limits above
    details = _pair_details(spark, lake, sorted({r.uid for r in sampled}), tables)
    grids = [grid for grid, _ in keys]
    for row in sorted(sampled, key=lambda r: (r["_grid"], r["_order"])):
        pair = details.get(row.uid) or SampledPair(row.uid)
        grids[row["_grid"]].pairs.append(
            SampledPair(**{**pair.__dict__, "detail": row.detail})  # a uid may be in two grids
        )
    return grids


def _pair_details(
    spark: SparkSession, lake: str, uids: list[str], tables: dict[str, DataFrame]
) -> dict[str, SampledPair]:
    """Text, URL, score, tag and a thumbnail for each of ``uids`` (a sample: at most a few dozen)."""
    if not uids:
        return {}
    wanted = F.col("uid").isin(*uids)
    pairs = {uid: SampledPair(uid) for uid in uids}
    if table_exists(spark, lake, PAIRS):
        # pairs has every pair (candidates lacks those its rules removed); a uid is one (url, text).
        for r in (
            read_table(spark, lake, PAIRS).where(wanted).select("uid", "text", "url").dropDuplicates(["uid"]).collect()
        ):
            pairs[r.uid].text, pairs[r.uid].url = r.text, r.url
    embeddings = tables.get(EMBEDDINGS)
    if embeddings is None and table_exists(spark, lake, EMBEDDINGS):
        embeddings = read_table(spark, lake, EMBEDDINGS)
    if embeddings is not None:
        for r in embeddings.where(wanted).select("uid", "similarity", "nsfw", "punsafe").collect():
            pairs[r.uid].similarity, pairs[r.uid].nsfw, pairs[r.uid].punsafe = r.similarity, r.nsfw, r.punsafe
    if table_exists(spark, lake, IMAGES):
        images = read_table(spark, lake, IMAGES).where(wanted & (F.col("status") == "success"))
        for r in images.select("uid", "url", "image").collect():
            pairs[r.uid].url = pairs[r.uid].url or r.url
            pairs[r.uid].thumbnail = thumbnail_data_uri(r.image)
            pairs[r.uid].image_failed = pairs[r.uid].thumbnail is None
    return pairs


def thumbnail_data_uri(image: bytes | None, side: int = THUMBNAIL_SIDE) -> str | None:
    """A JPEG thumbnail of ``image`` (at most ``side`` px) as a data: URI; None for bytes that do not decode."""
    if not image:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as decoded:
            decoded.thumbnail((side, side))
            buffer = io.BytesIO()
            decoded.convert("RGB").save(buffer, format="JPEG", quality=85)
    except Exception as exc:  # bad bytes never stop the report: the pair is shown without its thumbnail
        log.warning("report: a sampled image did not decode (%s)", exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = [
    "Cut",
    "FunnelStep",
    "Grid",
    "ReportData",
    "SampledPair",
    "configured_cut",
    "report_data",
    "sample_grids",
    "similarity_buckets",
    "similarity_cuts",
    "thumbnail_data_uri",
]
