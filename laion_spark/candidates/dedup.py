"""Exact dedup on (normalised URL, folded text), within a batch and against the candidates in the lake.

The key hashes :func:`dedup_url` of the URL and the ``text_key`` column: the alt text after NFKC and full case
folding, which the extraction worker computes because Spark SQL can do neither (no NFKC, and ``lower`` is not
a casefold: it keeps ``ß`` and full-width letters). A frame without ``text_key`` (a notebook frame of url and
text only) falls back to :func:`dedup_text`, Spark's ``lower`` with whitespace collapsed: the same key for
ASCII text, a finer one for the rest. Everything else is Spark SQL functions only (no Python UDF): the JVM
normalises and hashes a billion rows without shipping them to Python.

The survivor of a key is the first row in :func:`survivor_order`: earliest crawl, then smallest source file,
then smallest record offset, then the remaining columns, so the choice is a total order and reruns pick the
same row whatever the partitioning.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

from laion_spark.config import ConfigError

DEDUP_KEY = "dedup_key"
TEXT_KEY = "text_key"
MODES = ("url_text", "url")

_LATEST = "9999-12-31 23:59:59"
_MAX_LONG = 2**63 - 1
_URL_PARTS = r"^([A-Za-z][A-Za-z0-9+.\-]*)://([^@/?#]*@)?([^/?#]*)([^#]*)"
# survivor_rank's type: crawl_date, source_file, record_offset, url, text, page_url, every field nullable
_CAPTURE_RANK = StructType(
    [
        StructField("k0", TimestampType()),
        StructField("k1", StringType()),
        StructField("k2", LongType()),
        *[StructField(f"k{i}", StringType()) for i in (3, 4, 5)],
    ]
)


def dedup_url(url: Column) -> Column:
    """The URL as the dedup key sees it: scheme and host lowercased, default port and fragment dropped.

    An empty path becomes ``/``; the path and query keep their case: servers treat them as case-sensitive. A
    string that is not an absolute URL is only trimmed and stripped of its fragment.
    """
    trimmed = F.trim(url)
    scheme = F.lower(F.regexp_extract(trimmed, _URL_PARTS, 1))
    userinfo = F.regexp_extract(trimmed, _URL_PARTS, 2)
    host = F.lower(F.regexp_extract(trimmed, _URL_PARTS, 3))
    host = (
        F.when(scheme == "http", F.regexp_replace(host, ":80$", ""))
        .when(scheme == "https", F.regexp_replace(host, ":443$", ""))
        .otherwise(host)
    )
    rest = F.regexp_extract(trimmed, _URL_PARTS, 4)
    rest = F.when(rest.startswith("/"), rest).otherwise(F.concat(F.lit("/"), rest))
    absolute = F.concat(scheme, F.lit("://"), userinfo, host, rest)
    return F.when(trimmed.rlike(_URL_PARTS), absolute).otherwise(F.regexp_replace(trimmed, "#.*$", ""))


def dedup_text(text: Column) -> Column:
    """The fallback ``text_key`` for frames without one: lowercase, every run of whitespace one space, trimmed.

    Equal to the extractor's ``text_key`` for ASCII text; for the rest it folds less (Spark's ``lower`` is
    neither NFKC nor a full casefold), so ``Straße`` and ``STRASSE`` stay two keys.
    """
    return F.trim(F.regexp_replace(F.lower(text), r"(?U)\s+", " "))


def text_key_of(df: DataFrame) -> Column:
    """``df``'s ``text_key`` column, or :func:`dedup_text` of its ``text`` when it has none."""
    return F.col(TEXT_KEY) if TEXT_KEY in df.columns else dedup_text(F.col("text"))


def add_text_key(df: DataFrame) -> DataFrame:
    """``df`` with a ``text_key`` column: kept when present, else :func:`dedup_text` of ``text``."""
    return df if TEXT_KEY in df.columns else df.withColumn(TEXT_KEY, dedup_text(F.col("text")))


