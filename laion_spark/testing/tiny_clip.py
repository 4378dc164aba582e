"""Train the tiny CLIP model that tests and the demo use, on synthetic shapes and their captions.

    python -m laion_spark.testing.tiny_clip --out .cache/models/tiny-clip/tiny_clip.pt

Writes the checkpoint and, next to it, the open_clip model config ``tiny-clip.json``. The checkpoint loads the
way a user's own weights do::

    open_clip.add_model_config(".cache/models/tiny-clip/tiny-clip.json")
    open_clip.create_model_and_transforms("tiny-clip", pretrained=".cache/models/tiny-clip/tiny_clip.pt")

The model is a real open_clip CLIP (a 2-layer ViT on 64 px images and a 2-layer text transformer, a few MB),
trained contrastively on CPU in about a minute. Every batch holds each kind of image once, so that no caption
in a batch is a false negative for another image. Seeds are fixed: the same run gives the same weights.
Images with seeds >= ``HELD_OUT_SEED`` are never trained on; the script reports how well they are separated.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

MODEL_NAME = "tiny-clip"
CHECKPOINT_NAME = "tiny_clip.pt"
# Where `make` trains it, relative to the working directory (the checkout's root for make demo / make test).
DEFAULT_DIR = Path(".cache") / "models" / MODEL_NAME
# The tiny model's cosine similarities are not ViT-B/32's: matching captions of held-out synthetic images score
# about 0.9 and mismatching ones about 0.0, so the demo cuts in between.
THRESHOLD = 0.5
HELD_OUT_SEED = 1000
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Paraphrases teach the text tower to read colour, shape and background rather than one fixed sentence. Each
# names all three: a caption that left one out would also describe other images of the same batch, which the
# contrastive loss would then push away as negatives.
CAPTION_TEMPLATES = [
    "a {color} {shape} on a {background} background",
    "a {color} {shape} on a {background} background",
    "a photo of a {color} {shape} on {background}",
    "a {shape} in {color} on a {background} background",
    "{color} {shape} on {background}",
    "a drawing of a {color} {shape} against a {background} background",
    "{shape}, {color}, {background} backdrop",
    "{background} background with a {color} {shape}",
]

log = logging.getLogger("train_tiny_clip")


def tiny_clip_settings(directory: str | Path = DEFAULT_DIR) -> dict[str, Any]:
    """``clip`` config values that select the tiny model in ``directory`` (absolute paths, for executors)."""
    directory = Path(directory).resolve()
    return {
        "model": MODEL_NAME,
        "model_config": str(directory / f"{MODEL_NAME}.json"),
        "pretrained": str(directory / CHECKPOINT_NAME),
        "threshold": THRESHOLD,
    }


def ensure_tiny_clip(directory: str | Path = DEFAULT_DIR) -> dict[str, Any]:
    """:func:`tiny_clip_settings` for ``directory``, training the model there first when it is not there yet."""
    settings = tiny_clip_settings(directory)
    if not (Path(settings["pretrained"]).is_file() and Path(settings["model_config"]).is_file()):
        log.warning("training the tiny CLIP model into %s (about a minute on two cores)", directory)
        train(Path(settings["pretrained"]), steps=600, train_seeds=12, threads=1)
    return settings


def caption_variant(kind, rng: random.Random) -> str:
    template = rng.choice(CAPTION_TEMPLATES)
    return template.format(color=kind.color, shape=kind.shape, background=kind.background)


def image_tensors(kinds, seeds: range, preprocess):
    """Preprocessed tensors [len(seeds), len(kinds), 3, H, W] of JPEG-encoded drawings, as the pipeline sees them."""
    import io

    import torch
    from PIL import Image

    from laion_spark.testing import synthetic

    per_seed = []
    for seed in seeds:
        row = []
        for kind in kinds:
            encoded = synthetic.encode(synthetic.draw(kind, size=256, seed=seed))
            row.append(preprocess(Image.open(io.BytesIO(encoded)).convert("RGB")))
        per_seed.append(torch.stack(row))
    return torch.stack(per_seed)


def train(out: Path, steps: int, train_seeds: int, threads: int) -> dict[str, float]:
    import open_clip
    import torch
    import torch.nn.functional as F

    from laion_spark.testing import synthetic

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    rng = random.Random(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n")
    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    kinds = synthetic.all_kinds()
    started = time.perf_counter()
    train_images = image_tensors(kinds, range(train_seeds), preprocess)
    log.info("drew %d training images in %.1fs", train_images.shape[0] * len(kinds), time.perf_counter() - started)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    labels = torch.arange(len(kinds))
    model.train()
    for step in range(steps):
        seeds = torch.randint(0, train_seeds, (len(kinds),))
        images = train_images[seeds, labels]
        # Mild pixel jitter: the pipeline's images are re-encoded and resized by the download stage.
        images = images + 0.05 * torch.randn_like(images)
        texts = tokenizer([caption_variant(kind, rng) for kind in kinds])
        image_features, text_features, logit_scale = model(images, texts)
        logits = logit_scale * image_features @ text_features.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.3f (%.0fs)", step, steps, loss.item(), time.perf_counter() - started)

    model.eval()
    # Half precision halves the file; open_clip's loader copies the weights back into fp32 parameters.
    state_dict = {
        key: value.half() if value.is_floating_point() else value for key, value in model.state_dict().items()
    }
    torch.save(state_dict, out)
    return evaluate(config_path, out)


def evaluate(config_path: Path, checkpoint: Path, held_out_seeds: int = 3) -> dict[str, float]:
    """Reload through ``pretrained=`` and compare matching with mismatching captions on held-out seeds."""
    import open_clip
    import torch

    from laion_spark.testing import synthetic

    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    kinds = synthetic.all_kinds()
    seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + held_out_seeds)
    images = image_tensors(kinds, seeds, preprocess).flatten(0, 1)
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokenizer([kind.caption for kind in kinds]), normalize=True)
    similarity = image_features @ text_features.T  # [seeds * kinds, kinds]
    truth = torch.arange(len(kinds)).repeat(len(seeds))
    matching = similarity[torch.arange(len(truth)), truth]
    mismatch_mask = torch.ones_like(similarity, dtype=torch.bool)
    mismatch_mask[torch.arange(len(truth)), truth] = False
    mismatching = similarity[mismatch_mask]
    top1 = (similarity.argmax(dim=1) == truth).float().mean().item()
    return {
        "held_out_top1": top1,
        "matching_min": matching.min().item(),
        "matching_p05": matching.quantile(0.05).item(),
        "matching_mean": matching.mean().item(),
        "mismatching_mean": mismatching.mean().item(),
        "mismatching_p99": mismatching.quantile(0.99).item(),
        "matching_above_every_mismatch_of_its_image": (
            (matching > similarity.masked_fill(~mismatch_mask, -2).max(dim=1).values).float().mean().item()
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR / CHECKPOINT_NAME)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-seeds", type=int, default=12)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 stays fast when other jobs share the cores"
    )
    parser.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    parser.add_argument("--evaluate", action="store_true", help="only report held-out separation of --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config_path = args.out.parent / f"{MODEL_NAME}.json"
    if args.evaluate:
        report = evaluate(config_path, args.out)
    elif args.out.exists() and config_path.exists() and not args.force:
        log.info("%s exists; pass --force to retrain", args.out)
        return 0
    else:
        started = time.perf_counter()
        report = train(args.out, args.steps, args.train_seeds, args.threads)
        log.info(
            "trained in %.0fs: %s (%.1f MB)", time.perf_counter() - started, args.out, args.out.stat().st_size / 1e6
        )
    for key, value in report.items():
        print(f"{key:>45}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
