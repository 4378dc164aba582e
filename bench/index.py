"""kNN index: the Spark build (run_index's machinery) against a plain single-process faiss build, recall@10 and QPS.

    python bench/index.py                  # 1,000,000 clustered vectors of dimension 512
    python bench/index.py --quick          # 200,000 (an IVF index still: Flat stops at index.flat_max_rows)
    python bench/index.py --rows 2000000 --dim 768

The vectors are a Gaussian mixture around a few thousand centres (cluster weights log-normal, each cluster its own
spread), L2-normalised like CLIP embeddings, written once as parquet with pyarrow (under bench/data/index/) and
reused. The same vectors serve as image and text embeddings, so both sides build two indexes, as the stage does.

* Spark: ``laion_spark.index.build_index`` over ``spark.read.parquet`` (``local[N]``, N = the cores given): the id
  census (rows and duplicate ids, over the id column), the bounded training sample (staged by the tasks, read by
  the driver), training and nprobe calibration on the driver (faiss on all N cores), then one task per shard (the
  input partitions coalesced, no shuffle) adding vectors (one faiss thread each; ``index.vectors_per_shard`` =
  rows / N, so that every core builds a shard) and writing its files. Timed from the read to the manifest; the
  session is started before.
* single process: the same faiss factory string, training sample size and nprobe, in plain faiss calls on all N
  cores: read the parquet (pyarrow), train, add, write the index files. The floor.

Both go from the same parquet files to index files on disk. Throughput per core is rows / (wall seconds x N) for
both, so their ratio is single / Spark wall time; the ratio without the single process's read (train + add + write
only) is printed beside, and so are CPU seconds (for Spark: driver, JVM and Python workers together, which also
counts the JVM's share of the cores). Then recall@10 of the Spark-built, sharded
index at the parameters it chose against exact search (``faiss.knn``), on held-out queries drawn from the same
mixture, and queries per second: a batch over all cores, and one query at a time on one thread.

Targets (issue 11): recall@10 >= 0.95 at the default parameters; Spark build >= 0.8x the single process's
throughput per core.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
from extract import _cpu_seconds_of_tree  # noqa: E402 - bench/ is on sys.path when this file runs

DATA = ROOT / "bench" / "data" / "index"
ROWS_PER_FILE = 50_000
SEED = 11


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


class Mixture:
    """A Gaussian mixture on the unit sphere: ``centres`` unit centres, log-normal weights and per-cluster spreads."""

    def __init__(self, dim: int, centres: int, seed: int = SEED) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = unit_rows(rng.standard_normal((centres, dim)).astype(np.float32))
        weights = rng.lognormal(0.0, 1.0, centres)
        self.weights = weights / weights.sum()
        # Noise norm relative to the centre: a member's cosine to its centre is 1 / sqrt(1 + spread^2), 0.6..0.9.
        self.spread = rng.uniform(0.5, 1.3, centres).astype(np.float32)

    def draw(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.choice(len(self.centres), size=rows, p=self.weights)
        noise = rng.standard_normal((rows, self.dim), dtype=np.float32)
        noise *= (self.spread[labels] / math.sqrt(self.dim))[:, None]
        return unit_rows(self.centres[labels] + noise)


def write_vectors(directory: Path, mixture: Mixture, rows: int) -> None:
    """``rows`` vectors as parquet files of ROWS_PER_FILE rows: id (int64), embedding (list<float32>)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (directory / "_SUCCESS").exists():
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(SEED + 1)
    for number, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        count = min(ROWS_PER_FILE, rows - start)
        vectors = mixture.draw(count, rng)
        offsets = pa.array(np.arange(0, (count + 1) * mixture.dim, mixture.dim, dtype=np.int32))
        embedding = pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel()))
        ids = pa.array(np.arange(start, start + count, dtype=np.int64))
        pq.write_table(pa.table({"id": ids, "embedding": embedding}), directory / f"part-{number:05d}.parquet")
    (directory / "_SUCCESS").touch()


