"""It survives executor loss: on a standalone cluster of a master and two workers, one executor JVM is killed
(SIGKILL) in the middle of ``extract`` and another in the middle of ``download``, and the run still ends with
exactly the tables that a clean run writes from the same inputs.

One ``laion-spark run --until download`` on the cluster serves both checks (one driver, one application). The
kills are aimed, not timed: the test watches the executors' process trees in ``/proc`` and kills an executor only
once its stage is under way (three input files opened; a quarter of the image URLs requested) and while that
executor's Python worker holds an input file or a connection to the image server, i.e. in the middle of a task.
Afterwards the master's log must show the executor gone and another launched in its place, the driver must have
lost it, and the tables must equal those of a clean in-process run, row for row: a lost task that left no row,
or one whose rows were written twice, fails the comparison.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cluster import StandaloneCluster, running_cluster

from laion_spark.config import load_config
from laion_spark.testing.archives import WatPage, write_wat
from laion_spark.testing.server import (
    SITE_RULE_PATHS,
    ImageServer,
    SyntheticImageHandler,
    start_server,
    synthetic_image_path,
)
from laion_spark.testing.synthetic import all_kinds

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXTRACT_FILES = 8
PAGES_PER_PART = 10  # pages with three images each, at the start of every file and at its end
# Metadata records without images, shared by every input file between its two parts: they make reading a file
# take long enough (about a second on two cores) that a kill lands inside a task, as real WATs would.
FILLER_PAGES = 25_000
DISTINCT_URLS = 160  # the files' 480 images cycle through these: the same image on several pages and files
MISSING_IMAGES = 8  # of those, URLs the server answers with 404: their status must survive the kill as well
# Every request of the cluster run is answered this much later, so that download lasts several seconds.
IMAGE_DELAY_S = 0.2
RUN_TIMEOUT_S = 900
STAGE_SETTINGS = [
    "download.threads=4",
    "download.partitions=4",
    "candidates.language.languages=[en, de, fr]",  # less to load in each Python worker than the default 30
]
CLUSTER_SETTINGS = [
    "spark.shuffle_partitions=2",
    "spark.conf.spark.ui.enabled=false",
    "spark.conf.spark.ui.showConsoleProgress=false",
    "spark.conf.spark.databricks.delta.snapshotPartitions=2",
]

# What the comparisons look at: each table's content, not when or in which run or slice a row was written.
PAIRS_COLUMNS = ("uid", "url", "text", "page_url", "source_file", "record_offset", "source_format")
INGEST_LOG_COLUMNS = ("source_file", "status", "records_read", "pairs_emitted", "error")
CANDIDATES_COLUMNS = ("uid", "url", "text", "page_url", "source_file", "record_offset")
IMAGES_COLUMNS = ("uid", "url", "status", "http_status", "original_width", "original_height", "width", "height")
IMAGES_COLUMNS += ("sha256",)

NO_RATE_LIMIT = "download.per_host_requests_per_s=0"  # one loopback host serves every URL


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # One core per worker: two single-core executors, each with a task in flight all through a stage.
    with running_cluster(tmp_path_factory.mktemp("cluster"), workers=2, worker_cores=1, worker_memory="1g") as c:
        yield c


# --- the processes of the cluster, read from /proc ------------------------------------------------------------


def _processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process we may read."""
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name in stat is in parentheses and may hold spaces; the parent pid comes after it.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        processes[int(entry)] = (parent, [a.decode(errors="replace") for a in argv if a])
    return processes


@dataclass
class Executor:
    pid: int
    executor_id: str
    worker_url: str


