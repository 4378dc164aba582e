"""Images/s of CLIP scoring through Spark (mapInArrow, the stage's path) against a bare open_clip loop.

    python bench/score.py                                   # the tiny model, CPU
    python bench/score.py --model ViT-B-32 --pretrained ""  # ViT-B/32's architecture, random weights (no download)
    python bench/score.py --model ViT-B-32 --pretrained /path/open_clip_pytorch_model.bin

Both paths score the same JPEG bytes with the same model and batch size on the same device. The bare loop is
the floor: one process that decodes, preprocesses and runs the model batch after batch, with every core for
torch. The Spark figure is steady state: Python workers are started and the model loaded by a warm-up run
first, as they are for every task after the first in a real job. Target: Spark at least 0.85x the bare loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def make_images(count: int, size: int) -> list[tuple[str, bytes, str]]:
    from laion_spark.testing import synthetic

    kinds = synthetic.all_kinds()
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        jpeg = synthetic.encode(synthetic.draw(kind, size=size, seed=50_000 + i))
        rows.append((f"uid-{i:06d}", jpeg, kind.caption))
    return rows


def bare_loop(rows, spec, device: str, batch_size: int) -> float:
    """Seconds for decode + preprocess + both encoders + similarity over every row, in one process."""
    import torch

    from laion_spark.score import decode_image, load_clip

    loaded = load_clip(spec, device)
    loaded.encode_images(torch.stack([loaded.preprocess(decode_image(rows[0][1]))]))  # warm up kernels
    _sync(device)
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pixels = torch.stack([loaded.preprocess(decode_image(image)) for _, image, _ in chunk])
        image_features = loaded.encode_images(pixels)
        text_features = loaded.encode_texts([text for _, _, text in chunk])
        (image_features * text_features).sum(dim=-1).cpu().numpy()
    _sync(device)
    return time.perf_counter() - started


def spark_path(spark, table: str, settings, partitions: int) -> float:
    from laion_spark.score import score_pairs

    pairs = spark.read.parquet(table).repartition(partitions)
    started = time.perf_counter()
    score_pairs(pairs, settings).write.format("noop").mode("overwrite").save()
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="side of the stored JPEGs (the download stage's 256)")
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument("--pretrained", default=None, help="tag or checkpoint path; '' for random weights")
    parser.add_argument("--model-config", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--partitions", type=int, default=0, help="Spark tasks (default: the master's cores)")
    parser.add_argument("--arrow-batch", type=int, default=10000, help="spark.sql.execution.arrow.maxRecordsPerBatch")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from laion_spark.config import ClipConfig, SparkConfig
    from laion_spark.score import ModelSpec, ScoringSettings, task_device
    from laion_spark.session import build_local_session
    from laion_spark.testing.tiny_clip import ensure_tiny_clip

    clip = ClipConfig(model=args.model, batch_size=args.batch_size, device=args.device)
    if args.model == "tiny-clip":
        tiny = ensure_tiny_clip(ROOT / ".cache" / "models" / "tiny-clip")
        clip.model_config, clip.pretrained = tiny["model_config"], tiny["pretrained"]
    if args.pretrained is not None:
        clip.pretrained = args.pretrained
    if args.model_config is not None:
        clip.model_config = args.model_config
    settings = ScoringSettings.from_config(clip)
    spec = ModelSpec.from_config(clip)
    device = task_device(args.device, {})

    rows = make_images(args.images, args.size)
    spark = build_local_session(
        SparkConfig(
            master=args.master,
            app_name="bench-clip",
            conf={
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": "4g",
                "spark.sql.execution.arrow.maxRecordsPerBatch": str(args.arrow_batch),
            },
        )
    )
    partitions = args.partitions or spark.sparkContext.defaultParallelism
    with tempfile.TemporaryDirectory() as scratch:
        table = f"{scratch}/pairs.parquet"
        spark.createDataFrame(rows, "uid string, image binary, text string").write.parquet(table)
        cold = spark_path(spark, table, settings, partitions)
        spark_seconds = min(spark_path(spark, table, settings, partitions) for _ in range(args.repeats))
        spark.stop()
        bare_seconds = min(bare_loop(rows, spec, device, args.batch_size) for _ in range(args.repeats))

    spark_rate = len(rows) / spark_seconds
    bare_rate = len(rows) / bare_seconds
    print(
        f"clip bench: model {args.model} ({clip.pretrained or 'random weights'}), device {device}, "
        f"{len(rows)} images of {args.size}px, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
        f"spark {args.master} with {partitions} tasks"
    )
    print(f"  bare open_clip loop (floor)  {bare_rate:9.1f} images/s")
    print(f"  spark mapInArrow, warm       {spark_rate:9.1f} images/s   {spark_rate / bare_rate:.2f}x floor")
    print(f"  spark, first run (cold)      {len(rows) / cold:9.1f} images/s   {bare_seconds / cold:.2f}x floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
