"""Benchmark: WAT extraction throughput per core against the ``gzip -dc`` floor, and the worker's peak RSS.

    python bench/extract.py                 # generates bench/data/bench.wat.gz (>= 200 MB) on first use
    python bench/extract.py --wat FILE.wat.gz --skip-spark

The generated WAT is realistic in shape: a request, a response and a metadata WAT record per page (so most
records carry no images), HTML pages with 0-50 images and ~100 other links, 30-60 % of images with alt text.
It is assembled from a pool of pre-compressed gzip members (one per record, as Common Crawl writes them),
so generating 200 MB takes seconds.

Prints records/s and pairs/s per core for the extraction function alone (fastwarc and warcio readers) and
through Spark (``local[1]``, so one core, including the Delta writes), the ``gzip -dc`` throughput of the same
file (the floor: the least work any reader must do), the ratio to it, and the peak RSS of the Python process
doing the extraction. Targets: ratio >= 0.5, peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WAT = BENCH_DIR / "data" / "bench.wat.gz"
WORDS = "red blue green photo of a the small large garden house river city street cat dog tree".split()


def _gzip_member(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def _warc_record(target_uri: str, payload: bytes) -> bytes:
    header = (
        "WARC/1.0\r\nWARC-Type: metadata\r\n"
        f"WARC-Target-URI: {target_uri}\r\nWARC-Date: 2024-02-20T10:00:00Z\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\r\nWARC-Refers-To: <urn:uuid:{uuid.uuid4()}>\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return header.encode() + payload + b"\r\n\r\n"


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _page_records(rng: random.Random, page: int) -> list[bytes]:
    host = f"www.site{rng.randint(0, 5000)}.example.com"
    url = f"https://{host}/section/{page}/article.html"
    envelope = {"WARC-Header-Metadata": {"WARC-Type": "request", "WARC-Target-URI": url}}
    request = {"Container": {"Filename": "CC-MAIN-x.warc.gz", "Offset": str(page * 7000)}, "Envelope": envelope}
    links = [
        {"path": "A@/href", "url": f"/p/{rng.randint(0, 10**6)}", "text": _sentence(rng, 1, 6)}
        for _ in range(rng.randint(20, 150))
    ]
    with_alt = rng.uniform(0.3, 0.6)
    n_images = 0 if rng.random() < 0.25 else min(50, int(rng.expovariate(1 / 12)))
    for i in range(n_images):
        link = {"path": "IMG@/src", "url": rng.choice([f"/img/{page}-{i}.jpg", f"https://cdn.{host}/{i}.png"])}
        if rng.random() < with_alt:
            link["alt"] = _sentence(rng, 1, 12)
        links.insert(rng.randint(0, len(links)), link)
    html_meta = {
        "Head": {"Title": _sentence(rng, 3, 9), "Metas": [{"name": "description", "content": _sentence(rng, 10, 30)}]},
        "Links": links,
    }
    if rng.random() < 0.1:
        html_meta["Head"]["Base"] = f"https://static.{host}/"
    response = {
        "Container": {"Filename": "CC-MAIN-x.warc.gz", "Offset": str(page * 7000 + 900)},
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": url},
            "Payload-Metadata": {
                "HTTP-Response-Metadata": {
                    "Headers": {"Content-Type": "text/html; charset=UTF-8", "Server": "nginx"},
                    "HTML-Metadata": html_meta,
                }
            },
        },
    }
    metadata = {"Envelope": {"WARC-Header-Metadata": {"WARC-Type": "metadata", "WARC-Target-URI": url}}}
    return [_warc_record(url, json.dumps(doc).encode()) for doc in (request, response, metadata)]


def generate_wat(path: Path, target_bytes: int, pool_pages: int = 1500, seed: int = 7) -> None:
    rng = random.Random(seed)
    pool = [[_gzip_member(record) for record in _page_records(rng, page)] for page in range(pool_pages)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    written = 0
    with open(tmp, "wb") as out:
        out.write(_gzip_member(b"WARC/1.0\r\nWARC-Type: warcinfo\r\nContent-Length: 0\r\n\r\n\r\n\r\n"))
        while written < target_bytes:
            for member in rng.choice(pool):
                out.write(member)
                written += len(member)
    tmp.rename(path)


def gzip_floor(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(f"gzip -dc '{path}' > /dev/null", shell=True, check=True)
    return time.perf_counter() - started


def extraction_alone(path: Path, reader: str) -> dict:
    """Run the worker function in a fresh child process, so its peak RSS is the extraction's alone."""
    code = f"""
import json, resource, sys, time
from laion_spark.extract import ExtractRules, FileStatus, extract_file
started = time.perf_counter()
for item in extract_file({str(path)!r}, ExtractRules(reader={reader!r}), 10000):
    if isinstance(item, FileStatus):
        status = item
elapsed = time.perf_counter() - started
print(json.dumps(dict(seconds=elapsed, records=status.records_read, pairs=status.pairs_emitted, status=status.status,
                      error=status.error, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class WorkerRssPoller(threading.Thread):
    """Peak VmHWM of this process's Python-worker descendants (Spark's pyspark.daemon and its forks)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(0.2):
            for pid in _descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        command = handle.read()
                        if b"pyspark.daemon" not in command and b"pyspark.worker" not in command:
                            continue
                    with open(f"/proc/{pid}/status") as handle:
                        for line in handle:
                            if line.startswith("VmHWM:"):
                                self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:
                    continue

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def through_spark(path: Path) -> dict:
    from laion_spark.config import Config, SparkConfig
    from laion_spark.extract import run_extract
    from laion_spark.session import build_local_session

    spark = build_local_session(
        SparkConfig(
            master="local[1]",
            shuffle_partitions=1,
            conf={
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": "2g",
                "spark.databricks.delta.snapshotPartitions": "1",
            },
        )
    )
    lake = tempfile.mkdtemp(prefix="bench-extract-lake-")
    poller = WorkerRssPoller()
    poller.start()
    try:
        run_extract(spark, Config(), lake, [str(BENCH_DIR / "__warmup_none__.warc")])  # JVM and Delta warm-up
        started = time.perf_counter()
        result = run_extract(spark, Config(), lake, [str(path)], force=True)
        elapsed = time.perf_counter() - started
    finally:
        poller.stop()
        spark.stop()
        shutil.rmtree(lake, ignore_errors=True)
    return dict(
        seconds=elapsed, records=result.records_read, pairs=result.pairs_written, peak_rss_mb=poller.peak_kb / 1024
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wat", type=Path, help="a WAT file (default: generate bench/data/bench.wat.gz)")
    parser.add_argument("--size-mb", type=int, default=200, help="compressed size of the generated WAT")
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument("--skip-warcio", action="store_true", help="warcio is several times slower")
    args = parser.parse_args()

    path = args.wat or DEFAULT_WAT
    if args.wat is None and (not path.exists() or path.stat().st_size < args.size_mb * 1_000_000):
        started = time.perf_counter()
        generate_wat(path, args.size_mb * 1_000_000)
        print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f}s")
    size_mb = path.stat().st_size / 1e6
    print(f"input: {path} ({size_mb:.0f} MB compressed), {os.cpu_count()} cores on this machine, all figures per core")

    floor_s = gzip_floor(path)
    floor = size_mb / floor_s
    print(f"floor  gzip -dc                {floor:8.1f} MB/s compressed ({floor_s:.1f}s)")

    runs = [("function alone, fastwarc", lambda: extraction_alone(path, "fastwarc"))]
    if not args.skip_warcio:
        runs.append(("function alone, warcio", lambda: extraction_alone(path, "warcio")))
    if not args.skip_spark:
        runs.append(("Spark local[1] + Delta", lambda: through_spark(path)))
    for name, run in runs:
        m = run()
        rate = size_mb / m["seconds"]
        print(
            f"{name:<30} {rate:8.1f} MB/s  ratio to floor {rate / floor:4.2f}  "
            f"{m['records'] / m['seconds']:>9,.0f} records/s  {m['pairs'] / m['seconds']:>9,.0f} pairs/s  "
            f"({m['records']:,} records, {m['pairs']:,} pairs, {m['seconds']:.1f}s)  peak worker RSS {m['peak_rss_mb']:.0f} MB"
        )
    print("targets: ratio >= 0.5 for the fastwarc reader, peak worker RSS < 300 MB")


if __name__ == "__main__":
    main()
