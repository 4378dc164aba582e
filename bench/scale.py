"""Does every stage scale linearly? Each stage at 1x, 4x and 16x of a base input, time per row and peak memory.

    python bench/scale.py                     # base: 10 WAT files x 5,000 pairs, 5,000 images
    python bench/scale.py --quick             # base: 2 files x 2,000 pairs, 400 images (a smoke test)
    python bench/scale.py --scales 1 4 --base-files 4 --pairs-per-file 5000 --images 1000

The input (bench/_scale_data.py, generated once and cached under bench/data/scale/) is WAT files whose image
URLs point at a loopback image server; a scale s reads s times the base's files, so every stage gets s times
the rows: pairs into extract and candidates, candidate URLs into download, images into score. Most pairs carry
junk alt text that the candidates rules drop, so the base's --images distinct URLs are what is downloaded
(fetched from the server, decoded, resized, stored) and scored (the tiny CLIP model trained on the same shapes).

Each scale runs in a fresh Python process, so in a fresh JVM, with a fresh lake: the stages run one after
another through the library's public functions (run_extract, run_candidates, run_download, run_score) in one
SparkSession, after a warm-up of the same four stages over a small file in a scratch lake (the JVM's code
paths, the Python workers, the model: the fixed cost that every real job pays once). Printed per stage:
the rows, the seconds, the microseconds per row at every scale, and the per-row cost at the largest scale over
the smallest (1.0: linear; target <= 1.15). Peak memory is the proportional set size (PSS: shared pages counted
once) of the driver JVM plus every Python worker, sampled every 0.2 s during each stage; target: flat, the
largest scale's peak at most 1.25 times the smallest's.

Then, on the lake each scale built, one new WAT file is extracted and the candidates stage alone is timed:
the incremental run should cost what the new pairs cost, not what the lake holds (target: the largest
lake's time at most 1.5 times the smallest's). The pairs it read come from its stage_stats (first step's
rows in).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from _scale_data import Inputs, Shape, ensure_inputs, serve_pool  # noqa: E402 - needs the path above

STAGES = ("extract", "candidates", "download", "score")
ROW_MEANING = {
    "extract": "pairs written",
    "candidates": "pairs read",
    "download": "candidate URLs",
    "score": "images scored",
}
TIME_TARGET = 1.15
MEMORY_TARGET = 1.25
INCREMENTAL_TARGET = 1.5
DEFAULT = dict(base_files=10, pairs_per_file=5000, images=5000)
QUICK = dict(base_files=2, pairs_per_file=2000, images=400)


class MemorySampler(threading.Thread):
    """Peak PSS of this process's descendants (the driver JVM; Spark's pyspark.daemon and its workers)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._peaks = {"jvm": 0, "workers": 0, "total": 0}
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            jvm = workers = 0
            for pid in _descendants(os.getpid()):
                kind, kb = _kind_and_pss_kb(pid)
                if kind == "jvm":
                    jvm += kb
                elif kind == "python":
                    workers += kb
            with self._lock:
                for name, kb in (("jvm", jvm), ("workers", workers), ("total", jvm + workers)):
                    self._peaks[name] = max(self._peaks[name], kb)

    def take_peaks_mb(self) -> dict[str, float]:
        """The peaks since the last call, in MB; starts the next window."""
        with self._lock:
            peaks = {name: kb / 1024 for name, kb in self._peaks.items()}
            self._peaks = dict.fromkeys(self._peaks, 0)
        return peaks

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kind_and_pss_kb(pid: int) -> tuple[str, int]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read()
        kind = "jvm" if b"java" in command.split(b"\0", 1)[0] else "python" if b"python" in command else "other"
        if kind == "other":
            return kind, 0
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return kind, int(line.split()[1])
    except OSError:
        pass
    return "other", 0


# --- one scale, in a child process -------------------------------------------------------------------------------


