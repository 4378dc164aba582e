"""images + texts -> CLIP embeddings, similarity and NSFW tags: the ``embeddings`` and ``dataset`` tables."""

from laion_spark.lazy import lazy_attributes
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

# The Spark side loads on first use, so that the worker's scoring path (laion_spark.score.worker, and the model and
# NSFW modules above) imports where pyspark is not installed: a GPU box that only runs bench/gpu/score_gpu.py.
_SPARK_SIDE = {
    "FAILED_TO_DECODE": "laion_spark.score.scoring",
    "SCORED_SCHEMA": "laion_spark.score.scoring",
    "ScoringSettings": "laion_spark.score.scoring",
    "decode_image": "laion_spark.score.scoring",
    "round_embeddings": "laion_spark.score.scoring",
    "score_pairs": "laion_spark.score.scoring",
    "score_record_batches": "laion_spark.score.scoring",
    "build_dataset": "laion_spark.score.stage",
    "rebuild_dataset": "laion_spark.score.stage",
    "run_score": "laion_spark.score.stage",
    "to_embeddings_rows": "laion_spark.score.stage",
}


__getattr__ = lazy_attributes(__name__, _SPARK_SIDE)


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
