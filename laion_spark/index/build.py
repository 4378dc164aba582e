"""The index stage: ``dataset`` + ``embeddings`` -> a sharded faiss index (laion_spark.index.layout), built on Spark.

What is indexed: every pair of ``dataset`` with an ``ok`` row in ``embeddings``, its image and its text embedding,
under its sample id (laion_spark.storage.ids). A full build:

1. picks the index type from the row count and ``index.max_memory_gb`` (laion_spark.index.choice);
2. for IVF types, draws a bounded random sample (``index.train_sample`` rows: the only embeddings the driver ever
   holds), trains the empty index on the driver and calibrates nprobe on a held-out part of the sample;
3. ships the trained empty index (serialised bytes) to the tasks inside the mapInArrow closure; the rows, in
   ceil(rows / ``index.vectors_per_shard``) groups (runs of the embeddings' files whose vectors the tasks read
   with pyarrow, laion_spark.index.located; or, with ``index.read_vectors`` spark, the input partitions coalesced:
   no shuffle of the vectors either way), are added by one task per group, which writes image/, text/ and
   metadata/ files for each shard of ``index.vectors_per_shard`` vectors at most and returns one row per shard;
4. writes manifest.json last, then deletes the files no manifest names.

A later run is incremental. It compares the ids in the index (its metadata files, read by Spark, one column) with
the current rows: new rows become new shards built from trained/<modality>.faiss (no retraining); ids no longer in
``dataset`` are removed (``remove_ids``) by one task per shard that holds some, which writes the shard under a new
name. Nothing new and nothing removed: no work. ``rebuild=True`` starts from scratch; readers keep the old index
until the new manifest replaces it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.config import ClipConfig, Config, ConfigError, IndexConfig
from laion_spark.index.choice import FLAT, IndexChoice, IndexChoiceError, choose_index
from laion_spark.index.layout import (
    MANIFEST,
    MODALITIES,
    TRAINED_PATH,
    IndexMissing,
    Manifest,
    ModelRef,
    Shard,
    index_location,
    read_manifest,
    write_manifest,
)
from laion_spark.index.located import by_file, locate_vectors, located_columns
from laion_spark.index.shards import (
    BUILT_SCHEMA,
    REWRITTEN_SCHEMA,
    SAMPLED_SCHEMA,
    VECTOR_COLUMNS,
    VECTOR_FILE,
    VECTOR_KEY,
    SampleWriter,
    ShardBuilder,
    VectorFiles,
    read_arrow,
    rewrite_shard,
    sample_part_path,
    shard_name,
    vectors_from_arrow,
    with_vectors,
)
from laion_spark.index.train import query_ef_search, set_search_params, train_index
from laion_spark.run.progress import stage_progress
from laion_spark.schemas import DATASET, EMBEDDINGS
from laion_spark.storage import StageCounter, latest_version, new_run_id, table_exists
from laion_spark.storage.delta import read_table_version
from laion_spark.storage.ids import sample_id_column
from laion_spark.storage.outputs import OutputDir

log = logging.getLogger(__name__)

STAGE = "index"
OK = "ok"
# An index chosen and trained for n vectors that has grown past this many times n is due a --rebuild: its lists
# are too long for the nprobe calibrated then, or its type no longer fits the budget.
REBUILD_GROWTH = 10
SAMPLE_SEED = 17
SAMPLE_PREFIX = "_sample-"  # the staged training sample's directory in the index directory, during a build
# Tasks that stage the training sample from located vectors (VectorFiles): about this many rows each.
SAMPLE_ROWS_PER_TASK = 50_000
READ_VECTORS = ("auto", "files", "spark")


@dataclass
class IndexResult:
    """What one ``laion-spark index`` run did."""

    location: str
    action: str  # built | updated | unchanged
    manifest: Manifest
    added: int = 0
    removed: int = 0
    new_shards: int = 0
    rewritten_shards: int = 0
    emptied_shards: int = 0  # shards whose every vector was removed: dropped from the manifest
    duplicate_ids: int = 0  # rows not indexed because another row had the same sample id
    deleted_files: int = 0
    rebuild_advice: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    vectors_read_by: str = ""  # "files" (pyarrow in the tasks, index.read_vectors) or "spark"; "" without work

    @property
    def count(self) -> int:
        return self.manifest.count

    def summary(self) -> str:
        m = self.manifest
        kind = f"{m.index_type} ({m.factory}"
        if m.nprobe:
            recall = m.params.get("recall_at_10")
            kind += f", nprobe {m.nprobe}" + (f", held-out recall@10 {recall:.3f}" if recall is not None else "")
        kind += ")"
        head = {
            "built": f"index: built {kind}",
            "updated": f"index: updated {kind}",
            "unchanged": f"index: up to date ({kind})",
        }[self.action]
        lines = [
            f"{head} in {self.location}",
            f"  {m.count:,} vectors (image and text, dimension {m.dim}) in {len(m.shards)} shard(s); "
            f"dataset v{m.dataset_version}, embeddings v{m.embeddings_version}; model {m.model.name}",
        ]
        if self.action == "unchanged":
            lines.append("  nothing new and nothing removed since the last run: no work")
        elif self.action == "updated" and not (self.added or self.removed):
            lines.append("  nothing new and nothing removed: no shard touched (the manifest records the new versions)")
        else:
            lines.append(
                f"  added {self.added:,} in {self.new_shards} new shard(s); removed {self.removed:,} "
                f"({self.rewritten_shards} shard(s) rewritten, {self.emptied_shards} emptied)"
            )
        if self.duplicate_ids:
            lines.append(f"  {self.duplicate_ids:,} row(s) left out: their sample id is another pair's too")
        if self.deleted_files:
            lines.append(f"  {self.deleted_files} unreferenced file(s) deleted")
        if self.seconds:
            timings = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.seconds.items())
            if self.vectors_read_by:
                timings += f" (vectors read by {self.vectors_read_by})"
            lines.append("  " + timings)
        if self.rebuild_advice:
            lines.append(f"  advice: {self.rebuild_advice}")
        return "\n".join(lines)


@dataclass
class BuildReport:
    """A full build from a DataFrame of vectors (:func:`build_index`)."""

    manifest: Manifest
    duplicate_ids: int
    seconds: dict[str, float]


def run_index(
    spark: SparkSession, config: Config, lake: str, rebuild: bool = False, run_id: str | None = None
) -> IndexResult:
    """Build the lake's kNN index, or bring it up to date with ``dataset`` and ``embeddings``."""
    started = time.perf_counter()
    settings = config.index
    validate_settings(settings)
    directory = index_location(lake, settings.path)
    run_id = run_id or new_run_id()
    counter = StageCounter(run_id, STAGE)
    for table in (DATASET, EMBEDDINGS):
        if not table_exists(spark, lake, table):
            raise FileNotFoundError(f"lake {lake} has no '{table}' table: run `laion-spark score` first")
    # Pinned versions: the index reflects exactly these, whatever commits land while it builds.
    dataset_version = int(latest_version(spark, lake, DATASET))
    embeddings_version = int(latest_version(spark, lake, EMBEDDINGS))
    previous = None if rebuild else _read_previous(directory)

    if previous is not None and (previous.dataset_version, previous.embeddings_version) == (
        dataset_version,
        embeddings_version,
    ):
        deleted = delete_unreferenced(directory, previous)
        counter.add("indexed", previous.count, previous.count)
        counter.write(spark, lake)
        return IndexResult(
            directory.uri, "unchanged", previous, deleted_files=deleted, run_id=run_id, seconds=_since(started)
        )

    dataset = read_table_version(spark, lake, DATASET, dataset_version)
    embeddings = read_table_version(spark, lake, EMBEDDINGS, embeddings_version)
    census = _census(dataset, embeddings)
    counter.add("with_ok_embedding", census["dataset_rows"], census["embedded_rows"])
    # No embedded row left (every pair deleted): nothing to add, and the index keeps its model.
    model_name = _one_model(census["models"], lake) or (previous.model.name if previous is not None else "")
    model = model_ref(model_name, config.clip)
    files = locate_vectors(embeddings, mode=settings.read_vectors)
    rows = indexable_rows(dataset, embeddings, located=files is not None)
    if previous is None and census["embedded_rows"] == 0:
        raise ConfigError(f"lake {lake}: no dataset row has an ok embedding, nothing to index (run score first)")
    with stage_progress(config, STAGE, census["embedded_rows"], "vectors", run_id) as progress:
        result = _build_or_update(
            spark,
            settings,
            directory,
            previous,
            rows,
            census,
            model,
            dataset_version,
            embeddings_version,
            run_id,
            files,
        )
        progress.advance(census["embedded_rows"])
    if previous is None:
        counter.add("added", census["embedded_rows"], result.manifest.count)
    else:
        counter.add("removed", previous.count, previous.count - result.removed)
        counter.add("added", result.added + result.duplicate_ids, result.added)
    result.vectors_read_by = "files" if files is not None else "spark"
    result.deleted_files = delete_unreferenced(directory, result.manifest)
    result.rebuild_advice = rebuild_advice(result.manifest, settings)
    result.run_id = run_id
    result.seconds["total"] = time.perf_counter() - started
    counter.add("indexed", census["embedded_rows"], result.manifest.count)
    counter.write(spark, lake)
    return result


