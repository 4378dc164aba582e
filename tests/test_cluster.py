"""It runs on Spark: the CLI and the whole demo pipeline on a real standalone cluster (master + worker JVMs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import standalone_cluster
from demo_reference import assert_demo_consumables, assert_demo_funnel_is_the_reference, assert_demo_progress

from laion_spark.testing.archives import WatPage, write_wat

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def master_url(tmp_path_factory):
    with standalone_cluster(tmp_path_factory.mktemp("cluster")) as url:
        yield url


def test_extract_cli_on_standalone_cluster(master_url, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in range(3):
        pages = [
            WatPage(f"http://site{n}.example/p{i}.html", [(f"/img/{i}.jpg", f"a photo number {i} of file {n}")])
            for i in range(20)
        ]
        write_wat(inputs / f"part-{n}.warc.wat.gz", pages)
    lake = tmp_path / "lake"
    master = f"spark.master={master_url}"
    result = _cli(
        "-m", "laion_spark", "extract", "--lake", str(lake), "--input", str(inputs / "*.wat.gz"), "--set", master
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check = _cli(
        "-c",
        "import sys; from laion_spark.config import SparkConfig; from laion_spark.session import build_local_session;"
        f"s = build_local_session(SparkConfig(master='{master_url}'));"
        f"print('PAIRS', s.read.format('delta').load('{lake}/pairs').count());"
        f"print('APPS', s.sparkContext.master)",
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "PAIRS 60" in check.stdout
    assert f"APPS {master_url}" in check.stdout


def test_whole_demo_pipeline_on_standalone_cluster(master_url, tmp_path):
    result = _cli(
        "-m", "laion_spark.demo", "--workdir", str(tmp_path / "demo"), "--set", f"spark.master={master_url}",
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert_demo_funnel_is_the_reference(result.stdout)
    assert_demo_consumables(result.stdout, tmp_path / "demo")
    assert_demo_progress(result.stdout)
    assert (tmp_path / "demo" / "lake" / "dataset" / "_delta_log").is_dir()
