"""Per-stage counters: rows in and out of every step, appended to the ``stage_stats`` table.

The funnel in the report and at the end of ``make demo`` is drawn from this table, so every stage records
its steps here rather than printing its own numbers.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from pyspark.sql import SparkSession

from laion_spark.schemas import STAGE_STATS, STAGE_STATS_SCHEMA
from laion_spark.storage.delta import append, read_table, table_exists

# Steps named "status:<outcome>" break the previous step down by outcome; the funnel prints them as such.
OUTCOME_PREFIX = "status:"


def new_run_id() -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


@dataclass
class StageCounter:
    """Collects (step, rows_in, rows_out) for one stage of one run; ``write`` appends them in one commit."""

    run_id: str
    stage: str
    steps: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, step: str, rows_in: int, rows_out: int) -> None:
        self.steps.append((step, int(rows_in), int(rows_out)))

    def add_outcome(self, outcome: str, rows_in: int, rows: int) -> None:
        """Record how many of ``rows_in`` ended with ``outcome`` (a breakdown, not a funnel step)."""
        self.add(f"{OUTCOME_PREFIX}{outcome}", rows_in, rows)

    def write(self, spark: SparkSession, lake: str) -> None:
        if not self.steps:
            return
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
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
