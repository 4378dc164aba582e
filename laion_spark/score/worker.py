"""The Python side of scoring, without Spark: (uid, image bytes, text) batches in, scored rows out.

:func:`score_batches` is what each Spark task runs (``scoring.score_record_batches`` wraps it for mapInArrow),
and it runs as it is where there is no Spark at all: a GPU box with only torch and open_clip, a notebook, a
benchmark. Nothing here imports pyspark or pyarrow at module level; Spark's task context (the task's GPU and
cores) is read when pyspark is there and a task is running, and ignored otherwise.

Each process loads the model once (``clip_model`` is cached) and streams batches through two threads: a prefetch
thread decodes and preprocesses images and tokenizes texts, while the calling thread runs the model, so the GPU
(or the CPU's BLAS threads) is not left waiting on Pillow. Rows are regrouped into model batches of
``batch_size`` whatever the size of the incoming batches (``spark.sql.execution.arrow.maxRecordsPerBatch``).
"""

from __future__ import annotations

import functools
import io
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from laion_spark.config import ClipConfig, ConfigError
from laion_spark.score.model import LoadedClip, ModelSpec, clip_model, resolve_local_path, task_device
from laion_spark.score.nsfw import (
    DETECTOR,
    ZERO_SHOT,
    detector_tags,
    nsfw_detector,
    nsfw_tag_source,
    punsafe,
    zero_shot_tags,
)

OK = "ok"
FAILED_TO_DECODE = "failed_to_decode"


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
    nsfw_tags: str = ZERO_SHOT  # zero_shot | detector | none: clip.nsfw_tags, auto resolved
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
            nsfw_tags=nsfw_tag_source(clip.nsfw_tags, clip.pretrained, clip.nsfw_detector_path),
            load_log_dir=clip.load_log_dir,
        )


@dataclass
class ScoredBatch:
    """Scored rows as numpy columns: what :func:`score_batches` yields, one model batch (or its failures) each.

    ``image_embeddings``/``text_embeddings`` are [N, D] float32, or None when every row failed to decode.
    """

    uids: list[str]
    status: list[str]
    image_embeddings: np.ndarray | None = None
    text_embeddings: np.ndarray | None = None
    similarity: np.ndarray | None = None  # [N] float32
    errors: list[str | None] | None = None
    nsfw: list[str] | None = None
    punsafe: np.ndarray | None = None  # [N] float32

    def __len__(self) -> int:
        return len(self.uids)

    def to_arrow(self) -> Any:
        """A ``pyarrow.RecordBatch`` with the columns of ``scoring.SCORED_SCHEMA``, built from numpy without
        copying the embeddings element by element into Python objects."""
        import pyarrow as pa

        embedding_type = pa.list_(pa.float32())
        count = len(self.uids)

        def embeddings(matrix: np.ndarray | None) -> pa.Array:
            if matrix is None:
                return pa.nulls(count, embedding_type)
            rows, width = matrix.shape
            offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
            values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
            return pa.ListArray.from_arrays(offsets, values, type=embedding_type)

        def floats(values: np.ndarray | None) -> pa.Array:
            return pa.nulls(count, pa.float32()) if values is None else pa.array(values, pa.float32())

        return pa.RecordBatch.from_arrays(
            [
                pa.array(self.uids, pa.string()),
                embeddings(self.image_embeddings),
                embeddings(self.text_embeddings),
                floats(self.similarity),
                pa.array(self.status, pa.string()),
                pa.nulls(count, pa.string()) if self.errors is None else pa.array(self.errors, pa.string()),
                pa.nulls(count, pa.string()) if self.nsfw is None else pa.array(self.nsfw, pa.string()),
                floats(self.punsafe),
            ],
            schema=arrow_schema(),
        )


@functools.cache
def arrow_schema() -> Any:
    """The Arrow schema of :meth:`ScoredBatch.to_arrow` (built on first use: pyarrow stays optional here)."""
    import pyarrow as pa

    embedding_type = pa.list_(pa.float32())
    return pa.schema(
        [
            pa.field("uid", pa.string(), False),
            pa.field("image_embedding", embedding_type),
            pa.field("text_embedding", embedding_type),
            pa.field("similarity", pa.float32()),
            pa.field("status", pa.string(), False),
            pa.field("error", pa.string()),
            pa.field("nsfw", pa.string()),
            pa.field("punsafe", pa.float32()),
        ]
    )


