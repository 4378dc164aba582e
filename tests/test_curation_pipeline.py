"""The dataset's curation chain end to end: a small crawl (WAT + WARC written with warcio) whose images a loopback
server serves, run through the real pipeline (extract -> candidates -> download -> score, the tiny CLIP model) with
``dataset.filters = [threshold, decontaminate, near_dup, image_cluster]`` and ``clip.threshold = -1``, so that
the threshold keeps every pair and each removal is one of the chain's own steps.

The crawl holds, each image under its own URL and with its own alt text:

* a red cross (one of the synthetic scenes whose 2.5% crop stays within 4 pHash bits, see test_near_dup.py) and
  its resized, JPEG-recompressed (quality 60) and cropped copies: one group of near-duplicates;
* look-alikes: red crosses drawn elsewhere, crosses of other colours at the same seed;
* a planted eval image (its very bytes also in the eval folder) and a re-encoded copy of it;
* a few images of five other classes, against a reference folder of fresh red crosses (image_cluster).

The rejections, the stage statistics and ``laion-spark explain`` must all tell the same story. Decontaminate runs
before near_dup so that both planted images reach it (they are near-duplicates of each other, 2 bits apart); a
re-cut of a copy of the lake with near_dup first shows that the order decides which step names the planted copy.
A second re-cut, ``[threshold, semdedup]`` with one k-means cluster, is checked against comparing every pair.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from laion_spark.cli import main
from laion_spark.config import Config, apply_override, load_config
from laion_spark.curate.eval_sets import oriented_rgb
from laion_spark.curate.phash import hamming_distance, phash
from laion_spark.run import run_pipeline
from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, REJECTIONS
from laion_spark.storage import read_funnel, read_table
from laion_spark.testing.archives import WatPage, html_page, write_warc, write_wat
from laion_spark.testing.server import ImageServer, start_server
from laion_spark.testing.synthetic import SyntheticImage, draw, encode
from laion_spark.testing.tiny_clip import ensure_tiny_clip

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = resources.files("laion_spark.demo").joinpath("demo.yaml")
FILTERS = ["threshold", "decontaminate", "near_dup", "image_cluster"]
PHASH_DISTANCE = 4  # dedup.phash_distance and dedup.eval_phash_distance: their defaults
EVAL_MIN_COSINE = 0.95
CLUSTERS = 8
REFERENCE_IMAGES = 12  # enough renders to land in each cluster the class's pool rows may fall in
SIZE = 320

REFERENCE_KIND = SyntheticImage("red", "cross", "gray")
EVAL_KIND = SyntheticImage("purple", "star", "beige")
OTHER_KINDS = [
    SyntheticImage("yellow", "circle", "pale blue"),
    SyntheticImage("purple", "triangle", "beige"),
    SyntheticImage("green", "stripes", "pale blue"),
    SyntheticImage("orange", "square", "beige"),
    SyntheticImage("black", "star", "pale blue"),
]
GROUP = ("original", "resized", "jpeg60", "cropped")  # the near-duplicate group
LOOKALIKES = ("red-cross-2", "red-cross-3", "red-cross-5", "blue-cross-1", "green-cross-1")
PLANTED = ("planted", "planted-reencoded")
EVAL_IMAGE = "planted.jpg"


@dataclass
class Item:
    """One pair of the crawl: the bytes served at its URL, its alt text and the class of its picture."""

    body: bytes
    alt: str
    kind: SyntheticImage


def crawl_items() -> dict[str, Item]:
    original = draw(REFERENCE_KIND, SIZE, seed=1)
    margin = int(SIZE * 0.025)
    planted = draw(EVAL_KIND, SIZE, seed=7)
    items = {
        "original": Item(encode(original), "a red cross on a gray background", REFERENCE_KIND),
        "resized": Item(
            encode(original.resize((SIZE * 2 // 3,) * 2, Image.Resampling.BICUBIC)),
            "red cross on gray, a smaller version",
            REFERENCE_KIND,
        ),
        "jpeg60": Item(encode(original, quality=60), "a red cross against a gray backdrop", REFERENCE_KIND),
        "cropped": Item(
            encode(original.crop((margin, margin, SIZE - margin, SIZE - margin))),
            "gray background with a red cross",
            REFERENCE_KIND,
        ),
        "red-cross-2": Item(encode(draw(REFERENCE_KIND, SIZE, seed=2)), "a red cross in the corner", REFERENCE_KIND),
        "red-cross-3": Item(encode(draw(REFERENCE_KIND, SIZE, seed=3)), "one more red cross on gray", REFERENCE_KIND),
        "red-cross-5": Item(encode(draw(REFERENCE_KIND, SIZE, seed=5)), "a large red cross, gray", REFERENCE_KIND),
        "planted": Item(encode(planted), "a purple star on a beige background", EVAL_KIND),
        "planted-reencoded": Item(
            encode(planted.resize((240, 240), Image.Resampling.BICUBIC), quality=60),
            "purple star, beige backdrop",
            EVAL_KIND,
        ),
    }
    for color in ("blue", "green"):
        kind = SyntheticImage(color, "cross", "gray")
        items[f"{color}-cross-1"] = Item(encode(draw(kind, SIZE, seed=1)), kind.caption, kind)
    for kind in OTHER_KINDS:
        for seed in (1, 2, 3):
            caption = kind.caption if seed == 1 else f"{kind.caption}, picture {seed}"
            items[f"{kind.slug}-{seed}"] = Item(encode(draw(kind, SIZE, seed=seed)), caption, kind)
    return items


@dataclass
class Curated:
    """The lake the module's pipeline run built, and what the tests compare it with (small: a few dozen pairs)."""

    lake: str
    run_id: str
    config: Config
    eval_dir: str
    eval_bytes: bytes
    items: dict[str, Item]
    uid: dict[str, str]  # item name -> uid
    phash: dict[str, int]  # uid -> the pHash the download stage stored
    similarity: dict[str, float]  # uid -> CLIP similarity
    scored: dict[str, str]  # uid -> embeddings status
    crawl_date: dict[str, object]
    dataset: set[str]
    rejections: dict[str, dict] = field(default_factory=dict)  # uid -> its dataset-stage rejection row
    funnel: dict[str, tuple[int, int]] = field(default_factory=dict)  # score step -> (rows in, rows out)

    def key_of(self, uid: str) -> str:
        return next(name for name, one in self.uid.items() if one == uid)


