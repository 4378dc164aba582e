"""CLIP model loading, device choice, NSFW tagging and the tiny trained model, without Spark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pyspark.resource import ResourceInformation

from laion_spark.config import ClipConfig, ConfigError
from laion_spark.score import (
    NSFW,
    UNLIKELY,
    UNSURE,
    ModelLoadError,
    ModelSpec,
    build_nsfw_detector,
    check_loadable,
    choose_device,
    clip_model,
    decode_image,
    load_clip,
    load_count,
    load_nsfw_detector,
    round_embeddings,
    task_device,
    zero_shot_tags,
)
from laion_spark.score.scoring import prefetch, prepare_model_batches
from laion_spark.testing import synthetic
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY_CLIP_DIR = PROJECT_ROOT / ".cache" / "models" / "tiny-clip"


@pytest.fixture(scope="module")
def tiny_spec() -> ModelSpec:
    settings = ensure_tiny_clip(TINY_CLIP_DIR)
    return ModelSpec.from_config(ClipConfig(**settings))


def test_device_is_the_gpu_spark_assigned_to_the_task():
    assert choose_device("auto", ["3"], cuda_available=True) == "cuda:3"
    assert choose_device("cuda", ["1"], cuda_available=True) == "cuda:1"


def test_device_falls_back_to_cpu_without_cuda_even_when_a_gpu_is_assigned():
    assert choose_device("auto", ["0"], cuda_available=False) == "cpu"
    assert choose_device("auto", [], cuda_available=False) == "cpu"


def test_device_honours_the_configured_device():
    assert choose_device("cpu", ["2"], cuda_available=True) == "cpu"
    assert choose_device("cuda:5", ["2"], cuda_available=True) == "cuda:5"
    assert choose_device("auto", [], cuda_available=True) == "cuda:0"
    with pytest.raises(ConfigError, match="no CUDA"):
        choose_device("cuda", ["0"], cuda_available=False)
    with pytest.raises(ConfigError, match="clip.device"):
        choose_device("tpu", [], cuda_available=True)


def test_task_device_reads_gpu_addresses_from_simulated_task_resources():
    resources = {"gpu": ResourceInformation("gpu", ["7"])}
    expected = "cuda:7" if torch.cuda.is_available() else "cpu"
    assert task_device("auto", resources) == expected
    assert task_device("cpu", resources) == "cpu"
    # No Spark task here and no resources: the CPU, or the machine's first GPU.
    assert task_device("auto", {}) == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_missing_checkpoint_is_one_error_naming_model_and_path(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pt"
    spec = ModelSpec(name="ViT-B-32", pretrained=str(missing))
    with pytest.raises(ModelLoadError) as error:
        check_loadable(spec)
    assert "ViT-B-32" in str(error.value) and str(missing) in str(error.value)


def test_unknown_model_name_is_one_error_naming_the_model():
    with pytest.raises(ModelLoadError, match="no-such-clip"):
        load_clip(ModelSpec(name="no-such-clip"))


def test_corrupt_checkpoint_is_one_error_naming_the_path(tmp_path, tiny_spec):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"these are not weights")
    spec = ModelSpec(name=tiny_spec.name, pretrained=str(broken), model_config=tiny_spec.model_config)
    with pytest.raises(ModelLoadError) as error:
        load_clip(spec)
    assert "tiny-clip" in str(error.value) and str(broken) in str(error.value)


def test_model_config_must_name_the_model(tiny_spec):
    spec = ModelSpec(name="ViT-B-32", pretrained=tiny_spec.pretrained, model_config=tiny_spec.model_config)
    with pytest.raises(ModelLoadError, match="clip.model must be 'tiny-clip'"):
        load_clip(spec)


def test_model_is_loaded_once_per_process_and_reused(tiny_spec, tmp_path):
    before = load_count()
    first = clip_model(tiny_spec, "cpu", str(tmp_path))
    second = clip_model(tiny_spec, "cpu", str(tmp_path))
    assert first is second
    assert load_count() == before + 1
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_tiny_model_loads_through_the_pretrained_path_and_separates_held_out_captions(tiny_spec):
    loaded = load_clip(tiny_spec)
    kinds = synthetic.all_kinds()[::7]
    images = [
        decode_image(synthetic.encode(synthetic.draw(kind, size=256, seed=9000 + i))) for i, kind in enumerate(kinds)
    ]
    image_features = loaded.encode_images(torch.stack([loaded.preprocess(image) for image in images]))
    text_features = loaded.encode_texts([kind.caption for kind in kinds])
    similarity = (image_features @ text_features.T).numpy()
    matching = np.diag(similarity)
    mismatching = similarity[~np.eye(len(kinds), dtype=bool)]
    assert matching.mean() > mismatching.mean() + 0.5
    # Each held-out image prefers its own caption over the captions of the other kinds drawn here.
    assert (similarity.argmax(axis=1) == np.arange(len(kinds))).mean() >= 0.9


def test_zero_shot_tags_follow_laion_top_two_rule():
    # Columns 0-1 are NSFW prompts, 2-3 safe ones.
    similarities = np.array(
        [
            [0.9, 0.8, 0.1, 0.2],  # both top prompts NSFW
            [0.9, 0.1, 0.8, 0.2],  # one of the two
            [0.1, 0.2, 0.9, 0.8],  # neither
        ]
    )
    assert zero_shot_tags(similarities, nsfw_prompt_count=2).tolist() == [NSFW, UNSURE, UNLIKELY]
    assert zero_shot_tags(similarities, nsfw_prompt_count=0).tolist() == [UNLIKELY] * 3


def test_nsfw_detector_loads_from_a_local_weights_file(tmp_path):
    torch.manual_seed(0)
    detector = build_nsfw_detector(64)
    path = tmp_path / "nsfw.pth"
    torch.save(detector.state_dict(), path)
    loaded = load_nsfw_detector(str(path))
    assert loaded.input_size == 64
    with pytest.raises(ModelLoadError, match="512-wide"):
        load_nsfw_detector(str(path), expected_input_size=512)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_nsfw_detector(str(tmp_path / "missing.pth"))


def test_float16_embeddings_are_rounded_to_half_precision():
    values = np.array([[0.123456789, -0.987654321]], dtype=np.float32)
    rounded = round_embeddings(values, "float16")
    assert rounded.dtype == np.float32
    assert np.array_equal(rounded, values.astype(np.float16).astype(np.float32))
    assert np.array_equal(round_embeddings(values, "float32"), values)


def test_model_batches_are_regrouped_independently_of_arrow_batches(tiny_spec):
    loaded = load_clip(tiny_spec)
    jpeg = synthetic.encode(synthetic.draw(synthetic.all_kinds()[0], size=64, seed=1))
    arrow_batches = [
        pa.RecordBatch.from_pydict(
            {"uid": [f"{b}-{i}" for i in range(2)], "image": [jpeg, b"broken" if b == 1 else jpeg], "text": ["x", "y"]}
        )
        for b in range(4)
    ]
    batches = list(prepare_model_batches(iter(arrow_batches), loaded, batch_size=3))
    assert [len(batch.uids) for batch in batches] == [3, 3, 1]
    assert [batch.pixels.shape[0] for batch in batches] == [3, 3, 1]
    assert [uid for batch in batches for uid in batch.failed_uids] == ["1-1"]


def test_prefetch_keeps_order_and_reraises_producer_errors():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise ValueError("decoder broke")

    consumed = []
    with pytest.raises(ValueError, match="decoder broke"):
        for item in prefetch(failing(), depth=2):
            consumed.append(item)
    assert consumed == [1]
