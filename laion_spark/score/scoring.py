"""Score image-text pairs with CLIP inside Python workers, a batch at a time.

Each Python worker loads the model once (``clip_model`` is cached) and streams Arrow batches through two
threads: a prefetch thread decodes and preprocesses images and tokenizes texts, while the task's thread runs
the model, so the GPU (or the CPU's BLAS threads) is not left waiting on Pillow. Rows are regrouped into model
batches of ``batch_size`` whatever the Arrow batch size (``spark.sql.execution.arrow.maxRecordsPerBatch``).
"""

from __future__ import annotations

import functools
import io
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from laion_spark.config import ClipConfig, ConfigError
from laion_spark.score.model import LoadedClip, ModelSpec, clip_model, resolve_local_path, task_device
from laion_spark.score.nsfw import nsfw_detector, punsafe, zero_shot_tags

log = logging.getLogger(__name__)

OK = "ok"
FAILED_TO_DECODE = "failed_to_decode"

# What the Python workers return for each (uid, image, text) row.
SCORED_SCHEMA = StructType(
    [
        StructField("uid", StringType(), False),
        StructField("image_embedding", ArrayType(FloatType()), True),
        StructField("text_embedding", ArrayType(FloatType()), True),
        StructField("similarity", FloatType(), True),
        StructField("status", StringType(), False),
        StructField("error", StringType(), True),
        StructField("nsfw", StringType(), True),
        StructField("punsafe", FloatType(), True),
    ]
)
_EMBEDDING_TYPE = pa.list_(pa.float32())
_ARROW_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), False),
        pa.field("image_embedding", _EMBEDDING_TYPE),
        pa.field("text_embedding", _EMBEDDING_TYPE),
        pa.field("similarity", pa.float32()),
        pa.field("status", pa.string(), False),
        pa.field("error", pa.string()),
        pa.field("nsfw", pa.string()),
        pa.field("punsafe", pa.float32()),
    ]
)


@dataclass(frozen=True)
class ScoringSettings:
    """Everything a Python worker needs; small and picklable, shipped with the task."""

    spec: ModelSpec
    device: str = "auto"
    batch_size: int = 64
    embedding_dtype: str = "float16"  # float16 | float32: precision the stored vectors are rounded to
    nsfw_prompts: tuple[str, ...] = ()
    safe_prompts: tuple[str, ...] = ()
    nsfw_detector_path: str = ""
    load_log_dir: str = ""
    prefetch_batches: int = 2

    @classmethod
    def from_config(cls, clip: ClipConfig) -> ScoringSettings:
        if clip.batch_size < 1:
            raise ConfigError(f"clip.batch_size must be at least 1, got {clip.batch_size}")
        if clip.embedding_dtype not in ("float16", "float32"):
            raise ConfigError(f"clip.embedding_dtype: expected float16 or float32, got {clip.embedding_dtype!r}")
        return cls(
            spec=ModelSpec.from_config(clip),
            device=clip.device,
            batch_size=clip.batch_size,
            embedding_dtype=clip.embedding_dtype,
            nsfw_prompts=tuple(clip.nsfw_prompts),
            safe_prompts=tuple(clip.safe_prompts),
            nsfw_detector_path=resolve_local_path(clip.nsfw_detector_path),
            load_log_dir=clip.load_log_dir,
        )


def score_pairs(pairs: DataFrame, settings: ScoringSettings) -> DataFrame:
    """(uid, image bytes, text) rows -> :data:`SCORED_SCHEMA` rows: embeddings, similarity, status, NSFW tags."""
    return pairs.select("uid", "image", "text").mapInArrow(
        functools.partial(score_record_batches, settings=settings), SCORED_SCHEMA
    )


def score_record_batches(batches: Iterable[pa.RecordBatch], settings: ScoringSettings) -> Iterator[pa.RecordBatch]:
    """The worker side of :func:`score_pairs`: Arrow batches in, scored Arrow batches out."""
    device = task_device(settings.device)
    _limit_cpu_threads(device)
    model = clip_model(settings.spec, device, settings.load_log_dir)
    detector = nsfw_detector(settings.nsfw_detector_path, device) if settings.nsfw_detector_path else None
    prompts = settings.nsfw_prompts + settings.safe_prompts
    prepared = prefetch(prepare_model_batches(batches, model, settings.batch_size), settings.prefetch_batches)
    for batch in prepared:
        if batch.failed_uids:
            yield _failed_batch(batch.failed_uids, batch.failed_errors)
        if batch.uids:
            yield _score_model_batch(batch, model, detector, prompts, len(settings.nsfw_prompts), settings)


@dataclass
class ModelBatch:
    """Up to ``batch_size`` decoded rows ready for the model, plus rows that failed to decode on the way."""

    uids: list[str] = field(default_factory=list)
    pixels: Any = None  # torch tensor [N, 3, H, W]
    tokens: Any = None  # torch tensor [N, context_length]
    failed_uids: list[str] = field(default_factory=list)
    failed_errors: list[str] = field(default_factory=list)


