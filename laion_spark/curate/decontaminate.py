"""Eval-set decontamination: which pool images are copies (or near copies) of evaluation images.

Two tests, either one marks a pool image as contaminated:

* pHash: within ``max_distance`` bits of an eval image's pHash. A banded join, as near-dup uses: the 64 bits are
  cut into ``max_distance + 1`` bands, and two hashes that differ in at most ``max_distance`` bits agree on at
  least one whole band (pigeonhole), so joining on (band, band value) finds every such pair, and the Hamming
  distance of the pairs found is then checked. Eval sets are small, so their bands are broadcast and the pool is
  never shuffled.
* Embedding: image-embedding cosine at least ``min_cosine`` with an eval image (a copy re-encoded, cropped or
  recoloured enough to move its pHash). The eval embeddings are shipped to a ``mapInArrow`` over the pool, which
  compares each pool batch with all of them in blocks (a matrix product: every vector is L2-normalised).

:func:`contaminated` names, per contaminated pool uid, its closest eval image (a pHash match before an embedding
match); :func:`drop_contaminated` removes those uids. The two are separate, like every dataset filter, so that the
rejections can be recorded with their reason before the rows go.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import FloatType, IntegerType, StringType, StructField, StructType

from laion_spark.config import ConfigError
from laion_spark.curate.near_dup import phash_bands
from laion_spark.curate.phash import BITS, hamming

PHASH = "phash"
EMBEDDING = "embedding"

CONTAMINATED_SCHEMA = StructType(
    [
        StructField("uid", StringType(), False),
        StructField("eval_set", StringType(), False),
        StructField("eval_image", StringType(), False),
        StructField("match", StringType(), False),  # phash | embedding
        StructField("distance", IntegerType(), True),  # pHash Hamming distance; null for an embedding match
        StructField("cosine", FloatType(), True),
    ]
)
PHASH_MATCH_SCHEMA = StructType(
    [
        StructField("uid", StringType(), False),
        StructField("eval_set", StringType(), False),
        StructField("eval_image", StringType(), False),
        StructField("distance", IntegerType(), True),
        StructField("cosine", FloatType(), True),
    ]
)
EMBEDDING_MATCH_SCHEMA = StructType(
    [
        StructField("uid", StringType(), False),
        StructField("eval_set", StringType(), False),
        StructField("eval_image", StringType(), False),
        StructField("cosine", FloatType(), False),
    ]
)

# Pool rows x eval rows per block of the similarity product: 2048 x 8192 float32 is 64 MB.
POOL_BLOCK_ROWS = 2048
EVAL_BLOCK_ROWS = 8192


def banded(phash: Column | str, max_distance: int) -> Column:
    """array<struct<band int, value long>>: the hash cut into the ``max_distance + 1`` bands near-dup uses."""
    phash = F.col(phash) if isinstance(phash, str) else phash
    try:
        bands = phash_bands(max_distance)
    except ValueError as exc:
        raise ConfigError(f"dedup.eval_phash_distance: {exc}") from None
    return F.array(
        *[
            F.struct(
                F.lit(i).alias("band"),
                F.shiftrightunsigned(phash, start).bitwiseAND(F.lit((1 << width) - 1)).alias("value"),
            )
            for i, (start, width) in enumerate(bands)
        ]
    )


@dataclass(frozen=True)
class EvalSide:
    """The eval images on the driver, collected once: names, pHashes, and the embeddings as one matrix (rows of
    zeros where an image has none). Both tests use it, so the eval frame is computed once (its CLIP pass included)
    even when the caller did not cache it."""

    sources: list[str]
    image_ids: list[str]
    phashes: list[int | None]
    vectors: np.ndarray  # [n, d], float16 when lossless (it travels with every task), else float32
    has_vector: np.ndarray  # [n] bool

    @classmethod
    def collect(cls, eval_images: DataFrame) -> EvalSide:
        wanted = F.col("phash").isNotNull() | F.col("image_embedding").isNotNull()
        columns = ("source", "image_id", "phash", "image_embedding")
        table = eval_images.where(wanted).select(*columns).toArrow()  # the eval set: small by design
        embeddings = table.column("image_embedding").combine_chunks()
        has_vector = embeddings.is_valid().to_numpy(zero_copy_only=False)
        present = _matrix(embeddings.filter(pa.array(has_vector)))
        vectors = np.zeros((len(has_vector), present.shape[1]), dtype=np.float32)
        vectors[has_vector] = present
        return cls(
            sources=table.column("source").to_pylist(),
            image_ids=table.column("image_id").to_pylist(),
            phashes=table.column("phash").to_pylist(),
            vectors=vectors.astype(np.float16) if _fits_float16(vectors) else vectors,
            has_vector=has_vector,
        )


def phash_matches(pool: DataFrame, eval_images: DataFrame | EvalSide, max_distance: int) -> DataFrame:
    """(uid, eval_set, eval_image, distance, cosine) for every pool/eval pair within ``max_distance`` bits.

    ``cosine`` is the two images' embedding cosine where both have one (null otherwise): it tells a recompressed
    copy from two different images that happen to hash alike.
    """
    evals = eval_images if isinstance(eval_images, EvalSide) else EvalSide.collect(eval_images)
    bands = banded("phash", max_distance)  # checks max_distance before any job
    indexed = [(i, value) for i, value in enumerate(evals.phashes) if value is not None]
    if not indexed:
        return pool.sparkSession.createDataFrame([], PHASH_MATCH_SCHEMA)
    hashes = pool.sparkSession.createDataFrame(
        pa.table({"eval_index": [i for i, _ in indexed], "phash": [value for _, value in indexed]})
    )
    pool_bands = pool.where(F.col("phash").isNotNull()).select(
        "uid", F.col("phash").alias("pool_phash"), "image_embedding", F.explode(bands).alias("b")
    )
    eval_bands = hashes.select("eval_index", F.col("phash").alias("eval_phash"), F.explode(bands).alias("b"))
    pairs = (
        pool_bands.select("*", "b.band", "b.value")
        .drop("b")
        .join(F.broadcast(eval_bands.select("*", "b.band", "b.value").drop("b")), ["band", "value"])
    )
    close = pairs.select(
        "uid", "eval_index", "image_embedding", hamming("pool_phash", "eval_phash").alias("distance")
    ).where(F.col("distance") <= max_distance)
    # A pair that agrees on several bands was found once per band.
    close = close.dropDuplicates(["uid", "eval_index"])
    worker = functools.partial(phash_pair_batches, evals=evals)
    return close.mapInArrow(worker, PHASH_MATCH_SCHEMA)


def phash_pair_batches(batches: Iterable[pa.RecordBatch], evals: EvalSide) -> Iterator[pa.RecordBatch]:
    """The worker of :func:`phash_matches`: names the eval image of each close pair and adds the cosine."""
    vectors = evals.vectors.astype(np.float32)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        index = batch.column("eval_index").to_numpy(zero_copy_only=False).astype(np.int64)
        embeddings = batch.column("image_embedding")
        cosine = np.full(batch.num_rows, np.nan, dtype=np.float32)
        valid = embeddings.is_valid().to_numpy(zero_copy_only=False) & evals.has_vector[index]
        if valid.any():
            pool = _matrix(embeddings.filter(pa.array(valid)))
            if pool.shape[1] == vectors.shape[1]:
                cosine[valid] = np.einsum("ij,ij->i", pool, vectors[index[valid]])
        yield pa.RecordBatch.from_arrays(
            [
                batch.column("uid"),
                pa.array([evals.sources[i] for i in index], pa.string()),
                pa.array([evals.image_ids[i] for i in index], pa.string()),
                batch.column("distance"),
                pa.array(cosine, pa.float32(), mask=np.isnan(cosine)),
            ],
            names=[f.name for f in PHASH_MATCH_SCHEMA.fields],
        )


def embedding_matches(pool: DataFrame, eval_images: DataFrame | EvalSide, min_cosine: float) -> DataFrame:
    """(uid, eval_set, eval_image, cosine): each pool image's most similar eval image, where the cosine is at least
    ``min_cosine``.

    The eval embeddings come to the driver once (``toArrow``) and travel with the task to every Python worker:
    that is what broadcasting means on Spark Connect, and it is why eval sets must stay small (100,000 512-wide
    vectors are 100 MB in float16).
    """
    evals = eval_images if isinstance(eval_images, EvalSide) else EvalSide.collect(eval_images)
    worker = functools.partial(embedding_match_batches, evals=evals, min_cosine=float(min_cosine))
    return (
        pool.where(F.col("image_embedding").isNotNull())
        .select("uid", "image_embedding")
        .mapInArrow(worker, EMBEDDING_MATCH_SCHEMA)
    )


def _fits_float16(vectors: np.ndarray) -> bool:
    # Halves what every task carries; lossless for the lake's default float16-rounded embeddings.
    return bool(vectors.size) and np.array_equal(vectors.astype(np.float16).astype(np.float32), vectors)


def _matrix(embeddings: pa.ListArray) -> np.ndarray:
    """[n, d] float32 from a list<float> array without nulls, every list of the same length."""
    if len(embeddings) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    lengths = np.unique(np.diff(embeddings.offsets.to_numpy()))
    if len(lengths) != 1:
        raise ValueError(f"image embeddings of different widths {sorted(lengths.tolist())}: one CLIP model made them?")
    values = embeddings.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(embeddings), int(lengths[0]))


def embedding_match_batches(
    batches: Iterable[pa.RecordBatch], evals: EvalSide, min_cosine: float
) -> Iterator[pa.RecordBatch]:
    """The worker of :func:`embedding_matches`: (uid, image_embedding) batches in, matches out."""
    if not evals.has_vector.any():
        return
    keep = np.flatnonzero(evals.has_vector)
    eval_vectors = evals.vectors[keep].astype(np.float32)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pool = _matrix(batch.column("image_embedding"))
        if pool.shape[1] != eval_vectors.shape[1]:
            raise ValueError(
                f"pool embeddings are {pool.shape[1]} wide and eval embeddings {eval_vectors.shape[1]}: "
                "both must come from the lake's CLIP model"
            )
        best, where = best_matches(pool, eval_vectors)
        hits = np.flatnonzero(best >= min_cosine)
        if not len(hits):
            continue
        names = keep[where[hits]]
        yield pa.RecordBatch.from_arrays(
            [
                batch.column("uid").take(pa.array(hits)),
                pa.array([evals.sources[i] for i in names], pa.string()),
                pa.array([evals.image_ids[i] for i in names], pa.string()),
                pa.array(best[hits], pa.float32()),
            ],
            names=[f.name for f in EMBEDDING_MATCH_SCHEMA.fields],
        )


def best_matches(pool: np.ndarray, eval_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pool row, the largest inner product with an eval row and that row's index; in blocks, so that memory
    stays at one POOL_BLOCK_ROWS x EVAL_BLOCK_ROWS block whatever the sizes."""
    best = np.full(len(pool), -np.inf, dtype=np.float32)
    where = np.zeros(len(pool), dtype=np.int64)
    for start in range(0, len(pool), POOL_BLOCK_ROWS):
        rows = pool[start : start + POOL_BLOCK_ROWS]
        for first in range(0, len(eval_vectors), EVAL_BLOCK_ROWS):
            scores = rows @ eval_vectors[first : first + EVAL_BLOCK_ROWS].T
            top = scores.argmax(axis=1)
            value = scores[np.arange(len(rows)), top]
            better = value > best[start : start + len(rows)]
            best[start : start + len(rows)][better] = value[better]
            where[start : start + len(rows)][better] = top[better] + first
    return best, where


