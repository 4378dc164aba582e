"""Images/s of CLIP scoring through Spark (mapInArrow, the stage's path) against a bare open_clip loop, on equal cores.

    python bench/score.py                         # the tiny test model: 1 core vs 1 core, then 2 vs 2
    python bench/score.py --model ViT-B-32        # ViT-B/32's architecture, random weights made here (no download)
    python bench/score.py --model ViT-B-32 --pretrained /path/open_clip_pytorch_model.bin --cores 2

Each row of the table runs in a fresh process pinned to the same ``N`` cores (``sched_setaffinity``, inherited by
Spark's JVM and Python workers) with ``OMP_NUM_THREADS=N``:

* bare: one Python process, ``torch.set_num_threads(N)``: PIL decode, open_clip's preprocess, tokenizer and
  both encoders, batch after batch. The floor a hand-written loop reaches.
* spark: ``local[N]`` with ``N`` tasks; each task's worker gives torch the task's one core (``spark.task.cpus``),
  so both sides run ``N`` torch threads on ``N`` cores.

Both start from the same JPEG bytes in memory (the Spark input is cached before timing, so neither side reads
files), use the same model file (loaded through ``pretrained=``, as a user's weights are), batch size and fp32 on
the CPU. The Spark figure is steady state: a warm-up run starts the Python workers and loads the model first, as
for every task after the first in a real job. Runs alternate (spark, bare, spark, bare, ...) and the ratio is the
median over rounds of adjacent pairs, so that load from other processes on the machine hits both sides alike.
Target: spark/bare >= 0.9 on one core.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
MODELS = ROOT / ".cache" / "models"


def make_images(count: int, size: int) -> list[tuple[str, bytes, str]]:
    from laion_spark.testing import synthetic

    kinds = synthetic.all_kinds()
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        jpeg = synthetic.encode(synthetic.draw(kind, size=size, seed=50_000 + i))
        rows.append((f"uid-{i:06d}", jpeg, kind.caption))
    return rows


def random_weights(name: str) -> str:
    """A checkpoint of ``name``'s architecture with random weights, written once under .cache/models."""
    import open_clip
    import torch

    path = MODELS / f"{name.lower()}-random" / "open_clip_random_weights.pt"
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return str(path)


