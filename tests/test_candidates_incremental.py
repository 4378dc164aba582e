"""The candidates stage reads only the pairs added since its last run: real archives, extraction and Delta tables.

A lake grows file by file (A, then B, then C); every candidates run must read the new file's pairs only (its
first funnel step's rows in), still deduplicate them against everything stored, and leave the table one run over
all the files would leave. Lakes whose ``pairs`` has no usable change data feed (made before it was switched
on, its feed switched off or vacuumed, the bookmark deleted) read ``pairs`` whole once and go on incrementally.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from laion_spark.candidates import run_candidates
from laion_spark.config import Config, load_config
from laion_spark.extract import run_extract
from laion_spark.schemas import BOOKMARKS, CANDIDATES, PAIRS, PAIRS_SCHEMA, STAGE_STATS
from laion_spark.storage import ensure_table, latest_version, read_table, table_ref
from laion_spark.storage.delta import CHANGE_DATA_FEED, read_bookmark, table_detail
from laion_spark.testing.archives import WatPage, write_wat

pytestmark = pytest.mark.slow

LATER, LATEST, EARLIER = "2024-05-01T12:00:00Z", "2024-06-01T12:00:00Z", "2023-11-01T12:00:00Z"
CAT = ("https://img.example/cat.jpg", "A black cat sleeping on the old red sofa")
BREAD = ("https://img.example/bread.jpg", "Frisches Brot auf einem Holzbrett")
# (file, crawl date, images of its one page)
CRAWL = {
    # a duplicate within the file (the same key), and a junk alt text the rules drop
    "a": (LATER, [CAT, ("https://IMG.example/cat.jpg#zoom", "a black cat  sleeping on the OLD red sofa"), BREAD,
                  ("https://img.example/x.jpg", "IMG_2034.jpg")]),
    # a later crawl: new pairs, and a later copy of A's bread, which must not replace it
    "b": (LATEST, [("https://img.example/tea.jpg", "Une tasse de thé vert sur la table"), BREAD,
                   ("https://img.example/boat.jpg", "A wooden boat on a calm lake at dawn")]),
    # an older crawl ingested last: an earlier copy of A's cat (another uid, the same key) and a new pair
    "c": (EARLIER, [("https://img.example/cat.jpg", "A BLACK cat sleeping on the old red sofa"),
                    ("https://img.example/fish.jpg", "Fresh fish on a plate with lemon")]),
    "d": (LATEST, [("https://img.example/owl.jpg", "An owl on a branch in the moonlight")]),
}  # fmt: skip


def write_crawl(directory: Path) -> dict[str, str]:
    paths = {}
    for name, (date, images) in CRAWL.items():
        page = WatPage(f"https://site.example/{name}.html", list(images), date=date)
        paths[name] = str(write_wat(directory / f"{name}.wat.gz", [page]))
    return paths


def candidates_by_key(spark, lake: str) -> dict[str, dict]:
    # Without the lineage columns: which run and slice wrote a row differs between runs by design.
    rows = read_table(spark, lake, CANDIDATES).drop("run_id", "ingest_batch").collect()
    assert len(rows) == len({r.dedup_key for r in rows}), "one row per key"
    return {r.dedup_key: r.asDict() for r in rows}


def rows_read(spark, lake: str, run_id: str) -> int:
    """The pairs a run read: its first funnel step's rows in, as stage_stats recorded it."""
    stats = read_table(spark, lake, STAGE_STATS).where(f"run_id = '{run_id}' AND seq = 0").collect()
    assert len(stats) == 1, run_id
    return stats[0].rows_in


def steps(counter) -> dict[str, tuple[int, int]]:
    return {step: (rows_in, rows_out) for step, rows_in, rows_out in counter.steps}


def bookmark_version(spark, lake: str) -> int | None:
    bookmark = read_bookmark(spark, lake, "candidates", PAIRS)
    return None if bookmark is None else bookmark.version


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> dict[str, str]:
    return write_crawl(tmp_path_factory.mktemp("crawl"))


@pytest.fixture(scope="module")
def grown(spark, crawl, tmp_path_factory):
    """One lake grown file by file (A, B, nothing new, C), and one lake built from A and B in one run.

    Built once per module: every run is a few Spark jobs and a Delta MERGE, and the 2-core machine is shared.
    """
    config = Config()
    lake = str(tmp_path_factory.mktemp("grown") / "lake")
    pairs, runs, tables, versions = {}, {}, {}, {}
    for name in ("a", "b"):
        pairs[name] = run_extract(spark, config, lake, [crawl[name]]).pairs_written
        runs[name] = run_candidates(spark, config, lake, run_id=f"after-{name}")
    tables["after_b"] = candidates_by_key(spark, lake)
    versions["before_nothing"] = (latest_version(spark, lake, CANDIDATES), bookmark_version(spark, lake))
    runs["nothing"] = run_candidates(spark, config, lake, run_id="nothing-new")
    versions["after_nothing"] = (latest_version(spark, lake, CANDIDATES), bookmark_version(spark, lake))
    tables["after_nothing"] = candidates_by_key(spark, lake)
    pairs["c"] = run_extract(spark, config, lake, [crawl["c"]]).pairs_written
    runs["c"] = run_candidates(spark, config, lake, run_id="after-c")
    tables["after_c"] = candidates_by_key(spark, lake)

    once = str(tmp_path_factory.mktemp("once") / "lake")
    run_extract(spark, config, once, [crawl["a"], crawl["b"]])
    runs["once"] = run_candidates(spark, config, once, run_id="once")
    tables["once"] = candidates_by_key(spark, once)
    return {"lake": lake, "pairs": pairs, "runs": runs, "tables": tables, "versions": versions}


