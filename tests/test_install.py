"""What `pip install laion-spark` does to an environment that already has Spark and torch: it leaves them alone.

Databricks Runtime and EMR bring their own pyspark (and the ML runtimes their own torch); a wheel that pins them
would replace the cluster's copies. The install test below builds our wheel, puts it in a wheelhouse beside small
stand-in wheels of every dependency (nothing is downloaded), and installs it into a fresh virtualenv that already
holds a runtime's pyspark, delta-spark, torch and friends at versions other than the ones `make` pins.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from laion_spark.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent

# What a managed runtime already has, as a fresh venv gets it before our wheel arrives: every version inside
# setup.cfg's ranges and different from constraints.txt's pins (which the wheelhouse offers as the newer choice).
RUNTIME_VERSIONS = {
    "pyspark": "4.0.0",
    "delta-spark": "4.0.0",
    "torch": "2.5.1",
    "torchvision": "0.20.1",
    "pandas": "1.5.3",
    "numpy": "1.23.5",
    "pyarrow": "14.0.1",
}
# Stand-ins that are importable packages, so that a replaced copy would show in its __version__ too.
IMPORTABLE = {"pyspark": "pyspark", "delta-spark": "delta", "torch": "torch"}


def setup_cfg() -> configparser.ConfigParser:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    return setup


def requirements(section: str, key: str) -> list[Requirement]:
    return [Requirement(line) for line in setup_cfg()[section][key].strip().splitlines() if line.strip()]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def stage_names() -> set[str]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(subparsers.choices)


# --- the ranges and the pins agree ---------------------------------------------------------------------------


def test_core_requirements_leave_spark_delta_and_torch_to_the_runtime():
    core = {canonicalize_name(r.name) for r in requirements("options", "install_requires")}
    assert not core & {"pyspark", "delta-spark", "torch", "torchvision", "open-clip-torch"}
    extras = setup_cfg()["options.extras_require"]
    spark = {canonicalize_name(Requirement(line).name) for line in extras["spark"].split()}
    clip = {canonicalize_name(Requirement(line).name) for line in extras["clip"].split()}
    assert spark == {"pyspark", "delta-spark"}
    assert clip == {"torch", "torchvision", "open-clip-torch"}
    index = {canonicalize_name(Requirement(line).name) for line in extras["index"].split()}
    assert index == {"faiss-cpu"}
    assert not core & index  # the pipeline's stages run without faiss; only index, search and serve need it
    report = {canonicalize_name(Requirement(line).name) for line in extras["report"].split()}
    assert report == {"jinja2", "matplotlib"}
    assert not core & {"matplotlib"}  # only `laion-spark report` and the notebooks' plots need it
    everything = spark | clip | index | report
    assert {canonicalize_name(r.name) for r in requirements("options.extras_require", "all")} == everything


def test_every_requirement_is_a_range_and_its_pin_lies_inside_it():
    pins = constraints()
    reqs = (
        requirements("options", "install_requires")
        + requirements("options.extras_require", "all")
        + requirements("options.extras_require", "dev")
    )
    for req in reqs:
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req} pins a version"
        pinned = pins.get(canonicalize_name(req.name))
        assert pinned, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(pinned, prereleases=True), f"constraints.txt pins {req.name}=={pinned}"


def test_make_installs_the_pinned_set_the_issue_names():
    pins = constraints()
    for name, version in {
        "pyspark": "4.0.1",
        "delta-spark": "4.0.1",
        "torch": "2.14.1",
        "torchvision": "0.29.1",
    }.items():
        assert pins[name] == version
    makefile = (ROOT / "Makefile").read_text()
    spellings = {"constraints.txt"} | {
        f"$({var})" for var in re.findall(r"^(\w+)\s*:?=\s*constraints\.txt\s*$", makefile, re.M)
    }
    stamp = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert stamp, "Makefile: no $(STAMP) target"
    assert spellings & set(stamp[1].split()), "the $(STAMP) target must depend on constraints.txt"
    installs = [line for line in stamp[2].splitlines() if "pip install" in line and "-e" in line]
    assert any(f"-c {s} -e '.[all,dev]'" in line for line in installs for s in spellings), installs


def test_runtime_versions_in_the_install_test_lie_inside_the_ranges_and_differ_from_the_pins():
    ranges = {
        canonicalize_name(r.name): r.specifier
        for r in requirements("options", "install_requires") + requirements("options.extras_require", "all")
    }
    pins = constraints()
    for name, version in RUNTIME_VERSIONS.items():
        assert ranges[name].contains(version), f"{name} {version} is outside setup.cfg's {ranges[name]}"
        assert pins[name] != version


# --- the wheel in a fresh environment that already has a runtime ----------------------------------------------


def write_wheel(directory: Path, name: str, version: str, files: dict[str, bytes] | None = None) -> Path:
    """A minimal, valid py3-none-any wheel: ``files`` (path -> bytes) plus METADATA, WHEEL and RECORD."""
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    info = f"{stem}.dist-info"
    contents = dict(files or {})
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: laion_spark-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
    return wheel


def stand_in(directory: Path, name: str, version: str) -> Path:
    """A stand-in distribution: importable (with ``__version__``) where IMPORTABLE says so, else metadata only."""
    package = IMPORTABLE.get(canonicalize_name(name))
    files = {f"{package}/__init__.py": f'__version__ = "{version}"\n'.encode()} if package else {}
    return write_wheel(directory, name, version, files)


def repackaged(directory: Path, name: str) -> Path:
    """The installed distribution ``name`` (from this venv) as a wheel, for what ``laion-spark --help`` imports."""
    dist = importlib.metadata.distribution(name)
    files = {
        str(path): Path(dist.locate_file(path)).read_bytes()
        for path in dist.files or []
        if ".dist-info" not in str(path) and "__pycache__" not in path.parts and not str(path).startswith("..")
    }
    return write_wheel(directory, dist.metadata["Name"], dist.version, files)


def build_our_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the checkout, so a stale build/ or egg-info in the working tree cannot leak in."""
    skip = {
        ".venv",
        ".git",
        ".cache",
        "build",
        "dist",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "spark-warehouse",
    }
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=lambda _d, names: [n for n in names if n in skip or n.endswith(".egg-info")])
    out = tmp_path / "ourwheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "-q", "wheel", "--no-deps",
         "--no-build-isolation", "-w", str(out), str(source)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    (wheel,) = out.glob("laion_spark-*.whl")
    return wheel


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--isolated", "--disable-pip-version-check", *args],
        capture_output=True, text=True, env=clean_env(), cwd=venv.parent, check=False,
    )  # fmt: skip