def _config(port: int):
    from laion_spark.config import load_config
    from laion_spark.testing.tiny_clip import ensure_tiny_clip

    config = load_config(ROOT / "conf" / "local.yaml")
    config.spark.app_name = "bench-scale"
    config.spark.conf.update({"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"})
    download = config.download
    download.allowed_hosts = [f"127.0.0.1:{port}"]
    # One loopback host: the per-host limit would otherwise be the bottleneck, and it is the same at every scale.
    download.threads = download.per_host_connections = 32
    tiny = ensure_tiny_clip(ROOT / ".cache" / "models" / "tiny-clip")
    config.clip.model = tiny["model"]
    config.clip.model_config, config.clip.pretrained = tiny["model_config"], tiny["pretrained"]
    config.clip.threshold = tiny["threshold"]
    return config


def _run_stages(spark, config, lake: str, inputs: list[str], sampler: MemorySampler | None, label: str) -> dict:
    from laion_spark.candidates import run_candidates
    from laion_spark.download import run_download
    from laion_spark.extract import run_extract
    from laion_spark.schemas import EMBEDDINGS, IMAGES
    from laion_spark.score import run_score
    from laion_spark.storage import read_table

    rows_of = {
        "extract": lambda result: result.pairs_written,
        "candidates": lambda counter: counter.steps[0][1],
        "download": lambda _: read_table(spark, lake, IMAGES).count(),
        "score": lambda _: read_table(spark, lake, EMBEDDINGS).count(),
    }
    calls = {
        "extract": lambda: run_extract(spark, config, lake, inputs),
        "candidates": lambda: run_candidates(spark, config, lake),
        "download": lambda: run_download(spark, config, lake),
        "score": lambda: run_score(spark, config, lake),
    }
    measured = {}
    for stage in STAGES:
        seconds, peaks, result = _timed(calls[stage], sampler)
        rows = rows_of[stage](result)
        measured[stage] = dict(rows=rows, seconds=seconds, peak_mb=peaks)
        memory = f"  peak {peaks['total']:,.0f} MB" if peaks else ""
        print(f"  {label} {stage:<11}{rows:>10,} rows  {seconds:7.1f} s{memory}", flush=True)
    return measured


def _timed(call, sampler: MemorySampler | None):
    if sampler is not None:
        sampler.take_peaks_mb()
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    peaks = sampler.take_peaks_mb() if sampler is not None else {}
    if sampler is not None:
        peaks["jvm_live"] = _jvm_live_heap_mb()
    return seconds, peaks, result


