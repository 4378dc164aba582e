"""Reads, writes and merges of the lake's Delta tables, through DataFrame and SQL APIs only.

A lake is either a directory (any Hadoop URI: a local path, ``s3a://``, ``abfss://``, ``dbfs:/``) holding one Delta
table per name at ``<lake>/<name>``, or a catalog schema (``catalog.schema``, e.g. Unity Catalog's
``main.laion``) holding managed tables ``catalog.schema.name``. Every operation is written so that it also runs on
Spark Connect (Databricks serverless and shared clusters): Delta through SQL (``MERGE INTO``, ``DESCRIBE
HISTORY``, ``CREATE TABLE``), never the ``DeltaTable`` Python API, which needs Delta Connect's server plugin there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from laion_spark.config import ConfigError
from laion_spark.schemas import (
    BOOKMARKS,
    BOOKMARKS_SCHEMA,
    IMAGES,
    INGEST_LOG,
    PARTITION_COLUMNS,
    SCHEMAS,
    TABLE_PROPERTIES,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# catalog.schema (two parts) or schema (one part qualified by the session's current catalog is not accepted: a
# bare word is far more likely a relative directory).
_CATALOG_LAKE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
STAGING_PREFIX = "_staging_"
CHANGE_DATA_FEED = "delta.enableChangeDataFeed"
# The columns a change data feed read adds, and the change types that leave a row in the table.
_CHANGE_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")
_ROW_KEPT = ("insert", "update_postimage")
# What Delta says when a change data feed cannot be read over a range of versions: the feed was off for one of
# them, its files were vacuumed, or the log of those versions was cleaned up. A full read is the way out of each.
_CHANGE_FEED_GONE = (
    "DELTA_MISSING_CHANGE_DATA",
    "DELTA_CHANGE_DATA_FILE_NOT_FOUND",
    "FAILED_READ_FILE.FILE_NOT_EXIST",
    "FileNotFoundException",
    "DELTA_TRUNCATED_TRANSACTION_LOG",
    "DELTA_VERSIONS_NOT_CONTIGUOUS",
    "DELTA_FILE_NOT_FOUND",
    "DeltaFileNotFoundException",
)


def is_catalog_lake(lake: str) -> bool:
    """``catalog.schema`` names tables in the session's catalog; anything else is a directory or URI.

    A local directory that happens to be called ``a.b`` and exists is still a directory.
    """
    text = str(lake)
    return bool(_CATALOG_LAKE.match(text)) and not os.path.exists(text)


def table_path(lake: str, name: str) -> str:
    """``<lake>/<name>`` for a directory lake; a catalog lake's tables have no path of ours."""
    if is_catalog_lake(lake):
        raise ValueError(f"lake {lake} is a catalog schema: its table {name} has no path; use table_ref")
    return f"{str(lake).rstrip('/')}/{name}"


def table_ref(lake: str, name: str) -> str:
    """The table as SQL names it: ``delta.`<lake>/<name>``` or ``catalog.schema.name``."""
    if is_catalog_lake(lake):
        catalog, schema = str(lake).split(".")
        return f"`{catalog}`.`{schema}`.`{name}`"
    return "delta.`" + table_path(lake, name).replace("`", "``") + "`"


def table_exists(spark: SparkSession, lake: str, name: str) -> bool:
    if is_catalog_lake(lake):
        return spark.catalog.tableExists(f"{lake}.{name}")
    try:
        # Resolving the schema reads the Delta log's last checkpoint, not data; it fails for a missing path or a
        # directory that is not a Delta table.
        spark.read.format("delta").load(table_path(lake, name)).schema  # noqa: B018
    except AnalysisException:
        return False
    return True


