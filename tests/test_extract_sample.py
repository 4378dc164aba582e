"""The demo's bundled sample crawl has the mix the issue asks for, and extraction reads all of it."""

from __future__ import annotations

import collections

from laion_spark.extract import ExtractRules, FileStatus, extract_file
from laion_spark.testing.sample_crawl import JUNK_ALTS, caption_in, write_sample_crawl
from laion_spark.testing.synthetic import all_kinds

SITE = "http://127.0.0.1:8765"


def test_sample_crawl_is_deterministic_multilingual_and_messy(tmp_path):
    files = write_sample_crawl(tmp_path / "a", SITE)
    again = write_sample_crawl(tmp_path / "b", SITE)
    assert [f.name for f in files] == ["sample.wat.gz", "sample.warc.gz", "sample-extra.warc"]

    pairs, statuses = [], []
    for path in files:
        for item in extract_file(str(path), ExtractRules()):
            (statuses.append if isinstance(item, FileStatus) else pairs.extend)(item)
    assert all(s.status == "ok" for s in statuses)
    again_pairs = [
        p for path in again for i in extract_file(str(path), ExtractRules()) if isinstance(i, list) for p in i
    ]
    assert [p[:3] for p in pairs] == [p[:3] for p in again_pairs]

    pages = {p[3] for p in pairs}
    assert 60 <= len(pages) <= 150
    assert {url.split("/")[3] for url in pages} == {"en", "de", "fr", "es", "it", "pt", "nl", "ru", "ja", "zh"}
    slugs = {k.slug for k in all_kinds()}
    assert all(p[1].startswith(f"{SITE}/img/") and p[1].rsplit("/", 1)[1].rsplit("-", 1)[0] in slugs for p in pairs)
    texts = collections.Counter(p[2] for p in pairs)
    kinds = all_kinds()
    assert any(caption_in("en", k) in texts for k in kinds) and any(caption_in("ru", k) in texts for k in kinds)
    assert any(caption_in("ja", k) in texts for k in kinds), "Shift_JIS pages decode to the right text"
    assert any(junk in texts for junk in JUNK_ALTS if len(junk) >= 5)
    # Duplicates: the same image and alt on several pages, and pages present in both the WAT and the WARC.
    uids = collections.Counter(p[0] for p in pairs)
    assert max(uids.values()) >= 5
    by_format = collections.defaultdict(set)
    for p in pairs:
        by_format[p[6]].add(p[3])
    assert by_format["wat"] & by_format["warc"]
    # Empty and missing alts are in the pages but never become pairs.
    assert sum(s.images_found for s in statuses) > sum(s.images_with_alt for s in statuses) + 50