def _executors(cluster: StandaloneCluster, processes: dict[int, tuple[int, list[str]]]) -> list[Executor]:
    """The executor JVMs that this cluster's workers launched (``--worker-url`` names the worker)."""
    found = []
    for pid, (_, argv) in processes.items():
        if "org.apache.spark.executor.CoarseGrainedExecutorBackend" not in argv:
            continue
        worker_url = _option(argv, "--worker-url")
        if worker_url in cluster.worker_urls:
            found.append(Executor(pid, _option(argv, "--executor-id") or "?", worker_url))
    return found


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def _descendants(pid: int, processes: dict[int, tuple[int, list[str]]]) -> list[int]:
    """The executor's Python daemon and the workers it forked."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in processes.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _open_files(pids: list[int]) -> set[str]:
    paths = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    return paths


def _connections_to(port: int) -> set[str]:
    """``socket:[inode]`` of every established TCP connection to 127.0.0.1:``port`` (as /proc/<pid>/fd shows it)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port, state, inode = int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if remote_port == port and state == "01":  # 01: ESTABLISHED
                sockets.add(f"socket:[{inode}]")
    return sockets


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- killing an executor in the middle of a stage ------------------------------------------------------------


@dataclass
class KillPlan:
    """When to kill during one stage: once ``under_way()``, the first executor whose Python worker holds
    something that ``busy_with`` (given the files and sockets it holds open) names."""

    stage: str
    under_way: Callable[[], bool]
    busy_with: Callable[[set[str]], str | None]


@dataclass
class Kill:
    executor: Executor
    busy_with: str  # what the executor's Python worker held when the executor was killed
    at_s: float  # seconds after the command started


@dataclass
class ClusterRun:
    returncode: int
    stdout: str
    stderr: str
    kills: dict[str, Kill] = field(default_factory=dict)