def test_a_run_after_one_new_file_reads_its_pairs_only_and_stores_what_one_run_over_all_files_stores(spark, grown):
    pairs, lake = grown["pairs"], grown["lake"]
    assert pairs["a"] == 4 and pairs["b"] == 3 and pairs["c"] == 2
    assert rows_read(spark, lake, "after-a") == pairs["a"]
    assert rows_read(spark, lake, "after-b") == pairs["b"]  # not pairs["a"] + pairs["b"]
    assert rows_read(spark, lake, "after-c") == pairs["c"]
    # the dedup within the batch and its count of keys ran over B's rows only: tea, bread, boat
    assert steps(grown["runs"]["b"])["dedup_within_batch"] == (3, 3)
    # against the lake: B's later bread is not written, tea and boat are
    assert steps(grown["runs"]["b"])["dedup_against_lake"] == (3, 2)

    tables = grown["tables"]
    assert tables["after_b"] == tables["once"]  # the same keys, uids, captures and languages
    assert sorted(row["url"] for row in tables["once"].values()) == [
        "https://img.example/boat.jpg",
        "https://img.example/bread.jpg",
        "https://img.example/cat.jpg",
        "https://img.example/tea.jpg",
    ]
    bread = next(row for row in tables["once"].values() if row["url"].endswith("bread.jpg"))
    assert bread["source_file"].endswith("a.wat.gz"), "B's later copy of the bread did not replace A's"


def test_a_run_with_nothing_new_reads_no_pair_and_writes_nothing(spark, grown):
    counter = grown["runs"]["nothing"]
    assert rows_read(spark, grown["lake"], "nothing-new") == 0
    assert counter.steps[0][1:] == (0, 0)
    assert steps(counter)["dedup_against_lake"] == (0, 0)
    assert steps(counter)["detect_language"] == (0, 0)
    versions = grown["versions"]
    assert versions["after_nothing"] == versions["before_nothing"], "no commit to candidates nor to the bookmark"
    assert grown["tables"]["after_nothing"] == grown["tables"]["after_b"]


def test_an_earlier_copy_in_a_new_file_replaces_the_stored_survivor_and_keeps_its_uid(spark, grown):
    before, after = grown["tables"]["after_b"], grown["tables"]["after_c"]
    cat_key = next(key for key, row in before.items() if row["url"] == CAT[0])
    stored, replaced = before[cat_key], after[cat_key]
    # read from C alone, the earlier cat still met the stored one (through the MERGE against all of candidates)
    assert steps(grown["runs"]["c"])["dedup_against_lake"] == (2, 2)
    assert replaced["uid"] == stored["uid"], "images and embeddings stay attached to the key's first uid"
    assert (replaced["text"], replaced["crawl_date"].date(), replaced["source_file"].rsplit("/", 1)[-1]) == (
        "A BLACK cat sleeping on the old red sofa",
        dt.date(2023, 11, 1),
        "c.wat.gz",
    )
    assert stored["source_file"].endswith("a.wat.gz")
    assert len(after) == len(before) + 1  # and C's fish is new
    untouched = {key: row for key, row in after.items() if key in before and key != cat_key}
    assert untouched == {key: row for key, row in before.items() if key != cat_key}


