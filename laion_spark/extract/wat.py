"""Image links from WAT metadata records (Common Crawl's JSON summary of each HTML page)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from laion_spark.extract.archive import WAT_IMAGE_MARKER as IMG_SRC_MARKER


@dataclass(slots=True)
class WatPage:
    target_uri: str | None  # Envelope.WARC-Header-Metadata.WARC-Target-URI
    base: str | None  # HTML-Metadata.Head.Base
    images: list[tuple[str, str | None]]  # (src, alt) of every IMG@/src link
    invalid_utf8: bool  # the JSON held bytes that are not UTF-8; they were replaced


def parse_wat_record(payload: bytes) -> WatPage | None:
    """The image links of one WAT record, or None when the page has none.

    Most WAT records (requests, non-HTML responses, pages without images) never reach the JSON parser: the byte
    check for the ``IMG@/src`` path is far cheaper. Raises ``ValueError`` for invalid JSON.
    """
    if IMG_SRC_MARKER not in payload:
        return None
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
    images = list(_img_links(html_meta.get("Links")))
    if not images:
        return None
    target_uri = _dict(envelope.get("WARC-Header-Metadata")).get("WARC-Target-URI")
    base = _dict(html_meta.get("Head")).get("Base")
    return WatPage(
        target_uri if isinstance(target_uri, str) else None,
        base if isinstance(base, str) else None,
        images,
        invalid_utf8,
    )


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _img_links(links: object) -> Iterator[tuple[str, str | None]]:
    if not isinstance(links, list):
        return
    for link in links:
        if isinstance(link, dict) and link.get("path") == "IMG@/src":
            src = link.get("url")
            if isinstance(src, str):
                alt = link.get("alt")
                yield src, alt if isinstance(alt, str) else None
