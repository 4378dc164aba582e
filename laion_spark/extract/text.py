"""Alt-text rules: decode entities, collapse whitespace, Unicode NFC."""

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
