"""Images from outside the lake (evaluation sets, reference images), and their pHash and CLIP image embedding.

A source is a path as the config gives it (``dedup.eval_sets``, ``dataset.image_cluster.reference``), of one of
three kinds, told apart by the files under it:

* WebDataset shards: ``.tar`` files (one file, a glob, or a folder of them). Each image member is one image, named
  by its sample key (the member's path up to the first dot of its name, as webdataset groups a sample). An
  img2dataset output folder also holds ``.parquet`` metadata files without images; the shards win.
* Parquet: ``.parquet`` files with a binary image column, ``image`` or the one img2dataset writes (``jpg``,
  ``png``, ``webp``); the id is the ``image_id``/``key``/``uid``/``id`` column, or else the image's sha256.
* A folder of image files, read recursively; the id is the path below the folder.

Everything is read through Spark's DataFrame readers (``binaryFile``, ``parquet``) and split in ``mapInArrow``
workers, so it runs on Spark Connect as on a classic session.

:func:`image_signatures` decodes each image once and computes both its pHash and its embedding in one pass, the
way the pool's were computed: the pHash from the orientation-corrected RGB image before any resize (as the
download workers hash what they fetched), the embedding with the lake's CLIP model, L2-normalised and rounded to
``clip.embedding_dtype`` (as the score stage stores it). An image that does not decode is a row with an ``error``
(logged by the worker); :func:`load_signatures` counts those per source and leaves them out: one bad file in an
eval set never stops a run.
"""

from __future__ import annotations

import functools
import io
import logging
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    FloatType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from laion_spark.config import ClipConfig, ConfigError

log = logging.getLogger(__name__)

# Extensions read as images, in a folder and inside WebDataset shards (Pillow decodes all of them).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# The binary column of a parquet source: ours, then the ones img2dataset writes (named after encode_format).
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
ID_COLUMNS = ("image_id", "key", "uid", "id")

IMAGE_SOURCE_SCHEMA = StructType(
    [
        StructField("source", StringType(), False),
        StructField("image_id", StringType(), False),
        StructField("image", BinaryType(), True),
    ]
)
SIGNATURE_FIELDS = [
    StructField("phash", LongType(), True),
    StructField("image_embedding", ArrayType(FloatType()), True),
    StructField("error", StringType(), True),
]


def read_image_sources(spark: SparkSession, paths: Sequence[str], what: str = "image source") -> DataFrame:
    """(source, image_id, image) for every image of every source; ``source`` is the path as given.

    ``what`` names the setting the paths come from in error messages (``dedup.eval_sets``). A path that does not
    exist, or holds no images, .parquet or .tar files, is a :class:`ConfigError`.
    """
    frames = [read_image_source(spark, path, what) for path in paths]
    if not frames:
        return spark.createDataFrame([], IMAGE_SOURCE_SCHEMA)
    return reduce(DataFrame.unionByName, frames)


def read_image_source(spark: SparkSession, path: str, what: str = "image source") -> DataFrame:
    extensions = _extension_counts(spark, path, what)
    if extensions.get("tar"):
        return _read_webdataset(spark, path)
    if extensions.get("parquet"):
        return _read_parquet(spark, path, what)
    if any(extensions.get(extension) for extension in IMAGE_EXTENSIONS):
        return _read_image_folder(spark, path)
    found = ", ".join(f"{count} .{ext or '(no extension)'}" for ext, count in sorted(extensions.items())) or "nothing"
    raise ConfigError(
        f"{what} {path!r} holds no image files, .parquet or .tar files (found {found}); point it at a folder of "
        "images, parquet files with an image column, or WebDataset .tar shards"
    )


def _extension_counts(spark: SparkSession, path: str, what: str) -> dict[str, int]:
    """How many files of each (lowercased) extension lie under ``path``: one small aggregate, no file is read."""
    extension = F.lower(F.regexp_extract(F.col("path"), r"\.([^./]+)$", 1)).alias("extension")
    try:
        # A classic session checks the path at load(), Spark Connect at the first action: both inside the try.
        listing = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(path).select("path")
        rows = listing.groupBy(extension).count().collect()  # a few rows: one per extension
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc).lower():
            raise ConfigError(f"{what} {path!r} does not exist; fix or remove it") from None
        raise
    if not rows:
        raise ConfigError(f"{what} {path!r} is empty; point it at image files, parquet files or .tar shards")
    return {row["extension"]: int(row["count"]) for row in rows}


def _glob_of(extensions: Iterable[str]) -> str:
    # Hadoop's glob filter is case-sensitive: IMG_0001.JPG is as common as .jpg.
    names = sorted({variant for ext in extensions for variant in (ext.lower(), ext.upper())})
    return "*.{" + ",".join(names) + "}"


