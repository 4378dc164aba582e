"""Get the active SparkSession, or build a local one with Delta Lake configured."""

from __future__ import annotations

import os

from pyspark.sql import SparkSession

from laion_spark.config import Config, SparkConfig
from laion_spark.jars import cached_delta_jars

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def get_spark(config: Config | SparkConfig | None = None) -> SparkSession:
    """Return the active session untouched (Databricks, notebooks, spark-submit); otherwise build one.

    A session we build gets Delta's SQL extension and catalog, the cached Delta jars, quiet logs and the
    settings from ``spark`` in the config.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    spark_config = config.spark if isinstance(config, Config) else (config or SparkConfig())
    return build_local_session(spark_config)


def build_local_session(spark_config: SparkConfig) -> SparkSession:
    builder = (
        SparkSession.builder.master(spark_config.master)
        .appName(spark_config.app_name)
        .config("spark.sql.extensions", DELTA_EXTENSION)
        .config("spark.sql.catalog.spark_catalog", DELTA_CATALOG)
        .config("spark.sql.shuffle.partitions", str(spark_config.shuffle_partitions))
        .config("spark.ui.showConsoleProgress", "true")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # Delta's retention check stops VACUUM of recent files; local lakes are scratch data.
        .config("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    )
    jars = cached_delta_jars()
    if jars:
        builder = builder.config("spark.jars", ",".join(str(p) for p in jars))
    elif "spark.jars.packages" not in spark_config.conf:
        raise RuntimeError(
            "Delta Lake jars are not cached. Run `make setup` (or `python -m laion_spark.jars fetch`) once "
            "with network access, or pass --set spark.conf.spark.jars.packages=io.delta:delta-spark_2.13:4.0.1 (needs network)."
        )
    # Executors started by a standalone master or local-cluster must find the same Python.
    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON") or _current_python())
    for key, value in spark_config.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(spark_config.log_level)
    return spark


def _current_python() -> str:
    import sys

    return sys.executable
