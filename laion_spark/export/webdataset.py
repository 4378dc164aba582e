"""WebDataset shards in img2dataset's layout, which OpenCLIP's loader and ``wds.WebDataset`` read as they are.

``{shard:05d}.tar`` holds, per sample, ``{key}.jpg|png|webp`` (the bytes of ``images.image``, as stored),
``{key}.json`` and ``{key}.txt`` (the caption); ``{shard:05d}.parquet`` has one row per sample of the shard and
``{shard:05d}_stats.json`` its counts. The key is img2dataset's: the shard number, then the sample's index in
its shard, zero-padded (``f"{shard:05d}{index:04d}"`` for up to 10,000 samples per shard). A row without image
bytes is in the parquet and the stats (status ``failed_to_download``) but not in the tar, as in img2dataset.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from laion_spark.export.plan import LICENSE_COLUMN, ExportContext, with_license
from laion_spark.export.schemas import WEBDATASET_SCHEMA
from laion_spark.export.writers import GroupStatus, GroupWriter
from laion_spark.schemas import IMAGES
from laion_spark.storage import read_table
from laion_spark.storage.outputs import OutputDir

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_DECODE = "failed_to_decode"
# webdataset's TarWriter marks members read-only and owned by "bigdata"; readers ignore both, we follow it.
_TAR_OWNER = "bigdata"


def key_digits(samples_per_shard: int) -> int:
    """Digits of the in-shard index in a key: img2dataset's ceil(log10(samples per shard)), at least 4."""
    return max(4, math.ceil(math.log10(max(samples_per_shard, 1))))


def sample_key(shard: int, index: int, digits: int) -> str:
    return f"{shard:05d}{index:0{digits}d}"


def image_extension(data: bytes) -> str | None:
    """The tar member's extension from the bytes themselves (``images.content_type`` is the server's header,
    not the format the download stage re-encoded to)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def webdataset_rows(ctx: ExportContext, numbered: DataFrame) -> DataFrame:
    """(group, position) rows with the dataset's columns and the image bytes, for :class:`ShardWriter`."""
    columns = ctx.dataset.select(
        "uid",
        "url",
        F.col("text").alias("caption"),
        F.col("similarity").cast("double").alias("similarity"),
        "language",
        "nsfw",
        "punsafe",
        "width",
        "height",
        "original_width",
        "original_height",
    )
    images = image_bytes(ctx, numbered.select("uid"))
    return with_license(ctx, numbered.join(columns, "uid")).join(images, "uid", "left")


def image_bytes(ctx: ExportContext, uids: DataFrame) -> DataFrame:
    """The image bytes of ``uids``, read from the ``images`` partitions (download slices) that hold them only."""
    images = read_table(ctx.spark, ctx.lake, IMAGES)
    # One row per download slice holding some of the rows: as many as the slices, a handful per crawl.
    slices = [
        row.fetch_batch
        for row in images.select("uid", "fetch_batch")
        .join(uids, "uid", "left_semi")
        .select("fetch_batch")
        .distinct()
        .collect()
    ]
    if not slices:
        images = images.limit(0)
    else:
        images = images.where(F.col("fetch_batch").isin(*slices))
    return images.select(
        "uid",
        "image",
        "sha256",
        F.col("status").alias("image_status"),
        F.col("error").alias("image_error"),
    )


@dataclass(frozen=True)
class ShardSettings:
    out: OutputDir
    key_digits: int


class ShardWriter(GroupWriter):
    """One shard: the tar, its parquet and its stats, spooled locally, published tar first and parquet last."""

    def __init__(self, settings: ShardSettings, number: int, spool: Path) -> None:
        super().__init__(settings.out, number, spool)
        self.digits = settings.key_digits
        self.start_time = time.time()
        self.tar_path = spool / "shard.tar"
        self.parquet_path = spool / "shard.parquet"
        # USTAR: the POSIX format every tar reader knows; our member names are far below its 100-byte limit.
        self.tar = tarfile.open(self.tar_path, "w", format=tarfile.USTAR_FORMAT)
        self.parquet = pq.ParquetWriter(self.parquet_path, WEBDATASET_SCHEMA)
        self.statuses: Counter[str] = Counter()

    def add(self, batch: pa.RecordBatch) -> None:
        samples = []
        for row in batch.to_pylist():
            position = int(row["position"])
            if position >= 10**self.digits:
                raise ValueError(f"sample {position} of shard {self.number} does not fit {self.digits} key digits")
            key = sample_key(self.number, position, self.digits)
            image = row["image"] if row.get("image_status") == SUCCESS else None
            extension = image_extension(image) if image is not None else None
            if image is None:
                status, error = FAILED_TO_DOWNLOAD, row.get("image_error") or "no image bytes in the images table"
            elif extension is None:
                status, error = FAILED_TO_DECODE, "the image bytes are not jpg, png or webp"
            else:
                status, error = SUCCESS, None
            sample = {
                "url": row["url"],
                "caption": row["caption"],
                "similarity": row["similarity"],
                "language": row["language"],
                "nsfw": row["nsfw"],
                "punsafe": row["punsafe"],
                "uid": row["uid"],
                "key": key,
                "status": status,
                "error_message": error,
                "width": row["width"],
                "height": row["height"],
                "original_width": row["original_width"],
                "original_height": row["original_height"],
                "sha256": row["sha256"],
                "license": row[LICENSE_COLUMN],
            }
            if status == SUCCESS:
                self._add_members(key, extension, image, sample)
                self.status.written += 1
            self.statuses[status] += 1
            samples.append(sample)
        self.parquet.write_table(pa.Table.from_pylist(samples, schema=WEBDATASET_SCHEMA))
        self.status.rows += len(samples)

    def _add_members(self, key: str, extension: str, image: bytes, sample: dict) -> None:
        members = {
            extension: image,
            "json": json.dumps(sample, indent=4).encode(),  # img2dataset's own indent
            "txt": (sample["caption"] or "").encode(),
        }
        for suffix in sorted(members):  # webdataset's TarWriter writes a sample's members in sorted order
            payload = members[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(payload)
            info.mtime = int(self.start_time)
            info.mode = 0o444
            info.uname = info.gname = _TAR_OWNER
            self.tar.addfile(info, io.BytesIO(payload))

    def publish(self) -> GroupStatus:
        self.tar.close()
        self.parquet.close()
        end_time = time.time()
        stats = {
            "count": self.status.rows,
            "successes": self.statuses[SUCCESS],
            "failed_to_download": self.statuses[FAILED_TO_DOWNLOAD],
            "failed_to_resize": 0,  # resizing happened in the download stage: a failure there left no row here
            "duration": end_time - self.start_time,
            "start_time": self.start_time,
            "end_time": end_time,
            "status_dict": dict(self.statuses),
        }
        stats_path = self.spool / "stats.json"
        stats_path.write_text(json.dumps(stats, indent=4))
        shard = f"{self.number:05d}"
        # The tar first, the parquet last: the parquet's presence is what marks the shard complete.
        self.publish_file(f"{shard}.tar", self.tar_path)
        self.publish_file(f"{shard}_stats.json", stats_path)
        self.publish_file(f"{shard}.parquet", self.parquet_path)
        return self.status
