"""Download stage throughput: the Spark stage against a bare fetch loop and against img2dataset, same URLs, same run.

A loopback server (in its own process, so that neither side shares its GIL) serves a pool of pre-encoded ~50 KB
640 px JPEGs by index. On the same URL list, the same server and the same cores:

- the floor: a bare loop, the same Fetcher, the same total client concurrency, no decode, no resize, no Spark;
- img2dataset itself (installed from PyPI into ``.cache/peers/img2dataset``, not a dependency of laion_spark), run
  as a child process and timed from its start to its exit: the same resize mode (border), size (256 px), format and
  quality (JPEG 95), one process per core with as many threads as each of our workers, its ``parquet`` output
  (image bytes in parquet, the nearest to our Delta table), one shard per process, EXIF extraction off (we keep none);
- the Spark stage: candidates table -> fetch, check, decode, pHash, resize, re-encode -> ``images`` (Delta), timed
  around ``run_download`` in a warm session;
- ``process_image`` alone (check, decode, pHash, resize, encode), CPU ms per image on one thread.

Each side also runs once on 64 URLs: its fixed cost, what a run costs whatever its size (our Spark jobs and Delta
commits; img2dataset's start-up). Printed: images/s per core (wall), CPU seconds by process (from /proc: the machine
may be shared, and CPU time moves less than wall time with other jobs), the cost per image beyond the fixed cost, and
the ratios.

    python bench/download.py [--urls 5000] [--threads 32] [--rounds 1] [--no-img2dataset]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image

from laion_spark.config import Config, DownloadConfig, SparkConfig
from laion_spark.download import Fetcher, FetchSettings, run_download, status
from laion_spark.download.images import ImageSettings, process_image
from laion_spark.schemas import CANDIDATES, CANDIDATES_SCHEMA, IMAGES
from laion_spark.session import build_local_session
from laion_spark.storage import append, read_table
from laion_spark.testing.peers import IMG2DATASET, PeerUnavailable, peer_python
from laion_spark.testing.server import serve_synthetic_images
from laion_spark.testing.synthetic import all_kinds, draw

POOL_SIZE = 64
FIXED_COST_URLS = 64
IMAGE_SIDE = 640
IMAGE_SIZE = 256
ENCODE_QUALITY = 95
PEER_DIRECTORY = Path(__file__).resolve().parent.parent / ".cache" / "peers" / IMG2DATASET.name
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def realistic_jpegs(count: int) -> list[bytes]:
    """Photos compress worse than flat synthetic shapes: add grain until a 640 px JPEG weighs ~50 KB."""
    kinds = all_kinds()
    pool = []
    for i in range(count):
        image = draw(kinds[i % len(kinds)], size=IMAGE_SIDE, seed=i)
        grain = Image.effect_noise((IMAGE_SIDE, IMAGE_SIDE), 40).convert("RGB")
        buffer = io.BytesIO()
        Image.blend(image, grain, 0.09).save(buffer, format="JPEG", quality=85)
        pool.append(buffer.getvalue())
    return pool


def _serve(pool: list[bytes], port_queue) -> None:
    server, _ = serve_synthetic_images(pool=pool)
    port_queue.put(server.server_port)
    while True:
        time.sleep(3600)


def _lake_with_candidates(spark, urls: list[str]) -> str:
    lake = os.path.join(tempfile.mkdtemp(prefix="bench-download-"), "lake")
    rows = []
    for i, url in enumerate(urls):
        uid = hashlib.sha1(f"{url}\tcaption {i}".encode()).hexdigest()
        given = dict(
            uid=uid, dedup_key=uid, url=url, text=f"caption {i}", text_key=f"caption {i}", source_file="bench",
            language="en", language_confidence=1.0,
        )  # fmt: skip
        # By name, the nullable columns left null: the bench keeps working when candidates gains a column.
        rows.append(tuple(given.get(name) for name in CANDIDATES_SCHEMA.names))
    append(spark.createDataFrame(rows, CANDIDATES_SCHEMA), lake, CANDIDATES)
    return lake


def image_work_ms(pool: list[bytes], settings: ImageSettings, repeats: int = 5) -> float:
    """CPU ms per image of ``process_image`` (check, decode, pHash, resize, encode), one thread, best of ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        started = time.thread_time()
        for body in pool:
            process_image(body, settings)
        best = min(best, (time.thread_time() - started) / len(pool) * 1000)
    return best


