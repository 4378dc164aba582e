"""Training the empty index on the driver, and calibrating nprobe on a held-out part of the training sample.

faiss and numpy only (no Spark): the driver calls it on the bounded sample it drew, and bench/index.py's plain
single-process build uses the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from laion_spark.index.choice import IndexChoice

RECALL_AT = 10
# nprobe is chosen to reach the target with this much to spare: held-out rows are a sample of 1,000 queries, whose
# recall@10 moved by 0.015 between two draws of the same data (bench/index.py).
CALIBRATION_MARGIN = 0.01
# The calibration index holds at most this many training vectors: half the cost of 200,000 and the same nprobe on
# bench/index.py's data (a smaller base would err on the side of more lists: 50,000 picked 4x the nprobe).
MAX_CALIBRATION_BASE = 100_000
# HNSW coarse quantizer (IVF-HNSW): how wide its graph search is. Assigning a vector to its list when it is added
# needs one centroid, and a narrow search finds it nearly always; a query needs ``nprobe`` centroids, and the search
# must be at least that wide to return them (faiss widens it to k anyway), twice that to find the right ones.
ADD_EF_SEARCH = 16
MIN_QUERY_EF_SEARCH = 32


def query_ef_search(nprobe: int) -> int:
    return max(MIN_QUERY_EF_SEARCH, 2 * nprobe)


def new_index(factory: str, d: int):
    """An empty index of ``factory`` for inner product (cosine similarity over L2-normalised embeddings)."""
    import faiss

    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        # k-means over the flat centroids, then the centroids go into the HNSW graph once: building the graph
        # in every k-means iteration (faiss's default for a graph quantizer) costs more than the clustering.
        ivf.clustering_index = faiss.IndexFlatIP(d)
        ivf.cp.seed = 1234  # reproducible lists for the same sample
    return index


def set_search_params(index, nprobe: int, ef_search: int | None = None) -> None:
    """Set the lists probed (and the quantizer's graph width) on an IVF index; no-op for Flat. Both are saved with
    the index, so every shard built from it searches with them."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    ivf.nprobe = int(nprobe)
    set_quantizer_ef(index, query_ef_search(nprobe) if ef_search is None else ef_search)


def set_quantizer_ef(index, ef_search: int) -> int:
    """Set the HNSW quantizer's efSearch; returns the previous value (0 when there is no graph quantizer)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return 0
    quantizer = faiss.downcast_index(ivf.quantizer)
    if not hasattr(quantizer, "hnsw"):
        return 0
    previous = int(quantizer.hnsw.efSearch)
    quantizer.hnsw.efSearch = int(ef_search)
    return previous


def add_vectors(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add with the narrow quantizer search for list assignment, then restore the query-time width."""
    previous = set_quantizer_ef(index, ADD_EF_SEARCH)
    try:
        index.add_with_ids(vectors, ids)
    finally:
        if previous:
            set_quantizer_ef(index, previous)


@dataclass
class Calibration:
    nprobe: int
    recall_at_10: float  # on the held-out queries at nprobe, against exact search over the training vectors
    queries: int
    recall_by_nprobe: dict[str, float] = field(default_factory=dict)


def train_index(choice: IndexChoice, sample: np.ndarray, target_recall: float, nprobe: int = 0):
    """Train an empty index of ``choice`` on ``sample`` (rows beyond ``choice.train_rows`` are held out) and set
    its nprobe: ``nprobe`` when given, else the smallest power of two whose recall@10 on the held-out rows reaches
    ``target_recall``. Returns (index, Calibration or None for Flat)."""
    index = new_index(choice.factory, choice.d)
    if not choice.trained:
        return index, None
    # The sample may come back a little short of choice.sample_rows (it is drawn by Bernoulli sampling).
    held_out = min(choice.calibration_rows, len(sample) // 10)
    base, queries = sample[: len(sample) - held_out], sample[len(sample) - held_out :]
    index.train(base)
    calibration = calibrate_nprobe(
        index, base[:MAX_CALIBRATION_BASE], queries, min(1.0, target_recall + CALIBRATION_MARGIN), nprobe
    )
    set_search_params(index, calibration.nprobe)
    return index, calibration


def calibrate_nprobe(
    trained, base: np.ndarray, queries: np.ndarray, target_recall: float, fixed_nprobe: int = 0
) -> Calibration:
    """Recall@10 of ``trained`` (a copy of it, filled with ``base``) on ``queries`` against exact search, for nprobe
    1, 2, 4, ... up to every list; the smallest nprobe reaching ``target_recall``, or, for codes too coarse to get
    there (PQ), the smallest that comes within half a point of the best."""
    import faiss

    nlist = faiss.extract_index_ivf(trained).nlist
    if len(queries) == 0:
        nprobe = fixed_nprobe or nlist
        return Calibration(nprobe=nprobe, recall_at_10=float("nan"), queries=0)
    probe = faiss.deserialize_index(faiss.serialize_index(trained))
    add_vectors(probe, base, np.arange(len(base), dtype=np.int64))
    k = min(RECALL_AT, len(base))
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth = exact.search(queries, k)

    def recall(nprobe: int) -> float:
        set_search_params(probe, nprobe)
        _, found = probe.search(queries, k)
        return recall_at(found, truth)

    if fixed_nprobe:
        nprobe = min(fixed_nprobe, nlist)
        return Calibration(nprobe, recall(nprobe), len(queries), {str(nprobe): recall(nprobe)})
    candidates = [1 << i for i in range(nlist.bit_length()) if 1 << i <= nlist]
    if candidates[-1] != nlist:
        candidates.append(nlist)
    by_nprobe: dict[int, float] = {}
    for nprobe in candidates:
        by_nprobe[nprobe] = recall(nprobe)
        if by_nprobe[nprobe] >= target_recall:
            break
    best = max(by_nprobe.values())
    good_enough = target_recall if best >= target_recall else best - 0.005
    chosen = min(nprobe for nprobe, value in by_nprobe.items() if value >= good_enough)
    return Calibration(
        chosen, by_nprobe[chosen], len(queries), {str(nprobe): round(value, 4) for nprobe, value in by_nprobe.items()}
    )


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (exact neighbours) that ``found`` contains."""
    if truth.size == 0:
        return float("nan")
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size
