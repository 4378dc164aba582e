"""Near-duplicate images: pHash in the download workers, the banded pHash join and SemDeDup, on real Spark."""

from __future__ import annotations

import datetime as dt
import io
import itertools

import imagehash
import numpy as np
import pytest
from image_server import quick_download_config
from PIL import Image

from laion_spark.curate.kmeans import assign_clusters, default_clusters, train_kmeans
from laion_spark.curate.near_dup import (
    drop_duplicates_found,
    phash_bands,
    phash_duplicates,
    semdedup_duplicates,
)
from laion_spark.curate.phash import hamming_distance, phash, phash_hex, to_signed
from laion_spark.download import FetchSettings, ImageSettings, fetch_images, status
from laion_spark.download.images import process_image
from laion_spark.testing.server import serve_synthetic_images, synthetic_image_bytes
from laion_spark.testing.synthetic import SyntheticImage, draw, encode

PHASH_DISTANCE = 4  # NearDupConfig.phash_distance's default
ROWS_SCHEMA = "uid string, phash long, similarity float, crawl_date timestamp"
# Lenient size rules: the test images are what they are, the checks are the download tests' business.
SETTINGS = ImageSettings(min_image_bytes=0)
DAY = dt.datetime(2023, 5, 1)


def scene(seed: int, size: int = 480) -> Image.Image:
    """A photo-like image: smooth random colour waves with grain (pHash keeps its low frequencies)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.full((size, size, 3), 128.0)
    for channel in range(3):
        for _ in range(6):
            fx, fy, phase = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 2 * np.pi)
            pixels[..., channel] += rng.uniform(20, 60) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def downloaded_phash(image: Image.Image, quality: int = 95) -> int:
    """The pHash the download worker records for ``image`` served as a JPEG."""
    checked = process_image(encode(image, quality=quality), SETTINGS)
    assert checked.status == status.SUCCESS and checked.phash is not None
    return checked.phash


def copies(image: Image.Image) -> dict[str, Image.Image]:
    """What the web does to a picture: resized, recompressed (quality 60), cropped by 2.5% a side, all three."""
    width, height = image.size
    margin_x, margin_y = int(width * 0.025), int(height * 0.025)
    cropped = image.crop((margin_x, margin_y, width - margin_x, height - margin_y))
    return {
        "resized": image.resize((width * 2 // 3, height * 2 // 3), Image.Resampling.BICUBIC),
        "jpeg60": Image.open(io.BytesIO(encode(image, quality=60))).convert("RGB"),
        "cropped": cropped,
        "all": Image.open(io.BytesIO(encode(cropped.resize((width // 2, height // 2)), quality=60))).convert("RGB"),
    }


def found(duplicates) -> dict[str, tuple]:
    # A test-sized result: the handful of rows to drop.
    return {row[0]: tuple(row[1:]) for row in duplicates.collect()}


def test_phash_is_imagehash_phash_on_real_images() -> None:
    images = [scene(seed) for seed in range(4)]
    images += [draw(SyntheticImage(c, s, "gray"), 320, seed=3) for c, s in [("red", "circle"), ("blue", "stripes")]]
    images.append(Image.open(io.BytesIO(encode(scene(9), quality=40))))
    images.append(scene(5).convert("L"))
    for image in images:
        assert phash_hex(phash(image)) == str(imagehash.phash(image))


def test_download_worker_hashes_the_decoded_image_before_it_is_resized() -> None:
    original = scene(0, size=900)
    body = encode(original, fmt="PNG")  # lossless: the worker decodes exactly ``original``
    checked = process_image(body, SETTINGS)
    assert checked.status == status.SUCCESS and (checked.width, checked.height) == (256, 256)
    assert checked.phash == phash(original)
    assert process_image(b"not an image" * 1000, SETTINGS).phash is None


def test_download_writes_the_phash_of_each_image_and_null_for_failures(spark) -> None:
    server, base_url = serve_synthetic_images()
    try:
        rows = [("ok", f"{base_url}/img/red-circle-gray-4.jpg"), ("missing", f"{base_url}/img/no-such-thing-1.jpg")]
        config = quick_download_config(threads=2, allowed_hosts=[f"127.0.0.1:{server.server_port}"])
        frame = spark.createDataFrame(rows, "uid string, url string").coalesce(1)
        fetched = fetch_images(frame, FetchSettings.from_config(config), ImageSettings.from_config(config))
        written = {row.uid: (row.status, row.phash) for row in fetched.select("uid", "status", "phash").collect()}
    finally:
        server.shutdown()
    served = Image.open(io.BytesIO(synthetic_image_bytes("red-circle-gray", 4, "jpg")))
    assert written["ok"] == (status.SUCCESS, phash(served.convert("RGB")))
    assert written["missing"][0] != status.SUCCESS and written["missing"][1] is None


def test_copies_of_an_image_collapse_onto_the_best_ranked_one_and_lookalikes_stay(spark) -> None:
    # A 2.5% crop moves pHash bits (4 to 10 on these scenes, measured): scene 5 is one that stays within 4.
    originals = {"scene": scene(5), "cross": draw(SyntheticImage("red", "cross", "gray"), 480, seed=1)}
    rows, expected = [], {}
    for name, original in originals.items():
        kept = downloaded_phash(original)
        rows.append((name, kept, 0.35, DAY))
        for number, (how, copy) in enumerate(copies(original).items()):
            copy_hash = downloaded_phash(copy)
            distance = hamming_distance(kept, copy_hash)
            assert distance <= PHASH_DISTANCE, f"{name} {how} is {distance} bits away"
            rows.append((f"{name}-{how}", copy_hash, 0.30 - number * 0.01, DAY))
            expected[f"{name}-{how}"] = (name, distance)
    # Look-alikes: other scenes, the same cross in other colours, other shapes at the same place, and the same
    # cross drawn again elsewhere.
    lookalikes = [scene(seed) for seed in (1, 2, 3)]
    lookalikes += [draw(SyntheticImage(c, "cross", "gray"), 480, seed=1) for c in ("blue", "green")]
    lookalikes += [draw(SyntheticImage("red", s, "gray"), 480, seed=1) for s in ("square", "star")]
    lookalikes.append(draw(SyntheticImage("red", "cross", "gray"), 480, seed=2))
    for number, image in enumerate(lookalikes):
        rows.append((f"lookalike-{number}", downloaded_phash(image), 0.2, DAY))
    for (uid_a, hash_a, *_), (uid_b, hash_b, *_) in itertools.combinations(rows, 2):
        if uid_a.startswith("lookalike") or uid_b.startswith("lookalike"):
            assert hamming_distance(hash_a, hash_b) > PHASH_DISTANCE, (uid_a, uid_b)

    frame = spark.createDataFrame(rows, ROWS_SCHEMA)
    duplicates = phash_duplicates(frame, PHASH_DISTANCE)
    assert found(duplicates) == expected
    survivors = {row.uid for row in drop_duplicates_found(frame, duplicates).select("uid").collect()}
    assert survivors == {"scene", "cross"} | {f"lookalike-{n}" for n in range(len(lookalikes))}


def test_ties_on_similarity_go_to_the_earliest_crawl_then_the_smallest_uid(spark) -> None:
    blank = 0  # many real images hash to 0: the blank ones
    rows = [
        ("d-no-date", blank, 0.3, None),
        ("c-late", blank, 0.3, DAY + dt.timedelta(days=3)),
        ("b-early", blank, 0.3, DAY),
        ("a-early-low", blank, 0.2, DAY - dt.timedelta(days=9)),
        ("z-same", 1 << 10, 0.5, DAY),
        ("y-same", 1 << 10, 0.5, DAY),
        ("x-null-date", 1 << 10, 0.5, None),
    ]
    duplicates = found(phash_duplicates(spark.createDataFrame(rows, ROWS_SCHEMA), PHASH_DISTANCE))
    assert duplicates == {
        "d-no-date": ("y-same", 1),
        "c-late": ("y-same", 1),
        "b-early": ("y-same", 1),
        "a-early-low": ("y-same", 1),
        "z-same": ("y-same", 0),
        "x-null-date": ("y-same", 0),
    }
    # Without the better hash nearby, the earliest crawl of the blank images is their survivor.
    duplicates = found(phash_duplicates(spark.createDataFrame(rows[:4], ROWS_SCHEMA), PHASH_DISTANCE))
    assert duplicates == {"d-no-date": ("b-early", 0), "c-late": ("b-early", 0), "a-early-low": ("b-early", 0)}


def brute_force_duplicates(rows: list[tuple], max_distance: int) -> dict[str, tuple]:
    """The rule, row by row: the best-ranked row within the distance, if it is better ranked than this one."""

    def rank(row: tuple) -> tuple:
        uid, _, similarity, crawl_date = row
        return (-similarity, crawl_date is None, crawl_date or DAY, uid)

    ordered = sorted((row for row in rows if row[1] is not None), key=rank)
    result = {}
    for position, row in enumerate(ordered):
        for better in ordered[:position]:
            distance = hamming_distance(row[1], better[1])
            if distance <= max_distance:
                result[row[0]] = (better[0], distance)
                break
    return result


@pytest.mark.parametrize("max_distance", [0, 1, 4, 7])
def test_banded_join_finds_exactly_what_comparing_every_pair_finds(spark, max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    hashes = [to_signed(int(value)) for value in rng.integers(0, 2**63, 120, dtype=np.uint64) * 2 + 1]
    planted = []
    for number, base in enumerate(hashes[:60]):
        flips = rng.choice(64, size=number % (max_distance + 3), replace=False)  # some beyond the distance
        value = base
        for bit in flips:
            value = to_signed((value ^ (1 << int(bit))) & (2**64 - 1))
        planted.append(value)
    hashes += planted + [0] * 5 + [hashes[0]] * 3 + [to_signed(2**63 + 1)]  # blank images, repeats, the sign bit
    rows = [
        (f"u{i:04d}", value, float(rng.integers(0, 5)) / 10, None if i % 7 == 0 else DAY + dt.timedelta(days=i % 3))
        for i, value in enumerate(hashes)
    ]
    rows.append(("no-hash", None, 1.0, DAY))
    expected = brute_force_duplicates(rows, max_distance)
    assert len(expected) > 10
    frame = spark.createDataFrame(rows, "uid string, phash long, similarity double, crawl_date timestamp")
    assert found(phash_duplicates(frame, max_distance)) == expected


def test_bands_are_contiguous_and_cover_the_64_bits() -> None:
    assert phash_bands(4) == [(0, 13), (13, 13), (26, 13), (39, 13), (52, 12)]
    assert phash_bands(0) == [(0, 64)]
    with pytest.raises(ValueError, match="between 0 and 63"):
        phash_bands(64)


def planted_embeddings(rows: int, copies: int, d: int, seed: int) -> tuple[list[tuple], dict[str, str]]:
    """Rows around 6 topics (cosine about 0.7 within a topic) and ``copies`` near-copies (cosine above 0.999).

    Topics, as real embeddings have them: on structureless random vectors every point is near a k-means boundary,
    and a copy lands in another cluster than its source about once in twenty (SemDeDup compares within clusters).
    """
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(6, d))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    vectors = (topics[rng.integers(0, 6, rows)] + rng.normal(0, 0.6 / np.sqrt(d), (rows, d))).astype(np.float32)
    similarity = rng.uniform(0.2, 0.4, rows)
    planted = {}
    for number in range(copies):
        source = int(rng.integers(0, rows))
        copy = vectors[source] / np.linalg.norm(vectors[source]) + rng.normal(0, 0.003, d)
        vectors = np.vstack([vectors, copy.astype(np.float32)])
        similarity = np.append(similarity, similarity[source] - 0.01)  # a copy ranks below its source
        planted[f"copy{number:03d}"] = f"row{source:04d}"
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    uids = [f"row{i:04d}" for i in range(rows)] + list(planted)
    frame_rows = [
        (uid, vector.tolist(), float(sim), DAY) for uid, vector, sim in zip(uids, vectors, similarity, strict=True)
    ]
    return frame_rows, planted


def test_semdedup_finds_exactly_the_planted_near_copies(spark) -> None:
    rows, planted = planted_embeddings(rows=600, copies=40, d=32, seed=3)
    frame = spark.createDataFrame(
        rows, "uid string, image_embedding array<float>, similarity double, crawl_date timestamp"
    )
    duplicates = found(semdedup_duplicates(frame, epsilon=0.05, clusters=6, sample_rows=500, seed=1))
    # A source drawn twice has two copies: the second is the first's duplicate as much as its source's, and the
    # source, ranked first, is its survivor either way.
    assert {uid: survivor for uid, (survivor, _) in duplicates.items()} == planted
    assert all(cosine >= 0.95 for _, cosine in duplicates.values())


def test_kmeans_centroids_are_normalised_and_assignment_is_the_nearest(spark) -> None:
    rows, _ = planted_embeddings(rows=300, copies=0, d=16, seed=5)
    frame = spark.createDataFrame(
        rows, "uid string, image_embedding array<float>, similarity double, crawl_date timestamp"
    )
    centroids = train_kmeans(frame, "image_embedding", k=5, sample_rows=200, seed=2)
    assert centroids.shape == (5, 16) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    assigned = assign_clusters(frame, "image_embedding", centroids).select(
        "image_embedding", "cluster", "cluster_cosine"
    )
    for row in assigned.collect():
        scores = centroids @ np.asarray(row.image_embedding, dtype=np.float32)
        assert row.cluster == int(scores.argmax()) and row.cluster_cosine == pytest.approx(scores.max(), abs=1e-5)
    assert default_clusters(1_000_000) == 1000 and default_clusters(10**12) == 50_000 and default_clusters(0) == 1