def ensure_table(
    spark: SparkSession,
    lake: str,
    name: str,
    schema: StructType | None = None,
    properties: Mapping[str, str] | None = None,
) -> None:
    """Create the table empty with its declared schema (NOT NULL columns stay NOT NULL in Delta) and Delta
    ``properties`` (by default the table's own in ``schemas.TABLE_PROPERTIES``: ``pairs`` records its change data
    feed), partitioned by its ``schemas.PARTITION_COLUMNS``. An existing table gets the nullable columns that
    ``schema`` declares and it lacks (a lake written by an older laion_spark: ``images.phash``), in one ``ALTER
    TABLE ... ADD COLUMNS`` commit, so that appends and merges of today's rows succeed; its rows read null there. A
    column declared nullable today that the table holds NOT NULL loses that constraint (``ALTER COLUMN ... DROP NOT
    NULL``)."""
    schema = schema or SCHEMAS[name]
    if table_exists(spark, lake, name):
        _add_missing_columns(spark, lake, name, schema)
        return
    properties = TABLE_PROPERTIES.get(name, {}) if properties is None else properties
    partitioned = [c for c in PARTITION_COLUMNS.get(name, []) if c in schema.names]
    if is_catalog_lake(lake):
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {lake}")
    columns = ", ".join(
        f"`{field.name}` {field.dataType.simpleString()}{'' if field.nullable else ' NOT NULL'}"
        for field in schema.fields
    )
    partitioned_by = f" PARTITIONED BY ({', '.join(f'`{c}`' for c in partitioned)})" if partitioned else ""
    tblproperties = f" TBLPROPERTIES ({_sql_properties(properties)})" if properties else ""
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS {table_ref(lake, name)} ({columns}) USING DELTA{partitioned_by}{tblproperties}"
    )


def _add_missing_columns(spark: SparkSession, lake: str, name: str, schema: StructType) -> None:
    present = {field.name.lower(): field for field in read_table(spark, lake, name).schema.fields}
    missing = [f for f in schema.fields if f.name.lower() not in present and f.nullable]
    if missing:
        columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
        log.info("table %s: adding column(s) %s (written by an older laion_spark)", name, columns)
        spark.sql(f"ALTER TABLE {table_ref(lake, name)} ADD COLUMNS ({columns})")
    # A column that today's schema allows to be null (dataset.nsfw: no tag without a competent NSFW model) but an
    # older laion_spark created NOT NULL: writes of today's null rows would fail the table's constraint.
    relaxed = [
        f.name
        for f in schema.fields
        if f.nullable and f.name.lower() in present and not present[f.name.lower()].nullable
    ]
    for column in relaxed:
        log.info("table %s: column %s may now be null (created NOT NULL by an older laion_spark)", name, column)
        spark.sql(f"ALTER TABLE {table_ref(lake, name)} ALTER COLUMN `{column}` DROP NOT NULL")


@dataclass(frozen=True)
class TableDetail:
    """What ``DESCRIBE DETAIL`` says of a Delta table that this package uses."""

    id: str  # Delta's table id: a table dropped and created again at the same place gets a new one
    properties: dict[str, str]


def table_detail(spark: SparkSession, lake: str, name: str) -> TableDetail:
    detail = spark.sql(f"DESCRIBE DETAIL {table_ref(lake, name)}").select("id", "properties").first()
    return TableDetail(str(detail["id"]), dict(detail["properties"] or {}))


def set_table_properties(spark: SparkSession, lake: str, name: str, properties: Mapping[str, str]) -> bool:
    """Give the table the Delta ``properties`` it lacks (one ``ALTER TABLE ... SET TBLPROPERTIES`` commit, and
    none when it has them all). True when it changed. A change of properties is a metadata commit, which fails a
    concurrent write to the table: set them where no writer runs, or at creation (``ensure_table``)."""
    current = table_detail(spark, lake, name).properties
    missing = {key: value for key, value in properties.items() if current.get(key) != value}
    if not missing:
        return False
    spark.sql(f"ALTER TABLE {table_ref(lake, name)} SET TBLPROPERTIES ({_sql_properties(missing)})")
    return True


def _sql_properties(properties: Mapping[str, str]) -> str:
    return ", ".join(f"{_sql_string(key)} = {_sql_string(value)}" for key, value in properties.items())


