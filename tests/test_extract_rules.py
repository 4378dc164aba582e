"""URL, text, WAT and HTML rules of the extraction stage, on single records (no Spark)."""

from __future__ import annotations

import hashlib
import json

from laion_spark.extract import (
    clean_alt_text,
    decode_html,
    has_allowed_scheme,
    normalize_url,
    pair_uid,
    parse_html_page,
    parse_wat_record,
    resolve_url,
)
from laion_spark.testing.archives import WatPage, wat_json

HTTP = frozenset({"http", "https"})


def test_relative_urls_resolve_against_base_joined_to_the_page():
    page = "http://example.com/blog/post.html"
    assert resolve_url("img/a.jpg", page) == "http://example.com/blog/img/a.jpg"
    assert resolve_url("/a.jpg", page) == "http://example.com/a.jpg"
    assert resolve_url("//cdn.example.net/a.jpg", page) == "http://cdn.example.net/a.jpg"
    assert resolve_url("a.jpg", page, base_href="/static/") == "http://example.com/static/a.jpg"
    assert resolve_url("a.jpg", page, base_href="https://img.example.org/x/") == "https://img.example.org/x/a.jpg"
    assert resolve_url("  a\n.jpg ", page) == "http://example.com/blog/a.jpg"


def test_only_http_and_https_urls_are_kept():
    assert has_allowed_scheme("https://example.com/a.jpg", HTTP)
    assert has_allowed_scheme("HTTP://example.com/a.jpg", HTTP)
    for url in ("data:image/png;base64,AAAA", "javascript:void(0)", "blob:https://x/1", "ftp://x/a.jpg", "a.jpg"):
        assert not has_allowed_scheme(url, HTTP), url


def test_normalize_url_keeps_the_resource_and_drops_noise():
    assert normalize_url("HTTP://Example.COM:80/A b.jpg#frag") == "http://example.com/A%20b.jpg"
    assert normalize_url("https://example.com:443/a?q=1") == "https://example.com/a?q=1"
    assert normalize_url("https://example.com:8443/a") == "https://example.com:8443/a"
    assert normalize_url("http://example.com") == "http://example.com/"


def test_alt_text_entities_decoded_and_whitespace_collapsed():
    assert clean_alt_text("  A&nbsp;red &amp; blue\n\tcircle  ") == "A red & blue circle"
    assert clean_alt_text("caf&eacute; &#x263A;") == "café ☺"
    assert clean_alt_text("Tom &amp;amp; Jerry", decode_entities=False) == "Tom &amp;amp; Jerry"


def test_pair_uid_is_sha1_of_normalized_url_tab_text():
    expected = hashlib.sha1(b"http://example.com/a.jpg\ta red circle").hexdigest()
    assert pair_uid("http://example.com/a.jpg", "a red circle") == expected
    assert pair_uid("HTTP://EXAMPLE.com:80/a.jpg#x", "  a red\ncircle ") == expected
    assert pair_uid("http://example.com/a.jpg", "a red square") != expected


def test_wat_record_gives_img_src_links_with_alt_and_base():
    page = WatPage(
        "http://example.com/p/",
        [("a.jpg", "first image"), ("b.jpg", None), ("c.jpg", "")],
        base="/static/",
        other_links=[{"path": "A@/href", "url": "/x"}, {"path": "IMG@/data-src", "url": "lazy.jpg", "alt": "lazy"}],
    )
    parsed = parse_wat_record(json.dumps(wat_json(page)).encode())
    assert parsed.target_uri == "http://example.com/p/"
    assert parsed.base == "/static/"
    assert parsed.images == [("a.jpg", "first image"), ("b.jpg", None), ("c.jpg", "")]


def test_wat_record_without_images_is_not_json_parsed():
    # Not even valid JSON: the IMG@/src byte check must skip it before the parser sees it.
    assert parse_wat_record(b'{"Envelope": {"Links": [{"path": "A@/href"') is None