def contaminated(pool: DataFrame, eval_images: DataFrame, max_distance: int, min_cosine: float) -> DataFrame:
    """One row per contaminated pool uid (:data:`CONTAMINATED_SCHEMA`): its closest eval image.

    ``pool`` has uid, phash and image_embedding; ``eval_images`` has source, image_id, phash and image_embedding
    (:func:`laion_spark.curate.eval_sets.load_signatures`). A negative ``max_distance`` turns the pHash test off,
    a ``min_cosine`` above 1 the embedding test. Closest means: a pHash match before an embedding match, then the
    smallest distance, the largest cosine, and the eval set and image names, so reruns name the same image.
    """
    found: list[DataFrame] = []
    evals = EvalSide.collect(eval_images) if max_distance >= 0 or min_cosine <= 1.0 else None
    if max_distance >= 0:
        found.append(
            phash_matches(pool, evals, max_distance).select(
                "uid", "eval_set", "eval_image", F.lit(PHASH).alias("match"), "distance", "cosine"
            )
        )
    if min_cosine <= 1.0:
        found.append(
            embedding_matches(pool, evals, min_cosine).select(
                "uid",
                "eval_set",
                "eval_image",
                F.lit(EMBEDDING).alias("match"),
                F.lit(None).cast("int").alias("distance"),
                "cosine",
            )
        )
    if not found:
        return pool.sparkSession.createDataFrame([], CONTAMINATED_SCHEMA)
    matches = found[0] if len(found) == 1 else found[0].unionByName(found[1])
    rank = F.struct(
        F.when(F.col("match") == PHASH, 0).otherwise(1).alias("kind"),
        F.coalesce(F.col("distance"), F.lit(BITS + 1)).alias("distance_rank"),
        (-F.coalesce(F.col("cosine"), F.lit(-2.0))).alias("cosine_rank"),
        F.col("eval_set"),
        F.col("eval_image"),
        F.col("match"),
        F.col("distance"),
        F.col("cosine"),
    )
    closest = matches.groupBy("uid").agg(F.min(rank).alias("m"))
    return closest.select(
        "uid",
        F.col("m.eval_set").alias("eval_set"),
        F.col("m.eval_image").alias("eval_image"),
        F.col("m.match").alias("match"),
        F.col("m.distance").cast("int").alias("distance"),
        F.col("m.cosine").cast("float").alias("cosine"),
    )


def drop_contaminated(pool: DataFrame, found: DataFrame) -> DataFrame:
    """``pool`` without the uids :func:`contaminated` found."""
    return pool.join(found.select("uid").distinct(), "uid", "left_anti")
