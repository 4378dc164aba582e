"""Alt-text rules: decode entities, collapse whitespace, Unicode NFC; and the folded form that dedup compares."""

from __future__ import annotations

import html
import unicodedata


def normalize_text(text: str) -> str:
    """Whitespace collapsed to single spaces, trimmed, NFC. Idempotent, so the ``uid`` is stable."""
    text = " ".join(text.split())
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return text


def clean_alt_text(raw: str, decode_entities: bool = True) -> str:
    """Alt text as LAION keeps it: HTML entities decoded (when the source still carries them), then normalised."""
    if decode_entities and "&" in raw:
        raw = html.unescape(raw)
    return normalize_text(raw)


def text_key(text: str) -> str:
    """What a reader sees as the same text, as one string: the ``text_key`` column that dedup hashes.

    NFKC, full case folding, NFKC again (Unicode's NFKC_Casefold recipe), then whitespace collapsed. So
    full-width ``ＡＢＣ１２３`` and ``ABC123``, half-width ``ｶﾀｶﾅ`` and ``カタカナ``, the ligature ``ﬁ`` and ``fi``,
    and ``Straße`` and ``STRASSE`` give one key. The second NFKC recomposes what folding decomposed next to a
    combining mark (``ß̣`` folds to ``sṣ``, which must meet ``SṢ``'s ``sṣ``), and makes the function
    idempotent. Folding is not locale-aware: Turkish ``İ`` becomes ``i̇`` (i + combining dot), not ``i``, and
    dotless ``ı`` stays itself, so ``İSTANBUL`` and ``ISTANBUL`` are two keys.

    Spark SQL has neither NFKC nor full case folding (``lower`` keeps ``ß``), which is why the extraction
    worker computes this for every pair and ``pairs`` stores it.
    """
    if text.isascii():
        folded = text.lower()  # the same as NFKC + casefold for ASCII, and far cheaper: most alt text is ASCII
    else:
        folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())
