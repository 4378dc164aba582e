"""Creative Commons licences: the URL forms normalised, the page forms found in WARC HTML and WAT metadata, carried
from pairs to candidates, and written into the LAION parquet's ``LICENSE`` and the WebDataset sample json."""

from __future__ import annotations

import copy
import json
import re
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_spark.candidates import run_candidates
from laion_spark.config import Config
from laion_spark.export import run_export
from laion_spark.extract import run_extract
from laion_spark.extract.licenses import is_license_rel, normalize_cc_license, page_license
from laion_spark.storage.ids import sample_id
from laion_spark.testing.archives import WatPage, html_page, wat_json, write_arc, write_warc, write_wat


@pytest.mark.parametrize(
    ("url", "short"),
    [
        ("https://creativecommons.org/licenses/by-sa/4.0/", "by-sa/4.0"),
        ("https://creativecommons.org/licenses/by-sa/4.0/deed.en", "by-sa/4.0"),
        ("https://creativecommons.org/licenses/by-nc-nd/4.0/legalcode", "by-nc-nd/4.0"),
        ("https://creativecommons.org/licenses/by-nc-sa/4.0/legalcode.de", "by-nc-sa/4.0"),
        ("http://creativecommons.org/licenses/by/2.0/fr/", "by/2.0"),  # a jurisdiction port: its type and version
        ("http://creativecommons.org/licenses/by-nc/3.0/us/deed.es_ES", "by-nc/3.0"),
        ("https://www.creativecommons.org/licenses/by/3.0", "by/3.0"),
        ("//creativecommons.org/licenses/by-nd/2.5/", "by-nd/2.5"),  # protocol-relative
        ("  HTTPS://CreativeCommons.org/Licenses/BY-SA/3.0/  ", "by-sa/3.0"),
        ("https://creativecommons.org:443/licenses/by/4.0/?ref=chooser-v1#top", "by/4.0"),
        ("https://creativecommons.org/licenses/by/4.0/rdf", "by/4.0"),
        ("http://creativecommons.org/licenses/by-nd-nc/1.0/", "by-nd-nc/1.0"),  # the 1.0 spelling, kept as is
        ("http://creativecommons.org/licenses/sa/1.0/", "sa/1.0"),
        ("http://creativecommons.org/licenses/sampling+/1.0/", "sampling+/1.0"),
        ("https://creativecommons.org/licenses/by-sa/", "by-sa"),  # no version given
        ("https://creativecommons.org/publicdomain/zero/1.0/", "cc0"),
        ("https://creativecommons.org/publicdomain/zero/1.0/deed.fr", "cc0"),
        ("http://creativecommons.org/publicdomain/mark/1.0/", "pdm"),
        # not a licence: other pages of the site, other sites, relative links, other schemes, junk
        ("https://creativecommons.org/", None),
        ("https://creativecommons.org/about/", None),
        ("https://creativecommons.org/licenses/", None),
        ("https://creativecommons.org/publicdomain/", None),
        ("https://creativecommons.org/licenses/GPL/2.0/", None),
        ("https://creativecommons.org/licenses/list.en", None),
        ("https://wiki.creativecommons.org/licenses/by/4.0/", None),
        ("https://creativecommons.org.evil.example/licenses/by/4.0/", None),
        ("https://example.org/?next=https://creativecommons.org/licenses/by/4.0/", None),
        ("/licenses/by/4.0/", None),
        ("creativecommons.org/licenses/by/4.0/", None),
        ("ftp://creativecommons.org/licenses/by/4.0/", None),
        ("https://opensource.org/licenses/MIT", None),
        ("http://[creativecommons.org/licenses/by/4.0/", None),
        ("", None),
        (None, None),
    ],
)
def test_licence_urls_normalise_to_the_short_form(url, short):
    assert normalize_cc_license(url) == short


@pytest.mark.parametrize(
    ("page", "may_link"),
    [
        (b'<a rel="license" href="https://creativecommons.org/licenses/by/4.0/">', True),
        (b'<a href="http://CreativeCommons.org/licenses/by-nc/2.5/">', True),
        (b'<A HREF="HTTP://CREATIVECOMMONS.ORG/LICENSES/BY-SA/2.0/">', True),  # a 2000s page in capitals
        (b'<a href="https://example.org/licence">all rights reserved</a>', False),
    ],
)
def test_the_byte_pre_check_finds_creativecommons_links_in_the_spellings_pages_use(page, may_link):
    from laion_spark.extract.licenses import may_link_cc_license

    assert may_link_cc_license(page) is may_link
    if may_link:  # what the pre-check lets through normalises
        url = re.search(rb'href="([^"]+)"', page, re.IGNORECASE).group(1).decode()
        assert normalize_cc_license(url) is not None


def test_rel_holds_license_among_other_tokens_in_any_case():
    assert is_license_rel("license") and is_license_rel("nofollow  LICENSE") and is_license_rel("cc:license")
    assert not is_license_rel("licensed") and not is_license_rel("nofollow") and not is_license_rel(None)


