"""Load an open_clip model once per Python worker, on the device Spark gave the task.

Any open_clip model works: a name open_clip knows (``ViT-B-32``) with a pretrained tag (``laion2b_s34b_b79k``)
or a local checkpoint path, or an architecture described by a local model-config JSON (the tiny test model).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laion_spark.config import ClipConfig, ConfigError

log = logging.getLogger(__name__)


class ModelLoadError(ConfigError):
    """The configured CLIP model (or NSFW detector) cannot be loaded; the message names the model and the path."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load: hashable, so that it keys the per-worker cache."""

    name: str
    pretrained: str = ""
    model_config: str = ""
    precision: str = "auto"  # auto | fp32 | fp16 | bf16

    @classmethod
    def from_config(cls, clip: ClipConfig) -> ModelSpec:
        # Relative paths are resolved on the driver so that Python workers started elsewhere find the same files.
        return cls(
            name=clip.model,
            pretrained=resolve_local_path(clip.pretrained),
            model_config=resolve_local_path(clip.model_config),
            precision=clip.precision,
        )

    def describe(self) -> str:
        parts = [f"model '{self.name}'"]
        if self.pretrained:
            parts.append(f"pretrained '{self.pretrained}'")
        if self.model_config:
            parts.append(f"model config '{self.model_config}'")
        return ", ".join(parts)


def choose_device(requested: str, gpu_addresses: Sequence[str] | None, cuda_available: bool) -> str:
    """The torch device for one task.

    ``auto`` takes the GPU that Spark assigned to the task (``spark.task.resource.gpu.amount``); without one it
    takes ``cuda:0`` when torch sees a GPU (local mode on a GPU machine, where Spark schedules no resources),
    else the CPU. An explicit ``cuda`` also prefers the task's GPU; ``cuda:N`` and ``cpu`` are taken as given.
    """
    requested = (requested or "auto").strip().lower()
    if requested == "cpu":
        return "cpu"
    task_gpu = f"cuda:{gpu_addresses[0]}" if gpu_addresses else None
    if requested == "auto":
        if not cuda_available:
            return "cpu"
        return task_gpu or "cuda:0"
    if not requested.startswith("cuda"):
        raise ConfigError(f"clip.device: expected auto, cpu, cuda or cuda:N, got {requested!r}")
    if not cuda_available:
        raise ConfigError(f"clip.device is {requested!r} but torch sees no CUDA device here; use auto or cpu")
    if requested == "cuda":
        return task_gpu or "cuda:0"
    return requested


def task_gpu_addresses(resources: Mapping[str, Any] | None = None) -> list[str]:
    """GPU addresses from the current task's resources (or from ``resources``, a TaskContext.resources() mapping)."""
    if resources is None:
        try:
            from pyspark import TaskContext
        except ImportError:  # scoring without Spark (laion_spark.score.worker on a bare GPU box)
            return []
        context = TaskContext.get()
        resources = context.resources() if context is not None else {}
    gpu = resources.get("gpu")
    return list(gpu.addresses) if gpu is not None else []


def task_device(requested: str, resources: Mapping[str, Any] | None = None) -> str:
    import torch

    return choose_device(requested, task_gpu_addresses(resources), torch.cuda.is_available())