def _build_or_update(
    spark: SparkSession,
    settings: IndexConfig,
    directory: OutputDir,
    previous: Manifest | None,
    rows: DataFrame,
    census: dict,
    model: ModelRef,
    dataset_version: int,
    embeddings_version: int,
    run_id: str,
    files: VectorFiles | None,
) -> IndexResult:
    if previous is None:
        report = build_index(
            spark,
            rows,
            directory,
            settings,
            model=model,
            dataset_version=dataset_version,
            embeddings_version=embeddings_version,
            prefix=run_id,
            files=files,
        )
        manifest = report.manifest
        result = IndexResult(
            directory.uri,
            "built",
            manifest,
            added=manifest.count,
            new_shards=len(manifest.shards),
            duplicate_ids=report.duplicate_ids,
            seconds=report.seconds,
        )
    else:
        result = _update(
            spark, rows, directory, settings, previous, model, dataset_version, embeddings_version, run_id, files
        )
    return result


def build_index(
    spark: SparkSession,
    vectors: DataFrame,
    directory: OutputDir | str,
    settings: IndexConfig,
    model: ModelRef | None = None,
    dataset_version: int = -1,
    embeddings_version: int = -1,
    prefix: str | None = None,
    files: VectorFiles | None = None,
) -> BuildReport:
    """A full build from ``vectors``: a DataFrame with ``id`` (long), ``image_embedding`` and ``text_embedding``
    (array<float>, L2-normalised) or, with ``files``, the columns that locate them (:func:`locate_vectors`), and any
    of the metadata columns (layout.METADATA_COLUMNS; missing ones are null). Writes the index into ``directory``
    (manifest last) and returns it. run_index's machinery, callable without a lake (bench/index.py)."""
    validate_settings(settings)
    directory = OutputDir(directory) if isinstance(directory, str) else directory
    prefix = prefix or new_run_id()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    census = id_census(vectors)
    n = census.rows
    seconds["census"] = time.perf_counter() - clock
    sample = None
    try:
        clock = time.perf_counter()
        if n > settings.flat_max_rows:  # an IVF type, trained on a sample (which also gives the dimension)
            sample = draw_sample(
                vectors, min(n, settings.train_sample), n, directory, f"{SAMPLE_PREFIX}{prefix}", files
            )
            d = sample.dimension()
        else:
            d = _dimension(vectors, files)
        seconds["sample"] = time.perf_counter() - clock
        clock = time.perf_counter()
        choice = choose_index(n, d, settings.max_memory_gb, settings.flat_max_rows, settings.train_sample)
        log.info("index: %s for %d vectors of dimension %d (%s)", choice.index_type, n, d, choice.factory)
        trained, params = train_on_sample(sample, choice, settings)
    finally:
        if sample is not None:
            directory.delete(sample.name)
    for modality in MODALITIES:
        directory.publish_bytes(TRAINED_PATH.format(modality=modality), trained[modality])
    seconds["train"] = time.perf_counter() - clock
    clock = time.perf_counter()
    built, duplicates = add_shards(vectors, trained, directory, d, prefix, 0, census, settings.vectors_per_shard, files)
    seconds["add"] = time.perf_counter() - clock
    now = _now()
    manifest = Manifest(
        dim=d,
        index_type=choice.index_type,
        factory=choice.factory,
        params=params,
        model=model or ModelRef(name=""),
        embeddings_version=embeddings_version,
        dataset_version=dataset_version,
        count=sum(shard.count for shard in built),
        shards=built,
        built_at=now,
        updated_at=now,
    )
    write_manifest(directory, manifest)
    return BuildReport(manifest, duplicates, seconds)