def score_batches(
    batches: Iterable[Any], settings: ScoringSettings, device: str | None = None
) -> Iterator[ScoredBatch]:
    """Score batches of (uid, image bytes, text) rows: Arrow RecordBatches, pandas DataFrames or dicts of lists.

    ``device`` overrides ``settings.device`` (which is resolved against the Spark task's GPU when there is one).
    Rows whose image does not decode come back with status ``failed_to_decode`` and the error, the others with
    embeddings, similarity and NSFW tags; every input row comes back exactly once, in model-batch order.
    """
    device = device or task_device(settings.device)
    _limit_cpu_threads(device)
    model = clip_model(settings.spec, device, settings.load_log_dir)
    detector = nsfw_detector(settings.nsfw_detector_path, device) if settings.nsfw_detector_path else None
    # No prompt embeddings when the tags come from elsewhere: nothing would read them.
    prompts = settings.nsfw_prompts + settings.safe_prompts if settings.nsfw_tags == ZERO_SHOT else ()
    prepared = prepare_model_batches(batches, model, settings.batch_size)
    for batch in prefetch(prepared, _prefetch_depth(settings.prefetch_batches, device)):
        if batch.failed_uids:
            yield ScoredBatch(
                uids=batch.failed_uids,
                status=[FAILED_TO_DECODE] * len(batch.failed_uids),
                errors=batch.failed_errors,
            )
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
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    # convert() copies even when the mode is already RGB (most JPEGs); the pixels are the same either way.
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare_model_batches(batches: Iterable[Any], model: LoadedClip, batch_size: int) -> Iterator[ModelBatch]:
    """Decode, preprocess and tokenize, regrouping rows into model batches of exactly ``batch_size``."""
    import torch

    preprocess = BatchPreprocess(model.preprocess)
    uids: list[str] = []
    images: list[Any] = []
    texts: list[str] = []
    failed_uids: list[str] = []
    failed_errors: list[str] = []

    def flush() -> ModelBatch:
        batch = ModelBatch(
            uids=list(uids),
            pixels=preprocess.finish(images, torch) if images else None,
            tokens=model.tokenizer(texts) if texts else None,
            failed_uids=list(failed_uids),
            failed_errors=list(failed_errors),
        )
        for pending in (uids, images, texts, failed_uids, failed_errors):
            pending.clear()
        return batch

    for rows in batches:
        for uid, image_bytes, text in zip(*_columns(rows), strict=True):
            try:
                image = preprocess.per_image(decode_image(image_bytes))
            except Exception as exc:  # Pillow raises many types for damaged files; each is one row's status
                failed_uids.append(uid)
                failed_errors.append(f"{type(exc).__name__}: {exc}"[:500])
                continue
            uids.append(uid)
            images.append(image)
            texts.append(text or "")
            if len(uids) == batch_size:
                yield flush()
    if uids or failed_uids:
        yield flush()