@dataclass
class LoadedClip:
    """An open_clip model with its own preprocessing and tokenizer, placed on one device."""

    spec: ModelSpec
    device: str
    model: Any
    preprocess: Any
    tokenizer: Any
    autocast_dtype: Any  # torch dtype, or None for plain fp32
    _prompt_cache: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def embed_dim(self) -> int:
        """Width of the image embeddings (0 when the architecture does not say)."""
        return int(getattr(getattr(self.model, "visual", None), "output_dim", 0) or 0)

    def _autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)

    def encode_images(self, pixels) -> Any:
        """L2-normalised fp32 image embeddings for a preprocessed [N, 3, H, W] batch."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def encode_tokens(self, tokens) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> Any:
        return self.encode_tokens(self.tokenizer(list(texts)))

    def prompt_embeddings(self, prompts: tuple[str, ...]) -> Any:
        """Embeddings of a fixed prompt list (NSFW keywords), computed once per worker."""
        with self._lock:
            if prompts not in self._prompt_cache:
                self._prompt_cache[prompts] = self.encode_texts(prompts) if prompts else None
            return self._prompt_cache[prompts]


_loads = 0
_loads_lock = threading.Lock()


def load_count() -> int:
    """How many times this process has really loaded a model (cache misses of :func:`clip_model`)."""
    return _loads


@functools.cache
def clip_model(spec: ModelSpec, device: str, load_log_dir: str = "") -> LoadedClip:
    """The model for ``spec`` on ``device``, loaded once per Python worker and reused by every batch and task.

    With ``load_log_dir``, each real load also leaves a marker file there (``<pid>-<n>.json``), so that loads
    in Python workers can be counted from the driver.
    """
    global _loads
    loaded = load_clip(spec, device)
    with _loads_lock:
        _loads += 1
        count = _loads
    if load_log_dir:
        marker = Path(load_log_dir) / f"{os.getpid()}-{count}.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"pid": os.getpid(), "load": count, "model": spec.name, "device": device}))
    return loaded


def load_clip(spec: ModelSpec, device: str = "cpu") -> LoadedClip:
    """Load without caching; every failure is a :class:`ModelLoadError` naming the model and its paths."""
    import open_clip
    import torch

    _check_paths(spec)
    started = time.perf_counter()
    try:
        if spec.model_config:
            open_clip.add_model_config(spec.model_config)
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained or None, device=device
        )
        tokenizer = open_clip.get_tokenizer(spec.name)
    except Exception as exc:  # open_clip raises RuntimeError, ValueError, OSError, pickle errors...
        raise ModelLoadError(f"cannot load CLIP {spec.describe()}: {_first_line(exc)}") from exc
    model.eval()
    log.info("loaded CLIP %s on %s in %.1fs", spec.describe(), device, time.perf_counter() - started)
    return LoadedClip(spec, device, model, preprocess, tokenizer, _autocast_dtype(spec.precision, device, torch))


def check_loadable(spec: ModelSpec) -> int:
    """Load ``spec`` once on the driver's CPU and return its embedding width; raises :class:`ModelLoadError`.

    Called before any Spark job so that a wrong name or path is one clear error, not a failure in every task.
    """
    loaded = load_clip(spec, "cpu")
    return loaded.embed_dim


def _check_paths(spec: ModelSpec) -> None:
    if spec.model_config:
        config_path = Path(spec.model_config)
        if not config_path.is_file():
            raise ModelLoadError(
                f"cannot load CLIP {spec.describe()}: model config file {spec.model_config} does not exist"
            )
        if config_path.stem != spec.name:
            raise ModelLoadError(
                f"cannot load CLIP {spec.describe()}: open_clip names a model after its config file, so "
                f"clip.model must be '{config_path.stem}' for {spec.model_config}"
            )
    if spec.pretrained and _looks_like_path(spec.pretrained) and not Path(spec.pretrained).is_file():
        raise ModelLoadError(f"cannot load CLIP {spec.describe()}: checkpoint file {spec.pretrained} does not exist")


def _autocast_dtype(precision: str, device: str, torch: Any) -> Any:
    precision = (precision or "auto").lower()
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"clip.precision: expected auto, fp32, fp16 or bf16, got {precision!r}")
    if not device.startswith("cuda"):
        return None  # CPU autocast is slower than fp32 on most CPUs and changes the similarities
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).suffix in {".pt", ".pth", ".bin", ".safetensors", ".npz"}


def resolve_local_path(value: str) -> str:
    """An absolute path for a local file path; tags, names and URIs unchanged."""
    if value and "://" not in value and _looks_like_path(value):
        return str(Path(value).expanduser().absolute())
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
