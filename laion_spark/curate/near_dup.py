"""Near-duplicate images, found two ways: by perceptual hash (pHash within a few bits) and by image embedding
(SemDeDup: cosine within epsilon of 1, compared inside k-means clusters).

Both return the rows to drop, one per uid, each with the row that made it a duplicate (its survivor), so that a
filter step can count and explain every rejection. The rule is the same for both: a row is dropped when a
better-ranked row is within the distance; its survivor is the best-ranked such row. Rows rank by CLIP similarity
(highest first), then crawl date (earliest first, unknown last), then uid, so the result never depends on the
order Spark happens to read rows in. The survivor may itself be dropped by a still better row further away: the
rule compares each row with its neighbours only, as SemDeDup does, rather than chaining clusters of copies.

Both finish in Python workers over partitions sorted by Spark (``repartition`` + ``sortWithinPartitions`` then
``mapInArrow``): each group of rows that must be compared arrives contiguous, in rank order, as Arrow columns that
become numpy arrays without a Python object per row. The comparisons within a group are vectorised numpy, so they
never become Spark rows; only the pairs found do.

pHash (:func:`phash_duplicates`), a banded join. Two 64-bit hashes within d bits agree exactly on at least one of
d + 1 disjoint bands of bits (pigeonhole), so each distinct hash is exploded into d + 1 (band, band value) rows and
the hashes sharing a (band, value) are compared. A pair that agrees on several bands is kept in the first only.
Identical hashes are collapsed first (one row per distinct hash, holding the best-ranked row with it), so that a
hash shared by many images, the blank image's above all, enters the band join once instead of as a group of n^2
pairs. Distinct hashes that share a band value still meet as a group: its s^2 / 2 comparisons run in numpy, a
few nanoseconds each, in memory proportional to s.

SemDeDup (:func:`semdedup_duplicates`, Abbas et al. 2023): spherical k-means of the image embeddings
(laion_spark.curate.kmeans), then within each cluster every row is compared with the better-ranked rows of its
cluster, in blocks of rows, so that memory is bounded by the cluster's embeddings plus one block of
similarities (a cluster is held whole: pick enough clusters that the largest fits a worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from laion_spark.curate.kmeans import assign_clusters, default_clusters, train_kmeans
from laion_spark.curate.phash import BITS, hamming

PHASH_DUPLICATES_SCHEMA = "uid string, survivor_uid string, distance int"
SEMDEDUP_DUPLICATES_SCHEMA = "uid string, survivor_uid string, cosine float"
_PAIRS_SCHEMA = "a long, b long, distance int"
# Rows gathered before a worker processes what it holds: enough that numpy's per-call overhead vanishes.
_RUN_CHUNK_ROWS = 1 << 16
# Similarities held at once while a cluster is compared with itself (floats): 16 MB.
_SIMILARITY_BLOCK = 1 << 22
_LAST = 2**63 - 1


def rank_key(phash_column: str | None = None) -> Column:
    """A struct that orders rows best first (``min`` is the best): similarity descending (null last), crawl date
    ascending (null last), uid ascending; with ``phash_column``, the hash rides along as a last field."""
    fields = [
        F.coalesce(-F.col("similarity").cast("double"), F.lit(float("inf"))).alias("neg_similarity"),
        F.coalesce(F.unix_micros(F.col("crawl_date")), F.lit(_LAST)).alias("date"),
        F.col("uid").alias("uid"),
    ]
    if phash_column is not None:
        fields.append(F.col(phash_column).alias("phash"))
    return F.struct(*fields)


def phash_bands(max_distance: int) -> list[tuple[int, int]]:
    """(first bit, width) of the max_distance + 1 bands, contiguous, widths as equal as possible (a 64-bit value's
    bits, 0 the least significant)."""
    if not 0 <= max_distance < BITS:
        raise ValueError(f"a pHash distance must be between 0 and {BITS - 1} bits, got {max_distance}")
    count = max_distance + 1
    bands, start = [], 0
    for i in range(count):
        width = BITS // count + (1 if i < BITS % count else 0)
        bands.append((start, width))
        start += width
    return bands


def phash_duplicates(rows: DataFrame, max_distance: int) -> DataFrame:
    """The rows to drop as pHash near-duplicates: ``uid, survivor_uid, distance`` (bits), one row per dropped uid.

    ``rows`` has ``uid`` (unique), ``phash`` (long; null rows are ignored), ``similarity`` and ``crawl_date``.
    Identical hashes count (distance 0).
    """
    phash_bands(max_distance)  # validates the distance before any Spark work
    hashed = rows.where(F.col("phash").isNotNull()).select("uid", "phash", rank_key("phash").alias("rank"))
    # One row per distinct hash with its best-ranked row: identical hashes never meet in the band join.
    hashes = hashed.groupBy("phash").agg(F.min("rank").alias("best"))
    if max_distance == 0:
        survivors = hashes.select("phash", F.col("best").alias("survivor"))
    else:
        pairs = close_hash_pairs(hashes.select("phash"), max_distance)
        # A hash's survivor is the best of its own best row and its neighbours' best rows.
        directed = pairs.select(F.col("a").alias("phash"), F.col("b").alias("other")).unionByName(
            pairs.select(F.col("b").alias("phash"), F.col("a").alias("other"))
        )
        neighbours = (
            directed.join(hashes.select(F.col("phash").alias("other"), F.col("best").alias("other_best")), "other")
            .groupBy("phash")
            .agg(F.min("other_best").alias("neighbour_best"))
        )
        survivors = hashes.join(neighbours, "phash", "left").select(
            "phash",
            F.when(F.col("neighbour_best") < F.col("best"), F.col("neighbour_best"))
            .otherwise(F.col("best"))
            .alias("survivor"),
        )
    return (
        hashed.join(survivors, "phash")
        .where(F.col("uid") != F.col("survivor.uid"))
        .select(
            "uid",
            F.col("survivor.uid").alias("survivor_uid"),
            hamming(F.col("phash"), F.col("survivor.phash")).alias("distance"),
        )
    )


def close_hash_pairs(hashes: DataFrame, max_distance: int) -> DataFrame:
    """Each unordered pair of distinct hashes (column ``phash``, distinct) within ``max_distance`` bits, once:
    ``a, b, distance``."""
    bands = phash_bands(max_distance)
    phash = F.col("phash")
    exploded = F.explode(
        F.array(
            *[
                F.struct(
                    F.lit(i).alias("band"),
                    F.shiftrightunsigned(phash, start).bitwiseAND(F.lit((1 << width) - 1)).alias("value"),
                )
                for i, (start, width) in enumerate(bands)
            ]
        )
    ).alias("banded")
    banded = hashes.select("phash", exploded).select("banded.band", "banded.value", "phash")
    return (
        banded.repartition("band", "value")
        .sortWithinPartitions("band", "value", "phash")
        .mapInArrow(_BandPairs(max_distance, tuple(bands)), _PAIRS_SCHEMA)
    )


def semdedup_duplicates(rows: DataFrame, epsilon: float, clusters: int, sample_rows: int, seed: int = 0) -> DataFrame:
    """The rows to drop as semantic duplicates: ``uid, survivor_uid, cosine``, one row per dropped uid.

    ``rows`` has ``uid`` (unique), ``image_embedding`` (array<float>, L2-normalised; null rows are ignored),
    ``similarity`` and ``crawl_date``. ``clusters`` 0 picks about sqrt(rows) (kmeans.default_clusters); k-means
    trains on at most ``sample_rows`` rows. Two rows of one cluster are duplicates when their cosine is at least
    1 - ``epsilon``. Runs one count and the k-means training (a Spark job each) when called.
    """
    if not 0.0 <= epsilon < 2.0:
        raise ValueError(f"semdedup epsilon must be in [0, 2), got {epsilon}")
    if clusters < 0:
        raise ValueError(f"semdedup clusters must be 0 (automatic) or a positive number, got {clusters}")
    present = rows.where(F.col("image_embedding").isNotNull()).select(
        "uid", "image_embedding", rank_key().alias("rank")
    )
    k = clusters or default_clusters(present.count())
    centroids = train_kmeans(present, "image_embedding", k, sample_rows, seed)
    assigned = assign_clusters(present, "image_embedding", centroids).select(
        "cluster", "rank.neg_similarity", "rank.date", "uid", "image_embedding"
    )
    return (
        assigned.repartition("cluster")
        .sortWithinPartitions("cluster", "neg_similarity", "date", "uid")
        .mapInArrow(_ClusterDuplicates(float(1.0 - epsilon)), SEMDEDUP_DUPLICATES_SCHEMA)
    )


def drop_duplicates_found(rows: DataFrame, duplicates: DataFrame) -> DataFrame:
    """``rows`` without the uids in ``duplicates`` (the output of phash_duplicates or semdedup_duplicates)."""
    return rows.join(duplicates.select("uid"), "uid", "left_anti")


def complete_runs(batches: Iterator, keys: list[str], min_rows: int = _RUN_CHUNK_ROWS) -> Iterator:
    """pyarrow Tables of whole runs from record batches sorted by ``keys``: rows with equal keys all land in the
    same table. A run that spans batches is held back until its end; memory is the largest run plus min_rows."""
    import pyarrow as pa

    pending: list = []
    pending_rows = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows < min_rows:
            continue
        table = pa.Table.from_batches(pending)
        cut = table.num_rows - _last_run_length(table, keys)
        if cut > 0:
            yield table.slice(0, cut)
            rest = table.slice(cut)
            pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        yield pa.Table.from_batches(pending)


def _last_run_length(table, keys: list[str]) -> int:
    same = np.ones(table.num_rows, dtype=bool)
    for key in keys:
        values = table.column(key).to_numpy()
        same &= values == values[-1]
    return int(same.sum())  # sorted: the rows equal to the last one are the trailing run


def run_bounds(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) index of each run of equal consecutive keys (numpy arrays of one length)."""
    n = len(keys[0])
    change = np.zeros(max(n - 1, 0), dtype=bool)
    for key in keys:
        change |= key[1:] != key[:-1]
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64) if n else np.zeros(0, np.int64)
    ends = np.append(starts[1:], n).astype(np.int64)
    return starts, ends


