"""The export stage: the ``dataset`` table -> the files users consume (``laion-spark export``).

Incremental, like every stage, but with its state in OUT itself (export/layout.py): a run exports the dataset's
rows that OUT's complete file groups do not hold yet, into new groups numbered after them; the groups OUT
already has are left byte for byte as they are. Rows OUT holds that have left the dataset (a takedown) are
counted, and the groups holding them are written again without them, under the same numbers.

A run reads the dataset at one Delta version (recorded in OUT), so that counting the rows and writing them see
the same rows even while the pipeline adds more.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from laion_spark.config import Config, ConfigError, ExportConfig
from laion_spark.export.embeddings import (
    EmbeddingsSettings,
    EmbeddingsWriter,
    embedded_keys,
    embeddings_rows,
    export_dtype,
)
from laion_spark.export.laion import PartSettings, PartWriter, laion5b_rows, laion_rows, laion_schema
from laion_spark.export.layout import LAYOUTS, STATE_FILE, ExportFiles, ExportLayout, ExportState
from laion_spark.export.plan import ExportContext, count_by_bucket, number_rows, one_task_per_group, read_exported
from laion_spark.export.schemas import LAION5B_SCHEMAS
from laion_spark.export.webdataset import ShardSettings, ShardWriter, key_digits, webdataset_rows
from laion_spark.export.writers import STATUS_DDL, GroupStatus, GroupWriter, write_groups
from laion_spark.run.progress import stage_progress
from laion_spark.schemas import DATASET
from laion_spark.storage import StageCounter, is_catalog_lake, latest_version, new_run_id, table_exists
from laion_spark.storage.delta import read_table_version
from laion_spark.storage.ids import sample_id_column
from laion_spark.storage.outputs import OutputDir

STAGE = "export"
FORMATS = tuple(LAYOUTS)

# What each format writes: the rows its writer reads (Spark side), given the numbered (uid, group, position).
_ROWS: dict[str, Callable[[ExportContext, DataFrame], DataFrame]] = {
    "laion": laion_rows,
    "laion5b": laion5b_rows,
    "webdataset": webdataset_rows,
    "embeddings": embeddings_rows,
}


@dataclass
class ExportResult:
    format: str
    out: str
    lake: str
    dataset_version: int
    rows_new: int  # dataset rows exported by this run
    rows_removed: int  # rows OUT held that are no longer in the dataset, removed by this run
    rows_total: int  # rows OUT holds now
    files_written: int  # file groups written by this run (new ones and rewritten ones)
    files_rewritten: int  # of which rewritten without removed rows
    files_kept: int  # complete file groups left as they were
    files_total: int
    rows_without_image: int  # webdataset: rows of this run in the shard parquet but not in the tar
    sample_id_collisions: int  # laion / laion5b: dataset rows sharing a SAMPLE_ID / hash with another row
    leftovers_removed: int  # temporaries and files of incomplete groups, from killed runs
    seconds: float
    run_id: str

    def summary(self) -> str:
        files = (
            "file" if self.format in ("laion", "laion5b") else "shard" if self.format == "webdataset" else "file triple"
        )
        lines = [
            f"export {self.format} -> {self.out} (dataset version {self.dataset_version} of {self.lake})",
            f"  rows exported now: {self.rows_new:,}; in OUT: {self.rows_total:,} in {self.files_total:,} {files}s",
            f"  {files}s written: {self.files_written:,} ({self.files_rewritten:,} rewritten), kept as they were: "
            f"{self.files_kept:,}",
        ]
        if self.rows_removed:
            lines.append(f"  rows removed from OUT (no longer in the dataset): {self.rows_removed:,}")
        if self.rows_without_image:
            lines.append(
                f"  rows without image bytes (in the shard parquet, not in the tar): {self.rows_without_image:,}"
            )
        if self.sample_id_collisions:
            lines.append(f"  rows sharing their SAMPLE_ID with another row: {self.sample_id_collisions:,}")
        if self.leftovers_removed:
            lines.append(f"  files of killed runs removed: {self.leftovers_removed:,}")
        lines.append(f"  time: {self.seconds:.1f} s")
        return "\n".join(lines)


def run_export(
    spark: SparkSession,
    config: Config,
    lake: str,
    fmt: str,
    out: str,
    rebuild: bool = False,
    run_id: str | None = None,
) -> ExportResult:
    """Export the dataset rows that ``out`` does not hold yet as ``fmt`` (laion | laion5b | webdataset |
    embeddings); with ``rebuild``, delete what ``out`` holds of that export first and write everything again."""
    started = time.monotonic()
    layout = _layout(fmt)
    rows_per_group = _rows_per_group(config.export, layout)
    if not table_exists(spark, lake, DATASET):
        raise FileNotFoundError(f"no dataset table in lake {lake}: run `laion-spark score` first")
    export_dir = OutputDir(str(out))
    state, files, leftovers = _open_out(export_dir, layout, str(lake), rows_per_group, config.export, rebuild)

    version = latest_version(spark, lake, DATASET)
    options = dict(state.options) if state else _initial_options(spark, lake, layout, config.export)
    dataset = read_table_version(spark, lake, DATASET, version)
    ctx = ExportContext(fmt, spark, str(lake), config, dataset, version, options)
    if state is None:
        state = ExportState(fmt, _lake_name(lake), rows_per_group, options=dict(options))
        state.write(export_dir)  # claim OUT for this format before any of its files appears

    plan = _plan(ctx, export_dir, layout, files, rows_per_group)
    run_id = run_id or new_run_id()
    # The groups are written by the tasks of one Spark job: the line repeats its rate and time until they all end.
    to_write = len(set(plan.rewrite) | set(plan.emptied)) + len(plan.new_groups)
    with stage_progress(config, "export", to_write, "files", run_id) as progress:
        statuses = _write(ctx, export_dir, plan)
        progress.advance(len(statuses))
    if fmt == "embeddings" and not options.get("dimension"):
        options["dimension"] = max((int(s.dimension) for s in statuses), default=0)

    written = {int(s.group): s for s in statuses}
    rows_total = sum(rows for group, (rows, _) in plan.held.items() if group not in written)
    rows_total += sum(int(s.rows) for s in statuses)
    files_total = len(set(files.complete) | set(written))
    result = ExportResult(
        format=fmt,
        out=str(out),
        lake=str(lake),
        dataset_version=version,
        rows_new=plan.rows_new,
        rows_removed=plan.rows_removed,
        rows_total=rows_total,
        files_written=len(statuses),
        files_rewritten=len(plan.rewrite),
        files_kept=len(files.complete) - len(plan.rewrite),
        files_total=files_total,
        rows_without_image=sum(int(s.rows) - int(s.written) for s in statuses),
        sample_id_collisions=0 if layout.key_is_uid else _collisions(plan.keys),
        leftovers_removed=leftovers,
        seconds=0.0,
        run_id=run_id,
    )
    rows_exported = sum(int(written[group].rows) for group in plan.new_groups)
    _record(spark, lake, result, rows_exported, rows_before=sum(rows for rows, _ in plan.held.values()))
    updated = ExportState(fmt, state.lake, state.rows_per_group, version, options, rows_total, files_total)
    if updated.to_json() != state.to_json():  # a run that changed nothing leaves OUT as it was, state file included
        updated.write(export_dir)
    result.seconds = time.monotonic() - started
    return result


@dataclass
class _Plan:
    keys: DataFrame  # (uid, key) of the dataset rows the format exports
    held: dict[int, tuple[int, int]]  # complete group -> (rows it holds, rows no longer in the dataset)
    rewrite: list[int]  # groups to write again without their removed rows
    rows_new: int
    new_groups: list[int]
    numbered: DataFrame | None  # (uid, group, position) of every row to write

    @property
    def rows_removed(self) -> int:
        return sum(self.held[group][1] for group in self.rewrite)

    @property
    def emptied(self) -> list[int]:
        """Rewritten groups with no row left."""
        return [group for group in self.rewrite if self.held[group][0] == self.held[group][1]]


def _open_out(
    out: OutputDir, layout: ExportLayout, lake: str, rows_per_group: int, export: ExportConfig, rebuild: bool
) -> tuple[ExportState | None, ExportFiles, int]:
    """OUT's state and file groups, checked against this run, after --rebuild's deletion and the removal of
    what killed runs left (temporaries of interrupted publishes, the files of groups whose completing file never
    appeared: they are written again). Returns the number of leftovers removed too."""
    state = ExportState.read(out)
    files = layout.scan(out)
    _check_out(out, layout, state, files, lake, rows_per_group, export, rebuild)
    if rebuild:
        _delete_export(out, layout, files)
        state, files = None, ExportFiles([], [])
    leftovers = sum(out.remove_temporaries(*_parts(d)) for d in layout.directories)
    for orphan in files.orphans:
        out.delete(orphan)
    return state, ExportFiles(files.complete, []), leftovers + len(files.orphans)


def _plan(ctx: ExportContext, out: OutputDir, layout: ExportLayout, files: ExportFiles, rows_per_group: int) -> _Plan:
    """Which rows go into which group: the dataset rows OUT does not hold, into new groups; the rows still in
    the dataset of every group that holds removed rows, into that group again."""
    keys = _dataset_keys(ctx, layout)
    digits = int(ctx.options.get("key_digits", 0))
    exported = read_exported(ctx.spark, out, layout, files.complete, digits) if files.complete else None
    held = _rows_per_held_group(exported, keys) if exported is not None else {}
    rewrite = sorted(group for group, (_, stale) in held.items() if stale)

    todo = keys.join(exported.select("key"), "key", "left_anti") if exported is not None else keys
    buckets = count_by_bucket(todo)
    rows_new = sum(rows for _, rows in buckets)
    numbered = []
    if rows_new:
        numbered.append(number_rows(todo.select("uid"), buckets, rows_per_group, files.gaps, files.next_number))
    if rewrite:
        numbered.append(_kept_rows(exported, keys, rewrite, by_key_position=digits > 0))
    return _Plan(
        keys=keys,
        held=held,
        rewrite=rewrite,
        rows_new=rows_new,
        new_groups=files.new_numbers(math.ceil(rows_new / rows_per_group)),
        numbered=functools.reduce(DataFrame.unionByName, numbered) if numbered else None,
    )


def _write(ctx: ExportContext, out: OutputDir, plan: _Plan) -> list:
    """Write the plan's groups, one Spark task each; returns one status per group written."""
    open_group = _group_writer(ctx, out)
    # A group the takedown emptied gets no rows, so no task: the driver writes its (empty) files itself.
    statuses: list = [_write_empty_group(open_group, group) for group in plan.emptied]
    groups = [group for group in plan.rewrite if group not in plan.emptied] + plan.new_groups
    if groups:
        tasks = one_task_per_group(_ROWS[ctx.format](ctx, plan.numbered), groups)
        write = functools.partial(write_groups, open_group=open_group)
        statuses += tasks.mapInArrow(write, STATUS_DDL).collect()  # one row per group written
        missing = set(groups) - {int(s.group) for s in statuses}
        if missing:
            raise RuntimeError(f"export groups {sorted(missing)} were not written")
    return statuses


