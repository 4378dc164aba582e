"""The candidates stage end to end on real Delta tables: funnel counts, incremental runs, idempotent reruns."""

from __future__ import annotations

import datetime as dt

from laion_spark.config import Config
from laion_spark.schemas import CANDIDATES, PAIRS, PAIRS_SCHEMA, STAGE_STATS
from laion_spark.storage import append, read_table
from laion_spark.transforms import run_candidates


def pair(uid, url, text, source_file, offset, day):
    return (uid, url, text, f"https://site.example/{uid}", source_file, offset, dt.datetime(2024, 3, day), "wat")


# Crawl of day 10: a duplicate within the file, and a few rows that the rules drop.
FILE_A = [
    pair("a-cat", "https://img.example/cat.jpg", "A black cat on a red sofa", "a.wat.gz", 100, 10),
    pair("a-cat-again", "https://IMG.example/cat.jpg#zoom", "a black cat  on a red sofa", "a.wat.gz", 200, 10),
    pair("a-bread", "https://img.example/bread.jpg", "Frisches Brot auf einem Holzbrett", "a.wat.gz", 300, 10),
    pair("a-junk", "https://img.example/x.jpg", "IMG_2034.jpg", "a.wat.gz", 400, 10),
    pair("a-short", "https://img.example/y.jpg", "ok", "a.wat.gz", 500, 10),
    pair("a-huge", "https://img.example/z.jpg", "x" * 1_000_000, "a.wat.gz", 600, 10),
]
# An older crawl (day 3) ingested later: it holds an earlier copy of the cat, a new pair and a repeat of bread.
FILE_B = [
    pair("b-cat", "https://img.example/cat.jpg", "A BLACK cat on a red sofa", "b.wat.gz", 50, 3),
    pair("b-tea", "https://img.example/tea.jpg", "Une tasse de thé vert sur la table", "b.wat.gz", 60, 3),
    pair("b-bread", "https://img.example/bread.jpg", "Frisches Brot auf einem Holzbrett", "b.wat.gz", 70, 11),
    pair("b-binary", "https://img.example/w.jpg", "\x00\x01\x02binary\ufffd", "b.wat.gz", 80, 3),
]


def candidates_by_key(spark, lake):
    rows = read_table(spark, lake, CANDIDATES).collect()
    return {r.dedup_key: r.asDict() for r in rows}


def test_two_incremental_runs_equal_one_run_over_both_inputs(spark, lake, tmp_path):
    config = Config()
    append(spark.createDataFrame(FILE_A, PAIRS_SCHEMA), lake, PAIRS)
    first = run_candidates(spark, config, lake, run_id="run-1")
    after_first = candidates_by_key(spark, lake)
    assert sorted(r["uid"] for r in after_first.values()) == ["a-bread", "a-cat"]
    assert dict((step, out) for step, _, out in first.steps)["dedup_within_batch"] == 2

    append(spark.createDataFrame(FILE_B, PAIRS_SCHEMA), lake, PAIRS)
    second = run_candidates(spark, config, lake, run_id="run-2")
    incremental = candidates_by_key(spark, lake)

    once = str(tmp_path / "once")
    append(spark.createDataFrame(FILE_A + FILE_B, PAIRS_SCHEMA), once, PAIRS)
    run_candidates(spark, config, once, run_id="once")
    assert incremental == candidates_by_key(spark, once)
    # the older crawl's cat replaced the later copy; bread keeps its day-10 row; one row per key
    assert sorted(r["uid"] for r in incremental.values()) == ["a-bread", "b-cat", "b-tea"]
    assert dict((step, (rows_in, out)) for step, rows_in, out in second.steps)["dedup_against_lake"] == (3, 2)

    languages = {r["uid"]: r["language"] for r in incremental.values()}
    assert languages == {"a-bread": "de", "b-cat": "en", "b-tea": "fr"}
    assert all(0.0 < r["language_confidence"] <= 1.0 for r in incremental.values())


def test_rerun_without_new_pairs_adds_nothing_and_keeps_the_same_survivors(spark, lake):
    config = Config()
    append(spark.createDataFrame(FILE_A + FILE_B, PAIRS_SCHEMA), lake, PAIRS)
    run_candidates(spark, config, lake, run_id="run-1")
    before = candidates_by_key(spark, lake)
    rerun = run_candidates(spark, config, lake, run_id="run-2")
    assert candidates_by_key(spark, lake) == before
    steps = {step: (rows_in, out) for step, rows_in, out in rerun.steps}
    assert steps["dedup_against_lake"] == (3, 0)
    assert steps["detect_language"] == (0, 0)


def test_every_step_and_rule_count_is_recorded_in_stage_stats(spark, lake):
    append(spark.createDataFrame(FILE_A + FILE_B, PAIRS_SCHEMA), lake, PAIRS)
    counter = run_candidates(spark, Config(), lake, run_id="funnel-run")
    stats = read_table(spark, lake, STAGE_STATS).where("run_id = 'funnel-run'").orderBy("seq").collect()
    recorded = [(r.stage, r.step, r.rows_in, r.rows_out) for r in stats]
    assert recorded == [
        ("candidates", "missing_text", 10, 10),
        ("candidates", "max_text_chars", 10, 9),
        ("candidates", "min_text_chars", 9, 8),
        ("candidates", "binary_text", 8, 7),
        ("candidates", "url_scheme", 7, 7),
        ("candidates", "max_url_chars", 7, 7),
        ("candidates", "junk_text", 7, 6),
        ("candidates", "dedup_within_batch", 6, 3),
        ("candidates", "dedup_against_lake", 3, 3),
        ("candidates", "detect_language", 3, 3),
    ]
    assert counter.steps == [(step, rows_in, out) for _, step, rows_in, out in recorded]
    assert "junk_text" in counter.summary()