def _read_image_folder(spark: SparkSession, path: str) -> DataFrame:
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", _glob_of(IMAGE_EXTENSIONS))
        .load(path)
    )
    return files.select(
        F.lit(path).alias("source"), _path_below(F.col("path"), path).alias("image_id"), F.col("content").alias("image")
    )


def _path_below(file_path: Column, root: str) -> Column:
    """The file's path below ``root`` (Spark spells paths as qualified URIs, ``file:/...``), else its name."""
    bare = root.split("://", 1)[-1].removeprefix("file:").rstrip("/")
    if "://" not in root and not bare.startswith("/"):
        import os

        bare = os.path.abspath(bare)
    below = F.regexp_extract(file_path, r"\Q" + bare + r"\E/(.+)$", 1)
    name = F.regexp_extract(file_path, r"([^/]+)$", 1)
    return F.when(below != "", below).otherwise(name)


def _read_parquet(spark: SparkSession, path: str, what: str) -> DataFrame:
    table = spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", "*.parquet").parquet(path)
    types = {f.name: f.dataType for f in table.schema.fields}
    image = next((name for name in IMAGE_COLUMNS if isinstance(types.get(name), BinaryType)), None)
    if image is None:
        raise ConfigError(
            f"{what} {path!r}: its parquet files have no binary image column ({' or '.join(IMAGE_COLUMNS)}); "
            f"their columns are {', '.join(types) or 'none'}"
        )
    key = next((name for name in ID_COLUMNS if name in types), None)
    # Without an id column, the image's own hash: stable across reruns and repartitioning, unlike a row number.
    digest = F.sha2(F.col(image), 256)
    image_id = F.coalesce(F.col(key).cast("string"), digest) if key else digest
    return table.where(F.col(image).isNotNull()).select(
        F.lit(path).alias("source"), image_id.alias("image_id"), F.col(image).alias("image")
    )


def _read_webdataset(spark: SparkSession, path: str) -> DataFrame:
    shards = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", _glob_of(["tar"]))
        .load(path)
        .select("path", "content")
    )
    return shards.mapInArrow(functools.partial(split_shards, source=path), IMAGE_SOURCE_SCHEMA)


def split_shards(batches: Iterable[pa.RecordBatch], source: str) -> Iterator[pa.RecordBatch]:
    """The worker of a WebDataset source: (path, content) of .tar shards in, one row per image member out."""
    for batch in batches:
        for shard, content in zip(batch.column("path").to_pylist(), batch.column("content").to_pylist(), strict=True):
            keys, images = shard_images(shard, content or b"")
            if keys:
                yield pa.RecordBatch.from_arrays(
                    [pa.array([source] * len(keys), pa.string()), pa.array(keys, pa.string()), pa.array(images)],
                    schema=pa.schema(
                        [pa.field("source", pa.string(), False), pa.field("image_id", pa.string(), False)]
                        + [pa.field("image", pa.binary())]
                    ),
                )


def shard_images(shard: str, content: bytes) -> tuple[list[str], list[bytes]]:
    """(sample keys, image bytes) of one shard: the first image member of each sample, in shard order.

    A damaged shard keeps the images before the damage, with a log line: a truncated download of one shard should
    not hide the rest of an eval set.
    """
    keys: list[str] = []
    images: list[bytes] = []
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, name = member.name.removeprefix("./").rpartition("/")
                stem, dot, extension = name.partition(".")
                if not dot or extension.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if key in seen:
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()  # before the key: a member cut short adds neither
                seen.add(key)
                keys.append(key)
                images.append(data)
    except (tarfile.TarError, EOFError, OSError) as exc:
        log.warning("WebDataset shard %s is damaged after %d images (%s); keeping those", shard, len(keys), exc)
    return keys, images


# ---------------------------------------------------------------------------------------------------------------
# Signatures: pHash and CLIP image embedding, one decode per image.


def signatures_schema(images: DataFrame) -> StructType:
    """``images``' columns but ``image``, then phash, image_embedding and error."""
    kept = [f for f in images.schema.fields if f.name != "image"]
    return StructType(kept + SIGNATURE_FIELDS)


def image_signatures(images: DataFrame, clip: ClipConfig) -> DataFrame:
    """``images`` (any key columns and a binary ``image``) with ``image`` replaced by phash, image_embedding, error.

    One ``mapInArrow`` pass: each image is decoded once, hashed, and embedded by the CLIP model (loaded once per
    Python worker). A row whose image does not decode keeps null phash and embedding and says why in ``error``.
    """
    from laion_spark.score.worker import ScoringSettings

    settings = ScoringSettings.from_config(clip)  # validates batch_size and embedding_dtype on the driver
    names = [f.name for f in images.schema.fields if f.name != "image"]
    return images.select(*names, "image").mapInArrow(
        functools.partial(signature_batches, settings=settings, key_columns=tuple(names)), signatures_schema(images)
    )


