"""Check, decode, resize and re-encode one downloaded image with Pillow.

The checks run on the header before any pixel is decoded, so a 20000 x 20000 decompression bomb costs a few
kilobytes of parsing, not gigabytes of memory. JPEGs are decoded in draft mode at the smallest DCT scale (1/2, 1/4,
1/8) that still covers the target size, and every image is decoded once, shrunk by area averaging (see
:func:`_scaled`) and encoded once.

Measured on the download bench's 640 px, 51 KB JPEGs (``bench/download.py``, CPU ms per image, one thread): decode
at 1/2 scale 0.8 (1.1 without draft), pHash 0.6, resize 0.45 (0.9 with antialiased bicubic), encode at quality 95
0.23, the rest (SHA-256, header, EXIF) 0.2: about 2.3 ms in all, 2.9 before the resampler and EXIF changes.

The perceptual hash (laion_spark.curate.phash) is taken here, from the decoded and upright RGB image before it is
resized, because the image is decoded anyway (about 0.6 ms more per image, against a full decode otherwise) and so
that the hash describes the image as published rather than our resized copy of it. A JPEG decoded in draft mode is
already at least the target size, far above pHash's 32 x 32, so the draft changes no more than a bit or two; any
other image is hashed bit for bit as imagehash hashes it.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from laion_spark.config import ConfigError, DownloadConfig
from laion_spark.curate.phash import phash
from laion_spark.download import status

RESIZE_MODES = ("border", "keep_ratio", "center_crop", "no")
ENCODE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
# EXIF orientations that swap width and height.
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_pillow_limit_lock = threading.Lock()


@dataclass(frozen=True)
class ImageSettings:
    min_image_bytes: int = 5 * 1024
    min_side: int = 10
    max_side: int = 20000
    max_aspect_ratio: float = 10.0
    max_pixels: int = 89_478_485
    resize_mode: str = "border"
    image_size: int = 256
    encode_format: str = "jpg"
    encode_quality: int = 95

    @classmethod
    def from_config(cls, config: DownloadConfig) -> ImageSettings:
        if config.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"download.resize_mode = {config.resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
        if config.encode_format.lower() not in ENCODE_FORMATS:
            raise ConfigError(f"download.encode_format = {config.encode_format!r}: use jpg, png or webp")
        if config.image_size < 1 and config.resize_mode != "no":
            raise ConfigError(f"download.image_size = {config.image_size}: must be a positive number of pixels")
        return cls(
            min_image_bytes=config.min_image_bytes,
            min_side=config.min_side,
            max_side=config.max_side,
            max_aspect_ratio=config.max_aspect_ratio,
            max_pixels=config.max_pixels,
            resize_mode=config.resize_mode,
            image_size=config.image_size,
            encode_format=config.encode_format.lower(),
            encode_quality=config.encode_quality,
        )


@dataclass
class ProcessedImage:
    """The checked image: ``status`` is ``success`` when ``image`` holds the re-encoded bytes."""

    status: str
    error: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    phash: int | None = None  # signed 64-bit pHash of the decoded image before resizing; None unless success
    image: bytes | None = None


def process_image(body: bytes, settings: ImageSettings) -> ProcessedImage:
    """Check ``body`` against the size rules and return it resized and re-encoded; never raises."""
    digest = hashlib.sha256(body).hexdigest()
    if len(body) < settings.min_image_bytes:
        return ProcessedImage(status.TOO_SMALL, f"{len(body)} bytes, below min_image_bytes", sha256=digest)
    facts = ProcessedImage("", sha256=digest)
    _keep_pillow_limit_at_least(settings.max_pixels)
    try:
        image = Image.open(io.BytesIO(body))
        width, height = image.size
        if _orientation(image) in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        facts.original_width, facts.original_height = width, height
        refusal = _check_dimensions(width, height, settings)
        if refusal is not None:
            facts.status, facts.error = refusal
            return facts
        _draft(image, width, height, settings)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's limit is never below max_pixels, so its complaint means ours is passed too. The warning only
        # arrives as an exception where the caller's own filters make it one (python -W error).
        facts.status, facts.error = status.TOO_LARGE, f"more than max_pixels {settings.max_pixels}: {exc}"
        return facts
    except UnidentifiedImageError:
        facts.status, facts.error = status.FAILED_TO_DECODE, "not an image Pillow can identify"
        return facts
    except Exception as exc:  # truncated data, corrupt chunks, unsupported modes: Pillow raises many types
        facts.status, facts.error = status.FAILED_TO_DECODE, f"{type(exc).__name__}: {exc}"
        return facts
    try:
        ImageOps.exif_transpose(image, in_place=True)  # upright; no copy when it already is
        upright = to_rgb(image)
        image_phash = phash(upright)
        resized = _resize(upright, settings)
        facts.image = _encode(resized, settings)
    except Exception as exc:
        facts.status, facts.error = status.FAILED_TO_DECODE, f"{type(exc).__name__}: {exc}"
        return facts
    facts.status = status.SUCCESS
    facts.phash = image_phash
    facts.width, facts.height = resized.size
    return facts


def _keep_pillow_limit_at_least(max_pixels: int) -> None:
    """Raise Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` to ``max_pixels`` if it is lower; never lower it.

    ``max_pixels`` is the limit that applies, checked by :func:`_check_dimensions` from the header. But Pillow checks
    its own limit first, inside ``Image.open`` (an error above twice it), so a raised ``max_pixels`` needs Pillow's
    raised too. That limit is one global shared by every fetch thread, each possibly with other settings: setting it
    per call, or filtering its warnings per call, would race. Only ever raising it, under a lock, cannot: once a
    thread has it at its ``max_pixels`` no other thread takes it back down, and a thread with a lower ``max_pixels``
    is still refused by its own header check. It is raised rather than switched off (``None``) because Pillow also
    checks it where our header check cannot look: later GIF frames, ICO and ICNS entries, TIFF tiles, MPO pages.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current >= max_pixels:
        return
    with _pillow_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _check_dimensions(width: int, height: int, settings: ImageSettings) -> tuple[str, str] | None:
    if width * height > settings.max_pixels:
        return status.TOO_LARGE, f"{width}x{height} is more than max_pixels {settings.max_pixels}"
    if max(width, height) > settings.max_side:
        return status.TOO_LARGE, f"{width}x{height} has a side above max_side {settings.max_side}"
    if min(width, height) < settings.min_side:
        return status.TOO_SMALL, f"{width}x{height} has a side below min_side {settings.min_side}"
    ratio = max(width, height) / min(width, height)
    if ratio > settings.max_aspect_ratio:
        return status.BAD_ASPECT_RATIO, f"aspect ratio {ratio:.1f} above max_aspect_ratio {settings.max_aspect_ratio}"
    return None


def _target_scale(width: int, height: int, settings: ImageSettings) -> float:
    if settings.resize_mode == "border":
        return settings.image_size / max(width, height)
    return settings.image_size / min(width, height)


def _draft(image: Image.Image, width: int, height: int, settings: ImageSettings) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller (no effect on other formats).

    Pillow picks the largest of those reductions that keeps both sides at least the requested size, so asking for
    the target size itself gets the most reduction the target allows."""
    if settings.resize_mode == "no" or image.format != "JPEG":
        return
    scale = _target_scale(width, height, settings)
    if scale <= 0.5:
        header_w, header_h = image.size
        image.draft("RGB", (math.ceil(header_w * scale), math.ceil(header_h * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels on white; shared with the eval and reference images (laion_spark.curate)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as a browser would show them on a default page.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _resize(image: Image.Image, settings: ImageSettings) -> Image.Image:
    if settings.resize_mode == "no":
        return image
    size = settings.image_size
    width, height = image.size
    scale = _target_scale(width, height, settings)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = _scaled(image, new_size)
    if settings.resize_mode == "center_crop":
        left = (image.width - size) // 2
        top = (image.height - size) // 2
        return image.crop((left, top, left + size, top + size))
    if settings.resize_mode == "border":
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        return canvas
    return image  # keep_ratio: the shorter side is image_size


def _scaled(image: Image.Image, new_size: tuple[int, int]) -> Image.Image:
    """Shrunk by area averaging, as img2dataset shrinks (OpenCV's INTER_AREA): each output pixel is the mean of the
    source pixels it covers. Whole n x n blocks are averaged first (``reduce``, ``reducing_gap=1``), then the
    fractional rest. Against Pillow's antialiased bicubic this is half the time from a JPEG drafted to 320 px (0.44
    against 0.89 ms) and a fifth from a 1200 x 900 PNG (1.1 against 5.5 ms). Enlarged: bicubic, as CLIP's
    preprocessing (area averaging would repeat pixels)."""
    if new_size[0] > image.width or new_size[1] > image.height:
        return image.resize(new_size, Image.Resampling.BICUBIC)
    return image.resize(new_size, Image.Resampling.BOX, reducing_gap=1.0)


def _encode(image: Image.Image, settings: ImageSettings) -> bytes:
    buffer = io.BytesIO()
    fmt = ENCODE_FORMATS[settings.encode_format]
    if fmt == "PNG":
        image.save(buffer, format=fmt, optimize=False)
    else:
        image.save(buffer, format=fmt, quality=settings.encode_quality)
    return buffer.getvalue()
