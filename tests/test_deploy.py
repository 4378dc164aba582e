"""The deployment files in deploy/ submit as they are: every stage, entry point, job file, config file and config
key they name exists, and the stages run in pipeline order with the GPU where score runs."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from laion_spark import jars
from laion_spark.cli import build_parser
from laion_spark.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
BUNDLE_DIR = ROOT / "deploy" / "databricks"
EMR_DIR = ROOT / "deploy" / "emr"
PIPELINE = ["extract", "candidates", "download", "score"]
# The nightly Databricks job also keeps the kNN index up to date after score.
BUNDLE_TASKS = [*PIPELINE, "index"]


def setup_cfg() -> configparser.ConfigParser:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    return setup


def console_scripts() -> dict[str, str]:
    lines = setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.replace(" ", "").split("=", 1) for line in lines)


def cli_commands() -> set[str]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(subparsers.choices)


def parse_cli(argv: list[str], where: str) -> argparse.Namespace:
    """Parse ``argv`` as `laion-spark` would; an unknown command or option fails the test with argparse's message."""
    assert argv and argv[0] in cli_commands(), f"{where}: `laion-spark {argv[0] if argv else ''}` is not a command"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `laion-spark {' '.join(argv)}` does not parse: {stderr.getvalue().strip()}")


def load_stage_config(args: argparse.Namespace, path: Path, where: str) -> Config:
    assert path.is_file(), f"{where}: --config {path.relative_to(ROOT)} does not exist"
    return load_config(path, args.overrides)  # raises ConfigError naming an unknown key or a wrong type


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def check_input_matches_manifest_prefix(args: argparse.Namespace, config: Config, where: str) -> None:
    for item in getattr(args, "inputs", None) or []:
        prefix = config.extract.manifest_prefix
        assert not prefix or scheme(item) == scheme(prefix), f"{where}: {item} vs manifest_prefix {prefix}"


# --- Databricks Asset Bundle --------------------------------------------------------------------------------


def bundle() -> dict:
    return yaml.safe_load((BUNDLE_DIR / "databricks.yml").read_text())


def sync_root(config: dict) -> Path:
    """The folder ${workspace.file_path} stands for: the bundle root, or the common ancestor of the synced paths."""
    roots = [BUNDLE_DIR.resolve()] + [(BUNDLE_DIR / p).resolve() for p in config.get("sync", {}).get("paths", [])]
    return Path(os.path.commonpath(roots))


def resolve(value: str, config: dict) -> str:
    """Substitute ${var.*} (from the variables' defaults, or a stand-in for a required one) and ${workspace.file_path}."""
    variables = config.get("variables", {})

    def variable(match: re.Match) -> str:
        name = match[1]
        assert name in variables, f"databricks.yml: ${{var.{name}}} is not declared under variables"
        return str(variables[name].get("default", f"s3://required-variable/{name}"))

    value = re.sub(r"\$\{var\.([\w-]+)\}", variable, value)
    value = value.replace("${workspace.file_path}", str(sync_root(config)))
    assert "${" not in value, f"databricks.yml: unresolved reference in {value!r}"
    return value


def bundle_tasks() -> list[dict]:
    (job,) = bundle()["resources"]["jobs"].values()
    return job["tasks"]


def task_command(task: dict, config: dict) -> list[str]:
    """The `laion-spark` argv a task runs, after checking the package, entry point or job file it names."""
    where = f"databricks.yml task {task['task_key']}"
    if "python_wheel_task" in task:
        wheel_task = task["python_wheel_task"]
        assert wheel_task["package_name"] == setup_cfg()["metadata"]["name"], where
        assert console_scripts().get(wheel_task["entry_point"]) == "laion_spark.cli:main", where
        return [resolve(p, config) for p in wheel_task.get("parameters", [])]
    python_task = task.get("spark_python_task")
    assert python_task, f"{where}: expected a python_wheel_task or a spark_python_task"
    job_file = (BUNDLE_DIR / python_task["python_file"]).resolve()
    return [job_stage(job_file, where), *[resolve(p, config) for p in python_task.get("parameters", [])]]