def _sql_string(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def read_table(spark: SparkSession, lake: str, name: str, missing_ok: bool = False) -> DataFrame:
    """The table as a DataFrame; with ``missing_ok``, an empty frame of its schema when it does not exist."""
    if not table_exists(spark, lake, name):
        if missing_ok:
            return spark.createDataFrame([], SCHEMAS[name])
        where = f"{lake}.{name}" if is_catalog_lake(lake) else table_path(lake, name)
        raise FileNotFoundError(f"no Delta table '{name}' at {where}: run the stage that writes it first")
    table = (
        spark.table(f"{lake}.{name}")
        if is_catalog_lake(lake)
        else spark.read.format("delta").load(table_path(lake, name))
    )
    _check_layout(table, lake, name)
    return table


_SLICE_COLUMNS = {INGEST_LOG: ["ingest_batch"], IMAGES: ["fetch_batch"]}


class LakeLayoutError(ConfigError):
    """A table of the lake was written by an older laion_spark, without a column the stages now need (a usage
    error, like a wrong config: the CLI prints it in one line and exits 2)."""


def _check_layout(table: DataFrame, lake: str, name: str) -> None:
    """The slice columns came with resumable slices: a lake from before lacks them in ``ingest_log`` (which extract
    reads first) and ``images`` (which download and score read). Say so once, not as an analysis error deep inside
    a stage. (``pairs`` is left alone: candidates reads frames of pairs without the column too.)"""
    missing = [c for c in _SLICE_COLUMNS.get(name, []) if c not in table.columns]
    if missing:
        raise LakeLayoutError(
            f"table '{name}' of lake {lake} has no column {', '.join(missing)}: it was written by a laion_spark "
            'from before resumable slices (README, "Crawl scale"). Run the pipeline into a new lake; the old '
            "one stays readable as it is."
        )


def read_table_version(spark: SparkSession, lake: str, name: str, version: int) -> DataFrame:
    """The table as it was at ``version`` (Delta time travel): a read that later commits do not change."""
    return spark.sql(f"SELECT * FROM {table_ref(lake, name)} VERSION AS OF {int(version)}")


def read_inserted_rows(spark: SparkSession, lake: str, name: str, after: int, up_to: int) -> DataFrame:
    """The rows that the commits ``after + 1`` to ``up_to`` (both included) inserted into the table, read from its
    change data feed: the files of those commits only, whatever the table's size. Rows updated count with their new
    values; deletes are left out, and so are the feed's own columns. A row that one commit of the range inserted
    and a later one deleted is still there (the feed is not netted).

    Delta refuses the read, often only when a job runs, where the feed is missing for part of the range
    (see :func:`change_feed_unreadable`)."""
    if up_to <= after:  # Delta refuses an empty range; the table's schema with no row is the same answer
        return spark.createDataFrame([], read_table(spark, lake, name).schema)
    reader = (
        spark.read.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", str(int(after) + 1))
        .option("endingVersion", str(int(up_to)))
    )
    changes = reader.table(f"{lake}.{name}") if is_catalog_lake(lake) else reader.load(table_path(lake, name))
    return changes.where(F.col("_change_type").isin(*_ROW_KEPT)).drop(*_CHANGE_COLUMNS)


def change_feed_unreadable(error: BaseException) -> bool:
    """Whether ``error`` (from building or running a read of :func:`read_inserted_rows`) says that the change data
    feed is gone for part of the range: off for one of its versions, vacuumed, or its log cleaned up. Then only a
    read of the whole table sees every row. The test is on the message, which names Delta's error class whether
    it comes through Py4J, as a PySpark exception or over Spark Connect."""
    text = str(error)
    return any(marker in text for marker in _CHANGE_FEED_GONE)


@dataclass(frozen=True)
class Bookmark:
    """How far ``consumer`` (a stage) has read ``source`` (a table): every commit up to ``version`` of the Delta
    table whose id is ``source_id``."""

    consumer: str
    source: str
    source_id: str
    version: int


def read_bookmark(spark: SparkSession, lake: str, consumer: str, source: str) -> Bookmark | None:
    """The bookmark of ``consumer`` on ``source`` in the lake's ``_bookmarks`` table, or None when it has none."""
    if not table_exists(spark, lake, BOOKMARKS):
        return None
    bookmarks = read_table(spark, lake, BOOKMARKS)
    row = bookmarks.where((F.col("consumer") == consumer) & (F.col("source") == source)).first()
    return None if row is None else Bookmark(row.consumer, row.source, row.source_id, int(row.version))


def write_bookmark(spark: SparkSession, lake: str, bookmark: Bookmark, run_id: str) -> None:
    """MERGE ``bookmark`` into ``_bookmarks``. A bookmark only moves forward on one table: a run that read less
    and commits later (two runs at once) leaves the further one, and the next run reads the rest again."""
    ensure_table(spark, lake, BOOKMARKS, BOOKMARKS_SCHEMA)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    row = (bookmark.consumer, bookmark.source, bookmark.source_id, int(bookmark.version), run_id, now)
    further = "source.source_id <> target.source_id OR source.version > target.version"
    merge(
        spark.createDataFrame([row], BOOKMARKS_SCHEMA),
        lake,
        BOOKMARKS,
        ["consumer", "source"],
        update="*",
        update_condition=further,
    )


@dataclass(frozen=True)
class NewRows:
    """What :func:`read_new_rows` read: the ``rows``, the ``bookmark`` to write once they are consumed, and the
    bookmark they were read from (``since``; None when ``rows`` is the whole table)."""

    rows: DataFrame
    bookmark: Bookmark
    since: Bookmark | None
    latest: int = -1  # the source's version when read: past ``bookmark.version``, commits are left for later

    @property
    def is_whole_table(self) -> bool:
        return self.since is None

    @property
    def has_more(self) -> bool:
        return self.latest > self.bookmark.version

    @property
    def moves_bookmark(self) -> bool:
        return self.bookmark != self.since


def read_new_rows(
    spark: SparkSession,
    lake: str,
    consumer: str,
    source: str,
    whole: bool = False,
    max_rows: int | None = None,
) -> NewRows:
    """The rows of ``source`` that ``consumer`` has not read yet: those inserted since its bookmark, from the
    table's change data feed, up to the version current now; the whole table at that version when there is no
    bookmark (a first run), when the table is another one than the bookmark's (dropped and created again), when
    the feed is gone for part of the range, or when ``whole``. The change data feed of ``source`` is switched on
    first where it is off (one commit, once). With no bookmark, a table whose feed has been on since its creation
    is read from its feed too, from version 0.

    With ``max_rows``, the range stops at the first commit that brings the rows inserted since the bookmark to
    ``max_rows`` or more (by the commits' own metrics; a commit is never split): a slice. ``has_more`` then says
    whether commits are left for the next call.

    Delta may find the feed gone only once a job reads it (its files vacuumed): run the job through
    :func:`consume_new_rows`, which then runs it over the whole table."""
    if not table_exists(spark, lake, source):
        read_table(spark, lake, source)  # raises the one-sentence error of a missing table
    detail = table_detail(spark, lake, source)
    if detail.properties.get(CHANGE_DATA_FEED) != "true":
        set_table_properties(spark, lake, source, {CHANGE_DATA_FEED: "true"})
    version = latest_version(spark, lake, source)
    latest = 0 if version is None else version
    bookmark = Bookmark(consumer, source, detail.id, latest)
    since = None if whole else read_bookmark(spark, lake, consumer, source)
    if since is None and not whole and _feed_on_since_creation(spark, lake, source):
        since = Bookmark(consumer, source, detail.id, -1)
    if since is None or since.source_id != detail.id or since.version > bookmark.version:
        return read_whole_table(spark, lake, bookmark)
    if max_rows is not None:
        end = _slice_end(spark, lake, source, since.version, latest, max_rows)
        bookmark = Bookmark(consumer, source, detail.id, end)
    try:
        rows = read_inserted_rows(spark, lake, source, since.version, bookmark.version)
    except Exception as error:
        if not change_feed_unreadable(error):
            raise
        _log_change_feed_gone(since, error)
        return read_whole_table(spark, lake, Bookmark(consumer, source, detail.id, latest))
    return NewRows(rows, bookmark, since, latest)


def _feed_on_since_creation(spark: SparkSession, lake: str, name: str) -> bool:
    """Whether the table was created with its change data feed on (its version 0 set the property)."""
    first = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, name)}").where("version = 0").select("operationParameters")
    row = first.first()
    properties = (row.operationParameters or {}).get("properties", "") if row is not None else ""
    return bool(re.search(r'"delta\.enableChangeDataFeed"\s*:\s*"true"', properties or ""))


