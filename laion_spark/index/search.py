"""``laion-spark search``: a caption, an image or both -> the nearest pairs of the lake's kNN index.

The search itself (:func:`find_matches`: over-fetch, drop ids without metadata, deduplicate, rank) is shared with
``laion-spark serve``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from laion_spark.config import Config, ConfigError
from laion_spark.index.layout import index_location
from laion_spark.index.query import BadQuery, combine_queries, encoder_for
from laion_spark.index.store import Hit, LoadedIndex, open_index

log = logging.getLogger(__name__)

# Without stored vectors, two results count as duplicates when their similarities to the query differ by less
# than this: identical vectors (the same image under two URLs) give identical similarities.
SAME_SIMILARITY = 1e-6


@dataclass
class Match:
    """One result: its rank (1 = best), the sample id, the cosine similarity to the query, and the pair."""

    rank: int
    id: int
    similarity: float
    uid: str
    url: str
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)  # every column of metadata/<shard>.parquet


def search_lake(
    config: Config,
    lake: str,
    text: str | None = None,
    image_path: str | None = None,
    k: int = 20,
    modality: str = "image",
) -> list[Match]:
    """The ``k`` pairs of ``lake``'s index nearest to ``text``, the image at ``image_path``, or both (averaged).

    Raises :class:`~laion_spark.index.layout.IndexMissing` when the lake has no index, and a ConfigError for a
    query that cannot be embedded or a model that cannot be loaded.
    """
    if not text and not image_path:
        raise ConfigError("give a text, an image or both to search with")
    index = open_index(index_location(lake, config.index.path), nprobe=config.index.nprobe)
    encoder = encoder_for(index.manifest, config.clip, config.download.max_pixels)
    vectors = []
    if text:
        try:
            vectors.append(encoder.encode_text(text))
        except BadQuery as exc:
            raise ConfigError(f"--text: {exc}") from None
    if image_path:
        try:
            vectors.append(encoder.encode_image(_read_image(image_path)))
        except BadQuery as exc:
            raise ConfigError(f"--image {image_path}: {exc}") from None
    return find_matches(index, combine_queries(vectors), k, modality)


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"--image {path}: cannot read it ({exc.strerror or exc})") from None


def find_matches(
    index: LoadedIndex,
    query: np.ndarray,
    k: int,
    modality: str = "image",
    deduplicate: bool = False,
    dedup_similarity: float = 0.98,
) -> list[Match]:
    """The ``k`` best matches of one normalised query vector, with their metadata.

    Ids without metadata are never returned (the index and its metadata are written together, so this only
    guards against a damaged index). With ``deduplicate``, twice as many candidates are fetched and a result whose
    vector is near-identical to a better one's (cosine >= ``dedup_similarity``) is dropped.
    """
    wanted = k * 2 if deduplicate else k
    hits = index.search(query, wanted, modality, with_vectors=deduplicate)[0]
    metadata = index.metadata([hit.id for hit in hits])
    hits = [hit for hit in hits if hit.id in metadata]
    if deduplicate:
        hits = drop_near_duplicates(hits, dedup_similarity)
    return [
        Match(
            rank=rank,
            id=hit.id,
            similarity=hit.similarity,
            uid=str(metadata[hit.id].get("uid") or ""),
            url=str(metadata[hit.id].get("url") or ""),
            caption=str(metadata[hit.id].get("caption") or ""),
            metadata=metadata[hit.id],
        )
        for rank, hit in enumerate(hits[:k], start=1)
    ]


def drop_near_duplicates(hits: list[Hit], threshold: float) -> list[Hit]:
    """``hits`` (best first) without those whose vector has cosine >= ``threshold`` with a better-ranked kept one.

    Hits without vectors (an index type that cannot give them back) are compared by their similarity to the query
    instead: equal similarities (within :data:`SAME_SIMILARITY`) mean duplicates, which catches exact duplicates
    only.
    """
    if len(hits) < 2:
        return list(hits)
    if any(hit.vector is None for hit in hits):
        kept_by_similarity: list[Hit] = []
        for hit in hits:
            if all(abs(hit.similarity - other.similarity) > SAME_SIMILARITY for other in kept_by_similarity):
                kept_by_similarity.append(hit)
        return kept_by_similarity
    vectors = np.stack([hit.vector for hit in hits]).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)  # quantized indexes give back approximately unit vectors
    cosines = vectors @ vectors.T
    kept: list[int] = []
    for i in range(len(hits)):
        if not kept or float(cosines[i, kept].max()) < threshold:
            kept.append(i)
    return [hits[i] for i in kept]


def format_matches(matches: list[Match]) -> str:
    """A plain-text table: rank, similarity, url, caption and uid, one match a line."""
    if not matches:
        return "no matches"
    url_width = min(60, max(len("url"), *(len(m.url) for m in matches)))
    caption_width = min(50, max(len("caption"), *(len(m.caption) for m in matches)))
    lines = [f"{'rank':>4}  {'similarity':>10}  {'url':<{url_width}}  {'caption':<{caption_width}}  uid"]
    for match in matches:
        lines.append(
            f"{match.rank:>4}  {match.similarity:>10.4f}  {_cut(match.url, url_width):<{url_width}}  "
            f"{_cut(_one_line(match.caption), caption_width):<{caption_width}}  {match.uid}"
        )
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
