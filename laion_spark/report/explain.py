"""``laion-spark explain``: the whole story of one pair, from its archive record to ``dataset`` or to the step that
removed it: where it came from, what each stage did with it and why, read from the lake's own tables.

Each table is read filtered on the pair's uid (or url): a lookup, printed for a person. On a crawl-sized lake each
read is a scan of the key column, pruned by Delta's file statistics where the layout allows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.config import ConfigError
from laion_spark.curate.phash import phash_hex
from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, PAIRS, REJECTIONS, RUNS
from laion_spark.storage.delta import read_table, table_exists

# At most this many rows of one table about one pair are printed (a URL can carry many alt texts).
MAX_ROWS = 20
STAGE_ORDER = {"candidates": 0, "download": 1, "score": 2, "dataset": 3}


@dataclass
class PairStory:
    """What the lake knows about one uid, table by table (rows as dicts), and the verdict."""

    uid: str
    pairs: list[dict[str, Any]] = field(default_factory=list)
    candidate: dict[str, Any] | None = None
    image: dict[str, Any] | None = None
    embedding: dict[str, Any] | None = None
    rejections: list[dict[str, Any]] = field(default_factory=list)
    dataset: dict[str, Any] | None = None
    runs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def in_dataset(self) -> bool:
        return self.dataset is not None

    def verdict(self) -> str:
        if self.in_dataset:
            return f"IN dataset (similarity {self.dataset['similarity']:.4f})"
        # The latest decision of the furthest stage is the one that holds.
        if self.rejections:
            last = max(self.rejections, key=lambda r: (STAGE_ORDER.get(r["stage"], 9), r["recorded_at"]))
            return f"NOT in dataset: removed by {last['stage']}.{last['step']}: {last['detail'] or last['step']}"
        if self.embedding is not None:
            return "NOT in dataset: scored, but not in dataset (rebuild the dataset or run score again)"
        if self.image is not None:
            return f"NOT in dataset: downloaded ({self.image['status']}), not scored yet"
        if self.candidate is not None:
            return "NOT in dataset: a candidate, not downloaded yet"
        if self.pairs:
            return "NOT in dataset: extracted, not through the candidates stage yet"
        return "unknown to this lake"


def explain_pair(spark: SparkSession, lake: str, uid: str | None = None, url: str | None = None) -> list[PairStory]:
    """The story of the pair ``uid``, or of every pair whose image URL is ``url`` (at most MAX_ROWS)."""
    if bool(uid) == bool(url):
        raise ConfigError("explain: give --uid or --url")
    uids = [uid] if uid else _uids_of_url(spark, lake, url)
    return [_story(spark, lake, one) for one in uids]


def _uids_of_url(spark: SparkSession, lake: str, url: str) -> list[str]:
    found: set[str] = set()
    for name in (PAIRS, CANDIDATES, IMAGES):
        if table_exists(spark, lake, name):
            rows = read_table(spark, lake, name).where(F.col("url") == url).select("uid").distinct().limit(MAX_ROWS)
            found.update(row.uid for row in rows.collect())
    return sorted(found)[:MAX_ROWS]


def _rows(spark: SparkSession, lake: str, name: str, uid: str, columns: list[str] | None = None) -> list[dict]:
    if not table_exists(spark, lake, name):
        return []
    table: DataFrame = read_table(spark, lake, name).where(F.col("uid") == uid)
    if columns:
        table = table.select(*[c for c in columns if c in table.columns])
    return [row.asDict() for row in table.limit(MAX_ROWS).collect()]


def _story(spark: SparkSession, lake: str, uid: str) -> PairStory:
    story = PairStory(uid)
    story.pairs = _rows(spark, lake, PAIRS, uid)
    story.candidate = next(iter(_rows(spark, lake, CANDIDATES, uid)), None)
    story.image = next(iter(_rows(spark, lake, IMAGES, uid, _IMAGE_COLUMNS)), None)
    story.embedding = next(iter(_rows(spark, lake, EMBEDDINGS, uid, _EMBEDDING_COLUMNS)), None)
    story.rejections = sorted(
        _rows(spark, lake, REJECTIONS, uid), key=lambda r: (STAGE_ORDER.get(r["stage"], 9), r["recorded_at"])
    )
    story.dataset = next(iter(_rows(spark, lake, DATASET, uid)), None)
    run_ids = _run_ids(story)
    if run_ids and table_exists(spark, lake, RUNS):
        runs = read_table(spark, lake, RUNS).where(F.col("run_id").isin(*run_ids)).drop("config")
        story.runs = {(row.run_id, row.stage): row.asDict() for row in runs.collect()}
    return story


_IMAGE_COLUMNS = [
    "uid", "url", "status", "error", "http_status", "content_type", "original_width", "original_height", "width",
    "height", "sha256", "phash", "attempts", "fetched_at", "fetch_batch",
]  # fmt: skip
_EMBEDDING_COLUMNS = ["uid", "similarity", "status", "error", "nsfw", "punsafe", "model", "run_id", "scored_at"]


def _batch_run(batch: str | None) -> str | None:
    return batch.rsplit("-", 1)[0] if batch and "-" in batch else None


def _run_ids(story: PairStory) -> set[str]:
    ids = {_batch_run(p.get("ingest_batch")) for p in story.pairs}
    if story.candidate:
        ids.add(story.candidate.get("run_id"))
    if story.image:
        ids.add(_batch_run(story.image.get("fetch_batch")))
    if story.embedding:
        ids.add(story.embedding.get("run_id"))
    ids.update(r["run_id"] for r in story.rejections)
    return {i for i in ids if i}


def format_story(story: PairStory) -> str:
    lines = [f"pair {story.uid}", f"  verdict: {story.verdict()}"]

    def run(stage: str, run_id: str | None) -> str:
        if not run_id:
            return ""
        info = story.runs.get((run_id, stage))
        return f" (run {run_id}" + (f", config {info['config_hash']})" if info else ")")

    lines.append("  extract:")
    if not story.pairs:
        lines.append("    not in pairs")
    for pair in story.pairs:
        lines.append(f"    url   {pair['url']}")
        lines.append(f"    text  {pair['text']!r}")
        lines.append(
            f"    from  {pair['source_file']} at offset {pair['record_offset']} ({pair['source_format']}), "
            f"crawled {pair['crawl_date']}, page {pair['page_url']}{run('extract', _batch_run(pair.get('ingest_batch')))}"
        )
    lines.append("  candidates:")
    if story.candidate:
        c = story.candidate
        lines.append(
            f"    kept: language {c['language']} ({c['language_confidence']:.2f}){run('candidates', c.get('run_id'))}"
        )
    lines += _decisions(story, "candidates", "    not a candidate")
    lines.append("  download:")
    if story.image:
        i = story.image
        size = f"{i['original_width']}x{i['original_height']} -> {i['width']}x{i['height']}" if i["width"] else ""
        phash = f", pHash {phash_hex(i['phash'])}" if i.get("phash") is not None else ""
        lines.append(
            f"    {i['status']} (HTTP {i['http_status']}) {size} sha256 {i['sha256']}{phash}"
            f"{run('download', _batch_run(i.get('fetch_batch')))}"
        )
    lines += _decisions(story, "download", "    not fetched")
    lines.append("  score:")
    if story.embedding:
        e = story.embedding
        similarity = "n/a" if e["similarity"] is None else f"{e['similarity']:.4f}"
        model = story.runs.get((e["run_id"], "score"), {})
        checksum = f", checkpoint sha256 {model['model_checksum'][:16]}" if model.get("model_checksum") else ""
        lines.append(
            f"    {e['status']}: similarity {similarity}, NSFW tag {e['nsfw'] or '(not tagged)'}, model {e['model']}{checksum}"
            f"{run('score', e['run_id'])}"
        )
    lines += _decisions(story, "score", "    not scored")
    lines.append("  dataset:")
    if story.dataset:
        d = story.dataset
        hashes = ", ".join(f"{k} {v}" for k, v in sorted((d.get("config_hashes") or {}).items()))
        lines.append(f"    in dataset; config hashes: {hashes or 'n/a'}")
    lines += _decisions(story, "dataset", "    not in dataset")
    return "\n".join(lines)


def _decisions(story: PairStory, stage: str, if_none: str) -> list[str]:
    rows = [r for r in story.rejections if r["stage"] == stage]
    if not rows:
        has_row = {
            "candidates": story.candidate,
            "download": story.image,
            "score": story.embedding,
            "dataset": story.dataset,
        }[stage]
        return [] if has_row is not None else [if_none]
    out = []
    for r in rows:
        extra = f" (survivor {r['survivor_uid']})" if r.get("survivor_uid") else ""
        out.append(f"    removed by {r['step']}: {r['detail'] or r['step']}{extra} [run {r['run_id']}]")
    return out
