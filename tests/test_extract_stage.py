"""run_extract through a real local SparkSession: Delta tables read back, reruns, fallbacks, shared samples."""

from __future__ import annotations

import collections
import gzip
import re
import shutil
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from laion_spark.cli import main as cli_main
from laion_spark.config import Config
from laion_spark.extract import ExtractRules, FileStatus, extract_file, list_input_files, pair_uid, run_extract
from laion_spark.extract.inputs import _list_with_spark
from laion_spark.schemas import PAIRS_SCHEMA
from laion_spark.testing.archives import WatPage, html_page, truncate, write_arc, write_warc, write_wat

HTML = (
    '<html><body><img src="/a.jpg" alt="a red circle"><IMG SRC="b.png" ALT="a blue &amp; green square"></body></html>'
)


def pages(n: int, prefix: str) -> list[WatPage]:
    return [
        WatPage(f"http://{prefix}{i}.example.com/p.html", [(f"i{j}.jpg", f"{prefix} image {i} {j}") for j in range(4)])
        for i in range(n)
    ]


def expected_pairs(path: Path) -> int:
    return next(i for i in extract_file(str(path), ExtractRules()) if isinstance(i, FileStatus)).pairs_emitted


def delta(spark, lake: str, name: str):
    return spark.read.format("delta").load(f"{lake}/{name}")


def log_by_file(spark, lake: str) -> dict[str, tuple]:
    rows = delta(spark, lake, "ingest_log").collect()
    return {Path(r.source_file).name: (r.status, r.records_read, r.pairs_emitted, r.error, r.run_id) for r in rows}


@pytest.fixture
def crawl(tmp_path: Path) -> Path:
    """A directory of archives in every shape, good and bad, plus a gzipped manifest of some of them."""
    d = tmp_path / "crawl"
    d.mkdir()
    full = write_wat(d / "full.wat.gz", pages(30, "wat"))
    write_wat(d / "plain.wat", pages(5, "plainwat"))
    write_warc(d / "pages.warc", [html_page(f"http://site.example/{i}/", HTML) for i in range(4)])
    write_arc(d / "old.arc.gz", [html_page("http://old.example/index.html", HTML)])
    truncate(full, 0.5, d / "cut.wat.gz")
    write_wat(d / "badjson.wat.gz", [*pages(2, "bj"), b'{"Envelope": "IMG@/src" ,,,'])
    (d / "notes.warc.gz").write_bytes(b"this is a text file, not an archive\n")
    manifest = tmp_path / "crawl.paths.gz"
    manifest.write_bytes(gzip.compress(b"pages.warc\nold.arc.gz\nmissing.warc.gz\n# a comment\n\n"))
    return d