def read_vectors(directory: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(directory, columns=["id", "embedding"])
    ids = table.column("id").to_numpy()
    values = table.column("embedding").combine_chunks().flatten().to_numpy()
    return ids, values.reshape(len(ids), dim)


def spark_build(directory: Path, out: Path, rows: int, cores: int, read_vectors: str) -> dict:
    from pyspark.sql import functions as F

    from laion_spark.config import IndexConfig, SparkConfig
    from laion_spark.index.build import build_index
    from laion_spark.index.located import locate_vectors, located_columns
    from laion_spark.session import build_local_session

    spark = build_local_session(
        SparkConfig(
            master=f"local[{cores}]",
            app_name="bench-index",
            conf={
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": "4g",
            },
        )
    )
    spark.sparkContext.setLogLevel("ERROR")
    settings = IndexConfig(vectors_per_shard=math.ceil(rows / cores), read_vectors=read_vectors)
    wall, cpu = time.perf_counter(), _cpu_seconds_of_tree()
    source = spark.read.parquet(str(directory))
    # The files hold one vector column, which stands for both modalities (as in the single-process build).
    files = locate_vectors(source, {"image": "embedding", "text": "embedding"}, "id", settings.read_vectors)
    if files is not None:
        vectors = source.select("id", *located_columns("id"))
    else:
        embedding = F.col("embedding")
        vectors = source.select("id", embedding.alias("image_embedding"), embedding.alias("text_embedding"))
    report = build_index(spark, vectors, str(out), settings, files=files)
    result = dict(
        wall_s=time.perf_counter() - wall,
        cpu_s=_cpu_seconds_of_tree() - cpu,
        report=report,
        settings=settings,
        read_by="pyarrow in the tasks" if files is not None else "Spark (array<float> to Arrow)",
    )
    spark.stop()
    return result


def single_process_build(data: Path, manifest, out: Path) -> dict:
    """Plain faiss: the factory string, training sample size and nprobe the Spark build used; read, train, add,
    write. Returns the timings and the vectors (for exact search)."""
    import faiss

    params = manifest.params
    rng = np.random.default_rng(SEED + 3)
    wall, cpu = time.perf_counter(), time.process_time()
    ids, vectors = read_vectors(data, manifest.dim)
    phases = {"read": time.perf_counter() - wall}
    for modality in ("image", "text"):
        started = time.perf_counter()
        index = faiss.index_factory(manifest.dim, manifest.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.clustering_index = faiss.IndexFlatIP(manifest.dim)
            sample = vectors[rng.choice(len(vectors), size=params["train_rows"], replace=False)]
            index.train(sample)
            del sample
            quantizer = faiss.downcast_index(ivf.quantizer)
            quantizer.hnsw.efSearch = 16  # what the Spark tasks assign lists with
        phases[f"{modality} train"] = time.perf_counter() - started
        started = time.perf_counter()
        index.add_with_ids(vectors, ids)
        if ivf is not None:
            ivf.nprobe = params["nprobe"]
            quantizer.hnsw.efSearch = params["quantizer_ef_search"]
        phases[f"{modality} add"] = time.perf_counter() - started
        started = time.perf_counter()
        faiss.write_index(index, str(out / f"{modality}.faiss"))
        phases[f"{modality} write"] = time.perf_counter() - started
        del index
    return dict(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, phases=phases, vectors=vectors)


def evaluate(out: Path, manifest, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> dict:
    """recall@10 and QPS of the sharded image index as the manifest describes it (every shard searched, merged)."""
    import faiss

    from laion_spark.index.shards import read_index
    from laion_spark.storage.outputs import OutputDir

    directory = OutputDir(str(out))
    shards = [read_index(directory, shard.path("image")) for shard in manifest.shards]

    def search(batch: np.ndarray) -> np.ndarray:
        scores, found = zip(*(shard.search(batch, k) for shard in shards), strict=True)
        scores, found = np.hstack(scores), np.hstack(found)
        best = np.argsort(-scores, axis=1)[:, :k]
        return np.take_along_axis(found, best, axis=1)

    started = time.perf_counter()
    found = search(queries)
    batch_qps = len(queries) / (time.perf_counter() - started)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    for query in queries:
        search(query[None, :])
    single_qps = len(queries) / (time.perf_counter() - started)
    faiss.omp_set_num_threads(threads)
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return dict(recall=hits / truth.size, batch_qps=batch_qps, single_qps=single_qps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="200,000 rows: a smoke run")
    parser.add_argument("--centres", type=int, default=3000, help="mixture components (default 3000)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and QPS")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="Spark local[N], faiss threads")
    parser.add_argument("--workdir", default=str(DATA), help=f"where vectors and indexes go (default {DATA})")
    parser.add_argument(
        "--keep-indexes", action="store_true", help="keep the two built indexes under --workdir (deleted by default)"
    )
    parser.add_argument(
        "--read-vectors",
        choices=("auto", "files", "spark"),
        default="auto",
        help="index.read_vectors: how the Spark tasks get the vectors (default auto: the parquet files, with pyarrow)",
    )
    args = parser.parse_args(argv)
    rows = 200_000 if args.quick else args.rows
    import faiss

    faiss.omp_set_num_threads(args.cores)
    load_before = os.getloadavg()
    workdir = Path(args.workdir)
    data = workdir / f"vectors-{rows}x{args.dim}-{args.centres}"
    mixture = Mixture(args.dim, args.centres)
    started = time.perf_counter()
    write_vectors(data, mixture, rows)
    queries = mixture.draw(args.queries, np.random.default_rng(SEED + 2))
    print(
        f"index bench: {rows:,} vectors of dimension {args.dim} around {args.centres:,} centres in {data} "
        f"({time.perf_counter() - started:.0f} s to write or find), {args.queries:,} held-out queries, "
        f"{args.cores} cores of {os.cpu_count()}"
    )

    spark_out, single_out = workdir / "spark-index", workdir / "single-index"
    for out in (spark_out, single_out):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    spark = spark_build(data, spark_out, rows, args.cores, args.read_vectors)
    manifest = spark["report"].manifest
    print(
        f"  index: {manifest.index_type}  factory {manifest.factory}  nprobe {manifest.nprobe}  "
        f"shards {len(manifest.shards)}  params: nlist {manifest.params.get('nlist')}, "
        f"train_rows {manifest.params.get('train_rows')}, held-out recall@10 {manifest.params.get('recall_at_10')}"
    )
    single = single_process_build(data, manifest, single_out)
    vectors = single.pop("vectors")
    started = time.perf_counter()
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    exact_s = time.perf_counter() - started
    del vectors
    quality = evaluate(spark_out, manifest, queries, truth)
    load_after = os.getloadavg()
    if not args.keep_indexes:  # two copies of the vectors each (8 GB at the default size); the vectors stay
        for out in (spark_out, single_out):
            shutil.rmtree(out, ignore_errors=True)

    per_core = {name: rows / (side["wall_s"] * args.cores) for name, side in (("single", single), ("spark", spark))}
    ratio = single["wall_s"] / spark["wall_s"]
    ratio_without_read = (single["wall_s"] - single["phases"]["read"]) / spark["wall_s"]
    print(f"  {'build':<16} {'wall s':>8} {'CPU s':>8} {'rows/s/core':>12}   phases")
    spark_phases = ", ".join(f"{k} {v:.1f} s" for k, v in spark["report"].seconds.items())
    single_phases = ", ".join(f"{k} {v:.1f} s" for k, v in single["phases"].items())
    print(
        f"  {'single process':<16} {single['wall_s']:8.1f} {single['cpu_s']:8.1f} {per_core['single']:12,.0f}   "
        f"{single_phases}"
    )
    print(
        f"  {'spark':<16} {spark['wall_s']:8.1f} {spark['cpu_s']:8.1f} {per_core['spark']:12,.0f}   "
        f"{spark_phases} (vectors_per_shard {spark['settings'].vectors_per_shard:,}; vectors read by "
        f"{spark['read_by']})"
    )
    print(
        f"  recall@10 {quality['recall']:.4f} against exact search ({exact_s:.1f} s), "
        f"QPS {quality['batch_qps']:,.0f} batched on {args.cores} threads, {quality['single_qps']:,.0f} one at a time "
        f"on 1 thread ({len(manifest.shards)} shards searched per query)"
    )
    print(f"  load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores")
    verdicts = [
        f"spark/single throughput per core {ratio:.2f} (target >= 0.8; {ratio_without_read:.2f} without the single "
        f"process's read, {single['cpu_s'] / spark['cpu_s']:.2f} in CPU seconds)",
        f"recall@10 {quality['recall']:.3f} (target >= 0.95)",
    ]
    print("result: " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
