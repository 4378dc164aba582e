"""Legacy charsets read as browsers read them (WHATWG Encoding): pages written into WARCs, and decode_html itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from laion_spark.extract import ExtractRules, FileStatus, decode_html, extract_file
from laion_spark.testing.archives import HtmlPage, write_warc

PAGE = "http://legacy.example/page.html"


def cp936(text: str) -> bytes:
    """GBK bytes as Windows writes them: € is the single byte 0x80, which Python's gbk codec cannot write."""
    return b"\x80".join(part.encode("gbk") for part in text.split("€"))


# (label, how the server wrote the bytes, alt text a browser shows). Most alt texts have characters that the
# Python codec of the label's name cannot decode (镕 is not in gb2312, ① and 髙 not in shift_jis, 똠 not in
# euc_kr, 嘅 not in big5, € as 0x80 not in gbk), or labels Python does not know at all (x-gbk, windows-31j, x-sjis).
CASES = [
    ("gb2312", "gbk", "朱镕基总理在北京"),
    ("GB2312", "gbk", "朱镕基总理在上海"),
    ("x-gbk", "gbk", "朱镕基访问美国"),
    ("gbk", "gbk", "朱镕基与江泽民"),
    ("gb2312", cp936, "售价 €20 朱镕基签名"),
    ("shift_jis", "cp932", "①番目の写真です"),
    ("Shift_JIS", "cp932", "髙橋さんの写真"),
    ("windows-31j", "cp932", "①髙島屋の外観"),
    ("x-sjis", "cp932", "髙田馬場の駅①"),
    ("euc-kr", "cp949", "똠방각하 사진"),
    ("iso-8859-1", "cp1252", "“curly quotes” on a sign"),
    ("latin1", "cp1252", "the café’s “special”"),
    ("big5", "big5hkscs", "呢個係我哋嘅相"),
    ("euc-jp", "euc_jp", "日本語の説明文と丂"),
]
PLACES = ["http-header", "meta-charset", "meta-http-equiv"]


def legacy_page(label: str, encode, alt: str, place: str) -> HtmlPage:
    declaration = {
        "http-header": "",
        "meta-charset": f'<meta charset="{label}">',
        "meta-http-equiv": f'<meta http-equiv="Content-Type" content="text/html; charset={label}">',
    }[place]
    html = f'<html><head>{declaration}<title>t</title></head><body><img src="photo.jpg" alt="{alt}"></body></html>'
    body = encode(html) if callable(encode) else html.encode(encode)
    content_type = f"text/html; charset={label}" if place == "http-header" else "text/html"
    return HtmlPage(PAGE, body, content_type)


def extracted_texts(tmp_path: Path, pages: list[HtmlPage], rules: ExtractRules = ExtractRules()) -> list[str]:
    pairs, statuses = [], []
    for item in extract_file(str(write_warc(tmp_path / "legacy.warc.gz", pages)), rules, 10000):
        (statuses.append if isinstance(item, FileStatus) else pairs.extend)(item)
    assert [s.status for s in statuses] == ["ok"]
    return [text for _, _, text, *_ in pairs]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize(("label", "encode", "alt"), CASES)
def test_legacy_labels_give_the_alt_text_a_browser_shows(tmp_path, label, encode, alt, place):
    assert extracted_texts(tmp_path, [legacy_page(label, encode, alt, place)]) == [alt]


@pytest.mark.parametrize("place", PLACES)
def test_unknown_label_falls_through_to_utf8_then_fallback(tmp_path, place):
    utf8 = legacy_page("x-no-such-charset", "utf-8", "Größe und Maße ①", place)
    cp1252 = legacy_page("x-no-such-charset", "cp1252", "Crème brûlée “maison”", place)
    cp1252.url = "http://legacy.example/other.html"
    texts = extracted_texts(tmp_path, [utf8, cp1252])
    assert texts == ["Größe und Maße ①", "Crème brûlée “maison”"]


def test_unknown_header_label_leaves_the_choice_to_meta(tmp_path):
    page = legacy_page("shift_jis", "cp932", "①髙橋さんの写真", "meta-charset")
    page.content_type = "text/html; charset=x-no-such-charset"
    assert extracted_texts(tmp_path, [page]) == ["①髙橋さんの写真"]


