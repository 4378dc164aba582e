"""The kNN index on disk: what `laion-spark index` writes and `search` / `serve` read.

::

    <index dir>/                    index.path, default <lake>/_index
      manifest.json                 written last, atomically: a reader reads it first and opens only what it names
      trained/image.faiss           the empty, trained index (IVF types): new shards are built from it
      trained/text.faiss
      image/<shard>.faiss           one faiss index per shard; vector ids are sample ids (laion_spark.storage.ids)
      text/<shard>.faiss            the same ids as image/<shard>.faiss, text embeddings
      metadata/<shard>.parquet      one row per vector of the shard, sorted by id (METADATA_COLUMNS)

A shard is built by one Spark task and never modified in place: removing ids writes a new version of the shard
under a new name, and the manifest then points at it. Files that no manifest names are garbage from an earlier
version or a killed build, and the next build deletes them.

Every shard of one modality is built from the same trained empty index (trained/<modality>.faiss; for Flat an empty
``IDMap2,Flat``), so IVF shards share their coarse quantizer: a reader may search them one by one and merge the top
k, or merge them into one index when it loads them (``IndexIVF.merge_from(shard, 0)``), and probe the lists once.
Each file carries its search parameters (the IVF's nprobe and the HNSW quantizer's efSearch, the values in
``params``): ``faiss.read_index`` returns an index that searches as calibrated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from laion_spark.storage.outputs import OutputDir

MANIFEST = "manifest.json"
TRAINED_PATH = "trained/{modality}.faiss"
FORMAT_VERSION = 1
MODALITIES = ("image", "text")
METRIC = "inner_product"  # embeddings are L2-normalised: inner product is cosine similarity

# Columns of metadata/<shard>.parquet, in order, with their Arrow types (as pyarrow type names).
METADATA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "int64"),
    ("uid", "string"),
    ("url", "string"),
    ("caption", "string"),
    ("similarity", "float32"),  # the pair's CLIP image-text similarity (dataset.similarity)
    ("width", "int32"),
    ("height", "int32"),
    ("language", "string"),
    ("nsfw", "string"),
    ("punsafe", "float32"),
)


@dataclass
class ModelRef:
    """The open_clip model the embeddings come from, as the config that built the index named it."""

    name: str
    pretrained: str = ""
    model_config: str = ""


@dataclass
class Shard:
    name: str
    count: int  # vectors in the shard (the same for image and text)

    def path(self, modality: str) -> str:
        return f"{modality}/{self.name}.faiss"

    @property
    def metadata_path(self) -> str:
        return f"metadata/{self.name}.parquet"


@dataclass
class Manifest:
    dim: int
    index_type: str  # Flat | IVF-HNSW,Flat | IVF,SQ8 | IVF,PQ
    factory: str  # the faiss index_factory string each shard was built from
    params: dict[str, Any]  # nlist, nprobe, pq_m, train_rows, max_memory_gb, ... (what the choice was based on)
    model: ModelRef
    embeddings_version: int  # the embeddings table version the index reflects
    dataset_version: int  # the dataset table version the index reflects
    count: int
    shards: list[Shard] = field(default_factory=list)
    built_at: str = ""
    updated_at: str = ""
    metric: str = METRIC
    format: int = FORMAT_VERSION

    @property
    def nprobe(self) -> int:
        return int(self.params.get("nprobe", 0) or 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["model"] = ModelRef(**raw["model"])
        raw["shards"] = [Shard(**shard) for shard in raw.get("shards", [])]
        return cls(**raw)


class IndexMissing(FileNotFoundError):
    """No index at the place the config names: the message says how to build one."""


def read_manifest(directory: OutputDir) -> Manifest:
    if not directory.exists(MANIFEST):
        raise IndexMissing(
            f"no kNN index in {directory.uri} (no {MANIFEST}): build it with `laion-spark index --lake ...`"
        )
    return Manifest.from_json(directory.read_bytes(MANIFEST).decode("utf-8"))


def write_manifest(directory: OutputDir, manifest: Manifest) -> None:
    directory.publish_bytes(MANIFEST, manifest.to_json().encode("utf-8"))


def index_location(lake: str, index_path: str = "") -> OutputDir:
    """Where the lake's index lives: ``index.path``, or ``<lake>/_index`` for a lake that is a directory."""
    if index_path:
        return OutputDir(index_path)
    from laion_spark.storage.delta import is_catalog_lake

    if is_catalog_lake(lake):
        from laion_spark.config import ConfigError

        raise ConfigError(f"index.path: the lake {lake!r} is a catalog schema; set index.path to a directory or URI")
    return OutputDir(lake.rstrip("/") + "/_index")
