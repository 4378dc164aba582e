"""Text and URL rules on crafted pairs through real Spark: each rule drops what it should and counts it."""

from __future__ import annotations

import datetime as dt

import pytest

from laion_spark.candidates import DROPPED_BY, apply_rules, count_rule_drops, mark_rule_failures
from laion_spark.config import ConfigError, RulesConfig
from laion_spark.extract.text import text_key
from laion_spark.schemas import PAIR_ROW_SCHEMA

CRAWL = dt.datetime(2024, 1, 1)


def pair(uid: str, url: str, text: str | None) -> tuple:
    return (uid, url, text, text_key(text or ""), "https://example.org/page", "file-a.wat.gz", 0, CRAWL, "wat", None)


def test_each_rule_drops_its_rows_and_counts_them_in_one_pass(spark):
    rows = [
        pair("good-1", "https://cdn.example.org/a/cat.jpg", "A black cat sleeping on a red sofa"),
        pair("good-2", "http://example.org/img?id=3", "Fresh bread on a wooden board"),
        pair("empty", "https://example.org/e.jpg", "   "),
        pair("huge", "https://example.org/h.jpg", "word " * 200_000),  # 1 MB of alt text
        pair("short", "https://example.org/s.jpg", "cat"),
        pair("binary", "https://example.org/b.jpg", "PK\x03\x04\x00\x00garbage\ufffd\ufffd bytes"),
        pair("scheme", "ftp://example.org/f.jpg", "A picture over ftp of a mountain"),
        pair("data-uri", "data:image/png;base64,iVBORw0KGgo=", "An inline image of a mountain"),
        pair("long-url", "https://example.org/" + "a" * 3000 + ".jpg", "A very long URL indeed"),
        pair("junk-file", "https://example.org/j.jpg", "IMG_2034.JPG"),
        pair("junk-word", "https://example.org/k.jpg", "  Placeholder "),
        pair("junk-dsc", "https://example.org/l.jpg", "DSC 0042"),
    ]
    pairs = spark.createDataFrame(rows, PAIR_ROW_SCHEMA)
    config = RulesConfig()

    rows_in, drops = count_rule_drops(pairs, config)

    assert rows_in == len(rows)
    assert dict(drops) == {
        "missing_text": 1,
        "max_text_chars": 1,
        "min_text_chars": 1,
        "binary_text": 1,
        "url_scheme": 2,
        "max_url_chars": 1,
        "junk_text": 3,
    }
    reasons = {r.uid: r[DROPPED_BY] for r in mark_rule_failures(pairs, config).select("uid", DROPPED_BY).collect()}
    assert reasons["good-1"] is None and reasons["good-2"] is None
    assert reasons["huge"] == "max_text_chars" and reasons["binary"] == "binary_text"
    assert sorted(r.uid for r in apply_rules(pairs, config).select("uid").collect()) == ["good-1", "good-2"]


def test_null_text_is_dropped_by_a_named_rule_not_a_crash(spark):
    # Notebook frames need not follow PAIR_ROW_SCHEMA's non-null text.
    pairs = spark.createDataFrame(
        [("n", "https://example.org/n.jpg", None), ("m", "https://example.org/m.jpg", "Mixed 混合 текст scripts")],
        "uid string, url string, text string",
    )
    reasons = dict(mark_rule_failures(pairs).select("uid", DROPPED_BY).collect())
    assert reasons == {"n": "missing_text", "m": None}


def test_image_extension_rule_is_optional_and_ignores_query_and_case(spark):
    pairs = spark.createDataFrame(
        [
            pair("ext", "https://example.org/photo.JPG?size=large#top", "A photo of the sea at dawn"),
            pair("no-ext", "https://example.org/image?id=42", "A photo of the sea at dusk"),
        ],
        PAIR_ROW_SCHEMA,
    )
    assert dict(count_rule_drops(pairs, RulesConfig())[1]).get("image_extension") is None
    strict = RulesConfig(require_image_extension=True)
    assert dict(count_rule_drops(pairs, strict)[1])["image_extension"] == 1
    assert [r.uid for r in apply_rules(pairs, strict).collect()] == ["ext"]


def test_invalid_junk_pattern_is_a_config_error(spark):
    pairs = spark.createDataFrame([pair("a", "https://example.org/a.jpg", "A photo")], PAIR_ROW_SCHEMA)
    with pytest.raises(ConfigError, match="junk_text_patterns"):
        mark_rule_failures(pairs, RulesConfig(junk_text_patterns=["(unclosed"]))