def _write_crawl(directory: Path, base_url: str, items: dict[str, Item]) -> list[Path]:
    """Half the pages as WAT metadata, half as WARC HTML; every image under its own absolute URL."""
    names = list(items)
    pages: list[tuple[str, list[tuple[str, str]]]] = []
    for number in range(0, len(names), 6):
        images = [(f"{base_url}/pool/{names.index(name)}.jpg", items[name].alt) for name in names[number : number + 6]]
        pages.append((f"{base_url}/gallery/page-{number // 6}.html", images))
    wat = [WatPage(url, images) for url, images in pages[0::2]]
    warc = [
        html_page(url, "<html><body>" + "".join(f'<img src="{src}" alt="{alt}">' for src, alt in images) + "</body>")
        for url, images in pages[1::2]
    ]
    directory.mkdir(parents=True, exist_ok=True)
    return [write_wat(directory / "crawl.wat.gz", wat), write_warc(directory / "crawl.warc.gz", warc)]


def _collect(spark, lake: str) -> dict:
    images = read_table(spark, lake, IMAGES).select("uid", "url", "status", "phash")
    embeddings = read_table(spark, lake, EMBEDDINGS).select("uid", "status", "similarity")
    candidates = read_table(spark, lake, CANDIDATES).select("uid", "crawl_date")
    return {
        "images": [row.asDict() for row in images.collect()],
        "embeddings": {row.uid: row.asDict() for row in embeddings.collect()},
        "crawl_date": {row.uid: row.crawl_date for row in candidates.collect()},
        "dataset": {row.uid for row in read_table(spark, lake, DATASET).select("uid").collect()},
        "rejections": [row.asDict() for row in read_table(spark, lake, REJECTIONS).collect()],
    }


