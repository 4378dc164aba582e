"""Get the active SparkSession, or build a local one with Delta Lake configured."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pyspark.sql import SparkSession

from laion_spark.config import Config, SparkConfig
from laion_spark.jars import cached_delta_jars

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
_LOCAL_MASTER = re.compile(r"local(?:\[(\d+|\*)(?:,\d+)?\])?")


def get_spark(config: Config | SparkConfig | None = None) -> SparkSession:
    """Return the active session untouched (Databricks, notebooks, spark-submit); otherwise connect or build one.

    With ``SPARK_REMOTE=sc://host:port`` in the environment (the standard Spark Connect variable, as Databricks
    Connect uses), a Spark Connect session to that server: the server brings Delta and its own settings. Otherwise
    a local classic session with Delta's SQL extension and catalog, the cached Delta jars, quiet logs and the
    settings from ``spark`` in the config.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    remote = os.environ.get("SPARK_REMOTE")
    if remote:
        return SparkSession.builder.remote(remote).getOrCreate()
    spark_config = config.spark if isinstance(config, Config) else (config or SparkConfig())
    return build_local_session(spark_config)


def is_connect(spark: SparkSession) -> bool:
    """Whether ``spark`` is a Spark Connect session: the driver's files are then not the cluster's files."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def build_local_session(spark_config: SparkConfig) -> SparkSession:
    """A classic session with Delta. Under spark-submit (which starts this driver and sets its master, jars and
    packages) only the settings spark-submit did not make are added: its ``--master`` and ``--packages`` win."""
    submitted = launched_by_spark_submit()
    builder = SparkSession.builder if submitted else SparkSession.builder.master(spark_config.master)
    builder = (
        builder.appName(spark_config.app_name)
        .config("spark.sql.extensions", DELTA_EXTENSION)
        .config("spark.sql.catalog.spark_catalog", DELTA_CATALOG)
        .config("spark.sql.shuffle.partitions", str(spark_config.shuffle_partitions))
        .config("spark.ui.showConsoleProgress", "true")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.log.level", spark_config.log_level)
        # Delta's retention check stops VACUUM of recent files; local lakes are scratch data.
        .config("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    )
    jars = [] if submitted else cached_delta_jars()
    if jars:
        builder = builder.config("spark.jars", ",".join(str(p) for p in jars))
    elif "spark.jars.packages" not in spark_config.conf and not submitted:
        raise RuntimeError(
            "Delta Lake jars are not cached. Run `make setup` (or `python -m laion_spark.jars fetch`) once "
            "with network access, or pass --set spark.conf.spark.jars.packages=io.delta:delta-spark_2.13:4.0.1 (needs network)."
        )
    if not submitted:
        builder = add_object_store_connectors(builder, spark_config, jars)
    # Executors started by a standalone master or local-cluster must find the same Python.
    os.environ.setdefault("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON") or _current_python())
    if not submitted:
        for key, value in local_defaults(spark_config.master).items():
            builder = builder.config(key, value)  # set first, so the same key in spark.conf replaces it
    for key, value in spark_config.conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def local_defaults(master: str) -> dict[str, str]:
    """Settings for a session on one machine (``local``, ``local[N]``, ``local[*]``) that Spark and Delta size
    for clusters; ``spark.conf`` in the config replaces any of them.

    Delta rebuilds a table's snapshot with ``snapshotPartitions`` tasks (50 by default) on every read and commit:
    on a few local cores those tasks are most of a small stage's time. The extract stage on a tiny WAT took 30 to
    50 s with 50 and 19 s with 4 on a loaded 2-core machine (bench/extract.py prints this fixed cost).

    Delta's VACUUM lists a table's files in ``parallelPartitionDiscovery.parallelism`` tasks (10,000 by default):
    VACUUM of one demo table took 20-30 s on 2 cores with that, 2-4 s with 4 tasks.
    """
    match = _LOCAL_MASTER.fullmatch(master.strip())
    if match is None:
        return {}
    cores = match.group(1)
    cores = 1 if cores is None else (os.cpu_count() or 1) if cores == "*" else int(cores)
    return {
        "spark.databricks.delta.snapshotPartitions": str(max(1, min(cores, 4))),
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": str(max(2, min(2 * cores, 16))),
    }


def add_object_store_connectors(
    builder: SparkSession.Builder, spark_config: SparkConfig, jars: list[Path]
) -> SparkSession.Builder:
    """Add the jars and settings of the connectors in ``spark.object_stores`` (s3: hadoop-aws and the AWS SDK)
    to ``builder``, from the jar cache only; ``jars`` (Delta's) stay in ``spark.jars`` beside them.

    A connector that is unknown or not cached is a ConfigError that says what to run; nothing is fetched here.
    """
    if not spark_config.object_stores:
        return builder
    # Imported here, not at the top: storage modules may import session, and session must import first.
    from laion_spark.storage.object_store import connector_jars_and_settings

    connector_jars, settings = connector_jars_and_settings(spark_config.object_stores)
    builder = builder.config("spark.jars", ",".join(str(p) for p in [*jars, *connector_jars]))
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder


def launched_by_spark_submit() -> bool:
    """Whether spark-submit (or a Databricks / EMR launcher built on it) started this Python driver: it then
    hands the driver a JVM gateway through this variable, with the master and the jars already decided."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _current_python() -> str:
    import sys

    return sys.executable
