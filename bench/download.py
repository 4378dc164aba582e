"""Download stage throughput: the Spark stage against a bare fetch loop over the same URLs, in the same run.

A loopback server (in its own process, so that neither side shares its GIL) serves a pool of pre-encoded ~50 KB
JPEGs by index. The floor is a bare loop: the same Fetcher, the same total client concurrency, no decode, no resize,
no Spark. The Spark stage then reads a candidates table of the same URLs, fetches, decodes, resizes to 256 px,
re-encodes and writes ``images``. Printed: images/s per core for both, and their ratio.

    python bench/download.py [--urls 5000] [--threads 32]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import tempfile
import time

from PIL import Image

from laion_spark.config import Config, DownloadConfig, SparkConfig
from laion_spark.download import Fetcher, FetchSettings, run_download, status
from laion_spark.schemas import CANDIDATES, CANDIDATES_SCHEMA, IMAGES
from laion_spark.session import build_local_session
from laion_spark.storage import append, read_table
from laion_spark.testing.server import serve_synthetic_images
from laion_spark.testing.synthetic import all_kinds, draw

POOL_SIZE = 64
IMAGE_SIDE = 640


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
        rows.append((uid, uid, url, f"caption {i}", f"caption {i}", None, "bench", None, None, "en", 1.0))
    append(spark.createDataFrame(rows, CANDIDATES_SCHEMA), lake, CANDIDATES)
    return lake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=32, help="client threads per core")
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
        per_host_connections=args.threads,  # one loopback host: the per-host limit must not be the bottleneck
        allowed_hosts=[f"127.0.0.1:{port}"],
        resize_mode="border",
        image_size=256,
        partitions=cores,
    )
    print(
        f"{args.urls:,} URLs, {POOL_SIZE} distinct JPEGs of {mean_kb:.0f} KB mean, {cores} cores, "
        f"{args.threads} threads per core"
    )

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
        # A small run first: starts the Python workers and the JVM's code paths, and shows the stage's fixed cost.
        warm_lake = _lake_with_candidates(spark, urls[:64])
        started = time.perf_counter()
        run_download(spark, config, warm_lake, run_id="warm-up")
        print(f"spark stage fixed cost (64 URLs): {time.perf_counter() - started:6.1f} s")
        lake = _lake_with_candidates(spark, urls)

        started = time.perf_counter()
        counter = run_download(spark, config, lake, run_id="bench")
        stage_s = time.perf_counter() - started
        succeeded = dict((step, out) for step, _, out in counter.steps).get(status.SUCCESS, 0)
        stage_rate = succeeded / stage_s / cores
        print(
            f"spark stage (+decode, resize 256 px, Delta write): {succeeded:,} in {stage_s:6.1f} s  "
            f"= {stage_rate:8.1f} images/s per core"
        )
        print(f"ratio spark stage / bare fetch loop: {stage_rate / bare_rate:.2f}")
        sizes = read_table(spark, lake, IMAGES).where("status = 'success'").selectExpr("avg(length(image))").first()[0]
        print(f"stored images: {sizes / 1024:.1f} KB mean (256 px JPEG)")
        print(counter.summary())
        spark.stop()
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
