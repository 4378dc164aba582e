"""The remove stage (``laion-spark remove``): a takedown that reaches every table and artefact of the lake.

1. Every item is recorded in ``removals`` first, one row each (value, kind, reason, who, when), whether or not it
   matches anything today: from then on every stage consults it as a blocklist (laion_spark.remove.blocklist), so
   that a stage running meanwhile, a re-extraction or a new crawl cannot bring the item back.
2. The items are resolved to the uids they name, in every table that can name them (a URL or its digest in
   ``pairs``, ``candidates``, ``images`` and ``dataset``; an image hash in ``images``; a uid anywhere), staged once
   in a small Delta table.
3. Each table loses the rows of those uids in one ``MERGE ... WHEN MATCHED THEN DELETE`` (Delta's own row counts
   are reported), and the kNN index loses their vectors (laion_spark.index.build.remove_from_index).
4. The exports are not rewritten here: an export directory records what it holds, and the next
   ``laion-spark export`` rewrites only the files that hold rows no longer in ``dataset``.

With ``vacuum``, the touched tables are then VACUUMed with no retention, so that the removed rows' files are gone
from storage too, at the price of time travel to every earlier version of those tables.
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.config import Config, ConfigError
from laion_spark.index.build import IndexRemoval, remove_from_index
from laion_spark.remove.blocklist import KINDS, BlockItem, Blocklist, MalformedLine, blocked_rows, kind_sizes
from laion_spark.schemas import (
    CANDIDATES,
    DATASET,
    EMBEDDINGS,
    IMAGES,
    PAIRS,
    REJECTIONS,
    REMOVALS,
    REMOVALS_SCHEMA,
)
from laion_spark.storage import append, latest_version, new_run_id, read_table, staged, table_exists, table_ref
from laion_spark.storage.maintenance import RETENTION_CHECK

log = logging.getLogger(__name__)

STAGE = "remove"
# Every table that holds pairs, in the order the pipeline writes them.
TABLES = (PAIRS, CANDIDATES, IMAGES, EMBEDDINGS, DATASET, REJECTIONS)
VACUUM_WARNING = (
    "VACUUM RETAIN 0 HOURS: the files of the removed rows are deleted from storage, and with them time travel to "
    "every earlier version of the tables touched ({tables})"
)


@dataclass
class RemoveResult:
    """What one ``laion-spark remove`` did: the items recorded, and the rows removed per table and artefact."""

    run_id: str
    reason: str
    items: int  # recorded in removals, one row each
    items_by_kind: dict[str, int]
    uids: int  # distinct pairs the items named in the lake now
    rows_removed: dict[str, int]  # table -> rows deleted (tables the lake lacks are left out)
    index: IndexRemoval | None
    vacuumed: list[str] = field(default_factory=list)
    malformed: list[MalformedLine] = field(default_factory=list)
    list_lines: int = 0
    seconds: float = 0.0

    @property
    def export_rows_marked(self) -> int:
        """Rows that left ``dataset``: what the next export removes from the files that hold them."""
        return self.rows_removed.get(DATASET, 0)

    def summary(self) -> str:
        kinds = ", ".join(f"{count:,} {kind}" for kind, count in self.items_by_kind.items() if count)
        lines = [
            f"remove (run {self.run_id}): {self.items:,} item(s) recorded in {REMOVALS} ({kinds}); reason: {self.reason}",
            f"  pairs named in the lake now: {self.uids:,}",
        ]
        for table in TABLES:
            if table in self.rows_removed:
                lines.append(f"  {table:<12} {self.rows_removed[table]:>10,} row(s) removed")
            else:
                lines.append(f"  {table:<12} {'-':>10} (no such table)")
        if self.index is None or not self.index.exists:
            lines.append(f"  {'index':<12} {'-':>10} (no index built yet; `laion-spark index` builds without them)")
        else:
            lines.append(
                f"  {'index':<12} {self.index.removed:>10,} vector(s) removed ({self.index.rewritten_shards} shard(s) "
                f"rewritten, {self.index.emptied_shards} emptied)"
            )
        lines.append(
            f"  {'exports':<12} {self.export_rows_marked:>10,} row(s) marked: the next `laion-spark export` into each "
            "export directory rewrites only the files that hold them"
        )
        if self.malformed:
            lines.append(f"  list: {len(self.malformed):,} of {self.list_lines:,} line(s) malformed, skipped:")
            lines.extend(f"    line {m.number}: {m.text!r}: {m.why}" for m in self.malformed[:10])
            if len(self.malformed) > 10:
                lines.append(f"    ... and {len(self.malformed) - 10:,} more")
        if self.vacuumed:
            lines.append("  warning: " + VACUUM_WARNING.format(tables=", ".join(self.vacuumed)))
        lines.append(f"  time: {self.seconds:.1f} s")
        return "\n".join(lines)


def run_remove(
    spark: SparkSession,
    config: Config,
    lake: str,
    items: Sequence[BlockItem],
    reason: str,
    vacuum: bool = False,
    removed_by: str | None = None,
    run_id: str | None = None,
    malformed: Sequence[MalformedLine] = (),
    list_lines: int = 0,
) -> RemoveResult:
    """Record ``items`` in ``removals`` and delete what they name from every table, the index included (see the
    module docstring). ``malformed`` and ``list_lines`` (from reading a list file) are only reported."""
    started = time.monotonic()
    if not reason or not reason.strip():
        raise ConfigError("a removal needs a reason: give --reason TEXT (it is kept in the removals table)")
    if not items:
        raise ConfigError("nothing to remove: give --url, --uid, --sha256, --md5, --phash or a --list with items")
    unknown = sorted({item.kind for item in items} - set(KINDS))
    if unknown:
        raise ConfigError(f"unknown kind(s) {', '.join(unknown)}: use {', '.join(KINDS)}")
    run_id = run_id or new_run_id()
    _record(spark, lake, items, reason.strip(), removed_by or _user(), run_id)
    sizes = kind_sizes(items)
    blocklist = Blocklist(
        read_table(spark, lake, REMOVALS).where(F.col("run_id") == run_id).select("value", "kind"),
        frozenset(sizes),
        sizes,
    )
    present = [table for table in TABLES if table_exists(spark, lake, table)]
    named = _named_uids(spark, lake, present, blocklist)
    rows_removed: dict[str, int] = {}
    with staged(named, lake, f"remove_{uuid.uuid4().hex[:12]}") as uids:
        count = uids.count()
        for table in present:
            rows_removed[table] = _delete_uids(spark, lake, table, uids) if count else 0
            log.info("remove: %s: %d row(s) removed", table, rows_removed[table])
        index = remove_from_index(spark, config, lake, uids, run_id)
    touched = [table for table, rows in rows_removed.items() if rows]
    vacuumed = _vacuum(spark, lake, touched) if vacuum else []
    by_kind = {kind: sum(1 for item in items if item.kind == kind) for kind in KINDS}
    return RemoveResult(
        run_id=run_id,
        reason=reason.strip(),
        items=len(items),
        items_by_kind=by_kind,
        uids=count,
        rows_removed=rows_removed,
        index=index,
        vacuumed=vacuumed,
        malformed=list(malformed),
        list_lines=list_lines,
        seconds=time.monotonic() - started,
    )


def _record(spark: SparkSession, lake: str, items: Sequence[BlockItem], reason: str, by: str, run_id: str) -> None:
    """One ``removals`` row per item, in one commit, before anything is deleted."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    rows = [(item.value, item.kind, reason, by, now, run_id) for item in dict.fromkeys(items)]
    append(spark.createDataFrame(rows, REMOVALS_SCHEMA), lake, REMOVALS)