def _dataset_rejections(rows: list[dict]) -> dict[str, dict]:
    chain = [row for row in rows if row["stage"] == "dataset"]
    by_uid = {row["uid"]: row for row in chain}
    assert len(by_uid) == len(chain), "a pair has two dataset rejections"
    return by_uid


@pytest.fixture(scope="module")
def curated(spark, tmp_path_factory) -> Curated:
    root = tmp_path_factory.mktemp("curation")
    items = crawl_items()
    names = list(items)
    server: ImageServer = start_server(pool=[items[name].body for name in names])
    try:
        base_url = server.base_url
        _write_crawl(root / "crawl", base_url, items)

        eval_dir = root / "eval"
        eval_dir.mkdir()
        (eval_dir / EVAL_IMAGE).write_bytes(items["planted"].body)  # the very bytes the pool serves
        reference_dir = root / "reference"
        reference_dir.mkdir()
        for seed in range(REFERENCE_IMAGES):  # fresh renders of the reference class: seeds the pool never uses
            (reference_dir / f"ref-{seed}.jpg").write_bytes(encode(draw(REFERENCE_KIND, SIZE, seed=1000 + seed)))

        tiny = ensure_tiny_clip(PROJECT_ROOT / ".cache" / "models" / "tiny-clip")
        overrides = [f"clip.{key}={value}" for key, value in tiny.items() if key != "threshold"]
        overrides += [
            "clip.threshold=-1",
            f"download.allowed_hosts=['127.0.0.1:{server.server_port}']",
            "download.per_host_requests_per_s=0",
            "download.threads=4",
            "download.min_image_bytes=1024",
            "candidates.language.languages=[en, de, fr]",
            f"dataset.filters=[{', '.join(FILTERS)}]",
            f"dedup.eval_sets=['{eval_dir}']",
            f"dedup.phash_distance={PHASH_DISTANCE}",
            f"dedup.eval_phash_distance={PHASH_DISTANCE}",
            f"dedup.eval_min_cosine={EVAL_MIN_COSINE}",
            f"dataset.image_cluster.reference=['{reference_dir}']",
            f"dataset.image_cluster.clusters={CLUSTERS}",
        ]
        with resources.as_file(DEMO_CONFIG) as demo_config:
            config = load_config(demo_config, overrides)
        lake = str(root / "lake")
        result = run_pipeline(spark, config, lake, [str(root / "crawl" / "*")], progress=lambda line: None)
        assert result.ok, result.failure
    finally:
        server.shutdown()

    state = _collect(spark, lake)
    by_url = {row["url"]: row for row in state["images"]}
    uid = {name: by_url[f"{base_url}/pool/{names.index(name)}.jpg"]["uid"] for name in names}
    return Curated(
        lake=lake,
        run_id=result.run_id,
        config=config,
        eval_dir=str(eval_dir),
        eval_bytes=items["planted"].body,
        items=items,
        uid=uid,
        phash={row["uid"]: row["phash"] for row in state["images"]},
        similarity={u: row["similarity"] for u, row in state["embeddings"].items()},
        scored={u: row["status"] for u, row in state["embeddings"].items()},
        crawl_date=state["crawl_date"],
        dataset=state["dataset"],
        rejections=_dataset_rejections(state["rejections"]),
        funnel={step: (i, o) for stage, step, i, o in read_funnel(spark, lake, result.run_id) if stage == "score"},
    )


def _rank(curated: Curated, uid: str) -> tuple:
    """The chain's survivor order: similarity descending, then the earliest crawl, then the smallest uid."""
    return (-curated.similarity[uid], curated.crawl_date[uid], uid)


def _reached(curated: Curated, step: str, filters: list[str]) -> set[str]:
    """The uids still in when ``step`` ran: every scored pair but those an earlier step removed."""
    earlier = set(filters[: filters.index(step)])
    return {u for u in curated.similarity if not (u in curated.rejections and curated.rejections[u]["step"] in earlier)}


