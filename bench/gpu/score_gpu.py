"""Images/s of laion_spark's scoring worker against a bare open_clip loop on one GPU, without Spark.

For the device machine: torch with CUDA, but no Spark, no Java and no network. On this side, first::

    .venv/bin/python bench/gpu/fetch_wheels.py      # open_clip and its small deps -> bench/gpu/wheels/ (~16 MiB)

then run there (carry bench/gpu/wheels, which is gitignored)::

    python bench/gpu/score_gpu.py                   # ViT-B-32, random weights, 2048 images, cuda
    python bench/gpu/score_gpu.py --device cpu --images 64     # the smoke test that runs anywhere

What travels is the working tree (laion_spark itself is imported from it, not installed) and the wheels; the
script installs the wheels with ``pip install --no-index --find-links`` when open_clip is not importable.

Both sides score the same in-memory JPEGs (256 px, as the download stage stores them) with ViT-B-32's
architecture and random weights made here and loaded through ``pretrained=<file>``, the same batch size and the
same autocast precision:

* worker: ``laion_spark.score.worker.score_batches`` with ``device=cuda``, the function each Spark task runs:
  a prefetch thread decodes, preprocesses and tokenizes while the calling thread runs the model; the output is
  the embeddings rows (numpy columns).
* bare: open_clip's README loop: PIL decode, ``preprocess``, ``tokenizer``, ``encode_image``/``encode_text``
  under ``torch.autocast``, one batch after another in one thread.

Runs alternate (worker, bare, ...) after a warm-up of each, and the ratio is the median over rounds. A run of the
defaults takes about a minute on an H100 (most of it the CPU decoding JPEGs); --images bounds it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WHEELS = HERE / "wheels"


def ensure_open_clip() -> None:
    """Install open_clip (and PyYAML for laion_spark.config) from the carried wheels when they are missing."""
    try:
        import open_clip  # noqa: F401
        import yaml  # noqa: F401

        return
    except ImportError:
        pass
    if not any(WHEELS.glob("*.whl")):
        raise SystemExit(f"open_clip is not installed and {WHEELS} has no wheels: run bench/gpu/fetch_wheels.py first")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(WHEELS)]
    command += ["open_clip_torch", "pyyaml"]
    if subprocess.run(command, check=False).returncode != 0:
        # An externally managed (PEP 668) Python refuses plain installs; the user site is enough here.
        subprocess.run([*command, "--user", "--break-system-packages"], check=True)
    importlib.invalidate_caches()
    import site

    if site.ENABLE_USER_SITE and site.getusersitepackages() not in sys.path:
        sys.path.append(site.getusersitepackages())


def import_worker() -> types.ModuleType:
    """laion_spark.score.worker: the package loads its Spark side lazily, so this needs no pyspark."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("laion_spark.score.worker")


def make_rows(count: int, size: int) -> dict[str, list]:
    """``count`` rows of JPEG bytes and captions; 256 distinct drawings repeated (decoding is the cost, not drawing)."""
    from laion_spark.testing import synthetic

    kinds = synthetic.all_kinds()
    distinct = min(count, 256)
    jpegs = [
        synthetic.encode(synthetic.draw(kinds[i % len(kinds)], size=size, seed=60_000 + i)) for i in range(distinct)
    ]
    return {
        "uid": [f"uid-{i:07d}" for i in range(count)],
        "image": [jpegs[i % distinct] for i in range(count)],
        "text": [kinds[(i % distinct) % len(kinds)].caption for i in range(count)],
    }


def random_weights(name: str, directory: str) -> str:
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    path = Path(directory) / f"{name.lower()}-random.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def worker_run(worker, rows: dict[str, list], settings, device: str, arrow_batch: int) -> float:
    batches = (
        {key: values[start : start + arrow_batch] for key, values in rows.items()}
        for start in range(0, len(rows["uid"]), arrow_batch)
    )
    started = time.perf_counter()
    scored = sum(len(batch) for batch in worker.score_batches(batches, settings, device=device))
    sync(device)
    assert scored == len(rows["uid"]), (scored, len(rows["uid"]))
    return time.perf_counter() - started


class BareLoop:
    def __init__(self, name: str, pretrained: str, device: str, precision: str, batch_size: int) -> None:
        import open_clip
        import torch

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.batch_size = device, batch_size
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def run(self, rows: dict[str, list]) -> float:
        import contextlib

        import torch
        from PIL import Image

        autocast = (
            torch.autocast(self.device.split(":")[0], dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        )
        started = time.perf_counter()
        with torch.inference_mode(), autocast:
            for start in range(0, len(rows["uid"]), self.batch_size):
                jpegs = rows["image"][start : start + self.batch_size]
                pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs])
                tokens = self.tokenizer(rows["text"][start : start + self.batch_size])
                image_features = self.model.encode_image(pixels.to(self.device), normalize=True)
                text_features = self.model.encode_text(tokens.to(self.device), normalize=True)
                (image_features.float() * text_features.float()).sum(dim=-1).cpu().numpy()
        sync(self.device)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="", help="fp32 | fp16 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--arrow-batch", type=int, default=10000, help="rows per batch fed to the worker")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    ensure_open_clip()
    worker = import_worker()
    import torch

    from laion_spark.score.model import ModelSpec

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU here; pass --device cpu")
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    started = time.perf_counter()
    rows = make_rows(args.images, args.size)
    with tempfile.TemporaryDirectory() as scratch:
        weights = random_weights(args.model, scratch)
        spec = ModelSpec(name=args.model, pretrained=weights, precision=precision)
        settings = worker.ScoringSettings(spec=spec, device=args.device, batch_size=args.batch_size)
        bare = BareLoop(args.model, weights, args.device, precision, args.batch_size)
        warm = {key: values[: args.batch_size] for key, values in rows.items()}
        worker_run(worker, warm, settings, args.device, args.arrow_batch)  # loads the model, warms kernels
        bare.run(warm)
        worker_seconds, bare_seconds = [], []
        for _ in range(args.rounds):
            worker_seconds.append(worker_run(worker, rows, settings, args.device, args.arrow_batch))
            bare_seconds.append(bare.run(rows))

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    count = len(rows["uid"])
    ratios = [bare / scored for scored, bare in zip(worker_seconds, bare_seconds, strict=True)]
    print(
        f"score_gpu: {args.model} (random weights), {device_name}, {precision}, {count} images of {args.size}px, "
        f"batch {args.batch_size}, torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, median of {args.rounds} alternating rounds"
    )
    print(f"  worker (laion_spark.score.worker) {count / statistics.median(worker_seconds):9.1f} images/s")
    print(f"  bare open_clip loop              {count / statistics.median(bare_seconds):9.1f} images/s")
    print(
        f"  worker/bare                       {statistics.median(ratios):9.2f}x   "
        f"(rounds {' '.join(f'{r:.2f}' for r in ratios)}; {time.perf_counter() - started:.0f}s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
