"""The takedown list: the ``removals`` table read as a blocklist, the values a takedown names, and the transforms
every stage applies so that a removed URL, pair or image never comes back.

A value has a kind. A URL is stored as ``pairs`` stores it (normalised, laion_spark.extract.urls); lists such as
Re-LAION's name URLs by their MD5 or SHA-256 instead (``url_md5``, ``url_sha256``), which match the hex digest of
the stored URL. An image is named by the hex digest of its body as downloaded (``sha256``, ``md5``) or by its pHash
(16 hex digits, as ``images.phash`` prints with laion_spark.curate.phash.phash_hex). A pair is named by its ``uid``.

The blocklist is small next to the tables it filters (thousands to millions of rows): every filter is an anti-join
on one expression per kind, and only the kinds the list holds are joined at all. A kind of up to
BROADCAST_MAX_VALUES values is broadcast to the tasks; a longer one (a bulk list of hashes) is joined by a shuffle,
which a broadcast of that size would exhaust the driver's and executors' memory with.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.curate.phash import from_hex
from laion_spark.schemas import REMOVALS
from laion_spark.storage import read_table, table_exists

URL, URL_MD5, URL_SHA256, UID, SHA256, MD5, PHASH = "url", "url_md5", "url_sha256", "uid", "sha256", "md5", "phash"
KINDS = (URL, URL_MD5, URL_SHA256, UID, SHA256, MD5, PHASH)
PAIR_KINDS = (URL, URL_MD5, URL_SHA256, UID)  # what names a pair: matched against url and uid columns
IMAGE_KINDS = (SHA256, MD5, PHASH)  # what names an image: matched against the images table's hashes

_HEX_DIGITS = {URL_MD5: 32, URL_SHA256: 64, UID: 40, SHA256: 64, MD5: 32}
_HEX = re.compile(r"^[0-9a-f]+$")
_SIGNED_LONG = re.compile(r"^-?[0-9]{1,20}$")
_URL_SCHEMES = frozenset({"http", "https"})
_BLOCKED = "_blocked_value"


@dataclass(frozen=True)
class BlockItem:
    """One value of a takedown, normalised as the tables store what it names."""

    value: str
    kind: str


@dataclass(frozen=True)
class MalformedLine:
    """A line of a list file that names nothing: skipped, counted and reported."""

    number: int
    text: str
    why: str


@dataclass
class ListFile:
    """A list file read: its items (duplicates dropped, first kept) and its malformed lines."""

    path: str
    items: list[BlockItem] = field(default_factory=list)
    malformed: list[MalformedLine] = field(default_factory=list)
    lines: int = 0  # lines that named something or tried to (blank and comment lines aside)


def normalize_item(value: str, kind: str) -> BlockItem:
    """``value`` as the tables store what it names; ValueError with one sentence when it cannot name a ``kind``."""
    # Here, not at the top: the extract stage imports this module, and laion_spark.extract imports its stage.
    from laion_spark.extract.urls import has_allowed_scheme, normalize_url

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    text = value.strip()
    if not text:
        raise ValueError(f"an empty {kind}")
    if kind == URL:
        if not has_allowed_scheme(text, _URL_SCHEMES):
            raise ValueError(f"{text!r} is not an http(s) URL")
        return BlockItem(normalize_url(text), URL)
    if kind == PHASH:
        return BlockItem(_phash_hex(text), PHASH)
    digest = text.lower()
    if len(digest) != _HEX_DIGITS[kind] or not _HEX.match(digest):
        raise ValueError(f"{text!r} is not a {kind}: expected {_HEX_DIGITS[kind]} hex digits")
    return BlockItem(digest, kind)


def _phash_hex(text: str) -> str:
    """16 lower-case hex digits of a pHash given as hex (``0x`` optional) or as ``images.phash``'s signed long."""
    lowered = text.lower().removeprefix("0x")
    if len(lowered) == 16 and _HEX.match(lowered):
        return lowered
    if _SIGNED_LONG.match(text) and -(2**63) <= int(text) < 2**63:
        return f"{int(text) & (2**64 - 1):016x}"
    try:
        value = from_hex(lowered) if _HEX.match(lowered) else None
    except ValueError:
        value = None
    if value is None:
        raise ValueError(f"{text!r} is not a pHash: give 16 hex digits or the signed 64-bit value of images.phash")
    return f"{value & (2**64 - 1):016x}"


