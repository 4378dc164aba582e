"""Exact dedup: the folded text key, URL normalisation in Spark SQL, one deterministic survivor per key."""

from __future__ import annotations

import datetime as dt
import unicodedata

import pytest
from pyspark.sql import functions as F

from laion_spark.candidates import (
    DEDUP_KEY,
    TEXT_KEY,
    add_dedup_key,
    dedup_text,
    dedup_url,
    keep_first_per_key,
    keep_new_or_earlier,
)
from laion_spark.extract import text_key
from laion_spark.schemas import PAIR_ROW_SCHEMA

# Each group is what a reader sees as one text.
SAME_TEXT = [
    ("ＡＢＣ１２３ ｒｅｄ ｓｈｉｒｔ", "ABC123 red shirt", "abc123 RED SHIRT"),  # full-width and half-width forms
    ("ﾃﾞｻﾞｲﾝの看板", "デザインの看板"),  # half-width katakana, voicing marks included
    ("Straße", "STRASSE", "strasse", "STRAẞE"),  # full case folding: ß and capital ẞ are ss
    ("ﬁsh on a plate", "fish on a plate", "FISH ON A PLATE"),  # the ﬁ ligature
    ("ß\u0323", "SṢ", "ss\u0323"),  # folding then composing: ß + dot below meets Ṣ's precomposed ṣ
    ("a\u00a0cat  on\u3000a mat ", " A cat on a mat"),  # no-break and ideographic spaces
]


@pytest.mark.parametrize("variants", SAME_TEXT, ids=lambda v: v[0])
def test_text_key_gives_one_key_for_what_reads_the_same(variants):
    assert len({text_key(v) for v in variants}) == 1


def test_text_key_folds_turkish_dotted_i_as_unicode_casefold_does_not_as_turkish():
    # casefold is locale-free: İ becomes i + combining dot above, and dotless ı stays; so three keys, not one.
    assert text_key("İSTANBUL") == "i\u0307stanbul"
    assert text_key("ISTANBUL") == "istanbul"
    assert text_key("ıstanbul") == "ıstanbul"


def test_text_key_is_idempotent_and_its_ascii_fast_path_agrees_with_the_full_fold():
    samples = [v for group in SAME_TEXT for v in group] + ["ǰ", "ΐ", "Ǆ", "ﬀ", "K", "Å", "\u00a8x"]
    for text in samples:
        assert text_key(text_key(text)) == text_key(text), repr(text)
    ascii_text = "".join(map(chr, range(32, 127))) + " \t\n TAB  end "
    full = " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", ascii_text).casefold()).split())
    assert text_key(ascii_text) == full


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
    got_urls = [r.n for r in url_frame.select(dedup_url(F.col("url")).alias("n")).collect()]
    assert got_urls == [expected for _, expected in cases]
    text_frame = spark.createDataFrame([(raw,) for raw, _ in texts], "text string")
    assert [r.n for r in text_frame.select(dedup_text(F.col("text")).alias("n")).collect()] == [texts[0][1]]


def test_frames_without_text_key_fall_back_to_spark_lower_which_agrees_on_ascii(spark):
    texts = ["A  Black CAT", "x\ty", "Straße", "ＡＢＣ１２３ shirt"]
    plain = spark.createDataFrame([("https://example.org/a.jpg", t) for t in texts], "url string, text string")
    with_key = spark.createDataFrame(
        [("https://example.org/a.jpg", t, text_key(t)) for t in texts], "url string, text string, text_key string"
    )
    fallback = dict(plain.transform(add_dedup_key).select("text", DEDUP_KEY).collect())
    folded = dict(with_key.transform(add_dedup_key).select("text", DEDUP_KEY).collect())
    assert [fallback[t] == folded[t] for t in texts] == [True, True, False, False]
    assert TEXT_KEY not in plain.transform(add_dedup_key).columns


def row(uid, url, text, source_file, offset, day):
    date = dt.datetime(2024, 1, day) if day else None
    return (uid, url, text, text_key(text), None, source_file, offset, date, "wat", None)


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
    pairs = spark.createDataFrame(DUPLICATES, PAIR_ROW_SCHEMA)
    survivors = set()
    for partitions in (1, 3):
        shuffled = pairs.repartition(partitions, F.rand(seed=partitions))
        deduped = shuffled.transform(add_dedup_key).transform(keep_first_per_key)
        survivors.add(frozenset(r.uid for r in deduped.select("uid").collect()))
    assert survivors == {frozenset({"winner", "other-text", "unique"})}


def test_url_only_mode_keys_on_the_url_alone(spark):
    pairs = spark.createDataFrame(DUPLICATES, PAIR_ROW_SCHEMA)
    deduped = pairs.transform(add_dedup_key, "url").transform(keep_first_per_key)
    assert sorted(r.uid for r in deduped.select("uid").collect()) == ["other-text", "unique"]


def test_against_the_lake_keeps_new_keys_and_earlier_survivors_only(spark):
    batch = spark.createDataFrame(DUPLICATES, PAIR_ROW_SCHEMA).transform(add_dedup_key).transform(keep_first_per_key)
    existing = spark.createDataFrame(
        [
            row("stored-later", "https://example.org/cat.jpg", "a black cat", "z.wat.gz", 0, 9),
            row("stored-earlier", "https://example.org/dog.jpg", "A dog", "a.wat.gz", 6, 3),
        ],
        PAIR_ROW_SCHEMA,
    ).transform(add_dedup_key)
    kept = batch.transform(keep_new_or_earlier, existing).select("uid", DEDUP_KEY)
    # "winner" (day 2) replaces the stored day-9 row, "other-text" is new, "unique" loses to offset 6 < 7
    assert sorted(r.uid for r in kept.collect()) == ["other-text", "winner"]


def test_a_stored_row_that_kept_an_older_uid_is_not_replaced_by_its_own_capture(spark):
    # After a replacement the stored row holds the earlier capture under the first survivor's uid; that uid
    # sorting after the capture's own must not make a rerun replace the row with itself.
    capture = row("0-own-uid", "https://example.org/cat.jpg", "A black cat", "a.wat.gz", 5, 1)
    stored = spark.createDataFrame([("zz-first-uid", *capture[1:])], PAIR_ROW_SCHEMA).transform(add_dedup_key)
    batch = spark.createDataFrame([capture], PAIR_ROW_SCHEMA).transform(add_dedup_key)
    assert batch.transform(keep_new_or_earlier, stored).count() == 0


def test_a_hot_key_is_aggregated_before_the_shuffle_not_windowed(spark):
    """One URL + alt on a million pages must not land on one task: the survivor is a partial aggregation."""
    rows = [row(f"u{i}", "https://cdn.example.org/logo.png", "Example Corp logo banner", f"f{i % 3}", i, 1 + i % 5)
            for i in range(200)]  # fmt: skip
    frame = spark.createDataFrame(rows, PAIR_ROW_SCHEMA).transform(add_dedup_key)
    kept = frame.transform(keep_first_per_key)
    plan = kept._jdf.queryExecution().executedPlan().toString()  # the classic test session
    assert "Window" not in plan and "partial_min_by" in plan
    (survivor,) = kept.collect()
    assert (survivor.crawl_date.day, survivor.source_file, survivor.record_offset) == (1, "f0", 0)
