"""Language detection with lingua (its models ship inside the wheel: nothing is downloaded at run time).

The detector is built once per Python worker (``functools.cache``) and loads a language's model the first
time a text needs it; :func:`detect_language` runs it over Arrow batches in a pandas UDF. A text gets the
most likely language and lingua's confidence for it; below ``min_confidence``, or when the text has no
language at all (numbers, file names, keyboard mash), the language is ``none``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, StringType, StructField, StructType

from laion_spark.config import ConfigError, LanguageConfig

log = logging.getLogger(__name__)

NO_LANGUAGE = "none"
LANGUAGE_RESULT = StructType([StructField("language", StringType()), StructField("confidence", DoubleType())])

_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm", "qwertzuiop", "yxcvbnm", "azertyuiop", "wxcvbn")
# Fewer letters than this, or letters making up less than half of the non-space characters ("DSC_0042",
# "1200x800", a hex digest), and there is no language to detect.
_MIN_LETTERS = 3


def validate_languages(codes: Iterable[str]) -> tuple[str, ...]:
    """The configured ISO 639-1 codes, lowercased and checked against the languages lingua knows."""
    from lingua import Language

    known = {language.iso_code_639_1.name.lower() for language in Language.all()}
    resolved = tuple(sorted({code.strip().lower() for code in codes}))
    unknown = [code for code in resolved if code not in known]
    if unknown:
        raise ConfigError(
            f"candidates.language.languages: lingua has no language {', '.join(unknown)}; "
            f"use ISO 639-1 codes among: {', '.join(sorted(known))}"
        )
    return resolved


@functools.cache
def language_detector(languages: tuple[str, ...] = (), low_accuracy_mode: bool = False):
    """One lingua detector per Python worker and configuration; ``()`` means every language lingua knows."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    if languages:
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*[IsoCode639_1.from_str(c) for c in languages])
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if low_accuracy_mode:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def has_no_language(text: str) -> bool:
    """Alt texts that no detector should name a language for, whatever its confidence says."""
    letters = [ch for ch in text if ch.isalpha()]
    if len(letters) < _MIN_LETTERS:
        return True
    visible = sum(1 for ch in text if not ch.isspace())
    if len(letters) * 2 <= visible:
        return True
    if any(ch.isspace() for ch in text.strip()):
        return False
    word = "".join(letters).lower()
    # One "word" made of few distinct letters ("zzzz", "sdfsdf") or typed along a keyboard row ("asdfgh").
    if len(set(word)) * 2 <= len(word):
        return True
    return len(word) >= 4 and any(word in row for row in _KEYBOARD_ROWS)


def detect_languages(texts: Iterable[str | None], config: LanguageConfig | None = None) -> list[tuple[str, float]]:
    """(language, confidence) for each text, in Python: the function the Spark UDF runs on every batch."""
    config = config or LanguageConfig()
    detector = language_detector(validate_languages(config.languages), config.low_accuracy_mode)
    results: list[tuple[str, float]] = []
    for text in texts:
        if not isinstance(text, str):
            results.append((NO_LANGUAGE, 0.0))
            continue
        # Lone surrogates (from broken escapes) make the Rust side raise; they carry no language anyway.
        sample = text[: config.max_chars].encode("utf-8", "ignore").decode("utf-8")
        if has_no_language(sample):
            results.append((NO_LANGUAGE, 0.0))
            continue
        try:
            values = detector.compute_language_confidence_values(sample)
        except Exception as exc:  # one odd string must not fail the batch: it simply has no language
            log.warning("language detection failed on a %d-char text: %s", len(sample), exc)
            results.append((NO_LANGUAGE, 0.0))
            continue
        if not values or values[0].value <= 0.0:
            results.append((NO_LANGUAGE, 0.0))
            continue
        best = values[0]
        # lingua's confidences wobble in the last bits with the order its models were loaded in; rounding
        # makes a rerun produce the same table.
        confidence = round(float(best.value), 4)
        code = best.language.iso_code_639_1.name.lower() if confidence >= config.min_confidence else NO_LANGUAGE
        results.append((code, confidence))
    return results


def _language_batches(config: LanguageConfig):
    def detect(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for texts in batches:
            results = detect_languages(texts.tolist(), config)
            yield pd.DataFrame(results, columns=["language", "confidence"], index=texts.index)

    return detect


def detect_language(df: DataFrame, config: LanguageConfig | None = None, text_column: str = "text") -> DataFrame:
    """Add ``language`` (ISO 639-1 code or ``none``) and ``language_confidence`` (the best guess's confidence).

    The confidence is kept even when it is below the threshold, so a stricter or looser split can be drawn
    later without detecting again.
    """
    config = config or LanguageConfig()
    if config.detector != "lingua":
        raise ConfigError(f"candidates.language.detector: unknown detector {config.detector!r}; only 'lingua'")
    validate_languages(config.languages)  # a typo in the config fails here, not inside a Python worker
    detect = F.pandas_udf(_language_batches(config), LANGUAGE_RESULT)
    result = detect(F.col(text_column))
    return (
        df.withColumn("_language", result)
        .withColumn("language", F.col("_language.language"))
        .withColumn("language_confidence", F.col("_language.confidence"))
        .drop("_language")
    )
