"""How the download worker scales and orients an image: EXIF orientation, area averaging down, bicubic up."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from laion_spark.curate.phash import phash
from laion_spark.download import status
from laion_spark.download.images import ImageSettings, process_image

SETTINGS = ImageSettings(min_image_bytes=0)  # small synthetic files; the size rule is tested elsewhere
ROTATE_270 = 6  # EXIF orientation 6: the camera was turned; the stored pixels are shown rotated 90 degrees clockwise


def _portrait_with_red_corner(width: int, height: int) -> Image.Image:
    """An upright grey picture with a red block in its top-left corner, and gentle shading for pHash to see."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 200 // width), (y * 200 // height), np.full_like(x, 90)], axis=-1).astype(np.uint8)
    pixels[: height // 8, : width // 8] = (255, 0, 0)
    return Image.fromarray(pixels)


def _stored_sideways(upright: Image.Image, fmt: str) -> bytes:
    """``upright`` as a camera stores it: the pixels turned back, with orientation 6 in EXIF to turn them upright."""
    exif = Image.Exif()
    exif[0x0112] = ROTATE_270
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(
        buffer, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def _decoded(result) -> np.ndarray:
    assert result.status == status.SUCCESS, result.error
    return np.asarray(Image.open(io.BytesIO(result.image)).convert("RGB")).astype(int)


def test_exif_rotated_png_is_stored_upright_and_hashed_upright() -> None:
    upright = _portrait_with_red_corner(300, 600)
    result = process_image(_stored_sideways(upright, "PNG"), replace(SETTINGS, resize_mode="keep_ratio"))
    pixels = _decoded(result)
    assert (result.original_width, result.original_height) == (300, 600)
    assert (result.width, result.height) == (256, 512) and pixels.shape == (512, 256, 3)
    red, grey = pixels[10, 10], pixels[500, 240]
    assert red[0] > 200 and red[1] < 60, red  # the red corner is top-left again
    assert abs(grey[0] - grey[1]) < 60, grey
    assert result.phash == phash(upright)  # lossless: the hash of exactly the upright picture


def test_exif_rotated_jpeg_large_enough_for_draft_keeps_its_orientation() -> None:
    # 1600 x 3200 upright: draft decodes at 1/8 (200 x 400 stored sideways), still enough for border's 128 x 256.
    upright = _portrait_with_red_corner(1600, 3200)
    result = process_image(_stored_sideways(upright, "JPEG"), SETTINGS)
    pixels = _decoded(result)
    assert (result.original_width, result.original_height) == (1600, 3200)
    assert pixels.shape == (256, 256, 3)
    assert pixels[:, :60].max() < 30 and pixels[:, -60:].max() < 30  # the black bars left and right of 128 px
    red = pixels[8, 64 + 6]
    assert red[0] > 200 and red[1] < 60, red


def test_shrinking_averages_what_each_pixel_covers() -> None:
    # One-pixel black and white stripes: a shrunk copy that sampled instead of averaging would show stripes again.
    stripes = np.zeros((600, 600, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    buffer = io.BytesIO()
    Image.fromarray(stripes).save(buffer, format="PNG")
    pixels = _decoded(process_image(buffer.getvalue(), replace(SETTINGS, encode_format="png")))
    assert pixels.shape == (256, 256, 3)
    assert 100 <= pixels.min() and pixels.max() <= 155, (pixels.min(), pixels.max())


def test_enlarging_is_smooth_not_blocky() -> None:
    # A 32 px checkerboard of 4 px squares enlarged 8 times: repeating pixels would give only 0 and 255.
    cells = np.indices((32, 32)) // 4
    squares = ((cells[0] + cells[1]) % 2 * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(squares).convert("RGB").save(buffer, format="PNG")
    pixels = _decoded(process_image(buffer.getvalue(), replace(SETTINGS, encode_format="png")))
    assert pixels.shape == (256, 256, 3)
    assert len(np.unique(pixels)) > 20  # a ramp across every edge