class BatchPreprocess:
    """open_clip's eval transform split in two: the PIL steps (resize, crop, RGB) per image, and ToTensor and
    Normalize once per batch on a [N, H, W, 3] uint8 array.

    The batch step does the same float32 operations in the same order as ``ToTensor`` then ``Normalize``, so
    the pixels are bit for bit those of ``torch.stack([preprocess(image) for image in images])``; it saves the
    two per-image tensor transforms, which cost as much as the tiny model's whole image tower per row. A
    transform of another shape (a user's custom one) is applied per image as it is.
    """

    def __init__(self, preprocess: Any) -> None:
        from torchvision import transforms

        self.preprocess = preprocess
        steps = list(getattr(preprocess, "transforms", []))
        self.batched = (
            len(steps) >= 2
            and isinstance(steps[-2], transforms.ToTensor)
            and isinstance(steps[-1], transforms.Normalize)
            and not steps[-1].inplace
        )
        if self.batched:
            self.image_steps = steps[:-2]
            self.mean = tuple(float(value) for value in steps[-1].mean)
            self.std = tuple(float(value) for value in steps[-1].std)

    def per_image(self, image: Any) -> Any:
        if not self.batched:
            return self.preprocess(image)
        for step in self.image_steps:
            image = step(image)
        if getattr(image, "mode", None) != "RGB":  # ToTensor would read other modes differently
            return self.preprocess(image)
        return np.asarray(image)

    def finish(self, images: Sequence[Any], torch: Any) -> Any:
        if not self.batched or any(not isinstance(image, np.ndarray) for image in images):
            return torch.stack([self._tensor(image, torch) for image in images])
        if len({image.shape for image in images}) != 1:
            return torch.stack([self._tensor(image, torch) for image in images])
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        pixels = pixels.to(torch.float32).div_(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return pixels.sub_(mean).div_(std)

    def _tensor(self, image: Any, torch: Any) -> Any:
        if not isinstance(image, np.ndarray):
            return image
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous().to(torch.float32).div_(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return pixels.sub_(mean).div_(std)


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


def _columns(rows: Any) -> tuple[list, list, list]:
    """(uids, images, texts) as Python lists from an Arrow RecordBatch/Table, a pandas DataFrame or a mapping."""
    if hasattr(rows, "column") and hasattr(rows, "schema"):  # pyarrow
        return tuple(rows.column(name).to_pylist() for name in ("uid", "image", "text"))
    if hasattr(rows, "columns") and hasattr(rows, "iloc"):  # pandas
        return tuple(rows[name].tolist() for name in ("uid", "image", "text"))
    return tuple(list(rows[name]) for name in ("uid", "image", "text"))


def _score_model_batch(
    batch: ModelBatch,
    model: LoadedClip,
    detector: Any,
    prompts: tuple[str, ...],
    nsfw_prompt_count: int,
    settings: ScoringSettings,
) -> ScoredBatch:
    image_features = model.encode_images(batch.pixels)
    text_features = model.encode_tokens(batch.tokens)
    similarity = (image_features * text_features).sum(dim=-1)
    unsafe = punsafe(detector, image_features) if detector is not None else None
    tags = None  # clip.nsfw_tags none: no tag, stored as null
    if settings.nsfw_tags == ZERO_SHOT:
        prompt_features = model.prompt_embeddings(prompts)
        if prompt_features is not None:
            tags = zero_shot_tags((image_features @ prompt_features.T).cpu().numpy(), nsfw_prompt_count).tolist()
        else:
            tags = zero_shot_tags(np.zeros((len(batch.uids), 0), dtype=np.float32), 0).tolist()
    elif settings.nsfw_tags == DETECTOR and unsafe is not None:
        tags = detector_tags(unsafe).tolist()
    return ScoredBatch(
        uids=batch.uids,
        status=[OK] * len(batch.uids),
        image_embeddings=round_embeddings(image_features.cpu().numpy(), settings.embedding_dtype),
        text_embeddings=round_embeddings(text_features.cpu().numpy(), settings.embedding_dtype),
        similarity=similarity.cpu().numpy().astype(np.float32),
        nsfw=tags,
        punsafe=None if unsafe is None else np.asarray(unsafe, dtype=np.float32),
    )


def _prefetch_depth(requested: int, device: str) -> int:
    """No prefetch thread on a CPU task that has one core: nothing runs beside it, and the thread switches and
    GIL hand-offs cost about 5% there (measured with the tiny model, bench/score.py)."""
    if device == "cpu":
        import torch

        if torch.get_num_threads() <= 1:
            return 0
    return requested


@functools.cache
def _limit_cpu_threads(device: str) -> None:
    """On the CPU, give torch the cores Spark gave the task (spark.task.cpus), not every core of the machine:
    concurrent tasks on one executor would otherwise oversubscribe it. Outside a Spark task, torch's default."""
    if device != "cpu":
        return
    try:
        from pyspark import TaskContext
    except ImportError:
        return
    import torch

    context = TaskContext.get()
    cpus = context.cpus() if context is not None else 0
    if cpus:
        torch.set_num_threads(cpus)