class BareLoop:
    """open_clip as its README uses it, and nothing of laion_spark: the floor."""

    def __init__(self, clip, batch_size: int) -> None:
        import open_clip

        if clip.model_config:
            open_clip.add_model_config(clip.model_config)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            clip.model, pretrained=clip.pretrained or None
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(clip.model)
        self.batch_size = batch_size

    def run(self, rows) -> float:
        """Seconds for decode + preprocess + tokenize + both encoders + similarity over every row."""
        import torch
        from PIL import Image

        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                pixels = torch.stack(
                    [self.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")) for _, jpeg, _ in chunk]
                )
                tokens = self.tokenizer([text for _, _, text in chunk])
                image_features = self.model.encode_image(pixels, normalize=True)
                text_features = self.model.encode_text(tokens, normalize=True)
                (image_features * text_features).sum(dim=-1).numpy()
        return time.perf_counter() - started


def measure(args: argparse.Namespace) -> dict:
    """One row: this process is already pinned to ``args.cores`` cores."""
    import pyarrow.parquet as pq
    import torch

    from laion_spark.config import ClipConfig, SparkConfig
    from laion_spark.score import ScoringSettings, score_pairs
    from laion_spark.session import build_local_session

    torch.set_num_threads(args.cores)
    clip = ClipConfig(
        model=args.model,
        pretrained=args.pretrained,
        model_config=args.model_config,
        batch_size=args.batch_size,
        device="cpu",
        precision="fp32",
        embedding_dtype="float32",
    )
    settings = ScoringSettings.from_config(clip)
    table = pq.read_table(args.table)
    rows = list(zip(*(table.column(name).to_pylist() for name in ("uid", "image", "text")), strict=True))

    spark = build_local_session(
        SparkConfig(
            master=f"local[{args.cores}]",
            app_name="bench-clip",
            conf={
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": "2g",
                "spark.sql.execution.arrow.maxRecordsPerBatch": str(args.arrow_batch),
            },
        )
    )
    spark.sparkContext.setLogLevel("ERROR")
    pairs = spark.read.parquet(args.table).repartition(args.cores).persist()
    pairs.count()

    def spark_run() -> float:
        started = time.perf_counter()
        score_pairs(pairs, settings).write.format("noop").mode("overwrite").save()
        return time.perf_counter() - started

    bare = BareLoop(clip, args.batch_size)
    cold = spark_run()
    bare.run(rows[: args.batch_size])  # warm-up: first-call allocations and kernel choices
    spark_seconds, bare_seconds = [], []
    for _ in range(args.rounds):
        spark_seconds.append(spark_run())
        bare_seconds.append(bare.run(rows))
    spark.stop()
    return {
        "cores": args.cores,
        "torch_threads": torch.get_num_threads(),
        "images": len(rows),
        "cold_s": cold,
        "spark_s": spark_seconds,
        "bare_s": bare_seconds,
    }


def run_row(args: argparse.Namespace, cores: int, table: str, clip) -> dict:
    """:func:`measure` in a fresh process pinned to the first ``cores`` cores, with OMP/MKL at ``cores`` threads."""
    available = sorted(os.sched_getaffinity(0))
    if cores > len(available):
        raise SystemExit(f"--cores {cores}: only {len(available)} cores are available here")
    pinned = ",".join(str(cpu) for cpu in available[:cores])
    env = dict(os.environ, OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores), BENCH_PIN_CPUS=pinned)
    command = [sys.executable, __file__, "--measure", "--cores", str(cores), "--table", table]
    command += ["--model", clip.model, "--pretrained", clip.pretrained, "--model-config", clip.model_config]
    command += ["--batch-size", str(args.batch_size), "--rounds", str(args.rounds)]
    command += ["--arrow-batch", str(args.arrow_batch)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"the {cores}-core run failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-clip", help="tiny-clip (trained here) or an open_clip name")
    parser.add_argument("--pretrained", default=None, help="checkpoint path or tag (default: random weights)")
    parser.add_argument("--model-config", default="")
    parser.add_argument("--images", type=int, default=0, help="default: 1024 for tiny-clip, 128 otherwise")
    parser.add_argument("--size", type=int, default=256, help="side of the stored JPEGs (the download stage's 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cores", default="1,2", help="comma-separated core counts, one table row each")
    parser.add_argument("--rounds", type=int, default=3, help="alternating spark/bare runs per row")
    parser.add_argument("--arrow-batch", type=int, default=10000, help="spark.sql.execution.arrow.maxRecordsPerBatch")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--table", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        pinned = os.environ.get("BENCH_PIN_CPUS")
        if pinned:
            os.sched_setaffinity(0, {int(cpu) for cpu in pinned.split(",")})
        args.cores = int(args.cores)
        print(json.dumps(measure(args)))
        return 0

    import pyarrow as pa
    import pyarrow.parquet as pq

    from laion_spark.config import ClipConfig
    from laion_spark.testing.tiny_clip import ensure_tiny_clip

    clip = ClipConfig(model=args.model, model_config=args.model_config)
    if args.model == "tiny-clip":
        tiny = ensure_tiny_clip(MODELS / "tiny-clip")
        clip.model_config, clip.pretrained = tiny["model_config"], tiny["pretrained"]
    elif args.pretrained is None:
        clip.pretrained = random_weights(args.model)
    if args.pretrained is not None:
        clip.pretrained = args.pretrained
    images = args.images or (1024 if args.model == "tiny-clip" else 128)
    rows = make_images(images, args.size)
    print(
        f"clip bench: model {args.model} ({clip.pretrained}), cpu fp32, {len(rows)} images of {args.size}px, "
        f"batch {args.batch_size}, median of {args.rounds} alternating rounds"
    )
    print(f"  {'cores':>5}  {'threads (spark | bare)':<34} {'spark img/s':>11} {'bare img/s':>10} {'spark/bare':>10}")
    with tempfile.TemporaryDirectory() as scratch:
        table = f"{scratch}/pairs.parquet"
        columns = {"uid": [r[0] for r in rows], "image": [r[1] for r in rows], "text": [r[2] for r in rows]}
        pq.write_table(
            pa.table(columns, schema=pa.schema([("uid", pa.string()), ("image", pa.binary()), ("text", pa.string())])),
            table,
        )
        for cores in (int(value) for value in args.cores.split(",")):
            result = run_row(args, cores, table, clip)
            count = result["images"]
            ratios = [bare / spark for spark, bare in zip(result["spark_s"], result["bare_s"], strict=True)]
            threads = f"local[{cores}] {cores}x1 | 1 proc x{result['torch_threads']}"
            print(
                f"  {cores:>5}  {threads:<34} {count / statistics.median(result['spark_s']):>11.1f} "
                f"{count / statistics.median(result['bare_s']):>10.1f} {statistics.median(ratios):>9.2f}x"
                f"   (rounds {' '.join(f'{r:.2f}' for r in ratios)}; cold spark run {count / result['cold_s']:.0f} img/s)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
