"""Every notebook in notebooks/ runs top to bottom against the demo's lake, in a real Jupyter kernel (nbclient), so a
broken notebook fails the suite.

The kernel is a separate process with its own local SparkSession (this venv's Python: the native ``python3``
kernel of the ipykernel installed here); the notebooks read the lake and config from ``LAION_SPARK_LAKE`` and
``LAION_SPARK_CONFIG``. The shared ``demo_lake`` is only read: tune_filters re-cuts a copy of it.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from laion_spark.schemas import DATASET
from laion_spark.storage import table_ref

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# Every kind of cut once, fewer of each than the notebook's defaults (each re-cut rewrites the copy's dataset).
QUICKER_PARAMETERS = {
    "tune_filters.ipynb": "TOP_K_PERCENTS = [30]\nCHAINS = [['threshold', 'near_dup', 'semdedup']]\n",
}
ALL_NOTEBOOKS = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_env(demo_lake, tmp_path_factory) -> dict[str, str]:
    """The environment of the notebooks' kernel: the demo lake, and a small local session's config."""
    config = {
        "spark": {
            "master": "local[2]",
            "shuffle_partitions": 2,
            "conf": {
                "spark.driver.memory": "1g",
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.databricks.delta.snapshotPartitions": "2",
                "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("notebook-warehouse")),
            },
        },
        "clip": {"threshold": demo_lake.config.clip.threshold},
    }
    path = tmp_path_factory.mktemp("notebook-config") / "notebook.yaml"
    path.write_text(yaml.safe_dump(config))
    venv_bin = str(Path(sys.executable).parent)
    return {
        "LAION_SPARK_LAKE": demo_lake.lake,
        "LAION_SPARK_CONFIG": str(path),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }


def _execute(name: str, env: dict[str, str], monkeypatch) -> tuple[nbformat.NotebookNode, float]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    if name in QUICKER_PARAMETERS:  # as papermill does: a cell after the parameters cell overrides them
        first_code = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
        notebook.cells.insert(first_code + 1, nbformat.v4.new_code_cell(QUICKER_PARAMETERS[name]))
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    started = time.monotonic()
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
    return notebook, time.monotonic() - started


def _outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def _text(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(output.get("text", "") for output in _outputs(notebook) if output["output_type"] == "stream")


def _dataset_version(spark, lake: str) -> int:
    return spark.sql(f"DESCRIBE HISTORY {table_ref(lake, DATASET)} LIMIT 1").first()["version"]


def test_every_notebook_is_tested() -> None:
    assert set(ALL_NOTEBOOKS) >= {"explore_lake.ipynb", "tune_filters.ipynb"}, ALL_NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_runs_against_the_demo_lake(name: str, spark, demo_lake, kernel_env, monkeypatch) -> None:
    version_before = _dataset_version(spark, demo_lake.lake)
    notebook, seconds = _execute(name, kernel_env, monkeypatch)
    print(f"{name}: {seconds:.1f}s")
    outputs = _outputs(notebook)
    assert not [output for output in outputs if output["output_type"] == "error"]
    # No notebook writes the user's lake (tune_filters re-cuts a copy of it).
    assert _dataset_version(spark, demo_lake.lake) == version_before
    if name == "explore_lake.ipynb":
        assert re.search(r"^extract\.\w+", _text(notebook), re.M), "the funnel is printed"
        pngs = [output["data"]["image/png"] for output in outputs if "image/png" in output.get("data", {})]
        assert pngs and base64.b64decode(pngs[0]).startswith(b"\x89PNG"), "the similarity histogram is drawn"
        grids = [output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {})]
        assert len(grids) >= 2 and all("<img" in grid for grid in grids), "the thumbnail grids show images"
    if name == "tune_filters.ipynb":
        text = _text(notebook)
        for label in ("threshold", "top 30%", "threshold -> near_dup -> semdedup"):
            assert label in text, (label, text[-2000:])
        assert "scored pairs kept" in text and "dataset.near_dup" in text and "dataset.semdedup" in text
        grids = [output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {})]
        assert len(grids) >= 3 and any("<img" in grid for grid in grids), "sample images for the cuts"
