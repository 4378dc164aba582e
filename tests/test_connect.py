"""Where our users run Spark: the whole pipeline through a real Spark Connect server, the standard way
(``SPARK_REMOTE=sc://host:port laion-spark run ...``), giving the same tables as the classic run of the same inputs,
and the notebook over the result with a Connect session."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from connect_server import connect_server

from laion_spark.candidates import run_candidates
from laion_spark.config import load_config
from laion_spark.download import run_download
from laion_spark.extract import run_extract
from laion_spark.score import rebuild_dataset, run_score
from laion_spark.storage import read_table
from laion_spark.testing.sample_crawl import write_sample_crawl
from laion_spark.testing.server import serve_synthetic_images
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "laion_spark" / "demo" / "demo.yaml"
pytestmark = pytest.mark.slow

# What each table must agree on between the two runs: everything but run ids and timestamps.
COMPARED = {
    "pairs": ["uid", "url", "text", "text_key", "page_url", "source_file", "record_offset", "crawl_date"],
    "ingest_log": ["source_file", "status", "records_read", "pairs_emitted"],
    "candidates": ["uid", "dedup_key", "url", "text", "source_file", "record_offset", "language"],
    "images": ["uid", "url", "status", "width", "height", "original_width", "original_height", "sha256"],
    "embeddings": ["uid", "status", "model"],
    "dataset": ["uid", "url", "text", "width", "height", "language", "model"],
}


# The curation chain the Connect run re-cuts its dataset with (laion-spark dataset), and the classic run too. SemDeDup
# at epsilon 0.001 removes the same image under other alt texts: found whatever k-means' random sample (which
# depends on the file layout) makes of the centroids, so the two lakes can be compared row for row.
CURATION_SETS = ["--set", "dataset.filters=[threshold,semdedup,near_dup]", "--set", "dedup.phash_distance=12"]
CURATION_SETS += ["--set", "dedup.semdedup_epsilon=0.001"]


def _settings(base_url: str) -> list[str]:
    tiny = ensure_tiny_clip(PROJECT_ROOT / ".cache" / "models" / "tiny-clip")
    host = base_url.split("//", 1)[1]
    return [
        f"download.allowed_hosts=['{host}']",
        "download.per_host_requests_per_s=0",
        f"clip.model_config={tiny['model_config']}",
        f"clip.pretrained={tiny['pretrained']}",
    ]


def _notebook_code(lake: str) -> str:
    """notebooks/explore_lake.ipynb's code cells as one script over ``lake``, printing the session's type."""
    cells = json.loads((PROJECT_ROOT / "notebooks" / "explore_lake.ipynb").read_text())["cells"]
    code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    code = re.sub(r"(?m)^LAKE = .*$", f"LAKE = {lake!r}", code)
    code = re.sub(r"(?m)^(%.*)$", r"# \1", code)  # IPython's magics (%matplotlib inline), as nbconvert --to script
    return code + "\nprint(type(spark).__module__)\n"


def test_whole_pipeline_through_spark_connect_matches_the_classic_run(spark, tmp_path):
    crawl = tmp_path / "crawl"
    server, base_url = serve_synthetic_images()
    try:
        write_sample_crawl(crawl, base_url)
        overrides = _settings(base_url)
        inputs = str(crawl / "*")

        connect_lake = str(tmp_path / "connect-lake")
        env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
        with connect_server(tmp_path, sys.executable) as remote:
            env["SPARK_REMOTE"] = remote
            sets = [arg for override in overrides for arg in ("--set", override)]
            common = ["--lake", connect_lake, "--config", str(DEMO_CONFIG), *sets]
            result = subprocess.run(
                [sys.executable, "-m", "laion_spark", "run", *common, "--input", inputs],
                env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
            assert "score.above_threshold" in result.stdout
            # The notebook, as a user runs it with a Connect session for `spark`.
            notebook = _notebook_code(connect_lake)
            result = subprocess.run(
                [sys.executable, "-c", notebook], env=env, capture_output=True, text=True, timeout=300,
                cwd=PROJECT_ROOT / "notebooks",
            )  # fmt: skip
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
            assert "score.above_threshold" in result.stdout and "pyspark.sql.connect" in result.stdout
            # What users consume, over the same Connect session: the tasks write the files, the driver plans.
            shards = tmp_path / "webdataset"
            for command in (["export", "--format", "webdataset", "--out", str(shards)], ["index"]):
                result = subprocess.run(
                    [sys.executable, "-m", "laion_spark", *command, *common],
                    env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                )  # fmt: skip
                assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-4000:])
            # The index tasks read the embeddings' files themselves over Connect too (index.read_vectors auto).
            assert "vectors read by files" in result.stdout, result.stdout[-2000:]
            # Curation over Connect: the dataset re-cut through pHash near-dup and SemDeDup (k-means sample,
            # cluster assignment and the within-cluster comparison all in tasks), and one pair's story.
            result = subprocess.run(
                [sys.executable, "-m", "laion_spark", "dataset", *common, *CURATION_SETS],
                env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
            assert "dataset.near_dup" in result.stdout and "dataset.semdedup" in result.stdout
            removed = read_table(spark, connect_lake, "rejections").where("step = 'near_dup'").orderBy("uid").first()
            result = subprocess.run(
                [sys.executable, "-m", "laion_spark", "explain", *common, "--uid", removed.uid],
                env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
            assert f"verdict: NOT in dataset: removed by dataset.near_dup: {removed.detail}" in result.stdout

        classic_lake = str(tmp_path / "classic-lake")
        config = load_config(DEMO_CONFIG, overrides)
        run_extract(spark, config, classic_lake, [inputs])
        run_candidates(spark, config, classic_lake)
        run_download(spark, config, classic_lake)
        run_score(spark, config, classic_lake)
        exported_dataset = {row.uid for row in read_table(spark, classic_lake, "dataset").select("uid").collect()}
        rebuild_dataset(spark, load_config(DEMO_CONFIG, overrides + CURATION_SETS[1::2]), classic_lake)
    finally:
        server.shutdown()

    for table, columns in COMPARED.items():
        over_connect = read_table(spark, connect_lake, table).select(columns)
        classic = read_table(spark, classic_lake, table).select(columns)
        assert over_connect.count() == classic.count() > 0, table
        assert over_connect.exceptAll(classic).count() == 0, table
    similarities = (
        read_table(spark, connect_lake, "embeddings").alias("c")
        .join(read_table(spark, classic_lake, "embeddings").alias("k"), "uid")
        .selectExpr("max(abs(c.similarity - k.similarity)) AS diff").first()["diff"]
    )  # fmt: skip
    assert similarities < 1e-3

    chain = ["uid", "stage", "step", "survivor_uid"]
    over_connect = read_table(spark, connect_lake, "rejections").select(chain)
    classic = read_table(spark, classic_lake, "rejections").select(chain)
    assert over_connect.where("step = 'near_dup'").count() > 0 and over_connect.where("step = 'semdedup'").count() > 0
    assert over_connect.count() == classic.count() and over_connect.exceptAll(classic).count() == 0

    dataset_uids = exported_dataset  # the export and the index were made before the re-cut
    exported = spark.read.parquet(str(tmp_path / "webdataset" / "*.parquet")).select("uid").collect()
    assert sorted(row.uid for row in exported) == sorted(dataset_uids)
    indexed = spark.read.parquet(f"{connect_lake}/_index/metadata/*.parquet").select("uid").collect()
    assert sorted(row.uid for row in indexed) == sorted(dataset_uids)
