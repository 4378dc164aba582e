"""The score stage through real Spark and Delta: images + candidates -> embeddings and dataset.

One scoring run over a small lake is shared by the tests of this module (scoring is the expensive part);
each test checks one property of what that run wrote.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from laion_spark.config import Config
from laion_spark.extract.text import text_key
from laion_spark.schemas import (
    CANDIDATES,
    CANDIDATES_SCHEMA,
    DATASET,
    EMBEDDINGS,
    IMAGES,
    IMAGES_SCHEMA,
    STAGE_STATS,
)
from laion_spark.score import (
    FAILED_TO_DECODE,
    NSFW,
    UNLIKELY,
    UNSURE,
    ModelLoadError,
    build_nsfw_detector,
    decode_image,
    rebuild_dataset,
    run_score,
)
from laion_spark.storage import append, read_funnel, read_table
from laion_spark.testing.synthetic import SyntheticImage, draw, encode
from laion_spark.testing.tiny_clip import THRESHOLD as TINY_CLIP_THRESHOLD
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Held-out images: the tiny model never saw these seeds. Each image is stored twice, once under a uid whose
# candidate text is its own caption and once under a uid whose text is another kind's caption.
KINDS = [
    SyntheticImage("red", "circle", "gray"),
    SyntheticImage("green", "square", "pale blue"),
    SyntheticImage("blue", "triangle", "beige"),
    SyntheticImage("yellow", "star", "gray"),
    SyntheticImage("purple", "stripes", "pale blue"),
    SyntheticImage("orange", "cross", "beige"),
    SyntheticImage("black", "circle", "beige"),
    SyntheticImage("white", "square", "gray"),
]
HELD_OUT_SEED = 7000
NSFW_PROMPTS = ["a red circle on a gray background", "a photo of a red circle on gray"]
SAFE_PROMPTS = ["a blue triangle on a beige background", "a green square on a pale blue background", "a yellow star"]
PARTITIONS = 3
ARROW_BATCH = 2
MODEL_BATCH = 3


def _image_row(uid: str, status: str, image: bytes | None, size: int | None) -> tuple:
    now = dt.datetime(2026, 1, 1)
    values = {
        "uid": uid,
        "url": f"http://127.0.0.1/{uid}.jpg",
        "status": status,
        "error": None if status == "success" else status,
        "http_status": 200,
        "content_type": "image/jpeg",
        **dict.fromkeys(("original_width", "original_height", "width", "height"), size),
        "image": image,
        "attempts": 1,
        "fetched_at": now,
        "fetch_batch": "download-1" if uid.startswith("match") else "download-2",
    }
    return tuple(values.get(name) for name in IMAGES_SCHEMA.names)  # the columns not named here: null


def _candidate_row(uid: str, text: str) -> tuple:
    return (uid, uid, f"http://127.0.0.1/{uid}.jpg", text, text_key(text), None, "test.warc.gz", 0, None, "en", 0.99,
            None, None, None)  # fmt: skip


@pytest.fixture(scope="module")
def scored_lake(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-stage")
    lake = str(root / "lake")
    images, candidates, image_bytes = [], [], {}
    for i, kind in enumerate(KINDS):
        jpeg = encode(draw(kind, size=256, seed=HELD_OUT_SEED + i))
        other = KINDS[(i + 3) % len(KINDS)]
        for uid, text in ((f"match-{i}", kind.caption), (f"mismatch-{i}", other.caption)):
            images.append(_image_row(uid, "success", jpeg, 256))
            candidates.append(_candidate_row(uid, text))
            image_bytes[uid] = jpeg
    truncated = encode(draw(KINDS[0], size=256, seed=1))[:300]
    for uid, payload in (("corrupt-garbage", b"this is not an image"), ("corrupt-truncated", truncated)):
        images.append(_image_row(uid, "success", payload, 256))
        candidates.append(_candidate_row(uid, "a red circle on a gray background"))
    images.append(_image_row("not-downloaded", "failed_to_download", None, None))
    candidates.append(_candidate_row("not-downloaded", "a red circle on a gray background"))
    images.append(_image_row("no-candidate", "success", image_bytes["match-0"], 256))
    append(spark.createDataFrame(images, IMAGES_SCHEMA), lake, IMAGES)
    append(spark.createDataFrame(candidates, CANDIDATES_SCHEMA), lake, CANDIDATES)

    torch.manual_seed(0)
    detector = build_nsfw_detector(64)
    with torch.no_grad():
        detector.layers[-1].bias.fill_(0.5)  # keep the untrained detector's outputs inside (0, 1)
    detector_path = root / "nsfw_detector.pth"
    torch.save(detector.state_dict(), detector_path)

    config = Config()
    for key, value in ensure_tiny_clip(PROJECT_ROOT / ".cache" / "models" / "tiny-clip").items():
        setattr(config.clip, key, value)
    config.clip.embedding_dtype = "float32"
    config.clip.batch_size = MODEL_BATCH
    config.clip.partitions = PARTITIONS
    config.clip.load_log_dir = str(root / "loads")
    config.clip.nsfw_prompts = NSFW_PROMPTS
    config.clip.safe_prompts = SAFE_PROMPTS
    config.clip.nsfw_detector_path = str(detector_path)

    arrow_batch_key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(arrow_batch_key)
    spark.conf.set(arrow_batch_key, str(ARROW_BATCH))
    try:
        counter = run_score(spark, config, lake, run_id="first")
    finally:
        spark.conf.set(arrow_batch_key, previous)
    embeddings = {row.uid: row for row in read_table(spark, lake, EMBEDDINGS).collect()}
    dataset = {row.uid: row for row in read_table(spark, lake, DATASET).collect()}
    return {
        "lake": lake,
        "config": config,
        "counter": counter,
        "embeddings": embeddings,
        "dataset": dataset,
        "image_bytes": image_bytes,
        "detector": detector.eval(),
        "loads": root / "loads",
    }


@pytest.fixture(scope="module")
def bare(scored_lake):
    """The same model, images and texts through open_clip directly, fp32 on the CPU, decoded from the same bytes."""
    clip = scored_lake["config"].clip
    open_clip.add_model_config(clip.model_config)
    model, _, preprocess = open_clip.create_model_and_transforms(clip.model, pretrained=clip.pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip.model)
    uids = sorted(scored_lake["image_bytes"])
    texts = {f"match-{i}": k.caption for i, k in enumerate(KINDS)}
    texts |= {f"mismatch-{i}": KINDS[(i + 3) % len(KINDS)].caption for i in range(len(KINDS))}
    pixels = torch.stack([preprocess(decode_image(scored_lake["image_bytes"][uid])) for uid in uids])
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer([texts[uid] for uid in uids]), normalize=True)
    similarity = (image_features * text_features).sum(dim=-1)
    return {
        uid: (image_features[i].numpy(), text_features[i].numpy(), float(similarity[i])) for i, uid in enumerate(uids)
    }


def test_similarities_equal_bare_open_clip_computation(scored_lake, bare):
    for uid, (image_embedding, text_embedding, similarity) in bare.items():
        row = scored_lake["embeddings"][uid]
        assert row.status == "ok" and row.model == "tiny-clip" and row.embedding_dtype == "float32"
        assert row.similarity == pytest.approx(similarity, abs=1e-4)
        np.testing.assert_allclose(row.image_embedding, image_embedding, atol=1e-4)
        np.testing.assert_allclose(row.text_embedding, text_embedding, atol=1e-4)


def test_matching_captions_score_above_mismatching_ones_on_held_out_images(scored_lake):
    embeddings, dataset = scored_lake["embeddings"], scored_lake["dataset"]
    for i in range(len(KINDS)):
        assert embeddings[f"match-{i}"].similarity > embeddings[f"mismatch-{i}"].similarity + 0.3
    # The demo threshold keeps the matching pairs and drops the mismatching ones.
    assert {f"match-{i}" for i in range(len(KINDS))} == set(dataset)
    assert all(row.similarity >= TINY_CLIP_THRESHOLD for row in dataset.values())
    row = dataset["match-1"]
    assert (row.text, row.language, row.width, row.height) == (KINDS[1].caption, "en", 256, 256)


def test_corrupt_image_gets_a_status_and_the_rest_are_scored(scored_lake):
    embeddings = scored_lake["embeddings"]
    for uid in ("corrupt-garbage", "corrupt-truncated"):
        assert embeddings[uid].status == FAILED_TO_DECODE
        assert embeddings[uid].error and embeddings[uid].image_embedding is None
    assert "not-downloaded" not in embeddings and "no-candidate" not in embeddings
    assert sum(row.status == "ok" for row in embeddings.values()) == 2 * len(KINDS)


def test_model_is_loaded_once_per_python_worker(scored_lake):
    markers = [json.loads(path.read_text()) for path in Path(scored_lake["loads"]).glob("*.json")]
    pids = [marker["pid"] for marker in markers]
    assert markers, "no Python worker recorded a model load"
    assert len(pids) == len(set(pids)), f"a worker loaded the model more than once: {markers}"
    # 3 tasks and 6 model batches on local[2]: reused workers mean fewer loads than tasks.
    assert len(markers) < PARTITIONS
    assert all(marker["device"] == "cpu" for marker in markers)


def test_nsfw_tags_and_punsafe(scored_lake, bare):
    embeddings, detector = scored_lake["embeddings"], scored_lake["detector"]
    for uid, (image_embedding, _, _) in bare.items():
        row = embeddings[uid]
        assert row.nsfw in (NSFW, UNSURE, UNLIKELY)
        with torch.no_grad():
            expected = float(detector(torch.from_numpy(image_embedding)[None]).clamp(0, 1))
        assert row.punsafe == pytest.approx(expected, abs=1e-4)
    # The red circle's two closest prompts are the two "NSFW" prompts written for it.
    assert embeddings["match-0"].nsfw == NSFW and embeddings["mismatch-0"].nsfw == NSFW
    assert embeddings["match-2"].nsfw != NSFW  # the blue triangle
    assert scored_lake["dataset"]["match-0"].nsfw == NSFW


def test_funnel_records_each_step(spark, scored_lake):
    funnel = {
        step: (rows_in, rows_out) for stage, step, rows_in, rows_out in read_funnel(spark, scored_lake["lake"], "first")
    }
    scored = 2 * len(KINDS)
    assert funnel["downloaded"] == (scored + 4, scored + 3)
    assert funnel["with_candidate_text"] == (scored + 3, scored + 2)
    assert funnel["not_yet_scored"] == (scored + 2, scored + 2)
    assert funnel["scored"] == (scored + 2, scored + 2)
    assert funnel["failed_to_decode"] == (scored + 2, scored)
    assert funnel["above_threshold"] == (scored, len(KINDS))


def test_rerun_scores_nothing_twice(spark, scored_lake):
    lake, config = scored_lake["lake"], scored_lake["config"]
    counter = run_score(spark, config, lake, run_id="second")
    steps = {step: (rows_in, rows_out) for step, rows_in, rows_out in counter.steps}
    assert steps["not_yet_scored"] == (2 * len(KINDS) + 2, 0)
    assert read_table(spark, lake, EMBEDDINGS).count() == len(scored_lake["embeddings"])
    assert read_table(spark, lake, DATASET).count() == len(scored_lake["dataset"])
    assert read_table(spark, lake, STAGE_STATS).where("run_id = 'second'").count() == len(counter.steps)


def test_top_k_percent_keeps_the_most_similar_pairs(spark, scored_lake):
    config = Config()
    config.clip.top_k_percent = 25.0
    kept, considered = rebuild_dataset(spark, config, scored_lake["lake"])
    assert considered == 2 * len(KINDS)
    # An approximate quantile: the cut may let one tied or neighbouring pair through.
    assert considered // 4 <= kept <= considered // 4 + 1
    dataset = read_table(spark, scored_lake["lake"], DATASET).collect()
    lowest_kept = min(row.similarity for row in dataset)
    ok = [row for row in scored_lake["embeddings"].values() if row.status == "ok"]
    assert sum(row.similarity >= lowest_kept for row in ok) == kept


def test_model_that_fails_to_load_stops_before_reading_the_lake(spark, tmp_path):
    config = Config()
    config.clip.model = "ViT-B-32"
    config.clip.pretrained = str(tmp_path / "missing" / "open_clip_model.safetensors")
    # The lake holds no tables: reaching it would raise FileNotFoundError instead.
    with pytest.raises(ModelLoadError) as error:
        run_score(spark, config, str(tmp_path / "lake"))
    assert "ViT-B-32" in str(error.value) and config.clip.pretrained in str(error.value)
