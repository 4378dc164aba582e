"""The kNN index as ``search`` and ``serve`` read it: every shard loaded, searched and merged, metadata by id.

No Spark here (and no JVM): the files of the index (see :mod:`laion_spark.index.layout`) are read through pyarrow's
filesystems, so an index on an object store is served as one on local disk.

Memory: the faiss shards are held whole (faiss searches memory), and of the metadata only the ``id`` column is held,
sorted, 8 bytes a vector (what faiss's own id lists take again); the other columns are read on demand, one parquet
row group at a time, and the last :data:`METADATA_CACHE_ROWS` rows read stay cached. A large index therefore costs
the faiss shards plus 8 bytes a vector, not its captions and URLs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from laion_spark.index.layout import MANIFEST, MODALITIES, Manifest, Shard, read_manifest
from laion_spark.storage.outputs import OutputDir

log = logging.getLogger(__name__)

# Rows of metadata kept decoded across queries (a few hundred bytes each).
METADATA_CACHE_ROWS = 1_000_000

# How a shard gives back the vectors of its results (serve's deduplicate needs them).
NATIVE = "native"  # index.search_and_reconstruct: IVF types, IDMap2
ID_MAP = "id_map"  # IndexIDMap over a flat index: we map ids to positions ourselves
NO_VECTORS = "none"  # neither: results come without vectors


class IndexFormatError(ValueError):
    """The index directory holds something this version cannot read; the message says what and where."""


@dataclass
class Hit:
    """One result of a search: the sample id, its cosine similarity to the query, the shard it is in, and the
    stored vector when asked for and available."""

    id: int
    similarity: float
    shard: str
    vector: np.ndarray | None = None


@dataclass
class _ShardIndex:
    """One modality's faiss index of one shard, and how to get vectors back from it."""

    index: Any
    reconstruct: str
    # For ID_MAP: the inner flat index, the shard's ids sorted, and the position in the inner index of each.
    inner: Any = None
    sorted_ids: np.ndarray | None = None
    positions: np.ndarray | None = None

    def search(self, queries: np.ndarray, k: int, with_vectors: bool) -> tuple[np.ndarray, np.ndarray, Any]:
        k = max(1, min(k, int(self.index.ntotal)))
        if not with_vectors or self.reconstruct == NO_VECTORS:
            distances, ids = self.index.search(queries, k)
            return distances, ids, None
        if self.reconstruct == NATIVE:
            return self.index.search_and_reconstruct(queries, k)
        distances, ids = self.index.search(queries, k)
        return distances, ids, self._vectors_of(ids)

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        inner = self.inner
        flat_ids = ids.reshape(-1)
        vectors = np.zeros((len(flat_ids), inner.d), dtype=np.float32)
        valid = flat_ids >= 0
        where = np.searchsorted(self.sorted_ids, flat_ids[valid])
        positions = self.positions[np.minimum(where, len(self.positions) - 1)]
        if len(positions):
            vectors[valid] = inner.reconstruct_batch(positions.astype(np.int64))
        return vectors.reshape(ids.shape + (inner.d,))


class _RowGroupCache:
    """Decoded metadata row groups, least recently used first out, bounded by the rows they hold."""

    def __init__(self, max_rows: int = METADATA_CACHE_ROWS):
        self.max_rows = max_rows
        self._rows = 0
        self._entries: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int], load) -> Any:
        with self._lock:
            table = self._entries.get(key)
            if table is not None:
                self._entries.move_to_end(key)
                return table
        table = load()  # outside the lock: two threads may both read a cold row group, neither waits on the other
        with self._lock:
            if key not in self._entries:
                self._entries[key] = table
                self._rows += table.num_rows
                while self._rows > self.max_rows and len(self._entries) > 1:
                    _, evicted = self._entries.popitem(last=False)
                    self._rows -= evicted.num_rows
        return table