def decode_image(image_bytes: bytes | None) -> Any:
    """Bytes as stored in ``images.image`` -> an RGB PIL image (the same decode the bare computation uses)."""
    from PIL import Image

    if not image_bytes:
        raise ValueError("no image bytes")
    with Image.open(io.BytesIO(image_bytes)) as image:
        return image.convert("RGB")


def prepare_model_batches(
    batches: Iterable[pa.RecordBatch], model: LoadedClip, batch_size: int
) -> Iterator[ModelBatch]:
    """Decode, preprocess and tokenize, regrouping rows into model batches of exactly ``batch_size``."""
    import torch

    uids: list[str] = []
    pixels: list[Any] = []
    texts: list[str] = []
    failed_uids: list[str] = []
    failed_errors: list[str] = []

    def flush() -> ModelBatch:
        batch = ModelBatch(
            uids=list(uids),
            pixels=torch.stack(pixels) if pixels else None,
            tokens=model.tokenizer(texts) if texts else None,
            failed_uids=list(failed_uids),
            failed_errors=list(failed_errors),
        )
        for pending in (uids, pixels, texts, failed_uids, failed_errors):
            pending.clear()
        return batch

    for record_batch in batches:
        columns = record_batch.to_pydict()
        for uid, image_bytes, text in zip(columns["uid"], columns["image"], columns["text"], strict=True):
            try:
                tensor = model.preprocess(decode_image(image_bytes))
            except Exception as exc:  # Pillow raises many types for damaged files; each is one row's status
                failed_uids.append(uid)
                failed_errors.append(f"{type(exc).__name__}: {exc}"[:500])
                continue
            uids.append(uid)
            pixels.append(tensor)
            texts.append(text or "")
            if len(uids) == batch_size:
                yield flush()
    if uids or failed_uids:
        yield flush()


def prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead of the consumer."""
    if depth <= 0:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as exc:  # re-raised in the consumer's thread, where Spark reports it
            buffer.put((done, exc))

    worker = threading.Thread(target=produce, name="clip-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def round_embeddings(embeddings: np.ndarray, embedding_dtype: str) -> np.ndarray:
    """Round to the stored precision; the table column stays float32 so every reader can use it."""
    if embedding_dtype == "float16":
        return embeddings.astype(np.float16).astype(np.float32)
    return embeddings.astype(np.float32, copy=False)


def _score_model_batch(
    batch: ModelBatch,
    model: LoadedClip,
    detector: Any,
    prompts: tuple[str, ...],
    nsfw_prompt_count: int,
    settings: ScoringSettings,
) -> pa.RecordBatch:
    image_features = model.encode_images(batch.pixels)
    text_features = model.encode_tokens(batch.tokens)
    similarity = (image_features * text_features).sum(dim=-1)
    prompt_features = model.prompt_embeddings(prompts)
    if prompt_features is not None:
        tags = zero_shot_tags((image_features @ prompt_features.T).cpu().numpy(), nsfw_prompt_count)
    else:
        tags = zero_shot_tags(np.zeros((len(batch.uids), 0), dtype=np.float32), 0)
    unsafe = punsafe(detector, image_features) if detector is not None else None
    images = round_embeddings(image_features.cpu().numpy(), settings.embedding_dtype)
    texts = round_embeddings(text_features.cpu().numpy(), settings.embedding_dtype)
    count = len(batch.uids)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(batch.uids, pa.string()),
            _list_array(images),
            _list_array(texts),
            pa.array(similarity.cpu().numpy().astype(np.float32), pa.float32()),
            pa.array([OK] * count, pa.string()),
            pa.nulls(count, pa.string()),
            pa.array(tags.tolist(), pa.string()),
            pa.array(unsafe, pa.float32()) if unsafe is not None else pa.nulls(count, pa.float32()),
        ],
        schema=_ARROW_SCHEMA,
    )


def _failed_batch(uids: list[str], errors: list[str]) -> pa.RecordBatch:
    count = len(uids)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(uids, pa.string()),
            pa.nulls(count, _EMBEDDING_TYPE),
            pa.nulls(count, _EMBEDDING_TYPE),
            pa.nulls(count, pa.float32()),
            pa.array([FAILED_TO_DECODE] * count, pa.string()),
            pa.array(errors, pa.string()),
            pa.nulls(count, pa.string()),
            pa.nulls(count, pa.float32()),
        ],
        schema=_ARROW_SCHEMA,
    )


def _list_array(matrix: np.ndarray) -> pa.Array:
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix).reshape(-1)), type=_EMBEDDING_TYPE)


@functools.cache
def _limit_cpu_threads(device: str) -> None:
    """On the CPU, give torch the cores Spark gave the task (spark.task.cpus), not every core of the machine:
    concurrent tasks on one executor would otherwise oversubscribe it."""
    if device != "cpu":
        return
    import torch
    from pyspark import TaskContext

    context = TaskContext.get()
    cpus = context.cpus() if context is not None else 0
    if cpus:
        torch.set_num_threads(cpus)
