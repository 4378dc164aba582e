"""What a Spark task runs: the rows of its file groups, sorted by (group, position), streamed into one
:class:`GroupWriter` per group, which spools its files on the worker's local disk and publishes them into OUT
when the group ends, the completing file last.

A task holds one Arrow batch at a time, never a whole group: tars, npy bodies and parquet row groups grow on
local disk, and only the npy header waits for the end of the group (it states the row count). Each task returns
one small status row per group it wrote.
"""

from __future__ import annotations

import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from laion_spark.storage.outputs import OutputDir

# The status row of one written group (a DDL string for mapInArrow, the same columns in Arrow).
STATUS_DDL = "group long, rows long, written long, bytes long, dimension int"
STATUS_SCHEMA = pa.schema(
    [
        ("group", pa.int64()),
        ("rows", pa.int64()),  # rows in the group's files
        ("written", pa.int64()),  # rows with their payload (webdataset: an image in the tar)
        ("bytes", pa.int64()),  # bytes published
        ("dimension", pa.int32()),  # embeddings: the vectors' dimension
    ]
)


@dataclass
class GroupStatus:
    group: int
    rows: int = 0
    written: int = 0
    bytes: int = 0
    dimension: int = 0


class GroupWriter(ABC):
    """Writes one file group: ``add`` each batch of its rows in position order, then ``publish``."""

    def __init__(self, out: OutputDir, number: int, spool: Path) -> None:
        self.out = out
        self.number = number
        self.spool = spool
        self.status = GroupStatus(number)

    @abstractmethod
    def add(self, batch: pa.RecordBatch) -> None: ...

    @abstractmethod
    def publish(self) -> GroupStatus:
        """Close the spooled files and publish them, the completing file last."""

    def publish_file(self, name: str, local: Path, header: bytes = b"") -> None:
        """Copy a spooled file (after ``header``) into OUT under ``name``, atomically."""

        def copy(stream) -> None:
            stream.write(header)
            with open(local, "rb") as source:
                shutil.copyfileobj(source, stream, 1 << 20)

        self.out.publish(name, copy)
        self.status.bytes += len(header) + local.stat().st_size


def write_groups(
    batches: Iterator[pa.RecordBatch], open_group: Callable[[int, Path], GroupWriter]
) -> Iterator[pa.RecordBatch]:
    """The body of the mapInArrow that writes the groups of one partition (rows sorted by group, position)."""
    written: set[int] = set()
    current: GroupWriter | None = None
    with tempfile.TemporaryDirectory(prefix="laion-spark-export-") as spool_root:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            groups = batch.column("group").to_pylist()
            start = 0
            for end in range(1, len(groups) + 1):
                if end < len(groups) and groups[end] == groups[start]:
                    continue
                number = int(groups[start])
                if current is None or current.number != number:
                    if current is not None:
                        yield _finish(current)
                    if number in written:  # the partitioning guarantees it never happens; never write a group twice
                        raise RuntimeError(f"export group {number} arrived in two runs of one partition")
                    written.add(number)
                    spool = Path(spool_root) / str(number)
                    spool.mkdir()
                    current = open_group(number, spool)
                current.add(batch.slice(start, end - start))
                start = end
        if current is not None:
            yield _finish(current)


def _finish(writer: GroupWriter) -> pa.RecordBatch:
    status = writer.publish()
    shutil.rmtree(writer.spool, ignore_errors=True)  # a task may write several groups: free the disk as it goes
    return pa.RecordBatch.from_pylist([asdict(status)], schema=STATUS_SCHEMA)
