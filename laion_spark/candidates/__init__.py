"""pairs -> candidates: text and URL rules, exact dedup (within a batch and against the lake), language."""

from laion_spark.candidates.dedup import (
    DEDUP_KEY,
    add_dedup_key,
    dedup_key,
    keep_first_per_key,
    keep_new_or_earlier,
    normalize_text,
    normalize_url,
    survivor_order,
    survivor_rank,
)
from laion_spark.candidates.language import (
    NO_LANGUAGE,
    detect_language,
    detect_languages,
    has_no_language,
    language_detector,
    validate_languages,
)
from laion_spark.candidates.rules import (
    DROPPED_BY,
    RULES,
    Rule,
    active_rules,
    apply_rules,
    count_rule_drops,
    drop_rule_failures,
    mark_rule_failures,
)
from laion_spark.candidates.stage import build_candidates, run_candidates

__all__ = [
    "DEDUP_KEY",
    "DROPPED_BY",
    "NO_LANGUAGE",
    "RULES",
    "Rule",
    "active_rules",
    "add_dedup_key",
    "apply_rules",
    "build_candidates",
    "count_rule_drops",
    "dedup_key",
    "detect_language",
    "detect_languages",
    "drop_rule_failures",
    "has_no_language",
    "keep_first_per_key",
    "keep_new_or_earlier",
    "language_detector",
    "mark_rule_failures",
    "normalize_text",
    "normalize_url",
    "run_candidates",
    "survivor_order",
    "survivor_rank",
    "validate_languages",
]
