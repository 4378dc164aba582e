"""Shared fixtures: one real local SparkSession with Delta for the whole test run, a fresh lake per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_SAMPLES = PROJECT_ROOT.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from laion_spark.config import SparkConfig
    from laion_spark.session import build_local_session

    session = build_local_session(
        SparkConfig(
            master="local[2]",
            app_name="laion_spark-tests",
            shuffle_partitions=2,
            conf={
                "spark.ui.enabled": "false",
                "spark.driver.memory": "2g",
                "spark.databricks.delta.snapshotPartitions": "2",
                "spark.ui.showConsoleProgress": "false",
                # Managed tables of catalog lakes (tests/test_catalog_lake.py) go here, not into the checkout.
                "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse")),
            },
        )
    )
    yield session
    session.stop()


@pytest.fixture
def lake(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


@pytest.fixture
def warcio_samples() -> Path:
    directory = SHARED_SAMPLES / "warcio"
    if not directory.is_dir():
        pytest.skip("../shared/samples/warcio is absent")
    return directory


@pytest.fixture(scope="session")
def demo_lake(spark, tmp_path_factory):
    """The lake `make demo` builds (the bundled sample crawl through every stage, the tiny CLIP model), built
    once per test run and shared by the tests of what comes after the pipeline (exports, index, search, serve).
    Tests read it and write their outputs elsewhere; the returned config holds the tiny model's paths."""
    from laion_spark.demo.__main__ import run_demo

    workdir = tmp_path_factory.mktemp("demo")
    # The pipeline only: the tests of exports, index and search run those themselves, each with its own settings.
    return run_demo(workdir, models_dir=PROJECT_ROOT / ".cache" / "models", outputs=False)
