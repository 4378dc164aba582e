"""Image links from WAT metadata records (Common Crawl's JSON summary of each HTML page)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from laion_spark.extract.archive import WAT_IMAGE_MARKER as IMG_SRC_MARKER
from laion_spark.extract.licenses import may_link_cc_license, page_license

# The link paths that can carry a licence. Common Crawl's WAT (ia-web-commons) keeps ``rel`` on A, AREA and LINK
# entries; its LINK entries are in Head.Link, not in Links, and both lists are read.
_LICENSE_LINK_PATHS = frozenset({"A@/href", "AREA@/href", "LINK@/href"})
_KEY_PATTERNS = {
    key: re.compile(rb'"' + key + rb'"\s*:\s*("(?:[^"\\]|\\.)*")') for key in (b"Base", b"WARC-Target-URI")
}


@dataclass(slots=True)
class WatPage:
    target_uri: str | None  # Envelope.WARC-Header-Metadata.WARC-Target-URI
    base: str | None  # HTML-Metadata.Head.Base
    images: list[tuple[str, str | None]]  # (src, alt) of every IMG@/src link
    invalid_utf8: bool  # the JSON held bytes that are not UTF-8; they were replaced
    license: str | None = None  # the page's Creative Commons licence, short form (extract.licenses)


def parse_wat_record(payload: bytes, want_target_uri: bool = True) -> WatPage | None:
    """The image links of one WAT record, or None when the page has none.

    Most WAT records (requests, non-HTML responses, pages without images) never reach the JSON parser: the byte
    check for the ``IMG@/src`` path is far cheaper. Raises ``ValueError`` for invalid JSON. Without
    ``want_target_uri`` (the caller has the URI from the WARC header) the page's ``target_uri`` may be None.
    """
    if IMG_SRC_MARKER not in payload:
        return None
    # A page that may link to a CC licence needs its A and LINK entries too, so the whole document: a few pages.
    if not may_link_cc_license(payload):
        fast = _parse_image_links_only(payload, want_target_uri)
        if fast is not None:
            return fast
    return _parse_whole_document(payload)


def _parse_image_links_only(payload: bytes, want_target_uri: bool = True) -> WatPage | None:
    """The image links without parsing the whole document, or None when this shortcut cannot be trusted.

    Parsing the full JSON of every page with images is most of the cost of reading a WAT (its ~100 ``A@/href``
    links dominate). Link objects are flat, so each ``IMG@/src`` object is cut out between its braces and only
    those are parsed. Anything unusual (a brace inside a link's strings, several ``Base`` keys, a document that is
    not framed as one object, bytes that are not UTF-8) returns None and the whole document is parsed instead.
    """
    if payload[:1] != b"{" or payload.rstrip()[-1:] != b"}":
        return None
    pieces = []
    find, rfind, append = payload.find, payload.rfind, pieces.append
    position = find(IMG_SRC_MARKER)
    while position >= 0:
        start, end = rfind(b"{", 0, position), find(b"}", position)
        if start < 0 or end < 0:
            return None
        append(payload[start : end + 1])
        position = find(IMG_SRC_MARKER, end)
    try:
        # Decoded first: json.loads on bytes sniffs their encoding, which costs more than the decoding itself.
        links = json.loads("[" + b",".join(pieces).decode("utf-8") + "]")
    except ValueError:  # UnicodeDecodeError included: such a page takes the whole-document path
        return None
    images = []
    append = images.append
    for link in links:
        if type(link) is not dict or link.get("path") != "IMG@/src":
            return None
        url, alt = link.get("url"), link.get("alt")
        if type(url) is not str:
            return None
        append((url, alt if type(alt) is str else None))
    found_base, base = _single_string_value(payload, b"Base")
    if not found_base:
        return None
    # Each lookup scans the whole document (a third of this function's time), so it is skipped when unused.
    target_uri = None
    if want_target_uri:
        found_uri, target_uri = _single_string_value(payload, b"WARC-Target-URI")
        if not found_uri:
            return None
    return WatPage(target_uri, base, images, False)


def _single_string_value(payload: bytes, key: bytes) -> tuple[bool, str | None]:
    """(trusted, value) of a key that may appear at most once, with a string value."""
    quoted = b'"' + key + b'"'
    first = payload.find(quoted)
    if first < 0:
        return True, None
    if payload.find(quoted, first + len(quoted)) >= 0:
        return False, None
    match = _KEY_PATTERNS[key].match(payload, first)
    if match is None:
        return False, None
    try:
        return True, _str_or_none(json.loads(match.group(1).decode("utf-8")))
    except ValueError:
        return False, None


def _parse_whole_document(payload: bytes) -> WatPage | None:
    invalid_utf8 = False
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = payload.decode("utf-8", "replace")
        invalid_utf8 = True
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError(f"WAT payload is a JSON {type(document).__name__}, not an object")
    envelope = _dict(document.get("Envelope"))
    html_meta = _dict(_dict(_dict(envelope.get("Payload-Metadata")).get("HTTP-Response-Metadata")).get("HTML-Metadata"))
    links = html_meta.get("Links")
    if not isinstance(links, list):
        return None
    # A comprehension rather than a loop: pages carry ~100 links each and this runs for every one of them.
    images = [
        (link["url"], _str_or_none(link.get("alt")))
        for link in links
        if type(link) is dict and link.get("path") == "IMG@/src" and type(link.get("url")) is str
    ]
    if not images:
        return None
    target_uri = _dict(envelope.get("WARC-Header-Metadata")).get("WARC-Target-URI")
    head = _dict(html_meta.get("Head"))
    base = head.get("Base")
    license = None
    if may_link_cc_license(payload):
        head_links = head.get("Link")
        license = page_license(_license_links([*(head_links if isinstance(head_links, list) else []), *links]))
    return WatPage(
        target_uri if isinstance(target_uri, str) else None,
        base if isinstance(base, str) else None,
        images,
        invalid_utf8,
        license,
    )


def _license_links(links: list) -> Iterator[tuple[str | None, str | None]]:
    """(href, rel) of the WAT link entries that can state a licence, in order."""
    for link in links:
        if type(link) is dict and link.get("path") in _LICENSE_LINK_PATHS:
            yield _str_or_none(link.get("url")), _str_or_none(link.get("rel"))


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _str_or_none(value: object) -> str | None:
    return value if type(value) is str else None
