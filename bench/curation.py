"""Near-duplicate curation on Spark: the pHash banded join and SemDeDup, recall and precision of planted copies,
rows/s per core, and the per-row cost at two sizes.

    python bench/curation.py                 # 250,000 and 1,000,000 rows, both methods
    python bench/curation.py --quick         # 25,000 and 100,000 rows (a smoke run, about a minute or two)
    python bench/curation.py --steps phash --sizes 500000 2000000

Data, written once with pyarrow under bench/data/curation/ and reused:

* pHash: uniformly random 64-bit hashes; a tenth of the rows are planted copies of another row with 0 to d random
  bits flipped (d = NearDupConfig.phash_distance, 4), ranked below their source (lower similarity). A planted copy
  should be dropped with its source as survivor. Random hashes are the hard case for the banded join: the bands
  of d + 1 = 5 are 12-13 bits wide, so about rows / 8,192 distinct hashes share each band value and are compared
  there (real pHashes cluster more, blank images above all; identical ones are collapsed before the join).
* SemDeDup: dimension 64 (CLIP's is 512-768: this keeps the data small and the run short; the cost is per
  multiply-add, so the scaling is the same), rows around rows / 1,000 topics (within-topic cosine about 0.7, far
  below 1 - epsilon = 0.95), a twentieth of the rows near-copies (cosine about 0.999) of another row, ranked
  below it. clusters = kmeans.default_clusters(rows), about sqrt(rows); k-means trained on NearDupConfig's
  kmeans_sample rows.

Recall: planted copies dropped / planted copies. Precision: dropped rows that are planted copies / dropped rows.
SemDeDup compares within k-means clusters only, so a copy that lands in another cluster than its source is missed:
its recall is below 1 by design, not by bug.

Each method writes its duplicates (parquet) from the same input read; the time is from the read to the written
output. The floor, measured in the same run on the same files, is the cheapest Spark step of the same kind: for
pHash, exact-hash dedup (one groupBy on the hash, written to the noop sink); for SemDeDup, reading the embeddings
(written to the noop sink). The x floor column is a method's time over its floor. The per-row cost ratio (large /
small size; 1.0 = linear) is the scaling figure. SemDeDup with about sqrt(rows) clusters compares each row with
about sqrt(rows) centroids and sqrt(rows) cluster members, so its arithmetic per row grows as sqrt(rows) (2x for
4x the rows); the ratio shows how much of that the fixed costs (reading, shuffling) hide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

DATA = ROOT / "bench" / "data" / "curation"
ROWS_PER_FILE = 100_000
PHASH_COPY_FRACTION = 0.10
SEMDEDUP_COPY_FRACTION = 0.05
DIM = 64
SEED = 5


def write_files(directory: Path, columns: dict, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = pa.table(columns)
    for number, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        pq.write_table(table.slice(start, ROWS_PER_FILE), tmp / f"part-{number:05d}.parquet")
    tmp.rename(directory)


def planted_copies(rng: np.random.Generator, rows: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(source of each row, -1 for originals) and similarities that rank every copy below its source."""
    copies = int(rows * fraction)
    source = np.full(rows, -1, dtype=np.int64)
    copy_rows = rng.choice(rows, size=copies, replace=False)
    originals = np.setdiff1d(np.arange(rows), copy_rows)
    source[copy_rows] = rng.choice(originals, size=copies)
    similarity = rng.uniform(0.3, 0.4, rows).astype(np.float32)
    similarity[copy_rows] = similarity[source[copy_rows]] - rng.uniform(0.01, 0.1, copies).astype(np.float32)
    return source, similarity


def phash_data(rows: int, max_distance: int) -> tuple[Path, np.ndarray]:
    directory = DATA / f"phash-{rows}-d{max_distance}"
    rng = np.random.default_rng(SEED)
    source, similarity = planted_copies(rng, rows, PHASH_COPY_FRACTION)
    if not directory.exists():
        import pyarrow as pa

        hashes = rng.integers(0, 2**64 - 1, rows, dtype=np.uint64, endpoint=True)
        for row in np.flatnonzero(source >= 0):
            value = hashes[source[row]]
            for bit in rng.choice(64, size=int(rng.integers(0, max_distance + 1)), replace=False):
                value ^= np.uint64(1) << np.uint64(bit)
            hashes[row] = value
        columns = {
            "uid": pa.array([f"u{i:09d}" for i in range(rows)]),
            "phash": pa.array(hashes.view(np.int64)),
            "similarity": pa.array(similarity),
            "crawl_date": pa.nulls(rows, pa.timestamp("us", tz="UTC")),
        }
        write_files(directory, columns, rows)
    return directory, source


