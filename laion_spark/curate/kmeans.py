"""Spherical k-means of an embeddings column on Spark: trained on the driver from a bounded random sample, applied
to every row by the tasks.

Training: ``DataFrame.sample`` draws a little over ``sample_rows`` rows; each task packs its sampled vectors into
float32 blocks of a few megabytes (one binary value per block), and the driver collects those blocks and keeps the
first ``sample_rows`` rows. A block is one JVM byte array instead of one Java object per float, so a 200,000 x 512
sample costs the driver about its own 400 MB rather than the several gigabytes a ``toPandas`` of ``array<float>``
rows takes; it works on Spark Connect and needs no directory shared by driver and executors (index.build stages
its sample as Arrow files in the index directory it writes anyway; k-means has no such directory). faiss trains on
the sample (cosine, centroids re-normalised at each step).

Assignment: ``mapInArrow``; each task builds one exact inner-product index over the centroids (shipped in the
closure: k x d floats, 2 MB for 1,000 x 512) and searches its rows in blocks. Cost per row is k x d multiply-adds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType, IntegerType, StructField, StructType

log = logging.getLogger(__name__)

MAX_DEFAULT_CLUSTERS = 50_000
KMEANS_ITERATIONS = 20
COSINE_COLUMN = "cluster_cosine"
_BLOCK_BYTES = 4 << 20  # one collected binary value: big enough that per-row overhead vanishes, small for the JVM
_SEARCH_ROWS = 8192
_PACKED_SCHEMA = "part int, seq int, rows int, dim int, block binary"


def default_clusters(rows: int) -> int:
    """About sqrt(rows) clusters, at least 1 and at most 50,000: the k at which assigning a row to its centroid
    (k comparisons) and comparing it within its cluster (rows / k comparisons) cost the same."""
    return max(1, min(MAX_DEFAULT_CLUSTERS, round(math.sqrt(max(rows, 0)))))


def train_kmeans(vectors: DataFrame, column: str, k: int, sample_rows: int, seed: int = 0) -> np.ndarray:
    """Centroids [k, d] (float32, L2-normalised) of spherical k-means over at most ``sample_rows`` random rows of
    ``column`` (array<float>, rows where it is null are left out). Fewer sampled rows than ``k`` lower k to the
    number of rows, with a warning."""
    if k < 1:
        raise ValueError(f"k-means needs at least one cluster, got k = {k}")
    if sample_rows < 1:
        raise ValueError(f"k-means needs a sample of at least one row, got sample_rows = {sample_rows}")
    sample = draw_vectors(vectors, column, sample_rows, seed)
    if len(sample) == 0:
        raise ValueError(f"no row has a {column}: nothing to cluster")
    if len(sample) < k:
        log.warning("k-means: %d sampled rows for %d clusters; using %d clusters", len(sample), k, len(sample))
        k = len(sample)
    return _train(sample, k, seed)


def draw_vectors(vectors: DataFrame, column: str, rows: int, seed: int = 0) -> np.ndarray:
    """At most ``rows`` random non-null rows of ``column`` as an [n, d] float32 matrix on the driver."""
    present = vectors.where(F.col(column).isNotNull()).select(column)
    n = present.count()
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    # A little over (four standard deviations of the binomial count), so that the limit rather than chance sets
    # the size; the limit is applied here, not as a DataFrame limit, which would funnel the rows through one task.
    fraction = min(1.0, (rows + 4 * math.sqrt(rows) + 10) / n)
    if fraction < 1.0:
        present = present.sample(withReplacement=False, fraction=fraction, seed=seed)
    blocks = present.mapInArrow(_VectorPacker(column), _PACKED_SCHEMA).collect()
    blocks = sorted(blocks, key=lambda row: (row["part"], row["seq"]))  # the same sample on every run
    if not blocks:
        return np.zeros((0, 0), dtype=np.float32)
    d = int(blocks[0]["dim"])
    matrix = np.concatenate([np.frombuffer(row["block"], dtype=np.float32).reshape(-1, d) for row in blocks])
    return np.ascontiguousarray(matrix[:rows])


def assign_clusters(rows: DataFrame, column: str, centroids: np.ndarray, out: str = "cluster") -> DataFrame:
    """``rows`` with two more columns: ``out`` (int), the index of the nearest centroid by inner product (cosine
    for normalised vectors), and ``cluster_cosine`` (float), that inner product. Null where ``column`` is null."""
    for name in (out, COSINE_COLUMN):
        if name in rows.columns:
            raise ValueError(f"assign_clusters: the rows already have a column {name!r}")
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or len(centroids) == 0:
        raise ValueError(f"centroids must be a non-empty [k, d] matrix, got shape {centroids.shape}")
    schema = StructType(
        [*rows.schema.fields, StructField(out, IntegerType(), True), StructField(COSINE_COLUMN, FloatType(), True)]
    )
    return rows.mapInArrow(_ClusterAssigner(centroids, column, out), schema)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _train(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    sample = normalize_rows(sample)
    if k == 1:
        return normalize_rows(sample.mean(axis=0, keepdims=True))
    kmeans = faiss.Kmeans(
        sample.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(sample)
    return normalize_rows(kmeans.centroids)


@dataclass(frozen=True)
class _VectorPacker:
    """mapInArrow: this partition's vectors as float32 blocks of about _BLOCK_BYTES each."""

    column: str

    def __call__(self, batches: Iterator) -> Iterator:
        import pyarrow as pa
        from pyspark import TaskContext

        from laion_spark.index.shards import vectors_from_arrow

        context = TaskContext.get()
        part = context.partitionId() if context is not None else 0
        schema = pa.schema(
            [
                ("part", pa.int32()),
                ("seq", pa.int32()),
                ("rows", pa.int32()),
                ("dim", pa.int32()),
                ("block", pa.binary()),
            ]
        )
        seq = 0
        for batch in batches:
            if not batch.num_rows:
                continue
            column = batch.column(self.column)
            d = len(column[0])
            matrix = vectors_from_arrow(column, d, self.column)
            step = max(1, _BLOCK_BYTES // (4 * max(d, 1)))
            for start in range(0, len(matrix), step):
                block = matrix[start : start + step]
                yield pa.RecordBatch.from_pydict(
                    {"part": [part], "seq": [seq], "rows": [len(block)], "dim": [d], "block": [block.tobytes()]},
                    schema=schema,
                )
                seq += 1


@dataclass(frozen=True)
class _ClusterAssigner:
    """mapInArrow: nearest centroid of each row, one exact inner-product index per task."""

    centroids: np.ndarray
    column: str
    out: str

    def __call__(self, batches: Iterator) -> Iterator:
        import faiss
        import pyarrow as pa
        import pyarrow.compute as pc

        from laion_spark.index.shards import limit_threads, vectors_from_arrow

        limit_threads()
        k, d = self.centroids.shape
        index = faiss.IndexFlatIP(d)
        index.add(self.centroids)
        for batch in batches:
            column = batch.column(self.column)
            present = pc.is_valid(column).to_numpy(zero_copy_only=False)
            clusters = np.zeros(batch.num_rows, dtype=np.int32)
            cosines = np.zeros(batch.num_rows, dtype=np.float32)
            if present.any():
                matrix = vectors_from_arrow(column.filter(pa.array(present)), d, self.column)
                found_cluster = np.empty(len(matrix), dtype=np.int32)
                found_cosine = np.empty(len(matrix), dtype=np.float32)
                for start in range(0, len(matrix), _SEARCH_ROWS):
                    scores, labels = index.search(matrix[start : start + _SEARCH_ROWS], 1)
                    found_cluster[start : start + len(labels)] = labels[:, 0]
                    found_cosine[start : start + len(scores)] = scores[:, 0]
                clusters[present] = found_cluster
                cosines[present] = found_cosine
            missing = ~present
            yield pa.RecordBatch.from_arrays(
                [
                    *batch.columns,
                    pa.array(clusters, type=pa.int32(), mask=missing),
                    pa.array(cosines, type=pa.float32(), mask=missing),
                ],
                names=[*batch.schema.names, self.out, COSINE_COLUMN],
            )
