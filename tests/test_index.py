"""`laion-spark index`: a sharded faiss index over the demo lake's embeddings, built by Spark tasks, kept up to date
incrementally (new rows added, deleted rows removed), and the index type chosen from the row count and budget."""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from laion_spark.config import ConfigError, IndexConfig
from laion_spark.index import IndexChoiceError, build_index, choose_index, run_index
from laion_spark.index.choice import FLAT, IVF_HNSW_FLAT, IVF_PQ, IVF_SQ8, pq_sizes
from laion_spark.index.layout import MODALITIES, Manifest, Shard, read_manifest
from laion_spark.index.shards import metadata_schema, read_index, rewrite_shard, write_index, write_metadata
from laion_spark.index.train import add_vectors, train_index
from laion_spark.schemas import DATASET, EMBEDDINGS, STAGE_STATS
from laion_spark.storage import latest_version, read_table
from laion_spark.storage.delta import table_path
from laion_spark.storage.ids import sample_ids
from laion_spark.storage.outputs import OutputDir


@pytest.fixture
def lake(demo_lake, tmp_path: Path) -> str:
    """A copy of the demo lake: the index stage appends to its stage_stats, and some tests delete rows."""
    copied = tmp_path / "lake"
    shutil.copytree(demo_lake.lake, copied)
    return str(copied)


def index_config(demo_lake, tmp_path: Path, **settings):
    config = copy.deepcopy(demo_lake.config)
    config.index.path = str(tmp_path / "index")
    for key, value in settings.items():
        setattr(config.index, key, value)
    return config


def indexed_rows(spark, lake: str) -> dict[int, tuple[str, np.ndarray, np.ndarray]]:
    """The test's own view of what must be indexed: id -> (uid, image embedding, text embedding)."""
    embeddings = read_table(spark, lake, EMBEDDINGS).where("status = 'ok'")
    rows = read_table(spark, lake, DATASET).select("uid").join(embeddings, "uid").collect()
    vectors = {}
    for row in rows:
        (key,) = sample_ids([row.uid])
        vectors[int(key)] = (row.uid, np.array(row.image_embedding, "float32"), np.array(row.text_embedding, "float32"))
    return vectors


def shard_files(shards: list[Shard]) -> list[str]:
    return [path for shard in shards for path in (*(shard.path(m) for m in MODALITIES), shard.metadata_path)]


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def ids_in_index(directory: OutputDir, manifest: Manifest) -> dict[int, str]:
    """id -> shard, from the metadata files; checks that each shard's faiss indexes hold the same ids."""
    where = {}
    for shard in manifest.shards:
        ids = pq.read_table(directory.path(shard.metadata_path)).column("id").to_numpy()
        assert len(ids) == shard.count and list(ids) == sorted(ids)
        for modality in MODALITIES:
            index = read_index(directory, shard.path(modality))
            assert index.ntotal == shard.count
        for key in ids:
            assert int(key) not in where, f"id {key} in two shards"
            where[int(key)] = shard.name
    return where


def assert_each_row_finds_itself(directory: OutputDir, manifest: Manifest, vectors: dict) -> None:
    """Every shard, searched with faiss directly for each of its rows' own embedding, returns that row first."""
    for shard in manifest.shards:
        ids = pq.read_table(directory.path(shard.metadata_path)).column("id").to_numpy()
        for modality, column in (("image", 1), ("text", 2)):
            index = read_index(directory, shard.path(modality))
            queries = np.stack([vectors[int(key)][column] for key in ids])
            similarity, found = index.search(queries, 10)
            assert np.allclose(similarity[:, 0], 1.0, atol=2e-2)
            # The demo's synthetic images repeat (one drawing, several URLs): a row ties with its twins, if any.
            for key, row_found, row_similarity in zip(ids, found, similarity, strict=True):
                tied = row_found[row_similarity >= row_similarity[0] - 1e-5]
                assert key in tied, f"{modality} shard {shard.name}: id {key} not first"


