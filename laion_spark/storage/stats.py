"""Per-stage counters: rows in and out of every step, appended to the ``stage_stats`` table.

The funnel in the report and at the end of ``make demo`` is drawn from this table, so every stage records
its steps here rather than printing its own numbers. Counting follows datatrove's ``dropped_<reason>`` pattern:
a stage marks each row with the reason it is dropped (null when it is kept), and :meth:`StageCounter.count_drops`
counts rows in and every reason in one Spark aggregation, recording one funnel step per reason, in order.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.schemas import STAGE_STATS, STAGE_STATS_SCHEMA
from laion_spark.storage.delta import append, read_table, table_exists

# Steps named "status:<outcome>" break the previous step down by outcome; the funnel prints them as such.
OUTCOME_PREFIX = "status:"
DROPPED_PREFIX = "dropped_"


@dataclass(frozen=True)
class DropCounts:
    """What one aggregation found: rows in, rows dropped per reason (in the order asked), and any extra sums."""

    rows_in: int
    dropped: list[tuple[str, int]]
    extra: dict[str, int]

    @property
    def rows_out(self) -> int:
        return self.rows_in - sum(n for _, n in self.dropped)


def count_drops(df: DataFrame, reason: str | Column, reasons: Sequence[str], **extra: Column) -> DropCounts:
    """Rows in and ``dropped_<reason>`` for every reason in ``reasons``, plus ``extra`` aggregates, in one job.

    ``reason`` is a column naming why a row is dropped, or null for a row that is kept. A reason not listed in
    ``reasons`` is an error: every drop must be accounted for.
    """
    reason_column = F.col(reason) if isinstance(reason, str) else reason
    aggregates = [F.count(F.lit(1)).alias("rows_in")]
    aggregates.append(F.count(reason_column).alias("dropped_any"))
    aggregates += [F.count(F.when(reason_column == name, True)).alias(DROPPED_PREFIX + name) for name in reasons]
    aggregates += [column.alias(name) for name, column in extra.items()]
    row = df.agg(*aggregates).first()  # one row of counts
    dropped = [(name, int(row[DROPPED_PREFIX + name])) for name in reasons]
    unaccounted = int(row["dropped_any"]) - sum(n for _, n in dropped)
    if unaccounted:
        raise ValueError(f"{unaccounted} row(s) dropped for a reason not among {', '.join(reasons)}")
    return DropCounts(int(row["rows_in"]), dropped, {name: int(row[name] or 0) for name in extra})


def new_run_id() -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


@dataclass
class StageCounter:
    """Collects (step, rows_in, rows_out) for one stage of one run; ``write`` appends them in one commit."""

    run_id: str
    stage: str
    steps: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, step: str, rows_in: int, rows_out: int) -> None:
        self.steps.append((step, int(rows_in), int(rows_out)))

    def add_drops(self, rows_in: int, dropped: Iterable[tuple[str, int]]) -> int:
        """One step per (reason, rows dropped), in order, each taking the previous step's output; returns rows out."""
        rows = int(rows_in)
        for step, count in dropped:
            self.add(step, rows, rows - count)
            rows -= count
        return rows

    def count_drops(self, df: DataFrame, reason: str | Column, reasons: Sequence[str], **extra: Column) -> DropCounts:
        """:func:`count_drops` over ``df``, recorded as one funnel step per reason."""
        counts = count_drops(df, reason, reasons, **extra)
        self.add_drops(counts.rows_in, counts.dropped)
        return counts

    def add_outcome(self, outcome: str, rows_in: int, rows: int) -> None:
        """Record how many of ``rows_in`` ended with ``outcome`` (a breakdown, not a funnel step)."""
        self.add(f"{OUTCOME_PREFIX}{outcome}", rows_in, rows)

    def write(self, spark: SparkSession, lake: str) -> None:
        if not self.steps:
            return
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        rows = [
            (self.run_id, self.stage, seq, step, rows_in, rows_out, now)
            for seq, (step, rows_in, rows_out) in enumerate(self.steps)
        ]
        append(spark.createDataFrame(rows, STAGE_STATS_SCHEMA), lake, STAGE_STATS)

    def summary(self) -> str:
        width = max((len(step) for step, _, _ in self.steps), default=4)
        lines = [f"{self.stage}:"]
        for step, rows_in, rows_out in self.steps:
            dropped = rows_in - rows_out
            lines.append(f"  {step:<{width}}  in {rows_in:>10,}  out {rows_out:>10,}  dropped {dropped:>10,}")
        return "\n".join(lines)


def record_step(
    spark: SparkSession, lake: str, run_id: str, stage: str, step: str, rows_in: int, rows_out: int
) -> None:
    counter = StageCounter(run_id, stage)
    counter.add(step, rows_in, rows_out)
    counter.write(spark, lake)


def read_funnel(spark: SparkSession, lake: str, run_id: str | None = None) -> list[tuple[str, str, int, int]]:
    """(stage, step, rows_in, rows_out) in recording order, for one run or, by default, the latest of each stage."""
    if not table_exists(spark, lake, STAGE_STATS):
        return []
    stats = read_table(spark, lake, STAGE_STATS)
    if run_id is not None:
        stats = stats.where(stats.run_id == run_id)
    else:
        latest = stats.groupBy("stage").agg({"recorded_at": "max"}).withColumnRenamed("max(recorded_at)", "latest")
        stats = stats.join(latest, "stage").where("recorded_at = latest").drop("latest")
    # Stats rows are a handful per run: collecting them is not collecting data.
    rows = stats.orderBy("recorded_at", "seq").select("stage", "step", "rows_in", "rows_out").collect()
    return [(r.stage, r.step, r.rows_in, r.rows_out) for r in rows]