def installed(venv: Path) -> dict[str, str]:
    result = pip(venv, "list", "--format", "json")
    assert result.returncode == 0, result.stderr
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(result.stdout)}


@dataclass
class FreshInstall:
    wheel: Path
    venv: Path
    before: dict[str, str]  # pip list after the runtime's packages went in
    after: dict[str, dict[str, str]]  # pip list after each of `laion_spark` and `laion_spark[all]`
    outputs: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env=clean_env(), cwd=self.venv.parent, check=False)


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory) -> FreshInstall:
    """A fresh venv holding a runtime's pyspark/delta-spark/torch/pandas stand-ins, then our wheel, then [all]."""
    tmp_path = tmp_path_factory.mktemp("install")
    ours = build_our_wheel(tmp_path)
    # The wheelhouse: our wheel, and every dependency at the version `make` pins (what PyPI would offer).
    wheelhouse, runtime = tmp_path / "wheelhouse", tmp_path / "runtime"
    wheelhouse.mkdir()
    runtime.mkdir()
    shutil.copy(ours, wheelhouse)
    pins = constraints()
    for req in requirements("options", "install_requires") + requirements("options.extras_require", "all"):
        if canonicalize_name(req.name) == "pyyaml":
            repackaged(wheelhouse, req.name)  # the real one: `laion-spark --help` reads no config, but imports yaml
        else:
            stand_in(wheelhouse, req.name, pins[canonicalize_name(req.name)])
    for name, version in RUNTIME_VERSIONS.items():
        stand_in(runtime, name, version)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
    result = pip(venv, "install", "-q", "--no-index", *map(str, sorted(runtime.glob("*.whl"))))
    assert result.returncode == 0, result.stderr
    before, after, outputs = installed(venv), {}, {}
    for target in ("laion_spark", "laion_spark[all]"):
        result = pip(venv, "install", "--no-index", "--find-links", str(wheelhouse), target)
        assert result.returncode == 0, result.stdout + result.stderr
        after[target], outputs[target] = installed(venv), result.stdout
    return FreshInstall(ours, venv, before, after, outputs)


@pytest.mark.slow
def test_installing_the_wheel_keeps_the_runtimes_spark_delta_torch_and_pandas(fresh_install):
    assert {name: fresh_install.before[name] for name in RUNTIME_VERSIONS} == RUNTIME_VERSIONS
    for target, after in fresh_install.after.items():
        kept = {name: after[name] for name in RUNTIME_VERSIONS}
        assert kept == RUNTIME_VERSIONS, f"pip install {target} replaced them:\n{fresh_install.outputs[target]}"
        assert after["laion-spark"] == fresh_install.wheel.name.split("-")[1]
    assert "open-clip-torch" not in fresh_install.after["laion_spark"], "the core install must not pull in [clip]"
    assert "open-clip-torch" in fresh_install.after["laion_spark[all]"]
    python = str(fresh_install.venv / "bin" / "python")
    for name, package in IMPORTABLE.items():
        probe = fresh_install.run(python, "-c", f"import {package}; print({package}.__version__)")
        assert probe.stdout.strip() == RUNTIME_VERSIONS[name], probe.stderr


@pytest.mark.slow
def test_wheel_holds_the_package_and_its_demo_config_and_no_tests(fresh_install):
    names = zipfile.ZipFile(fresh_install.wheel).namelist()
    dist_info = fresh_install.wheel.name.split("-py3")[0] + ".dist-info"
    assert {n.split("/", 1)[0] for n in names} == {"laion_spark", dist_info}
    assert "laion_spark/demo/demo.yaml" in names
    metadata = zipfile.ZipFile(fresh_install.wheel).read(f"{dist_info}/METADATA").decode()
    assert f"Requires-Python: {setup_cfg()['options']['python_requires'].strip()}" in metadata
    where = fresh_install.run(
        str(fresh_install.venv / "bin" / "python"), "-c", "import laion_spark; print(laion_spark.__file__)"
    )
    site = Path(where.stdout.strip()).parent.parent
    assert site.is_relative_to(fresh_install.venv), f"imported laion_spark from {site}, not the fresh venv"
    assert (site / "laion_spark" / "demo" / "demo.yaml").is_file()
    assert not (site / "tests").exists()


@pytest.mark.slow
def test_console_script_help_lists_the_stages_with_only_core_dependencies(fresh_install):
    """The stand-ins import but do nothing, so `--help` must not import Spark, torch or pandas at module level."""
    result = fresh_install.run(str(fresh_install.venv / "bin" / "laion-spark"), "--help")
    assert result.returncode == 0, (
        "`laion-spark --help` failed with only stand-in dependencies; the CLI must import Spark-dependent "
        f"modules inside its handlers, not at module level:\n{result.stderr[-2000:]}"
    )
    for stage in stage_names():
        assert stage in result.stdout, f"`laion-spark --help` does not list {stage}"