def job_stage(job_file: Path, where: str) -> str:
    """The stage a jobs/<stage>.py entry point runs (it passes its own name to the CLI)."""
    assert job_file.is_file() and job_file.parent == ROOT / "jobs", f"{where}: {job_file} is not a file in jobs/"
    assert f'main(["{job_file.stem}", *sys.argv[1:]])' in job_file.read_text(), f"{where}: {job_file.name}"
    return job_file.stem


def test_bundle_tasks_are_cli_commands_with_options_and_config_keys_that_exist():
    config = bundle()
    synced = [(BUNDLE_DIR / p).resolve() for p in config.get("sync", {}).get("paths", [])]
    for task in bundle_tasks():
        where = f"databricks.yml task {task['task_key']}"
        args = parse_cli(task_command(task, config), where)
        assert args.stage == task["task_key"], f"{where} runs `laion-spark {args.stage}`"
        assert args.config, f"{where}: no --config"
        config_path = Path(args.config)
        assert any(config_path.is_relative_to(p) for p in synced), f"{where}: {args.config} is not synced"
        stage_config = load_stage_config(args, config_path, where)
        check_input_matches_manifest_prefix(args, stage_config, where)


def test_bundle_runs_the_stages_in_pipeline_order_and_scores_on_a_gpu_cluster():
    tasks = {task["task_key"]: task for task in bundle_tasks()}
    assert list(tasks) == BUNDLE_TASKS
    for previous, stage in zip(BUNDLE_TASKS, BUNDLE_TASKS[1:], strict=False):
        assert [d["task_key"] for d in tasks[stage].get("depends_on", [])] == [previous]
    (job,) = bundle()["resources"]["jobs"].values()
    assert job["schedule"]["quartz_cron_expression"].split()[3:5] == ["*", "*"], "the job should run nightly"
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    for stage, task in tasks.items():
        cluster = clusters[task["job_cluster_key"]]
        gpu_conf = cluster.get("spark_conf", {})
        if stage == "score":
            assert "gpu-ml" in cluster["spark_version"], "score needs an ML GPU runtime (torch with CUDA)"
            assert float(gpu_conf["spark.task.resource.gpu.amount"]) > 0
            assert float(gpu_conf["spark.executor.resource.gpu.amount"]) >= 1
        else:
            assert "gpu" not in cluster["spark_version"], f"{stage} would hold GPUs it does not use"


def test_bundle_installs_the_wheel_it_builds_from_the_repository():
    config = bundle()
    (artifact,) = config["artifacts"].values()
    project = (BUNDLE_DIR / artifact["path"]).resolve()
    assert artifact["type"] == "whl" and (project / "setup.cfg").is_file()
    assert re.search(r"pip wheel --no-deps (-w|--wheel-dir) dist \.$", artifact["build"])
    extras = setup_cfg()["options.extras_require"]
    clip = {Requirement(r).name: Requirement(r) for name in ("clip", "index") for r in extras[name].split()}
    for task in bundle_tasks():
        libraries = task.get("libraries", [])
        wheels = [(BUNDLE_DIR / lib["whl"]).resolve() for lib in libraries if "whl" in lib]
        assert wheels == [project / "dist" / "*.whl"], f"task {task['task_key']} must install the built wheel"
        for lib in libraries:
            if "pypi" in lib:
                extra = Requirement(lib["pypi"]["package"])
                assert extra.name in clip and extra.specifier == clip[extra.name].specifier, extra
        if task["task_key"] == "score":
            assert any("pypi" in lib and "open_clip" in lib["pypi"]["package"] for lib in libraries)
        if task["task_key"] == "index":
            assert any("pypi" in lib and "faiss" in lib["pypi"]["package"] for lib in libraries)


# --- EMR steps and bootstrap action -------------------------------------------------------------------------

