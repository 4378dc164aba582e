"""images + texts -> CLIP embeddings, similarity and NSFW tags: the ``embeddings`` and ``dataset`` tables."""

from laion_spark.score.model import (
    LoadedClip,
    ModelLoadError,
    ModelSpec,
    check_loadable,
    choose_device,
    clip_model,
    load_clip,
    load_count,
    task_device,
    task_gpu_addresses,
)
from laion_spark.score.nsfw import (
    NSFW,
    UNLIKELY,
    UNSURE,
    build_nsfw_detector,
    load_nsfw_detector,
    punsafe,
    zero_shot_tags,
)
from laion_spark.score.scoring import (
    FAILED_TO_DECODE,
    SCORED_SCHEMA,
    ScoringSettings,
    decode_image,
    round_embeddings,
    score_pairs,
    score_record_batches,
)
from laion_spark.score.stage import build_dataset, rebuild_dataset, run_score, to_embeddings_rows

__all__ = [
    "FAILED_TO_DECODE",
    "NSFW",
    "SCORED_SCHEMA",
    "UNLIKELY",
    "UNSURE",
    "LoadedClip",
    "ModelLoadError",
    "ModelSpec",
    "ScoringSettings",
    "build_dataset",
    "build_nsfw_detector",
    "check_loadable",
    "choose_device",
    "clip_model",
    "decode_image",
    "load_clip",
    "load_count",
    "load_nsfw_detector",
    "punsafe",
    "rebuild_dataset",
    "round_embeddings",
    "run_score",
    "score_pairs",
    "score_record_batches",
    "task_device",
    "task_gpu_addresses",
    "to_embeddings_rows",
    "zero_shot_tags",
]