def test_extract_writes_delta_tables_and_reruns_are_idempotent(spark, lake, crawl, tmp_path):
    config = Config()
    config.extract.rows_per_batch = 16  # several Arrow batches per file
    config.extract.manifest_prefix = str(crawl)
    inputs = [str(crawl / "*.wat*"), str(tmp_path / "crawl.paths.gz"), str(crawl / "notes.warc.gz")]

    result = run_extract(spark, config, lake, inputs, run_id="run-1")

    log = log_by_file(spark, lake)
    assert {name: row[0] for name, row in log.items()} == {
        "full.wat.gz": "ok",
        "plain.wat": "ok",
        "pages.warc": "ok",
        "old.arc.gz": "ok",
        "cut.wat.gz": "partial",
        "badjson.wat.gz": "partial",
        "notes.warc.gz": "failed",
        "missing.warc.gz": "failed",
    }
    assert "truncated" in log["cut.wat.gz"][3] and "JSONDecodeError" in log["badjson.wat.gz"][3]
    assert "NotAnArchive" in log["notes.warc.gz"][3] and "FileNotFoundError" in log["missing.warc.gz"][3]
    assert (result.files_ok, result.files_partial, result.files_failed, result.files_skipped) == (4, 2, 2, 0)

    pairs = delta(spark, lake, "pairs").collect()  # a few hundred rows: asserting in Python saves Spark jobs
    per_file = collections.Counter(Path(r.source_file).name for r in pairs)
    for name in ("full.wat.gz", "plain.wat", "pages.warc", "old.arc.gz", "cut.wat.gz", "badjson.wat.gz"):
        assert per_file[name] == log[name][2] == expected_pairs(crawl / name), name
    assert per_file["full.wat.gz"] == 120 and 0 < per_file["cut.wat.gz"] < 120 and per_file["badjson.wat.gz"] == 8
    assert result.pairs_written == len(pairs) == sum(row[2] for row in log.values())
    assert all(re.match(r"https?://", r.url) and len(r.text) >= 5 for r in pairs)
    assert {r.source_format for r in pairs} == {"wat", "warc", "arc"}
    arc_row = min((r for r in pairs if r.source_format == "arc"), key=lambda r: r.url)
    assert (arc_row.url, arc_row.text) == ("http://old.example/a.jpg", "a red circle")
    assert arc_row.page_url == "http://old.example/index.html" and arc_row.crawl_date.year == 2024
    assert all(r.uid == pair_uid(r.url, r.text) for r in pairs)
    schema = delta(spark, lake, "pairs").schema
    assert schema.names == PAIRS_SCHEMA.names and not schema["uid"].nullable
    stats = delta(spark, lake, "stage_stats").where("run_id = 'run-1' AND stage = 'extract'")
    steps = {r.step: (r.rows_in, r.rows_out) for r in stats.collect()}
    assert steps["files"] == (8, 6) and steps["pairs"][1] == result.pairs_written
    assert steps["records"][0] == result.records_read > 0

    # Rerun after the truncated file was repaired upstream: ok files are skipped; partial and failed ones are
    # re-read and their rows replaced, never duplicated.
    shutil.copy(crawl / "full.wat.gz", crawl / "cut.wat.gz")
    again = run_extract(spark, config, lake, inputs, run_id="run-2")
    assert (again.files_skipped, again.files_read, again.files_ok) == (4, 4, 1)
    log = log_by_file(spark, lake)
    assert log["cut.wat.gz"][0] == "ok" and log["cut.wat.gz"][4] == "run-2" and log["full.wat.gz"][4] == "run-1"
    pairs = delta(spark, lake, "pairs")
    assert pairs.count() == result.pairs_written - per_file["cut.wat.gz"] + 120
    cut_rows = pairs.where(F.col("source_file").endswith("cut.wat.gz"))
    assert cut_rows.count() == cut_rows.select("uid").distinct().count() == 120

    # --force re-reads every file and still adds nothing.
    total = pairs.count()
    forced = run_extract(spark, config, lake, inputs, force=True, run_id="run-3")
    assert forced.files_skipped == 0 and forced.files_read == 8
    assert delta(spark, lake, "pairs").count() == total
    assert delta(spark, lake, "ingest_log").count() == 8


def test_spark_binary_file_fallback_matches_streaming(spark, tmp_path, crawl):
    inputs = [str(crawl / "*")]
    streamed_lake, fallback_lake = str(tmp_path / "streamed"), str(tmp_path / "fallback")
    run_extract(spark, Config(), streamed_lake, inputs + [str(tmp_path / "missing.warc")])
    config = Config()
    config.extract.io = "spark"
    result = run_extract(spark, config, fallback_lake, inputs + [str(tmp_path / "missing.warc")])

    columns = ["uid", "url", "text", "page_url", "source_file", "record_offset", "crawl_date", "source_format"]
    streamed = delta(spark, streamed_lake, "pairs").select(columns)
    fallback = delta(spark, fallback_lake, "pairs").select(columns)
    assert fallback.count() == streamed.count() > 0
    assert fallback.exceptAll(streamed).count() == 0
    statuses = {k: v[:3] for k, v in log_by_file(spark, fallback_lake).items()}
    assert statuses == {k: v[:3] for k, v in log_by_file(spark, streamed_lake).items()}
    assert statuses["missing.warc"][0] == "failed" and result.files_failed == 2


