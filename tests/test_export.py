"""`laion-spark export` against the demo lake, each export read back with its consumers' own libraries:
webdataset for the shards, pyarrow for the LAION parquet, numpy for clip-retrieval's npy files."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_spark.config import ConfigError
from laion_spark.export import run_export
from laion_spark.export.layout import STATE_FILE
from laion_spark.export.schemas import (
    EMBEDDINGS_METADATA_SCHEMA,
    LAION2B_EN_SCHEMA,
    LAION2B_MULTI_SCHEMA,
    LAION400M_SCHEMA,
    WEBDATASET_SCHEMA,
)
from laion_spark.storage.ids import sample_id
from laion_spark.storage.outputs import TEMPORARY_PREFIX
from laion_spark.storage.stats import read_funnel

SAMPLES_PER_SHARD = 7  # the demo's 85 rows: 12 full shards and one of 1


@pytest.fixture(scope="module")
def lake(demo_lake, tmp_path_factory) -> str:
    """A copy of the demo lake: an export records its counts in the lake's stage_stats."""
    copied = tmp_path_factory.mktemp("export-lake") / "lake"
    shutil.copytree(demo_lake.lake, copied)
    return str(copied)


@pytest.fixture(scope="module")
def config(demo_lake):
    config = copy.deepcopy(demo_lake.config)
    config.export.samples_per_shard = SAMPLES_PER_SHARD
    config.export.rows_per_file = 20
    config.export.embeddings_per_file = 30
    return config


@pytest.fixture(scope="module")
def dataset(spark, lake) -> dict[str, dict]:
    rows = spark.read.format("delta").load(f"{lake}/dataset").collect()
    return {row.uid: row.asDict() for row in rows}


@pytest.fixture(scope="module")
def webdataset_export(spark, config, lake, tmp_path_factory):
    out = tmp_path_factory.mktemp("webdataset") / "out"
    result = run_export(spark, config, lake, "webdataset", str(out))
    return out, result


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def shard_files(out: Path, suffix: str) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.endswith(suffix) and not p.name.startswith(TEMPORARY_PREFIX))


def exported_uids(out: Path) -> list[str]:
    return [uid for path in shard_files(out, ".parquet") for uid in pq.read_table(path)["uid"].to_pylist()]


def file_times(out: Path) -> dict[str, tuple[int, bytes]]:
    """name -> (mtime, content digest) of every shard file (the state file aside)."""
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
        for p in out.iterdir()
        if p.name != STATE_FILE
    }


