"""`laion-spark run`: the stages in order under one run id, safe to rerun after a failure, one run per lake at a time.

Every run here is real: local Spark and Delta, the sample crawl of the demo (written once for the module), its
images drawn by a loopback server that counts every request, and the tiny CLIP model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import laion_spark.download.stage as download_stage
from laion_spark.cli import build_parser, main
from laion_spark.config import Config, load_config
from laion_spark.run import LakeLocked, LockLost, RunLock, run_pipeline
from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, INGEST_LOG, PAIRS, RUN_LOCK
from laion_spark.storage import read_funnel, read_table, table_exists, table_ref
from laion_spark.testing.sample_crawl import write_sample_crawl
from laion_spark.testing.server import ImageServer, serve_synthetic_images
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "laion_spark" / "demo" / "demo.yaml"
FLOW_TABLES = [PAIRS, CANDIDATES, IMAGES, EMBEDDINGS, DATASET]


@dataclass
class Site:
    """The sample crawl and the server of its images, shared by the module's tests."""

    server: ImageServer
    crawl: Path
    overrides: list[str]

    @property
    def inputs(self) -> list[str]:
        return [str(self.crawl / "*")]

    @property
    def small_input(self) -> str:
        """One small archive of the crawl: for runs that only need to run, not to find much."""
        return str(self.crawl / "sample-extra.warc")

    def config(self) -> Config:
        return load_config(DEMO_CONFIG, self.overrides)

    def cli_options(self) -> list[str]:
        options = ["--config", str(DEMO_CONFIG)]
        for override in self.overrides:
            options += ["--set", override]
        return options

    def hits(self) -> Counter[str]:
        return self.server.image_hits()  # robots.txt and TDMRep: once per worker, cached across runs


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    server, base_url = serve_synthetic_images(host="127.0.0.1", port=0)
    crawl = tmp_path_factory.mktemp("run-crawl")
    write_sample_crawl(crawl, base_url)
    tiny = ensure_tiny_clip(PROJECT_ROOT / ".cache" / "models" / "tiny-clip")
    overrides = [f"download.allowed_hosts=['{urlsplit(base_url).netloc}']", "download.per_host_requests_per_s=0"]
    overrides += [f"clip.{key}={value}" for key, value in tiny.items()]
    yield Site(server, crawl, overrides)
    server.shutdown()


def _uids(spark, lake: str, table: str) -> list[str]:
    return sorted(row.uid for row in read_table(spark, lake, table).select("uid").collect())


def _latest_version(spark, lake: str, table: str) -> int:
    return spark.sql(f"DESCRIBE HISTORY {table_ref(lake, table)} LIMIT 1").first()["version"]


def _steps(spark, lake: str, run_id: str) -> dict[str, tuple[int, int]]:
    return {
        f"{stage}.{step}": (rows_in, rows_out) for stage, step, rows_in, rows_out in read_funnel(spark, lake, run_id)
    }


def _reasons(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("laion-spark run:")]