def _tree_cpu_s(root: int, exclude: int) -> dict[str, float]:
    """CPU seconds of ``root`` (the driver) and its live descendants but ``exclude`` (the image server), each with
    the children it has already reaped, summed by kind: driver, JVM, Python workers."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        # utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 after the command name.
        times[int(entry)] = sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS
    by_kind = {"driver": times.get(root, 0.0), "JVM": 0.0, "Python workers": 0.0}
    todo = [root]
    while todo:
        pid = todo.pop()
        for child in (child for child, parent in parents.items() if parent == pid and child != exclude):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as handle:
                    command = handle.read()
            except OSError:
                continue
            by_kind["JVM" if b"java" in command.split(b"\0", 1)[0] else "Python workers"] += times[child]
            todo.append(child)
    return by_kind


def _timed_stage(spark, config: Config, urls: list[str], server_pid: int) -> dict:
    """``run_download`` over a fresh lake of ``urls``: wall_s, cpu_s (by process), succeeded, counter, lake."""
    lake = _lake_with_candidates(spark, urls)
    cpu_before = _tree_cpu_s(os.getpid(), server_pid)
    started = time.perf_counter()
    counter = run_download(spark, config, lake, run_id="bench")
    wall_s = time.perf_counter() - started
    cpu_s = {kind: seconds - cpu_before[kind] for kind, seconds in _tree_cpu_s(os.getpid(), server_pid).items()}
    succeeded = dict((step, out) for step, _, out in counter.steps).get(status.SUCCESS, 0)
    return dict(wall_s=wall_s, cpu_s=cpu_s, succeeded=succeeded, counter=counter, lake=lake)


def _print_run(label: str, run: dict, cores: int) -> None:
    succeeded, cpu_s = run["succeeded"], sum(run["cpu_s"].values())
    logged = f"; its own log: {run['logged_rate']} images/s" if run.get("logged_rate") else ""
    print(
        f"{label}: {succeeded:,} images in {run['wall_s']:6.1f} s = {succeeded / run['wall_s'] / cores:7.1f} images/s "
        f"per core; {cpu_s:.1f} CPU s ({_by_kind(run['cpu_s'])}) = {cpu_s / max(1, succeeded) * 1000:.2f} "
        f"CPU ms per image{logged}"
    )


def _print_beyond_fixed(run: dict, fixed: dict) -> None:
    """The cost of each image beyond the run's fixed cost: what a run of many more images tends to."""
    images = max(1, run["succeeded"] - fixed["succeeded"])
    cpu = {kind: (seconds - fixed["cpu_s"][kind]) / images * 1000 for kind, seconds in run["cpu_s"].items()}
    print(
        f"    beyond the fixed cost: {(run['wall_s'] - fixed['wall_s']) / images * 1000:.2f} ms wall, "
        f"{sum(cpu.values()):.2f} CPU ms per image ({', '.join(f'{kind} {ms:.2f}' for kind, ms in cpu.items())})"
    )


def _by_kind(cpu_s: dict[str, float]) -> str:
    return ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in cpu_s.items())