def _layout(fmt: str) -> ExportLayout:
    if fmt not in LAYOUTS:
        raise ConfigError(f"unknown export format {fmt!r}: use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[fmt]


def _rows_per_group(export: ExportConfig, layout: ExportLayout) -> int:
    rows = getattr(export, layout.group_setting)
    if not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"export.{layout.group_setting} = {rows!r}: must be a positive number of rows")
    if layout.format == "laion5b" and export.laion5b_columns not in LAION5B_SCHEMAS:
        raise ConfigError(f"export.laion5b_columns = {export.laion5b_columns!r}: use {' or '.join(LAION5B_SCHEMAS)}")
    return rows


def _check_out(
    out: OutputDir,
    layout: ExportLayout,
    state: ExportState | None,
    files: ExportFiles,
    lake: str,
    rows_per_group: int,
    export: ExportConfig,
    rebuild: bool,
) -> None:
    """OUT must hold nothing, or an export of this format of this lake written with these settings (which
    --rebuild may change)."""
    where = out.uri
    if state is None:
        if not files.empty:
            raise ConfigError(
                f"{where} holds files named like a {layout.format} export but no {STATE_FILE}: "
                "export into an empty directory, or delete those files"
            )
        return
    if state.format != layout.format:
        raise ConfigError(f"{where} holds a {state.format} export: export {layout.format} into another directory")
    if rebuild:
        return
    if state.lake != _lake_name(lake):
        raise ConfigError(
            f"{where} holds an export of lake {state.lake}, not {_lake_name(lake)}: export into another "
            "directory, or pass --rebuild to replace it"
        )
    if state.rows_per_group != rows_per_group:
        raise ConfigError(
            f"{where} was written with export.{layout.group_setting}={state.rows_per_group}: set it back "
            f"(--set export.{layout.group_setting}={state.rows_per_group}), or pass --rebuild to write it again"
        )
    columns = state.options.get("columns")
    if layout.format == "laion5b" and columns != export.laion5b_columns:
        raise ConfigError(
            f"{where} holds laion5b files with the {columns} columns: set export.laion5b_columns={columns}, "
            "or pass --rebuild to write it again"
        )