def oriented_rgb(image_bytes: bytes | None) -> Any:
    """The image as the download workers hash it: EXIF orientation applied, transparency on white, RGB.

    The same steps as ``laion_spark.download.images`` before its resize, so that an eval image and its copy in the
    pool get the same pHash.
    """
    from PIL import Image, ImageOps

    from laion_spark.download.images import to_rgb

    if not image_bytes:
        raise ValueError("no image bytes")
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def signature_batches(
    batches: Iterable[pa.RecordBatch], settings: Any, key_columns: tuple[str, ...]
) -> Iterator[pa.RecordBatch]:
    """The worker of :func:`image_signatures`: each incoming batch in slices of ``settings.batch_size`` rows, so
    that at most one model batch of decoded pixels is held at a time."""
    import torch

    from laion_spark.curate.phash import phash
    from laion_spark.score.model import clip_model, task_device
    from laion_spark.score.worker import BatchPreprocess, _limit_cpu_threads, round_embeddings

    device = task_device(settings.device)
    _limit_cpu_threads(device)  # the task's cores, not the machine's (concurrent tasks share an executor)
    model = clip_model(settings.spec, device, settings.load_log_dir)
    preprocess = BatchPreprocess(model.preprocess)
    width = model.embed_dim
    embedding_type = pa.list_(pa.float32())
    for batch in batches:
        for start in range(0, batch.num_rows, settings.batch_size):
            rows = batch.slice(start, settings.batch_size)
            hashes: list[int | None] = []
            errors: list[str | None] = []
            pixels: list[Any] = []
            for index, image_bytes in enumerate(rows.column("image").to_pylist()):
                try:
                    image = oriented_rgb(image_bytes)
                    hashes.append(phash(image))
                    pixels.append(preprocess.per_image(image))
                    errors.append(None)
                except Exception as exc:  # Pillow raises many types for damaged files; each is one row's error
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    hashes.append(None)
                    errors.append(error)
                    key = ", ".join(str(rows.column(name)[index].as_py()) for name in key_columns[:2])
                    log.warning("skipping an image that does not decode (%s): %s", key, error)
            decoded = np.array([error is None for error in errors], dtype=bool)
            if pixels:
                features = model.encode_images(preprocess.finish(pixels, torch)).cpu().numpy()
                features = round_embeddings(features, settings.embedding_dtype)
                width = features.shape[1]
            else:
                features = np.zeros((0, width), dtype=np.float32)
            # Offsets repeat where a row failed: an empty list there, masked to null by the validity bitmap.
            lengths = np.where(decoded, width, 0)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            embeddings = pa.ListArray.from_arrays(
                offsets, pa.array(features.reshape(-1), pa.float32()), type=embedding_type, mask=pa.array(~decoded)
            )
            yield pa.RecordBatch.from_arrays(
                [rows.column(name) for name in key_columns]
                + [pa.array(hashes, pa.int64()), embeddings, pa.array(errors, pa.string())],
                names=[*key_columns, "phash", "image_embedding", "error"],
            )


@dataclass
class Signatures:
    """Signatures of the images of some sources, computed once and kept (``rows``: only the images that
    decoded), and per source how many images there were and how many were skipped because they do not decode."""

    rows: DataFrame
    images: dict[str, int] = field(default_factory=dict)
    undecodable: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.undecodable.values())


def load_signatures(
    spark: SparkSession, paths: Sequence[str], clip: ClipConfig, what: str = "image source"
) -> Signatures:
    """Read ``paths`` (:func:`read_image_sources`), compute their signatures once, count and log what was skipped.

    The signatures are checkpointed: the steps that use them (a join on the pool, a broadcast, a k-means assignment)
    then do not run the CLIP model again. Eval and reference sets are small by design (thousands to 100,000 images).
    """
    signatures = image_signatures(read_image_sources(spark, paths, what), clip).localCheckpoint(eager=True)
    counts = (
        signatures.groupBy("source").agg(F.count(F.lit(1)).alias("images"), F.count("error").alias("undecodable"))
    ).collect()  # one row per source
    result = Signatures(
        rows=signatures.where(F.col("error").isNull()).drop("error"),
        images={row["source"]: int(row["images"]) for row in counts},
        undecodable={row["source"]: int(row["undecodable"]) for row in counts},
    )
    for path in paths:
        total, bad = result.images.get(path, 0), result.undecodable.get(path, 0)
        if bad:
            log.warning("%s %s: %d of %d images do not decode and are skipped", what, path, bad, total)
        else:
            log.info("%s %s: %d images", what, path, total)
    return result
