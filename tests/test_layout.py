"""The package reads as the pipeline, and the production code carries no test or demo fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from laion_spark.cli import build_parser
from laion_spark.schemas import SCHEMAS

PACKAGE = Path(__file__).resolve().parent.parent / "laion_spark"
FIXTURE_PACKAGES = ("laion_spark.testing", "laion_spark.demo")
# The stages whose CLI name, package and output table are one word (score writes embeddings and dataset).
STAGE_TABLES = {"extract": "pairs", "candidates": "candidates", "download": "images", "score": "embeddings"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def production_modules() -> list[Path]:
    fixtures = {PACKAGE / "testing", PACKAGE / "demo"}
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not any(parent in fixtures for parent in p.parents)]


@pytest.mark.parametrize("path", production_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_production_modules_import_no_test_or_demo_fixture(path: Path):
    leaks = {name for name in imported_modules(path) if name.startswith(FIXTURE_PACKAGES)}
    assert not leaks, f"{path.relative_to(PACKAGE)} imports {sorted(leaks)}"


def test_each_stage_is_a_cli_command_a_package_and_a_table():
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse's own layout
    for stage, table in STAGE_TABLES.items():
        assert stage in commands
        assert (PACKAGE / stage / "stage.py").is_file(), f"the {stage} stage lives in laion_spark/{stage}/stage.py"
        assert table in SCHEMAS
    assert "candidates" in SCHEMAS and {"embeddings", "dataset"} <= set(SCHEMAS)


CLASSIC_ONLY = {"sparkContext", "_jvm", "_jsc", "parallelize", "rdd", "DeltaTable", "persist", "cache"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_uses_classic_only_spark_apis(path: Path):
    """Spark Connect (Databricks serverless, shared clusters) has no SparkContext, JVM gateway or RDDs, refuses
    persist on serverless, and has no DeltaTable API without Delta Connect: the library uses none of them."""
    tree = ast.parse(path.read_text(), str(path))
    attributes = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    # functools.cache is a memo, not DataFrame.cache
    used = {n.attr for n in attributes if not (isinstance(n.value, ast.Name) and n.value.id == "functools")}
    used &= CLASSIC_ONLY
    used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} & (CLASSIC_ONLY - {"cache"})
    used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names} & {
        "DeltaTable"
    }
    assert not used, f"{path.relative_to(PACKAGE)} uses {sorted(used)}"