def parse_line(line: str, kind: str | None = None) -> BlockItem:
    """One line of a list file: ``KIND:VALUE`` (``md5:…``, ``url:https://…``), or a plain value of ``kind``; without
    ``kind``, a plain value's kind is told from its form where only one kind has it (an http(s) URL, a 40-digit
    uid, a 16-digit pHash). ValueError with one sentence otherwise."""
    from laion_spark.extract.urls import has_allowed_scheme

    text = line.strip()
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in KINDS:
        return normalize_item(rest, prefix.lower())
    if kind is not None:
        return normalize_item(text, kind)
    if has_allowed_scheme(text, _URL_SCHEMES):
        return normalize_item(text, URL)
    digest = text.lower()
    if _HEX.match(digest):
        if len(digest) == 40:
            return normalize_item(digest, UID)
        if len(digest) == 16:
            return normalize_item(digest, PHASH)
        if len(digest) in (32, 64):
            raise ValueError(
                f"{len(digest)} hex digits name an image or a URL: prefix the line (md5:, url_md5:, sha256:, "
                "url_sha256:) or give --list-kind"
            )
    raise ValueError("not a URL, a uid, a hash or a KIND:VALUE line")


def read_list_file(path: str | Path, kind: str | None = None) -> ListFile:
    """Every item of a takedown list, one per line (see :func:`parse_line`); blank lines and ``#`` comments are
    skipped, and a line that names nothing is counted in ``malformed``, never fatal."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"--list-kind {kind!r}: use one of {', '.join(KINDS)}")
    listed = ListFile(str(path))
    seen: set[BlockItem] = set()
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            text = line.strip().lstrip("\ufeff")
            if not text or text.startswith("#"):
                continue
            listed.lines += 1
            try:
                item = parse_line(text, kind)
            except ValueError as exc:
                listed.malformed.append(MalformedLine(number, text[:200], str(exc)))
                continue
            if item not in seen:
                seen.add(item)
                listed.items.append(item)
    return listed


def matched_value(kind: str) -> Column:
    """What a value of ``kind`` equals in a row of a table: its url, a digest of it, its uid or an image hash."""
    return {
        URL: F.col("url"),
        URL_MD5: F.md5(F.col("url")),
        URL_SHA256: F.sha2(F.col("url"), 256),
        UID: F.col("uid"),
        SHA256: F.col("sha256"),
        MD5: F.col("md5"),
        # Spark's hex of a negative long is its two's complement, as phash_hex prints it.
        PHASH: F.lower(F.lpad(F.hex(F.col("phash")), 16, "0")),
    }[kind]


# Values of one kind sent whole to every task; beyond this the join shuffles. 2M URLs of ~100 bytes are a few
# hundred MB in a broadcast hash table, about what Spark's own broadcast ceiling (8 GB) leaves comfortable room for.
BROADCAST_MAX_VALUES = 2_000_000

_COLUMN_OF = {URL: "url", URL_MD5: "url", URL_SHA256: "url", UID: "uid", SHA256: "sha256", MD5: "md5", PHASH: "phash"}


@dataclass(frozen=True)
class Blocklist:
    """The values (``value``, ``kind``) of the removals, and the kinds among them (read once per stage run)."""

    values: DataFrame | None
    kinds: frozenset[str]
    sizes: dict[str, int] = field(default_factory=dict)  # rows of each kind (an upper bound of its values)

    @property
    def empty(self) -> bool:
        return self.values is None or not self.kinds

    def of_kind(self, kind: str) -> DataFrame:
        """The distinct values of one kind."""
        assert self.values is not None
        return self.values.where(F.col("kind") == kind).select(F.col("value").alias(_BLOCKED)).distinct()

    def broadcast(self, kind: str) -> bool:
        """Whether the values of ``kind`` are few enough to send to every task (BROADCAST_MAX_VALUES)."""
        return self.sizes.get(kind, 0) <= BROADCAST_MAX_VALUES

    def join_side(self, kind: str, values: DataFrame | None = None) -> DataFrame:
        """``values`` (the distinct values of ``kind`` by default), broadcast when :meth:`broadcast` says so."""
        values = self.of_kind(kind) if values is None else values
        return F.broadcast(values) if self.broadcast(kind) else values


NO_BLOCKLIST = Blocklist(None, frozenset())


def read_blocklist(spark: SparkSession, lake: str) -> Blocklist:
    """The lake's ``removals`` as a blocklist; empty when the lake has no removal."""
    if not table_exists(spark, lake, REMOVALS):
        return NO_BLOCKLIST
    values = read_table(spark, lake, REMOVALS).select("value", "kind")
    sizes = {row.kind: int(row["count"]) for row in values.groupBy("kind").count().collect()}  # seven kinds at most
    return Blocklist(values, frozenset(sizes) & frozenset(KINDS), sizes)