def train_on_sample(
    sample: StagedSample | None, choice: IndexChoice, settings: IndexConfig
) -> tuple[dict[str, bytes], dict]:
    """The trained, empty index of each modality (serialised) and the manifest's params. ``sample`` (from
    :func:`draw_sample`; None for Flat) holds ``choice.sample_rows`` rows at most: the only embeddings the driver
    ever sees, one modality at a time."""
    import faiss

    params: dict[str, Any] = choice.params()
    params.update(
        max_memory_gb=settings.max_memory_gb,
        flat_max_rows=settings.flat_max_rows,
        train_sample=settings.train_sample,
        vectors_per_shard=settings.vectors_per_shard,
        target_recall=settings.target_recall,
    )
    if not choice.trained:
        empty = faiss.index_factory(choice.d, choice.factory, faiss.METRIC_INNER_PRODUCT)
        blob = faiss.serialize_index(empty).tobytes()
        return {modality: blob for modality in MODALITIES}, params

    order = np.random.default_rng(SAMPLE_SEED).permutation(sample.num_rows)  # the held-out rows: any partition
    indexes, calibrations = {}, {}
    for modality in MODALITIES:
        matrix = vectors_from_arrow(sample.column(modality), choice.d, f"{modality} embedding")
        indexes[modality], calibrations[modality] = train_index(
            choice, matrix[order], settings.target_recall, settings.nprobe
        )
        del matrix
    # One nprobe for both: the larger of the two modalities' choices, so that each reaches the target.
    nprobe = max(calibration.nprobe for calibration in calibrations.values())
    for index in indexes.values():
        set_search_params(index, nprobe)
    params.update(
        sample_rows=sample.num_rows,
        nprobe=nprobe,
        quantizer_ef_search=query_ef_search(nprobe),
        recall_at_10=_finite(min(c.recall_by_nprobe.get(str(nprobe), c.recall_at_10) for c in calibrations.values())),
        calibration={
            modality: {**dataclasses.asdict(c), "recall_at_10": _finite(c.recall_at_10)}
            for modality, c in calibrations.items()
        },
    )
    return {modality: faiss.serialize_index(index).tobytes() for modality, index in indexes.items()}, params


