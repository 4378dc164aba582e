"""The scoring worker without Spark: the function each Spark task runs, fed plain batches on a machine without pyspark."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from laion_spark.config import ClipConfig
from laion_spark.score import (
    FAILED_TO_DECODE,
    ModelSpec,
    ScoringSettings,
    decode_image,
    load_clip,
    score_record_batches,
)
from laion_spark.score.worker import BatchPreprocess, score_batches
from laion_spark.testing import synthetic
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY_CLIP_DIR = PROJECT_ROOT / ".cache" / "models" / "tiny-clip"

# Runs in a fresh interpreter where any import of pyspark fails, as on a GPU box with only torch and open_clip.
WITHOUT_PYSPARK = textwrap.dedent(
    """
    import importlib.abc, json, sys, types
    from pathlib import Path

    class NoPyspark(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pyspark" or name.startswith("pyspark."):
                raise ImportError(f"pyspark is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, NoPyspark())
    # The package itself must import without pyspark: laion_spark.score loads its Spark side on first use.
    from laion_spark.config import ClipConfig
    from laion_spark.score.worker import ScoringSettings, score_batches
    from laion_spark.testing import synthetic
    from laion_spark.testing.tiny_clip import ensure_tiny_clip

    clip = ClipConfig(**ensure_tiny_clip(sys.argv[1]), batch_size=3, embedding_dtype="float32")
    kinds = synthetic.all_kinds()[:5]
    rows = {
        "uid": [f"u{i}" for i in range(len(kinds))] + ["broken"],
        "image": [synthetic.encode(synthetic.draw(k, size=256, seed=7000 + i)) for i, k in enumerate(kinds)]
        + [b"not a jpeg"],
        "text": [k.caption for k in kinds] + ["a caption"],
    }
    scored = list(score_batches([rows], ScoringSettings.from_config(clip), device="cpu"))
    out = {"pyspark_imported": any(m == "pyspark" or m.startswith("pyspark.") for m in sys.modules)}
    for batch in scored:
        for i, uid in enumerate(batch.uids):
            out[uid] = {
                "status": batch.status[i],
                "image": None if batch.image_embeddings is None else batch.image_embeddings[i].tolist(),
                "text": None if batch.text_embeddings is None else batch.text_embeddings[i].tolist(),
                "similarity": None if batch.similarity is None else float(batch.similarity[i]),
            }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def tiny_clip() -> ClipConfig:
    return ClipConfig(**ensure_tiny_clip(TINY_CLIP_DIR), embedding_dtype="float32")


def _bare(clip: ClipConfig, images: list[bytes], texts: list[str]):
    """The same rows through open_clip directly."""
    loaded = load_clip(ModelSpec.from_config(clip))
    pixels = torch.stack([loaded.preprocess(decode_image(image)) for image in images])
    with torch.no_grad():
        image_features = loaded.model.encode_image(pixels, normalize=True)
        text_features = loaded.model.encode_text(loaded.tokenizer(texts), normalize=True)
    return image_features.numpy(), text_features.numpy(), (image_features * text_features).sum(-1).numpy()


def test_worker_scores_without_pyspark_and_equals_open_clip(tiny_clip):
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYSPARK, str(TINY_CLIP_DIR)],
        capture_output=True,
        text=True,
        check=False,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads(done.stdout.strip().splitlines()[-1])
    assert scored.pop("pyspark_imported") is False
    assert scored.pop("broken")["status"] == FAILED_TO_DECODE

    kinds = synthetic.all_kinds()[:5]
    images = [synthetic.encode(synthetic.draw(k, size=256, seed=7000 + i)) for i, k in enumerate(kinds)]
    image_features, text_features, similarity = _bare(tiny_clip, images, [k.caption for k in kinds])
    assert sorted(scored) == [f"u{i}" for i in range(len(kinds))]
    for i in range(len(kinds)):
        row = scored[f"u{i}"]
        assert row["status"] == "ok"
        np.testing.assert_allclose(row["image"], image_features[i], atol=1e-5)
        np.testing.assert_allclose(row["text"], text_features[i], atol=1e-5)
        assert row["similarity"] == pytest.approx(float(similarity[i]), abs=1e-5)


def test_spark_udf_and_worker_give_the_same_rows_for_arrow_pandas_and_dict_batches(tiny_clip):
    kinds = synthetic.all_kinds()[:4]
    rows = {
        "uid": [f"u{i}" for i in range(len(kinds))],
        "image": [synthetic.encode(synthetic.draw(k, size=128, seed=i)) for i, k in enumerate(kinds)],
        "text": [k.caption for k in kinds],
    }
    settings = ScoringSettings.from_config(tiny_clip)
    through_udf = pa.Table.from_batches(list(score_record_batches([pa.RecordBatch.from_pydict(rows)], settings)))
    for batches in ([rows], [pa.RecordBatch.from_pydict(rows).to_pandas()]):
        direct = pa.Table.from_batches([scored.to_arrow() for scored in score_batches(batches, settings)])
        assert direct.equals(through_udf)


def test_batched_preprocessing_is_bit_identical_to_open_clip_preprocess(tiny_clip):
    loaded = load_clip(ModelSpec.from_config(tiny_clip))
    batched = BatchPreprocess(loaded.preprocess)
    assert batched.batched
    images = [decode_image(synthetic.encode(synthetic.draw(k, size=200, seed=3))) for k in synthetic.all_kinds()[:6]]
    expected = torch.stack([loaded.preprocess(image) for image in images])
    assert torch.equal(batched.finish([batched.per_image(image) for image in images], torch), expected)
