"""The candidates stage end to end on real Delta tables: funnel counts, incremental runs, idempotent reruns."""

from __future__ import annotations

import datetime as dt

import pytest

from laion_spark.candidates import run_candidates
from laion_spark.config import Config
from laion_spark.schemas import CANDIDATES, PAIRS, PAIRS_SCHEMA, STAGE_STATS
from laion_spark.storage import append, read_table


def pair(uid, url, text, source_file, offset, day):
    return (uid, url, text, f"https://site.example/{uid}", source_file, offset, dt.datetime(2024, 3, day), "wat")


# Crawl of day 10: a duplicate within the file, and a few rows that the rules drop.
FILE_A = [
    pair("a-cat", "https://img.example/cat.jpg", "A black cat sleeping on the old red sofa", "a.wat.gz", 100, 10),
    pair(
        "a-cat-again",
        "https://IMG.example/cat.jpg#zoom",
        "a black cat  sleeping on the OLD red sofa",
        "a.wat.gz",
        200,
        10,
    ),
    pair("a-bread", "https://img.example/bread.jpg", "Frisches Brot auf einem Holzbrett", "a.wat.gz", 300, 10),
    pair("a-junk", "https://img.example/x.jpg", "IMG_2034.jpg", "a.wat.gz", 400, 10),
    pair("a-short", "https://img.example/y.jpg", "ok", "a.wat.gz", 500, 10),
    pair("a-huge", "https://img.example/z.jpg", "x" * 1_000_000, "a.wat.gz", 600, 10),
]
# An older crawl (day 3) ingested later: it holds an earlier copy of the cat, a new pair and a repeat of bread.
FILE_B = [
    pair("b-cat", "https://img.example/cat.jpg", "A BLACK cat sleeping on the old red sofa", "b.wat.gz", 50, 3),
    pair("b-tea", "https://img.example/tea.jpg", "Une tasse de thé vert sur la table", "b.wat.gz", 60, 3),
    pair("b-bread", "https://img.example/bread.jpg", "Frisches Brot auf einem Holzbrett", "b.wat.gz", 70, 11),
    pair("b-binary", "https://img.example/w.jpg", "\x00\x01\x02binary\ufffd", "b.wat.gz", 80, 3),
]


def candidates_by_key(spark, lake):
    rows = read_table(spark, lake, CANDIDATES).collect()
    assert len(rows) == len({r.dedup_key for r in rows}), "one row per key"
    return {r.dedup_key: r.asDict() for r in rows}


@pytest.fixture(scope="module")
def scenario(spark, tmp_path_factory):
    """Run the stage the way a lake grows (file A, then file B, then a rerun) and once over both files.

    Built once per module: every run is a few Spark jobs and a Delta MERGE, and the 2-core machine is shared.
    """
    config = Config()
    incremental = str(tmp_path_factory.mktemp("incremental"))
    append(spark.createDataFrame(FILE_A, PAIRS_SCHEMA), incremental, PAIRS)
    first = run_candidates(spark, config, incremental, run_id="run-1")
    after_first = candidates_by_key(spark, incremental)
    append(spark.createDataFrame(FILE_B, PAIRS_SCHEMA), incremental, PAIRS)
    second = run_candidates(spark, config, incremental, run_id="run-2")
    after_second = candidates_by_key(spark, incremental)
    rerun = run_candidates(spark, config, incremental, run_id="run-3")
    after_rerun = candidates_by_key(spark, incremental)

    once = str(tmp_path_factory.mktemp("once"))
    append(spark.createDataFrame(FILE_A + FILE_B, PAIRS_SCHEMA), once, PAIRS)
    single = run_candidates(spark, config, once, run_id="once")
    return {
        "runs": {"first": first, "second": second, "rerun": rerun, "single": single},
        "tables": {
            "after_first": after_first,
            "after_second": after_second,
            "after_rerun": after_rerun,
            "once": candidates_by_key(spark, once),
        },
        "once_lake": once,
    }


def steps(counter):
    return {step: (rows_in, rows_out) for step, rows_in, rows_out in counter.steps}


def uids(table):
    return sorted(row["uid"] for row in table.values())


def test_duplicates_within_a_file_leave_one_survivor(scenario):
    assert uids(scenario["tables"]["after_first"]) == ["a-bread", "a-cat"]
    assert steps(scenario["runs"]["first"])["dedup_within_batch"] == (3, 2)


def test_two_incremental_runs_equal_one_run_over_both_inputs(scenario):
    tables = scenario["tables"]
    assert tables["after_second"] == tables["once"]
    # across files and runs: the older crawl's cat, ingested later, replaced the day-10 copy; bread keeps the
    # day-10 row of file A over file B's day-11 repeat
    assert uids(tables["after_second"]) == ["a-bread", "b-cat", "b-tea"]
    assert steps(scenario["runs"]["second"])["dedup_against_lake"] == (3, 2)


def test_rerun_without_new_pairs_adds_nothing_and_keeps_the_same_survivors(scenario):
    assert scenario["tables"]["after_rerun"] == scenario["tables"]["after_second"]
    rerun = steps(scenario["runs"]["rerun"])
    assert rerun["dedup_against_lake"] == (3, 0)
    assert rerun["detect_language"] == (0, 0)


def test_candidates_carry_language_and_confidence(scenario):
    table = scenario["tables"]["once"]
    assert {row["uid"]: row["language"] for row in table.values()} == {"a-bread": "de", "b-cat": "en", "b-tea": "fr"}
    assert all(0.3 <= row["language_confidence"] <= 1.0 for row in table.values())


def test_every_rule_and_step_count_is_recorded_in_stage_stats(spark, scenario):
    stats = read_table(spark, scenario["once_lake"], STAGE_STATS).where("run_id = 'once'").orderBy("seq").collect()
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
    counter = scenario["runs"]["single"]
    assert counter.steps == [(step, rows_in, out) for _, step, rows_in, out in recorded]
    assert "junk_text" in counter.summary()