@dataclass(frozen=True)
class StagedSample:
    """The training sample, staged by the Spark tasks that drew it (laion_spark.index.shards.SampleWriter) and read
    back on the driver ``rows`` rows at most, one modality at a time. Collecting it instead (toArrow) holds it several
    times over in the driver's JVM: 200,000 rows of two 512-float embeddings (800 MB) exhausted a 4 GB heap."""

    directory: OutputDir
    name: str
    parts: list[tuple[int, int]]  # (part, rows), in part order
    rows: int

    @property
    def num_rows(self) -> int:
        return min(self.rows, sum(rows for _, rows in self.parts))

    def column(self, modality: str):
        import pyarrow as pa

        chunks, wanted = [], self.num_rows
        for part, rows in self.parts:
            if wanted <= 0:
                break
            table = read_arrow(self.directory, sample_part_path(self.name, modality, part))
            chunks.extend(table.column(VECTOR_COLUMNS[modality]).slice(0, min(rows, wanted)).chunks)
            wanted -= rows
        return pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.list_(pa.float32()))

    def dimension(self) -> int:
        if not self.parts:
            raise ConfigError("nothing to index: no row with embeddings")
        part = self.parts[0][0]
        image, text = (
            len(read_arrow(self.directory, sample_part_path(self.name, m, part)).column(column)[0])
            for m, column in VECTOR_COLUMNS.items()
        )
        if image != text or image < 1:
            raise ValueError(f"image embeddings have dimension {image} and text embeddings {text}: they must match")
        return image


def draw_sample(
    vectors: DataFrame, rows: int, n: int, directory: OutputDir, name: str, files: VectorFiles | None = None
) -> StagedSample:
    """A random sample of both embeddings, staged by the tasks in ``directory``/``name``, of which the driver reads
    ``rows`` rows at most."""
    # A little over (four standard deviations of the binomial count), so that the limit rather than chance sets
    # the size. The limit is the driver's read: a DataFrame limit would funnel the sample through one task.
    fraction = min(1.0, (rows + 4 * math.sqrt(rows) + 10) / max(n, 1))
    sample = vectors.select(*((VECTOR_FILE, VECTOR_KEY) if files else VECTOR_COLUMNS.values()))
    if fraction < 1.0:
        sample = sample.sample(withReplacement=False, fraction=fraction, seed=SAMPLE_SEED)
    if files is not None:
        sample, _ = by_file(sample, SAMPLE_ROWS_PER_TASK)
    writer = SampleWriter(directory, name, files)
    parts = sample.mapInArrow(writer, SAMPLED_SCHEMA).collect()  # one small row per task
    return StagedSample(directory, name, sorted((row["part"], int(row["rows"])) for row in parts), rows)


