"""Every stage works in slices and commits each one: a run that dies after k of n slices loses at most the slice in
flight, and its rerun does only what is left and ends with the tables of one clean run.

Real throughout: local Spark and Delta, nine archives (the sample crawl written three times over, as when crawls
overlap), a loopback image server that counts every request, the tiny CLIP model. The crashes are injected in
process, right after a slice's commit or between the commits of one slice; one run is SIGKILLed for real as a
separate `laion-spark run` process, at a moment chosen by watching the lake from outside.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import laion_spark.candidates.stage as candidates_stage
import laion_spark.download.stage as download_stage
import laion_spark.extract.stage as extract_stage
import laion_spark.score.stage as score_stage
from laion_spark.candidates.stage import run_candidates
from laion_spark.cli import main
from laion_spark.config import Config, load_config
from laion_spark.download.stage import run_download
from laion_spark.extract.stage import run_extract
from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, INGEST_LOG, PAIRS
from laion_spark.score.stage import run_score
from laion_spark.storage import append, read_table, table_exists, table_ref
from laion_spark.storage.delta import LakeLayoutError
from laion_spark.testing.sample_crawl import write_sample_crawl
from laion_spark.testing.server import serve_synthetic_images
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PROJECT_ROOT / "laion_spark" / "demo" / "demo.yaml"
COPIES = ("a", "b", "c")
FILES = 3 * len(COPIES)

# Small slices, so that each stage has several: 5 extract slices (2 files each), a candidates slice per pairs commit,
# 4 download slices of ~100 URLs, a score slice per download slice (~92 images, two of which exceed 128).
SLICES = [
    "extract.files_per_slice=2",
    "candidates.pairs_per_slice=1",
    "download.urls_per_slice=100",
    "clip.images_per_slice=128",
]


class Crawl:
    def __init__(self, root: Path) -> None:
        self.server, base_url = serve_synthetic_images(host="127.0.0.1", port=0)
        for copy in COPIES:
            write_sample_crawl(root / "crawl" / copy, base_url)
        self.inputs = [str(root / "crawl" / "*" / "*")]
        tiny = ensure_tiny_clip(PROJECT_ROOT / ".cache" / "models" / "tiny-clip")
        self.overrides = [
            f"download.allowed_hosts=['{urlsplit(base_url).netloc}']",
            "download.per_host_requests_per_s=0",
            *SLICES,
        ]
        self.overrides += [f"clip.{key}={value}" for key, value in tiny.items()]

    def config(self) -> Config:
        return load_config(DEMO_CONFIG, self.overrides)

    def hits(self) -> Counter[str]:
        return Counter(self.server.hits)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Crawl:
    site = Crawl(tmp_path_factory.mktemp("slices"))
    yield site
    site.server.shutdown()


@pytest.fixture(scope="module")
def clean_lake(spark, crawl: Crawl, tmp_path_factory) -> str:
    lake = str(tmp_path_factory.mktemp("clean") / "lake")
    config = crawl.config()
    run_extract(spark, config, lake, crawl.inputs)
    run_candidates(spark, config, lake)
    run_download(spark, config, lake)
    run_score(spark, config, lake)
    return lake


class Crash(RuntimeError):
    """The injected death of the driver."""


def _die_after(monkeypatch, module, name: str, calls: int) -> list[int]:
    """Make ``module.name`` raise :class:`Crash` right after its ``calls``-th call returns; returns the call count."""
    original = getattr(module, name)
    count = [0]

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            raise Crash(f"injected after call {calls} of {name}")
        return result

    monkeypatch.setattr(module, name, wrapper)
    return count


def _rows(spark, lake: str, table: str, columns: list[str]) -> list[tuple]:
    return sorted(tuple(row) for row in read_table(spark, lake, table).select(*columns).collect())


def _commits(spark, lake: str, table: str) -> int:
    history = spark.sql(f"DESCRIBE HISTORY {table_ref(lake, table)}")
    return history.where("operation IN ('WRITE', 'MERGE')").count()  # not the OPTIMIZEs of auto compaction


PAIR_COLUMNS = ["uid", "url", "text", "text_key", "page_url", "source_file", "record_offset", "crawl_date"]
LOG_COLUMNS = ["source_file", "status", "records_read", "pairs_emitted", "error"]
CANDIDATE_COLUMNS = ["uid", "dedup_key", "url", "text", "source_file", "record_offset", "language"]
IMAGE_COLUMNS = ["uid", "url", "status", "http_status", "width", "height", "sha256"]


def assert_same_tables(spark, lake: str, clean: str) -> None:
    assert _rows(spark, lake, PAIRS, PAIR_COLUMNS) == _rows(spark, clean, PAIRS, PAIR_COLUMNS)
    assert _rows(spark, lake, INGEST_LOG, LOG_COLUMNS) == _rows(spark, clean, INGEST_LOG, LOG_COLUMNS)
    assert _rows(spark, lake, CANDIDATES, CANDIDATE_COLUMNS) == _rows(spark, clean, CANDIDATES, CANDIDATE_COLUMNS)
    assert _rows(spark, lake, IMAGES, IMAGE_COLUMNS) == _rows(spark, clean, IMAGES, IMAGE_COLUMNS)
    scored = _rows(spark, lake, EMBEDDINGS, ["uid", "status", "similarity"])
    clean_scored = _rows(spark, clean, EMBEDDINGS, ["uid", "status", "similarity"])
    assert [(u, s) for u, s, _ in scored] == [(u, s) for u, s, _ in clean_scored]
    assert all(a == b or abs(a - b) < 1e-3 for (_, _, a), (_, _, b) in zip(scored, clean_scored, strict=True))
    assert _rows(spark, lake, DATASET, ["uid", "url", "text"]) == _rows(spark, clean, DATASET, ["uid", "url", "text"])


@pytest.mark.slow
def test_each_stage_killed_after_k_of_n_slices_resumes_and_ends_as_one_clean_run(
    spark, crawl: Crawl, clean_lake: str, tmp_path: Path, monkeypatch
):
    config = crawl.config()
    lake = str(tmp_path / "lake")
    clean_slices = {
        "extract": _commits(spark, clean_lake, PAIRS),
        "download": _commits(spark, clean_lake, IMAGES),
        "score": _commits(spark, clean_lake, EMBEDDINGS),
    }
    assert clean_slices["extract"] == 5 and min(clean_slices.values()) >= 3, f"several slices each: {clean_slices}"

    # extract: the third slice dies between its pairs commit and its log commit; the rerun reads its files again
    # into the partition the log named for them, and only the files of slices 3 to 5.
    calls = _die_after(monkeypatch, extract_stage, "replace_where", 2 * 2 + 1)
    with pytest.raises(Crash):
        run_extract(spark, config, lake, crawl.inputs)
    assert calls[0] == 5
    started = _rows(spark, lake, INGEST_LOG, ["status"])
    assert Counter(s for (s,) in started) == Counter({"ok": 4, "started": FILES - 4})
    monkeypatch.undo()
    rerun = run_extract(spark, config, lake, crawl.inputs)
    assert (rerun.files_skipped, rerun.files_read) == (4, FILES - 4)

    # candidates: dies after its second bookmark; the rerun goes on from there.
    _die_after(monkeypatch, candidates_stage, "write_bookmark", 2)
    with pytest.raises(Crash):
        run_candidates(spark, config, lake)
    monkeypatch.undo()
    pairs_read = dict((s, i) for s, i, _ in run_candidates(spark, config, lake).steps[:1])
    total_pairs = read_table(spark, lake, PAIRS).count()
    assert 0 < next(iter(pairs_read.values())) < total_pairs, "the rerun read only the pairs after the bookmark"

    # download: dies after the second slice's commit; the rerun fetches only the URLs of the other slices.
    before = crawl.hits()
    _die_after(monkeypatch, download_stage, "_commit_slice", 2)
    with pytest.raises(Crash):
        run_download(spark, config, lake)
    monkeypatch.undo()
    first_hits = crawl.hits() - before
    committed = read_table(spark, lake, IMAGES).count()
    assert 0 < committed < read_table(spark, lake, CANDIDATES).count()
    before = crawl.hits()
    run_download(spark, config, lake)
    second_hits = crawl.hits() - before
    assert not set(first_hits) & set(second_hits), "no URL of a committed slice was fetched again"

    # score: dies after the first slice; the rerun scores the rest only.
    _die_after(monkeypatch, score_stage, "_score_slice", 1)
    with pytest.raises(Crash):
        run_score(spark, config, lake)
    monkeypatch.undo()
    scored_before = read_table(spark, lake, EMBEDDINGS).count()
    assert 0 < scored_before
    assert not table_exists(spark, lake, DATASET)
    steps = {step: (i, o) for step, i, o in run_score(spark, config, lake).steps}
    assert steps["not_yet_scored"][1] == read_table(spark, lake, EMBEDDINGS).count() - scored_before

    assert_same_tables(spark, lake, clean_lake)


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _commit_files(lake: str, table: str) -> int:
    log_dir = Path(lake) / table / "_delta_log"
    return len(list(log_dir.glob("*.json"))) if log_dir.exists() else 0


@pytest.mark.slow
def test_a_run_sigkilled_mid_download_resumes_and_ends_as_one_clean_run(
    spark, crawl: Crawl, clean_lake: str, tmp_path: Path
):
    lake = str(tmp_path / "lake")
    command = [sys.executable, "-m", "laion_spark.cli", "run", "--lake", lake, "--config", str(DEMO_CONFIG)]
    for override in crawl.overrides:
        command += ["--set", override]
    for pattern in crawl.inputs:
        command += ["--input", pattern]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    # Its own process group: the kill takes the driver's JVM and Python workers along, as a lost machine would.
    process = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        # images' log: version 0 creates the table, each slice adds one; kill once two slices are in.
        _wait_for(lambda: _commit_files(lake, IMAGES) >= 3, 420, "two committed download slices")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    committed_urls = {row.url for row in read_table(spark, lake, IMAGES).select("url").collect()}
    assert 0 < len(committed_urls) < read_table(spark, lake, CANDIDATES).select("url").distinct().count()
    assert not table_exists(spark, lake, EMBEDDINGS)

    # The killed run still holds the lake: its host knows it is dead, so --break-lock.
    before = crawl.hits()
    rerun = subprocess.run([*command, "--break-lock"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    refetched = set(crawl.hits() - before)
    assert refetched, "the rerun fetched the slices the killed run had not committed"
    assert not refetched & {urlsplit(url).path for url in committed_urls}, "no committed URL was fetched again"
    assert_same_tables(spark, lake, clean_lake)


def test_a_lake_from_before_slices_is_one_clear_error(spark, tmp_path: Path, capsys):
    """ingest_log and images without their slice columns, as an older laion_spark wrote them."""
    lake = str(tmp_path / "old")
    old_log = spark.createDataFrame([("a.wat.gz", "ok")], "source_file string, status string")
    append(old_log, lake, INGEST_LOG)
    archive = tmp_path / "a.wat.gz"
    archive.write_bytes(b"")
    code = main(["extract", "--lake", lake, "--input", str(archive)])
    err = capsys.readouterr().err
    assert code == 2
    assert "table 'ingest_log'" in err and "no column ingest_batch" in err and "Traceback" not in err

    old_images = spark.createDataFrame([("u", "success")], "uid string, status string")
    append(old_images, lake, IMAGES)
    with pytest.raises(LakeLayoutError, match="table 'images' .* no column fetch_batch"):
        read_table(spark, lake, IMAGES)