def _slice_end(spark: SparkSession, lake: str, name: str, after: int, latest: int, max_rows: int) -> int:
    """The last version of the slice that starts after ``after``: about ``max_rows`` inserted rows, at least one
    commit. Read from the commits' metrics (``DESCRIBE HISTORY``, the commits after ``after`` only)."""
    if latest <= after + 1:
        return latest
    history = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, name)} LIMIT {int(latest - after)}")
    # One row per commit of the range: the table's history, not its data.
    commits = sorted(
        (int(row.version), row.operationMetrics or {})
        for row in history.select("version", "operationMetrics").collect()
        if after < int(row.version) <= latest
    )
    rows = 0
    for version, metrics in commits:
        rows += int(metrics.get("numOutputRows") or metrics.get("numTargetRowsInserted") or 0)
        if rows >= max_rows:
            return version
    return latest


def consume_new_rows(spark: SparkSession, lake: str, new: NewRows, job: Callable[[DataFrame], T]) -> tuple[NewRows, T]:
    """``job(new.rows)``, and the rows it ran over: the whole table when the change feed turns out to be gone as
    the job reads it (:func:`change_feed_unreadable`). Run the first job over the rows this way; once it has read
    them, the rest can read them as they are."""
    try:
        return new, job(new.rows)
    except Exception as error:
        if new.is_whole_table or not change_feed_unreadable(error):
            raise
        _log_change_feed_gone(new.since, error)
    whole = read_whole_table(spark, lake, new.bookmark)
    return whole, job(whole.rows)