def _jvm_live_heap_mb() -> float:
    """The driver JVM's heap in use right after a full GC (jcmd): what the stage left live. The PSS peak above
    also counts heap the JVM has touched and not yet collected, which grows toward spark.driver.memory with the
    bytes allocated, whatever stays live; this one grows only if something is kept."""
    jvms = [pid for pid in _descendants(os.getpid()) if _kind_and_pss_kb(pid)[0] == "jvm"]
    if not jvms or shutil.which("jcmd") is None:
        return float("nan")
    pid = str(jvms[0])
    try:
        subprocess.run(["jcmd", pid, "GC.run"], capture_output=True, timeout=60, check=True)
        info = subprocess.run(["jcmd", pid, "GC.heap_info"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return float("nan")
    match = re.search(r"total \d+K, used (\d+)K", info)
    return int(match.group(1)) / 1024 if match else float("nan")


def run_one_scale(scale: int, files: list[str], incremental: str, warm_up: str, port: int) -> dict:
    from laion_spark.candidates import run_candidates
    from laion_spark.extract import run_extract
    from laion_spark.schemas import CANDIDATES
    from laion_spark.session import get_spark
    from laion_spark.storage import read_table

    config = _config(port)
    spark = get_spark(config)
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-scale-{scale}x-"))
    try:
        _run_stages(spark, config, str(scratch / "warm-up-lake"), [warm_up], None, "warm-up")
        sampler = MemorySampler()
        sampler.start()
        lake = str(scratch / "lake")
        stages = _run_stages(spark, config, lake, files, sampler, f"{scale:>3}x")
        extract_s, _, extracted = _timed(lambda: run_extract(spark, config, lake, [incremental]), None)
        candidates_before = read_table(spark, lake, CANDIDATES).count()
        seconds, peaks, counter = _timed(lambda: run_candidates(spark, config, lake), sampler)
        sampler.stop()
        incremental_run = dict(
            new_pairs=extracted.pairs_written,
            extract_seconds=extract_s,
            seconds=seconds,
            pairs_read=counter.steps[0][1],
            # Counted in the table, not taken from the stage's own figures: the bench checks those too.
            candidates_written=read_table(spark, lake, CANDIDATES).count() - candidates_before,
            candidates_reported=dict((step, out) for step, _, out in counter.steps).get("dedup_against_lake", 0),
            peak_mb=peaks,
        )
        print(
            f"  {scale:>3}x incremental: extract {extracted.pairs_written:,} new pairs {extract_s:.1f} s, "
            f"candidates {seconds:.1f} s (read {incremental_run['pairs_read']:,} pairs)",
            flush=True,
        )
        return dict(scale=scale, stages=stages, incremental=incremental_run)
    finally:
        spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)


# --- the parent: data, server, one child per scale, the report ---------------------------------------------------


def _run_child(scale: int, inputs: Inputs, base_files: int, port: int) -> dict:
    request = dict(
        scale=scale,
        files=[str(p) for p in inputs.measured[: scale * base_files]],
        incremental=str(inputs.incremental),
        warm_up=str(inputs.warm_up),
        port=port,
    )
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        request_path, result_path = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request_path.write_text(json.dumps(request))
        subprocess.run([sys.executable, __file__, "--child", str(request_path), str(result_path)], check=True, cwd=ROOT)
        return json.loads(result_path.read_text())


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


def report(results: list[dict], base_files: int, pairs_per_file: int, images: int) -> None:
    scales = [r["scale"] for r in results]
    first, last = results[0], results[-1]
    ratio_name = f"{scales[-1]}x/{scales[0]}x"
    cells = "".join(f"{str(s) + 'x':>11}" for s in scales)
    print(
        f"\nbase (1x): {base_files} WAT files x {pairs_per_file:,} pairs, {images:,} image URLs; "
        f"{os.cpu_count()} cores on this machine"
    )

    print(f"\ntime per row (us) by scale; rows are: {', '.join(f'{s}: {m}' for s, m in ROW_MEANING.items())}")
    print(f"{'stage':<12}{cells}{'':>4}{cells}{'':>4}{cells}{ratio_name:>9}  target")
    header = f"{'':<12}{'rows':>{11 * len(scales)}}{'':>4}{'seconds':>{11 * len(scales)}}"
    print(f"{header}{'':>4}{'us/row':>{11 * len(scales)}}")
    for stage in STAGES:
        measured = [r["stages"][stage] for r in results]
        rows = "".join(f"{m['rows']:>11,}" for m in measured)
        seconds = "".join(f"{m['seconds']:>11.1f}" for m in measured)
        per_row = [m["seconds"] / max(1, m["rows"]) * 1e6 for m in measured]
        ratio = per_row[-1] / per_row[0]
        print(
            f"{stage:<12}{rows}{'':>4}{seconds}{'':>4}{''.join(f'{u:>11.1f}' for u in per_row)}"
            f"{ratio:>9.2f}  <= {TIME_TARGET}  {_verdict(ratio, TIME_TARGET)}"
        )

    print("\npeak memory (MB PSS) by scale: driver JVM + Python workers (JVM / workers)")
    columns = "".join(f"{str(s) + 'x':>20}" for s in scales)
    print(f"{'stage':<12}{columns}{ratio_name:>9}  target")
    for stage in STAGES:
        peaks = [r["stages"][stage]["peak_mb"] for r in results]
        text = "".join(f"{p['total']:>7,.0f} ({p['jvm']:>4,.0f} /{p['workers']:>4,.0f})" for p in peaks)
        ratio = peaks[-1]["total"] / peaks[0]["total"]
        print(f"{stage:<12}{text}{ratio:>9.2f}  <= {MEMORY_TARGET}  {_verdict(ratio, MEMORY_TARGET)}")

    print("\ndriver JVM heap live after each stage (MB, after a full GC; jcmd GC.heap_info)")
    columns = "".join(f"{str(s) + 'x':>10}" for s in scales)
    print(f"{'stage':<12}{columns}{ratio_name:>9}  target")
    for stage in STAGES:
        live = [r["stages"][stage]["peak_mb"].get("jvm_live", float("nan")) for r in results]
        ratio = live[-1] / live[0] if live[0] else float("nan")
        text = "".join(f"{value:>10,.0f}" for value in live)
        print(f"{stage:<12}{text}{ratio:>9.2f}  <= {MEMORY_TARGET}  {_verdict(ratio, MEMORY_TARGET)}")

    small, large = first["incremental"], last["incremental"]
    ratio = large["seconds"] / small["seconds"]
    print(f"\nincremental candidates: one new file ({small['new_pairs']:,} pairs) over the lake of each scale")
    for result in results:
        run, pairs = result["incremental"], result["stages"]["extract"]["rows"]
        print(
            f"  lake of {result['scale']:>2}x ({pairs:>9,} pairs): {run['seconds']:6.1f} s, read {run['pairs_read']:,} "
            f"pairs, wrote {run['candidates_written']:,} candidates, peak {run['peak_mb']['total']:,.0f} MB"
        )
        if run["candidates_reported"] != run["candidates_written"]:
            print(f"    (its stage_stats say {run['candidates_reported']:,} written: the stage's count is off)")
    print(f"  ratio {ratio_name}: {ratio:.2f}  (target <= {INCREMENTAL_TARGET})  {_verdict(ratio, INCREMENTAL_TARGET)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--quick", action="store_true", help="a small base for a smoke test: " + str(QUICK))
    parser.add_argument("--base-files", type=int, help=f"WAT files at 1x (default {DEFAULT['base_files']})")
    parser.add_argument("--pairs-per-file", type=int, help=f"default {DEFAULT['pairs_per_file']:,}")
    parser.add_argument("--images", type=int, help=f"distinct image URLs at 1x (default {DEFAULT['images']:,})")
    parser.add_argument("--port", type=int, default=18931, help="the loopback image server's port (in the URLs)")
    parser.add_argument("--child", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        request = json.loads(Path(args.child[0]).read_text())
        result = run_one_scale(**request)
        Path(args.child[1]).write_text(json.dumps(result))
        return 0

    base = dict(QUICK if args.quick else DEFAULT)
    for name in base:
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    if base["images"] % base["base_files"]:
        parser.error("--images must be a multiple of --base-files (every file has the same share)")
    scales = sorted(set(args.scales))
    shape = Shape(
        base["pairs_per_file"], base["images"] // base["base_files"], max(scales) * base["base_files"], args.port
    )
    started = time.perf_counter()
    inputs = ensure_inputs(shape)
    server = serve_pool(args.port)
    try:
        results = []
        for scale in scales:
            print(f"scale {scale}x: {scale * base['base_files']} files", flush=True)
            results.append(_run_child(scale, inputs, base["base_files"], args.port))
    finally:
        server.terminate()
    # Kept, so that the figures of a long run are not only in a terminal's scrollback.
    (shape.directory / "last-run.json").write_text(json.dumps(dict(base=base, results=results), indent=1))
    report(results, base["base_files"], base["pairs_per_file"], base["images"])
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