def test_every_pair_is_downloaded_scored_and_either_kept_or_rejected_once(curated):
    assert len(curated.uid) == len(curated.items) == len(set(curated.uid.values()))
    assert set(curated.scored) == set(curated.uid.values())  # every image fetched and scored
    assert set(curated.scored.values()) == {"ok"}
    assert all(value is not None for value in curated.phash.values())
    assert curated.dataset | set(curated.rejections) == set(curated.similarity)
    assert not curated.dataset & set(curated.rejections)
    # clip.threshold = -1: the threshold keeps everything, every removal is one of the chain's own steps.
    assert {row["step"] for row in curated.rejections.values()} == {"decontaminate", "near_dup", "image_cluster"}
    assert all(row["run_id"] == curated.run_id for row in curated.rejections.values())


def test_copies_collapse_onto_the_most_similar_of_their_group(curated):
    group = [curated.uid[name] for name in GROUP]
    # The copies are within the distance of each other, all of them (so the group has one survivor whatever the
    # scores), and the look-alikes are far from every other image of the pool.
    for a in group:
        for b in group:
            assert hamming_distance(curated.phash[a], curated.phash[b]) <= PHASH_DISTANCE
    for name in LOOKALIKES:
        one = curated.uid[name]
        nearest = min(hamming_distance(curated.phash[one], curated.phash[u]) for u in curated.phash if u != one)
        assert nearest > PHASH_DISTANCE, name

    survivor = min(group, key=lambda u: _rank(curated, u))  # the highest CLIP similarity of the four
    assert survivor in curated.dataset
    near_dup = {u: row for u, row in curated.rejections.items() if row["step"] == "near_dup"}
    assert set(near_dup) == set(group) - {survivor}
    for uid, row in near_dup.items():
        distance = hamming_distance(curated.phash[uid], curated.phash[survivor])
        assert (row["stage"], row["survivor_uid"], row["eval_set"]) == ("dataset", survivor, None)
        assert (row["value"], row["bound"]) == (distance, PHASH_DISTANCE)
        assert row["detail"] == f"pHash within {distance} bits of {survivor}"
    for name in LOOKALIKES:
        assert curated.rejections.get(curated.uid[name], {}).get("step") != "near_dup", name


def test_planted_eval_image_and_its_reencoded_copy_are_decontaminated(curated):
    eval_phash = phash(oriented_rgb(curated.eval_bytes))  # as the eval set's signature computes it
    decontaminated = {u: row for u, row in curated.rejections.items() if row["step"] == "decontaminate"}
    assert set(decontaminated) == {curated.uid[name] for name in PLANTED}
    assert hamming_distance(curated.phash[curated.uid["planted"]], eval_phash) == 0  # the same bytes
    for uid, row in decontaminated.items():
        distance = hamming_distance(curated.phash[uid], eval_phash)
        assert distance <= PHASH_DISTANCE  # a pHash match, which comes before an embedding match
        assert (row["stage"], row["eval_set"], row["survivor_uid"]) == ("dataset", curated.eval_dir, None)
        assert (row["value"], row["bound"]) == (distance, PHASH_DISTANCE)
        assert row["detail"] == f"pHash within {distance} bits of {EVAL_IMAGE} in eval set {curated.eval_dir}"


def test_image_cluster_keeps_the_reference_class_and_rejects_most_others(curated):
    reached = _reached(curated, "image_cluster", FILTERS)
    in_class = {u for u in reached if curated.items[curated.key_of(u)].kind == REFERENCE_KIND}
    others = reached - in_class
    # The group's survivor and the three red crosses drawn elsewhere.
    assert len(in_class) == 4 and len(others) == len(OTHER_KINDS) * 3 + 2
    # k-means over ~20 rows with 8 clusters may split the four red crosses (their positions and scales differ), and
    # which way depends on the tiny model each clone trains: a half of the class at least is kept, and the kept
    # rows are the class's more than any other's.
    kept_in_class = in_class & curated.dataset
    assert len(kept_in_class) >= len(in_class) // 2, f"{len(kept_in_class)} of {len(in_class)} red crosses kept"
    assert len(kept_in_class) >= len(curated.dataset - in_class)
    rejected = {u: row for u, row in curated.rejections.items() if row["step"] == "image_cluster"}
    assert set(rejected) <= others
    assert len(rejected) >= 0.8 * len(others), f"{len(rejected)} of {len(others)} other-class rows rejected"
    for row in rejected.values():
        cluster = int(row["value"])
        assert 0 <= cluster < CLUSTERS and row["bound"] is None and row["survivor_uid"] is None
        assert row["detail"] == f"image cluster {cluster} of {CLUSTERS} holds no reference image"
    # Every reached row is kept or rejected by this step: nothing falls between.
    assert reached - set(rejected) == curated.dataset


