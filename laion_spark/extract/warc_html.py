"""Image tags from HTML pages in WARC/ARC response records, decoded by their declared charset."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from selectolax.lexbor import LexborHTMLParser

# The HTML5 encoding prescan looks at the first 1024 bytes for a <meta charset> or http-equiv declaration; it is
# byte-level by specification (the page cannot be parsed before its encoding is known), hence a regex here.
_META_CHARSET = re.compile(rb"""<meta[^>]+?charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.IGNORECASE)
_PRESCAN_BYTES = 4096
_HAS_IMG = re.compile(rb"<img", re.IGNORECASE)


@dataclass(slots=True)
class HtmlPage:
    base: str | None
    images: list[tuple[str, str | None]]  # (src, alt) of every <img> with a src
    encoding: str


def parse_html_page(payload: bytes, http_charset: str | None, fallback_encoding: str) -> HtmlPage | None:
    """The ``<img>`` tags and ``<base href>`` of a page, or None when it has no ``<img>`` at all."""
    if not _HAS_IMG.search(payload):
        return None
    text, encoding = decode_html(payload, http_charset, fallback_encoding)
    tree = LexborHTMLParser(text)
    base_node = tree.css_first("base[href]")
    base = base_node.attributes.get("href") if base_node is not None else None
    images = []
    for node in tree.css("img"):
        attributes = node.attributes
        src = attributes.get("src")
        if src:
            images.append((src, attributes.get("alt")))
    return HtmlPage(base, images, encoding)


def decode_html(payload: bytes, http_charset: str | None, fallback_encoding: str) -> tuple[str, str]:
    """(text, encoding used): the HTTP header's charset, then ``<meta>``, then UTF-8, then ``fallback_encoding``."""
    for declared in (http_charset, _meta_charset(payload)):
        encoding = _known_encoding(declared)
        if encoding is not None:
            return payload.decode(encoding, "replace"), encoding
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        encoding = _known_encoding(fallback_encoding) or "cp1252"
        return payload.decode(encoding, "replace"), encoding


def _meta_charset(payload: bytes) -> str | None:
    match = _META_CHARSET.search(payload[:_PRESCAN_BYTES])
    return match.group(1).decode("ascii") if match else None


def _known_encoding(name: str | None) -> str | None:
    if not name:
        return None
    try:
        encoding = codecs.lookup(name.strip().strip("\"'")).name
    except LookupError:
        return None
    # As browsers do (WHATWG Encoding): latin-1 labels mean windows-1252, and a UTF-16 declaration in an
    # ASCII-compatible page is a lie.
    if encoding in ("latin-1", "iso8859-1", "ascii"):
        return "cp1252"
    if encoding.startswith("utf-16"):
        return "utf-8"
    return encoding