@dataclass(frozen=True)
class IdCensus:
    """The rows to add, and how many of them repeat the id of another (left out: one row per id is indexed)."""

    rows: int
    duplicates: int


def id_census(vectors: DataFrame) -> IdCensus:
    """One aggregation over the id column alone: 8 bytes a row through the shuffle, no vector read."""
    row = (
        vectors.groupBy("id")
        .count()
        .agg(F.sum("count").alias("rows"), F.sum(F.col("count") - 1).alias("duplicates"))
        .first()
    )
    return IdCensus(int(row["rows"] or 0), int(row["duplicates"] or 0))


def add_shards(
    vectors: DataFrame,
    trained: dict[str, bytes],
    directory: OutputDir,
    d: int,
    prefix: str,
    first_number: int,
    census: IdCensus,
    vectors_per_shard: int,
    files: VectorFiles | None = None,
) -> tuple[list[Shard], int]:
    """Add ``vectors`` (``census``: :func:`id_census` of them) to new shards of ``vectors_per_shard`` vectors at
    most; returns (shards, rows left out for their duplicate id)."""
    if census.rows == 0:
        return [], 0
    shards = max(1, math.ceil(census.rows / vectors_per_shard))
    metadata = [name for name in _metadata_names() if name in vectors.columns]
    rows = vectors.select(*metadata, *((VECTOR_FILE, VECTOR_KEY) if files else VECTOR_COLUMNS.values()))

    def grouped(frame: DataFrame) -> tuple[DataFrame, int]:
        return by_file(frame, vectors_per_shard) if files else (frame.coalesce(shards), shards)

    # The input partitions, coalesced (narrow: no shuffle) into one group per shard. Nothing locates a shard by
    # its ids later (removal reads the metadata files for each id's shard), so any split of the rows serves, and
    # hash-partitioning by id cost a shuffle of every vector: 4 GB of array<float> for 1M rows of two 512-float
    # embeddings, a third of the build (bench/index.py). A group of more rows than a shard holds (fewer input
    # partitions than shards) is cut into several shards by its task. Located vectors are grouped by file instead
    # (by_file), which moves only the small columns.
    parts, partitions = grouped(rows)
    if census.duplicates:
        # Ids that two rows share (true collisions of 63-bit sample ids: rare) must meet in one task, which keeps
        # one row of each. Only their rows go through a shuffle, by id, into partitions of their own after the
        # coalesced ones: the input is read once more for them (and for their ids), but few rows move.
        shared_ids = F.broadcast(vectors.groupBy("id").count().where(F.col("count") > 1).select("id"))
        shared_partitions = max(1, math.ceil(2 * census.duplicates / vectors_per_shard))
        shared = rows.join(shared_ids, "id", "left_semi").repartition(shared_partitions, "id")
        parts, partitions = grouped(rows.join(shared_ids, "id", "left_anti"))
        parts = parts.unionByName(shared)
        partitions += shared_partitions
    builder = ShardBuilder(directory, trained, d, prefix, first_number, vectors_per_shard, partitions, files)
    built = parts.mapInArrow(builder, BUILT_SCHEMA).collect()  # one small row per shard
    duplicates = sum(int(row["duplicates"]) for row in built)
    built = sorted((row for row in built if row["shard"]), key=lambda row: row["number"])
    return [Shard(row["shard"], int(row["count"])) for row in built], duplicates


