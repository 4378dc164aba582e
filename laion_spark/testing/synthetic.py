"""Synthetic images with captions that describe them: colored shapes on plain backgrounds.

The tiny CLIP model used by tests and the demo is trained on these, the demo's web pages point at them, and
the download tests serve them, so every stage sees images whose captions really match (or really don't).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ["circle", "square", "triangle", "star", "stripes", "cross"]
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "pale blue": (200, 220, 245),
    "beige": (235, 225, 200),
}


@dataclass(frozen=True)
class SyntheticImage:
    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    @property
    def slug(self) -> str:
        return f"{self.color}-{self.shape}-{self.background.replace(' ', '_')}"


def all_kinds() -> list[SyntheticImage]:
    return [
        SyntheticImage(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS if c != "white" or b != "beige"
    ]


def draw(kind: SyntheticImage, size: int = 320, seed: int = 0, noise: bool = True) -> Image.Image:
    """Draw ``kind`` with a random position, scale and slight noise so that no two images are identical."""
    rng = random.Random(f"{kind.slug}-{seed}")
    image = Image.new("RGB", (size, size), BACKGROUNDS[kind.background])
    pen = ImageDraw.Draw(image)
    fill = COLORS[kind.color]
    radius = rng.uniform(0.22, 0.38) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif kind.shape == "square":
        pen.rectangle(box, fill=fill)
    elif kind.shape == "triangle":
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    elif kind.shape == "star":
        pen.regular_polygon((cx, cy, radius), n_sides=5, rotation=rng.uniform(0, 72), fill=fill)
        pen.regular_polygon((cx, cy, radius * 0.5), n_sides=5, rotation=rng.uniform(0, 72) + 36, fill=fill)
    elif kind.shape == "stripes":
        step = max(4, int(size / rng.uniform(6, 10)))
        for x in range(0, size, step * 2):
            pen.rectangle((x, 0, x + step, size), fill=fill)
    elif kind.shape == "cross":
        bar = radius * 0.35
        pen.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
        pen.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)
    if noise:
        # Pillow's effect_noise draws from the C library's unseeded rand(): the grain would differ on every
        # call, and with it byte sizes near the 5 KB minimum. A seeded generator keeps every image reproducible.
        sigma = rng.uniform(8, 20)
        grain_values = np.random.default_rng(rng.getrandbits(64)).normal(128.0, sigma, (size, size))
        grain = Image.fromarray(np.clip(grain_values, 0, 255).astype(np.uint8), "L").convert("RGB")
        image = Image.blend(image, grain, 0.08).filter(ImageFilter.SMOOTH)
    return image


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()
