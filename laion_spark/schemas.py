"""Every Delta table's schema, in one place. The README's table reference is written from these."""

from __future__ import annotations

from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

# Table names inside the lake directory: <lake>/<name>
PAIRS = "pairs"
INGEST_LOG = "ingest_log"
STAGE_STATS = "stage_stats"
CANDIDATES = "candidates"
IMAGES = "images"
EMBEDDINGS = "embeddings"
DATASET = "dataset"
REJECTIONS = "rejections"
RUNS = "runs"
REMOVALS = "removals"


def _schema(*fields: tuple[str, object, bool]) -> StructType:
    return StructType([StructField(name, dtype, nullable) for name, dtype, nullable in fields])


# One pair as extraction emits it; the table adds the slice that wrote it (PAIRS_SCHEMA).
PAIR_ROW_SCHEMA = _schema(
    ("uid", StringType(), False),  # sha1 of normalised url + "\t" + normalised text
    ("url", StringType(), False),  # absolute http(s) image URL
    ("text", StringType(), False),  # alt text, entities decoded, whitespace collapsed
    # text as dedup compares it: NFKC, casefolded, NFKC, whitespace collapsed (extract.text.text_key)
    ("text_key", StringType(), False),
    ("page_url", StringType(), True),
    ("source_file", StringType(), False),
    ("record_offset", LongType(), True),  # byte offset of the WARC/WAT record in its (compressed) file
    ("crawl_date", TimestampType(), True),
    ("source_format", StringType(), False),  # wat | warc | arc
    # the page's Creative Commons licence in short form (by-sa/4.0, cc0, pdm), or null (extract.licenses)
    ("license", StringType(), True),
)

# The extraction slice that wrote the row (<run_id>-<slice>): pairs is partitioned by it, so re-reading a file
# replaces its rows inside the one partition of the slice that first wrote them (README "Table layout").
INGEST_BATCH = ("ingest_batch", StringType(), False)
PAIRS_SCHEMA = _schema(*((f.name, f.dataType, f.nullable) for f in PAIR_ROW_SCHEMA.fields), INGEST_BATCH)

INGEST_LOG_SCHEMA = _schema(
    ("source_file", StringType(), False),
    ("status", StringType(), False),  # ok | partial | failed
    ("records_read", LongType(), False),
    ("pairs_emitted", LongType(), False),
    ("error", StringType(), True),
    ("duration_s", DoubleType(), False),
    ("run_id", StringType(), False),
    ("finished_at", TimestampType(), False),
    INGEST_BATCH,  # the pairs partition holding the file's rows; status "started" until the slice commits
)

# One row per (run, stage, step): the funnel is drawn from this table.
STAGE_STATS_SCHEMA = _schema(
    ("run_id", StringType(), False),
    ("stage", StringType(), False),  # extract | candidates | download | score
    ("seq", IntegerType(), False),  # order of the step within its stage
    ("step", StringType(), False),  # e.g. min_text_chars, dedup_within_batch, dedup_against_lake
    ("rows_in", LongType(), False),
    ("rows_out", LongType(), False),
    ("recorded_at", TimestampType(), False),
)

CANDIDATES_SCHEMA = _schema(
    ("uid", StringType(), False),
    ("dedup_key", StringType(), False),
    ("url", StringType(), False),
    ("text", StringType(), False),
    ("text_key", StringType(), False),  # as in pairs; Spark's lower() + collapsed whitespace for frames without it
    ("page_url", StringType(), True),
    ("source_file", StringType(), False),
    ("record_offset", LongType(), True),
    ("crawl_date", TimestampType(), True),
    ("language", StringType(), False),  # ISO 639-1 code, or "none" below the confidence threshold
    ("language_confidence", DoubleType(), False),
    ("ingest_batch", StringType(), True),  # the pairs slice the row came from (<extract run id>-<slice>)
    ("run_id", StringType(), True),  # the candidates run that wrote the row
    # as in pairs: the page's CC licence (by-sa/4.0, cc0, pdm) or null; last, where ALTER TABLE puts it in older lakes
    ("license", StringType(), True),
)