def _run_on_cluster(cluster: StandaloneCluster, workdir: Path, args: list[str], plans: list[KillPlan]) -> ClusterRun:
    """Run ``laion-spark ARGS`` on the cluster, carrying out each plan at most once while it runs."""
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    command = [sys.executable, "-m", "laion_spark", *args]
    for setting in [f"spark.master={cluster.master_url}", *CLUSTER_SETTINGS, *STAGE_SETTINGS]:
        command += ["--set", setting]
    stdout_log, stderr_log = workdir / "stdout.log", workdir / "stderr.log"
    kills: dict[str, Kill] = {}
    started = time.monotonic()
    with stdout_log.open("w") as stdout, stderr_log.open("w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        try:
            while process.poll() is None and time.monotonic() - started < RUN_TIMEOUT_S:
                for plan in plans:
                    if plan.stage not in kills and plan.under_way():
                        kill = _kill_busy_executor(cluster, plan.busy_with, started)
                        if kill is not None:
                            kills[plan.stage] = kill
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    return ClusterRun(process.returncode, stdout_log.read_text(), stderr_log.read_text(), kills)


def _kill_busy_executor(
    cluster: StandaloneCluster, busy_with: Callable[[set[str]], str | None], started: float
) -> Kill | None:
    processes = _processes()
    for executor in _executors(cluster, processes):
        held = busy_with(_open_files(_descendants(executor.pid, processes)))
        if held is not None:
            os.kill(executor.pid, signal.SIGKILL)
            return Kill(executor, held, time.monotonic() - started)
    return None


def _assert_killed_mid_stage_and_replaced(run: ClusterRun, stage: str, cluster: StandaloneCluster) -> None:
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    kill = run.kills.get(stage)
    assert kill is not None, f"{stage} ended before an executor was caught in the middle of a task: {run.kills}"
    killed = kill.executor
    assert not _alive(killed.pid)
    lines = cluster.master_log.read_text(errors="replace").splitlines()
    apps = [line.rsplit("ID ", 1)[1].strip() for line in lines if "Registered app" in line]
    assert apps, lines[-20:]
    removed = f"Removing executor {apps[-1]}/{killed.executor_id} because it is EXITED"
    gone = [n for n, line in enumerate(lines) if removed in line]
    assert gone, lines[-20:]
    # The master started another executor in its place, and the driver lost this one with a task running on it.
    assert any(f"Launching executor {apps[-1]}/" in line for line in lines[gone[0] :]), lines[-20:]
    assert f"Lost executor {killed.executor_id} " in run.stderr, run.stderr[-5000:]
    assert f"executor {killed.executor_id}): ExecutorLostFailure" in run.stderr, run.stderr[-5000:]


def _rows(spark, lake: Path, table: str, columns: tuple[str, ...]) -> list[tuple]:
    """Every row of a test-sized table, sorted: duplicates and losses both show in a comparison."""
    from laion_spark.storage import read_table

    rows = read_table(spark, str(lake), table).select(*columns).collect()
    return sorted((tuple(row) for row in rows), key=repr)


# --- the crawl, the image server, the two runs ----------------------------------------------------------------


class SlowImageHandler(SyntheticImageHandler):
    """The synthetic images, each answered ``server.delay_s`` late, as from a slow web."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        time.sleep(getattr(self.server, "delay_s", 0.0))
        super().do_GET()


def _image(number: int, base_url: str) -> tuple[str, str]:
    """The image (absolute URL, alt text) of the ``number``-th image tag of the crawl."""
    kinds = all_kinds()
    which, repeat = number % DISTINCT_URLS, number // DISTINCT_URLS
    if which < MISSING_IMAGES:
        return f"{base_url}/img/no-such-image-{which}.jpg", f"a picture that is not there, number {which}"
    kind = kinds[which % len(kinds)]
    # Mostly the same caption wherever the image appears (one candidate after dedup), now and then another one
    # (a second candidate for the same URL, which download fetches once).
    text = f"{kind.caption}, seen again" if repeat == 1 and which % 10 == 0 else kind.caption
    return base_url + synthetic_image_path(kind, seed=which), text


def _write_crawl(directory: Path, base_url: str) -> None:
    """WAT files with image pages of their own at the start and at the end, and the shared filler between."""
    directory.mkdir()
    filler_pages = [
        WatPage(
            f"http://filler.example/{i}.html",
            [],
            other_links=[{"path": "A@/href", "url": f"/section/{k}.html", "text": f"Section {k}"} for k in range(20)],
        )
        for i in range(FILLER_PAGES)
    ]
    scratch = directory / "part.tmp"
    filler = write_wat(scratch, filler_pages, gzip_members=True).read_bytes()
    number = 0
    for n in range(EXTRACT_FILES):
        parts = []
        for part in ("head", "tail"):
            pages = []
            for page in range(PAGES_PER_PART):
                images = [_image(number + j, base_url) for j in range(3)]
                number += 3
                pages.append(WatPage(f"http://site{n}.example/{part}/{page}.html", images))
            parts.append(write_wat(scratch, pages, gzip_members=True).read_bytes())
        # Gzip members concatenate: one valid WAT of head, filler and tail records.
        (directory / f"part-{n:02d}.warc.wat.gz").write_bytes(parts[0] + filler + parts[1])
    scratch.unlink()


@pytest.fixture(scope="module")
def image_server():
    server = start_server(SlowImageHandler)
    yield server
    server.shutdown()


@dataclass
class Runs:
    clean: Path  # the lake of a clean, in-process run
    killed: Path  # the lake of the cluster run that lost two executors
    inputs: list[str]
    run: ClusterRun
    urls: set[str]  # the distinct candidate URLs
    hits: Counter  # the image server's requests during the cluster run, by path


@pytest.fixture(scope="module")
def runs(cluster, spark, image_server: ImageServer, tmp_path_factory) -> Runs:
    from laion_spark.run import run_pipeline
    from laion_spark.schemas import CANDIDATES

    workdir = tmp_path_factory.mktemp("executor_loss")
    _write_crawl(workdir / "in", image_server.base_url)
    pattern = str(workdir / "in" / "*.wat.gz")
    inputs = sorted(str(path) for path in (workdir / "in").iterdir())
    allowed = f"download.allowed_hosts=['{image_server.base_url.removeprefix('http://')}']"

    clean = workdir / "clean"
    config = load_config(None, [allowed, NO_RATE_LIMIT, *STAGE_SETTINGS])
    result = run_pipeline(spark, config, str(clean), [pattern], until="download", progress=lambda line: None)
    assert result.ok, result.failure
    urls = {url for _, url in _rows(spark, clean, CANDIDATES, ("uid", "url"))}

    opened: set[str] = set()

    def reading_an_input(held: set[str]) -> str | None:
        reading = held.intersection(inputs)
        return min(reading) if reading else None

    def extract_under_way() -> bool:
        # Some files read and more to come: which inputs the executors' Python workers have opened so far.
        processes = _processes()
        for executor in _executors(cluster, processes):
            opened.update(_open_files(_descendants(executor.pid, processes)).intersection(inputs))
        return len(opened) >= 3

    def fetching_an_image(held: set[str]) -> str | None:
        return "a connection to the image server" if held & _connections_to(image_server.server_port) else None

    def download_under_way() -> bool:
        return len(image_server.hits) >= len(urls) // 4

    killed = workdir / "killed"
    image_server.hits.clear()
    image_server.delay_s = IMAGE_DELAY_S
    try:
        run = _run_on_cluster(
            cluster,
            workdir,
            [
                "run",
                "--lake",
                str(killed),
                "--input",
                pattern,
                "--until",
                "download",
                "--set",
                allowed,
                "--set",
                NO_RATE_LIMIT,
            ],
            [
                KillPlan("extract", extract_under_way, reading_an_input),
                KillPlan("download", download_under_way, fetching_an_image),
            ],
        )
    finally:
        image_server.delay_s = 0.0
    return Runs(clean, killed, inputs, run, urls, Counter(image_server.hits))


def test_extract_survives_losing_an_executor_mid_stage(runs: Runs, cluster, spark):
    from laion_spark.schemas import INGEST_LOG, PAIRS

    _assert_killed_mid_stage_and_replaced(runs.run, "extract", cluster)
    assert runs.run.kills["extract"].busy_with in runs.inputs

    expected_log = _rows(spark, runs.clean, INGEST_LOG, INGEST_LOG_COLUMNS)
    assert [row[1] for row in expected_log] == ["ok"] * EXTRACT_FILES
    assert _rows(spark, runs.killed, INGEST_LOG, INGEST_LOG_COLUMNS) == expected_log
    expected_pairs = _rows(spark, runs.clean, PAIRS, PAIRS_COLUMNS)
    assert len(expected_pairs) == EXTRACT_FILES * 2 * PAGES_PER_PART * 3
    assert _rows(spark, runs.killed, PAIRS, PAIRS_COLUMNS) == expected_pairs


def test_download_survives_losing_an_executor_mid_stage(runs: Runs, cluster, spark):
    from laion_spark.download import status
    from laion_spark.schemas import CANDIDATES, IMAGES

    _assert_killed_mid_stage_and_replaced(runs.run, "download", cluster)
    # Every URL was asked for, and the killed task's URLs were asked for again by its second attempt.
    assert all(runs.hits[path] >= 1 for path in SITE_RULE_PATHS)  # robots.txt and TDMRep are on by default
    images = Counter({path: hits for path, hits in runs.hits.items() if path not in SITE_RULE_PATHS})
    assert len(images) == len(runs.urls)
    assert sum(images.values()) > len(runs.urls), images.most_common(3)

    candidates = _rows(spark, runs.clean, CANDIDATES, CANDIDATES_COLUMNS)
    assert _rows(spark, runs.killed, CANDIDATES, CANDIDATES_COLUMNS) == candidates
    expected = _rows(spark, runs.clean, IMAGES, IMAGES_COLUMNS)
    assert sorted(row[0] for row in expected) == sorted(row[0] for row in candidates)  # one row per candidate
    assert {status.SUCCESS, status.HTTP_ERROR} <= {row[2] for row in expected}
    assert _rows(spark, runs.killed, IMAGES, IMAGES_COLUMNS) == expected
