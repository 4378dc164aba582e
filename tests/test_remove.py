"""`laion-spark remove` on a copy of the demo lake: every key kind reaches every table, the index and the next
export, and nothing removed comes back (re-extraction, a new crawl, the same image bytes under a new URL).

The tests share one copied lake, each removing pairs of its own (victims whose URL, image hashes and pHash no other
victim shares), so their counts do not overlap; the vacuum test runs last."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from laion_spark.candidates import run_candidates
from laion_spark.cli import main
from laion_spark.curate.phash import phash_hex
from laion_spark.download import run_download
from laion_spark.export import run_export
from laion_spark.extract import run_extract
from laion_spark.index import index_location, run_index
from laion_spark.index.store import open_index
from laion_spark.remove import BlockItem, normalize_item, read_list_file, run_remove
from laion_spark.remove.stage import TABLES
from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, PAIRS, REMOVALS
from laion_spark.score import run_score
from laion_spark.storage import latest_version, read_table
from laion_spark.storage.ids import sample_id
from laion_spark.storage.outputs import TEMPORARY_PREFIX
from laion_spark.testing.archives import WatPage, write_wat
from laion_spark.testing.server import serve_synthetic_images

SAMPLES_PER_SHARD = 7
VICTIMS = 12


@dataclass
class World:
    lake: str
    config: object
    export: Path
    crawl: Path
    root: Path
    victims: list[dict]  # dataset rows with their image hashes, none sharing a url, sha256, md5 or pHash


@pytest.fixture(scope="module")
def world(spark, demo_lake, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("remove")
    lake = root / "lake"
    shutil.copytree(demo_lake.lake, lake)
    config = copy.deepcopy(demo_lake.config)
    config.export.samples_per_shard = SAMPLES_PER_SHARD
    run_index(spark, config, str(lake))
    export = root / "webdataset"
    run_export(spark, config, str(lake), "webdataset", str(export))
    images = read_table(spark, str(lake), IMAGES).select("uid", "sha256", "md5", "phash")
    rows = [r.asDict() for r in read_table(spark, str(lake), DATASET).join(images, "uid").orderBy("uid").collect()]
    all_images = read_table(spark, str(lake), IMAGES).select("url", "sha256", "md5", "phash").collect()
    victims, taken = [], set()
    for row in rows:
        # Every images row with one of this row's keys: a removal by any of them takes those pairs too.
        keys = {("url", row["url"]), ("sha256", row["sha256"]), ("md5", row["md5"]), ("phash", row["phash"])}
        related = {(k, img[k]) for img in all_images for k in ("url", "sha256", "md5", "phash") if (k, img[k]) in keys}
        closure = keys | {
            (k, img[k])
            for img in all_images
            if any((kk, img[kk]) in related for kk in ("url", "sha256", "md5", "phash"))
            for k in ("url", "sha256", "md5", "phash")
        }
        if closure & taken or row["md5"] is None:
            continue
        taken |= closure
        victims.append(row)
        if len(victims) == VICTIMS:
            break
    assert len(victims) == VICTIMS, "the demo lake has too few pairs with images of their own"
    return World(str(lake), config, export, Path(demo_lake.lake).parent / "crawl", root, victims)


def counts(spark, lake: str) -> dict[str, int]:
    return {table: read_table(spark, lake, table).count() for table in TABLES}


def rows_of(spark, lake: str, uid: str) -> dict[str, int]:
    return {table: read_table(spark, lake, table).where(F.col("uid") == uid).count() for table in TABLES}


def index_holds(world: World, uid: str) -> bool:
    index = open_index(index_location(world.lake, world.config.index.path))
    return bool(index.metadata([sample_id(uid)]))


def assert_counts_printed(spark, world: World, before: dict[str, int], result) -> None:
    after = counts(spark, world.lake)
    assert {t: before[t] - after[t] for t in TABLES} == result.rows_removed  # counts are the rows removed
    assert result.index.removed == result.rows_removed[DATASET]  # every dataset row had its vectors indexed
    summary = result.summary()
    for table in TABLES:
        assert f"{table:<12} {result.rows_removed[table]:>10,} row(s) removed" in summary
    assert f"{result.index.removed:>10,} vector(s) removed" in summary


def remove(spark, world: World, items: list[BlockItem], **kwargs):
    return run_remove(spark, world.config, world.lake, items, "test takedown", **kwargs)


KINDS_BY_VICTIM = {0: "url", 1: "uid", 2: "sha256", 3: "md5", 4: "phash", 5: "phash_signed"}


def test_each_key_kind_removes_its_pair_from_every_table_and_the_index(spark, world):
    """One takedown of six items, one of each key kind (a pHash both as 16 hex digits and as a signed number), each
    naming a victim of its own: every victim is gone from every table and the index, and the counts printed are
    the rows that left each table."""
    items, victims = [], []
    for number, kind in KINDS_BY_VICTIM.items():
        row = world.victims[number]
        assert index_holds(world, row["uid"])
        value = {
            "url": row["url"],
            "uid": row["uid"],
            "sha256": row["sha256"],
            "md5": row["md5"],
            "phash": phash_hex(row["phash"]),
            "phash_signed": str(row["phash"]),
        }[kind]
        items.append(normalize_item(value, kind.removesuffix("_signed")))
        victims.append(row["uid"])
    before = counts(spark, world.lake)
    result = remove(spark, world, items)
    for uid in victims:
        assert rows_of(spark, world.lake, uid) == dict.fromkeys(TABLES, 0), uid
        assert not index_holds(world, uid), uid
    assert_counts_printed(spark, world, before, result)
    assert result.rows_removed[DATASET] >= len(victims) and result.rows_removed[EMBEDDINGS] >= len(victims)
    recorded = read_table(spark, world.lake, REMOVALS).where(F.col("run_id") == result.run_id).collect()
    assert sorted((r.kind, r.reason) for r in recorded) == sorted(
        (kind.removesuffix("_signed"), "test takedown") for kind in KINDS_BY_VICTIM.values()
    )
    assert all(r.removed_by and r.removed_at is not None for r in recorded)


def test_cli_list_file_with_plain_values_and_url_md5_hashes_and_malformed_lines(spark, world, capsys):
    plain, hashed = world.victims[6], world.victims[7]
    listed = world.root / "takedown.txt"
    listed.write_text(
        "# a child-safety list\n"
        f"{plain['url']}\n"
        "\n"
        f"url_md5:{hashlib.md5(hashed['url'].encode()).hexdigest().upper()}\n"
        "not a value at all\n"
        f"{'ab' * 16}\n"  # 32 hex digits with no kind: an image or a URL, it cannot say
        f"url:{plain['url']}\n"  # the same item again: recorded once
    )
    parsed = read_list_file(listed)
    assert [item.kind for item in parsed.items] == ["url", "url_md5"]
    assert [m.number for m in parsed.malformed] == [5, 6] and parsed.lines == 5
    before = counts(spark, world.lake)
    code = main(["remove", "--lake", world.lake, "--list", str(listed), "--reason", "Re-LAION list 2024-08"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 item(s) recorded in removals (1 url, 1 url_md5)" in out
    assert "2 of 5 line(s) malformed, skipped" in out and "line 5:" in out and "line 6:" in out
    after = counts(spark, world.lake)
    for table in TABLES:
        assert f"{table:<12} {before[table] - after[table]:>10,} row(s) removed" in out
    for row in (plain, hashed):
        assert rows_of(spark, world.lake, row["uid"]) == dict.fromkeys(TABLES, 0)
        assert not index_holds(world, row["uid"])


def test_an_item_that_matches_nothing_is_still_recorded_and_blocks(spark, world):
    before = counts(spark, world.lake)
    url = "http://nowhere.example/never-crawled.jpg"
    result = remove(spark, world, [normalize_item(url, "url")])
    assert result.rows_removed == dict.fromkeys(TABLES, 0) and result.uids == 0
    assert counts(spark, world.lake) == before
    assert read_table(spark, world.lake, REMOVALS).where(F.col("value") == url).count() == 1


def shard_files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
        for p in out.iterdir()
        if not p.name.startswith(TEMPORARY_PREFIX) and p.name[0].isdigit()
    }


def test_next_export_rewrites_only_the_shard_that_held_the_removed_row(spark, world):
    run_export(spark, world.config, world.lake, "webdataset", str(world.export))  # after the tests before this one
    victim = world.victims[8]["uid"]
    holding = [p for p in world.export.glob("*.parquet") if victim in pq.read_table(p)["uid"].to_pylist()]
    assert len(holding) == 1
    shard = holding[0].name.removesuffix(".parquet")
    before = shard_files(world.export)
    remove(spark, world, [normalize_item(victim, "uid")])
    result = run_export(spark, world.config, world.lake, "webdataset", str(world.export))
    after = shard_files(world.export)
    changed = {name for name in before if after.get(name) != before[name]}
    assert changed == {f"{shard}.tar", f"{shard}.parquet", f"{shard}_stats.json"}
    assert set(after) == set(before)
    assert (result.rows_removed, result.files_rewritten, result.rows_new) == (1, 1, 0)
    assert victim not in pq.read_table(world.export / f"{shard}.parquet")["uid"].to_pylist()
    with tarfile.open(world.export / f"{shard}.tar") as tar:
        uids = [json.load(tar.extractfile(m))["uid"] for m in tar.getmembers() if m.name.endswith(".json")]
    assert uids and victim not in uids


def test_reextracting_the_same_archives_and_a_new_crawl_do_not_bring_a_removed_url_back(spark, world):
    row = world.victims[9]
    remove(spark, world, [normalize_item(row["url"], "url")])
    run_extract(spark, world.config, world.lake, [str(world.crawl / "*")], force=True)
    new_crawl = world.root / "new-crawl"
    new_crawl.mkdir()
    other_url = "http://127.0.0.1:9/img/never-removed.jpg"
    page = WatPage(
        "http://site.example/new-page.html",
        [(row["url"], "the same picture under a brand new caption"), (other_url, "a caption of an image kept")],
    )
    write_wat(new_crawl / "new.warc.wat.gz", [page])
    result = run_extract(spark, world.config, world.lake, [str(new_crawl / "new.warc.wat.gz")])
    assert result.pairs_removed == 1 and result.pairs_written == 1  # the other image of the page is kept
    run_candidates(spark, world.config, world.lake)
    for table in (PAIRS, CANDIDATES):
        urls = read_table(spark, world.lake, table).select("url")
        assert urls.where(F.col("url") == row["url"]).count() == 0
        assert urls.where(F.col("url") == other_url).count() == 1


def test_the_same_image_bytes_under_a_new_url_are_withheld_at_download(spark, world):
    row = world.victims[10]
    remove(spark, world, [normalize_item(row["md5"], "md5")])
    server, base_url = serve_synthetic_images()
    try:
        mirror = f"{base_url}{urlsplit(row['url']).path}?mirror=1"  # the server draws the same bytes for the path
        crawl = world.root / "mirror-crawl"
        crawl.mkdir()
        write_wat(crawl / "mirror.warc.wat.gz", [WatPage("http://mirror.example/", [(mirror, "a mirrored copy")])])
        config = copy.deepcopy(world.config)
        config.download.allowed_hosts = [urlsplit(base_url).netloc]
        run_extract(spark, config, world.lake, [str(crawl / "mirror.warc.wat.gz")])
        run_candidates(spark, config, world.lake)
        run_download(spark, config, world.lake)
        assert server.hits  # it was fetched: only its bytes tell that it is the removed image
    finally:
        server.shutdown()
    fetched = read_table(spark, world.lake, IMAGES).where(F.col("url") == mirror).collect()
    assert [(r.status, r.image, r.md5) for r in fetched] == [("removed", None, row["md5"])]
    run_score(spark, config, world.lake)
    for table in (EMBEDDINGS, DATASET):
        assert read_table(spark, world.lake, table).where(F.col("uid") == fetched[0].uid).count() == 0


def test_vacuum_purges_the_old_files_and_time_travel_with_them(spark, world):
    row = world.victims[11]
    version = latest_version(spark, world.lake, PAIRS)
    result = remove(spark, world, [normalize_item(row["uid"], "uid")], vacuum=True)
    assert set(result.vacuumed) == {t for t, n in result.rows_removed.items() if n}
    assert PAIRS in result.vacuumed and "time travel" in result.summary()
    with pytest.raises(Exception):  # noqa: B017 - Delta's error class differs between versions
        old = spark.read.format("delta").option("versionAsOf", version).load(f"{world.lake}/{PAIRS}")
        old.where(F.col("uid") == row["uid"]).select("text").collect()  # a count() is answered from the log alone
    assert rows_of(spark, world.lake, row["uid"]) == dict.fromkeys(TABLES, 0)