def dedup_key(url: Column, text_key: Column, mode: str = "url_text") -> Column:
    """sha1 hex of the normalised URL (mode ``url``) or of it and the folded text (mode ``url_text``).

    ``text_key`` is hashed as given: the ``text_key`` column, or :func:`dedup_text` of the text.
    """
    if mode == "url_text":
        return F.sha1(F.concat_ws("\t", dedup_url(url), text_key))
    if mode == "url":
        return F.sha1(dedup_url(url))
    raise ConfigError(f"candidates.dedup.mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def add_dedup_key(df: DataFrame, mode: str = "url_text") -> DataFrame:
    """``df`` with ``dedup_key``, from its ``url`` and its ``text_key`` (or its ``text``, see :func:`text_key_of`)."""
    return df.withColumn(DEDUP_KEY, dedup_key(F.col("url"), text_key_of(df), mode))


def survivor_order(prefix: str = "") -> list[Column]:
    """Sort keys, ascending, of a total order on rows; the first row of a key survives.

    Unknown crawl dates and offsets sort last. The ``uid`` comes last, so that even frames whose uid is not
    derived from url and text (a notebook's) get one order. ``prefix`` qualifies the columns (``"source."``)
    for the MERGE condition.
    """
    return [*_capture_order(prefix), F.col(f"{prefix}uid")]


def survivor_rank(prefix: str = "") -> Column:
    """The capture part of :func:`survivor_order` as one comparable struct: a smaller struct is an earlier row.

    This compares a batch row with the row stored for its key. The stored row keeps the uid of the first
    survivor stored for the key when an earlier capture replaces it (see ``candidates.stage``), so its uid says
    nothing about its capture and is left out: a row that ties on everything else is the stored capture itself,
    and a rerun must not replace it with itself.
    """
    return F.expr(survivor_rank_sql(prefix))


def survivor_rank_sql(prefix: str = "") -> str:
    """:func:`survivor_rank` as SQL text, for the condition of a ``MERGE INTO`` (``prefix`` ``"source."``)."""
    keys = ", ".join(_capture_order_sql(prefix))
    # The explicit all-nullable type: inside a MERGE, Delta resolves the comparison before its outer join
    # makes the source columns nullable, and Spark's own struct coercion then fails on the changed nullability.
    return f"CAST(struct({keys}) AS {_CAPTURE_RANK.simpleString()})"


def _capture_order(prefix: str) -> list[Column]:
    return [F.expr(key) for key in _capture_order_sql(prefix)]


def _capture_order_sql(prefix: str) -> list[str]:
    return [
        f"coalesce({prefix}crawl_date, TIMESTAMP'{_LATEST}')",
        f"coalesce({prefix}source_file, '')",
        f"coalesce({prefix}record_offset, {_MAX_LONG}L)",
        f"{prefix}url",
        f"{prefix}text",
        f"coalesce({prefix}page_url, '')",
    ]


def keep_first_per_key(df: DataFrame) -> DataFrame:
    """Exact dedup within the frame: one row per ``dedup_key``, the first in :func:`survivor_order`.

    A ``min_by`` aggregation, not a window: Spark aggregates each task's rows of a key before the shuffle, so a
    key repeated millions of times (a site's logo with the same alt on every page) costs one row per task, where a
    window would send all of them to one task.
    """
    order = F.struct(*[key.alias(f"k{i}") for i, key in enumerate(survivor_order())])
    others = [name for name in df.columns if name != DEDUP_KEY]
    first = df.groupBy(DEDUP_KEY).agg(F.min_by(F.struct(*others), order).alias("_first"))
    return first.select(DEDUP_KEY, "_first.*").select(*df.columns)


def keep_new_or_earlier(batch: DataFrame, existing: DataFrame) -> DataFrame:
    """Rows of ``batch`` whose key is not in ``existing``, or that sort before the row kept for their key.

    With both kinds written (insert and replace), a lake built over several runs holds the rows a single run
    over all their inputs would hold (the same captures; a replaced row keeps its stored uid). ``batch`` must
    already be unique on ``dedup_key``.
    """
    kept = existing.select(F.col(DEDUP_KEY).alias("_kept_key"), survivor_rank().alias("_kept_rank"))
    joined = batch.join(kept, batch[DEDUP_KEY] == kept["_kept_key"], "left")
    return joined.where(F.col("_kept_key").isNull() | (survivor_rank() < F.col("_kept_rank"))).drop(
        "_kept_key", "_kept_rank"
    )
