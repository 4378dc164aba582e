"""The query encoder: a caption or an image -> the L2-normalised vector the index is searched with.

It is the open_clip model the embeddings were computed with, as the index's manifest names it, loaded once per
process (:func:`laion_spark.score.model.clip_model`) and shared by every query and thread of a server.
"""

from __future__ import annotations

import functools
import io
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from laion_spark.config import ClipConfig
from laion_spark.index.layout import Manifest, ModelRef
from laion_spark.score.model import LoadedClip, ModelLoadError, ModelSpec, choose_device, clip_model, resolve_local_path


class BadQuery(ValueError):
    """A query that cannot be turned into a vector (an image that does not decode, an empty caption...)."""


def query_model_spec(model: ModelRef, clip: ClipConfig) -> ModelSpec:
    """The model to embed queries with: the manifest's, with ``clip``'s paths where the manifest names none.

    The name is always the manifest's (the model the embeddings come from); ``clip.pretrained`` and
    ``clip.model_config`` fill in only when ``clip.model`` is that same model.
    """
    pretrained, model_config = model.pretrained, model.model_config
    if clip.model == model.name:
        pretrained = pretrained or clip.pretrained
        model_config = model_config or clip.model_config
    return ModelSpec(
        name=model.name,
        pretrained=resolve_local_path(pretrained),
        model_config=resolve_local_path(model_config),
        precision=clip.precision,
    )


@dataclass
class QueryEncoder:
    """Captions and images -> normalised float32 vectors; safe to call from many threads."""

    clip: LoadedClip
    max_pixels: int
    # The model's forward pass runs one at a time: torch modules are not documented as safe to call concurrently,
    # and the kernels already use every thread torch has (decoding and preprocessing run outside the lock).
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dim(self) -> int:
        return self.clip.embed_dim

    def encode_text(self, text: str) -> np.ndarray:
        if not text or not text.strip():
            raise BadQuery("the text query is empty")
        tokens = self.clip.tokenizer([text])
        with self._lock:
            features = self.clip.encode_tokens(tokens)
        return _normalised(features.cpu().numpy()[0])

    def encode_image(self, data: bytes) -> np.ndarray:
        image = decode_query_image(data, self.max_pixels)
        try:
            pixels = self.clip.preprocess(image).unsqueeze(0)
        except Exception as exc:  # an exotic mode or size the transform chokes on: the image's fault, not ours
            raise BadQuery(f"the image cannot be preprocessed: {type(exc).__name__}: {exc}") from None
        with self._lock:
            features = self.clip.encode_images(pixels)
        return _normalised(features.cpu().numpy()[0])


def decode_query_image(data: bytes, max_pixels: int) -> Any:
    """Bytes -> an RGB PIL image, or :class:`BadQuery`: not an image, damaged, or more pixels than ``max_pixels``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadQuery("the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        # Checked from the header, before any pixel is decoded: a decompression bomb never gets allocated.
        if width * height > max_pixels:
            raise BadQuery(f"the image has {width}x{height} pixels, more than the limit of {max_pixels}")
        image.load()
        image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except BadQuery:
        raise
    except Image.DecompressionBombError as exc:
        raise BadQuery(f"the image is too large: {exc}") from None
    except UnidentifiedImageError:
        raise BadQuery("the image is not in a format Pillow can read") from None
    except Exception as exc:  # truncated data, corrupt chunks: Pillow raises many types
        raise BadQuery(f"the image does not decode: {type(exc).__name__}: {exc}") from None


def combine_queries(vectors: list[np.ndarray]) -> np.ndarray:
    """The mean of normalised query vectors, normalised again (a text and an image searched together)."""
    if not vectors:
        raise BadQuery("no query: give a text, an image or an embedding")
    return _normalised(np.mean(np.stack([_normalised(v) for v in vectors]), axis=0))


def normalise_embedding(values: Any, dim: int) -> np.ndarray:
    """A client's ``embedding_input`` -> a normalised float32 vector of ``dim`` numbers, or :class:`BadQuery`."""
    if not isinstance(values, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise BadQuery("embedding_input must be a list of numbers")
    if len(values) != dim:
        raise BadQuery(f"embedding_input has {len(values)} numbers; this index has {dim} dimensions")
    vector = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(vector)) or not np.any(vector):
        raise BadQuery("embedding_input must be finite and not all zeros")
    return _normalised(vector)


def _normalised(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def encoder_for(manifest: Manifest, clip: ClipConfig, max_pixels: int) -> QueryEncoder:
    """The encoder for the index's model, loaded on first use in this process; :class:`ModelLoadError` when the
    model cannot be loaded or does not give vectors of the index's dimension."""
    spec = query_model_spec(manifest.model, clip)
    import torch

    device = choose_device(clip.device, None, torch.cuda.is_available())
    encoder = _encoder(spec, device, max_pixels)
    if encoder.dim and encoder.dim != manifest.dim:
        raise ModelLoadError(
            f"CLIP {spec.describe()} gives {encoder.dim}-dimensional embeddings but the index holds "
            f"{manifest.dim}-dimensional ones: it is not the model the index was built with"
        )
    return encoder


@functools.lru_cache(maxsize=8)
def _encoder(spec: ModelSpec, device: str, max_pixels: int) -> QueryEncoder:
    return QueryEncoder(clip_model(spec, device), max_pixels)
