"""Eval-set decontamination and DataComp's image-cluster filter, on the demo lake's real images and the tiny CLIP.

The eval sets are written per test module: a pool image's original bytes (as the demo's server sent them) in a folder, re-encoded copies of it (JPEG
quality 70, resized) in a WebDataset shard and in an img2dataset-style parquet file, a crop of it (a copy whose pHash
moves but whose embedding stays close), and images unlike anything the synthetic pool holds (noise, a gradient, a
checkerboard) beside a file that is not an image.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pyspark.sql import functions as F

from laion_spark.config import ConfigError
from laion_spark.curate.decontaminate import (
    EMBEDDING,
    PHASH,
    best_matches,
    contaminated,
    drop_contaminated,
    phash_matches,
)
from laion_spark.curate.eval_sets import load_signatures, read_image_sources, shard_images
from laion_spark.curate.image_cluster import drop_rejected, keep_reference_clusters, reference_clusters
from laion_spark.curate.kmeans import train_kmeans
from laion_spark.curate.phash import hamming_distance, phash
from laion_spark.download.images import to_rgb
from laion_spark.schemas import EMBEDDINGS, IMAGES
from laion_spark.storage import read_table
from laion_spark.testing import synthetic
from laion_spark.testing.server import synthetic_image_bytes

MAX_DISTANCE = 4
MIN_COSINE = 0.95


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def pool(spark, demo_lake):
    """uid, url, phash, image_embedding of every scored pool image."""
    images = read_table(spark, demo_lake.lake, IMAGES).where(F.col("status") == "success")
    embeddings = read_table(spark, demo_lake.lake, EMBEDDINGS).where(F.col("status") == "ok")
    rows = images.select("uid", "url", "phash").join(embeddings.select("uid", "image_embedding"), "uid")
    return rows.localCheckpoint()


def _copies(original: Image.Image) -> dict[str, bytes]:
    """What the eval sets hold of the planted image besides its own bytes: a resized JPEG at quality 70 (the
    WebDataset and parquet sets) and a crop (a copy whose pHash moves but whose embedding stays close)."""
    return {
        "reencoded": _jpeg(original.resize((200, 200), Image.Resampling.BICUBIC), quality=70),
        "cropped": _jpeg(original.crop((20, 20, original.width - 20, original.height - 20))),
    }


def _original_bytes(url: str) -> bytes | None:
    """The bytes the demo's server sent for ``url`` (``/img/{slug}-{seed}.{ext}``): drawn again, deterministically."""
    name = url.rsplit("/", 1)[-1]
    stem, _, ext = name.rpartition(".")
    slug, _, seed = stem.rpartition("-")
    return synthetic_image_bytes(slug, int(seed), ext) if seed.isdigit() else None


