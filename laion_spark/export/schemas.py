"""The exact Arrow schemas of every file the exports write: names, order and types are what the consumers read.

Sources, checked against the released files' dataset cards (Hugging Face ``dataset_info``) and the writers' code:

- LAION-400M's parquet (``laion400m-meta/part-*.snappy.parquet``): ``SAMPLE_ID`` int64, ``URL``, ``TEXT``,
  ``HEIGHT`` int32, ``WIDTH`` int32, ``LICENSE``, ``NSFW`` (strings), ``similarity`` float64. (Derived copies that
  went through pandas show float64 sizes: that is pandas' NaN, not the release.)
- laion2B-en: ``URL``, ``TEXT``, ``WIDTH`` int32, ``HEIGHT`` int32, ``similarity`` float64, ``hash`` int64,
  ``punsafe`` float32, ``pwatermark`` float32. laion2B-multi adds ``LANGUAGE`` after ``similarity`` and swaps the
  last two: ``..., similarity, LANGUAGE, hash, pwatermark, punsafe``.
- img2dataset's per-shard parquet and ``{key}.json`` (``writer.py``, ``downloader.py``): the input columns, then
  ``key``, ``status``, ``error_message``, ``width``/``height``/``original_width``/``original_height`` int32 and
  ``sha256`` (of the bytes as downloaded, before resizing); the json is the same row.
- clip-retrieval's ``metadata/metadata_{i}.parquet`` (``clip_inference/writer.py``): row i describes row i of
  ``img_emb_{i}.npy`` and ``text_emb_{i}.npy``; ``clip_back`` returns ``url``, ``caption``, ``NSFW`` (and
  ``image_path`` when present: we leave it out, as our images are not files next to the index).
"""

from __future__ import annotations

import pyarrow as pa

LAION400M_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("HEIGHT", pa.int32()),
        ("WIDTH", pa.int32()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
    ]
)

LAION2B_EN_SCHEMA = pa.schema(
    [
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("WIDTH", pa.int32()),
        ("HEIGHT", pa.int32()),
        ("similarity", pa.float64()),
        ("hash", pa.int64()),
        ("punsafe", pa.float32()),
        ("pwatermark", pa.float32()),
    ]
)

LAION2B_MULTI_SCHEMA = pa.schema(
    [
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("WIDTH", pa.int32()),
        ("HEIGHT", pa.int32()),
        ("similarity", pa.float64()),
        ("LANGUAGE", pa.string()),
        ("hash", pa.int64()),
        ("pwatermark", pa.float32()),
        ("punsafe", pa.float32()),
    ]
)

# export.laion5b_columns -> the laion5b flavour's schema.
LAION5B_SCHEMAS = {"multi": LAION2B_MULTI_SCHEMA, "en": LAION2B_EN_SCHEMA}

# {shard:05d}.parquet: one row per sample of the shard, in key order; {key}.json holds the same fields.
WEBDATASET_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("similarity", pa.float64()),
        ("language", pa.string()),
        ("nsfw", pa.string()),
        ("punsafe", pa.float32()),
        ("uid", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("license", pa.string()),  # the page's Creative Commons licence (LAION's LICENSE), or null
    ]
)

# metadata/metadata_{i}.parquet of the embeddings export, row-aligned with img_emb_{i}.npy and text_emb_{i}.npy.
EMBEDDINGS_METADATA_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
        ("LICENSE", pa.string()),
        ("LANGUAGE", pa.string()),
        ("punsafe", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("uid", pa.string()),
    ]
)