def pairs_within_runs(
    starts: np.ndarray, ends: np.ndarray, test: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j in the same run, for which ``test(i, j)`` (vectorised) holds. Every pair of every
    run is tested, one offset j - i at a time over all runs still long enough: work is the number of pairs, numpy
    calls the longest run's length."""
    n = int(ends[-1]) if len(ends) else 0
    run_end = np.repeat(ends, ends - starts)
    after = run_end - np.arange(n)  # 1 + rows after i in its run
    found_i, found_j = [], []
    offset = 1
    idx = np.flatnonzero(after > offset)
    while idx.size:
        j = idx + offset
        hit = test(idx, j)
        if hit.any():
            found_i.append(idx[hit])
            found_j.append(j[hit])
        offset += 1
        idx = idx[after[idx] > offset]
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_i), np.concatenate(found_j)


@dataclass(frozen=True)
class _BandPairs:
    """mapInArrow over (band, value, phash) sorted by band and value: the close pairs within each (band, value),
    each pair reported by the first band its two hashes agree on."""

    max_distance: int
    bands: tuple[tuple[int, int], ...]

    def __call__(self, batches: Iterator) -> Iterator:
        import pyarrow as pa

        schema = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("distance", pa.int32())])
        for table in complete_runs(batches, ["band", "value"]):
            band = table.column("band").to_numpy()
            hashes = table.column("phash").to_numpy().view(np.uint64)
            starts, ends = run_bounds([band, table.column("value").to_numpy()])

            def close(i: np.ndarray, j: np.ndarray, hashes: np.ndarray = hashes) -> np.ndarray:
                return np.bitwise_count(hashes[i] ^ hashes[j]) <= self.max_distance

            i, j = pairs_within_runs(starts, ends, close)
            if not len(i):
                continue
            xor = hashes[i] ^ hashes[j]
            first = np.full(len(i), -1, dtype=np.int64)
            for number, (start, width) in enumerate(self.bands):
                agree = ((xor >> np.uint64(start)) & np.uint64((1 << width) - 1)) == 0
                first = np.where((first < 0) & agree, number, first)
            keep = first == band[i]
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(hashes[i][keep].view(np.int64)),
                    pa.array(hashes[j][keep].view(np.int64)),
                    pa.array(np.bitwise_count(xor[keep]).astype(np.int32)),
                ],
                schema=schema,
            )


