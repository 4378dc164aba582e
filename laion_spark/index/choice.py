"""Which faiss index to build, from the row count and a memory budget, as autofaiss chooses (a pure function).

* Up to ``index.flat_max_rows`` vectors: exact search, ``IDMap2,Flat`` (inner product over the raw vectors).
* Above: an inverted file (IVF) with about ``4 * sqrt(n)`` lists, a power of two, and never more lists than the
  training sample can fill with faiss's 39 vectors per list. Its coarse quantizer is an HNSW graph over the list
  centroids, so that assigning a vector to its list (at add and at query time) costs a few hundred dot products
  instead of one per list. What the lists hold depends on what fits the budget:

  - the vectors themselves (``IVF-HNSW,Flat``: 4 bytes per dimension), when they fit;
  - 8-bit scalar quantized vectors (``IVF,SQ8``: 1 byte per dimension), when those fit;
  - product-quantized codes (``IVF,PQ``: ``m`` bytes per vector, ``d % m == 0``), with the largest ``m`` that fits.

Every vector also costs its 8-byte id. The budget (``index.max_memory_gb``) is for the whole served index, the image
and the text index together, so each modality gets half.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from laion_spark.config import ConfigError

FLAT = "Flat"
IVF_HNSW_FLAT = "IVF-HNSW,Flat"
IVF_SQ8 = "IVF,SQ8"
IVF_PQ = "IVF,PQ"

ID_BYTES = 8  # faiss keeps each vector's int64 id beside its code
HNSW_LINKS = 32  # neighbours per node of the coarse quantizer's graph
# faiss warns below 39 training vectors per list (its k-means gets too few points per centroid).
MIN_TRAIN_PER_LIST = 39
# The held-out part of the training sample on which nprobe is calibrated (queries drawn like the data).
MAX_CALIBRATION_QUERIES = 1000
MIN_CALIBRATION_SAMPLE = 200
# A product quantizer's codebooks have 256 centroids (8 bits per sub-vector); k-means needs at least that many points.
PQ_BITS = 8
PQ_MIN_TRAIN = 1 << PQ_BITS
MODALITIES_SHARING_BUDGET = 2  # the image and the text index are served together


class IndexChoiceError(ConfigError):
    """No index of the supported types fits the settings: the message says what to change."""


@dataclass(frozen=True)
class IndexChoice:
    index_type: str  # FLAT | IVF_HNSW_FLAT | IVF_SQ8 | IVF_PQ
    factory: str  # the faiss index_factory string (metric: inner product)
    n: int  # the vector count the choice was made for
    d: int
    budget_bytes: int  # per modality
    estimated_bytes: int  # per modality, for n vectors
    nlist: int = 0
    pq_m: int = 0
    sample_rows: int = 0  # the random sample drawn to train (0 for Flat: nothing to train)
    train_rows: int = 0  # of which train the quantizer
    calibration_rows: int = 0  # of which are held out to calibrate nprobe

    @property
    def trained(self) -> bool:
        return self.index_type != FLAT

    def params(self) -> dict[str, Any]:
        return asdict(self)


def choose_index(
    n: int,
    d: int,
    max_memory_gb: float,
    flat_max_rows: int,
    train_sample: int,
) -> IndexChoice:
    """The index for ``n`` vectors of dimension ``d`` in ``max_memory_gb`` (both modalities together)."""
    if n < 0 or d < 1:
        raise ValueError(f"need n >= 0 and d >= 1, got n={n}, d={d}")
    budget = int(max_memory_gb * 1e9 / MODALITIES_SHARING_BUDGET)
    if n <= flat_max_rows:
        estimated = n * (4 * d + ID_BYTES)
        return IndexChoice(FLAT, "IDMap2,Flat", n, d, budget, estimated)

    sample_rows = min(n, train_sample)
    # A tenth of the sample, when that is enough queries to measure a recall (else every list is probed).
    calibration_rows = min(MAX_CALIBRATION_QUERIES, sample_rows // 10) if sample_rows >= MIN_CALIBRATION_SAMPLE else 0
    train_rows = sample_rows - calibration_rows
    nlist = list_count(n, train_rows)
    # The coarse quantizer: the centroids and the graph's links (both layers' worth, roughly).
    quantizer_bytes = nlist * (4 * d + 2 * HNSW_LINKS * 4)
    common = dict(
        n=n,
        d=d,
        budget_bytes=budget,
        nlist=nlist,
        sample_rows=sample_rows,
        train_rows=train_rows,
        calibration_rows=calibration_rows,
    )
    ivf = f"IVF{nlist}_HNSW{HNSW_LINKS}"
    flat_bytes = n * (4 * d + ID_BYTES) + quantizer_bytes
    if flat_bytes <= budget:
        return IndexChoice(IVF_HNSW_FLAT, f"{ivf},Flat", estimated_bytes=flat_bytes, **common)
    sq8_bytes = n * (d + ID_BYTES) + quantizer_bytes
    if sq8_bytes <= budget:
        return IndexChoice(IVF_SQ8, f"{ivf},SQ8", estimated_bytes=sq8_bytes, **common)
    for m in pq_sizes(d):
        pq_bytes = n * (m + ID_BYTES) + quantizer_bytes
        if pq_bytes <= budget:
            if train_rows < PQ_MIN_TRAIN:
                raise IndexChoiceError(
                    f"IVF-PQ needs at least {PQ_MIN_TRAIN} training vectors, the sample gives {train_rows}: "
                    "raise index.train_sample"
                )
            # "np": no polysemous training (codes reordered for Hamming filtering, which search does not use):
            # it takes several times as long as the product quantizer's own training.
            return IndexChoice(IVF_PQ, f"{ivf},PQ{m}x{PQ_BITS}np", estimated_bytes=pq_bytes, pq_m=m, **common)
    smallest = n * (min(pq_sizes(d), default=d) + ID_BYTES) + quantizer_bytes
    raise IndexChoiceError(
        f"{n:,} vectors of dimension {d} do not fit index.max_memory_gb={max_memory_gb:g} in any supported index "
        f"(the smallest, IVF-PQ, needs about {smallest * MODALITIES_SHARING_BUDGET / 1e9:.2f} GB): raise it"
    )


def list_count(n: int, train_rows: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest ``4 * sqrt(n)``, at most what ``train_rows`` trains."""
    wanted = _nearest_power_of_two(4 * math.sqrt(max(n, 1)))
    trainable = _floor_power_of_two(max(train_rows // MIN_TRAIN_PER_LIST, 1))
    return max(1, min(wanted, trainable))


def pq_sizes(d: int) -> list[int]:
    """Sub-quantizer counts ``m`` for dimension ``d``, largest first: divisors of ``d``, at least 2 dimensions per
    sub-vector (one would be SQ8 with extra steps)."""
    return [m for m in range(d // 2, 0, -1) if d % m == 0]


def _nearest_power_of_two(x: float) -> int:
    low = _floor_power_of_two(max(int(x), 1))
    return low * 2 if x - low > low * 2 - x else low


def _floor_power_of_two(x: int) -> int:
    return 1 << (max(x, 1).bit_length() - 1)