def _named_uids(spark: SparkSession, lake: str, tables: Sequence[str], blocklist: Blocklist) -> DataFrame:
    """(uid) of every pair an item names, in any table: distinct, narrow."""
    found = []
    for table in tables:
        rows = blocked_rows(read_table(spark, lake, table), blocklist)
        if rows is not None:
            found.append(rows.select("uid"))
    if not found:
        return spark.createDataFrame([], "uid string")
    return functools.reduce(DataFrame.unionByName, found).distinct()


def _delete_uids(spark: SparkSession, lake: str, table: str, uids: DataFrame) -> int:
    """Delete the rows of ``uids`` from ``table`` (a MERGE that only deletes); the rows deleted, from the commit's
    own metrics."""
    view = f"laion_spark_remove_{uuid.uuid4().hex}"
    uids.select("uid").createOrReplaceTempView(view)
    before = latest_version(spark, lake, table)
    try:
        spark.sql(
            f"MERGE INTO {table_ref(lake, table)} AS target USING {view} AS source "
            "ON target.uid = source.uid WHEN MATCHED THEN DELETE"
        )
    finally:
        spark.catalog.dropTempView(view)
    history = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, table)} LIMIT 3")
    # Our MERGE is the first commit after `before` (auto compaction may have committed after it).
    commits = history.where(F.col("version") > (-1 if before is None else before)).where(F.col("operation") == "MERGE")
    commit = commits.orderBy("version").select("operationMetrics").first()
    if commit is None:
        return 0  # Delta commits nothing when a MERGE changes nothing
    return int((commit["operationMetrics"] or {}).get("numTargetRowsDeleted", 0))


def _vacuum(spark: SparkSession, lake: str, tables: Sequence[str]) -> list[str]:
    """VACUUM ``tables`` keeping no old file, Delta's retention check switched off for the call only."""
    if not tables:
        return []
    log.warning(VACUUM_WARNING.format(tables=", ".join(tables)))
    previous = spark.conf.get(RETENTION_CHECK, None)
    spark.conf.set(RETENTION_CHECK, "false")
    try:
        for table in tables:
            spark.sql(f"VACUUM {table_ref(lake, table)} RETAIN 0 HOURS").collect()
    finally:
        if previous is None:
            spark.conf.unset(RETENTION_CHECK)
        else:
            spark.conf.set(RETENTION_CHECK, previous)
    return list(tables)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers: the removal is still recorded
        return "unknown"