@dataclass(frozen=True)
class _ClusterDuplicates:
    """mapInArrow over (cluster, rank..., uid, image_embedding) sorted by cluster then rank: each row against the
    better-ranked rows of its cluster, blocks of rows at a time."""

    threshold: float

    def __call__(self, batches: Iterator) -> Iterator:
        import pyarrow as pa

        from laion_spark.index.shards import vectors_from_arrow

        schema = pa.schema([("uid", pa.string()), ("survivor_uid", pa.string()), ("cosine", pa.float32())])
        for table in complete_runs(batches, ["cluster"]):
            column = table.column("image_embedding").combine_chunks()
            d = len(column[0])
            vectors = vectors_from_arrow(column, d, "image_embedding")
            uids = table.column("uid").combine_chunks()
            starts, ends = run_bounds([table.column("cluster").to_numpy()])
            dropped, survivors, cosines = [], [], []
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                found = self._cluster(vectors[start:end])
                dropped.append(found[0] + start)
                survivors.append(found[1] + start)
                cosines.append(found[2])
            dropped_at = np.concatenate(dropped)
            if not len(dropped_at):
                continue
            yield pa.RecordBatch.from_arrays(
                [
                    uids.take(pa.array(dropped_at)),
                    uids.take(pa.array(np.concatenate(survivors))),
                    pa.array(np.concatenate(cosines), type=pa.float32()),
                ],
                schema=schema,
            )

    def _cluster(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dropped row, its survivor, their cosine) within one cluster whose rows are in rank order."""
        m = len(vectors)
        block = max(1, min(m, _SIMILARITY_BLOCK // max(m, 1)))
        dropped, survivors, cosines = [], [], []
        for start in range(1, m, block):
            end = min(m, start + block)
            similar = vectors[start:end] @ vectors[:end].T  # [rows of the block, every row up to its end]
            earlier = np.arange(end)[None, :] < np.arange(start, end)[:, None]
            hits = (similar >= self.threshold) & earlier
            has = hits.any(axis=1)
            if not has.any():
                continue
            rows = np.flatnonzero(has)
            first = hits[rows].argmax(axis=1)  # the best-ranked row within the distance
            dropped.append(rows + start)
            survivors.append(first)
            cosines.append(similar[rows, first])
        if not dropped:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros(0, np.float32)
        return np.concatenate(dropped), np.concatenate(survivors), np.concatenate(cosines).astype(np.float32)