def test_stage_stats_count_exactly_the_rejections_of_each_step(curated):
    steps = [step for step in curated.funnel if step.startswith("dataset.")]
    assert steps == [f"dataset.{name}" for name in FILTERS]
    rows_in = len(curated.similarity)
    for name in FILTERS:
        step_in, step_out = curated.funnel[f"dataset.{name}"]
        rejected = sum(1 for row in curated.rejections.values() if row["step"] == name)
        assert step_in == rows_in, name
        assert step_in - step_out == rejected, name
        rows_in = step_out
    assert rows_in == len(curated.dataset)
    assert curated.funnel["dataset.threshold"] == (len(curated.items),) * 2
    # decontaminate's removals broken down by eval set (a "status:" row: not a funnel step of its own).
    breakdown = {step: counts for step, counts in curated.funnel.items() if step.startswith("status:decontaminate:")}
    assert breakdown == {f"status:decontaminate:{curated.eval_dir}": (curated.funnel["dataset.decontaminate"][0], 2)}


def explain(capsys, lake: str, uid: str) -> str:
    capsys.readouterr()
    assert main(["explain", "--lake", lake, "--uid", uid]) in (0, None)
    return capsys.readouterr().out


def test_explain_tells_why_each_kind_of_pair_is_in_or_out(capsys, curated):
    group = [curated.uid[name] for name in GROUP]
    survivor = min(group, key=lambda u: _rank(curated, u))
    story = explain(capsys, curated.lake, survivor)
    assert f"verdict: IN dataset (similarity {curated.similarity[survivor]:.4f})" in story
    assert "removed by" not in story

    copy_uid = curated.uid["cropped"] if curated.uid["cropped"] != survivor else curated.uid["resized"]
    row = curated.rejections[copy_uid]
    story = explain(capsys, curated.lake, copy_uid)
    assert f"verdict: NOT in dataset: removed by dataset.near_dup: {row['detail']}" in story
    assert f"removed by near_dup: {row['detail']} (survivor {survivor}) [run {curated.run_id}]" in story
    assert curated.items[curated.key_of(copy_uid)].alt in story

    for name in PLANTED:
        row = curated.rejections[curated.uid[name]]
        story = explain(capsys, curated.lake, curated.uid[name])
        assert f"verdict: NOT in dataset: removed by dataset.decontaminate: {row['detail']}" in story
        assert f"in eval set {curated.eval_dir}" in story and EVAL_IMAGE in story


REASON = ("stage", "step", "detail", "survivor_uid", "eval_set", "value", "bound")


def _reason(row: dict) -> tuple:
    return tuple(row[name] for name in REASON)


def _recut(spark, curated: Curated, lake: str, overrides: list[str]) -> tuple[dict, dict[str, tuple[int, int]]]:
    """``rebuild_dataset`` (what ``laion-spark dataset`` runs) over a copy of the module's lake."""
    from laion_spark.score import rebuild_dataset

    shutil.copytree(curated.lake, lake)
    config = copy.deepcopy(curated.config)
    for override in overrides:
        apply_override(config, override)
    kept, considered = rebuild_dataset(spark, config, lake)
    state = _collect(spark, lake)
    assert (kept, considered) == (len(state["dataset"]), len(curated.similarity))
    funnel = {step: (i, o) for stage, step, i, o in read_funnel(spark, lake) if stage == "score"}
    return state, funnel