def blocklist_of(spark: SparkSession, items: Iterable[BlockItem]) -> Blocklist:
    """A blocklist of ``items`` alone (a notebook, a test, a takedown before it is recorded)."""
    rows = [(item.value, item.kind) for item in items]
    if not rows:
        return NO_BLOCKLIST
    sizes = dict(Counter(kind for _, kind in rows))
    return Blocklist(spark.createDataFrame(rows, "value string, kind string"), frozenset(sizes), sizes)


def kind_sizes(items: Iterable[BlockItem]) -> dict[str, int]:
    """How many of ``items`` there are of each kind (Blocklist.sizes)."""
    return dict(Counter(item.kind for item in items))


def _kinds_in(df: DataFrame, blocklist: Blocklist, kinds: Iterable[str]) -> list[str]:
    """The kinds of ``kinds`` that the blocklist holds and that ``df`` has the column for."""
    if blocklist.empty:
        return []
    return [kind for kind in kinds if kind in blocklist.kinds and _COLUMN_OF[kind] in df.columns]


def _drop_matching(df: DataFrame, blocklist: Blocklist, kinds: Iterable[str]) -> DataFrame:
    for kind in _kinds_in(df, blocklist, kinds):
        df = df.join(blocklist.join_side(kind), matched_value(kind) == F.col(_BLOCKED), "left_anti")
    return df


def drop_blocked_pairs(df: DataFrame, blocklist: Blocklist) -> DataFrame:
    """``df`` without the rows whose url (or its MD5 / SHA-256) or uid is in the blocklist."""
    return _drop_matching(df, blocklist, PAIR_KINDS)


def drop_blocked_images(df: DataFrame, blocklist: Blocklist) -> DataFrame:
    """``df`` without the rows whose image sha256, md5 or pHash is in the blocklist (columns it lacks are skipped)."""
    return _drop_matching(df, blocklist, IMAGE_KINDS)


def blocked_rows(df: DataFrame, blocklist: Blocklist, kinds: Iterable[str] = KINDS) -> DataFrame | None:
    """The rows of ``df`` that some value of the blocklist names (the union of one semi-join per kind), or None
    when no kind of the blocklist applies to ``df``'s columns."""
    matched = [
        df.join(blocklist.join_side(kind), matched_value(kind) == F.col(_BLOCKED), "left_semi")
        for kind in _kinds_in(df, blocklist, kinds)
    ]
    return functools.reduce(DataFrame.unionByName, matched) if matched else None


def withhold_blocked_images(images: DataFrame, blocklist: Blocklist, removed_status: str = "removed") -> DataFrame:
    """Downloaded image rows whose sha256, md5 or pHash is in the blocklist get ``removed_status``, an error naming
    the hash, and no bytes; the other rows pass as they are. The row itself stays, so the URL counts as settled and
    is not fetched again."""
    kinds = _kinds_in(images, blocklist, IMAGE_KINDS)
    if not kinds:
        return images
    columns = images.columns
    flags = []
    for kind in kinds:
        flag = f"_removed_by_{kind}"
        hits = blocklist.of_kind(kind).withColumn(flag, F.lit(kind))
        images = images.join(blocklist.join_side(kind, hits), matched_value(kind) == F.col(_BLOCKED), "left")
        images = images.drop(_BLOCKED)
        flags.append(flag)
    matched = F.coalesce(*(F.col(flag) for flag in flags))
    hit = matched.isNotNull()
    replaced = {
        "status": F.when(hit, F.lit(removed_status)).otherwise(F.col("status")),
        "error": F.when(hit, F.concat(F.lit("its "), matched, F.lit(" is in the lake's removals"))).otherwise(
            F.col("error")
        ),
        "image": F.when(hit, F.lit(None).cast("binary")).otherwise(F.col("image")),
    }
    return images.select(*(replaced[c].alias(c) if c in replaced else F.col(c) for c in columns))