@pytest.mark.parametrize("place", PLACES)
def test_replacement_labels_give_no_pairs_as_browsers_show_no_page(tmp_path, place):
    # ISO-2022-KR and friends are WHATWG's "replacement" encoding: a browser shows one U+FFFD, never the page.
    page = legacy_page("iso-2022-kr", "ascii", "an image that no browser shows", place)
    assert extracted_texts(tmp_path, [page]) == []


def test_fallback_encoding_is_resolved_as_a_browser_label(tmp_path):
    page = legacy_page("x-no-such-charset", "gbk", "朱镕基总理在北京", "http-header")
    assert extracted_texts(tmp_path, [page], ExtractRules(fallback_encoding="gb2312")) == ["朱镕基总理在北京"]


def test_decode_html_reads_labels_as_browsers_do():
    assert decode_html("朱镕基".encode("gbk"), "gb2312", "cp1252") == ("朱镕基", "gb18030")
    assert decode_html(cp936("售价 €20"), "gbk", "cp1252") == ("售价 €20", "gb18030")
    assert decode_html("①と髙".encode("cp932"), " 'Windows-31J' ", "cp1252") == ("①と髙", "cp932")
    assert decode_html("똠".encode("cp949"), '"EUC-KR"', "cp1252") == ("똠", "cp949")
    assert decode_html(b"\x93quoted\x94", "ISO-8859-1", "cp1252") == ("“quoted”", "cp1252")
    assert decode_html(b"\x93quoted\x94", "ascii", "cp1252") == ("“quoted”", "cp1252")
    # A label no one knows is passed over (header, then meta), and not read as cp1252.
    assert decode_html("déjà ①".encode(), "x-no-such-charset", "cp1252") == ("déjà ①", "utf-8")
    meta = '<meta charset="x-sjis">①'
    assert decode_html(meta.encode("cp932"), "x-no-such-charset", "cp1252") == (meta, "cp932")
    # A non-ASCII label is no label (WHATWG labels are ASCII).
    assert decode_html(b"caf\xc3\xa9", "gb2312\u00e9", "cp1252") == ("café", "utf-8")


def test_decode_html_follows_the_whatwg_special_cases():
    # A UTF-16 label on a page whose bytes are ASCII-compatible means UTF-8, in <meta> and in the header.
    meta_utf16 = '<meta charset="utf-16"><img alt="é">'
    assert decode_html(meta_utf16.encode(), None, "cp1252") == (meta_utf16, "utf-8")
    assert decode_html("é".encode(), "UTF-16LE", "cp1252") == ("é", "utf-8")
    # x-user-defined: its own encoding from HTTP, windows-1252 from <meta>.
    assert decode_html(b"\x93", "x-user-defined", "cp1252") == ("\uf793", "x-user-defined")
    meta_user = b'<meta charset="x-user-defined">\x93'
    assert decode_html(meta_user, None, "cp1252") == ('<meta charset="x-user-defined">“', "cp1252")
    # The replacement encoding: one U+FFFD for the whole page.
    assert decode_html(b"<img src=a.jpg alt=hidden>", "hz-gb-2312", "cp1252") == ("\ufffd", "replacement")
    assert decode_html(b'<meta charset="csiso2022kr"><img>', None, "cp1252") == ("\ufffd", "replacement")
    # A UTF-8 byte order mark outranks every label.
    assert decode_html(b"\xef\xbb\xbfcaf\xc3\xa9", "windows-1252", "cp1252") == ("café", "utf-8")


@pytest.mark.parametrize(
    ("fallback", "text", "codec"),
    [
        ("cp1252", "“déjà vu”", "cp1252"),
        ("latin-1", "“déjà vu”", "cp1252"),  # Python's spelling of a label that means windows-1252
        ("iso-8859-1", "“déjà vu”", "cp1252"),
        ("no-such-codec", "“déjà vu”", "cp1252"),
        ("gb2312", "朱镕基", "gb18030"),
        ("shift_jis", "①髙", "cp932"),
        ("euc_jis_2004", "①", "euc_jis_2004"),  # a Python codec WHATWG does not know is still the user's choice
    ],
)
def test_decode_html_fallback_encoding_goes_through_the_same_lookup(fallback, text, codec):
    payload = text.encode({"cp1252": "cp1252", "gb18030": "gbk"}.get(codec, codec))
    assert decode_html(payload, None, fallback) == (text, codec)