def test_every_shared_warcio_sample_is_read_or_logged(spark, lake, warcio_samples):
    result = run_extract(spark, Config(), lake, [str(warcio_samples / "*")])
    log = log_by_file(spark, lake)
    archives = [p.name for p in warcio_samples.iterdir() if ".arc" in p.name or ".warc" in p.name]
    assert len(archives) >= 15 and set(archives) <= set(log)
    for name in archives:
        status, records_read, _, error, _ = log[name]
        assert status == "ok" and records_read > 0 or status in ("partial", "failed") and error, name
    # The licence and commit id that sit beside the archives are not archives: logged, not fatal.
    assert log["LICENSE"][0] == "failed" and "NotAnArchive" in log["LICENSE"][3]
    assert result.files_ok >= 12 and result.records_read >= 50


def test_cli_extract_over_a_manifest(spark, lake, crawl, tmp_path, capsys):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{crawl / 'plain.wat'}\n{crawl / 'pages.warc'}\n")
    assert cli_main(["extract", "--input", str(manifest), "--lake", lake, "--set", "extract.rows_per_batch=3"]) == 0
    assert "2 read: 2 ok" in capsys.readouterr().out
    assert delta(spark, lake, "pairs").count() == 20 + 8


def test_inputs_list_globs_directories_manifests_and_hadoop_uris(spark, crawl, tmp_path):
    listed = list_input_files(spark, [str(crawl / "*.wat*"), str(crawl / "*.wat.gz"), str(crawl / "nope.warc")])
    assert [Path(p).name for p in listed] == ["badjson.wat.gz", "cut.wat.gz", "full.wat.gz", "plain.wat", "nope.warc"]
    assert len(list_input_files(spark, [str(crawl)])) == 7
    manifest = list_input_files(spark, [str(tmp_path / "crawl.paths.gz")])
    assert manifest == [str(tmp_path / n) for n in ("pages.warc", "old.arc.gz", "missing.warc.gz")]
    assert list_input_files(spark, [str(tmp_path / "crawl.paths.gz")], manifest_prefix="s3a://bucket/x/")[0] == (
        "s3a://bucket/x/pages.warc"
    )
    # Any scheme is listed by Spark's own listing (binaryFile paths); file: exercises that path here.
    hadoop = _list_with_spark(spark, f"file://{crawl}/*.arc.gz")
    assert hadoop == [f"{crawl}/old.arc.gz"]  # a local file has one spelling, whoever lists it
    with pytest.raises(FileNotFoundError, match="no files match"):
        list_input_files(spark, [str(crawl / "*.nothing")])


def test_binary_file_path_logs_files_spark_cannot_read_as_failed(spark, lake, tmp_path):
    """On the binaryFile path a file above Spark's length limit, or a directory in a file's place, is logged
    ``failed``; the job goes on and the readable file's pairs are written. A manifest names them, as a listing
    would not hand a directory over as a file."""
    good = write_wat(tmp_path / "good.wat.gz", pages(3, "good"))
    big = write_wat(tmp_path / "big.wat.gz", pages(60, "big"))
    (tmp_path / "dir.warc.gz").mkdir()
    assert good.stat().st_size < big.stat().st_size
    config = Config()
    config.extract.io = "spark"
    key = "spark.sql.sources.binaryFile.maxLength"
    spark.conf.set(key, str(big.stat().st_size - 1))
    try:
        manifest = tmp_path / "inputs.paths"
        manifest.write_text("good.wat.gz\nbig.wat.gz\ndir.warc.gz\n")
        result = run_extract(spark, config, lake, [str(manifest)])
    finally:
        spark.conf.unset(key)
    log = log_by_file(spark, lake)
    assert log["good.wat.gz"][0] == "ok" and log["good.wat.gz"][2] == expected_pairs(good) > 0
    assert log["big.wat.gz"][0] == "failed" and "maxLength" in log["big.wat.gz"][3]
    assert log["dir.warc.gz"][0] == "failed"
    assert result.files_failed == 2
    assert delta(spark, lake, "pairs").count() == expected_pairs(good)
