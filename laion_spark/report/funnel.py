"""The funnel: rows in and out of every step of every stage, drawn from ``stage_stats``.

Each stage records its own steps (see ``storage.StageCounter``); this module only reads and formats them, so
the funnel printed by ``make demo`` and ``laion-spark funnel`` is the same numbers the tables hold.
"""

from __future__ import annotations

from pyspark.sql import SparkSession

from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, PAIRS
from laion_spark.storage import read_funnel, read_table, table_exists
from laion_spark.storage.stats import OUTCOME_PREFIX

STAGE_ORDER = ["extract", "candidates", "download", "score"]
TABLES_IN_FLOW = [PAIRS, CANDIDATES, IMAGES, EMBEDDINGS, DATASET]


def funnel_rows(spark: SparkSession, lake: str, run_id: str | None = None) -> list[tuple[str, str, int, int]]:
    """(stage, step, rows_in, rows_out), stages in pipeline order; the latest run of each stage by default."""
    rows = read_funnel(spark, lake, run_id)
    order = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    return sorted(rows, key=lambda row: order.get(row[0], len(order)))  # stable: keeps step order in a stage


def format_funnel(spark: SparkSession, lake: str, run_id: str | None = None) -> str:
    rows = funnel_rows(spark, lake, run_id)
    if not rows:
        return f"no stage statistics in {lake} yet: run `laion-spark extract` first"
    width = max(len(f"{stage}.{step}") for stage, step, _, _ in rows)
    lines = [f"{'stage.step':<{width}}  {'rows in':>12}  {'rows out':>12}  {'kept':>7}"]
    for stage, step, rows_in, rows_out in rows:
        if step.startswith(OUTCOME_PREFIX):  # a breakdown of the step above, e.g. download.status:too_small
            label = f"  {step}"
            lines.append(f"{label:<{width}}  {'':>12}  {rows_out:>12,}  {'':>7}")
            continue
        kept = f"{100.0 * rows_out / rows_in:6.1f}%" if rows_in else "     - "
        lines.append(f"{stage + '.' + step:<{width}}  {rows_in:>12,}  {rows_out:>12,}  {kept:>7}")
    totals = [
        f"{name}={read_table(spark, lake, name).count():,}"
        for name in TABLES_IN_FLOW
        if table_exists(spark, lake, name)
    ]
    lines.append("tables: " + ", ".join(totals))
    return "\n".join(lines)
