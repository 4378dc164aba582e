"""`laion-spark optimize`: small files compacted, old files vacuumed, rows and time travel untouched."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from laion_spark.cli import main
from laion_spark.run import RunLock
from laion_spark.schemas import PAIR_ROW_SCHEMA, PAIRS
from laion_spark.storage import MaintenanceError, append, latest_version, optimize_lake, staged, table_ref

COMMITS = 20
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"


def pairs_frame(spark, commit: int):
    crawled = dt.datetime(2024, 3, 1, 12, 0, 0)
    rows = [
        (
            f"uid-{commit:02d}-{k}",
            f"https://img.example/{commit}/{k}.jpg",
            f"alt text {commit} {k}",
            f"alt text {commit} {k}",
            f"https://page.example/{commit}",
            f"s3a://bucket/file-{commit % 4}.warc.gz",
            commit * 1000 + k,
            crawled,
            "warc",
            None,
        )
        for k in range(3)
    ]
    return spark.createDataFrame(rows, PAIR_ROW_SCHEMA).coalesce(1)


@pytest.fixture(scope="module")
def small_files_lake(spark, tmp_path_factory) -> Path:
    """A lake as months of runs leave it: one file per commit in pairs, and a staging table written and emptied."""
    lake = tmp_path_factory.mktemp("maintenance") / "lake"
    for commit in range(COMMITS):
        append(pairs_frame(spark, commit), str(lake), PAIRS)
    with staged(spark.range(500).selectExpr("id", "cast(id as string) as url"), str(lake), "extract") as rows:
        assert rows.count() == 500
    return lake


@pytest.fixture
def lake(small_files_lake: Path, tmp_path: Path) -> str:
    copy = tmp_path / "lake"
    shutil.copytree(small_files_lake, copy)  # a path table's log names its files relative to its directory
    return str(copy)


def num_files(spark, lake: str, name: str) -> int:
    return int(spark.sql(f"DESCRIBE DETAIL {table_ref(lake, name)}").first()["numFiles"])


def rows_of(spark, lake: str, name: str, version: int | None = None) -> list:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", str(version))
    return sorted(reader.load(f"{lake}/{name}").collect())


def parquet_files_on_disk(lake: str, name: str) -> list[Path]:
    return [p for p in (Path(lake) / name).rglob("*.parquet") if "_delta_log" not in p.parts]


def test_optimize_compacts_pairs_keeps_rows_and_time_travel_and_a_second_run_rewrites_nothing(spark, lake):
    assert num_files(spark, lake, PAIRS) >= COMMITS
    rows_before, rows_at_v4 = rows_of(spark, lake, PAIRS), rows_of(spark, lake, PAIRS, version=4)
    assert len(rows_before) == 3 * COMMITS and len(rows_at_v4) == 3 * 5

    reports = {report.table: report for report in optimize_lake(spark, lake)}

    assert set(reports) == {PAIRS, "_staging_extract"}
    pairs = reports[PAIRS]
    assert pairs.zorder_by == ("source_file",)
    assert pairs.files_before >= COMMITS and pairs.files_after == 1 == num_files(spark, lake, PAIRS)
    assert pairs.files_rewritten == pairs.files_before and pairs.files_written == 1
    assert "-> 1 files" in pairs.line() and "ZORDER BY (source_file)" in pairs.line()
    assert reports["_staging_extract"].zorder_by == ()  # scratch: compacted only (and empty)
    assert rows_of(spark, lake, PAIRS) == rows_before
    assert rows_of(spark, lake, PAIRS, version=4) == rows_at_v4  # no VACUUM: the old files are still there

    version = latest_version(spark, lake, PAIRS)
    again = {report.table: report for report in optimize_lake(spark, lake)}
    assert again[PAIRS].skipped and again[PAIRS].files_rewritten == 0
    assert again[PAIRS].files_before == again[PAIRS].files_after == 1
    assert latest_version(spark, lake, PAIRS) == version  # no commit at all
    assert "_run_lock" in again  # created by the first run's lock, kept in good shape from then on


def test_vacuum_with_zero_retention_deletes_the_files_no_version_reads(spark, lake):
    rows_before = rows_of(spark, lake, PAIRS)
    assert len(parquet_files_on_disk(lake, PAIRS)) >= COMMITS
    assert parquet_files_on_disk(lake, "_staging_extract")  # emptied by DELETE, its files still on disk

    reports = {report.table: report for report in optimize_lake(spark, lake, vacuum=True, retain_hours=0)}

    assert len(parquet_files_on_disk(lake, PAIRS)) == 1 == num_files(spark, lake, PAIRS)
    assert parquet_files_on_disk(lake, "_staging_extract") == []
    assert rows_of(spark, lake, PAIRS) == rows_before
    assert reports[PAIRS].files_vacuumed >= COMMITS
    assert reports["_staging_extract"].files_vacuumed >= 1
    assert "VACUUM RETAIN 0 HOURS deleted" in reports[PAIRS].line()


def test_retention_under_a_week_is_one_line_error_where_the_session_checks_it(spark, lake, capsys):
    files = num_files(spark, lake, PAIRS)
    previous = spark.conf.get(RETENTION_CHECK)
    spark.conf.set(RETENTION_CHECK, "true")
    try:
        with pytest.raises(MaintenanceError, match="retentionDurationCheck"):
            optimize_lake(spark, lake, vacuum=True, retain_hours=0)
        code = main(["optimize", "--lake", lake, "--vacuum", "--retain-hours", "0"])
    finally:
        spark.conf.set(RETENTION_CHECK, previous)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("laion-spark optimize: --retain-hours 0 is under Delta's retention check")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert num_files(spark, lake, PAIRS) == files  # refused before any table was touched


def test_cli_prints_one_line_per_table_and_exits_0(spark, lake, capsys):
    code = main(["optimize", "--lake", lake, "--tables", "pairs,_staging_extract", "--vacuum", "--set-auto-optimize"])

    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith(("pairs:", "_staging_extract:"))]
    assert len(lines) == 2
    pairs_line, staging_line = lines
    assert pairs_line.startswith("pairs: ") and "-> 1 files" in pairs_line
    assert "auto-optimize properties set" in pairs_line and "VACUUM RETAIN 168 HOURS" in pairs_line
    assert staging_line.startswith("_staging_extract: 0 -> 0 files") and "VACUUM RETAIN 168 HOURS" in staging_line
    properties = spark.sql(f"DESCRIBE DETAIL {table_ref(lake, PAIRS)}").first()["properties"]
    assert properties["delta.autoOptimize.optimizeWrite"] == "true"
    assert properties["delta.autoOptimize.autoCompact"] == "true"
    assert len(parquet_files_on_disk(lake, PAIRS)) > 1  # a week's retention: the replaced files stay


def test_optimize_exits_3_and_touches_nothing_while_a_run_holds_the_lake(spark, lake, capsys):
    files = num_files(spark, lake, PAIRS)
    holder = RunLock(spark, lake, "nightly-run")
    holder.acquire()
    try:
        code = main(["optimize", "--lake", lake])
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert code == 3
    assert "nightly-run" in err and "--break-lock" in err
    assert num_files(spark, lake, PAIRS) == files


def test_unknown_table_is_one_line_error_naming_the_lake_tables(spark, lake, capsys):
    code = main(["optimize", "--lake", lake, "--tables", "pairz"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "no table pairz" in err and "pairs, _staging_extract" in err
    assert len(err.splitlines()) == 1


def test_optimize_help_documents_vacuum_and_retention(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    out = capsys.readouterr().out
    for option in ("--lake", "--tables", "--vacuum", "--retain-hours", "--set-auto-optimize", "168"):
        assert option in out