CC_BY = "https://creativecommons.org/licenses/by/4.0/"
CC_BY_SA = "https://creativecommons.org/licenses/by-sa/4.0/"


@pytest.mark.parametrize(
    ("links", "license"),
    [
        ([("/about", None), (CC_BY, "license")], "by/4.0"),
        # rel="license" wins over a plain link to another licence earlier on the page
        ([(CC_BY_SA, None), ("/terms", None), (CC_BY, "license")], "by/4.0"),
        ([(CC_BY_SA, None), (CC_BY, None)], "by-sa/4.0"),  # without rel="license": the first plain link
        # the page names its licence and it is not CC: a CC link elsewhere (a comment, a badge) does not count
        ([("/terms-of-use", "license"), (CC_BY, None)], None),
        ([(CC_BY, None), ("https://example.org/terms", "license")], None),
        ([("/terms-of-use", "license"), (CC_BY_SA, "license")], "by-sa/4.0"),
        ([("", "license"), (None, "license"), (CC_BY, None)], "by/4.0"),  # a rel without an href says nothing
        ([], None),
    ],
)
def test_page_licence_prefers_rel_license_links(links, license):
    assert page_license(links) == license


# Every form a licence takes, one page each, with one image whose alt text names the page:
# alt text -> (markup in <head>, markup in the footer, the licence expected).
WARC_PAGES = {
    "a red bicycle by the canal": ("", f'<a rel="license" href="{CC_BY_SA}deed.en">CC BY-SA</a>', "by-sa/4.0"),
    "a harbour full of boats": (
        '<link rel="Alternate LICENSE" href="//creativecommons.org/licenses/by-nc/3.0/us/">',
        "",
        "by-nc/3.0",
    ),
    "an old map of the city": (
        "",
        '<map name="m"><area rel="license" href="http://creativecommons.org/publicdomain/mark/1.0/"></map>',
        "pdm",
    ),
    "a mountain lake at dawn": (
        "",
        'Photos: <a href="https://www.creativecommons.org/publicdomain/zero/1.0/deed.fr">CC0</a>',
        "cc0",
    ),
    "a bowl of fresh cherries": ("", "&copy; 2024 Example Ltd", None),
    "a stack of wooden crates": ("", f'<a rel="license" href="/terms">Terms</a> <a href="{CC_BY}">a badge</a>', None),
}
# A legacy-charset page: the licence is found in the page as decoded, and the alt text is read right too.
LEGACY_ALT = "Crème brûlée “maison”"
LEGACY_HEAD, LEGACY_FOOTER = '<meta charset="windows-1252">', f'<a rel="license" href="{CC_BY}">CC BY</a>'
ARC_ALT = "a red bicycle in an old archive"


def page_html(alt: str, head: str, footer: str) -> str:
    return (
        f"<html><head>{head}<title>t</title></head><body><img src='photo.jpg' alt='{alt}'>"
        f"<p><a href='/about'>About</a></p><footer>{footer}</footer></body></html>"
    )


# alt text -> (the page's entries in Links besides its image, the licence expected)
WAT_PAGES = {
    "a yellow tram in the snow": ([{"path": "A@/href", "url": CC_BY, "rel": "license", "text": "CC BY"}], "by/4.0"),
    "two cats on a windowsill": ([{"path": "A@/href", "url": CC_BY_SA, "text": "some rights reserved"}], "by-sa/4.0"),
    "a lighthouse on a cliff": ([], None),
    "a field of sunflowers": (
        [{"path": "A@/href", "url": "/terms", "rel": "license"}, {"path": "A@/href", "url": CC_BY}],
        None,
    ),
    # a CC licence URL as a form's action is not a link to it
    "a badge on a wall": ([{"path": "FORM@/action", "url": CC_BY, "rel": "license"}], None),
}
# Common Crawl's WAT puts <link> tags in Head.Link, not in Links (wat_json writes no Head.Link: added here).
LINK_REL_ALT = "a train crossing a bridge"
LINK_REL_HEAD = [
    {"path": "LINK@/href", "url": "/style.css", "rel": "stylesheet", "type": "text/css"},
    {"path": "LINK@/href", "url": "https://creativecommons.org/licenses/by-nd/4.0/", "rel": "license"},
]


def wat_page(number: int, alt: str, links: list[dict]) -> WatPage:
    return WatPage(f"http://wat.example/{number}", [(f"/{number}.jpg", alt)], other_links=links)


def wat_with_head_links(page: WatPage, head_links: list[dict]) -> bytes:
    document = wat_json(page)
    document["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Head"]["Link"] = head_links
    return json.dumps(document).encode()


def expected_licences() -> dict[str, set]:
    expected = {alt: {license} for alt, (_, _, license) in WARC_PAGES.items()}
    expected.update({alt: {license} for alt, (_, license) in WAT_PAGES.items()})
    expected.update({LEGACY_ALT: {"by/4.0"}, ARC_ALT: {"by-sa/4.0"}, LINK_REL_ALT: {"by-nd/4.0"}})
    return expected