# One image row as the download emits it; the table adds the slice that wrote it (IMAGES_SCHEMA).
IMAGE_ROW_SCHEMA = _schema(
    ("uid", StringType(), False),
    ("url", StringType(), False),
    # success | failed_to_download | failed_to_decode | too_small | too_large | bad_aspect_ratio |
    # disallowed | blocked_address | timeout | http_error | removed (its hash is in `removals`: no bytes kept)
    ("status", StringType(), False),
    ("error", StringType(), True),
    ("http_status", IntegerType(), True),
    ("content_type", StringType(), True),
    ("original_width", IntegerType(), True),
    ("original_height", IntegerType(), True),
    ("width", IntegerType(), True),
    ("height", IntegerType(), True),
    ("sha256", StringType(), True),
    # 64-bit perceptual hash of the decoded image (laion_spark.curate.phash, imagehash's pHash), signed
    ("phash", LongType(), True),
    ("image", BinaryType(), True),
    ("attempts", IntegerType(), False),
    ("fetched_at", TimestampType(), False),
    ("md5", StringType(), True),  # md5 hex of the body as downloaded, as takedown lists name images (Re-LAION)
)

# The download slice that wrote the row (<run_id>-<slice>): images is partitioned by it, so score reads the bytes
# of one slice's partitions at a time, and never scans the whole table for them.
IMAGES_SCHEMA = _schema(
    *((f.name, f.dataType, f.nullable) for f in IMAGE_ROW_SCHEMA.fields), ("fetch_batch", StringType(), False)
)

EMBEDDINGS_SCHEMA = _schema(
    ("uid", StringType(), False),
    ("image_embedding", ArrayType(FloatType()), True),
    ("text_embedding", ArrayType(FloatType()), True),
    ("embedding_dtype", StringType(), False),  # precision the vectors were rounded to: float16 | float32
    ("similarity", FloatType(), True),
    ("status", StringType(), False),  # ok | failed_to_decode
    ("error", StringType(), True),
    ("nsfw", StringType(), True),  # NSFW | UNSURE | UNLIKELY, kept here so the dataset can be re-cut without rescoring
    ("punsafe", FloatType(), True),
    ("model", StringType(), False),
    ("run_id", StringType(), False),
    ("scored_at", TimestampType(), False),
)

DATASET_SCHEMA = _schema(
    ("uid", StringType(), False),
    ("url", StringType(), False),
    ("text", StringType(), False),
    ("similarity", FloatType(), False),
    ("width", IntegerType(), True),
    ("height", IntegerType(), True),
    ("original_width", IntegerType(), True),
    ("original_height", IntegerType(), True),
    ("language", StringType(), True),
    ("nsfw", StringType(), True),  # NSFW | UNSURE | UNLIKELY (clip.nsfw_tags), null where none: "not tagged"
    ("punsafe", FloatType(), True),  # LAION's CLIP-based NSFW detector, when its weights are given
    ("model", StringType(), False),
    # Lineage: where the pair came from and which run of each stage produced it (`laion-spark explain`). The runs
    # table holds each run's effective config; config_hashes repeats their hashes here, stage -> hash.
    ("source_file", StringType(), True),
    ("record_offset", LongType(), True),
    ("crawl_date", TimestampType(), True),
    ("page_url", StringType(), True),
    ("extract_run_id", StringType(), True),
    ("candidates_run_id", StringType(), True),
    ("download_run_id", StringType(), True),
    ("score_run_id", StringType(), True),
    ("model_checksum", StringType(), True),  # sha256 of the checkpoint file the scores came from, when local
    ("config_hashes", MapType(StringType(), StringType()), True),
)

# One row per pair that a step removed, and why (`dataset.rejections: false` turns it off). Partitioned by stage.
# candidates: a rule (step = its name) or dedup (survivor_uid = the candidate kept for the same key); download: the
# status of a failed fetch; score: failed_to_decode; dataset: the filter chain's steps (threshold, top_k_percent,
# near_dup, semdedup, decontaminate, image_cluster), replaced whenever dataset is rebuilt.
REJECTIONS_SCHEMA = _schema(
    ("uid", StringType(), False),
    ("stage", StringType(), False),
    ("step", StringType(), False),
    ("detail", StringType(), True),  # one human-readable sentence: what matched, against what
    ("survivor_uid", StringType(), True),  # dedup steps: the pair kept instead
    ("eval_set", StringType(), True),  # decontaminate: the eval set matched
    ("value", DoubleType(), True),  # the measured quantity: similarity, Hamming distance, cosine
    ("bound", DoubleType(), True),  # the bound it was held against: threshold, max distance, min cosine
    ("run_id", StringType(), False),
    ("recorded_at", TimestampType(), False),
)

# One row per (run, stage): what produced the rows a run wrote, for lineage.
RUNS_SCHEMA = _schema(
    ("run_id", StringType(), False),
    ("stage", StringType(), False),
    ("config_hash", StringType(), False),  # sha256 (16 hex digits) of config, canonical JSON
    ("config", StringType(), False),  # the stage's effective config sections as JSON
    ("model", StringType(), True),  # score: model name and weights
    ("model_checksum", StringType(), True),  # score: sha256 of a local checkpoint file
    ("laion_spark_version", StringType(), False),
    ("recorded_at", TimestampType(), False),
)

