"""The audit trail on the demo lake: every pair outside ``dataset`` has a ``rejections`` row saying why, the counts
equal the funnel's, every ``dataset`` row carries its lineage (source record, runs, model checksum, config hashes),
``laion-spark explain`` tells each kind of story, and ``laion-spark dataset`` re-cuts with another chain without
rescoring."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from laion_spark.cli import main
from laion_spark.config import apply_override
from laion_spark.curate.phash import hamming_distance
from laion_spark.storage import read_funnel, read_table
from laion_spark.storage.audit import config_hash, config_of
from laion_spark.storage.delta import latest_version

STAGES = ("extract", "candidates", "download", "score")


def sha256_of(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tables(spark, demo_lake):
    lake = demo_lake.lake
    return {name: read_table(spark, lake, name) for name in ("pairs", "dataset", "rejections", "runs", "images")}


@pytest.fixture(scope="module")
def funnel(spark, demo_lake) -> dict[str, tuple[int, int]]:
    return {f"{stage}.{step}": (rows_in, rows_out) for stage, step, rows_in, rows_out in read_funnel(
        spark, demo_lake.lake, demo_lake.run_id)}  # fmt: skip


def test_runs_record_each_stage_config_hash_and_the_model_checksum(tables, demo_lake):
    runs = {row.stage: row for row in tables["runs"].where(F.col("run_id") == demo_lake.run_id).collect()}
    assert sorted(runs) == sorted(STAGES)
    for stage, row in runs.items():
        assert row.config_hash == config_hash(config_of(demo_lake.config, stage))
    assert runs["score"].model_checksum == sha256_of(demo_lake.config.clip.pretrained)
    assert "tiny-clip" in runs["score"].model


def test_every_dataset_row_carries_its_lineage(tables, demo_lake):
    rows = tables["dataset"].collect()
    assert rows
    expected_hashes = {stage: config_hash(config_of(demo_lake.config, stage)) for stage in STAGES}
    checksum = sha256_of(demo_lake.config.clip.pretrained)
    records = {
        (row.uid, row.source_file, row.record_offset)
        for row in tables["pairs"].select("uid", "source_file", "record_offset").collect()
    }
    for row in rows:
        assert (row.uid, row.source_file, row.record_offset) in records
        assert row.crawl_date is not None
        runs = (row.extract_run_id, row.candidates_run_id, row.download_run_id, row.score_run_id)
        assert runs == (demo_lake.run_id,) * 4
        assert row.model_checksum == checksum
        assert dict(row.config_hashes) == expected_hashes


def test_every_pair_outside_dataset_has_a_rejection_and_no_kept_pair_has_one(tables):
    pairs = {row.uid for row in tables["pairs"].select("uid").distinct().collect()}
    kept = {row.uid for row in tables["dataset"].select("uid").collect()}
    rejected = {row.uid for row in tables["rejections"].select("uid").distinct().collect()}
    assert rejected == pairs - kept
    assert not rejected & kept


def test_rejection_counts_equal_the_funnel(tables, funnel):
    counts = {
        (row.stage, row.step): row["count"] for row in tables["rejections"].groupBy("stage", "step").count().collect()
    }
    assert counts, "the demo removes pairs at several steps"
    for (stage, step), count in counts.items():
        if stage == "candidates" and step != "dedup":
            rows_in, rows_out = funnel[f"candidates.{step}"]
            assert count == rows_in - rows_out, step
        elif stage == "download":
            assert count == funnel[f"download.status:{step}"][1], step
        elif (stage, step) == ("dataset", "threshold"):
            rows_in, rows_out = funnel["score.above_threshold"]
            assert count == rows_in - rows_out
    # The rows the junk_text rule removed are exactly those the rule matches.
    assert counts[("candidates", "junk_text")] > 0 and counts[("dataset", "threshold")] > 0


def explain(capsys, lake: str, *target: str) -> str:
    capsys.readouterr()
    assert main(["explain", "--lake", lake, *target]) in (0, None)
    return capsys.readouterr().out


def test_explain_tells_the_story_of_a_kept_and_of_each_kind_of_removed_pair(capsys, tables, demo_lake):
    lake = demo_lake.lake
    kept = tables["dataset"].orderBy("uid").first()
    story = explain(capsys, lake, "--uid", kept.uid)
    assert f"verdict: IN dataset (similarity {kept.similarity:.4f})" in story
    assert f"{kept.source_file} at offset {kept.record_offset}" in story
    assert f"config {config_hash(config_of(demo_lake.config, 'score'))}" in story
    assert "checkpoint sha256 " + sha256_of(demo_lake.config.clip.pretrained)[:16] in story

    rejections = tables["rejections"]
    for stage, step in (("dataset", "threshold"), ("candidates", "junk_text"), ("download", "too_small")):
        row = rejections.where((F.col("stage") == stage) & (F.col("step") == step)).orderBy("uid").first()
        story = explain(capsys, lake, "--uid", row.uid)
        assert f"verdict: NOT in dataset: removed by {stage}.{step}: {row.detail}" in story
        if step == "threshold":
            assert f"similarity {row.value:.4f} below clip.threshold 0.5" in row.detail
            assert "not in dataset" not in story.split("dataset:")[-1] or "removed by threshold" in story

    by_url = tables["pairs"].groupBy("url").agg(F.countDistinct("uid").alias("n")).where("n > 1").first()
    stories = explain(capsys, lake, "--url", by_url.url)
    assert stories.count("\npair ") + stories.startswith("pair ") == by_url.n

    assert "verdict: unknown to this lake" in explain(capsys, lake, "--uid", "0" * 40)


@pytest.fixture(scope="module")
def recut_lake(spark, demo_lake, tmp_path_factory) -> str:
    lake = str(tmp_path_factory.mktemp("recut") / "lake")
    shutil.copytree(demo_lake.lake, lake)
    return lake


def test_dataset_recut_with_near_dup_follows_the_survivor_rule_without_rescoring(spark, demo_lake, recut_lake):
    distance = 12  # wide enough that the demo's look-alike synthetic images meet within it
    before = latest_version(spark, recut_lake, "embeddings")
    threshold = demo_lake.config.clip.threshold
    code = main(
        ["dataset", "--lake", recut_lake, "--set", "dataset.filters=[threshold,near_dup]"]
        + ["--set", f"dedup.phash_distance={distance}", "--set", f"clip.threshold={threshold}"]
    )
    assert code in (0, None)
    assert latest_version(spark, recut_lake, "embeddings") == before  # nothing rescored

    # The oracle: the pairs over the threshold, ranked; each is dropped when a better one is within distance.
    pool = (
        read_table(spark, recut_lake, "embeddings")
        .where((F.col("status") == "ok") & (F.col("similarity") >= threshold))
        .join(read_table(spark, recut_lake, "images").select("uid", "phash"), "uid")
        .join(read_table(spark, recut_lake, "candidates").select("uid", "crawl_date"), "uid")
        .collect()
    )
    ranked = sorted(pool, key=lambda r: (-r.similarity, r.crawl_date, r.uid))
    expected = {}
    for i, row in enumerate(ranked):
        better = [b for b in ranked[:i] if hamming_distance(b.phash, row.phash) <= distance]
        if better:
            expected[row.uid] = (better[0].uid, hamming_distance(better[0].phash, row.phash))
    assert expected, "no two demo images within the distance: widen it"

    found = {
        row.uid: (row.survivor_uid, int(row.value))
        for row in read_table(spark, recut_lake, "rejections")
        .where((F.col("stage") == "dataset") & (F.col("step") == "near_dup"))
        .collect()
    }
    assert found == expected
    kept = {row.uid for row in read_table(spark, recut_lake, "dataset").collect()}
    assert kept == {row.uid for row in pool} - set(expected)
    steps = {step: (i, o) for stage, step, i, o in read_funnel(spark, recut_lake) if stage == "score"}
    assert steps["dataset.near_dup"] == (len(pool), len(kept))


def test_rejections_off_leaves_the_table_alone(spark, demo_lake, recut_lake):
    config = copy.deepcopy(demo_lake.config)
    for override in ("dataset.rejections=false", "dataset.filters=[threshold]"):
        apply_override(config, override)
    from laion_spark.score import rebuild_dataset

    before = latest_version(spark, recut_lake, "rejections")
    kept, considered = rebuild_dataset(spark, config, recut_lake)
    assert latest_version(spark, recut_lake, "rejections") == before
    assert kept == read_table(spark, recut_lake, "dataset").count() == demo_lake_dataset_count(spark, demo_lake)
    assert considered >= kept


def demo_lake_dataset_count(spark, demo_lake) -> int:
    return read_table(spark, demo_lake.lake, "dataset").count()


def test_an_older_table_gets_todays_columns_and_loses_not_null_where_today_allows_null(spark, tmp_path):
    """A lake written by an older laion_spark: ``dataset.nsfw`` created NOT NULL and no ``phash``. Today's rows
    (no NSFW tag without a competent model) must still be writable after ensure_table."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    from laion_spark.storage import ensure_table, table_ref

    lake = str(tmp_path / "lake")
    older = StructType([StructField("uid", StringType(), False), StructField("nsfw", StringType(), False)])
    ensure_table(spark, lake, "dataset", older, properties={})
    with pytest.raises(Exception, match="(?i)null"):
        spark.sql(f"INSERT INTO {table_ref(lake, 'dataset')} VALUES ('a', NULL)").collect()

    today = StructType([*older.fields[:1], StructField("nsfw", StringType(), True), StructField("phash", LongType())])
    ensure_table(spark, lake, "dataset", today)
    spark.sql(f"INSERT INTO {table_ref(lake, 'dataset')} VALUES ('b', NULL, 7)").collect()
    table = read_table(spark, lake, "dataset")
    assert {f.name: f.nullable for f in table.schema.fields} == {"uid": False, "nsfw": True, "phash": True}
    assert [tuple(row) for row in table.collect()] == [("b", None, 7)]
