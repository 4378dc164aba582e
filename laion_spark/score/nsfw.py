"""NSFW tags: LAION-400M's zero-shot keyword method, and LAION's CLIP-based NSFW detector (``punsafe``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from laion_spark.score.model import ModelLoadError

NSFW = "NSFW"
UNSURE = "UNSURE"
UNLIKELY = "UNLIKELY"

# Where the tag comes from (clip.nsfw_tags); auto is resolved by nsfw_tag_source before any worker starts.
AUTO, ZERO_SHOT, DETECTOR, NO_TAGS = "auto", "zero_shot", "detector", "none"
NSFW_TAG_SOURCES = (AUTO, ZERO_SHOT, DETECTOR, NO_TAGS)
# detector tags: punsafe at or above this is NSFW (the detector was trained towards 0/1 targets).
DETECTOR_NSFW_CUT = 0.5


def nsfw_tag_source(nsfw_tags: str, pretrained: str, nsfw_detector_path: str) -> str:
    """clip.nsfw_tags with ``auto`` resolved: zero_shot, or none for random weights (empty ``pretrained``), whose
    prompt similarities are noise. Raises ConfigError for an unknown value or detector without a detector."""
    from laion_spark.config import ConfigError

    if nsfw_tags not in NSFW_TAG_SOURCES:
        raise ConfigError(f"clip.nsfw_tags: expected one of {', '.join(NSFW_TAG_SOURCES)}, got {nsfw_tags!r}")
    if nsfw_tags == DETECTOR and not nsfw_detector_path:
        raise ConfigError(
            "clip.nsfw_tags is detector but clip.nsfw_detector_path is empty: give the detector's weights"
        )
    if nsfw_tags == AUTO:
        return ZERO_SHOT if pretrained else NO_TAGS
    return nsfw_tags


def detector_tags(unsafe: np.ndarray) -> np.ndarray:
    """Tags from the detector's punsafe: ``NSFW`` at :data:`DETECTOR_NSFW_CUT` or more, else ``UNLIKELY``."""
    return np.where(np.asarray(unsafe) >= DETECTOR_NSFW_CUT, NSFW, UNLIKELY).astype(object)


def zero_shot_tags(prompt_similarities: np.ndarray, nsfw_prompt_count: int) -> np.ndarray:
    """LAION-400M's rule over image-to-prompt similarities [N, P], whose first ``nsfw_prompt_count`` are NSFW.

    Both of the two most similar prompts NSFW: ``NSFW``; one of them: ``UNSURE``; neither: ``UNLIKELY``.
    """
    rows = prompt_similarities.shape[0]
    if rows == 0 or nsfw_prompt_count == 0 or prompt_similarities.shape[1] == 0:
        return np.full(rows, UNLIKELY, dtype=object)
    top = min(2, prompt_similarities.shape[1])
    best = np.argsort(-prompt_similarities, axis=1, kind="stable")[:, :top]
    nsfw_hits = (best < nsfw_prompt_count).sum(axis=1)
    tags = np.full(rows, UNLIKELY, dtype=object)
    tags[nsfw_hits >= 1] = UNSURE
    tags[nsfw_hits >= top] = NSFW
    return tags


def _detector_class():
    from torch import nn

    class NsfwDetector(nn.Module):
        """The MLP of LAION's CLIP-based NSFW detector (the PyTorch release for ViT-H/14 embeddings).

        It reads L2-normalised image embeddings; its input width follows the weights file, so the same
        architecture trained on another CLIP's embeddings loads too.
        """

        def __init__(self, input_size: int = 1024) -> None:
            super().__init__()
            self.input_size = input_size
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(1024, 2048),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(2048, 1024),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(1024, 256),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(256, 128),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.Linear(128, 16),
                nn.Linear(16, 1),
            )

        def forward(self, embeddings):
            return self.layers(embeddings)

    return NsfwDetector


def build_nsfw_detector(input_size: int = 1024) -> Any:
    """A fresh (untrained) detector of LAION's architecture; ``torch.save(d.state_dict(), path)`` writes its file."""
    return _detector_class()(input_size)


def load_nsfw_detector(path: str, device: str = "cpu", expected_input_size: int | None = None) -> Any:
    """Load the detector's weights (a state dict with ``layers.N.*`` keys); raises :class:`ModelLoadError`."""
    import torch

    if not Path(path).is_file():
        raise ModelLoadError(f"cannot load the NSFW detector: weights file {path} does not exist")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
        input_size = int(state_dict["layers.0.weight"].shape[1])
        detector = build_nsfw_detector(input_size)
        detector.load_state_dict(state_dict)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the NSFW detector from {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if expected_input_size and input_size != expected_input_size:
        raise ModelLoadError(
            f"the NSFW detector {path} reads {input_size}-wide embeddings but the CLIP model makes "
            f"{expected_input_size}-wide ones; use the detector trained for this CLIP model"
        )
    return detector.to(device).eval()


@functools.cache
def nsfw_detector(path: str, device: str) -> Any:
    """The detector, loaded once per Python worker."""
    return load_nsfw_detector(path, device)


def punsafe(detector: Any, image_embeddings: Any) -> np.ndarray:
    """Probability that each image is unsafe, from L2-normalised image embeddings (a torch tensor)."""
    import torch

    with torch.inference_mode():
        scores = detector(image_embeddings.to(next(detector.parameters()).device).float())
    # The released detector was trained towards 0/1 targets without a final sigmoid; clamp keeps it a probability.
    return scores.squeeze(-1).clamp(0.0, 1.0).cpu().numpy().astype(np.float32)
