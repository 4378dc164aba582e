"""The lake: Delta tables under one directory, and the run's counters."""

from laion_spark.storage.delta import (
    append,
    ensure_table,
    merge_insert_new,
    overwrite,
    read_table,
    replace_where,
    table_exists,
    table_path,
    upsert,
)
from laion_spark.storage.stats import StageCounter, new_run_id, read_funnel, record_step

__all__ = [
    "StageCounter",
    "append",
    "ensure_table",
    "merge_insert_new",
    "new_run_id",
    "overwrite",
    "read_funnel",
    "read_table",
    "record_step",
    "replace_where",
    "table_exists",
    "table_path",
    "upsert",
]
