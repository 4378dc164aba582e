"""Image tags from HTML pages in WARC/ARC response records, decoded by their declared charset."""

from __future__ import annotations

import codecs
import functools
import re
from dataclasses import dataclass

import webencodings
from selectolax.lexbor import LexborHTMLParser

from laion_spark.extract.licenses import may_link_cc_license, page_license

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
    license: str | None = None  # the page's Creative Commons licence, short form (extract.licenses)


def parse_html_page(payload: bytes, http_charset: str | None, fallback_encoding: str) -> HtmlPage | None:
    """The ``<img>`` tags, ``<base href>`` and licence of a page, or None when it has no ``<img>`` at all."""
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
    license = None
    if may_link_cc_license(payload):  # most pages do not: they skip the query over every link
        links = tree.css("a[href], area[href], link[href]")
        license = page_license((node.attributes.get("href"), node.attributes.get("rel")) for node in links)
    return HtmlPage(base, images, encoding, license)


def decode_html(payload: bytes, http_charset: str | None, fallback_encoding: str) -> tuple[str, str]:
    """(text, codec used) as a browser decodes the page.

    A UTF-8 byte order mark wins; then the charset of the HTTP header, then ``<meta>``, then UTF-8 if the bytes are
    valid UTF-8, then ``fallback_encoding``. A label no one knows passes the choice on to the next source.
    """
    if payload.startswith(codecs.BOM_UTF8):
        return payload[3:].decode("utf-8", "replace"), "utf-8"
    for label, in_meta in ((http_charset, False), (_meta_charset(payload), True)):
        codec = _browser_codec(label, in_meta) if label else None
        if codec is None:
            continue
        if codec.name == "replacement":
            # WHATWG's "replacement" encoding (ISO-2022-KR, HZ-GB-2312, ...): escape-sequence encodings that could
            # hide markup from filters on the server, so a browser shows one U+FFFD instead of the page.
            return ("\ufffd" if payload else ""), codec.name
        return _decode(payload, codec), codec.name
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        codec = _fallback_codec(fallback_encoding)
        return _decode(payload, codec), codec.name


def _meta_charset(payload: bytes) -> str | None:
    match = _META_CHARSET.search(payload[:_PRESCAN_BYTES])
    return match.group(1).decode("ascii") if match else None


# WHATWG names an encoding after its legacy label, but decodes it with a wider table than the Python codec of that
# name: its GBK is GB18030, its Shift_JIS has the NEC and IBM rows of Windows' cp932, its EUC-KR is Windows' UHC
# (cp949), its Big5 includes HKSCS, and its windows-1252 (which iso-8859-1 and ascii labels also mean) is cp1252.
# The strict codecs turn characters such as 镕, ①, 髙 and 똠 into U+FFFD, and the pair is then dropped as binary
# text. EUC-JP stays euc_jp, which lacks the NEC row 13 and the IBM rows 89-92 that browsers read: euc_jis_2004 has
# row 13 but reads rows 89-92 as other characters (JIS X 0213), which is worse than U+FFFD.
_BROWSER_CODECS = {
    "gbk": "gb18030",
    "shift_jis": "cp932",
    "euc-kr": "cp949",
    "big5": "big5hkscs",
    "windows-1252": "cp1252",
    # A page is searched for b"<img" before it is decoded, so the pages that get here are ASCII-compatible and a
    # UTF-16 label on them is a mistake; WHATWG reads it as UTF-8 in <meta>, and we do so in the header too.
    "utf-16le": "utf-8",
    "utf-16be": "utf-8",
}


@functools.lru_cache(maxsize=4096)  # a crawl has millions of pages but few distinct labels
def _browser_codec(label: str, in_meta: bool) -> codecs.CodecInfo | None:
    """The codec that decodes a page declared ``label`` as browsers do, or None for a label WHATWG does not know."""
    label = label.strip().strip("\"'")
    encoding = webencodings.lookup(label) if label.isascii() else None  # every WHATWG label is ASCII
    if encoding is None:
        return None
    name = encoding.name
    if in_meta and name == "x-user-defined":
        name = "windows-1252"  # WHATWG's prescan: x-user-defined is honoured from HTTP only
    if name in _BROWSER_CODECS:
        return codecs.lookup(_BROWSER_CODECS[name])
    return encoding.codec_info


@functools.lru_cache(maxsize=16)
def _fallback_codec(name: str) -> codecs.CodecInfo:
    """``extract.fallback_encoding`` read as a browser reads that label. Python spellings count too (``latin-1`` is
    Python's ``iso8859-1``, hence windows-1252), a Python codec WHATWG does not know (``euc_jis_2004``) is still
    the user's choice, and a name that neither knows means windows-1252."""
    try:
        python_codec = codecs.lookup(name)
    except LookupError:
        python_codec = None
    codec = _browser_codec(name, False)
    if codec is None and python_codec is not None:
        codec = _browser_codec(python_codec.name, False) or python_codec
    return codec or _browser_codec("windows-1252", False)


def _decode(payload: bytes, codec: codecs.CodecInfo) -> str:
    return codec.decode(payload, _DECODE_ERRORS.get(codec.name, "replace"))[0]


def _gb18030_euro(error: UnicodeError) -> tuple[str, int]:
    """``replace``, except that a lone 0x80 is €: Windows' cp936 wrote it so, and WHATWG's GBK decoder reads it so."""
    if isinstance(error, UnicodeDecodeError) and error.object[error.start] == 0x80:
        return "\u20ac", error.start + 1
    return "\ufffd", error.end


codecs.register_error("laion_spark.gb18030_euro", _gb18030_euro)
_DECODE_ERRORS = {"gb18030": "laion_spark.gb18030_euro"}