def run_img2dataset(urls: list[str], cores: int, threads: int) -> dict:
    """img2dataset over ``urls`` in a child process: wall_s, cpu_s (its processes), succeeded, and the rate its own
    log last printed (images/s since its start), if any. Raises PeerUnavailable."""
    python = peer_python(IMG2DATASET, PEER_DIRECTORY)
    work = Path(tempfile.mkdtemp(prefix="bench-img2dataset-"))
    url_list = work / "urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    command = [
        str(python.parent / "img2dataset"),
        "--url_list", str(url_list),
        "--input_format", "txt",
        "--output_format", "parquet",
        "--output_folder", str(work / "out"),
        "--image_size", str(IMAGE_SIZE),
        "--resize_mode", "border",
        "--encode_format", "jpg",
        "--encode_quality", str(ENCODE_QUALITY),
        "--processes_count", str(cores),
        "--thread_count", str(threads),
        "--number_sample_per_shard", str(math.ceil(len(urls) / cores)),  # one shard per process: all cores work
        "--extract_exif", "False",  # we keep no EXIF: the same work on both sides
        "--retries", "0",
        "--timeout", "10",
    ]  # fmt: skip
    environment = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # no update check over the network
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=work)
    wall_s = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PeerUnavailable(f"img2dataset exited with {done.returncode}: {last[0]}")
    stats = [json.loads(Path(path).read_text()) for path in glob.glob(str(work / "out" / "*_stats.json"))]
    logged = re.findall(r"images per sec: (\d+)", done.stdout + done.stderr)
    shutil.rmtree(work, ignore_errors=True)
    cpu_s = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    return dict(
        wall_s=wall_s,
        cpu_s={"img2dataset": cpu_s},
        succeeded=sum(stat.get("successes", 0) for stat in stats),
        logged_rate=int(logged[-1]) if logged else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=32, help="client threads per core")
    parser.add_argument("--rounds", type=int, default=1, help="alternate img2dataset and ours; best of each")
    parser.add_argument("--no-img2dataset", action="store_true", help="skip the peer (no PyPI access)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    pool = realistic_jpegs(POOL_SIZE)
    mean_kb = sum(map(len, pool)) / len(pool) / 1024
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(pool, ports), daemon=True)
    server.start()
    port = ports.get(timeout=60)
    base = f"http://127.0.0.1:{port}"
    urls = [f"{base}/pool/{i}.jpg" for i in range(args.urls)]
    download = DownloadConfig(
        threads=args.threads,
        # One loopback host stands in for a crawl's many: the per-host limits must not be the bottleneck.
        per_host_connections=args.threads,
        per_host_requests_per_s=0.0,
        allowed_hosts=[f"127.0.0.1:{port}"],
        resize_mode="border",
        image_size=IMAGE_SIZE,
        encode_quality=ENCODE_QUALITY,
        partitions=cores,
    )
    print(
        f"{args.urls:,} URLs, {POOL_SIZE} distinct JPEGs of {mean_kb:.0f} KB mean, {cores} cores, "
        f"{args.threads} threads per core"
    )
    image_ms = image_work_ms(pool, ImageSettings.from_config(download))
    print(f"process_image (check, decode, pHash, resize, encode): {image_ms:.2f} CPU ms per image")

    try:
        # The floor: the same client, the same total concurrency, bytes only.
        fetcher = Fetcher(
            FetchSettings.from_config(DownloadConfig(**{**download.__dict__, "threads": args.threads * cores}))
        )
        fetcher.fetch(urls[0])  # warm up the server's threads
        started = time.perf_counter()
        fetched = sum(r.status == status.SUCCESS for r in fetcher.fetch_many(urls))
        bare_s = time.perf_counter() - started
        fetcher.close()
        bare_rate = fetched / bare_s / cores
        print(f"bare fetch loop (floor):  {fetched:,} in {bare_s:6.1f} s  = {bare_rate:8.1f} images/s per core")

        spark = build_local_session(
            SparkConfig(
                master=f"local[{cores}]",
                shuffle_partitions=cores,
                conf={"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"},
            )
        )
        config = Config(download=download)
        # Small runs first: they start the Python workers and the JVM's code paths (img2dataset: its environment),
        # and show each side's fixed cost, what a run costs whatever its size.
        _timed_stage(spark, config, urls[:FIXED_COST_URLS], server.pid)
        ours_fixed = _timed_stage(spark, config, urls[:FIXED_COST_URLS], server.pid)
        _print_run("spark stage fixed cost", ours_fixed, cores)
        peer_fixed = None
        if not args.no_img2dataset:
            try:
                peer_fixed = run_img2dataset(urls[:FIXED_COST_URLS], cores, args.threads)
            except PeerUnavailable as exc:
                print(f"img2dataset: not run ({exc})")
            else:
                _print_run("img2dataset fixed cost", peer_fixed, cores)

        ours_runs, peer_runs = [], []
        for round_number in range(args.rounds):
            if peer_fixed is not None:
                peer_runs.append(run_img2dataset(urls, cores, args.threads))
                _print_run(f"[{round_number}] img2dataset, end to end (its start-up included)", peer_runs[-1], cores)
                _print_beyond_fixed(peer_runs[-1], peer_fixed)
            ours_runs.append(_timed_stage(spark, config, urls, server.pid))
            _print_run(f"[{round_number}] spark stage, end to end (Delta write included)", ours_runs[-1], cores)
            _print_beyond_fixed(ours_runs[-1], ours_fixed)

        ours_rate = max(run["succeeded"] / run["wall_s"] / cores for run in ours_runs)
        ours_cpu_ms = min(sum(run["cpu_s"].values()) / run["succeeded"] * 1000 for run in ours_runs)
        print(f"ratio spark stage / bare fetch loop: {ours_rate / bare_rate:.2f}")
        if peer_runs:
            peer_rate = max(run["succeeded"] / run["wall_s"] / cores for run in peer_runs)
            peer_cpu_ms = min(sum(run["cpu_s"].values()) / run["succeeded"] * 1000 for run in peer_runs)
            print(
                f"ratio spark stage / img2dataset: {ours_rate / peer_rate:.2f} in images/s per core (wall, best of "
                f"{args.rounds}), {peer_cpu_ms / ours_cpu_ms:.2f} in CPU ms per image (unmoved by other jobs)"
            )
        ours = ours_runs[-1]
        sizes = (
            read_table(spark, ours["lake"], IMAGES)
            .where("status = 'success'")
            .selectExpr("avg(length(image))")
            .first()[0]
        )
        print(f"stored images: {sizes / 1024:.1f} KB mean ({IMAGE_SIZE} px JPEG, quality {ENCODE_QUALITY})")
        print(ours["counter"].summary())
        spark.stop()
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