@pytest.fixture(scope="module")
def planted(pool):
    """(uid, original bytes) of the pool image that the eval sets copy, as an eval set would hold it: the picture as
    the web served it, not our resized copy.

    Flat synthetic drawings have many DCT coefficients near the median, so for some of them a re-encode moves the
    pHash by 16 bits or more (as far as our 256 px copy moves it). The image planted is the first by uid whose pHash
    the test's own re-encode keeps within the distance, so that the tests exercise the matching, not the hash's
    stability on flat images; its pHash in ``images`` must be the original's (the download hashes before resizing).
    """
    for row in pool.select("uid", "url", "phash").orderBy("uid").limit(200).collect():
        original = _original_bytes(row["url"])
        if original is None:
            continue
        image = to_rgb(Image.open(io.BytesIO(original)))
        reencoded = to_rgb(Image.open(io.BytesIO(_copies(image)["reencoded"])))
        if hamming_distance(phash(image), phash(reencoded)) < MAX_DISTANCE:
            assert row["phash"] == phash(image), f"images.phash of {row['url']} is not its original's"
            return row["uid"], original
    pytest.fail("no pool image whose pHash survives a re-encode: the demo's images changed")


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory, planted):
    _, image_bytes = planted
    root = tmp_path_factory.mktemp("eval_sets")
    original = to_rgb(Image.open(io.BytesIO(image_bytes)))
    copies = _copies(original)
    reencoded = copies["reencoded"]

    folder = root / "folder"
    folder.mkdir()
    (folder / "planted.jpg").write_bytes(image_bytes)

    shards = root / "webdataset"
    shards.mkdir()
    _tar(shards / "00000.tar", {"000000007.jpg": reencoded, "000000007.txt": b"a caption", "000000007.cls": b"3"})

    parquet = root / "parquet"
    parquet.mkdir()
    table = pa.table({"key": ["000000011"], "caption": ["x"], "jpg": pa.array([reencoded], pa.binary())})
    pq.write_table(table, parquet / "00000.parquet")

    cropped = root / "cropped"
    cropped.mkdir()
    (cropped / "crop.jpg").write_bytes(copies["cropped"])

    unrelated = root / "unrelated"
    (unrelated / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    (unrelated / "noise.jpg").write_bytes(_jpeg(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))))
    ramp = np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    (unrelated / "nested" / "gradient.png").write_bytes(_png(Image.fromarray(ramp)))
    checker = (((np.indices((256, 256)).sum(0) // 32) % 2) * 255).astype(np.uint8)
    (unrelated / "checker.JPG").write_bytes(_jpeg(Image.fromarray(checker).convert("RGB")))
    (unrelated / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (unrelated / "README.txt").write_text("not an image, and not named like one: not read")
    return {
        "folder": str(folder),
        "webdataset": str(shards),
        "parquet": str(parquet / "00000.parquet"),
        "cropped": str(cropped),
        "unrelated": str(unrelated),
    }


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def signatures(spark, demo_lake, eval_sets):
    """Every eval set's signatures, computed once (one CLIP pass) for the whole module."""
    return load_signatures(spark, list(eval_sets.values()), demo_lake.config.clip, what="dedup.eval_sets")


def _only(signatures, source: str):
    return signatures.rows.where(F.col("source") == source)


def test_read_image_sources_names_each_image_by_its_source_and_key(spark, eval_sets):
    rows = read_image_sources(spark, list(eval_sets.values())).select("source", "image_id").collect()
    found = {(row["source"], row["image_id"]) for row in rows}
    assert found == {
        (eval_sets["folder"], "planted.jpg"),
        (eval_sets["webdataset"], "000000007"),  # the sample key; the .txt and .cls members are not images
        (eval_sets["parquet"], "000000011"),  # img2dataset's key column, its jpg column the image
        (eval_sets["cropped"], "crop.jpg"),
        (eval_sets["unrelated"], "noise.jpg"),
        (eval_sets["unrelated"], "nested/gradient.png"),
        (eval_sets["unrelated"], "checker.JPG"),
        (eval_sets["unrelated"], "broken.jpg"),
    }


def test_undecodable_eval_image_is_counted_and_skipped(signatures, eval_sets):
    unrelated = eval_sets["unrelated"]
    assert signatures.images[unrelated] == 4
    assert signatures.undecodable == {path: (1 if path == unrelated else 0) for path in eval_sets.values()}
    names = {row["image_id"] for row in _only(signatures, unrelated).select("image_id").collect()}
    assert names == {"noise.jpg", "nested/gradient.png", "checker.JPG"}
    kept = _only(signatures, unrelated).where(F.col("phash").isNull() | F.col("image_embedding").isNull())
    assert kept.count() == 0


def test_missing_eval_set_is_a_config_error(spark, tmp_path):
    missing = str(tmp_path / "no-such-eval-set")
    with pytest.raises(ConfigError, match="dedup.eval_sets .*no-such-eval-set.* does not exist"):
        read_image_sources(spark, [missing], what="dedup.eval_sets")


def test_folder_without_images_is_a_config_error(spark, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="holds no image files"):
        read_image_sources(spark, [str(tmp_path)])


@pytest.mark.parametrize(
    ("eval_set", "eval_image"),
    [("folder", "planted.jpg"), ("webdataset", "000000007"), ("parquet", "000000011")],
)
def test_planted_copy_is_found_by_phash_and_names_its_eval_set(
    pool, planted, signatures, eval_sets, eval_set, eval_image
):
    uid, _ = planted
    found = contaminated(pool, _only(signatures, eval_sets[eval_set]), MAX_DISTANCE, MIN_COSINE)
    rows = {row["uid"]: row for row in found.collect()}
    assert uid in rows
    row = rows[uid]
    assert (row["eval_set"], row["eval_image"], row["match"]) == (eval_sets[eval_set], eval_image, PHASH)
    assert row["distance"] <= MAX_DISTANCE
    assert row["cosine"] >= MIN_COSINE  # the same picture: the embeddings agree too


def test_every_copy_is_a_phash_match_and_the_closest_is_named(pool, planted, signatures, eval_sets):
    uid, _ = planted
    copies = [eval_sets[name] for name in ("folder", "webdataset", "parquet")]
    pairs = phash_matches(pool, signatures.rows, MAX_DISTANCE).where(F.col("uid") == uid).collect()
    assert {row["eval_set"] for row in pairs} >= set(copies)
    found = contaminated(pool, signatures.rows, MAX_DISTANCE, MIN_COSINE)
    assert found.groupBy("uid").count().where(F.col("count") > 1).count() == 0  # one row per contaminated uid
    row = found.where(F.col("uid") == uid).first()
    assert row["match"] == PHASH
    assert row["distance"] == min(r["distance"] for r in pairs)


def test_copy_is_found_by_embedding_when_the_phash_test_is_off(pool, planted, signatures, eval_sets):
    uid, _ = planted
    folder = _only(signatures, eval_sets["folder"])
    row = contaminated(pool, folder, -1, MIN_COSINE).where(F.col("uid") == uid).first()
    assert row is not None
    assert (row["eval_set"], row["eval_image"], row["match"]) == (eval_sets["folder"], "planted.jpg", EMBEDDING)
    assert row["distance"] is None
    assert row["cosine"] >= 0.99


def test_unrelated_eval_images_match_nothing(pool, signatures, eval_sets):
    found = contaminated(pool, _only(signatures, eval_sets["unrelated"]), MAX_DISTANCE, MIN_COSINE)
    assert found.count() == 0


def test_drop_contaminated_removes_exactly_the_found_uids(pool, planted, signatures):
    found = contaminated(pool, signatures.rows, MAX_DISTANCE, MIN_COSINE)
    kept = drop_contaminated(pool, found)
    assert kept.count() == pool.count() - found.count()
    assert kept.where(F.col("uid") == planted[0]).count() == 0


def test_best_matches_agrees_with_a_plain_argmax_across_blocks(monkeypatch):
    import laion_spark.curate.decontaminate as decontaminate

    monkeypatch.setattr(decontaminate, "POOL_BLOCK_ROWS", 7)
    monkeypatch.setattr(decontaminate, "EVAL_BLOCK_ROWS", 5)
    rng = np.random.default_rng(1)
    pool_vectors = rng.normal(size=(23, 8)).astype(np.float32)
    eval_vectors = rng.normal(size=(17, 8)).astype(np.float32)
    best, where = best_matches(pool_vectors, eval_vectors)
    scores = pool_vectors @ eval_vectors.T
    np.testing.assert_array_equal(where, scores.argmax(axis=1))
    np.testing.assert_allclose(best, scores.max(axis=1), rtol=1e-6)


def test_damaged_shard_keeps_the_images_before_the_damage(tmp_path):
    shard = tmp_path / "00000.tar"
    _tar(shard, {"a.jpg": b"1" * 3000, "a.txt": b"x", "b.png": b"2" * 3000, "c.webp": b"3" * 3000})
    content = shard.read_bytes()
    keys, images = shard_images(str(shard), content[:6000])  # cut inside b.png's data (a.jpg and a.txt end at 4608)
    assert keys == ["a"]
    assert images == [b"1" * 3000]
    assert shard_images(str(shard), content)[0] == ["a", "b", "c"]


def test_reference_images_of_one_class_keep_that_class_cluster(spark, demo_lake, pool, tmp_path):
    """DataComp's filter with new drawings of one synthetic class as the reference set.

    The tiny model separates colour and shape well (same class: median cosine 0.97; different classes: about 0),
    so with 24 clusters over the ~370 pool images a class sits in one or two clusters: its own rows are kept and
    the large majority of the others are rejected. Some others share a cluster with the class (a similar colour
    or shape), so the assertion is a majority, not an exact set.
    """
    kind = synthetic.SyntheticImage("orange", "circle", "pale blue")
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    for seed in range(8):
        (reference_dir / f"{seed}.jpg").write_bytes(synthetic.encode(synthetic.draw(kind, seed=1000 + seed)))
    reference = load_signatures(spark, [str(reference_dir)], demo_lake.config.clip, what="image_cluster.reference")

    centroids = train_kmeans(pool, "image_embedding", 24, 10_000)
    clusters = reference_clusters(reference.rows, centroids)
    assert 1 <= clusters.count() <= 3
    assert clusters.agg(F.sum("references")).first()[0] == 8
    rejected = keep_reference_clusters(pool, centroids, clusters)
    assert set(rejected.columns) >= {"uid", "cluster"}

    in_class = F.col("url").contains(f"/img/{kind.slug}-")
    marked = pool.join(rejected.select("uid", F.lit(True).alias("rejected")), "uid", "left")
    counts = marked.groupBy(in_class.alias("in_class")).agg(
        F.count(F.lit(1)).alias("rows"), F.count("rejected").alias("rejected")
    )
    by_class = {row["in_class"]: (row["rows"], row["rejected"]) for row in counts.collect()}
    class_rows, class_rejected = by_class[True]
    other_rows, other_rejected = by_class[False]
    assert class_rows >= 3
    assert class_rejected <= class_rows * 0.2
    assert other_rejected >= other_rows * 0.8

    # The same clusters given as a list of ids reject the same rows; drop_rejected leaves the rest.
    ids = [row["cluster"] for row in clusters.collect()]
    assert keep_reference_clusters(pool, centroids, ids).count() == rejected.count()
    assert drop_rejected(pool, rejected).count() == pool.count() - rejected.count()