def _delete_export(out: OutputDir, layout: ExportLayout, files: ExportFiles) -> None:
    """Delete the files of the export (not anything else OUT holds): completing files first, so that a run
    killed halfway leaves orphans, which the next run deletes."""
    for number in files.complete:
        for name in reversed(layout.group_files(number)):
            out.delete(name)
    for orphan in files.orphans:
        out.delete(orphan)
    out.delete(STATE_FILE)


def _parts(directory: str) -> list[str]:
    return [directory] if directory else []


def _lake_name(lake: str) -> str:
    """The lake as the state file records it: a local directory as an absolute path, anything else as given."""
    text = str(lake).rstrip("/")
    if is_catalog_lake(text) or "://" in text or text.startswith("dbfs:"):
        return text
    return os.path.abspath(text)


def _initial_options(spark: SparkSession, lake: str, layout: ExportLayout, export: ExportConfig) -> dict:
    """What a new export fixes for all its later runs, besides its group size."""
    if layout.format == "webdataset":
        return {"key_digits": key_digits(export.samples_per_shard)}
    if layout.format == "laion5b":
        return {"columns": export.laion5b_columns}
    if layout.format == "embeddings":
        return {"embedding_dtype": export_dtype(spark, lake), "dimension": 0}
    return {}


def _dataset_keys(ctx: ExportContext, layout: ExportLayout) -> DataFrame:
    """(uid, key) of the dataset rows this format exports; the key is what the completing files hold."""
    if layout.format == "embeddings":
        return embedded_keys(ctx)
    key = F.col("uid") if layout.key_is_uid else sample_id_column()
    return ctx.dataset.select("uid", key.alias("key"))


