"""The candidates stage end to end on real Delta tables: funnel counts, incremental runs, idempotent reruns."""

from __future__ import annotations

import collections
import datetime as dt

import pytest

from laion_spark.candidates import run_candidates
from laion_spark.config import Config
from laion_spark.extract import text_key
from laion_spark.schemas import CANDIDATES, PAIR_ROW_SCHEMA, PAIRS, STAGE_STATS
from laion_spark.storage import append, read_table


def pair(uid, url, text, source_file, offset, day):
    page_url = f"https://site.example/{uid}"
    return (uid, url, text, text_key(text), page_url, source_file, offset, dt.datetime(2024, 3, day), "wat", None)


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
    append(spark.createDataFrame(FILE_A, PAIR_ROW_SCHEMA), incremental, PAIRS)
    first = run_candidates(spark, config, incremental, run_id="run-1")
    after_first = candidates_by_key(spark, incremental)
    append(spark.createDataFrame(FILE_B, PAIR_ROW_SCHEMA), incremental, PAIRS)
    second = run_candidates(spark, config, incremental, run_id="run-2")
    after_second = candidates_by_key(spark, incremental)
    rerun = run_candidates(spark, config, incremental, run_id="run-3")
    after_rerun = candidates_by_key(spark, incremental)

    once = str(tmp_path_factory.mktemp("once"))
    append(spark.createDataFrame(FILE_A + FILE_B, PAIR_ROW_SCHEMA), once, PAIRS)
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


RUN_SPECIFIC = {"uid", "run_id", "ingest_batch"}  # lineage: which run and slice wrote the row


def without_uids(table):
    return {
        key: {column: value for column, value in row.items() if column not in RUN_SPECIFIC}
        for key, row in table.items()
    }


def test_duplicates_within_a_file_leave_one_survivor(scenario):
    assert uids(scenario["tables"]["after_first"]) == ["a-bread", "a-cat"]
    assert steps(scenario["runs"]["first"])["dedup_within_batch"] == (3, 2)


def test_two_incremental_runs_store_the_captures_one_run_over_both_inputs_stores(scenario):
    tables = scenario["tables"]
    assert without_uids(tables["after_second"]) == without_uids(tables["once"])
    # across files and runs: the older crawl's cat, ingested later, replaced the day-10 copy; bread keeps the
    # day-10 row of file A over file B's day-11 repeat
    assert uids(tables["once"]) == ["a-bread", "b-cat", "b-tea"]
    assert steps(scenario["runs"]["second"])["dedup_against_lake"] == (3, 2)


def test_a_replaced_candidate_keeps_its_uid_and_takes_the_earlier_capture(scenario):
    # images and embeddings are keyed by uid: a new uid would orphan the stored download of the cat
    tables = scenario["tables"]
    assert uids(tables["after_second"]) == ["a-bread", "a-cat", "b-tea"]
    cat = next(row for row in tables["after_second"].values() if row["uid"] == "a-cat")
    once = next(row for row in tables["once"].values() if row["uid"] == "b-cat")
    lineage = {"run_id": cat["run_id"], "ingest_batch": cat["ingest_batch"]}  # the run that replaced it
    assert cat == {**once, "uid": "a-cat", **lineage}
    assert cat["run_id"] != once["run_id"]
    assert (cat["text"], cat["source_file"], cat["record_offset"], cat["crawl_date"], cat["page_url"]) == (
        "A BLACK cat sleeping on the old red sofa",
        "b.wat.gz",
        50,
        dt.datetime(2024, 3, 3),
        "https://site.example/b-cat",
    )


def test_rerun_without_new_pairs_adds_nothing_and_keeps_the_same_survivors(scenario):
    assert scenario["tables"]["after_rerun"] == scenario["tables"]["after_second"]
    rerun = steps(scenario["runs"]["rerun"])
    # Incremental: no pair was added since the last run, so the rerun reads none and writes none.
    assert rerun["dedup_against_lake"] == (0, 0)
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


def test_texts_that_read_the_same_give_one_candidate(spark, lake):
    shirt, sign, street, fish, city = (
        f"https://img.example/{name}.jpg" for name in "shirt sign street fish city".split()
    )
    rows = [
        pair("shirt-full-width", shirt, "ＡＢＣ１２３ ｒｅｄ ｓｈｉｒｔ", "f.wat.gz", 1, 5),
        pair("shirt-half-width", shirt, "ABC123 red shirt", "f.wat.gz", 2, 4),
        pair("sign-half-width", sign, "ｶﾀｶﾅの看板", "f.wat.gz", 3, 5),
        pair("sign-full-width", sign, "カタカナの看板", "f.wat.gz", 4, 5),
        pair("street-eszett", street, "Straße in Berlin", "f.wat.gz", 5, 5),
        pair("street-upper", street, "STRASSE IN BERLIN", "f.wat.gz", 6, 5),
        pair("street-lower", street, "strasse in berlin", "f.wat.gz", 7, 5),
        pair("fish-ligature", fish, "ﬁsh on a plate", "f.wat.gz", 8, 5),
        pair("fish-plain", fish, "Fish on a plate", "f.wat.gz", 9, 5),
        # Unicode casefold is not Turkish: İ folds to i + combining dot, so the dotted capital stays apart
        pair("city-dotted", city, "İSTANBUL at night", "f.wat.gz", 10, 5),
        pair("city-upper", city, "ISTANBUL at night", "f.wat.gz", 11, 5),
        pair("city-lower", city, "istanbul at night", "f.wat.gz", 12, 5),
    ]
    append(spark.createDataFrame(rows, PAIR_ROW_SCHEMA), lake, PAIRS)
    counter = run_candidates(spark, Config(), lake, run_id="folded")
    table = candidates_by_key(spark, lake)
    assert collections.Counter(row["url"] for row in table.values()) == {shirt: 1, sign: 1, street: 1, fish: 1, city: 2}
    assert sorted(uids(table)) == [
        "city-dotted",
        "city-upper",
        "fish-ligature",
        "shirt-half-width",  # the earlier crawl of the two
        "sign-half-width",
        "street-eszett",
    ]
    assert steps(counter)["dedup_within_batch"] == (12, 6)
