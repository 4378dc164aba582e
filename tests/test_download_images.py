"""Checking, decoding, resizing and re-encoding one image with Pillow (no network, no Spark)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace

import pytest
from image_server import make_decompression_bomb, make_image
from PIL import Image

from laion_spark.download import status
from laion_spark.download.images import ImageSettings, process_image
from laion_spark.testing.synthetic import SyntheticImage, draw

SETTINGS = ImageSettings()


def _wide_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    draw(SyntheticImage("blue", "stripes", "beige"), size=max(width, height)).resize((width, height)).save(
        buffer, format="JPEG", quality=95
    )
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_every_format_decodes_and_resizes_to_a_bordered_square(fmt: str) -> None:
    body = make_image(fmt)
    result = process_image(body, SETTINGS)
    assert result.status == status.SUCCESS, result.error
    assert (result.original_width, result.original_height) == (400, 400)
    assert (result.width, result.height) == (256, 256)
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    stored = Image.open(io.BytesIO(result.image))
    assert stored.format == "JPEG" and stored.size == (256, 256) and stored.mode == "RGB"


@pytest.mark.parametrize(
    "mode, size",
    [("border", (256, 256)), ("keep_ratio", (512, 256)), ("center_crop", (256, 256)), ("no", (800, 400))],
)
def test_resize_modes(mode: str, size: tuple[int, int]) -> None:
    result = process_image(_wide_jpeg(800, 400), replace(SETTINGS, resize_mode=mode))
    assert result.status == status.SUCCESS, result.error
    assert (result.width, result.height) == size
    assert Image.open(io.BytesIO(result.image)).size == size


def test_border_mode_pads_with_black_bars() -> None:
    result = process_image(_wide_jpeg(800, 400), SETTINGS)
    image = Image.open(io.BytesIO(result.image)).convert("RGB")
    top_left = image.getpixel((128, 2))
    assert max(top_left) < 20  # the bar above a 256 x 128 picture


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("webp", "WEBP"), ("jpg", "JPEG")])
def test_chosen_output_format(fmt: str, pil_format: str) -> None:
    result = process_image(make_image("JPEG"), replace(SETTINGS, encode_format=fmt, image_size=64))
    assert Image.open(io.BytesIO(result.image)).format == pil_format


def test_decompression_bomb_is_refused_before_decoding() -> None:
    result = process_image(make_decompression_bomb(), SETTINGS)
    assert result.status == status.TOO_LARGE
    assert result.image is None


def test_below_min_bytes_is_too_small() -> None:
    tiny = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tiny, format="PNG")
    result = process_image(tiny.getvalue(), SETTINGS)
    assert result.status == status.TOO_SMALL and "bytes" in result.error


def test_side_limits_and_aspect_ratio() -> None:
    assert process_image(_wide_jpeg(800, 400), replace(SETTINGS, min_side=500)).status == status.TOO_SMALL
    assert process_image(_wide_jpeg(800, 400), replace(SETTINGS, max_side=700)).status == status.TOO_LARGE
    result = process_image(_wide_jpeg(1200, 100), SETTINGS)
    assert result.status == status.BAD_ASPECT_RATIO
    assert (result.original_width, result.original_height) == (1200, 100)


def test_truncated_jpeg_fails_to_decode() -> None:
    body = make_image("JPEG")
    result = process_image(body[: len(body) * 2 // 3], SETTINGS)
    assert result.status == status.FAILED_TO_DECODE
    assert result.original_width == 400  # the header was fine


def test_html_is_not_an_image() -> None:
    html = b"<!doctype html><html><body>" + b"<p>not an image</p>" * 400 + b"</body></html>"
    result = process_image(html, SETTINGS)
    assert result.status == status.FAILED_TO_DECODE


def test_transparent_gif_becomes_rgb_on_white() -> None:
    image = Image.new("P", (300, 300), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (100, 100, 200, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="GIF", transparency=0)
    result = process_image(buffer.getvalue(), replace(SETTINGS, min_image_bytes=0, resize_mode="no"))
    decoded = Image.open(io.BytesIO(result.image)).convert("RGB")
    assert min(decoded.getpixel((10, 10))) > 230  # transparent corner -> white
    red = decoded.getpixel((150, 150))
    assert red[0] > 200 and red[1] < 60