def _update(
    spark: SparkSession,
    rows: DataFrame,
    directory: OutputDir,
    settings: IndexConfig,
    previous: Manifest,
    model: ModelRef,
    dataset_version: int,
    embeddings_version: int,
    prefix: str,
    files: VectorFiles | None = None,
) -> IndexResult:
    if model.name != previous.model.name:
        raise ConfigError(
            f"the index in {directory.uri} holds embeddings of model {previous.model.name!r}, the lake's are now "
            f"{model.name!r}: run `laion-spark index --rebuild`"
        )
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    indexed = indexed_ids(spark, directory, previous)
    current = rows.select("id")
    gone = indexed.join(current, "id", "left_anti")
    removals = {row["shard"]: int(row["count"]) for row in gone.groupBy("shard").count().collect()}  # per shard
    to_add = rows.join(indexed.select("id"), "id", "left_anti")
    to_add_census = id_census(to_add)
    seconds["diff"] = time.perf_counter() - clock

    replaced: dict[str, Shard | None] = {}
    removed = 0
    if removals:
        clock = time.perf_counter()
        replaced, removed = _rewrite_without(gone, sorted(removals), directory, previous, prefix)
        seconds["remove"] = time.perf_counter() - clock

    added_shards: list[Shard] = []
    duplicates = 0
    if to_add_census.rows:
        clock = time.perf_counter()
        if (d := _dimension(to_add, files)) != previous.dim:
            raise ConfigError(
                f"the index in {directory.uri} holds vectors of dimension {previous.dim}, new embeddings have {d}: "
                "run `laion-spark index --rebuild`"
            )
        trained = {m: _read_trained(directory, m) for m in MODALITIES}
        added_shards, duplicates = add_shards(
            to_add,
            trained,
            directory,
            previous.dim,
            prefix,
            len(removals),
            to_add_census,
            settings.vectors_per_shard,
            files,
        )
        seconds["add"] = time.perf_counter() - clock

    shards = [replaced.get(shard.name, shard) for shard in previous.shards]
    kept = [shard for shard in shards if shard is not None] + added_shards
    manifest = dataclasses.replace(
        previous,
        shards=kept,
        count=sum(shard.count for shard in kept),
        # The config's weights when it names the model, else the ones recorded before.
        model=model if (model.pretrained or model.model_config) else previous.model,
        dataset_version=dataset_version,
        embeddings_version=embeddings_version,
        updated_at=_now(),
    )
    write_manifest(directory, manifest)
    return IndexResult(
        directory.uri,
        "updated",
        manifest,
        added=sum(shard.count for shard in added_shards),
        removed=removed,
        new_shards=len(added_shards),
        rewritten_shards=sum(1 for shard in replaced.values() if shard is not None),
        emptied_shards=sum(1 for shard in replaced.values() if shard is None),
        duplicate_ids=duplicates,
        seconds=seconds,
    )


def _rewrite_without(
    gone: DataFrame, shards: list[str], directory: OutputDir, previous: Manifest, prefix: str
) -> tuple[dict[str, Shard | None], int]:
    """Rewrite each of ``shards`` without the ids ``gone`` (id, shard) names in it, one task per shard, each under
    a new name. Returns old name -> new shard (None when emptied), and the vectors removed."""
    new_names = {old: shard_name(prefix, number) for number, old in enumerate(shards)}
    old_shards = {shard.name: shard for shard in previous.shards}

    def rewrite(ids):  # one shard's ids to remove (pandas), in the task that rewrites it
        import pandas as pd

        old = old_shards[ids["shard"].iloc[0]]
        new, left, dropped = rewrite_shard(ids["id"].to_numpy(), old, new_names[old.name], directory)
        return pd.DataFrame({"old": [old.name], "new": [new], "count": [left], "removed": [dropped]})

    replaced: dict[str, Shard | None] = {}
    removed = 0
    for row in gone.groupBy("shard").applyInPandas(rewrite, REWRITTEN_SCHEMA).collect():  # one row per shard
        replaced[row["old"]] = Shard(row["new"], int(row["count"])) if row["new"] else None
        removed += int(row["removed"])
    return replaced, removed


@dataclass
class IndexRemoval:
    """What :func:`remove_from_index` did: vectors removed (each of them from both the image and the text index)."""

    location: str
    removed: int = 0
    rewritten_shards: int = 0
    emptied_shards: int = 0
    exists: bool = True  # False: the lake has no index yet (nothing to remove from)


def remove_from_index(
    spark: SparkSession, config: Config, lake: str, uids: DataFrame, run_id: str | None = None
) -> IndexRemoval:
    """Remove the vectors of ``uids`` (a DataFrame with a ``uid`` column) from the lake's index now, without adding
    anything: the shards holding them are rewritten without them and the manifest switches to the new set, so
    that search and a running serve (it reloads on a new manifest) never return them again (a takedown)."""
    directory = index_location(lake, config.index.path)
    previous = _read_previous(directory)
    if previous is None:
        return IndexRemoval(directory.uri, exists=False)
    wanted = uids.select(sample_id_column("uid").alias("id")).distinct()
    gone = indexed_ids(spark, directory, previous).join(wanted, "id", "left_semi")
    shards = sorted(row["shard"] for row in gone.select("shard").distinct().collect())  # shard names only
    if not shards:
        return IndexRemoval(directory.uri)
    replaced, removed = _rewrite_without(gone, shards, directory, previous, run_id or new_run_id())
    kept = [replaced.get(shard.name, shard) for shard in previous.shards]
    kept = [shard for shard in kept if shard is not None]
    # The versions stay those the index was built from: the next `laion-spark index` compares with dataset as usual.
    manifest = dataclasses.replace(previous, shards=kept, count=sum(s.count for s in kept), updated_at=_now())
    write_manifest(directory, manifest)
    delete_unreferenced(directory, manifest)
    return IndexRemoval(
        directory.uri,
        removed=removed,
        rewritten_shards=sum(1 for shard in replaced.values() if shard is not None),
        emptied_shards=sum(1 for shard in replaced.values() if shard is None),
    )


