"""The `laion-spark` command: help text, and config errors reported as one clear line (no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from laion_spark.cli import build_parser, main

STAGES = ["extract", "candidates", "download", "score", "run", "funnel", "optimize"]


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_documents_common_options(stage, capsys):
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    out = capsys.readouterr().out
    for option in ("--lake", "--config", "--set"):
        assert option in out


def test_extract_help_documents_inputs_and_force(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    out = capsys.readouterr().out
    assert "--input" in out and "MANIFEST" in out and "--force" in out


def test_config_error_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip:\n  treshold: 0.3\n")
    code = main(["score", "--lake", str(tmp_path / "lake"), "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert "clip.treshold" in err and str(bad) in err
    assert "Traceback" not in err


def test_python_dash_m_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "laion_spark", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0
    assert "laion-spark" in result.stdout


def test_parser_requires_lake():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["candidates"])
