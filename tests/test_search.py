"""`laion-spark search`: the index read back (every index type, shards merged, metadata by id, reloads), the query
encoder, deduplication, and searches over the real index of the demo lake, from Python and from the CLI."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from laion_spark.cli import main
from laion_spark.config import ClipConfig, ConfigError, apply_override
from laion_spark.index.layout import (
    METADATA_COLUMNS,
    IndexMissing,
    Manifest,
    ModelRef,
    Shard,
    index_location,
    write_manifest,
)
from laion_spark.index.query import (
    BadQuery,
    combine_queries,
    decode_query_image,
    encoder_for,
    normalise_embedding,
    query_model_spec,
)
from laion_spark.index.search import drop_near_duplicates, find_matches, format_matches, search_lake
from laion_spark.index.store import ID_MAP, NATIVE, Hit, IndexStore, open_index
from laion_spark.storage.outputs import OutputDir

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DIM = 32


# ---------------------------------------------------------------------------------------------------------------
# A small index in the layout, written without Spark: the read side on every index type, fast.


def clustered_vectors(n: int, d: int = DIM, clusters: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    vectors = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_index(
    directory: OutputDir,
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str = "IDMap2,Flat",
    shards: int = 2,
    nprobe: int = 0,
    row_group_size: int | None = None,
    sort_metadata: bool = True,
    prefix: str = "v1",
) -> Manifest:
    """image/, text/ and metadata/ for ``shards`` shards (text vectors: the image vectors reversed), then the
    manifest, as laion_spark.index.layout describes them."""
    trained = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not trained.is_trained:
        trained.train(vectors)
    written = []
    for number, part in enumerate(np.array_split(np.arange(len(ids)), shards)):
        name = f"{prefix}-{number:05d}"
        for modality, data in (("image", vectors), ("text", vectors[:, ::-1].copy())):
            index = faiss.deserialize_index(faiss.serialize_index(trained))
            index.add_with_ids(data[part], ids[part])
            if nprobe:
                faiss.extract_index_ivf(index).nprobe = 1  # the manifest's nprobe is what search must use
            directory.publish_bytes(f"{modality}/{name}.faiss", faiss.serialize_index(index).tobytes())
        rows = part[np.argsort(ids[part])] if sort_metadata else part[::-1]
        table = pa.table(
            {
                "id": pa.array(ids[rows], pa.int64()),
                "uid": pa.array([f"uid-{i}" for i in ids[rows]], pa.string()),
                "url": pa.array([f"http://example.com/{i}.jpg" for i in ids[rows]], pa.string()),
                "caption": pa.array([f"caption {i}" for i in ids[rows]], pa.string()),
                "similarity": pa.array(np.full(len(rows), 0.3), pa.float32()),
                "width": pa.array(np.full(len(rows), 256), pa.int32()),
                "height": pa.array(np.full(len(rows), 256), pa.int32()),
                "language": pa.array(["en"] * len(rows), pa.string()),
                "nsfw": pa.array(["UNLIKELY"] * len(rows), pa.string()),
                "punsafe": pa.array([float("nan")] * len(rows), pa.float32()),
            }
        )
        assert table.schema.names == [name for name, _ in METADATA_COLUMNS]
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=row_group_size)
        directory.publish_bytes(f"metadata/{name}.parquet", sink.getvalue())
        written.append(Shard(name, len(part)))
    manifest = Manifest(
        dim=vectors.shape[1],
        index_type="Flat" if "IVF" not in factory else "IVF",
        factory=factory,
        params={"nprobe": nprobe},
        model=ModelRef("tiny-clip"),
        embeddings_version=1,
        dataset_version=1,
        count=len(ids),
        shards=written,
    )
    write_manifest(directory, manifest)
    return manifest


def random_ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).choice(2**62, size=n, replace=False).astype(np.int64)


def exact_top(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]


@pytest.mark.parametrize(
    ("factory", "min_recall"),
    [
        ("IDMap2,Flat", 1.0),
        ("IDMap,Flat", 1.0),
        ("IVF8,Flat", 1.0),
        ("IVF8_HNSW16,Flat", 1.0),
        ("IVF8,SQ8", 0.9),
        ("IVF8,PQ8x4", 0.25),
    ],
)
def test_every_index_type_is_searched_over_all_shards_and_gives_vectors_back(tmp_path, factory, min_recall):
    vectors, ids = clustered_vectors(600), random_ids(600)
    directory = OutputDir(str(tmp_path / "index"))
    write_index(directory, vectors, ids, factory=factory, shards=3, nprobe=8 if "IVF" in factory else 0)
    index = open_index(directory)

    if "IVF" in factory:  # the manifest's nprobe (every list here), not the one serialised with the shard
        assert {faiss.extract_index_ivf(s.indexes["image"].index).nprobe for s in index.shards} == {8}
    assert index.count == 600 and len(index.shards) == 3
    assert index.can_reconstruct("image") and index.can_reconstruct("text")
    expected_kind = ID_MAP if factory == "IDMap,Flat" else NATIVE
    assert index.shards[0].indexes["image"].reconstruct == expected_kind

    queries = vectors[:20]
    results = index.search(queries, 10, "image", with_vectors=True)
    truth = exact_top(vectors, queries, ids, 10)
    recall = np.mean([len({h.id for h in hits} & set(top)) / 10 for hits, top in zip(results, truth, strict=True)])
    assert recall >= min_recall
    for hits in results:
        similarities = [hit.similarity for hit in hits]
        assert similarities == sorted(similarities, reverse=True)
        assert len({hit.id for hit in hits}) == len(hits) == 10
    assert len({hit.shard for hit in index.search(queries[:1], 100)[0]}) == 3  # the merge spans every shard
    # The vector given back is the stored one (approximately, for the quantized types).
    first = results[0][0]
    stored = vectors[list(ids).index(first.id)]
    tolerance = 1e-5 if "Flat" in factory else 0.2
    assert np.abs(first.vector - stored).max() < tolerance

    # The text index holds the same ids with other vectors.
    text_hits = index.search(vectors[:1, ::-1].copy(), 1, "text")[0]
    if min_recall == 1.0:
        assert text_hits[0].id == ids[0]


def test_metadata_is_found_by_id_across_row_groups_and_unknown_ids_are_left_out(tmp_path):
    vectors, ids = clustered_vectors(300), random_ids(300)
    directory = OutputDir(str(tmp_path / "index"))
    write_index(directory, vectors, ids, shards=3, row_group_size=16)
    index = open_index(directory)
    wanted = [int(ids[0]), int(ids[150]), int(ids[299]), 12345]
    found = index.metadata(wanted)
    assert set(found) == set(wanted[:3])
    for sample_id in wanted[:3]:
        assert found[sample_id]["uid"] == f"uid-{sample_id}"
        assert found[sample_id]["caption"] == f"caption {sample_id}"
        assert found[sample_id]["punsafe"] is None  # NaN is not JSON
    assert index.metadata([]) == {}


def test_metadata_not_sorted_by_id_is_still_read_right(tmp_path):
    vectors, ids = clustered_vectors(100), random_ids(100)
    directory = OutputDir(str(tmp_path / "index"))
    write_index(directory, vectors, ids, shards=2, sort_metadata=False, row_group_size=7)
    found = open_index(directory).metadata([int(i) for i in ids])
    assert all(found[int(i)]["url"] == f"http://example.com/{int(i)}.jpg" for i in ids)


def test_a_missing_index_says_how_to_build_one(tmp_path):
    with pytest.raises(IndexMissing, match="laion-spark index"):
        open_index(OutputDir(str(tmp_path / "nothing")))


def test_the_store_loads_a_new_version_when_the_manifest_changes(tmp_path):
    vectors, ids = clustered_vectors(200), random_ids(200)
    directory = OutputDir(str(tmp_path / "index"))
    write_index(directory, vectors, ids, shards=2)
    store = IndexStore(directory, check_interval_s=0.0)
    first = store.current()
    assert store.current() is first  # unchanged manifest: the same loaded version

    # `index` removed ids 0..49: the shards are rewritten under new names, the manifest replaced, the old files
    # deleted.
    write_index(directory, vectors[50:], ids[50:], shards=2, prefix="v2")
    for modality in ("image", "text"):
        for name in ("v1-00000", "v1-00001"):
            directory.delete(modality, f"{name}.faiss")
    second = store.current()
    assert second is not first and store.reloads == 1
    hits = second.search(vectors[:50], 5)
    assert not {hit.id for row in hits for hit in row} & set(ids[:50].tolist())
    assert second.metadata([int(ids[0])]) == {}


def test_the_store_keeps_serving_when_a_reload_fails(tmp_path):
    vectors, ids = clustered_vectors(50), random_ids(50)
    directory = OutputDir(str(tmp_path / "index"))
    write_index(directory, vectors, ids, shards=1)
    store = IndexStore(directory, check_interval_s=0.0)
    first = store.current()
    directory.publish_bytes("manifest.json", b'{"not": "a manifest"}')
    assert store.current() is first


def hit(sample_id: int, similarity: float, vector: list[float] | None) -> Hit:
    return Hit(sample_id, similarity, "s", None if vector is None else np.asarray(vector, dtype=np.float32))


def test_deduplicate_drops_near_identical_vectors_ranked_lower():
    hits = [
        hit(1, 0.9, [1.0, 0.0, 0.0]),
        hit(2, 0.89, [0.999, 0.02, 0.0]),  # cosine ~0.9998 with 1: dropped
        hit(3, 0.7, [0.0, 1.0, 0.0]),
        hit(4, 0.69, [0.0, 0.95, 0.31]),  # cosine ~0.95 with 3: below 0.98, kept
        hit(5, 0.5, [0.0, 2.0, 0.0]),  # the same direction as 3, another length: dropped
    ]
    assert [h.id for h in drop_near_duplicates(hits, 0.98)] == [1, 3, 4]
    assert [h.id for h in drop_near_duplicates(hits, 0.9)] == [1, 3]
    assert [h.id for h in drop_near_duplicates(hits, 1.01)] == [1, 2, 3, 4, 5]


def test_deduplicate_without_vectors_drops_equal_similarities_only():
    hits = [hit(1, 0.9, None), hit(2, 0.9, None), hit(3, 0.8999, None), hit(4, 0.5, None)]
    assert [h.id for h in drop_near_duplicates(hits, 0.98)] == [1, 3, 4]


def test_find_matches_deduplicates_and_still_returns_k(tmp_path):
    base = clustered_vectors(100)
    vectors = np.concatenate([base, base[:10]])  # ten images twice, under other ids
    ids = random_ids(110)
    directory = OutputDir(str(tmp_path / "index"))
    write_index(directory, vectors, ids, shards=2)
    index = open_index(directory)
    plain = find_matches(index, base[0], 10)
    assert {plain[0].id, plain[1].id} == {int(ids[0]), int(ids[100])}
    deduplicated = find_matches(index, base[0], 10, deduplicate=True, dedup_similarity=0.98)
    assert len(deduplicated) == 10
    assert len({m.id for m in deduplicated} & {int(ids[0]), int(ids[100])}) == 1
    assert [m.rank for m in deduplicated] == list(range(1, 11))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with a token of data: a decompression bomb's shape
    without its gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def jpeg_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    sink = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(sink, "JPEG")
    return sink.getvalue()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_query_images_decode_safely():
    image = decode_query_image(jpeg_bytes(), max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (40, 30)
    with pytest.raises(BadQuery, match="more than the limit"):
        decode_query_image(jpeg_bytes(), max_pixels=1000)
    with pytest.raises(BadQuery, match="too large|more than the limit"):
        decode_query_image(png_header_only(60_000, 60_000), max_pixels=10**12)  # Pillow's own bomb limit
    with pytest.raises(BadQuery, match="more than the limit"):
        decode_query_image(png_header_only(10_000, 10_000), max_pixels=89_478_485)
    with pytest.raises(BadQuery, match="not in a format"):
        decode_query_image(b"this is not an image", max_pixels=10_000)
    with pytest.raises(BadQuery, match="does not decode"):
        decode_query_image(jpeg_bytes()[:200], max_pixels=10_000)
    with pytest.raises(BadQuery, match="empty"):
        decode_query_image(b"", max_pixels=10_000)


def test_query_vectors_are_normalised_and_combined():
    combined = combine_queries([np.array([3.0, 0.0]), np.array([0.0, 0.5])])
    assert np.allclose(combined, [2**-0.5, 2**-0.5])
    assert np.allclose(normalise_embedding([0, 3, 4], 3), [0, 0.6, 0.8])
    with pytest.raises(BadQuery, match="3 dimensions"):
        normalise_embedding([1.0, 2.0], 3)
    with pytest.raises(BadQuery, match="list of numbers"):
        normalise_embedding(["a", 1, 2], 3)
    with pytest.raises(BadQuery, match="not all zeros"):
        normalise_embedding([0, 0, 0], 3)
    with pytest.raises(BadQuery, match="no query"):
        combine_queries([])


def test_the_query_model_is_the_manifests_with_the_configs_paths_only_for_that_model():
    clip = ClipConfig(model="tiny-clip", pretrained="/models/tiny.pt", model_config="/models/tiny-clip.json")
    spec = query_model_spec(ModelRef("tiny-clip"), clip)
    assert (spec.name, spec.pretrained, spec.model_config) == ("tiny-clip", "/models/tiny.pt", "/models/tiny-clip.json")
    spec = query_model_spec(ModelRef("tiny-clip", pretrained="/elsewhere/w.pt"), clip)
    assert spec.pretrained == "/elsewhere/w.pt" and spec.model_config == "/models/tiny-clip.json"
    spec = query_model_spec(ModelRef("ViT-B-32", pretrained="laion2b_s34b_b79k"), clip)
    assert (spec.name, spec.pretrained, spec.model_config) == ("ViT-B-32", "laion2b_s34b_b79k", "")


# ---------------------------------------------------------------------------------------------------------------
# The real index of the demo lake (laion_spark.index.run_index), searched with the tiny CLIP model.


@pytest.fixture(scope="module")
def indexed_lake(spark, demo_lake, tmp_path_factory):
    """A copy of the demo lake with its kNN index built by `laion-spark index`'s library function."""
    from laion_spark.index import run_index

    lake = str(tmp_path_factory.mktemp("search") / "lake")
    shutil.copytree(demo_lake.lake, lake)
    run_index(spark, demo_lake.config, lake)
    return lake