def _assert_counts_match(funnel: dict[str, tuple[int, int]], rejections: dict[str, dict], order: list[str]) -> None:
    assert [step for step in funnel if step.startswith("dataset.")] == [f"dataset.{name}" for name in order]
    for name in order:
        rows_in, rows_out = funnel[f"dataset.{name}"]
        assert rows_in - rows_out == sum(1 for row in rejections.values() if row["step"] == name), name


def test_recut_with_near_dup_before_decontaminate_names_the_copy_a_near_duplicate(spark, curated, tmp_path):
    """The issue's order: near_dup runs first, so of the planted pair (2 bits apart) only the better-ranked one is
    left for decontaminate; the other is a near-duplicate of it. Every other pair is removed as before."""
    order = ["threshold", "near_dup", "decontaminate", "image_cluster"]
    state, funnel = _recut(spark, curated, str(tmp_path / "lake"), [f"dataset.filters=[{', '.join(order)}]"])
    rejections = _dataset_rejections(state["rejections"])
    assert state["dataset"] == curated.dataset

    first, second = sorted((curated.uid[name] for name in PLANTED), key=lambda u: _rank(curated, u))
    distance = hamming_distance(curated.phash[first], curated.phash[second])
    assert _reason(rejections[second]) == (
        "dataset", "near_dup", f"pHash within {distance} bits of {first}", first, None, distance, PHASH_DISTANCE
    )  # fmt: skip
    assert _reason(rejections[first]) == _reason(curated.rejections[first])  # decontaminate, as before
    assert set(rejections) == set(curated.rejections)
    for uid, row in curated.rejections.items():
        if uid != second:
            assert _reason(rejections[uid]) == _reason(row), curated.key_of(uid)
    _assert_counts_match(funnel, rejections, order)


def test_recut_with_semdedup_drops_exactly_what_comparing_every_pair_drops(spark, curated, tmp_path):
    """SemDeDup in one k-means cluster is every pair compared: each pair is dropped when a better-ranked one has
    image-embedding cosine >= 1 - epsilon, and its survivor is the best-ranked such pair."""
    epsilon = 0.02
    order = ["threshold", "semdedup"]
    overrides = [f"dataset.filters=[{', '.join(order)}]", "dedup.semdedup_clusters=1"]
    overrides.append(f"dedup.semdedup_epsilon={epsilon}")
    lake = str(tmp_path / "lake")
    state, funnel = _recut(spark, curated, lake, overrides)
    rejections = _dataset_rejections(state["rejections"])

    embeddings = read_table(spark, lake, EMBEDDINGS).select("uid", "image_embedding").collect()
    ranked = sorted((row.uid for row in embeddings), key=lambda u: _rank(curated, u))
    vectors = {row.uid: np.asarray(row.image_embedding, dtype=np.float32) for row in embeddings}
    bound = 1.0 - epsilon
    expected = {}
    for position, uid in enumerate(ranked):
        for better in ranked[:position]:
            cosine = float(vectors[uid] @ vectors[better])
            assert abs(cosine - bound) > 1e-4, "a pair sits on the bound: pick another epsilon"
            if cosine >= bound:
                expected[uid] = (better, cosine)
                break
    # The near-duplicate group's copies are near-copies in embedding space too.
    group = sorted((curated.uid[name] for name in GROUP), key=lambda u: _rank(curated, u))
    assert set(group[1:]) <= set(expected)

    assert set(rejections) == set(expected)
    assert state["dataset"] == set(curated.similarity) - set(expected)
    for uid, (survivor, cosine) in expected.items():
        row = rejections[uid]
        assert (row["stage"], row["step"], row["survivor_uid"], row["eval_set"]) == (
            "dataset", "semdedup", survivor, None
        )  # fmt: skip
        assert row["value"] == pytest.approx(cosine, abs=1e-5) and row["bound"] == pytest.approx(bound)
        assert row["detail"] == f"image embedding cosine {row['value']:.4f} with {survivor}"
    _assert_counts_match(funnel, rejections, order)