def _progress(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[")]


@pytest.mark.slow
def test_rerun_after_a_failure_mid_download_continues_and_matches_one_clean_run(
    spark, site: Site, tmp_path: Path, monkeypatch, capsys
):
    config = site.config()
    clean_lake = str(tmp_path / "clean")
    before = site.hits()
    clean = run_pipeline(spark, config, clean_lake, site.inputs)
    assert clean.ok, clean.failure
    clean_hits = site.hits() - before

    # The driver dies mid-download: images were fetched and written, the stage's counters were not.
    lake = str(tmp_path / "lake")
    write_images = download_stage.append

    def write_then_die(df, lake_, name):
        write_images(df, lake_, name)
        raise RuntimeError("injected: the driver died after writing images")

    monkeypatch.setattr(download_stage, "append", write_then_die)
    capsys.readouterr()
    before = site.hits()
    code = main(["run", "--lake", lake, "--input", *site.inputs, *site.cli_options()])
    first_hits = site.hits() - before
    out, err = capsys.readouterr()
    monkeypatch.undo()

    assert code == 1
    assert _reasons(err) == [
        "laion-spark run: stage download failed: RuntimeError: injected: the driver died after writing images"
    ]
    assert "Traceback" not in err
    progress = _progress(out)
    assert progress[-1].startswith("[3/4] download: failed after")
    assert any(line.startswith("[2/4] candidates: done in") for line in progress)
    failed_run_id = next(line for line in out.splitlines() if line.startswith("run ")).split()[1]
    assert {"extract", "candidates"} <= {key.split(".")[0] for key in _steps(spark, lake, failed_run_id)}
    assert all(table_exists(spark, lake, name) for name in (PAIRS, CANDIDATES, IMAGES))
    assert not table_exists(spark, lake, EMBEDDINGS) and not table_exists(spark, lake, DATASET)
    assert RunLock(spark, lake, "probe").holder() is None, "a failed run releases the lake"
    # The stage's own dedup is per task and in flight only, so a URL may be requested more than once per run.
    assert set(first_hits) == set(clean_hits), "the failed run fetched what a clean run fetches"

    before = site.hits()
    rerun = run_pipeline(spark, config, lake, site.inputs)
    assert rerun.ok, rerun.failure
    assert site.hits() - before == Counter(), "the rerun fetched no URL again"
    ingest_runs = {row.run_id for row in read_table(spark, lake, INGEST_LOG).select("run_id").distinct().collect()}
    assert ingest_runs == {failed_run_id}, "the rerun extracted no file again"
    steps = _steps(spark, lake, rerun.run_id)
    assert steps["extract.files_not_yet_ok"] == (3, 0)
    assert steps["candidates.dedup_against_lake"][1] == 0
    assert steps["download.to_fetch"][1] == 0
    assert steps["score.scored"][1] > 0, "scoring, which never ran, runs now"

    for table in FLOW_TABLES:
        assert _uids(spark, lake, table) == _uids(spark, clean_lake, table), table
    statuses = sorted(tuple(r) for r in read_table(spark, lake, IMAGES).select("uid", "status").collect())
    assert statuses == sorted(tuple(r) for r in read_table(spark, clean_lake, IMAGES).select("uid", "status").collect())


def test_a_second_run_is_refused_while_another_holds_the_lake(spark, site: Site, tmp_path: Path, capsys):
    lake = str(tmp_path / "lake")
    first = RunLock(spark, lake, "run-A")
    first.acquire()
    capsys.readouterr()
    code = main(["run", "--lake", lake, "--input", *site.inputs, *site.cli_options()])
    out, err = capsys.readouterr()
    assert code == 3
    [reason] = _reasons(err)
    assert f"the lake {lake} is held by run run-A (host " in reason
    assert " since " in reason and "--break-lock" in reason
    assert "Traceback" not in err and not _progress(out)
    assert sorted(os.listdir(lake)) == [RUN_LOCK], "a refused run touches no table"

    first.release()
    code = main(["run", "--lake", lake, "--input", site.small_input, "--stages", "extract", *site.cli_options()])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert RunLock(spark, lake, "probe").holder() is None


def test_a_stale_lock_is_taken_over_and_break_lock_takes_a_live_one(spark, site: Site, tmp_path: Path, capsys):
    lake = str(tmp_path / "lake")
    dead = RunLock(spark, lake, "run-A", lease_hours=6)
    dead.acquire()
    with pytest.raises(LakeLocked, match="held by run run-A"):
        RunLock(spark, lake, "run-B", lease_hours=6).acquire()

    # run-A died 7 hours ago: its heartbeat is older than the lease.
    spark.sql(f"UPDATE {table_ref(lake, RUN_LOCK)} SET heartbeat_at = heartbeat_at - INTERVAL 7 HOURS")
    successor = RunLock(spark, lake, "run-B", lease_hours=6)
    taken_from = successor.acquire()
    assert taken_from is not None and taken_from.run_id == "run-A"
    assert successor.holder().run_id == "run-B"
    with pytest.raises(LockLost, match="run run-A lost the run lock"):
        dead.heartbeat()
    dead.release()  # a run taken over frees nothing
    assert successor.holder().run_id == "run-B"

    # run-B looks alive; an operator who knows it is dead breaks its lock.
    capsys.readouterr()
    options = ["--lake", lake, "--input", site.small_input, "--stages", "extract", *site.cli_options()]
    assert main(["run", *options]) == 3
    code = main(["run", *options, "--break-lock"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "took the lake over from run run-B (host " in out and "(--break-lock)" in out
    assert RunLock(spark, lake, "probe").holder() is None


def _race(locks: list[RunLock]) -> dict[str, str]:
    """Every lock tries to take the lake at the same moment; run id -> "won" or "refused"."""
    outcomes: dict[str, str] = {}
    start = threading.Barrier(len(locks))

    def take(lock: RunLock) -> None:
        start.wait()
        try:
            lock.acquire()
            outcomes[lock.run_id] = "won"
        except LakeLocked:
            outcomes[lock.run_id] = "refused"

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_of_two_runs_racing_for_one_lake_exactly_one_wins(spark, tmp_path: Path):
    lake = str(tmp_path / "lake")  # no lock table yet: the first two also race to create it and insert the row
    for round_ in range(2):
        locks = [RunLock(spark, lake, f"race{round_}-{i}") for i in range(2)]
        outcomes = _race(locks)
        assert sorted(outcomes.values()) == ["refused", "won"]
        winner = next(run_id for run_id, outcome in outcomes.items() if outcome == "won")
        assert RunLock(spark, lake, "probe").holder().run_id == winner
        assert spark.sql(f"SELECT count(*) AS n FROM {table_ref(lake, RUN_LOCK)}").first().n == 1
        next(lock for lock in locks if lock.run_id == winner).release()


def test_a_long_stage_keeps_heartbeating_so_a_live_run_is_never_taken_for_dead(spark, tmp_path: Path):
    lake = str(tmp_path / "lake")
    live = RunLock(spark, lake, "run-A")
    live.acquire()
    beats = [live.holder().heartbeat_at]
    with live.kept_alive(interval_s=0.2):  # while a stage runs
        deadline = time.monotonic() + 120
        while len(beats) < 3:
            assert time.monotonic() < deadline, "no heartbeat while the stage ran"
            heartbeat_at = live.holder().heartbeat_at
            if heartbeat_at != beats[-1]:
                beats.append(heartbeat_at)
    after = live.holder().heartbeat_at
    time.sleep(1)
    assert live.holder().heartbeat_at == after, "the heartbeat stops with the block"
    live.release()


@pytest.mark.slow
def test_stages_and_until_run_only_the_selected_stages(spark, site: Site, tmp_path: Path, capsys):
    lake = str(tmp_path / "lake")
    capsys.readouterr()
    code = main(["run", "--lake", lake, "--input", *site.inputs, "--until", "candidates", *site.cli_options()])
    out, err = capsys.readouterr()
    assert code == 0, err
    progress = _progress(out)
    assert [line.split(":")[0] for line in progress] == ["[1/2] extract"] * 2 + ["[2/2] candidates"] * 2
    assert progress[0] == "[1/2] extract: started"
    assert progress[1].startswith("[1/2] extract: done in ")
    assert "3 rows in (files_not_yet_ok) -> 536 rows out (pairs)" in progress[1] and "rows in/s" in progress[1]
    assert "== funnel (run " in out and "candidates.dedup_within_batch" in out and "download." not in out
    assert [table_exists(spark, lake, name) for name in FLOW_TABLES] == [True, True, False, False, False]

    versions = {name: _latest_version(spark, lake, name) for name in (PAIRS, CANDIDATES)}
    code = main(["run", "--lake", lake, "--stages", "download", *site.cli_options()])  # no --input: no extract
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [line.split(":")[0] for line in _progress(out)] == ["[1/1] download"] * 2
    assert "390 rows in (to_fetch) -> 367 rows out (success)" in _progress(out)[1]
    assert {name: _latest_version(spark, lake, name) for name in (PAIRS, CANDIDATES)} == versions
    assert [table_exists(spark, lake, name) for name in FLOW_TABLES] == [True, True, True, False, False]

    code = main(["run", "--lake", lake, "--stages", "extract,candidates", *site.cli_options()])
    out, err = capsys.readouterr()
    assert code == 2 and "--input" in _reasons(err)[0] and not _progress(out)

    code = main(["run", "--lake", str(tmp_path / "empty"), "--stages", "score", *site.cli_options()])
    out, err = capsys.readouterr()
    assert code == 2
    [reason] = _reasons(err)
    assert reason.startswith("laion-spark run: stage score failed: FileNotFoundError: no Delta table 'images'")

    with pytest.raises(SystemExit) as refused:
        main(["run", "--lake", lake, "--stages", "extract,rank"])
    assert refused.value.code == 2
    assert "'extract,rank'" in capsys.readouterr().err


def test_run_help_documents_every_option(capsys):
    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001 - argparse's own layout
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = [option for action in run_parser._actions for option in action.option_strings]  # noqa: SLF001
    assert {"--lake", "--config", "--set", "--input", "--stages", "--until", "--force", "--retry-failed"} <= set(
        options
    )
    assert {"--lock-lease-hours", "--break-lock"} <= set(options)
    for action in run_parser._actions:  # noqa: SLF001
        assert action.help, f"{action.option_strings} has no help"
    for option in options:
        assert option in out
    assert "exit status" in out and "another run holds the lake" in out


def test_spark_submit_job_for_the_whole_pipeline_runs():
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "jobs" / "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "laion-spark run" in result.stdout and "--break-lock" in result.stdout