class ShardMetadata:
    """``metadata/<shard>.parquet``: the ids in memory, the other columns read per row group on demand."""

    def __init__(self, directory: OutputDir, shard: Shard, cache: _RowGroupCache):
        import pyarrow.parquet as pq

        self.directory = directory
        self.path = shard.metadata_path
        self.name = shard.name
        self._cache = cache
        with directory.filesystem.open_input_file(directory.path(self.path)) as stream:
            parquet = pq.ParquetFile(stream)
            ids = parquet.read(columns=["id"]).column("id").to_numpy().astype(np.int64, copy=False)
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        # The layout promises rows sorted by id; a file that is not is still read right, at the cost of an order.
        self._order: np.ndarray | None = None
        if len(ids) > 1 and not bool(np.all(ids[1:] >= ids[:-1])):
            self._order = np.argsort(ids, kind="stable")
            ids = ids[self._order]
        self.ids = ids
        self._group_starts = np.cumsum([0, *sizes])

    def __len__(self) -> int:
        return len(self.ids)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        where = np.searchsorted(self.ids, ids)
        inside = where < len(self.ids)
        found = np.zeros(len(ids), dtype=bool)
        found[inside] = self.ids[where[inside]] == ids[inside]
        return found

    def rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Metadata rows of those of ``ids`` that this shard holds, by id."""
        wanted = np.asarray(ids, dtype=np.int64)
        found = self.contains(wanted)
        if not found.any():
            return {}
        wanted = wanted[found]
        rows_in_file = np.searchsorted(self.ids, wanted)
        if self._order is not None:
            rows_in_file = self._order[rows_in_file]
        groups = np.searchsorted(self._group_starts, rows_in_file, side="right") - 1
        result: dict[int, dict[str, Any]] = {}
        for group in np.unique(groups):
            table = self._cache.get((self.path, int(group)), lambda group=int(group): self._read_group(group))
            offsets = rows_in_file[groups == group] - self._group_starts[group]
            picked = table.take(offsets).to_pylist()
            for sample_id, row in zip(wanted[groups == group], picked, strict=True):
                result[int(sample_id)] = {key: _json_value(value) for key, value in row.items()}
        return result

    def _read_group(self, group: int) -> Any:
        import pyarrow.parquet as pq

        with self.directory.filesystem.open_input_file(self.directory.path(self.path)) as stream:
            return pq.ParquetFile(stream).read_row_group(group)


def _json_value(value: Any) -> Any:
    # NaN is not JSON; a missing punsafe (no detector) reads as null.
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class LoadedShard:
    shard: Shard
    indexes: dict[str, _ShardIndex]
    metadata: ShardMetadata


@dataclass
class LoadedIndex:
    """Every shard of one version of the index (one manifest), in memory, ready to search."""

    directory: OutputDir
    manifest: Manifest
    manifest_bytes: bytes
    shards: list[LoadedShard]
    nprobe: int
    loaded_at: float = field(default_factory=time.time)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        return sum(int(shard.indexes["image"].index.ntotal) for shard in self.shards)

    def can_reconstruct(self, modality: str = "image") -> bool:
        return all(shard.indexes[modality].reconstruct != NO_VECTORS for shard in self.shards)

    def search(
        self, queries: np.ndarray, k: int, modality: str = "image", with_vectors: bool = False
    ) -> list[list[Hit]]:
        """The ``k`` nearest of every query (rows of ``queries``, L2-normalised), best first, over every shard.

        Shards hold disjoint ids, so the merged top k is the top k of the per-shard top k. ``with_vectors`` adds the
        stored vector of each hit where the index type can give it back (see :meth:`can_reconstruct`).
        """
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"a query has {queries.shape[1]} dimensions, the index {self.dim}")
        per_query: list[list[Hit]] = [[] for _ in range(len(queries))]
        for loaded in self.shards:
            shard_index = loaded.indexes[modality]
            if shard_index.index.ntotal == 0:
                continue
            distances, ids, vectors = shard_index.search(queries, k, with_vectors)
            for row in range(len(queries)):
                for column in range(ids.shape[1]):
                    sample_id = int(ids[row, column])
                    if sample_id < 0:
                        continue
                    vector = None if vectors is None else np.asarray(vectors[row, column], dtype=np.float32)
                    per_query[row].append(Hit(sample_id, float(distances[row, column]), loaded.shard.name, vector))
        return [sorted(hits, key=lambda hit: -hit.similarity)[:k] for hits in per_query]

    def metadata(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Metadata rows by id; ids that no shard holds are left out."""
        result: dict[int, dict[str, Any]] = {}
        remaining = np.asarray(list(ids), dtype=np.int64)
        for loaded in self.shards:
            if len(remaining) == 0:
                break
            found = loaded.metadata.rows(remaining)
            result.update(found)
            if found:
                remaining = remaining[~np.isin(remaining, np.fromiter(found, dtype=np.int64, count=len(found)))]
        return result


def open_index(directory: OutputDir, nprobe: int = 0) -> LoadedIndex:
    """Load the index at ``directory`` as its manifest names it; raises :class:`~laion_spark.index.layout.IndexMissing`.

    ``nprobe`` overrides the manifest's for IVF types (0: the manifest's).
    """
    manifest_bytes = _read_manifest_bytes(directory)
    return _load(directory, manifest_bytes, nprobe)


def _read_manifest_bytes(directory: OutputDir) -> bytes:
    read_manifest(directory)  # the IndexMissing error, with its message, when there is none
    return directory.read_bytes(MANIFEST)