def read_whole_table(spark: SparkSession, lake: str, bookmark: Bookmark) -> NewRows:
    """Every row of ``bookmark``'s source at its version, to be consumed up to that bookmark."""
    return NewRows(read_table_version(spark, lake, bookmark.source, bookmark.version), bookmark, None)


def _log_change_feed_gone(since: Bookmark, error: BaseException) -> None:
    lines = str(error).strip().splitlines()
    log.warning(
        "%s: reading all of %s: its change data feed after version %d is gone (%s)",
        since.consumer,
        since.source,
        since.version,
        lines[0] if lines else type(error).__name__,
    )


def _save(df: DataFrame, lake: str, name: str, mode: str, **options: str) -> None:
    writer = df.write.format("delta").mode(mode)
    for key, value in options.items():
        writer = writer.option(key, value)
    if is_catalog_lake(lake):
        df.sparkSession.sql(f"CREATE SCHEMA IF NOT EXISTS {lake}")
        writer.saveAsTable(f"{lake}.{name}")
    else:
        writer.save(table_path(lake, name))


def append(df: DataFrame, lake: str, name: str) -> None:
    """Append ``df``; a table of the lake's own (``schemas.SCHEMAS``) is first created with its layout if missing."""
    if name in SCHEMAS and set(SCHEMAS[name].names) <= set(df.columns):
        ensure_table(df.sparkSession, lake, name)
    _save(df, lake, name, "append")


def overwrite(df: DataFrame, lake: str, name: str) -> None:
    _save(df, lake, name, "overwrite", overwriteSchema="true")


def replace_where(df: DataFrame, lake: str, name: str, condition: str) -> None:
    """Atomically replace the rows matching ``condition`` with ``df`` (one Delta commit)."""
    if not table_exists(df.sparkSession, lake, name):
        append(df, lake, name)
        return
    _save(df, lake, name, "overwrite", replaceWhere=condition)


def sql_in(column: str, values: Sequence[str]) -> str:
    """``column IN ('a', 'b')`` with Spark SQL string escaping (for ``replaceWhere`` and slice predicates)."""
    quoted = ", ".join(_sql_string(v) for v in values)
    return f"`{column}` IN ({quoted})"


@dataclass(frozen=True)
class MergeCounts:
    inserted: int = 0
    updated: int = 0


