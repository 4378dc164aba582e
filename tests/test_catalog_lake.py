"""Named tables, not only paths: ``--lake catalog.schema`` writes managed tables in the session's catalog (Unity
Catalog on Databricks; the local session's catalog here), through the same stages and the same SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from laion_spark.candidates import run_candidates
from laion_spark.config import load_config
from laion_spark.download import run_download
from laion_spark.extract import run_extract
from laion_spark.report import format_funnel
from laion_spark.score import run_score
from laion_spark.storage import is_catalog_lake, read_table, table_ref
from laion_spark.testing.sample_crawl import write_sample_crawl
from laion_spark.testing.server import serve_synthetic_images
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LAKE = "spark_catalog.laion_catalog_test"


def test_lake_names_tell_catalog_schemas_from_directories(tmp_path):
    assert is_catalog_lake("main.laion") and is_catalog_lake("spark_catalog.x_1")
    assert not is_catalog_lake("lake") and not is_catalog_lake("/data/lake") and not is_catalog_lake("s3a://b/lake")
    assert not is_catalog_lake("./a.b") and not is_catalog_lake("a.b.c")
    existing = tmp_path / "a.b"
    existing.mkdir()
    assert not is_catalog_lake(str(existing))
    assert table_ref("main.laion", "pairs") == "`main`.`laion`.`pairs`"
    assert table_ref("/data/lake", "pairs") == "delta.`/data/lake/pairs`"


@pytest.mark.slow
def test_whole_pipeline_into_managed_tables_of_a_catalog_schema(spark, tmp_path):
    tiny = ensure_tiny_clip(PROJECT_ROOT / ".cache" / "models" / "tiny-clip")
    server, base_url = serve_synthetic_images()
    try:
        write_sample_crawl(tmp_path / "crawl", base_url)
        config = load_config(
            PROJECT_ROOT / "laion_spark" / "demo" / "demo.yaml",
            [
                f"download.allowed_hosts=['{base_url.split('//', 1)[1]}']",
                "download.per_host_requests_per_s=0",
                f"clip.model_config={tiny['model_config']}",
                f"clip.pretrained={tiny['pretrained']}",
            ],
        )
        inputs = [str(tmp_path / "crawl" / "*")]
        extracted = run_extract(spark, config, LAKE, inputs)
        run_candidates(spark, config, LAKE)
        run_download(spark, config, LAKE)
        run_score(spark, config, LAKE)
        again = run_extract(spark, config, LAKE, inputs)
        candidates_again = run_candidates(spark, config, LAKE)
    finally:
        server.shutdown()

    for name in ("pairs", "ingest_log", "candidates", "images", "embeddings", "dataset", "stage_stats"):
        assert spark.catalog.tableExists(f"{LAKE}.{name}"), name
        assert spark.sql(f"DESCRIBE DETAIL {LAKE}.{name}").first()["format"] == "delta"
    pairs = spark.table(f"{LAKE}.pairs")
    assert pairs.count() == extracted.pairs_written > 0
    assert read_table(spark, LAKE, "dataset").count() > 0
    # Reruns are idempotent in a catalog too: every file was already ok, every key already a candidate.
    assert again.files_skipped == again.files_listed and pairs.count() == extracted.pairs_written
    assert dict((s, o) for s, _, o in candidates_again.steps)["dedup_against_lake"] == 0
    assert "score.above_threshold" in format_funnel(spark, LAKE)