@pytest.fixture(scope="module")
def extracted(spark, tmp_path_factory) -> tuple[dict[str, set], dict[str, set]]:
    """Extract and candidates run over a WARC, an ARC and a WAT of such pages: (alt text -> the licences its pairs
    carry, -> the licences its candidates carry)."""
    root = tmp_path_factory.mktemp("licenses")
    crawl = root / "crawl"
    crawl.mkdir()
    pages = [
        html_page(f"http://warc.example/{n}", page_html(alt, *page[:2]))
        for n, (alt, page) in enumerate(WARC_PAGES.items())
    ]
    legacy = page_html(LEGACY_ALT, LEGACY_HEAD, LEGACY_FOOTER)
    pages.append(html_page("http://warc.example/legacy", legacy, charset="cp1252", content_type="text/html"))
    write_warc(crawl / "pages.warc.gz", pages)
    arc_page = page_html(ARC_ALT, "", f'<a rel="license" href="{CC_BY_SA}">CC BY-SA</a>')
    write_arc(crawl / "old.arc.gz", [html_page("http://arc.example/page", arc_page)])
    wat_pages: list[WatPage | bytes] = [
        wat_page(n, alt, links) for n, (alt, (links, _)) in enumerate(WAT_PAGES.items())
    ]
    wat_pages.append(wat_with_head_links(wat_page(len(wat_pages), LINK_REL_ALT, []), LINK_REL_HEAD))
    write_wat(crawl / "meta.wat.gz", wat_pages)

    lake = str(root / "lake")
    result = run_extract(spark, Config(), lake, [str(crawl / "*")], run_id="licences")
    assert (result.files_ok, result.files_partial, result.files_failed) == (3, 0, 0)
    run_candidates(spark, Config(), lake, run_id="licences")

    def licences_by_text(table: str) -> dict[str, set]:
        by_text: dict[str, set] = {}
        for row in spark.read.format("delta").load(f"{lake}/{table}").select("text", "license").collect():
            by_text.setdefault(row.text, set()).add(row.license)
        return by_text

    return licences_by_text("pairs"), licences_by_text("candidates")


def test_pairs_carry_the_licence_of_their_page_from_warc_arc_and_wat(extracted):
    pairs, _ = extracted
    assert pairs == expected_licences()  # the legacy page's alt text among them, decoded right


def test_candidates_carry_the_licence_of_their_pair(extracted):
    _, candidates = extracted
    assert candidates == expected_licences()


# --- exports: a copy of the demo lake (never the shared one) with licences set on some candidates ---------------


@pytest.fixture(scope="module")
def licensed_lake(spark, demo_lake, tmp_path_factory) -> tuple[str, Config, dict[str, str | None]]:
    """(lake, config, uid -> licence of every dataset row): half the demo's candidates get a CC licence."""
    lake = tmp_path_factory.mktemp("licensed") / "lake"
    shutil.copytree(demo_lake.lake, lake)
    candidates = f"delta.`{lake}/candidates`"
    spark.sql(f"UPDATE {candidates} SET license = CASE WHEN uid < '8' THEN 'by-sa/4.0' ELSE 'cc0' END")
    spark.sql(f"UPDATE {candidates} SET license = NULL WHERE substring(uid, 2, 1) < '8'")
    licences = {row.uid: row.license for row in spark.read.format("delta").load(f"{lake}/candidates").collect()}
    dataset = [row.uid for row in spark.read.format("delta").load(f"{lake}/dataset").select("uid").collect()]
    expected = {uid: licences[uid] for uid in dataset}
    assert {"by-sa/4.0", "cc0", None} <= set(expected.values())  # the demo's rows cover every case
    return str(lake), copy.deepcopy(demo_lake.config), expected


def test_laion_parquet_license_column_is_the_candidates_licence(spark, licensed_lake, tmp_path):
    lake, config, expected = licensed_lake
    result = run_export(spark, config, lake, "laion", str(tmp_path))
    table = pq.read_table(sorted(tmp_path.glob("part-*.parquet")))
    assert result.rows_total == table.num_rows == len(expected)
    by_id = {sample_id(uid): license for uid, license in expected.items()}
    assert {record["SAMPLE_ID"]: record["LICENSE"] for record in table.to_pylist()} == by_id


def test_webdataset_sample_json_and_parquet_carry_the_licence(spark, licensed_lake, tmp_path):
    lake, config, expected = licensed_lake
    run_export(spark, config, lake, "webdataset", str(tmp_path))
    from_json, from_parquet = {}, {}
    for tar_path in sorted(Path(tmp_path).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    sample = json.loads(tar.extractfile(member).read())
                    from_json[sample["uid"]] = sample["license"]
        for record in pq.read_table(tar_path.with_suffix(".parquet")).to_pylist():
            from_parquet[record["uid"]] = record["license"]
    assert from_json == from_parquet == expected
