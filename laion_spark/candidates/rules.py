"""Text and URL rules: LAION's filters on alt text and image URL, each a named rule that counts its drops.

A rule is a name and a Spark condition that is true when a row *fails* it. All rules are folded into one
``CASE WHEN`` that names the first rule a row fails (``dropped_by``), so a single aggregation counts every
rule's drops, the rules later in the list never see rows an earlier rule dropped (the funnel is sequential),
and the expensive regular expressions only run on rows that passed the cheap length checks (a 1 MB alt text
is dropped by ``max_text_chars`` before any regex touches it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from laion_spark.config import ConfigError, RulesConfig
from laion_spark.storage.stats import count_drops

DROPPED_BY = "dropped_by"

# C0/C1 control characters (tab, newline and carriage return are whitespace, not garbage) and U+FFFD, the
# replacement character a failed decode leaves behind: either means the "text" is really bytes.
_BINARY_CHARS = r"[\x{0}-\x{8}\x{B}\x{C}\x{E}-\x{1F}\x{7F}-\x{9F}\x{FFFD}]"
_SCHEME = r"^([A-Za-z][A-Za-z0-9+.\-]*)://[^/?#\s]+"


@dataclass(frozen=True)
class Rule:
    """One named filter; ``fails`` builds the condition under which a row is dropped."""

    name: str
    fails: Callable[[RulesConfig], Column]


def _text_length() -> Column:
    return F.char_length(F.trim(F.col("text")))


def _missing_text(_: RulesConfig) -> Column:
    return F.col("text").isNull() | (_text_length() == 0)


def _max_text_chars(config: RulesConfig) -> Column:
    return _text_length() > config.max_text_chars


def _min_text_chars(config: RulesConfig) -> Column:
    return _text_length() < config.min_text_chars


def _binary_text(_: RulesConfig) -> Column:
    return F.col("text").rlike(_BINARY_CHARS)


def _url_scheme(config: RulesConfig) -> Column:
    scheme = F.lower(F.regexp_extract(F.col("url"), _SCHEME, 1))
    allowed = [s.lower() for s in config.allowed_schemes]
    return F.col("url").isNull() | ~scheme.isin(allowed)


def _max_url_chars(config: RulesConfig) -> Column:
    return F.char_length(F.col("url")) > config.max_url_chars


def _junk_text(config: RulesConfig) -> Column:
    pattern = junk_text_regex(config.junk_text_patterns)
    if pattern is None:
        return F.lit(False)
    normalised = F.lower(F.trim(F.regexp_replace(F.col("text"), r"(?U)\s+", " ")))
    return normalised.rlike(pattern)


def _image_extension(config: RulesConfig) -> Column:
    path = F.lower(F.regexp_extract(F.col("url"), r"^[^?#]*", 0))
    has_extension = F.lit(False)
    for extension in config.image_extensions:
        has_extension = has_extension | path.endswith(extension.lower())
    return ~has_extension


# In order: the cheap checks first, so that the regex rules only see rows of sane length.
RULES: tuple[Rule, ...] = (
    Rule("missing_text", _missing_text),
    Rule("max_text_chars", _max_text_chars),
    Rule("min_text_chars", _min_text_chars),
    Rule("binary_text", _binary_text),
    Rule("url_scheme", _url_scheme),
    Rule("max_url_chars", _max_url_chars),
    Rule("junk_text", _junk_text),
    Rule("image_extension", _image_extension),
)


def junk_text_regex(patterns: list[str]) -> str | None:
    """The configured junk patterns as one case-insensitive, whole-text regex (None when the list is empty)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"candidates.rules.junk_text_patterns: {pattern!r} is not a valid regex: {exc}") from None
    if not patterns:
        return None
    return "(?i)^(?:" + "|".join(f"(?:{p})" for p in patterns) + ")$"


def active_rules(config: RulesConfig) -> list[Rule]:
    """The rules that apply under ``config``, in the order they are evaluated."""
    return [rule for rule in RULES if rule.name != "image_extension" or config.require_image_extension]


def mark_rule_failures(pairs: DataFrame, config: RulesConfig | None = None) -> DataFrame:
    """Add ``dropped_by``: the name of the first rule the row fails, or null when it passes them all."""
    config = config or RulesConfig()
    reason = F.lit(None).cast("string")
    for rule in reversed(active_rules(config)):
        reason = F.when(rule.fails(config), F.lit(rule.name)).otherwise(reason)
    return pairs.withColumn(DROPPED_BY, reason)


def drop_rule_failures(marked: DataFrame) -> DataFrame:
    """Keep the rows that passed every rule (``dropped_by`` is null) and remove the marker column."""
    return marked.where(F.col(DROPPED_BY).isNull()).drop(DROPPED_BY)


def apply_rules(pairs: DataFrame, config: RulesConfig | None = None) -> DataFrame:
    """Drop the pairs that fail any text or URL rule."""
    return drop_rule_failures(mark_rule_failures(pairs, config))


def count_rule_drops(pairs: DataFrame, config: RulesConfig | None = None) -> tuple[int, list[tuple[str, int]]]:
    """Rows in, and each rule's drops in evaluation order, from one Spark aggregation."""
    config = config or RulesConfig()
    counts = count_drops(mark_rule_failures(pairs, config), DROPPED_BY, [rule.name for rule in active_rules(config)])
    return counts.rows_in, counts.dropped