def merge(
    df: DataFrame,
    lake: str,
    name: str,
    keys: Sequence[str],
    update: str | Sequence[str] | None = None,
    update_condition: str | None = None,
) -> MergeCounts:
    """``MERGE INTO`` the table on ``keys``: insert the rows whose keys are new; with ``update`` (``"*"`` or the
    columns to set), also update the matched rows for which ``update_condition`` (SQL over ``source.`` and
    ``target.``) holds. Returns the commit's own counts (no recount)."""
    spark = df.sparkSession
    ensure_table(spark, lake, name, None if name in SCHEMAS else df.schema)
    view = f"laion_spark_merge_source_{uuid.uuid4().hex}"
    df.createOrReplaceTempView(view)
    target = table_ref(lake, name)
    on = " AND ".join(f"target.`{key}` <=> source.`{key}`" for key in keys)
    clauses = []
    if update:
        condition = f" AND ({update_condition})" if update_condition else ""
        assignments = "*" if update == "*" else ", ".join(f"`{c}` = source.`{c}`" for c in update)
        clauses.append(f"WHEN MATCHED{condition} THEN UPDATE SET {assignments}")
    clauses.append("WHEN NOT MATCHED THEN INSERT *")
    before = latest_version(spark, lake, name)
    try:
        spark.sql(f"MERGE INTO {target} AS target USING {view} AS source ON {on} {' '.join(clauses)}")
    finally:
        spark.catalog.dropTempView(view)
    commit = _merge_commit_after(spark, lake, name, -1 if before is None else before)
    if commit is None:
        return MergeCounts()  # Delta commits nothing when a MERGE changes nothing
    metrics = commit["operationMetrics"] or {}
    return MergeCounts(int(metrics.get("numTargetRowsInserted", 0)), int(metrics.get("numTargetRowsUpdated", 0)))


def _merge_commit_after(spark: SparkSession, lake: str, name: str, before: int):
    """Our MERGE: the first commit after ``before``. Auto compaction may have committed an OPTIMIZE after it."""
    history = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, name)} LIMIT 3")
    commits = history.where(F.col("version") > before).select("version", "operation", "operationMetrics").collect()
    merges = sorted((c for c in commits if c["operation"] == "MERGE"), key=lambda c: c["version"])
    if commits and not merges:
        log.warning("%s: expected our MERGE after version %d, found %s", name, before, commits[0]["operation"])
    return merges[0] if merges else None


def upsert(df: DataFrame, lake: str, name: str, keys: list[str]) -> MergeCounts:
    """MERGE: update rows whose ``keys`` match, insert the others. ``df`` must be unique on ``keys``."""
    return merge(df, lake, name, keys, update="*")


def merge_insert_new(df: DataFrame, lake: str, name: str, keys: list[str]) -> MergeCounts:
    """MERGE that only inserts rows whose ``keys`` are not in the table yet (incremental, idempotent)."""
    return merge(df, lake, name, keys)


def latest_commit(spark: SparkSession, lake: str, name: str):
    """The table's latest commit (version, operation, operationMetrics), or None when it has none."""
    history = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, name)} LIMIT 1")
    return history.select("version", "operation", "operationMetrics").first()


def latest_version(spark: SparkSession, lake: str, name: str) -> int | None:
    commit = latest_commit(spark, lake, name)
    return None if commit is None else int(commit["version"])


@contextlib.contextmanager
def staged(df: DataFrame, lake: str, name: str) -> Iterator[DataFrame]:
    """Write ``df`` once to the lake's staging table ``_staging_<name>`` and yield it read back, so that several
    writes and counts use one evaluation of an expensive plan (a fetch, an extraction) without ``persist``, which
    serverless compute refuses. The table is emptied afterwards; VACUUM (``laion-spark`` maintenance) reclaims the
    files. A failure to empty it is logged, never raised over the block's own error."""
    spark = df.sparkSession
    table = STAGING_PREFIX + name
    overwrite(df, lake, table)
    try:
        yield read_table(spark, lake, table)
    finally:
        try:
            _empty_staging(spark, lake, table)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not empty staging table %s: %s: %s", table, type(exc).__name__, exc)


def _empty_staging(spark: SparkSession, lake: str, table: str) -> None:
    spark.sql(f"DELETE FROM {table_ref(lake, table)}")
