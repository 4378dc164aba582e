"""Benchmark: WAT extraction per core against the ``gzip -dc`` floor and against cc2dataset, the stage's fixed cost,
and the worker's peak RSS.

    python bench/extract.py                 # generates bench/data/bench.wat.gz (>= 100 MB) on first use
    python bench/extract.py --wat FILE.wat.gz --skip-spark
    python bench/extract.py --conf spark.databricks.delta.snapshotPartitions=50   # a Spark setting to compare

The generated WAT is realistic in shape: a request, a response and a metadata WAT record per page (so most
records carry no images), HTML pages with 0-50 images and ~100 other links, 30-60 % of images with alt text.
It is assembled from a pool of pre-compressed gzip members (one per record, as Common Crawl writes them),
so generating 100 MB takes seconds.

On the same file, one after another: ``gzip -dc`` (the floor: the least work any reader must do); cc2dataset's own
per-file function (``process_wat``, installed into bench/.venv-peers by bench/_peers.py, skipped with the reason
when it cannot be installed); our extraction function alone (fastwarc and warcio readers); and the ``extract``
stage through Spark (``local[1]``, so one core, Delta writes included). Ratios are of CPU seconds (for Spark: the
driver, the JVM and its Python workers together), which other work on a shared machine does not inflate; wall
seconds are printed beside them. Then the stage's fixed cost: ``run_extract`` over a tiny WAT, once the session
exists and after a warm-up run, with the library's local ``snapshotPartitions`` and with Delta's default.

Targets (issue 10): our function >= 1.5x cc2dataset's speed; the Spark stage >= 0.4x the floor; the fixed cost
<= 10 s; peak worker RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

from _peers import PeerUnavailable, run_cc2dataset

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WAT = BENCH_DIR / "data" / "bench.wat.gz"
TINY_WAT = BENCH_DIR / "data" / "tiny.wat.gz"
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
    # Every WAT record carries Payload-Metadata, as Common Crawl writes them (cc2dataset's parser relies on it).
    envelope = {
        "WARC-Header-Metadata": {"WARC-Type": "request", "WARC-Target-URI": url},
        "Payload-Metadata": {
            "Actual-Content-Type": "application/http; msgtype=request",
            "HTTP-Request-Metadata": {"Request-Message": {"Method": "GET", "Path": f"/section/{page}/article.html"}},
        },
    }
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
    metadata = {
        "Envelope": {
            "WARC-Header-Metadata": {"WARC-Type": "metadata", "WARC-Target-URI": url},
            "Payload-Metadata": {
                "Actual-Content-Type": "application/warc-fields",
                "WARC-Metadata-Metadata": {"Metadata-Records": [{"Name": "fetchTimeMs", "Value": "412"}]},
            },
        }
    }
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


def gzip_floor(path: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(["gzip", "-dc", str(path)], stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return dict(wall_s=wall, cpu_s=cpu)


def extraction_alone(path: Path, reader: str) -> dict:
    """Run the worker function in a fresh child process, so its peak RSS is the extraction's alone."""
    code = f"""
import json, resource, sys, time
from laion_spark.extract import ExtractRules, FileStatus, extract_file
wall, cpu = time.perf_counter(), time.process_time()
for item in extract_file({str(path)!r}, ExtractRules(reader={reader!r}), 10000):
    if isinstance(item, FileStatus):
        status = item
print(json.dumps(dict(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu,
                      records=status.records_read, pairs=status.pairs_emitted, status=status.status,
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


def _cpu_seconds_of_tree() -> float:
    """CPU seconds of this process and its descendants (the JVM, its Python daemon and workers), those reaped
    by a live parent included: a per-core figure for Spark that other load on the machine does not inflate."""
    ticks = os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / ticks  # utime, stime, cutime, cstime
    return total


def _timed(run) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), _cpu_seconds_of_tree()
    value = run()
    return time.perf_counter() - wall, _cpu_seconds_of_tree() - cpu, value


def through_spark(path: Path, extra_conf: dict[str, str]) -> dict:
    """The extract stage on ``path`` in a local[1] session built by the library (its local defaults included),
    and before it the stage's fixed cost: a tiny WAT, timed after a warm-up run on it, with the session's
    ``snapshotPartitions`` and with Delta's own default (50), to show what the library's local default saves."""
    from laion_spark.config import Config, SparkConfig
    from laion_spark.extract import run_extract
    from laion_spark.session import build_local_session

    if not TINY_WAT.exists():
        generate_wat(TINY_WAT, 20_000, pool_pages=4)
    started = time.perf_counter()
    spark = build_local_session(
        SparkConfig(
            master="local[1]",
            shuffle_partitions=1,
            conf={
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": "2g",
                **extra_conf,
            },
        )
    )
    session_s = time.perf_counter() - started
    snapshot_key = "spark.databricks.delta.snapshotPartitions"
    snapshot_partitions = spark.conf.get(snapshot_key, "50")
    lake = tempfile.mkdtemp(prefix="bench-extract-lake-")
    tiny = [str(TINY_WAT)]
    poller = WorkerRssPoller()
    poller.start()
    try:
        run_extract(spark, Config(), lake, tiny)  # JVM, Python worker and Delta warm-up
        fixed_wall, fixed_cpu, _ = _timed(lambda: run_extract(spark, Config(), lake, tiny, force=True))
        spark.conf.set(snapshot_key, "50")
        delta_wall, delta_cpu, _ = _timed(lambda: run_extract(spark, Config(), lake, tiny, force=True))
        spark.conf.set(snapshot_key, snapshot_partitions)
        wall, cpu, result = _timed(lambda: run_extract(spark, Config(), lake, [str(path)], force=True))
    finally:
        poller.stop()
        spark.stop()
        shutil.rmtree(lake, ignore_errors=True)
    return dict(
        wall_s=wall,
        cpu_s=cpu,
        records=result.records_read,
        pairs=result.pairs_written,
        peak_rss_mb=poller.peak_kb / 1024,
        session_s=session_s,
        snapshot_partitions=snapshot_partitions,
        fixed_wall_s=fixed_wall,
        fixed_cpu_s=fixed_cpu,
        delta_default_fixed_wall_s=delta_wall,
        delta_default_fixed_cpu_s=delta_cpu,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wat", type=Path, help="a WAT file (default: generate bench/data/bench.wat.gz)")
    parser.add_argument("--size-mb", type=int, default=100, help="compressed size of the generated WAT")
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument("--skip-warcio", action="store_true", help="warcio is several times slower")
    parser.add_argument("--skip-peers", action="store_true", help="do not install or run cc2dataset")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="a Spark setting")
    args = parser.parse_args()
    extra_conf = dict(item.split("=", 1) for item in args.conf)

    path = args.wat or DEFAULT_WAT
    if args.wat is None and (not path.exists() or path.stat().st_size < args.size_mb * 1_000_000):
        started = time.perf_counter()
        generate_wat(path, args.size_mb * 1_000_000)
        print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f}s")
    size_mb = path.stat().st_size / 1e6
    print(f"input: {path} ({size_mb:.0f} MB compressed), {os.cpu_count()} cores on this machine, all figures per core")

    floor = gzip_floor(path)
    print(
        f"{'':<28} {'wall s':>7} {'CPU s':>7}  {'x floor':>7}  {'x cc2dataset':>12}  {'MB/s':>6}  {'pairs':>9}  peak RSS"
    )
    print(
        f"{'floor: gzip -dc':<28} {floor['wall_s']:7.2f} {floor['cpu_s']:7.2f}  {1:7.2f}  {'':>12}  "
        f"{size_mb / floor['cpu_s']:6.1f}"
    )

    peer = None
    if args.skip_peers:
        print("cc2dataset: skipped (--skip-peers)")
    else:
        try:
            peer = run_cc2dataset(path)
        except PeerUnavailable as exc:
            print(f"cc2dataset: skipped, {exc}")
        else:
            _print_row("cc2dataset process_wat", peer, floor, None, size_mb)

    runs = [("ours, fastwarc", "fastwarc")]
    if not args.skip_warcio:
        runs.append(("ours, warcio", "warcio"))
    ours = {}
    for name, reader in runs:
        ours[reader] = extraction_alone(path, reader)
        _print_row(name, ours[reader], floor, peer, size_mb)

    spark = None
    if not args.skip_spark:
        spark = through_spark(path, extra_conf)
        _print_row("Spark local[1] + Delta", spark, floor, peer, size_mb)
        print(
            f"fixed cost: run_extract on a tiny WAT ({TINY_WAT.stat().st_size / 1e3:.0f} kB) after a warm-up: "
            f"{spark['fixed_wall_s']:.1f}s wall, {spark['fixed_cpu_s']:.1f}s CPU with snapshotPartitions="
            f"{spark['snapshot_partitions']}; {spark['delta_default_fixed_wall_s']:.1f}s wall, "
            f"{spark['delta_default_fixed_cpu_s']:.1f}s CPU with Delta's default 50 (session start {spark['session_s']:.1f}s)"
        )

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"load average {load} on {os.cpu_count()} cores: wall seconds count other work, CPU seconds do not")
    print("targets: ours >= 1.5x cc2dataset; Spark stage >= 0.4x floor; fixed cost <= 10 s; peak worker RSS < 300 MB")
    fast = ours["fastwarc"]
    verdicts = [f"ours/floor {floor['cpu_s'] / fast['cpu_s']:.2f}"]
    if peer is not None:
        verdicts.append(f"ours/cc2dataset {peer['cpu_s'] / fast['cpu_s']:.2f}")
    if spark is not None:
        verdicts.append(
            f"Spark/floor {floor['cpu_s'] / spark['cpu_s']:.2f} CPU, {floor['wall_s'] / spark['wall_s']:.2f} wall; "
            f"fixed cost {spark['fixed_wall_s']:.1f}s wall"
        )
    print("result (CPU seconds unless said):  " + "; ".join(verdicts))


def _print_row(name: str, m: dict, floor: dict, peer: dict | None, size_mb: float) -> None:
    against_peer = f"{peer['cpu_s'] / m['cpu_s']:12.2f}" if peer is not None else f"{'':>12}"
    records = f"  {m['records']:,} records" if "records" in m else ""
    print(
        f"{name:<28} {m['wall_s']:7.2f} {m['cpu_s']:7.2f}  {floor['cpu_s'] / m['cpu_s']:7.2f}  {against_peer}  "
        f"{size_mb / m['cpu_s']:6.1f}  {m['pairs']:9,}  {m['peak_rss_mb']:.0f} MB{records}"
    )


if __name__ == "__main__":
    main()