# One row per item of a takedown (`laion-spark remove`): what was removed, and a blocklist that every stage
# consults, so that a removed URL, pair or image never comes back. Rows are kept when nothing matched at the time.
REMOVALS_SCHEMA = _schema(
    # url: normalised as pairs stores it; url_md5 / url_sha256: hex of the URL; uid: a pair's uid;
    # sha256 / md5: hex of the image body as downloaded; phash: 16 hex digits of images.phash
    ("value", StringType(), False),
    ("kind", StringType(), False),  # url | url_md5 | url_sha256 | uid | sha256 | md5 | phash
    ("reason", StringType(), False),
    ("removed_by", StringType(), False),
    ("removed_at", TimestampType(), False),
    ("run_id", StringType(), False),
)

# Not a table of the data flow (so not in SCHEMAS, nor in the README's table reference): the run marker that
# `laion-spark run` holds while it runs, so that two scheduled runs never interleave on one lake (laion_spark/run/lock.py).
RUN_LOCK = "_run_lock"
RUN_LOCK_SCHEMA = _schema(
    ("lock_key", StringType(), False),  # always "lake": the table holds one row
    ("run_id", StringType(), True),  # the run holding the lake; null when the lake is free
    ("host", StringType(), True),
    ("pid", LongType(), True),
    ("started_at", TimestampType(), True),
    ("heartbeat_at", TimestampType(), True),  # a run whose heartbeat is older than the lease is taken over
)

# Not a table of the data flow either: how far each consuming stage has read the table it reads, so that a run reads
# only the commits made since the last one (laion_spark/candidates/stage.py reads pairs this way). One row per
# (consumer, source); deleting a row makes that consumer's next run read its source whole.
BOOKMARKS = "_bookmarks"
BOOKMARKS_SCHEMA = _schema(
    ("consumer", StringType(), False),  # the stage that reads: candidates
    ("source", StringType(), False),  # the table it reads: pairs
    ("source_id", StringType(), False),  # the Delta table id of source (DESCRIBE DETAIL): a recreated table reads whole
    ("version", LongType(), False),  # every commit of source up to this version has been read
    ("run_id", StringType(), False),
    ("updated_at", TimestampType(), False),
)

# Delta table properties a table is created with (storage.ensure_table), and why (README "Table layout"):
# - pairs records its change data feed, from which candidates reads the pairs inserted since its bookmark;
# - images and candidates take deletion vectors, so that a MERGE replacing a few rows (--retry-failed, an earlier
#   survivor) marks them deleted instead of rewriting every data file that holds one, image bytes included;
# - the small tables written once per slice or run compact their small files as they go, where the runtime
#   can (Delta 3.1+ and Databricks: auto compaction; other runtimes ignore the property).
_AUTO_COMPACT = {"delta.autoOptimize.autoCompact": "true"}
_DELETION_VECTORS = {"delta.enableDeletionVectors": "true"}
TABLE_PROPERTIES: dict[str, dict[str, str]] = {
    PAIRS: {"delta.enableChangeDataFeed": "true"},
    INGEST_LOG: _AUTO_COMPACT,
    STAGE_STATS: _AUTO_COMPACT,
    CANDIDATES: _DELETION_VECTORS,
    IMAGES: _DELETION_VECTORS,
    EMBEDDINGS: _AUTO_COMPACT,
    DATASET: {**_DELETION_VECTORS, **_AUTO_COMPACT},
    REJECTIONS: _AUTO_COMPACT,
    RUNS: _AUTO_COMPACT,
    REMOVALS: _AUTO_COMPACT,
}

# Partition columns (storage.ensure_table): the slice that wrote each row, for the two tables a later step reads or
# rewrites one slice at a time.
PARTITION_COLUMNS: dict[str, list[str]] = {PAIRS: ["ingest_batch"], IMAGES: ["fetch_batch"], REJECTIONS: ["stage"]}

SCHEMAS: dict[str, StructType] = {
    PAIRS: PAIRS_SCHEMA,
    INGEST_LOG: INGEST_LOG_SCHEMA,
    STAGE_STATS: STAGE_STATS_SCHEMA,
    CANDIDATES: CANDIDATES_SCHEMA,
    IMAGES: IMAGES_SCHEMA,
    EMBEDDINGS: EMBEDDINGS_SCHEMA,
    DATASET: DATASET_SCHEMA,
    REJECTIONS: REJECTIONS_SCHEMA,
    RUNS: RUNS_SCHEMA,
    REMOVALS: REMOVALS_SCHEMA,
}
