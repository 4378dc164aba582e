"""The ``candidates`` stage: pairs -> rules -> dedup within the batch -> dedup against the lake -> language.

Incremental by construction: every run reads ``pairs``, keeps one row per key, and MERGEs into ``candidates``
only the keys the lake has not seen, plus the keys for which this batch holds an earlier survivor than the
one stored (an older crawl ingested later). Several runs over overlapping inputs therefore leave the table
holding the same captures as one run over all of them would, and a rerun with no new pairs writes no row.
Language detection, the expensive step, runs only on the rows that are written.

``candidates.uid`` is the uid of the first survivor stored for its key, and stays so. When an earlier capture
replaces the stored row, every other column moves to it: its url and text (equal to the stored ones up to
what the key folds away: case, width, ligatures; in ``url`` mode the text may differ entirely), its lineage
(``source_file``, ``record_offset``, ``crawl_date``, ``page_url``) and its language. The uid does not,
because ``images`` and ``embeddings`` are keyed by it: a new uid would orphan the stored download and fetch
the URL again. So a replaced row's uid is not the sha1 of its own url and text, and one run over all inputs
may store another uid for a key than several runs did; the capture stored is the same either way.

Spark jobs per run: one aggregation over ``pairs`` (rows in, every rule's ``dropped_<rule>`` and the distinct
keys, all at once, through the shared :meth:`StageCounter.count_drops`), then the MERGE. The rows written come from the MERGE's own Delta metrics (``DESCRIBE HISTORY``), not from a recount.
"""

from __future__ import annotations

import logging

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
from laion_spark.config import CandidatesConfig, Config
from laion_spark.schemas import CANDIDATES, CANDIDATES_SCHEMA, PAIRS
from laion_spark.storage import StageCounter, ensure_table, merge, new_run_id, read_table

log = logging.getLogger(__name__)

STAGE = "candidates"


def build_candidates(pairs: DataFrame, existing: DataFrame, config: CandidatesConfig | None = None) -> DataFrame:
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
        .select(*CANDIDATES_SCHEMA.fieldNames())
    )


def run_candidates(spark: SparkSession, config: Config, lake: str, run_id: str | None = None) -> StageCounter:
    """Read ``pairs``, write the new candidates, record every step's rows in and out in ``stage_stats``."""
    settings = config.candidates
    _validate(settings)
    counter = StageCounter(run_id or new_run_id(), STAGE)
    pairs = read_table(spark, lake, PAIRS)

    # One aggregation: rows in, every rule's drops (the funnel's first steps) and the distinct keys of the rest.
    marked = mark_rule_failures(pairs, settings.rules)
    survivor_key = F.when(F.col(DROPPED_BY).isNull(), dedup_key(F.col("url"), text_key_of(marked), settings.dedup.mode))
    rule_names = [rule.name for rule in active_rules(settings.rules)]
    counts = counter.count_drops(marked, DROPPED_BY, rule_names, batch_keys=F.count_distinct(survivor_key))
    batch_keys = counts.extra["batch_keys"]
    counter.add("dedup_within_batch", counts.rows_out, batch_keys)

    ensure_table(spark, lake, CANDIDATES, CANDIDATES_SCHEMA)
    existing = read_table(spark, lake, CANDIDATES)
    inserted, replaced = _merge_candidates(build_candidates(pairs, existing, settings), lake)
    written = inserted + replaced
    counter.add("dedup_against_lake", batch_keys, written)
    counter.add("detect_language", written, written)
    log.info("candidates: %d new keys, %d earlier survivors replaced later ones", inserted, replaced)

    counter.write(spark, lake)
    return counter


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
