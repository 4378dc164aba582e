"""Checking, decoding, resizing and re-encoding one image with Pillow (no network, no Spark)."""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
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


@functools.cache
def _large_grey_jpeg(side: int) -> bytes:
    """A side x side JPEG of about a megabyte that draft mode decodes at 1/8 scale: large in pixels, cheap to test."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="JPEG", quality=10)
    return buffer.getvalue()


PILLOW_WARNS = 10_000  # 100 M pixels: above Pillow's default limit, below twice it (where Pillow refuses outright)
PILLOW_REFUSES = 13_500  # 182 M pixels: above twice Pillow's default limit
SMALL_OUTPUT = replace(SETTINGS, image_size=64)


def test_raised_max_pixels_admits_an_image_pillow_refuses_by_default() -> None:
    result = process_image(_large_grey_jpeg(PILLOW_REFUSES), replace(SMALL_OUTPUT, max_pixels=200_000_000))
    assert result.status == status.SUCCESS, result.error
    assert (result.original_width, result.original_height) == (PILLOW_REFUSES, PILLOW_REFUSES)
    assert (result.width, result.height) == (64, 64)


def test_lowered_max_pixels_refuses_an_image_pillow_accepts() -> None:
    result = process_image(_large_grey_jpeg(PILLOW_WARNS), replace(SMALL_OUTPUT, max_pixels=50_000_000))
    assert result.status == status.TOO_LARGE
    assert "max_pixels 50000000" in result.error
    assert result.image is None


def test_max_pixels_verdict_ignores_the_callers_warning_filters() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error
        result = process_image(_large_grey_jpeg(PILLOW_WARNS), replace(SMALL_OUTPUT, max_pixels=120_000_000))
    assert result.status == status.SUCCESS, result.error


def test_threads_with_different_max_pixels_each_get_their_own_verdict() -> None:
    body = _large_grey_jpeg(PILLOW_REFUSES)
    strict = replace(SMALL_OUTPUT, max_pixels=100_000_000)
    lenient = replace(SMALL_OUTPUT, max_pixels=200_000_000)
    jobs = [strict, lenient] * 6
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        verdicts = list(pool.map(lambda settings: process_image(body, settings).status, jobs))
    expected = [status.TOO_LARGE if settings is strict else status.SUCCESS for settings in jobs]
    assert verdicts == expected


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
