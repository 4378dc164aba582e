"""What an export directory holds, per format, and the small state file that makes it self-describing.

Every format writes numbered *file groups*; one Spark task writes one group, and publishes its files one by one
(each atomically), the *completing* file last:

=============  ===============================================================  ==================
format         files of group n (completing file last)                          rows keyed by
=============  ===============================================================  ==================
laion          ``part-{n:05d}.parquet``                                         ``SAMPLE_ID``
laion5b        ``part-{n:05d}.parquet``                                         ``hash``
webdataset     ``{n:05d}.tar``, ``{n:05d}_stats.json``, ``{n:05d}.parquet``     ``uid``
embeddings     ``img_emb/img_emb_{n}.npy``, ``text_emb/text_emb_{n}.npy``,      ``uid``
               ``metadata/metadata_{n}.parquet``
=============  ===============================================================  ==================

A group is complete when its completing file exists; the rows an export holds are the keys of its completing
files, so the directory needs no lake table to say what it has exported. Files of an incomplete group (a task
killed between two publishes) are orphans: the next run deletes them and writes the group again.

``img_emb_{n}`` is not zero-padded, as in LAION's released embeddings: clip-retrieval and autofaiss sort file
names as strings, and ``img_emb_*`` and ``metadata_*`` sort alike, so row i of the concatenated metadata still
describes vector i.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from laion_spark.config import ConfigError
from laion_spark.storage.outputs import OutputDir

STATE_FILE = "_laion_spark_export.json"
STATE_VERSION = 1
# How SAMPLE_ID / hash are derived, recorded in every state file (laion_spark.storage.ids).
IDS_DERIVATION = (
    "SAMPLE_ID (laion) and hash (laion5b) are the pair's uid, the SHA-1 hex digest of its normalised URL and alt "
    "text, read as its first 63 bits: a non-negative int64, the same for the same pair in every run and lake"
)


@dataclass(frozen=True)
class FileKind:
    directory: str  # "" for OUT itself
    pattern: str  # regex of the file name, group 1 the group number
    template: str  # str.format template of the file name, {n} the group number

    def name(self, number: int) -> str:
        return self.template.format(n=number)

    def path(self, number: int) -> str:
        return f"{self.directory}/{self.name(number)}" if self.directory else self.name(number)

    def number_of(self, name: str) -> int | None:
        match = re.fullmatch(self.pattern, name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ExportLayout:
    format: str
    kinds: tuple[FileKind, ...]  # the files of a group, the completing file last
    key_column: str  # the column of the completing file that holds each row's key
    key_is_uid: bool  # else the key is the pair's sample id (int64)
    group_setting: str  # the export.* setting that sizes a group

    @property
    def completing(self) -> FileKind:
        return self.kinds[-1]

    @property
    def directories(self) -> list[str]:
        return sorted({kind.directory for kind in self.kinds})

    def group_files(self, number: int) -> list[str]:
        return [kind.path(number) for kind in self.kinds]

    def scan(self, out: OutputDir) -> ExportFiles:
        """The groups OUT holds: complete ones, and the files of incomplete ones (orphans)."""
        found: dict[FileKind, set[int]] = {}
        for directory in self.directories:
            names = out.list(directory) if directory else out.list()
            for kind in (k for k in self.kinds if k.directory == directory):
                found[kind] = {n for n in map(kind.number_of, names) if n is not None}
        complete = found[self.completing]
        orphans = sorted(kind.path(n) for kind in self.kinds[:-1] for n in found.get(kind, set()) if n not in complete)
        return ExportFiles(complete=sorted(complete), orphans=orphans)


@dataclass
class ExportFiles:
    complete: list[int]
    orphans: list[str]

    @property
    def empty(self) -> bool:
        return not self.complete and not self.orphans

    @property
    def gaps(self) -> list[int]:
        """Numbers free below the highest complete group (a group whose completing file never appeared): new
        groups take them first, so that numbering stays dense."""
        taken = set(self.complete)
        return [n for n in range(max(self.complete, default=-1)) if n not in taken]

    @property
    def next_number(self) -> int:
        return max(self.complete, default=-1) + 1

    def new_numbers(self, count: int) -> list[int]:
        gaps = self.gaps[:count]
        return gaps + list(range(self.next_number, self.next_number + count - len(gaps)))


_PARQUET_PART = FileKind("", r"part-(\d{5,})\.parquet", "part-{n:05d}.parquet")

LAYOUTS: dict[str, ExportLayout] = {
    "laion": ExportLayout("laion", (_PARQUET_PART,), "SAMPLE_ID", False, "rows_per_file"),
    "laion5b": ExportLayout("laion5b", (_PARQUET_PART,), "hash", False, "rows_per_file"),
    "webdataset": ExportLayout(
        "webdataset",
        (
            FileKind("", r"(\d{5,})\.tar", "{n:05d}.tar"),
            FileKind("", r"(\d{5,})_stats\.json", "{n:05d}_stats.json"),
            FileKind("", r"(\d{5,})\.parquet", "{n:05d}.parquet"),
        ),
        "uid",
        True,
        "samples_per_shard",
    ),
    "embeddings": ExportLayout(
        "embeddings",
        (
            FileKind("img_emb", r"img_emb_(\d+)\.npy", "img_emb_{n}.npy"),
            FileKind("text_emb", r"text_emb_(\d+)\.npy", "text_emb_{n}.npy"),
            FileKind("metadata", r"metadata_(\d+)\.parquet", "metadata_{n}.parquet"),
        ),
        "uid",
        True,
        "embeddings_per_file",
    ),
}


@dataclass
class ExportState:
    """``_laion_spark_export.json``: what OUT holds and how it was written, so that a later run continues it."""

    format: str
    lake: str
    rows_per_group: int  # export.samples_per_shard / rows_per_file / embeddings_per_file when OUT was started
    dataset_version: int | None = None  # the dataset version the last run exported
    options: dict[str, Any] = field(default_factory=dict)  # format-specific: key digits, embedding dtype, columns
    rows: int = 0  # rows OUT holds after the last run
    groups: int = 0  # complete file groups after the last run
    ids: str = IDS_DERIVATION
    version: int = STATE_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def read(cls, out: OutputDir) -> ExportState | None:
        if not out.exists(STATE_FILE):
            return None
        try:
            data = json.loads(out.read_bytes(STATE_FILE))
            return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{out.uri_of(STATE_FILE)} is not a laion_spark export state file: {exc}") from exc

    def write(self, out: OutputDir) -> None:
        out.publish_bytes(STATE_FILE, self.to_json())
