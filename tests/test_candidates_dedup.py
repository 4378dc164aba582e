"""Exact dedup through real Spark: key normalisation in Spark SQL, one deterministic survivor per key."""

from __future__ import annotations

import datetime as dt

from pyspark.sql import functions as F

from laion_spark.candidates import (
    DEDUP_KEY,
    add_dedup_key,
    keep_first_per_key,
    keep_new_or_earlier,
    normalize_text,
    normalize_url,
)
from laion_spark.schemas import PAIRS_SCHEMA


def test_normalisation_folds_case_of_scheme_host_and_text_but_not_path(spark):
    cases = [
        ("HTTPS://Example.ORG:443/Path/Cat.JPG?q=A#frag", "https://example.org/Path/Cat.JPG?q=A"),
        ("http://Example.org:80", "http://example.org/"),
        ("http://example.org:8080/a", "http://example.org:8080/a"),
        ("http://User@Example.org?x=1", "http://User@example.org/?x=1"),
        ("  not a url#x ", "not a url"),
    ]
    texts = [("  A  Black\tCAT\u00a0 on\n a mat ", "a black cat on a mat")]
    url_frame = spark.createDataFrame([(raw,) for raw, _ in cases], "url string")
    got_urls = [r.n for r in url_frame.select(normalize_url(F.col("url")).alias("n")).collect()]
    assert got_urls == [expected for _, expected in cases]
    text_frame = spark.createDataFrame([(raw,) for raw, _ in texts], "text string")
    assert [r.n for r in text_frame.select(normalize_text(F.col("text")).alias("n")).collect()] == [texts[0][1]]


def row(uid, url, text, source_file, offset, day):
    date = dt.datetime(2024, 1, day) if day else None
    return (uid, url, text, None, source_file, offset, date, "wat")


DUPLICATES = [
    # one key, spread within a file and across files; the earliest crawl wins, then file, then offset
    row("late", "https://example.org/cat.jpg", "A black cat", "b.wat.gz", 10, 5),
    row("same-day-later-file", "https://EXAMPLE.org/cat.jpg#x", "a  black CAT", "c.wat.gz", 1, 2),
    row("winner", "https://example.org/cat.jpg", "A black cat ", "b.wat.gz", 900, 2),
    row("same-file-later-offset", "https://example.org/cat.jpg", "a black cat", "b.wat.gz", 901, 2),
    row("no-date", "https://example.org/cat.jpg", "A black cat", "a.wat.gz", 0, None),
    # same URL, other text: another key in url_text mode, the same key in url mode
    row("other-text", "https://example.org/cat.jpg", "A sleeping cat", "a.wat.gz", 5, 1),
    row("unique", "https://example.org/dog.jpg", "A dog", "a.wat.gz", 7, 3),
]


def test_exactly_one_survivor_per_key_and_the_same_whatever_the_partitioning(spark):
    pairs = spark.createDataFrame(DUPLICATES, PAIRS_SCHEMA)
    survivors = set()
    for partitions in (1, 3):
        shuffled = pairs.repartition(partitions, F.rand(seed=partitions))
        deduped = shuffled.transform(add_dedup_key).transform(keep_first_per_key)
        survivors.add(frozenset(r.uid for r in deduped.select("uid").collect()))
    assert survivors == {frozenset({"winner", "other-text", "unique"})}


def test_url_only_mode_keys_on_the_url_alone(spark):
    pairs = spark.createDataFrame(DUPLICATES, PAIRS_SCHEMA)
    deduped = pairs.transform(add_dedup_key, "url").transform(keep_first_per_key)
    assert sorted(r.uid for r in deduped.select("uid").collect()) == ["other-text", "unique"]


def test_against_the_lake_keeps_new_keys_and_earlier_survivors_only(spark):
    batch = spark.createDataFrame(DUPLICATES, PAIRS_SCHEMA).transform(add_dedup_key).transform(keep_first_per_key)
    existing = spark.createDataFrame(
        [
            row("stored-later", "https://example.org/cat.jpg", "a black cat", "z.wat.gz", 0, 9),
            row("stored-earlier", "https://example.org/dog.jpg", "A dog", "a.wat.gz", 6, 3),
        ],
        PAIRS_SCHEMA,
    ).transform(add_dedup_key)
    kept = batch.transform(keep_new_or_earlier, existing).select("uid", DEDUP_KEY)
    # "winner" (day 2) replaces the stored day-9 row, "other-text" is new, "unique" loses to offset 6 < 7
    assert sorted(r.uid for r in kept.collect()) == ["other-text", "winner"]
