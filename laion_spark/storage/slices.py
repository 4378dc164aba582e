"""Cutting a stage's work into slices, each committed on its own (README "Slices and resume").

A stage first finds the rows it still has to do over narrow key columns, and stages them once in the lake (a
Delta staging table, range-partitioned on the slice keys so that Delta's file statistics let each slice read
only its own files). :func:`plan_slices` then packs them into slices of a bounded number of rows, from a count per
group (``images.fetch_batch`` for ``score``; one group for ``download``) that is as small as the number of
groups. A group larger than a slice is split by a hash of the row key into bucket ranges.

Finding the work again on every run (an anti-join of keys) is what makes a rerun resume: every committed slice
has left its rows in the output table, so they are not to do any more.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from laion_spark.storage.delta import staged

BUCKET = "slice_bucket"
BUCKETS = 1 << 16
# Rows per file of a staging table: few enough files that writing them is cheap, small enough that a slice reads
# one or two of them.
_ROWS_PER_STAGED_FILE = 500_000


@dataclass(frozen=True)
class SlicePart:
    group: str | None  # the value of the group column, or None where the rows are not grouped
    low: int  # bucket range [low, high)
    high: int

    def condition(self, group_column: str | None) -> Column:
        in_range = (F.col(BUCKET) >= self.low) & (F.col(BUCKET) < self.high)
        if self.low == 0 and self.high == BUCKETS:
            in_range = F.lit(True)
        if group_column is None or self.group is None:
            return in_range
        return (F.col(group_column) == F.lit(self.group)) & in_range


@dataclass(frozen=True)
class Slice:
    number: int  # 1-based
    parts: tuple[SlicePart, ...]
    rows: int

    def condition(self, group_column: str | None = None) -> Column:
        whole_groups = [p.group for p in self.parts if p.low == 0 and p.high == BUCKETS and p.group is not None]
        split = [p for p in self.parts if p.group is None or not (p.low == 0 and p.high == BUCKETS)]
        terms = [p.condition(group_column) for p in split]
        if whole_groups and group_column is not None:
            terms.append(F.col(group_column).isin(*whole_groups))
        condition = terms[0]
        for term in terms[1:]:
            condition = condition | term
        return condition

    @property
    def groups(self) -> list[str]:
        return sorted({p.group for p in self.parts if p.group is not None})


def with_bucket(df: DataFrame, key: str) -> DataFrame:
    """Add the hash bucket of ``key`` that slices split a large group by."""
    return df.withColumn(BUCKET, F.pmod(F.xxhash64(F.col(key)), F.lit(BUCKETS)).cast("int"))


def plan_slices(group_rows: Sequence[tuple[str | None, int]], rows_per_slice: int) -> list[Slice]:
    """Pack (group, rows) into slices of at most about ``rows_per_slice`` rows, in group order.

    Small groups share a slice; a group larger than a slice is split into equal bucket ranges, one slice each.
    """
    if rows_per_slice < 1:
        raise ValueError(f"rows per slice must be at least 1, got {rows_per_slice}")
    slices: list[Slice] = []
    parts: list[SlicePart] = []
    rows = 0

    def close() -> None:
        nonlocal parts, rows
        if parts:
            slices.append(Slice(len(slices) + 1, tuple(parts), rows))
            parts, rows = [], 0

    for group, count in sorted(group_rows, key=lambda item: (item[0] is None, item[0] or "")):
        if count <= 0:
            continue
        if count > rows_per_slice:
            close()
            pieces = math.ceil(count / rows_per_slice)
            for i in range(pieces):
                low, high = i * BUCKETS // pieces, (i + 1) * BUCKETS // pieces
                slices.append(Slice(len(slices) + 1, (SlicePart(group, low, high),), math.ceil(count / pieces)))
            continue
        if rows + count > rows_per_slice:
            close()
        parts.append(SlicePart(group, 0, BUCKETS))
        rows += count
    close()
    return slices


@contextlib.contextmanager
def staged_work(df: DataFrame, lake: str, name: str, order: Sequence[str], rows: int) -> Iterator[DataFrame]:
    """:func:`storage.staged` for a stage's to-do rows, range-partitioned and sorted on ``order`` so that the
    staging table's files each hold a run of slices (their statistics then skip the others)."""
    files = max(1, math.ceil(rows / _ROWS_PER_STAGED_FILE))
    ordered = df.repartitionByRange(files, *order).sortWithinPartitions(*order)
    with staged(ordered, lake, name) as table:
        yield table