@pytest.mark.slow
def test_build_writes_the_layout_and_each_row_finds_itself(spark, demo_lake, lake, tmp_path):
    config = index_config(demo_lake, tmp_path)
    result = run_index(spark, config, lake)
    directory = OutputDir(config.index.path)
    manifest = read_manifest(directory)

    vectors = indexed_rows(spark, lake)
    assert result.action == "built" and manifest.index_type == FLAT and manifest.factory == "IDMap2,Flat"
    assert manifest.count == len(vectors) == result.added > 0
    assert all(directory.exists(path) for path in shard_files(manifest.shards))
    assert set(ids_in_index(directory, manifest)) == set(vectors)
    assert_each_row_finds_itself(directory, manifest, vectors)

    metadata = pq.read_table(directory.path(manifest.shards[0].metadata_path))
    assert metadata.schema.equals(metadata_schema())
    dataset = {row.uid: row for row in read_table(spark, lake, DATASET).collect()}
    for row in metadata.to_pylist():
        assert row["caption"] == dataset[row["uid"]].text and row["url"] == dataset[row["uid"]].url
        assert row["id"] == int(sample_ids([row["uid"]])[0])

    assert manifest.dim == len(next(iter(vectors.values()))[1])
    assert manifest.dataset_version == latest_version(spark, lake, DATASET)
    assert manifest.embeddings_version == latest_version(spark, lake, EMBEDDINGS)
    assert manifest.model.name == config.clip.model == "tiny-clip"
    assert manifest.model.pretrained == config.clip.pretrained and Path(manifest.model.pretrained).is_absolute()
    stats = read_table(spark, lake, STAGE_STATS).where(F.col("run_id") == result.run_id).collect()
    assert {row.step for row in stats} >= {"with_ok_embedding", "added", "indexed"}
    assert all(row.stage == "index" for row in stats)
    assert "built Flat" in result.summary()
    assert result.vectors_read_by == "files" and "vectors read by files" in result.summary()


@pytest.mark.slow
def test_incremental_runs_remove_deleted_rows_add_new_ones_and_skip_when_nothing_changed(
    spark, demo_lake, lake, tmp_path
):
    config = index_config(demo_lake, tmp_path, flat_max_rows=10, vectors_per_shard=25)
    directory = OutputDir(config.index.path)
    run_index(spark, config, lake)
    before = read_manifest(directory)
    where = ids_in_index(directory, before)
    digests = file_digests(tmp_path / "index")
    version_before_delete = latest_version(spark, lake, DATASET)

    # Three rows of one shard and one row of another leave the dataset.
    by_shard: dict[str, list[int]] = {}
    for key, shard in sorted(where.items()):
        by_shard.setdefault(shard, []).append(key)
    first, second = sorted(by_shard)[:2]
    removed_ids = by_shard[first][:3] + by_shard[second][:1]
    vectors = indexed_rows(spark, lake)
    removed_uids = [vectors[key][0] for key in removed_ids]
    dataset = f"delta.`{table_path(lake, DATASET)}`"
    spark.sql(f"DELETE FROM {dataset} WHERE uid IN ({', '.join(repr(uid) for uid in removed_uids)})")

    result = run_index(spark, config, lake)
    after = read_manifest(directory)
    assert result.action == "updated" and result.removed == 4 and result.added == 0
    assert result.rewritten_shards == 2
    assert set(ids_in_index(directory, after)) == set(where) - set(removed_ids)
    assert after.count == before.count - 4
    # In place: a rewritten shard gets a new name, the others keep theirs, and their files are left as they were.
    for old, new in zip(before.shards, after.shards, strict=True):
        assert (new.name == old.name) == (old.name not in (first, second))
    now = file_digests(tmp_path / "index")
    for path in shard_files([shard for shard in before.shards if shard.name not in (first, second)]):
        assert now[path] == digests[path], f"{path} was rewritten"
    for path in shard_files([shard for shard in before.shards if shard.name in (first, second)]):
        assert path not in now, f"{path} of the replaced shard is still there"
    for shard in after.shards:
        for modality in MODALITIES:
            _, found = read_index(directory, shard.path(modality)).search(
                np.stack([vectors[key][1 if modality == "image" else 2] for key in removed_ids]), 5
            )
            assert not set(found.ravel()) & set(removed_ids)
    assert after.dataset_version == latest_version(spark, lake, DATASET)

    # The rows come back: one new shard, built from the trained index as it was (no retraining).
    trained = {path: digest for path, digest in now.items() if path.startswith("trained/")}
    spark.sql(
        f"INSERT INTO {dataset} SELECT * FROM {dataset} VERSION AS OF {version_before_delete} "
        f"WHERE uid IN ({', '.join(repr(uid) for uid in removed_uids)})"
    )
    result = run_index(spark, config, lake)
    again = read_manifest(directory)
    assert result.action == "updated" and result.added == 4 and result.removed == 0 and result.new_shards == 1
    assert [s.name for s in again.shards[:-1]] == [s.name for s in after.shards]
    assert again.shards[-1].count == 4
    assert set(ids_in_index(directory, again)) == set(where)
    assert {p: d for p, d in file_digests(tmp_path / "index").items() if p.startswith("trained/")} == trained
    assert_each_row_finds_itself(directory, again, indexed_rows(spark, lake))

    # Nothing new, nothing removed: no work, not a file touched.
    settled = file_digests(tmp_path / "index")
    result = run_index(spark, config, lake)
    assert result.action == "unchanged" and "no work" in result.summary()
    assert file_digests(tmp_path / "index") == settled