def test_html_uppercase_tags_entities_base_and_missing_src():
    html = (
        b'<HTML><HEAD><BASE HREF="http://static.example.com/img/"></HEAD><BODY>'
        b'<IMG SRC="a.jpg" ALT="Fish &amp; chips">'
        b'<img alt="no source"><img src="b.png"><img src="c.gif" alt=""></BODY></HTML>'
    )
    page = parse_html_page(html, None, "cp1252")
    assert page.base == "http://static.example.com/img/"
    assert page.images == [("a.jpg", "Fish & chips"), ("b.png", None), ("c.gif", "")]


def test_html_charset_from_header_then_meta_then_utf8_then_fallback():
    text = "Grüße aus Köln"
    latin = f'<img src="a.jpg" alt="{text}">'.encode("iso-8859-1")
    assert parse_html_page(latin, "ISO-8859-1", "cp1252").images[0][1] == text
    meta = '<html><head><meta charset="windows-1251"></head><img src="a.jpg" alt="Привет мир">'.encode("cp1251")
    assert parse_html_page(meta, None, "cp1252").images[0][1] == "Привет мир"
    http_equiv = (
        '<meta http-equiv="Content-Type" content="text/html; charset=shift_jis"><img src=a.jpg alt="日本語の説明">'
    )
    assert parse_html_page(http_equiv.encode("shift_jis"), None, "cp1252").images[0][1] == "日本語の説明"
    assert decode_html("ünïcode".encode(), None, "cp1252") == ("ünïcode", "utf-8")
    assert decode_html("déjà vu".encode("cp1252"), None, "cp1252") == ("déjà vu", "cp1252")
    # A header naming an unknown charset is ignored rather than fatal.
    assert decode_html("déjà".encode(), "x-unknown-charset", "cp1252") == ("déjà", "utf-8")


def test_html_without_img_is_not_parsed():
    assert parse_html_page(b"<html><body><p>no images here</p></body></html>", None, "cp1252") is None


def test_fast_url_paths_agree_with_urljoin():
    from urllib.parse import urljoin

    from laion_spark.extract import PageUrlResolver

    sources = [
        "/a.jpg",
        "//cdn.x/a.jpg",
        "http://x/a.jpg",
        "HTTPS://X/a.jpg",
        "a.jpg",
        "../a.jpg",
        "/a/../b.jpg",
        "?q=1",
        "",
    ]
    for page, base in [
        ("http://example.com/d/p.html", None),
        ("https://example.com/d/", "/static/"),
        ("http://h:8080/x", None),
    ]:
        resolver = PageUrlResolver(page, base)
        effective_base = urljoin(page, base) if base else page
        for src in sources:
            assert resolver.resolve(src) == urljoin(effective_base, src), (page, base, src)


def test_wat_image_link_shortcut_agrees_with_full_json_parse():
    from laion_spark.extract.wat import _parse_whole_document

    tricky = [
        WatPage("http://e.com/", [("a.jpg", "alt with {braces} inside"), ("b.jpg", "plain")]),
        WatPage("http://e.com/", [("a.jpg", 'quotes " and \\ backslash'), ("c.jpg", None)], base="/b/"),
        WatPage("http://e.com/", [("a.jpg", "x")], other_links=[{"path": "A@/href", "url": "/", "text": "Base"}]),
        WatPage("http://e.com/", [("a.jpg", "日本語 ünïcode")], base="http://other.example/"),
    ]
    for page in tricky:
        payload = json.dumps(wat_json(page)).encode()
        assert parse_wat_record(payload) == _parse_whole_document(payload)
        assert parse_wat_record(payload).images == page.images
    nested_base = json.dumps({"Envelope": {"Base": {"x": 1}, "Links": [{"path": "IMG@/src", "url": "u"}]}}).encode()
    assert parse_wat_record(nested_base) == _parse_whole_document(nested_base)
