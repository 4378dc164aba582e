"""The 64-bit perceptual hash (pHash) of an image, as ``imagehash.phash`` computes it, and its Hamming distance.

The image is converted to greyscale, resized to 32x32 (Lanczos), transformed by a 2-D DCT-II (scipy.fftpack's,
unnormalised), and the 8x8 lowest frequencies are compared with their median: bit i is set where coefficient i
(row-major) is above it. Bit 0 is the most significant, so ``phash_hex`` prints what ``str(imagehash.phash(im))``
prints. The DCT is a matrix product in numpy (only the 8 rows the hash keeps), so the download workers need no
scipy.

Stored as a signed 64-bit integer (Spark's ``long``): the same 64 bits, two's complement. Hamming distance is
``bit_count(a ^ b)`` in Spark and in Python alike.
"""

from __future__ import annotations

import functools

import numpy as np
from pyspark.sql import Column
from pyspark.sql import functions as F

HASH_SIZE = 8
IMAGE_SIZE = HASH_SIZE * 4  # imagehash's highfreq_factor
BITS = HASH_SIZE * HASH_SIZE


@functools.cache
def _dct_rows() -> np.ndarray:
    """The first HASH_SIZE rows of the unnormalised DCT-II matrix of size IMAGE_SIZE: 2 cos(pi k (2n + 1) / 2N)."""
    k = np.arange(HASH_SIZE)[:, None]
    n = np.arange(IMAGE_SIZE)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * IMAGE_SIZE))


def phash_bits(image) -> np.ndarray:
    """The hash as 64 booleans, row-major (imagehash's ``hash.flatten()``). ``image`` is a PIL image."""
    from PIL import Image

    grey = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    rows = _dct_rows()
    low = rows @ pixels @ rows.T  # [8, 8]: the DCT along both axes, lowest frequencies only
    return (low > np.median(low)).ravel()


def phash(image) -> int:
    """The pHash of a PIL image as a signed 64-bit integer."""
    return to_signed(int("".join("1" if bit else "0" for bit in phash_bits(image)), 2))


def to_signed(value: int) -> int:
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value


def phash_hex(value: int) -> str:
    """16 hex digits, as ``str(imagehash.ImageHash)`` prints a 64-bit hash."""
    return f"{value & ((1 << BITS) - 1):016x}"


def from_hex(text: str) -> int:
    """The signed value of a 16-hex-digit hash (``phash_hex``'s inverse)."""
    value = int(text.strip(), 16)
    if not 0 <= value < 1 << BITS:
        raise ValueError(f"a 64-bit pHash has at most 16 hex digits, got {text!r}")
    return to_signed(value)


def hamming_distance(a: int, b: int) -> int:
    return ((a ^ b) & ((1 << BITS) - 1)).bit_count()


def hamming(a: Column | str, b: Column | str) -> Column:
    """Spark: the number of bits in which two pHash columns differ (null when either is null)."""
    a = F.col(a) if isinstance(a, str) else a
    b = F.col(b) if isinstance(b, str) else b
    return F.bit_count(a.bitwiseXOR(b)).cast("int")