SPARK_SUBMIT_FLAGS = {"--verbose", "--supervise"}
CODE_URI = re.compile(r"s3://[^/]+/laion_spark/(.+)")  # the repository's files, uploaded under one prefix


def emr_steps() -> list[dict]:
    return json.loads((EMR_DIR / "steps.json").read_text())


def split_spark_submit(args: list[str]) -> tuple[dict[str, list[str]], str, list[str]]:
    """spark-submit's own options (each may repeat), the application file, and the application's arguments."""
    options: dict[str, list[str]] = {}
    i = 0
    while args[i].startswith("--"):
        if args[i] in SPARK_SUBMIT_FLAGS:
            options.setdefault(args[i], []).append("")
            i += 1
        else:
            options.setdefault(args[i], []).append(args[i + 1])
            i += 2
    return options, args[i], args[i + 1 :]


def repo_file(uri: str, where: str) -> Path:
    match = CODE_URI.fullmatch(uri)
    assert match, f"{where}: {uri} is not under the s3://<bucket>/laion_spark/ prefix the README uploads to"
    path = ROOT / match[1]
    assert path.is_file(), f"{where}: {uri} names {match[1]}, which is not in the repository"
    return path


def bootstrap_python() -> str:
    (python,) = re.findall(r"^PYTHON=(\S+)$", (EMR_DIR / "bootstrap.sh").read_text(), re.M)
    return python


def test_emr_steps_run_job_files_with_options_and_config_keys_that_exist():
    for step in emr_steps():
        where = f"steps.json step {step['Name']!r}"
        assert step["Type"].lower() == "spark" and step["ActionOnFailure"] == "CANCEL_AND_WAIT", where
        options, application, app_args = split_spark_submit(step["Args"])
        stage = job_stage(repo_file(application, where), where)
        args = parse_cli([stage, *app_args], where)
        shipped = {
            Path(uri).name: repo_file(uri, where) for value in options.get("--files", []) for uri in value.split(",")
        }
        assert args.config in shipped, f"{where}: --config {args.config} is not one of the --files it ships"
        config = load_stage_config(args, shipped[args.config], where)
        check_input_matches_manifest_prefix(args, config, where)

        assert options["--deploy-mode"] == ["cluster"], where
        # spark-submit starts no session, so the one laion_spark builds applies the config's master: YARN's.
        assert config.spark.master == "yarn", f"{where}: {args.config} must set spark.master: yarn"
        delta = f"io.delta:delta-spark_{jars.SCALA_BINARY}:{jars.DELTA_VERSION}"
        assert delta in ",".join(options["--packages"]).split(","), f"{where}: --packages {delta}"
        assert config.spark.conf.get("spark.jars.packages", delta) == delta, where
        confs = dict(c.split("=", 1) for c in options.get("--conf", []))
        assert confs.get("spark.pyspark.python") == bootstrap_python(), f"{where}: not the Python bootstrap.sh set up"


def test_emr_steps_run_the_stages_in_pipeline_order():
    stages = [Path(split_spark_submit(step["Args"])[1]).stem for step in emr_steps()]
    assert stages == PIPELINE


def test_bootstrap_script_is_valid_bash_and_installs_the_wheel_with_pip():
    script = EMR_DIR / "bootstrap.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    assert re.search(r'"\$PYTHON" -m pip "\$\{args\[@\]\}"', text)
    assert "pyspark" not in re.sub(r"#.*", "", text), "the bootstrap must leave EMR's own Spark alone"


def test_readme_documents_every_deployment_file():
    readme = (ROOT / "README.md").read_text()
    for needle in (
        "## Running on Databricks, EMR and spark-submit",
        "deploy/databricks/databricks.yml",
        "databricks bundle deploy",
        "databricks bundle run",
        "aws emr add-steps",
        "--steps file://deploy/emr/steps.json",
        "deploy/emr/bootstrap.sh",
        "SPARK_REMOTE=sc://",
    ):
        assert needle in readme, needle