def indexable_rows(dataset: DataFrame, embeddings: DataFrame, located: bool = False) -> DataFrame:
    """The rows to index: dataset's pairs (metadata columns of the layout) with their ok embeddings and sample id;
    with ``located``, where the embeddings lie (VECTOR_FILE, VECTOR_KEY: the embeddings' uid) instead of the vectors."""
    vectors = located_columns("uid") if located else list(VECTOR_COLUMNS.values())
    ok = embeddings.where(F.col("status") == OK).select("uid", *vectors)
    pairs = dataset.select(
        "uid",
        "url",
        F.col("text").alias("caption"),
        "similarity",
        "width",
        "height",
        "language",
        "nsfw",
        "punsafe",
    )
    return pairs.join(ok, "uid").withColumn("id", sample_id_column("uid"))


def indexed_ids(spark: SparkSession, directory: OutputDir, manifest: Manifest) -> DataFrame:
    """(id, shard) of every vector the manifest's shards hold, read by Spark from their metadata files."""
    if not manifest.shards:
        return spark.createDataFrame([], "id long, shard string")
    paths = [directory.uri_of(shard.metadata_path) for shard in manifest.shards]
    metadata = spark.read.parquet(*paths)
    shard = F.regexp_extract(F.col("_metadata.file_name"), r"^(.*)\.parquet$", 1)
    return metadata.select("id", shard.alias("shard"))


def model_ref(name: str, clip: ClipConfig) -> ModelRef:
    """The model the index's embeddings come from; with the config's weights when the config names that model (the
    search side then embeds queries with it), else the name alone (the search side asks for the weights)."""
    from laion_spark.score.model import resolve_local_path

    if clip.model == name:
        return ModelRef(
            name=name,
            pretrained=resolve_local_path(clip.pretrained),
            model_config=resolve_local_path(clip.model_config),
        )
    return ModelRef(name=name)


def rebuild_advice(manifest: Manifest, settings: IndexConfig) -> str:
    """Why a --rebuild would serve better than the index as it has grown (or shrunk), or ""."""
    n = manifest.count
    built_for = int(manifest.params.get("n", 0) or 0)
    if manifest.index_type == FLAT and n > settings.flat_max_rows:
        return (
            f"the index is exact (Flat) and now holds {n:,} vectors, over index.flat_max_rows "
            f"({settings.flat_max_rows:,}): run `laion-spark index --rebuild` for an IVF index"
        )
    if manifest.index_type != FLAT and built_for and n > REBUILD_GROWTH * built_for:
        return (
            f"the index was chosen and trained for {built_for:,} vectors and now holds {n:,}: run "
            "`laion-spark index --rebuild` to retrain it for its size"
        )
    try:
        now = choose_index(n, manifest.dim, settings.max_memory_gb, settings.flat_max_rows, settings.train_sample)
    except IndexChoiceError as exc:
        return str(exc)
    if manifest.index_type != FLAT and now.estimated_bytes > now.budget_bytes:
        return f"at {n:,} vectors the index outgrows index.max_memory_gb: run `laion-spark index --rebuild`"
    return ""


def delete_unreferenced(directory: OutputDir, manifest: Manifest) -> int:
    """Delete shard files the manifest does not name (earlier versions, killed builds) and stray temporaries."""
    keep = {shard.name for shard in manifest.shards}
    deleted = 0
    for folder, suffix in (("image", ".faiss"), ("text", ".faiss"), ("metadata", ".parquet")):
        for name in directory.list(folder):
            if not (name.endswith(suffix) and name[: -len(suffix)] in keep):
                directory.delete(folder, name)
                deleted += 1
        deleted += directory.remove_temporaries(folder)
    trained = {TRAINED_PATH.format(modality=m).split("/", 1)[1] for m in MODALITIES}
    for name in directory.list("trained"):
        if name not in trained:
            directory.delete("trained", name)
            deleted += 1
    deleted += directory.remove_temporaries("trained") + directory.remove_temporaries()
    for name in _subdirectories(directory):
        if name.startswith(SAMPLE_PREFIX):  # a killed build's training sample
            directory.delete(name)
            deleted += 1
    return deleted