def _load(directory: OutputDir, manifest_bytes: bytes, nprobe: int) -> LoadedIndex:
    started = time.perf_counter()
    try:
        manifest = Manifest.from_json(manifest_bytes.decode("utf-8"))
    except (ValueError, TypeError, KeyError) as exc:
        raise IndexFormatError(f"{directory.uri_of(MANIFEST)} is not a manifest this version reads: {exc}") from None
    if manifest.format > 1:
        raise IndexFormatError(
            f"{directory.uri_of(MANIFEST)} has format {manifest.format}; this laion_spark reads format 1: upgrade it"
        )
    probes = nprobe or manifest.nprobe
    cache = _RowGroupCache()
    shards = [
        LoadedShard(
            shard=shard,
            indexes={
                modality: _load_shard_index(directory, shard, modality, manifest, probes) for modality in MODALITIES
            },
            metadata=ShardMetadata(directory, shard, cache),
        )
        for shard in manifest.shards
    ]
    loaded = LoadedIndex(directory, manifest, manifest_bytes, shards, probes)
    log.info(
        "loaded the kNN index in %s: %s, %d vectors in %d shards (embeddings version %s) in %.2fs",
        directory.uri,
        manifest.index_type,
        loaded.count,
        len(shards),
        manifest.embeddings_version,
        time.perf_counter() - started,
    )
    if shards and not loaded.can_reconstruct():
        log.warning(
            "the index type %s cannot give vectors back: deduplicate falls back to dropping results whose "
            "similarity to the query equals a better one's",
            manifest.index_type,
        )
    return loaded


def _load_shard_index(
    directory: OutputDir, shard: Shard, modality: str, manifest: Manifest, nprobe: int
) -> _ShardIndex:
    import faiss

    path = shard.path(modality)
    index = faiss.deserialize_index(np.frombuffer(directory.read_bytes(path), dtype=np.uint8))
    if index.d != manifest.dim:
        raise IndexFormatError(f"{directory.uri_of(path)} has dimension {index.d}, the manifest says {manifest.dim}")
    _set_search_parameters(index, nprobe, manifest.params)
    # deserialize_index already gives the concrete class; a faiss.downcast_index of it here would make a second
    # wrapper that does not own the index, left dangling when the first is collected.
    return _with_reconstruction(index, manifest.dim)


def _set_search_parameters(index: Any, nprobe: int, params: dict[str, Any]) -> None:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return  # not an IVF type: nothing to probe
    if nprobe > 0:
        ivf.nprobe = min(nprobe, ivf.nlist)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        # An HNSW quantizer must explore at least about 2 * nprobe nodes to return nprobe good lists.
        recorded = int(params.get("efSearch", 0) or params.get("ef_search", 0) or 0)
        quantizer.hnsw.efSearch = max(int(quantizer.hnsw.efSearch), recorded, 2 * int(ivf.nprobe))


def _with_reconstruction(index: Any, dim: int) -> _ShardIndex:
    """Find out once, on load, how this index type gives vectors back."""
    import faiss

    if index.ntotal == 0:
        return _ShardIndex(index, NO_VECTORS)
    probe = np.zeros((1, dim), dtype=np.float32)
    probe[0, 0] = 1.0
    try:
        index.search_and_reconstruct(probe, 1)
        return _ShardIndex(index, NATIVE)
    except RuntimeError:
        pass
    if isinstance(index, faiss.IndexIDMap):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        order = np.argsort(ids, kind="stable")
        inner = faiss.downcast_index(index.index)
        try:
            inner.reconstruct_batch(np.zeros(1, dtype=np.int64))
            return _ShardIndex(index, ID_MAP, inner=inner, sorted_ids=ids[order], positions=order.astype(np.int64))
        except RuntimeError:
            pass
    return _ShardIndex(index, NO_VECTORS)


class IndexStore:
    """The current version of the index, reloaded when ``manifest.json`` changes (``index`` rerun meanwhile).

    The manifest is read again at most every ``check_interval_s`` seconds, by the first query after the interval;
    a changed one is loaded by that query while the others go on with the previous version, which is then dropped.
    A reload that fails (a build half-published, a file gone) keeps the previous version and tries again later.
    """

    def __init__(self, directory: OutputDir, nprobe: int = 0, check_interval_s: float = 5.0):
        self.directory = directory
        self.nprobe = nprobe
        self.check_interval_s = check_interval_s
        self._current = open_index(directory, nprobe)
        self._checked_at = time.monotonic()
        self._reload_lock = threading.Lock()
        self.reloads = 0

    def current(self) -> LoadedIndex:
        if time.monotonic() - self._checked_at >= self.check_interval_s:
            self.refresh()
        return self._current

    def refresh(self, force: bool = False) -> bool:
        """Reload if the manifest changed (or always, with ``force``); True when a new version was loaded."""
        if not self._reload_lock.acquire(blocking=force):
            return False  # another query is checking right now; this one goes on with the current version
        try:
            self._checked_at = time.monotonic()
            try:
                manifest_bytes = self.directory.read_bytes(MANIFEST)
            except OSError as exc:
                log.warning(
                    "cannot read %s (%s); serving the index loaded before", self.directory.uri_of(MANIFEST), exc
                )
                return False
            if manifest_bytes == self._current.manifest_bytes and not force:
                return False
            try:
                loaded = _load(self.directory, manifest_bytes, self.nprobe)
            except Exception:
                log.warning(
                    "reloading the kNN index in %s failed; serving the one loaded before",
                    self.directory.uri,
                    exc_info=True,
                )
                return False
            self._current = loaded
            self.reloads += 1
            return True
        finally:
            self._reload_lock.release()
