"""What users install: the Python the package promises, and the demo running from a built wheel."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from demo_reference import assert_demo_consumables, assert_demo_funnel_is_the_reference, assert_demo_progress

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def python_requires() -> str:
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    return setup["options"]["python_requires"].strip()


def test_code_runs_on_the_python_that_setup_cfg_promises():
    minimum = re.fullmatch(r">=\s*(3\.\d+)", python_requires())
    assert minimum, f"python_requires should be a plain lower bound, got {python_requires()!r}"
    vermin = Path(sys.executable).with_name("vermin")
    result = subprocess.run(
        [str(vermin), "--no-tips", "--violations", f"-t={minimum.group(1)}-", "laion_spark", "jobs"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_demo_runs_from_an_installed_wheel_outside_the_checkout(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(PROJECT_ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("laion_spark-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    # As a user who ran `python -m laion_spark.jars fetch` once: the jars are in a cache outside the package.
    jars = PROJECT_ROOT / ".cache" / "jars"
    env = dict(os.environ, PYTHONPATH=str(site), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    env["LAION_SPARK_JARS_DIR"] = str(jars)
    result = subprocess.run(
        [sys.executable, "-m", "laion_spark.demo", "--workdir", str(tmp_path / "demo"),
         "--models-dir", str(PROJECT_ROOT / ".cache" / "models")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert f"from {site / 'laion_spark'}" in result.stdout, "the demo must run the installed copy, not the checkout"
    assert_demo_funnel_is_the_reference(result.stdout)
    assert_demo_consumables(result.stdout, tmp_path / "demo")
    assert_demo_progress(result.stdout)