def _subdirectories(directory: OutputDir) -> list[str]:
    from pyarrow import fs as pafs

    selector = pafs.FileSelector(directory.path(), allow_not_found=True)
    infos = directory.filesystem.get_file_info(selector)
    return [info.base_name for info in infos if info.type == pafs.FileType.Directory]


def validate_settings(settings: IndexConfig) -> None:
    positive = {
        "max_memory_gb": settings.max_memory_gb,
        "train_sample": settings.train_sample,
        "vectors_per_shard": settings.vectors_per_shard,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"index.{name} must be positive, got {value}")
    if settings.flat_max_rows < 0:
        raise ConfigError(f"index.flat_max_rows must be 0 or more, got {settings.flat_max_rows}")
    if settings.nprobe < 0:
        raise ConfigError(f"index.nprobe must be 0 (calibrated) or a list count, got {settings.nprobe}")
    if not 0.0 < settings.target_recall <= 1.0:
        raise ConfigError(f"index.target_recall is a recall between 0 and 1, got {settings.target_recall}")
    if settings.read_vectors not in READ_VECTORS:
        raise ConfigError(f"index.read_vectors is one of {', '.join(READ_VECTORS)}, got {settings.read_vectors!r}")


def _census(dataset: DataFrame, embeddings: DataFrame) -> dict[str, Any]:
    """Dataset rows, those with an ok embedding, and the embeddings' models: one job over key columns."""
    embedded = embeddings.where(F.col("status") == OK).select("uid", "model", F.lit(True).alias("embedded"))
    row = (
        dataset.select("uid")
        .join(embedded, "uid", "left")
        .agg(
            F.count(F.lit(1)).alias("dataset_rows"),
            F.count("embedded").alias("embedded_rows"),
            F.array_sort(F.collect_set("model")).alias("models"),
        )
        .first()
    )
    return {
        "dataset_rows": int(row["dataset_rows"]),
        "embedded_rows": int(row["embedded_rows"]),
        "models": row["models"],
    }


def _one_model(models: list[str], lake: str) -> str:
    if len(models) > 1:
        raise ConfigError(
            f"lake {lake}: the dataset's embeddings come from {len(models)} models ({', '.join(models)}); one index "
            "holds one model's vectors: rescore the lake with one model"
        )
    return models[0] if models else ""


def _dimension(vectors: DataFrame, files: VectorFiles | None = None) -> int:
    """The embeddings' dimension, from one row (every task checks each row's against it)."""
    if files is None:
        row = vectors.select(*(F.size(column).alias(m) for m, column in VECTOR_COLUMNS.items())).limit(1).first()
        if row is None:
            raise ConfigError("nothing to index: no row with embeddings")
        image, text = int(row["image"]), int(row["text"])
    else:
        import pyarrow as pa

        row = vectors.select(VECTOR_FILE, VECTOR_KEY).limit(1).first()
        if row is None:
            raise ConfigError("nothing to index: no row with embeddings")
        located = pa.RecordBatch.from_pydict({VECTOR_FILE: [row[0]], VECTOR_KEY: [row[1]]})
        batch = next(with_vectors(iter([located]), files))
        image, text = (len(batch.column(column)[0]) for column in (VECTOR_COLUMNS["image"], VECTOR_COLUMNS["text"]))
    if image != text or image < 1:
        raise ValueError(f"image embeddings have dimension {image} and text embeddings {text}: they must match")
    return image


def _read_previous(directory: OutputDir) -> Manifest | None:
    if not directory.exists(MANIFEST):
        return None
    try:
        return read_manifest(directory)
    except IndexMissing:
        return None


def _read_trained(directory: OutputDir, modality: str) -> bytes:
    path = TRAINED_PATH.format(modality=modality)
    if not directory.exists(path):
        raise ConfigError(f"the index in {directory.uri} has no {path} to add new shards with: run with --rebuild")
    return directory.read_bytes(path)


def _metadata_names() -> list[str]:
    from laion_spark.index.layout import METADATA_COLUMNS

    return [name for name, _ in METADATA_COLUMNS]


def _finite(value: float) -> float | None:
    """JSON has no NaN: a recall that could not be measured (no held-out rows) is null."""
    return None if value != value else round(float(value), 4)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _since(started: float) -> dict[str, float]:
    return {"total": time.perf_counter() - started}
