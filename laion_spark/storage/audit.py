"""The audit trail: the ``rejections`` table (why each removed pair was removed) and the ``runs`` table (what
produced the rows of each run: the effective config of its stage, the model and its checksum).

A stage marks the rows it removes as it counts them (the ``dropped_<reason>`` pattern of laion_spark.storage.stats)
and hands the marked rows here: :func:`record_rejections` appends them, one commit per call, unless
``dataset.rejections`` is off. The dataset's filter chain is re-run whole when dataset is rebuilt, so its
rejections replace the ``dataset`` partition instead (:func:`replace_rejections`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import os
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

import laion_spark
from laion_spark.schemas import REJECTIONS, REJECTIONS_SCHEMA, RUNS, RUNS_SCHEMA
from laion_spark.storage.delta import append, replace_where, sql_in

log = logging.getLogger(__name__)

# The config sections that decide what each stage writes: their hash goes into runs and dataset.config_hashes.
STAGE_CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "extract": ("extract",),
    "candidates": ("candidates",),
    "download": ("download",),
    "score": ("clip", "dedup", "dataset"),
    "dataset": ("clip", "dedup", "dataset"),  # `laion-spark dataset`: a re-cut of dataset without rescoring
}


def rejection_rows(
    rows: DataFrame,
    stage: str,
    run_id: str,
    step: Column | str,
    detail: Column | None = None,
    survivor_uid: Column | None = None,
    eval_set: Column | None = None,
    value: Column | None = None,
    bound: Column | float | None = None,
) -> DataFrame:
    """``rows`` (with a ``uid`` column) as ``rejections`` rows: the step and its reason columns are expressions
    over ``rows``; the ones not given are null."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    given = {
        "uid": F.col("uid"),
        "stage": F.lit(stage),
        "step": F.lit(step) if isinstance(step, str) else step,
        "detail": detail,
        "survivor_uid": survivor_uid,
        "eval_set": eval_set,
        "value": value,
        "bound": F.lit(bound) if isinstance(bound, (int, float)) else bound,
        "run_id": F.lit(run_id),
        "recorded_at": F.lit(now).cast("timestamp"),
    }
    return rows.select(
        [
            (given[f.name] if given[f.name] is not None else F.lit(None)).cast(f.dataType).alias(f.name)
            for f in REJECTIONS_SCHEMA.fields
        ]
    )


def record_rejections(rejections: DataFrame, lake: str, enabled: bool = True) -> None:
    """Append ``rejections`` (:func:`rejection_rows`) to the table: one commit. Nothing when ``enabled`` is off."""
    if enabled:
        append(rejections, lake, REJECTIONS)


def replace_rejections(rejections: DataFrame, lake: str, stage: str, enabled: bool = True) -> None:
    """Replace the ``stage`` partition of the table with ``rejections``: one commit (a rebuilt dataset's chain)."""
    if enabled:
        replace_where(rejections, lake, REJECTIONS, sql_in("stage", [stage]))


def config_of(config: Any, stage: str) -> dict[str, Any]:
    """The sections of ``config`` that decide what ``stage`` writes, as plain data."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in STAGE_CONFIG_SECTIONS.get(stage, ())}


def config_hash(sections: dict[str, Any]) -> str:
    text = json.dumps(sections, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_run(
    spark: SparkSession,
    lake: str,
    run_id: str,
    stage: str,
    config: Any,
    model: str | None = None,
    model_checksum: str | None = None,
) -> str:
    """Append the ``runs`` row of (``run_id``, ``stage``); returns its config hash."""
    sections = config_of(config, stage)
    digest = config_hash(sections)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    row = (run_id, stage, digest, json.dumps(sections, sort_keys=True, default=str), model, model_checksum)
    row += (laion_spark.__version__, now)
    append(spark.createDataFrame([row], RUNS_SCHEMA), lake, RUNS)
    return digest


def file_checksum(path: str) -> str | None:
    """sha256 of a local file (a model checkpoint), or None when ``path`` is not one (a hub name)."""
    if not path or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return _file_checksum(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_checksum(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    log.debug("checksum of %s (%d bytes)", path, size)
    return digest.hexdigest()