@pytest.fixture(scope="module")
def legacy(spark, crawl, tmp_path_factory):
    """A lake whose pairs were extracted before candidates read a change data feed (the feed off, no bookmark),
    then grown and damaged: a new file, the bookmark deleted, a file extracted again and its change data vacuumed,
    the feed switched off for a while."""
    config = Config()
    lake = str(tmp_path_factory.mktemp("legacy") / "lake")
    ensure_table(spark, lake, PAIRS, PAIRS_SCHEMA, properties={})  # as pairs were created before
    pairs, runs, tables, versions = {}, {}, {}, {}
    pairs["a+b"] = run_extract(spark, config, lake, [crawl["a"], crawl["b"]]).pairs_written
    versions["pairs_before"] = latest_version(spark, lake, PAIRS)
    runs["first"] = run_candidates(spark, config, lake, run_id="first")
    tables["first"] = candidates_by_key(spark, lake)
    versions["first"] = bookmark_version(spark, lake)

    pairs["c"] = run_extract(spark, config, lake, [crawl["c"]]).pairs_written
    runs["c"] = run_candidates(spark, config, lake, run_id="after-c")
    tables["after_c"] = candidates_by_key(spark, lake)

    spark.sql(f"DELETE FROM {table_ref(lake, BOOKMARKS)}")
    runs["no_bookmark"] = run_candidates(spark, config, lake, run_id="no-bookmark")
    versions["no_bookmark"] = (bookmark_version(spark, lake), latest_version(spark, lake, PAIRS))

    # C extracted again (its rows deleted and inserted), then its change data files vacuumed away: Delta finds
    # them missing only when the job reads them
    run_extract(spark, config, lake, [crawl["c"]], force=True)
    spark.sql(f"VACUUM {table_ref(lake, PAIRS)} RETAIN 0 HOURS")
    runs["vacuumed"] = run_candidates(spark, config, lake, run_id="vacuumed")
    versions["vacuumed"] = (bookmark_version(spark, lake), latest_version(spark, lake, PAIRS))

    spark.sql(f"ALTER TABLE {table_ref(lake, PAIRS)} SET TBLPROPERTIES ('{CHANGE_DATA_FEED}' = 'false')")
    pairs["d"] = run_extract(spark, config, lake, [crawl["d"]]).pairs_written
    runs["feed_was_off"] = run_candidates(spark, config, lake, run_id="feed-was-off")
    runs["after_feed_on"] = run_candidates(spark, config, lake, run_id="after-feed-on")
    tables["last"] = candidates_by_key(spark, lake)
    return {"lake": lake, "pairs": pairs, "runs": runs, "tables": tables, "versions": versions}


def test_a_lake_without_bookmark_reads_pairs_whole_once_then_only_new_files(spark, legacy):
    lake, pairs = legacy["lake"], legacy["pairs"]
    assert rows_read(spark, lake, "first") == pairs["a+b"] == 7
    assert len(legacy["tables"]["first"]) == 4
    # the first run switched the change data feed of pairs on, and bookmarked the version that it read
    assert table_detail(spark, lake, PAIRS).properties[CHANGE_DATA_FEED] == "true"
    assert legacy["versions"]["first"] == legacy["versions"]["pairs_before"] + 1
    assert rows_read(spark, lake, "after-c") == pairs["c"] == 2
    assert len(legacy["tables"]["after_c"]) == 5


def test_a_deleted_bookmark_reads_pairs_whole_writes_nothing_new_and_bookmarks_again(spark, legacy):
    lake = legacy["lake"]
    assert rows_read(spark, lake, "no-bookmark") == legacy["pairs"]["a+b"] + legacy["pairs"]["c"]
    assert steps(legacy["runs"]["no_bookmark"])["dedup_against_lake"] == (5, 0)
    bookmark, pairs_version = legacy["versions"]["no_bookmark"]
    assert bookmark == pairs_version


def test_a_vacuumed_change_feed_falls_back_to_reading_pairs_whole(spark, legacy):
    lake = legacy["lake"]
    assert rows_read(spark, lake, "vacuumed") == legacy["pairs"]["a+b"] + legacy["pairs"]["c"]
    assert steps(legacy["runs"]["vacuumed"])["dedup_against_lake"] == (5, 0)
    bookmark, pairs_version = legacy["versions"]["vacuumed"]
    assert bookmark == pairs_version


def test_a_change_feed_switched_off_for_a_while_falls_back_once(spark, legacy):
    lake, pairs = legacy["lake"], legacy["pairs"]
    assert rows_read(spark, lake, "feed-was-off") == pairs["a+b"] + pairs["c"] + pairs["d"]
    assert steps(legacy["runs"]["feed_was_off"])["dedup_against_lake"] == (6, 1)  # the owl
    assert table_detail(spark, lake, PAIRS).properties[CHANGE_DATA_FEED] == "true"
    assert rows_read(spark, lake, "after-feed-on") == 0
    assert len(legacy["tables"]["last"]) == 6


def test_incremental_false_reads_pairs_whole(spark, legacy):
    config = load_config(None, ["candidates.incremental=false"])
    counter = run_candidates(spark, config, legacy["lake"], run_id="whole")
    assert counter.steps[0][1] == sum(legacy["pairs"][name] for name in ("a+b", "c", "d"))
    assert steps(counter)["dedup_against_lake"] == (6, 0)


CATALOG_LAKE = "spark_catalog.laion_incremental_test"


def test_a_catalog_lake_reads_the_change_feed_of_its_managed_pairs_table(spark, crawl):
    config = Config()
    spark.sql(f"DROP SCHEMA IF EXISTS {CATALOG_LAKE} CASCADE")
    try:
        for name in ("a", "b"):
            written = run_extract(spark, config, CATALOG_LAKE, [crawl[name]]).pairs_written
            counter = run_candidates(spark, config, CATALOG_LAKE, run_id=f"catalog-{name}")
            assert counter.steps[0][1] == written
        assert read_table(spark, CATALOG_LAKE, CANDIDATES).count() == 4
    finally:
        spark.sql(f"DROP SCHEMA IF EXISTS {CATALOG_LAKE} CASCADE")