def test_webdataset_package_reads_every_shard_and_sample(webdataset_export, dataset):
    import webdataset as wds

    out, result = webdataset_export
    urls = [str(p) for p in shard_files(out, ".tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))

    assert len(samples) == len(dataset) == result.rows_new == result.rows_total == 85
    assert sorted(s["json"]["uid"] for s in samples) == sorted(dataset)
    for sample in samples:
        meta, row = sample["json"], dataset[sample["json"]["uid"]]
        assert sample["__key__"] == meta["key"]
        assert sample["jpg"].size == (row["width"], row["height"])
        assert sample["txt"] == row["text"] == meta["caption"]
        assert meta["url"] == row["url"] and meta["status"] == "success" and meta["error_message"] is None
        assert meta["similarity"] == pytest.approx(row["similarity"], rel=1e-6)
        assert (meta["language"], meta["nsfw"], meta["punsafe"]) == (row["language"], row["nsfw"], row["punsafe"])
        sizes = ("width", "height", "original_width", "original_height")
        assert [meta[k] for k in sizes] == [row[k] for k in sizes]


def test_webdataset_shards_have_exact_sizes_keys_parquet_and_stats(webdataset_export):
    out, result = webdataset_export
    tars = shard_files(out, ".tar")
    assert [p.name for p in tars] == [f"{n:05d}.tar" for n in range(13)] and result.files_written == 13
    for number, tar in enumerate(tars):
        members = tar_members(tar)
        keys = sorted({name.split(".")[0] for name in members})
        expected = SAMPLES_PER_SHARD if number < 12 else 85 - 12 * SAMPLES_PER_SHARD
        # img2dataset's key: the shard number, then the index in the shard; three members per sample.
        assert keys == [f"{number:05d}{i:04d}" for i in range(expected)]
        assert sorted(members) == sorted(f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt"))
        with tarfile.open(tar) as opened:
            assert all(m.isfile() for m in opened.getmembers())  # plain ustar members, no pax headers
        parquet = pq.read_table(out / f"{number:05d}.parquet")
        assert parquet.schema.equals(WEBDATASET_SCHEMA)
        assert parquet["key"].to_pylist() == keys
        assert parquet.to_pylist() == [json.loads(members[f"{k}.json"]) for k in keys]
        stats = json.loads((out / f"{number:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == expected
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert stats["status_dict"] == {"success": expected}
        assert stats["end_time"] >= stats["start_time"]


def test_exported_image_bytes_round_trip_to_images(spark, lake, webdataset_export):
    out, _ = webdataset_export
    images = {
        row.uid: row for row in spark.read.format("delta").load(f"{lake}/images").where("status = 'success'").collect()
    }
    checked = 0
    for tar in shard_files(out, ".tar"):
        members = tar_members(tar)
        for name, payload in members.items():
            if not name.endswith(".jpg"):
                continue
            meta = json.loads(members[name.replace(".jpg", ".json")])
            image = images[meta["uid"]]
            # The tar holds the stored bytes exactly; the json's sha256 is img2dataset's: the downloaded body's.
            assert hashlib.sha256(payload).hexdigest() == hashlib.sha256(image.image).hexdigest()
            assert meta["sha256"] == image.sha256
            checked += 1
    assert checked == 85


def test_export_is_recorded_in_stage_stats_and_state_file(spark, lake, webdataset_export):
    out, result = webdataset_export
    steps = [(step, rows_in, rows_out) for stage, step, rows_in, rows_out in read_funnel(spark, lake, result.run_id)]
    assert steps == [("webdataset", 85, 85)]
    state = json.loads((out / STATE_FILE).read_text())
    assert state["format"] == "webdataset" and state["rows"] == 85 and state["groups"] == 13
    assert state["rows_per_group"] == SAMPLES_PER_SHARD and state["options"] == {"key_digits": 4}
    assert state["dataset_version"] == result.dataset_version and "63 bits" in state["ids"]


@pytest.mark.parametrize(
    ("fmt", "columns", "schema", "key"),
    [
        ("laion", "multi", LAION400M_SCHEMA, "SAMPLE_ID"),
        ("laion5b", "multi", LAION2B_MULTI_SCHEMA, "hash"),
        ("laion5b", "en", LAION2B_EN_SCHEMA, "hash"),
    ],
)
def test_laion_parquet_has_the_released_columns_and_types(
    spark, config, lake, dataset, tmp_path, fmt, columns, schema, key
):
    config = copy.deepcopy(config)
    config.export.laion5b_columns = columns
    result = run_export(spark, config, lake, fmt, str(tmp_path))
    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{n:05d}.parquet" for n in range(5)] and result.rows_total == 85
    table = pq.read_table(parts)
    assert table.schema.equals(schema), table.schema  # names, order and types
    assert [pq.read_metadata(p).num_rows for p in parts] == [20, 20, 20, 20, 5]
    by_id = {sample_id(uid): row for uid, row in dataset.items()}
    assert sorted(table[key].to_pylist()) == sorted(by_id)
    for record in table.to_pylist():
        row = by_id[record[key]]
        assert (record["URL"], record["TEXT"]) == (row["url"], row["text"])
        assert (record["WIDTH"], record["HEIGHT"]) == (row["original_width"], row["original_height"])
        assert record["similarity"] == pytest.approx(row["similarity"], rel=1e-6)
        if fmt == "laion":
            assert record["NSFW"] == row["nsfw"] and record["LICENSE"] is None
        else:
            assert record["pwatermark"] is None and record["punsafe"] == row["punsafe"]
            assert record.get("LANGUAGE", row["language"]) == row["language"]


def test_embeddings_npy_rows_align_with_metadata(spark, config, lake, tmp_path):
    result = run_export(spark, config, lake, "embeddings", str(tmp_path))
    embeddings = {
        row.uid: row for row in spark.read.format("delta").load(f"{lake}/embeddings").where("status = 'ok'").collect()
    }
    uids = []
    for i in range(3):
        metadata = pq.read_table(tmp_path / "metadata" / f"metadata_{i}.parquet")
        assert metadata.schema.equals(EMBEDDINGS_METADATA_SCHEMA)
        images = np.load(tmp_path / "img_emb" / f"img_emb_{i}.npy")
        texts = np.load(tmp_path / "text_emb" / f"text_emb_{i}.npy")
        assert images.dtype == texts.dtype == np.float16  # the lake rounded its embeddings to float16
        assert images.shape == texts.shape == (metadata.num_rows, 64)
        for j, uid in enumerate(metadata["uid"].to_pylist()):
            np.testing.assert_array_equal(images[j], np.array(embeddings[uid].image_embedding, dtype=np.float16))
            np.testing.assert_array_equal(texts[j], np.array(embeddings[uid].text_embedding, dtype=np.float16))
        uids += metadata["uid"].to_pylist()
    assert result.rows_total == len(uids) == len(set(uids)) == 85 and uids == sorted(uids)


def test_a_grown_lake_adds_new_shards_and_a_takedown_rewrites_only_its_shards(spark, demo_lake, config, tmp_path):
    lake = tmp_path / "lake"
    shutil.copytree(demo_lake.lake, lake)
    table = f"delta.`{lake}/dataset`"
    spark.sql(f"DELETE FROM {table} WHERE uid < '4'")
    out = tmp_path / "out"
    first = run_export(spark, config, str(lake), "webdataset", str(out))
    before = file_times(out)
    assert first.rows_new == first.rows_total < 85

    spark.sql(f"INSERT INTO {table} SELECT * FROM delta.`{demo_lake.lake}/dataset` WHERE uid < '4'")
    grown = run_export(spark, config, str(lake), "webdataset", str(out))
    after = file_times(out)
    assert grown.rows_new == 85 - first.rows_total and grown.rows_total == 85 and grown.files_rewritten == 0
    assert {name: after[name] for name in before} == before  # old shards: same bytes, same mtimes
    assert set(after) - set(before) and grown.files_kept == first.files_total
    uids = exported_uids(out)
    assert len(uids) == len(set(uids)) == 85

    again = run_export(spark, config, str(lake), "webdataset", str(out))
    assert again.rows_new == again.files_written == 0 and file_times(out) == after

    # A takedown: rows leave the dataset; only the shards holding them are written again, without them.
    shard_of = {
        uid: path.name[:5] for path in shard_files(out, ".parquet") for uid in pq.read_table(path)["uid"].to_pylist()
    }
    # Three rows of the shards the lake grew by, and every row of shard 0, which is then written empty.
    gone = sorted(uids)[:3] + [uid for uid, shard in shard_of.items() if shard == "00000"]
    spark.sql(f"DELETE FROM {table} WHERE uid IN ({', '.join(repr(u) for u in gone)})")
    taken_down = run_export(spark, config, str(lake), "webdataset", str(out))
    assert taken_down.rows_removed == len(gone) == 3 + SAMPLES_PER_SHARD and taken_down.rows_new == 0
    changed = {name[:5] for name, stamp in file_times(out).items() if after[name] != stamp}
    assert changed == {shard_of[uid] for uid in gone} and taken_down.files_rewritten == len(changed)
    remaining = exported_uids(out)
    assert not set(gone) & set(remaining) and len(remaining) == len(set(remaining)) == taken_down.rows_total == 75
    assert tar_members(out / "00000.tar") == {} and pq.read_metadata(out / "00000.parquet").num_rows == 0
    assert json.loads((out / "00000_stats.json").read_text())["count"] == 0
    assert "removed from OUT" in taken_down.summary()


def test_a_rerun_after_a_crash_rewrites_the_unfinished_shard_once(spark, config, lake, webdataset_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(webdataset_export[0], out)
    shard_uids = pq.read_table(out / "00003.parquet")["uid"].to_pylist()
    # As if the task writing shard 3 died after publishing its tar and before its parquet, mid-way through a
    # temporary file of its stats.
    (out / "00003.parquet").unlink()
    (out / f"{TEMPORARY_PREFIX}0123456789ab-00003_stats.json").write_bytes(b"{")
    before = file_times(out)

    result = run_export(spark, config, lake, "webdataset", str(out))
    assert result.files_written == 1 and result.rows_new == SAMPLES_PER_SHARD and result.rows_total == 85
    assert result.leftovers_removed == 3  # the temporary, the orphan tar and its stats
    assert not list(out.glob(f"{TEMPORARY_PREFIX}*"))
    assert pq.read_table(out / "00003.parquet")["uid"].to_pylist() == shard_uids  # the same rows, same keys
    assert len(tar_members(out / "00003.tar")) == 3 * SAMPLES_PER_SHARD
    changed = {name for name, stamp in file_times(out).items() if before.get(name) != stamp}
    assert changed == {"00003.tar", "00003_stats.json", "00003.parquet"}
    uids = exported_uids(out)
    assert len(uids) == len(set(uids)) == 85


def test_another_format_into_the_same_out_is_a_config_error(spark, config, lake, webdataset_export):
    with pytest.raises(ConfigError, match="holds a webdataset export"):
        run_export(spark, config, lake, "laion", str(webdataset_export[0]))


def test_cli_export_prints_its_summary(lake, tmp_path, capsys):
    from laion_spark.cli import main

    out = tmp_path / "cli-out"
    code = main(
        ["export", "--lake", lake, "--format", "laion5b", "--out", str(out), "--set", "export.rows_per_file=50"]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"export laion5b -> {out}" in printed and "rows exported now: 85" in printed and "time:" in printed
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]

    code = main(["export", "--lake", lake, "--format", "webdataset", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "holds a laion5b export" in err and "Traceback" not in err


def test_each_file_group_gets_a_task_of_its_own(spark):
    from pyspark.sql import functions as F

    from laion_spark.export.plan import one_task_per_group

    groups = [3, 5, *range(10, 48)]  # gaps and all: the numbers a grown export writes
    rows = spark.range(0, 400).select(
        F.element_at(F.array(*[F.lit(g) for g in groups]), (F.col("id") % len(groups) + 1).cast("int")).alias("group"),
        F.col("id").alias("position"),
    )
    placed = one_task_per_group(rows, groups).select("group", F.spark_partition_id().alias("task")).distinct().collect()
    tasks_of = {row.group: row.task for row in placed}
    assert sorted(tasks_of) == groups and sorted(tasks_of.values()) == list(range(len(groups)))