@pytest.mark.slow
def test_rebuild_starts_from_scratch_and_a_grown_flat_index_advises_it(spark, demo_lake, lake, tmp_path):
    config = index_config(demo_lake, tmp_path)
    directory = OutputDir(config.index.path)
    first = run_index(spark, config, lake).manifest
    assert first.index_type == FLAT

    config.index.flat_max_rows = 10  # as if the lake had grown past what Flat was chosen for
    spark.sql(f"DELETE FROM delta.`{table_path(lake, DATASET)}` WHERE uid = '{first_uid(directory, first)}'")
    result = run_index(spark, config, lake)
    assert result.manifest.index_type == FLAT and "--rebuild" in result.rebuild_advice
    assert "advice" in result.summary()

    rebuilt = run_index(spark, config, lake, rebuild=True)
    assert rebuilt.action == "built" and rebuilt.manifest.index_type == IVF_HNSW_FLAT and not rebuilt.rebuild_advice
    names = {shard.name for shard in rebuilt.manifest.shards}
    assert names.isdisjoint(shard.name for shard in first.shards)
    assert {path.stem for path in (Path(config.index.path) / "image").iterdir()} == names


@pytest.mark.slow
def test_embeddings_of_two_models_are_one_clear_error(spark, demo_lake, lake, tmp_path):
    uid = read_table(spark, lake, DATASET).orderBy("uid").first().uid
    spark.sql(f"UPDATE delta.`{table_path(lake, EMBEDDINGS)}` SET model = 'ViT-B-32' WHERE uid = '{uid}'")
    with pytest.raises(ConfigError, match="2 models .*ViT-B-32, tiny-clip"):
        run_index(spark, index_config(demo_lake, tmp_path), lake)


def first_uid(directory: OutputDir, manifest: Manifest) -> str:
    return pq.read_table(directory.path(manifest.shards[0].metadata_path)).column("uid")[0].as_py()


