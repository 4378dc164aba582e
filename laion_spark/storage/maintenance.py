"""Upkeep of the lake's Delta tables (``laion-spark optimize``): compact small files, cluster them, delete old ones.

Every stage commits small files: one append per extract, one MERGE per candidates run, and the staging tables are
written and emptied by every extract and download. Reads then open thousands of tiny files. ``OPTIMIZE`` rewrites
them into few large ones (``ZORDER BY`` the columns that later stages filter or join on, so that Delta's per-file
min/max statistics skip files), and ``VACUUM`` deletes the files that no version younger than the retention needs
any more: the ones OPTIMIZE replaced, the rows rewritten by MERGE and UPDATE, and everything the staging tables
held. Only SQL is used (``OPTIMIZE``, ``VACUUM``, ``DESCRIBE DETAIL``, ``DESCRIBE HISTORY``), so it also runs on
Spark Connect.

It runs under the lake's run lock: an OPTIMIZE that commits while a run writes the same table fails one of the two
on Delta's conflict check, and a VACUUM with a short retention could delete the files of a write not yet committed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyspark.errors import AnalysisException
from pyspark.sql import SparkSession

from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, INGEST_LOG, PAIRS, RUN_LOCK, SCHEMAS
from laion_spark.storage.delta import (
    STAGING_PREFIX,
    is_catalog_lake,
    latest_version,
    set_table_properties,
    table_exists,
    table_ref,
)
from laion_spark.storage.files import cleanup_afterwards, glob_files

log = logging.getLogger(__name__)

# ZORDER BY, per table: the column that the stages after it select or join on, so that OPTIMIZE puts rows with
# near values in the same files and Delta's file statistics let those reads skip the rest.
# - pairs, ingest_log: extract replaces a file's rows with `replaceWhere ingest_batch IN (...) AND source_file IN
#   (...)` (pairs is partitioned by ingest_batch: the ZORDER sorts inside each partition), and reads the log by
#   source_file to skip the files already ok.
# - candidates: the candidates stage MERGEs on dedup_key (the table's unique key).
# - images, embeddings, dataset: keyed by uid; download and score join and MERGE them on it.
# stage_stats is a few rows per run and the tables whose names start with "_" (staging, run lock, bookmarks) are
# scratch or bookkeeping: they are only compacted.
ZORDER_BY: dict[str, tuple[str, ...]] = {
    PAIRS: ("source_file",),
    INGEST_LOG: ("source_file",),
    CANDIDATES: ("dedup_key",),
    IMAGES: ("uid",),
    EMBEDDINGS: ("uid",),
    DATASET: ("uid",),
}

# Delta's default delta.deletedFileRetentionDuration (7 days): VACUUM keeps every file that a version of the last
# week reads, so time travel over that week keeps working, and Delta refuses a shorter retention unless the
# session sets spark.databricks.delta.retentionDurationCheck.enabled=false.
DELTA_RETENTION_HOURS = 168.0
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"

# Optimised writes (fewer, larger files per write) and auto compaction (a small OPTIMIZE after a write that left
# many small files). Databricks reads both table properties; open-source Delta reads them from 3.1 on.
AUTO_OPTIMIZE = {"delta.autoOptimize.optimizeWrite": "true", "delta.autoOptimize.autoCompact": "true"}

# Commits that change no data file: a ZORDER is still in force after them.
_NO_DATA_CHANGE = ("VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES")
_HISTORY_LOOKBACK = 50


class MaintenanceError(ValueError):
    """A request the user can correct: an unknown table, a retention Delta would refuse. Nothing was changed."""


@dataclass(frozen=True)
class TableMaintenance:
    """What :func:`optimize_lake` did to one table: its files and bytes before and after, what OPTIMIZE rewrote
    and what VACUUM deleted (None where Delta did not log the count: VACUUM logging is off on S3 by default)."""

    table: str
    files_before: int
    bytes_before: int
    files_after: int
    bytes_after: int
    zorder_by: tuple[str, ...] = ()
    files_rewritten: int = 0  # OPTIMIZE's numFilesRemoved
    files_written: int = 0  # OPTIMIZE's numFilesAdded
    skipped: str | None = None  # why OPTIMIZE did not run
    auto_optimize_set: bool = False
    vacuum_retain_hours: float | None = None  # None: not vacuumed
    files_vacuumed: int | None = None
    bytes_vacuumed: int | None = None

    def line(self) -> str:
        """``pairs: 20 -> 1 files, 15.3 KB -> 1.2 KB; OPTIMIZE ZORDER BY (source_file) rewrote 20 files into 1``"""
        parts = [
            f"{self.table}: {self.files_before} -> {self.files_after} files, "
            f"{format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)}"
        ]
        optimize = "OPTIMIZE" + (f" ZORDER BY ({', '.join(self.zorder_by)})" if self.zorder_by else "")
        if self.skipped:
            parts.append(f"{optimize} skipped: {self.skipped}")
        elif self.files_rewritten:
            parts.append(f"{optimize} rewrote {self.files_rewritten} files into {self.files_written}")
        else:
            parts.append(f"{optimize}: nothing to compact")
        if self.auto_optimize_set:
            parts.append("auto-optimize properties set")
        if self.vacuum_retain_hours is not None:
            vacuum = f"VACUUM RETAIN {self.vacuum_retain_hours:g} HOURS"
            if self.files_vacuumed is None:
                parts.append(f"{vacuum} done (Delta logged no count)")
            else:
                size = f" ({format_bytes(self.bytes_vacuumed)})" if self.bytes_vacuumed else ""
                parts.append(f"{vacuum} deleted {self.files_vacuumed} files{size}")
        return "; ".join(parts)


@dataclass(frozen=True)
class _Detail:
    files: int
    bytes: int
    columns: tuple[str, ...]  # partition and clustering columns
    clustered: bool


def optimize_lake(
    spark: SparkSession,
    lake: str,
    tables: Sequence[str] | None = None,
    vacuum: bool = False,
    retain_hours: float | None = None,
    set_auto_optimize: bool = False,
    break_lock: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[TableMaintenance]:
    """OPTIMIZE ``tables`` of the lake (default: every table in it, staging tables and the run lock included),
    with the ZORDER of :data:`ZORDER_BY`; with ``vacuum``, VACUUM them keeping ``retain_hours`` (default 168,
    Delta's own) of history; with ``set_auto_optimize``, give the data tables the :data:`AUTO_OPTIMIZE` properties.

    Idempotent: a table nothing was written to since its last OPTIMIZE is not rewritten again. ``progress`` gets
    each table's report line as it is done. Holds the lake's run lock meanwhile: raises ``LakeLocked`` (from
    ``laion_spark.run``), touching no table, when a run holds the lake; ``break_lock`` takes it anyway. Raises
    :class:`MaintenanceError` for an unknown table or a retention shorter than Delta's check allows.
    """
    # Imported here: laion_spark.run imports the stages, which import this package.
    from laion_spark.run.lock import RunLock
    from laion_spark.storage.stats import new_run_id

    lake = str(lake)
    hours = DELTA_RETENTION_HOURS if retain_hours is None else float(retain_hours)
    if vacuum:
        check_retention(spark, hours)
    present = lake_tables(spark, lake)
    selected = _select(lake, present, tables)
    lock = RunLock(spark, lake, f"optimize-{new_run_id()}")
    lock.acquire(break_lock=break_lock)
    reports: list[TableMaintenance] = []

    def maintain(name: str) -> None:
        report = maintain_table(spark, lake, name, vacuum, hours, set_auto_optimize and name in SCHEMAS)
        reports.append(report)
        if progress is not None:
            progress(report.line())

    with cleanup_afterwards(lock.release, f"the run lock of {lake}"):
        with lock.kept_alive():
            for name in selected:
                if name != RUN_LOCK:
                    maintain(name)
                    lock.heartbeat()  # raises LockLost when a run took the lake over meanwhile
        # Last, once the heartbeat thread has stopped: nothing else writes the lock table while this holds it (another
        # run reads it and gives up, unless told to --break-lock), so even a VACUUM RETAIN 0 HOURS catches no write.
        if RUN_LOCK in selected:
            maintain(RUN_LOCK)
    return reports


def maintain_table(
    spark: SparkSession, lake: str, name: str, vacuum: bool, retain_hours: float, set_auto_optimize: bool = False
) -> TableMaintenance:
    """OPTIMIZE one table (and VACUUM it, and set its auto-optimize properties, on request); no lock taken."""
    ref = table_ref(lake, name)
    before = _describe(spark, ref)
    zorder = _zorder_columns(spark, ref, name, before)
    skipped = _already_zordered(spark, ref, zorder) if zorder else None
    rewritten = written = 0
    if not skipped:
        statement = f"OPTIMIZE {ref}" + (f" ZORDER BY ({', '.join(f'`{c}`' for c in zorder)})" if zorder else "")
        metrics = spark.sql(statement).first()["metrics"]
        rewritten, written = int(metrics["numFilesRemoved"] or 0), int(metrics["numFilesAdded"] or 0)
    auto_optimize_set = set_auto_optimize and set_table_properties(spark, lake, name, AUTO_OPTIMIZE)
    after = _describe(spark, ref) if rewritten or written else before
    vacuumed_files = vacuumed_bytes = None
    if vacuum:
        vacuumed_files, vacuumed_bytes = _vacuum(spark, lake, name, retain_hours)
    return TableMaintenance(
        table=name,
        files_before=before.files,
        bytes_before=before.bytes,
        files_after=after.files,
        bytes_after=after.bytes,
        zorder_by=zorder,
        files_rewritten=rewritten,
        files_written=written,
        skipped=skipped,
        auto_optimize_set=auto_optimize_set,
        vacuum_retain_hours=retain_hours if vacuum else None,
        files_vacuumed=vacuumed_files,
        bytes_vacuumed=vacuumed_bytes,
    )


def check_retention(spark: SparkSession, retain_hours: float) -> None:
    """Refuse, before any table is touched, a retention that Delta's retention check would refuse table by table.

    The check is the session's to switch off, never ours: ``laion_spark``'s own local sessions switch it off
    (local lakes are scratch data), a cluster's session keeps Delta's default (on)."""
    if retain_hours < 0:
        raise MaintenanceError(f"--retain-hours {retain_hours:g}: give 0 or more hours")
    if retain_hours >= DELTA_RETENTION_HOURS:
        return
    if str(spark.conf.get(RETENTION_CHECK, "true")).strip().lower() == "false":
        return
    raise MaintenanceError(
        f"--retain-hours {retain_hours:g} is under Delta's retention check ({DELTA_RETENTION_HOURS:g} hours): VACUUM "
        "would delete files that time travel within that window, or a job writing the lake now, still needs; give "
        f"--retain-hours {DELTA_RETENTION_HOURS:g} or more, or, when no job writes the lake, set {RETENTION_CHECK}"
        "=false in the Spark session (laion-spark's local sessions have it so)"
    )


def lake_tables(spark: SparkSession, lake: str) -> list[str]:
    """The Delta tables of the lake, in the order the pipeline writes them: the tables of ``SCHEMAS``, then the
    bookkeeping tables whose names start with ``_`` (staging tables, bookmarks), the run lock last."""
    data = [name for name in SCHEMAS if table_exists(spark, lake, name)]
    internal = sorted(_underscore_tables(spark, lake) - {RUN_LOCK})
    lock = [RUN_LOCK] if table_exists(spark, lake, RUN_LOCK) else []
    return data + internal + lock


def _underscore_tables(spark: SparkSession, lake: str) -> set[str]:
    if is_catalog_lake(lake):
        catalog, schema = lake.split(".")
        try:
            rows = spark.sql(f"SHOW TABLES IN `{catalog}`.`{schema}`").collect()
        except AnalysisException:
            return set()  # no such schema: no table
        return {row["tableName"] for row in rows if row["tableName"].startswith("_")}
    # A directory lake has one table per directory; a Delta table is a directory with a _delta_log. The listing
    # names the log files of the bookkeeping tables only (a few thousand small names at most).
    logs = glob_files(spark, f"{lake.rstrip('/')}/_*/_delta_log/*.json")
    return {path.rstrip("/").split("/")[-3] for path in logs}


def _select(lake: str, present: list[str], tables: Sequence[str] | None) -> list[str]:
    if not present:
        raise FileNotFoundError(f"no Delta table in the lake {lake}: nothing to optimize")
    if tables is None:
        return present
    unknown = [name for name in tables if name not in present]
    if unknown:
        raise MaintenanceError(f"no table {', '.join(unknown)} in the lake {lake}; its tables are {', '.join(present)}")
    return [name for name in present if name in set(tables)]


def _describe(spark: SparkSession, ref: str) -> _Detail:
    row = spark.sql(f"DESCRIBE DETAIL {ref}").first().asDict()
    partitions = tuple(row.get("partitionColumns") or ())
    clustering = tuple(row.get("clusteringColumns") or ())  # Delta 3.1+: liquid clustering
    return _Detail(
        files=int(row.get("numFiles") or 0),
        bytes=int(row.get("sizeInBytes") or 0),
        columns=partitions + clustering,
        clustered=bool(clustering),
    )


def _zorder_columns(spark: SparkSession, ref: str, name: str, detail: _Detail) -> tuple[str, ...]:
    """The table's ZORDER BY columns that it has and that Delta accepts: a table with liquid clustering is
    clustered by a plain OPTIMIZE (ZORDER is refused there), and a partition column cannot be Z-ordered."""
    if detail.clustered or name.startswith(STAGING_PREFIX):
        return ()
    wanted = ZORDER_BY.get(name, ())
    if not wanted:
        return ()
    columns = set(spark.sql(f"SELECT * FROM {ref} LIMIT 0").columns)
    return tuple(c for c in wanted if c in columns and c not in detail.columns)


def _already_zordered(spark: SparkSession, ref: str, zorder: tuple[str, ...]) -> str | None:
    """Why a ZORDER would change nothing, or None. Open-source Delta's ZORDER rewrites every file of the table
    each time, even when nothing changed: so it is skipped when the last commit that changed data files was an
    OPTIMIZE with the same columns."""
    history = spark.sql(f"DESCRIBE HISTORY {ref} LIMIT {_HISTORY_LOOKBACK}").select("operation", "operationParameters")
    for row in history.collect():
        if row["operation"] in _NO_DATA_CHANGE:
            continue
        if row["operation"] != "OPTIMIZE":
            return None
        try:
            last = json.loads((row["operationParameters"] or {}).get("zOrderBy") or "[]")
        except ValueError:
            return None
        if [str(c) for c in last] == list(zorder):
            return "nothing written since the last one"
        return None
    return None


def _vacuum(spark: SparkSession, lake: str, name: str, retain_hours: float) -> tuple[int | None, int | None]:
    """VACUUM the table; the files and bytes it deleted, from the VACUUM START / END commits Delta logs (on by
    default on Databricks and on file systems with atomic rename; ``spark.databricks.delta.vacuum.logging.enabled``
    elsewhere), else (None, None)."""
    ref = table_ref(lake, name)
    before = latest_version(spark, lake, name)
    try:
        spark.sql(f"VACUUM {ref} RETAIN {retain_hours:g} HOURS").collect()
    except Exception as exc:
        if "low retention period" not in str(exc):
            raise
        # A table whose delta.deletedFileRetentionDuration is longer than Delta's default.
        raise MaintenanceError(
            f"Delta refuses VACUUM RETAIN {retain_hours:g} HOURS on {name}: its delta.deletedFileRetentionDuration "
            f"is longer; give a longer --retain-hours, or set {RETENTION_CHECK}=false when no job writes the lake"
        ) from None
    history = spark.sql(f"DESCRIBE HISTORY {ref} LIMIT {_HISTORY_LOOKBACK}").select(
        "version", "operation", "operationMetrics"
    )
    files = size = None
    for row in history.collect():
        if before is not None and row["version"] <= before:
            break
        metrics = row["operationMetrics"] or {}
        if row["operation"] == "VACUUM END" and "numDeletedFiles" in metrics:
            files = int(metrics["numDeletedFiles"])
        elif row["operation"] == "VACUUM START" and "sizeOfDataToDelete" in metrics:
            size = int(metrics["sizeOfDataToDelete"])
    return files, (size if files is not None else None)


def format_bytes(size: int | None) -> str:
    """``0 B``, ``812 B``, ``15.3 KB``, ``1.2 GB`` (powers of 1024)."""
    value = float(size or 0)
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KB", "MB", "GB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TB"