def semdedup_data(rows: int) -> tuple[Path, np.ndarray]:
    directory = DATA / f"semdedup-{rows}-dim{DIM}"
    rng = np.random.default_rng(SEED)
    source, similarity = planted_copies(rng, rows, SEMDEDUP_COPY_FRACTION)
    if not directory.exists():
        import pyarrow as pa

        topics = rng.normal(size=(max(1, rows // 1000), DIM)).astype(np.float32)
        topics /= np.linalg.norm(topics, axis=1, keepdims=True)
        vectors = topics[rng.integers(0, len(topics), rows)]
        vectors += rng.normal(0, 0.6 / np.sqrt(DIM), (rows, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        copies = np.flatnonzero(source >= 0)
        vectors[copies] = vectors[source[copies]] + rng.normal(0, 0.005, (len(copies), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        columns = {
            "uid": pa.array([f"u{i:09d}" for i in range(rows)]),
            "image_embedding": pa.ListArray.from_arrays(
                pa.array(np.arange(rows + 1, dtype=np.int32) * DIM), pa.array(vectors.ravel())
            ),
            "similarity": pa.array(similarity),
            "crawl_date": pa.nulls(rows, pa.timestamp("us", tz="UTC")),
        }
        write_files(directory, columns, rows)
    return directory, source


def score(found: Path, source: np.ndarray) -> tuple[float, float, float]:
    """(recall, precision, share of found rows whose survivor is their planted source)."""
    import pyarrow.parquet as pq

    table = pq.read_table(found, columns=["uid", "survivor_uid"])
    dropped = np.array([int(uid[1:]) for uid in table.column("uid").to_pylist()], dtype=np.int64)
    survivor = np.array([int(uid[1:]) for uid in table.column("survivor_uid").to_pylist()], dtype=np.int64)
    planted = int((source >= 0).sum())
    true = source[dropped] >= 0
    recall = true.sum() / max(planted, 1)
    precision = true.sum() / max(len(dropped), 1)
    to_source = (survivor[true] == source[dropped[true]]).mean() if true.any() else 0.0
    return float(recall), float(precision), float(to_source)


def timed(write) -> float:
    start = time.perf_counter()
    write()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[250_000, 1_000_000])
    parser.add_argument("--steps", nargs="+", default=["phash", "semdedup"], choices=["phash", "semdedup"])
    parser.add_argument("--quick", action="store_true", help="25,000 and 100,000 rows")
    parser.add_argument("--master", default="local[*]")
    args = parser.parse_args()
    sizes = [25_000, 100_000] if args.quick else args.sizes

    from pyspark.sql import functions as F

    from laion_spark.config import NearDupConfig, SparkConfig
    from laion_spark.curate.kmeans import default_clusters
    from laion_spark.curate.near_dup import phash_duplicates, semdedup_duplicates
    from laion_spark.session import build_local_session

    settings = NearDupConfig()
    spark = build_local_session(
        SparkConfig(
            master=args.master,
            app_name="bench-curation",
            conf={"spark.ui.showConsoleProgress": "false", "spark.driver.memory": "4g"},
        )
    )
    cores = spark.sparkContext.defaultParallelism
    # As many shuffle partitions as cores: the default 200 is per-task overhead at these sizes.
    spark.conf.set("spark.sql.shuffle.partitions", str(cores))
    out = DATA / "out"
    print(
        f"cores: {cores}  (machine: {os.cpu_count()} CPUs); pHash distance {settings.phash_distance}, "
        f"SemDeDup epsilon {settings.semdedup_epsilon}, dimension {DIM}, k-means sample {settings.kmeans_sample:,}"
    )
    print(
        f"{'step':<10}{'rows':>11}{'seconds':>9}{'rows/s/core':>13}{'x floor':>9}{'recall':>8}{'precision':>10}"
        f"{'to source':>10}"
    )
    # Warm the JVM and the Python workers on a few thousand rows first, so the smaller size is not charged for it.
    small_data = {"phash": phash_data(sizes[0], settings.phash_distance)[0], "semdedup": semdedup_data(sizes[0])[0]}
    for step in args.steps:
        warm = spark.read.parquet(str(small_data[step])).limit(5_000)
        if step == "phash":
            phash_duplicates(warm, settings.phash_distance).write.format("noop").mode("overwrite").save()
        else:
            semdedup_duplicates(warm, settings.semdedup_epsilon, 10, 5_000).write.format("noop").mode(
                "overwrite"
            ).save()
    per_row: dict[str, list[float]] = {}
    for step in args.steps:
        for rows in sizes:
            if step == "phash":
                directory, source = phash_data(rows, settings.phash_distance)
                frame = spark.read.parquet(str(directory))
                floor = timed(
                    lambda frame=frame: (
                        frame.groupBy("phash").agg(F.min("uid")).write.format("noop").mode("overwrite").save()
                    )
                )

                def run(frame=frame):
                    found = phash_duplicates(frame, settings.phash_distance)
                    found.write.mode("overwrite").parquet(str(out))
            else:
                directory, source = semdedup_data(rows)
                frame = spark.read.parquet(str(directory))
                floor = timed(lambda frame=frame: frame.write.format("noop").mode("overwrite").save())
                clusters = default_clusters(rows)

                def run(frame=frame, clusters=clusters):
                    found = semdedup_duplicates(
                        frame, settings.semdedup_epsilon, clusters, settings.kmeans_sample, seed=SEED
                    )
                    found.write.mode("overwrite").parquet(str(out))

            seconds = timed(run)
            recall, precision, to_source = score(out, source)
            per_row.setdefault(step, []).append(seconds / rows)
            print(f"{'floor':<10}{rows:>11,}{floor:>9.1f}{rows / floor / cores:>13,.0f}{1.0:>9.1f}")
            print(
                f"{step:<10}{rows:>11,}{seconds:>9.1f}{rows / seconds / cores:>13,.0f}{seconds / floor:>9.1f}"
                f"{recall:>8.4f}{precision:>10.4f}{to_source:>10.4f}"
            )
    small, large = sizes
    print(f"\nper-row cost at {large:,} / at {small:,} rows (1.0 = linear; target <= 1.2):")
    for step, costs in per_row.items():
        print(f"  {step:<10}{costs[1] / costs[0]:.2f}")
    spark.stop()


if __name__ == "__main__":
    main()