@pytest.mark.slow
def test_ivf_index_is_trained_on_a_bounded_sample_and_built_in_shards_by_tasks(
    spark, demo_lake, lake, tmp_path, monkeypatch
):
    """The driver collects no embeddings: every way a DataFrame brings rows to the driver is recorded (what it
    returned, and whether it had vector columns) while the index builds. The one sample of embeddings it trains on
    is bounded (index.train_sample rows), staged by a task as parquet and read back one column at a time."""
    received: list[tuple[str, bool, int]] = []
    frame_class = type(spark.range(1))  # the session's implementation (classic or Connect), not the abstract class

    def recording(name: str):
        original = getattr(frame_class, name)

        def method(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            has_vectors = any(field.dataType.simpleString() == "array<float>" for field in self.schema.fields)
            received.append((name, has_vectors, result.num_rows if name == "toArrow" else len(result)))
            return result

        return method

    for name in ("collect", "toArrow", "toPandas"):
        monkeypatch.setattr(frame_class, name, recording(name))
    monkeypatch.setattr(frame_class, "toLocalIterator", lambda *_: pytest.fail("toLocalIterator on the driver"))
    config = index_config(demo_lake, tmp_path, flat_max_rows=10, vectors_per_shard=25, train_sample=80)
    result = run_index(spark, config, lake)
    monkeypatch.undo()

    directory = OutputDir(config.index.path)
    manifest = read_manifest(directory)
    assert manifest.count > 80 and manifest.params["sample_rows"] == 80
    assert result.vectors_read_by == "files"
    assert not [call for call in received if call[1]], received
    # A few counts, one row per shard, and for the two plans of located vectors (sample and shards) a row per file
    # of the embeddings and one per partition.
    embedding_files = len(read_table(spark, lake, EMBEDDINGS).inputFiles())
    bound = len(manifest.shards) + 10 + 2 * (embedding_files + len(manifest.shards))
    assert sum(rows for _, _, rows in received) <= bound
    assert sorted(path.name for path in Path(config.index.path).iterdir()) == [
        "image",
        "manifest.json",
        "metadata",
        "text",
        "trained",
    ]

    assert manifest.index_type == IVF_HNSW_FLAT and manifest.factory == "IVF2_HNSW32,Flat"
    assert manifest.params["nlist"] == 2 and manifest.params["train_rows"] == 80 and manifest.nprobe >= 1
    # ceil(n / 25) tasks; a file shared by two tasks is split by a hash of its keys, so a task may get a few rows
    # over 25 and cut them into a small second shard: more shards, never a bigger one.
    planned = math.ceil(manifest.count / 25)
    assert planned <= len(manifest.shards) == result.new_shards <= 2 * planned and planned > 1
    assert all(shard.count <= 25 for shard in manifest.shards)
    for modality in MODALITIES:
        trained = read_index(directory, f"trained/{modality}.faiss")
        assert trained.is_trained and trained.ntotal == 0
        assert faiss.extract_index_ivf(trained).nprobe == manifest.nprobe
    # Each shard carries the calibrated nprobe: a reader needs nothing but the file to search it as intended.
    first = read_index(directory, manifest.shards[0].path("image"))
    assert faiss.extract_index_ivf(first).nprobe == manifest.nprobe
    assert_each_row_finds_itself(directory, manifest, indexed_rows(spark, lake))


@pytest.mark.slow
def test_rows_sharing_an_id_are_indexed_once_and_a_partition_larger_than_a_shard_is_cut(spark, tmp_path):
    """Rows whose ids collide (two pairs whose uids share their first 63 bits), in different input partitions: one
    row of each id is indexed and the others counted. Two input partitions of 27 rows for shards of 20 at most:
    each is cut in two, as coalescing cannot split them."""
    rng = np.random.default_rng(5)
    d, n = 8, 60
    vectors = rng.standard_normal((n, d)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = list(range(n))
    ids[10] = ids[50] = ids[55] = 3  # four rows of id 3, in both halves of the input
    ids[20] = 21
    rows = [(key, vector.tolist(), vector.tolist()) for key, vector in zip(ids, vectors, strict=True)]
    frame = spark.createDataFrame(rows, "id long, image_embedding array<float>, text_embedding array<float>")
    frame = frame.coalesce(2)  # the local rows in two partitions, without a shuffle that would bring ids together

    report = build_index(spark, frame, str(tmp_path / "index"), IndexConfig(vectors_per_shard=20))
    directory = OutputDir(str(tmp_path / "index"))
    manifest = report.manifest
    assert report.duplicate_ids == 4 and manifest.count == len(set(ids)) == 56
    assert set(ids_in_index(directory, manifest)) == set(ids)
    assert all(0 < shard.count <= 20 for shard in manifest.shards)
    assert len({shard.name for shard in manifest.shards}) == len(manifest.shards) >= math.ceil(56 / 20)
    for shard in manifest.shards:
        index = read_index(directory, shard.path("image"))
        stored = pq.read_table(directory.path(shard.metadata_path)).column("id").to_pylist()
        if 3 in stored:
            kept = index.reconstruct(3)
            assert any(np.allclose(kept, vectors[row]) for row in (3, 10, 50, 55))


@pytest.mark.parametrize(
    ("n", "d", "max_memory_gb", "train_sample", "expected_type", "expected_nlist"),
    [
        (1_000, 512, 16.0, 200_000, FLAT, 0),
        (100_000, 512, 16.0, 200_000, FLAT, 0),  # flat_max_rows is inclusive
        (1_000_000, 512, 16.0, 200_000, IVF_HNSW_FLAT, 4096),  # 4 * sqrt(1M) = 4000 -> 4096
        (1_000_000, 512, 16.0, 10_000, IVF_HNSW_FLAT, 128),  # 9,000 training vectors fill 128 lists of 39+
        (1_000_000, 512, 2.0, 200_000, IVF_SQ8, 4096),  # 2 GB flat vectors per modality do not fit 1 GB
        (100_000_000, 512, 16.0, 200_000, IVF_PQ, 4096),
        (100_000_000, 768, 16.0, 200_000, IVF_PQ, 4096),
    ],
)
def test_index_type_follows_row_count_and_memory_budget(
    n, d, max_memory_gb, train_sample, expected_type, expected_nlist
):
    choice = choose_index(n, d, max_memory_gb, flat_max_rows=100_000, train_sample=train_sample)
    assert choice.index_type == expected_type
    assert choice.nlist == expected_nlist
    assert choice.estimated_bytes <= choice.budget_bytes == int(max_memory_gb * 1e9 / 2)
    if expected_nlist:
        assert choice.train_rows >= 39 * choice.nlist and choice.train_rows + choice.calibration_rows <= train_sample
    if expected_type == IVF_PQ:
        assert d % choice.pq_m == 0 and f"PQ{choice.pq_m}x8" in choice.factory
        # the largest m that fits: the next larger divisor would not
        larger = [m for m in pq_sizes(d) if m > choice.pq_m]
        assert not larger or n * (min(larger) + 8) > choice.budget_bytes


def test_an_index_that_fits_nowhere_is_a_config_error():
    with pytest.raises(IndexChoiceError, match="max_memory_gb"):
        choose_index(10_000_000_000, 512, 16.0, flat_max_rows=100_000, train_sample=200_000)


@pytest.mark.parametrize(
    ("flat_max_rows", "max_memory_gb", "expected_type"),
    [(3_000, 1.0, FLAT), (100, 1.0, IVF_HNSW_FLAT), (100, 0.0005, IVF_SQ8), (100, 0.00015, IVF_PQ)],
)
def test_remove_ids_works_on_every_index_type(tmp_path, flat_max_rows, max_memory_gb, expected_type):
    """Each type, trained and filled as the build does it, then rewritten without some ids as a task does it."""
    rng = np.random.default_rng(3)
    d, n = 32, 3_000
    centres = rng.standard_normal((40, d)).astype("float32")
    vectors = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.integers(0, 2**62, n).astype("int64")
    choice = choose_index(n, d, max_memory_gb, flat_max_rows=flat_max_rows, train_sample=n)
    assert choice.index_type == expected_type
    index, calibration = train_index(choice, vectors, target_recall=0.9)
    assert index.is_trained and (calibration is None) == (expected_type == FLAT)
    add_vectors(index, vectors, ids)

    directory = OutputDir(str(tmp_path))
    old = Shard("old", n)
    for modality in MODALITIES:
        write_index(directory, old.path(modality), index)
    write_metadata(directory, old.metadata_path, pa.table({"id": pa.array(np.sort(ids))}))
    gone = ids[:100]
    assert rewrite_shard(gone, old, "new", directory) == ("new", n - 100, 100)
    for modality in MODALITIES:
        rewritten = read_index(directory, Shard("new", n - 100).path(modality))
        assert rewritten.ntotal == n - 100
        _, found = rewritten.search(vectors[:100], 10)
        assert not set(found.ravel().tolist()) & set(gone.tolist())
    assert pq.read_table(directory.path("metadata/new.parquet")).num_rows == n - 100


def test_plan_file_partitions_cuts_the_files_order_at_even_counts():
    from laion_spark.index.located import plan_file_partitions

    spans, partitions = plan_file_partitions([("a", 30), ("b", 50), ("c", 20)], 40)
    assert partitions == 3  # ceil(100 / 40)
    assert spans == [("a", 0, 30), ("b", 30, 50), ("c", 80, 20)]
    assert plan_file_partitions([], 40) == ([], 0)


def test_partition_keys_reach_each_partition_through_spark_hash_partitioning(spark):
    from laion_spark.index.located import partition_keys

    keys = partition_keys(spark, 7)
    frame = spark.createDataFrame([(key, p) for p, key in enumerate(keys)], "key long, planned int")
    placed = frame.repartition(7, "key").select("planned", F.spark_partition_id().alias("partition")).collect()
    assert sorted((row.planned, row.partition) for row in placed) == [(p, p) for p in range(7)]


@pytest.fixture(scope="module")
def located_table(spark, tmp_path_factory):
    """A Delta table of embeddings like the lake's, in three files under a path with a space, with deletion
    vectors: rows deleted after writing (still in the files, marked deleted), and rows without vectors (status
    failed) between the ok ones. Returns (path, id -> vector of the ok rows left)."""
    rng = np.random.default_rng(9)
    d, n = 8, 150
    vectors = rng.standard_normal((n, d)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [(i, "failed" if i % 7 == 3 else "ok", None if i % 7 == 3 else vectors[i].tolist()) for i in range(n)]
    path = str(tmp_path_factory.mktemp("located") / "embeddings table")
    schema = "id long, status string, image_embedding array<float>, text_embedding array<float>"
    frame = spark.createDataFrame(
        [(i, status, v, None if v is None else [-x for x in v]) for i, status, v in rows], schema
    )
    frame.repartition(3).write.format("delta").option("delta.enableDeletionVectors", "true").save(path)
    spark.sql(f"DELETE FROM delta.`{path}` WHERE id % 10 = 4")
    kept = {i: vectors[i] for i, status, _ in rows if status == "ok" and i % 10 != 4}
    return path, kept


def test_vectors_read_from_the_files_of_a_delta_table_with_deletion_vectors(spark, located_table, tmp_path):
    """The tasks read each row's vectors from its file, found by its key: every ok row left after the deletes is
    indexed under its own id (a row read from the wrong place would not find itself first), in shards of 40 at
    most; the training sample comes from the files too."""
    from laion_spark.index import locate_vectors, located_columns

    path, kept = located_table
    scan = spark.read.format("delta").load(path)
    files = locate_vectors(scan, key="id", mode="files")
    assert files is not None
    rows = scan.where("status = 'ok'").select("id", *located_columns("id"))
    settings = IndexConfig(flat_max_rows=20, train_sample=60, vectors_per_shard=40, nprobe=1)
    report = build_index(spark, rows, str(tmp_path / "index"), settings, files=files)
    directory = OutputDir(str(tmp_path / "index"))
    manifest = report.manifest
    assert manifest.index_type == IVF_HNSW_FLAT and manifest.params["sample_rows"] == 60
    assert set(ids_in_index(directory, manifest)) == set(kept)
    assert all(0 < shard.count <= 40 for shard in manifest.shards)
    assert len(manifest.shards) >= math.ceil(len(kept) / 40)
    for shard in manifest.shards:
        ids = pq.read_table(directory.path(shard.metadata_path)).column("id").to_numpy()
        for modality, sign in (("image", 1), ("text", -1)):
            index = read_index(directory, shard.path(modality))
            faiss.extract_index_ivf(index).nprobe = manifest.params["nlist"]
            queries = np.stack([sign * kept[int(key)] for key in ids])
            similarity, found = index.search(queries, 1)
            assert list(found[:, 0]) == list(ids), modality
            assert np.allclose(similarity[:, 0], 1.0, atol=1e-5)


def test_vectors_are_read_by_spark_where_the_files_cannot_serve(spark, located_table, tmp_path):
    from laion_spark.index import locate_vectors

    path, _ = located_table
    scan = spark.read.format("delta").load(path)
    assert locate_vectors(scan, key="id", mode="spark") is None
    assert locate_vectors(scan, {"image": "image_embedding", "text": "caption_embedding"}, key="id") is None
    assert locate_vectors(scan, key="uid") is None  # the files have no such column
    in_memory = spark.createDataFrame([(1, [0.5, 0.5])], "id long, image_embedding array<float>")
    assert locate_vectors(in_memory) is None
    with pytest.raises(ConfigError, match="read_vectors=files"):
        locate_vectors(in_memory, mode="files")
    with pytest.raises(ConfigError, match="read_vectors"):
        run_index(spark, _config_with(read_vectors="sometimes"), str(tmp_path))


def _config_with(**index_settings):
    from laion_spark.config import Config

    config = Config()
    for key, value in index_settings.items():
        setattr(config.index, key, value)
    return config
