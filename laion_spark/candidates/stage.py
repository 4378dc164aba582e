"""The ``candidates`` stage: new pairs -> rules -> dedup within the batch -> dedup against the lake -> language.

Incremental in what it reads: a run reads only the pairs inserted since the last run, from the change data feed
of ``pairs`` (on from the table's creation, or switched on by the first run of a lake made before), between the
version in its bookmark (the lake's ``_bookmarks`` table, row ``candidates``/``pairs``) and the version current
when the run starts. So the cost of a run follows the pairs that are new, not the size of ``pairs``: the
rules, the count of distinct keys and the dedup within the batch run over the new rows only. With no bookmark
(a first run, a bookmark deleted, ``pairs`` dropped and created again) or ``candidates.incremental: false``, a
run reads all of ``pairs`` at that version instead; so it does when the feed is gone for part of the range
(switched off, vacuumed, its log cleaned up), which Delta may say only once a job reads it.

Incremental in what it writes: the batch keeps one row per key, and MERGEs into ``candidates`` only the keys
the lake has not seen, plus the keys for which this batch holds an earlier survivor than the one stored (an
older crawl ingested later). The dedup against the lake still joins all of ``candidates``, the table it must be
unique over. Several runs over overlapping inputs therefore leave the table holding the same captures as one
run over all of them would, and a run with no new pairs reads no row and writes none. Language detection, the
expensive step, runs only on the rows that are written.

The bookmark moves after the MERGE has committed: a run that stops between the two makes the next run read the
same pairs again, and their MERGE changes nothing. A file extracted again (``replaceWhere``: its rows deleted and
inserted) comes back as new pairs in the same way, and is as harmless. The feed is not netted: a pair inserted
and deleted between two runs is read, as it would have been by a run between the two commits (``candidates``
keeps what it stored either way).

``candidates.uid`` is the uid of the first survivor stored for its key, and stays so. When an earlier capture
replaces the stored row, every other column moves to it: its url and text (equal to the stored ones up to
what the key folds away: case, width, ligatures; in ``url`` mode the text may differ entirely), its lineage
(``source_file``, ``record_offset``, ``crawl_date``, ``page_url``) and its language. The uid does not,
because ``images`` and ``embeddings`` are keyed by it: a new uid would orphan the stored download and fetch
the URL again. So a replaced row's uid is not the sha1 of its own url and text, and one run over all inputs
may store another uid for a key than several runs did; the capture stored is the same either way.

Spark jobs per run: one aggregation over the new pairs (rows in, every rule's ``dropped_<rule>`` and the
distinct keys, all at once, through the shared :func:`count_drops`), then, when there is a key to write, the
MERGE. The rows written come from the MERGE's own Delta metrics (``DESCRIBE HISTORY``), not from a recount.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.candidates.dedup import (
    DEDUP_KEY,
    TEXT_KEY,
    add_dedup_key,
    add_text_key,
    dedup_key,
    keep_first_per_key,
    keep_new_or_earlier,
    survivor_rank_sql,
    text_key_of,
)
from laion_spark.candidates.language import detect_language, validate_languages
from laion_spark.candidates.rules import (
    DROPPED_BY,
    active_rules,
    apply_rules,
    junk_text_regex,
    mark_rule_failures,
)
from laion_spark.config import CandidatesConfig, Config, ConfigError
from laion_spark.remove.blocklist import drop_blocked_pairs, read_blocklist
from laion_spark.run.progress import stage_progress
from laion_spark.schemas import CANDIDATES, CANDIDATES_SCHEMA, PAIRS
from laion_spark.storage import StageCounter, count_drops, ensure_table, merge, new_run_id, read_table
from laion_spark.storage.audit import record_rejections, record_run, rejection_rows
from laion_spark.storage.delta import NewRows, consume_new_rows, read_new_rows, write_bookmark
from laion_spark.storage.stats import DropCounts

log = logging.getLogger(__name__)

STAGE = "candidates"
LICENSE = "license"


def build_candidates(
    pairs: DataFrame, existing: DataFrame, config: CandidatesConfig | None = None, run_id: str | None = None
) -> DataFrame:
    """The rows ``pairs`` contributes to a ``candidates`` table holding ``existing``, with their language.

    Pure: usable from a notebook on any frame with the pairs columns (``existing`` may be empty). A frame
    without ``text_key`` gets Spark's approximation of it (``dedup.dedup_text``).
    """
    config = config or CandidatesConfig()
    return (
        pairs.transform(apply_rules, config.rules)
        .transform(add_text_key)
        .transform(add_dedup_key, config.dedup.mode)
        .transform(keep_first_per_key)
        .transform(keep_new_or_earlier, existing)
        .transform(detect_language, config.language)
        .transform(with_lineage, run_id)
        .transform(with_license_or_null)
        .select(*CANDIDATES_SCHEMA.fieldNames())
    )


def with_lineage(candidates: DataFrame, run_id: str | None = None) -> DataFrame:
    """The lineage columns: the pairs slice a row came from (null for a frame of pairs without it) and this run."""
    if "ingest_batch" not in candidates.columns:
        candidates = candidates.withColumn("ingest_batch", F.lit(None).cast("string"))
    return candidates.withColumn("run_id", F.lit(run_id).cast("string"))


def with_license_or_null(candidates: DataFrame) -> DataFrame:
    """The page's licence as pairs carry it, or null for a frame of pairs without the column (a notebook's, or the
    pairs of a lake that no extraction since the column came has touched)."""
    if LICENSE in candidates.columns:
        return candidates
    return candidates.withColumn(LICENSE, F.lit(None).cast("string"))


def rejected_pairs(pairs: DataFrame, candidates: DataFrame, config: CandidatesConfig, run_id: str) -> DataFrame:
    """Why each pair of ``pairs`` is not a candidate, as ``rejections`` rows: the rule it failed (step = the rule's
    name), or ``dedup`` when ``candidates`` (after this slice's MERGE) holds another pair under its key
    (survivor_uid = that pair)."""
    marked = mark_rule_failures(pairs, config.rules)
    by_rule = rejection_rows(
        marked.where(F.col(DROPPED_BY).isNotNull()),
        STAGE,
        run_id,
        step=F.col(DROPPED_BY),
        detail=F.concat(F.lit("failed the rule "), F.col(DROPPED_BY)),
    )
    keyed = marked.where(F.col(DROPPED_BY).isNull()).transform(add_text_key).transform(add_dedup_key, config.dedup.mode)
    kept = candidates.select(F.col(DEDUP_KEY), F.col("uid").alias("survivor_uid"))
    duplicates = keyed.select("uid", DEDUP_KEY).join(kept, DEDUP_KEY).where(F.col("uid") != F.col("survivor_uid"))
    by_dedup = rejection_rows(
        duplicates,
        STAGE,
        run_id,
        step="dedup",
        detail=F.concat(F.lit(f"same {config.dedup.mode} key as "), F.col("survivor_uid")),
        survivor_uid=F.col("survivor_uid"),
    )
    return by_rule.unionByName(by_dedup)


def run_candidates(spark: SparkSession, config: Config, lake: str, run_id: str | None = None) -> StageCounter:
    """Read the pairs added since the last run, write the new candidates, record every step's rows in and out in
    ``stage_stats`` (the first step's rows in: the pairs read).

    The new pairs are read in slices of whole commits of ``pairs`` (about ``candidates.pairs_per_slice`` rows
    each): each slice is MERGEd and then bookmarked before the next is read, so a killed run loses one slice."""
    settings = config.candidates
    _validate(settings)
    if settings.pairs_per_slice < 1:
        raise ConfigError(f"candidates.pairs_per_slice must be at least 1, got {settings.pairs_per_slice}")
    counter = StageCounter(run_id or new_run_id(), STAGE)
    ensure_table(spark, lake, CANDIDATES, CANDIDATES_SCHEMA)
    # The change feed still holds the inserts of pairs a takedown deleted since: they must not become candidates.
    blocklist = read_blocklist(spark, lake)
    totals = _SliceTotals()
    number = 0
    position: int | None = None  # the last version of pairs read: progress counts commits of pairs
    with stage_progress(config, STAGE, None, "commits of pairs", counter.run_id) as progress:
        while True:
            number += 1
            new, counts = _read_new_pairs(spark, lake, settings)
            if position is None:  # the first slice: the run reads the commits after its bookmark (every one: none)
                position = new.since.version if new.since is not None else -1
                progress.set_total(max(new.latest, new.bookmark.version) - position)
            batch_keys = counts.extra["batch_keys"]
            inserted = replaced = 0
            if batch_keys:  # with no key, neither the join with candidates nor the MERGE has anything to do
                existing = read_table(spark, lake, CANDIDATES)
                rows = build_candidates(drop_blocked_pairs(new.rows, blocklist), existing, settings, counter.run_id)
                inserted, replaced = _merge_candidates(rows, lake)
                if config.dataset.rejections:
                    candidates = read_table(spark, lake, CANDIDATES)
                    record_rejections(rejected_pairs(new.rows, candidates, settings, counter.run_id), lake)
            if new.moves_bookmark:  # only once the MERGE has committed (see the module docstring)
                write_bookmark(spark, lake, new.bookmark, counter.run_id)
            totals.add(counts, batch_keys, inserted, replaced)
            progress.advance(new.bookmark.version - position)
            position = new.bookmark.version
            log.info(
                "candidates: slice %d (pairs up to version %d of %d): %d new keys, %d earlier survivors replaced "
                "later ones", number, new.bookmark.version, max(new.latest, new.bookmark.version), inserted, replaced,
            )  # fmt: skip
            if not new.has_more:
                break
    counter.add_drops(totals.rows_in, totals.dropped.items())
    counter.add("dedup_within_batch", totals.rows_out, totals.batch_keys)
    written = totals.inserted + totals.replaced
    counter.add("dedup_against_lake", totals.batch_keys, written)
    counter.add("detect_language", written, written)
    counter.write(spark, lake)
    record_run(spark, lake, counter.run_id, STAGE, config)
    return counter


@dataclass
class _SliceTotals:
    """The counts of a run's slices, added up for its funnel."""

    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    batch_keys: int = 0
    inserted: int = 0
    replaced: int = 0

    def add(self, counts: DropCounts, batch_keys: int, inserted: int, replaced: int) -> None:
        self.rows_in += counts.rows_in
        self.rows_out += counts.rows_out
        for rule, dropped in counts.dropped:
            self.dropped[rule] = self.dropped.get(rule, 0) + dropped
        self.batch_keys += batch_keys
        self.inserted += inserted
        self.replaced += replaced


def _read_new_pairs(spark: SparkSession, lake: str, settings: CandidatesConfig) -> tuple[NewRows, DropCounts]:
    """The pairs this run reads, and their counts: rows in, every rule's drops and the distinct keys of the rest,
    in one aggregation (all of ``pairs`` when its change feed turns out to be gone as this job reads it)."""
    new = read_new_rows(spark, lake, STAGE, PAIRS, whole=not settings.incremental, max_rows=settings.pairs_per_slice)
    new, counts = consume_new_rows(spark, lake, new, lambda pairs: _count_rules_and_keys(pairs, settings))
    if new.is_whole_table:
        log.info("candidates: read all of pairs at version %d", new.bookmark.version)
    else:
        log.info("candidates: read the pairs of versions %d to %d", new.since.version + 1, new.bookmark.version)
    return new, counts


def _count_rules_and_keys(pairs: DataFrame, settings: CandidatesConfig) -> DropCounts:
    marked = mark_rule_failures(pairs, settings.rules)
    survivor_key = F.when(F.col(DROPPED_BY).isNull(), dedup_key(F.col("url"), text_key_of(marked), settings.dedup.mode))
    rule_names = [rule.name for rule in active_rules(settings.rules)]
    return count_drops(marked, DROPPED_BY, rule_names, batch_keys=F.count_distinct(survivor_key))


def _validate(config: CandidatesConfig) -> None:
    """Configuration mistakes surface here as one sentence, before any Spark job starts."""
    junk_text_regex(config.rules.junk_text_patterns)
    dedup_key(F.col("url"), F.col(TEXT_KEY), config.dedup.mode)
    validate_languages(config.language.languages)


def _merge_candidates(rows: DataFrame, lake: str) -> tuple[int, int]:
    """MERGE on ``dedup_key``: insert new keys, replace a stored row by an earlier survivor. (inserted, replaced)

    A replacement keeps the stored ``uid`` (see the module docstring): the download and the embedding of the
    key stay attached to it.
    """
    all_but_uid = [name for name in CANDIDATES_SCHEMA.fieldNames() if name != "uid"]
    # Re-checked in the MERGE, not only in keep_new_or_earlier, so that a concurrent run can never replace an
    # earlier row by a later one.
    earlier = f"{survivor_rank_sql('source.')} < {survivor_rank_sql('target.')}"
    counts = merge(rows, lake, CANDIDATES, [DEDUP_KEY], update=all_but_uid, update_condition=earlier)
    return counts.inserted, counts.updated