@pytest.fixture(scope="module")
def demo_rows(spark, indexed_lake):
    """The dataset's rows with their image bytes (a few dozen: the demo is small)."""
    from laion_spark.storage import read_table

    dataset = read_table(spark, indexed_lake, "dataset").select("uid", "url", "text", "language")
    images = read_table(spark, indexed_lake, "images").where("status = 'success'").select("uid", "image")
    return dataset.join(images, "uid").orderBy("uid").toPandas()


def slug(url: str) -> str:
    """``red-circle`` from ``.../img/red-circle-gray-3.jpg``: the colour and shape a synthetic image shows."""
    return "-".join(url.rsplit("/", 1)[1].split("-")[:2])


def an_english_row(rows):
    english = rows[rows.language == "en"]
    return english.iloc[len(english) // 2]


def test_a_caption_finds_its_colour_and_shape(demo_lake, indexed_lake, demo_rows):
    row = an_english_row(demo_rows)
    matches = search_lake(demo_lake.config, indexed_lake, text=row.text, k=5)
    assert len(matches) == 5 and [m.rank for m in matches] == [1, 2, 3, 4, 5]
    assert any(m.caption == row.text or slug(m.url) == slug(row.url) for m in matches), format_matches(matches)
    assert all(m.uid and m.url and 0 < m.similarity <= 1.0001 for m in matches)


def test_an_image_finds_itself(demo_lake, indexed_lake, demo_rows, tmp_path):
    row = demo_rows.iloc[3]
    path = tmp_path / "query.jpg"
    path.write_bytes(row.image)
    matches = search_lake(demo_lake.config, indexed_lake, image_path=str(path), k=10)
    assert matches[0].url == row.url and matches[0].similarity > 0.99
    # Pairs sharing the image (the same URL, other captions) tie with it; the queried uid is among them.
    tied = [m.uid for m in matches if m.similarity > matches[0].similarity - 1e-3]
    assert row.uid in tied


def test_text_and_image_together_search_with_the_mean_of_both(demo_lake, indexed_lake, demo_rows, tmp_path):
    row = an_english_row(demo_rows)
    path = tmp_path / "query.jpg"
    path.write_bytes(demo_rows.iloc[0].image)
    both = search_lake(demo_lake.config, indexed_lake, text=row.text, image_path=str(path), k=3)
    index = open_index(index_location(indexed_lake))
    encoder = encoder_for(index.manifest, demo_lake.config.clip, demo_lake.config.download.max_pixels)
    text_vector, image_vector = encoder.encode_text(row.text), encoder.encode_image(path.read_bytes())
    by_text = {m.id: m.similarity for m in find_matches(index, text_vector, index.count)}
    by_image = {m.id: m.similarity for m in find_matches(index, image_vector, index.count)}
    norm = float(np.linalg.norm(text_vector + image_vector))
    for match in both:
        assert match.similarity == pytest.approx((by_text[match.id] + by_image[match.id]) / norm, abs=1e-4)


def test_modality_text_searches_the_caption_embeddings(demo_lake, indexed_lake, demo_rows):
    row = an_english_row(demo_rows)
    matches = search_lake(demo_lake.config, indexed_lake, text=row.text, k=3, modality="text")
    assert matches[0].caption == row.text and matches[0].similarity > 0.99


def test_search_command_prints_the_top_matches(demo_lake, indexed_lake, demo_rows, capsys):
    row = an_english_row(demo_rows)
    assert main(["search", "--lake", indexed_lake, "--text", row.text, "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "similarity", "url", "caption", "uid"]
    assert len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert all(line.split()[-1] in set(demo_rows.uid) for line in lines[1:])


def test_search_without_an_index_is_one_line_exit_2(tmp_path, capsys):
    assert main(["search", "--lake", str(tmp_path / "lake"), "--text", "a red circle"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "laion-spark index" in err


def test_a_model_that_is_not_available_is_one_line_exit_2(indexed_lake, tmp_path, capsys):
    index_copy = tmp_path / "index"
    shutil.copytree(Path(indexed_lake) / "_index", index_copy)
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["model"]["model_config"] = str(tmp_path / "gone" / "tiny-clip.json")
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    code = main(["search", "--lake", indexed_lake, "--set", f"index.path={index_copy}", "--text", "a red circle"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "does not exist" in err and "tiny-clip" in err


def test_an_image_that_does_not_decode_is_one_line_exit_2(indexed_lake, tmp_path, capsys):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["search", "--lake", indexed_lake, "--image", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--image" in err


def test_search_runs_without_java(indexed_lake, demo_rows, tmp_path):
    """search needs no JVM: the command succeeds where no java can be found."""
    row = an_english_row(demo_rows)
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin), "JAVA_HOME": str(tmp_path / "no-java"), "SPARK_HOME": ""}
    result = subprocess.run(
        [sys.executable, "-m", "laion_spark", "search", "--lake", indexed_lake, "--text", row.text, "-k", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 3


def test_index_path_setting_is_honoured(demo_lake, indexed_lake, demo_rows, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(Path(indexed_lake) / "_index", moved)
    config = copy.deepcopy(demo_lake.config)
    apply_override(config, f"index.path={moved}")
    row = an_english_row(demo_rows)
    assert search_lake(config, str(tmp_path / "no-lake-here"), text=row.text, k=1)
    with pytest.raises(ConfigError, match="give a text"):
        search_lake(config, indexed_lake)