def _rows_per_held_group(exported: DataFrame, keys: DataFrame) -> dict[int, tuple[int, int]]:
    """group -> (rows it holds, rows no longer in the dataset): one row per complete group of OUT."""
    present = keys.select("key").distinct().withColumn("present", F.lit(True))
    counts = (
        exported.join(present, "key", "left")
        .groupBy("group")
        .agg(F.count(F.lit(1)).alias("rows"), F.count(F.when(F.col("present").isNull(), True)).alias("stale"))
        .collect()
    )
    return {int(row.group): (int(row.rows), int(row.stale)) for row in counts}


def _kept_rows(exported: DataFrame, keys: DataFrame, groups: list[int], by_key_position: bool) -> DataFrame:
    """(uid, group, position) of the rows of ``groups`` still in the dataset. A webdataset key keeps its
    position (keys do not change, gaps are fine); elsewhere the rows keep their order (uid order, which is also
    the sample id order) at positions 0..k-1."""
    kept = exported.where(F.col("group").isin(*groups)).join(keys.dropDuplicates(["key"]), "key")
    if not by_key_position:
        rank = F.row_number().over(Window.partitionBy("group").orderBy("key")) - 1
        kept = kept.withColumn("position", rank.cast("long"))
    return kept.select("uid", "group", "position")


def _group_writer(ctx: ExportContext, out: OutputDir) -> Callable[..., GroupWriter]:
    """What a task calls to open group n: the format's writer with its settings (picklable)."""
    options = ctx.options
    if ctx.format == "webdataset":
        return functools.partial(ShardWriter, ShardSettings(out, int(options["key_digits"])))
    if ctx.format == "embeddings":
        settings = EmbeddingsSettings(out, options["embedding_dtype"], int(options.get("dimension") or 0))
        return functools.partial(EmbeddingsWriter, settings)
    schema = laion_schema(ctx.format, options.get("columns", "multi"))
    return functools.partial(PartWriter, PartSettings(out, schema))


def _write_empty_group(open_group: Callable[..., GroupWriter], number: int) -> GroupStatus:
    with tempfile.TemporaryDirectory(prefix="laion-spark-export-") as spool:
        return open_group(number, Path(spool)).publish()


def _collisions(keys: DataFrame) -> int:
    """Dataset rows whose sample id another row already has (about n^2 / 2^64 of n rows)."""
    row = keys.groupBy("key").count().where(F.col("count") > 1).agg(F.sum(F.col("count") - 1).alias("extra")).first()
    return int(row["extra"] or 0) if row is not None else 0


def _record(spark: SparkSession, lake: str, result: ExportResult, rows_exported: int, rows_before: int) -> None:
    """One funnel step per run: stage ``export``, step ``<format>`` (rows to export -> rows exported), with the
    rows removed from OUT and the rows without an image as their own steps when there are any."""
    counter = StageCounter(result.run_id, STAGE)
    counter.add(result.format, result.rows_new, rows_exported)
    if result.rows_without_image:
        counter.add_outcome("no_image", result.rows_new, result.rows_without_image)
    if result.rows_removed:
        counter.add("removed_from_out", rows_before, rows_before - result.rows_removed)
    counter.write(spark, lake)
