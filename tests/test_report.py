"""The HTML report (`laion-spark report`): built from a copy of the demo lake in which some pairs carry hostile
captions and URLs, then opened in headless Chromium (Debian's package, `make browser`), which loads it from a
loopback HTTP server, screenshots it, and reads it back: every section rendered, every image loaded, no script
ran, and the numbers shown are the tables' own, counted here with Spark."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import threading
from html import unescape
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from laion_spark.cli import main
from laion_spark.config import ClipConfig, ConfigError
from laion_spark.report.data import NOT_TAGGED, Grid, ReportData, SampledPair, thumbnail_data_uri
from laion_spark.report.html import SECTIONS, HtmlFragment, render_report, similarity_histogram, thumbnail_grid
from laion_spark.schemas import CANDIDATES, DATASET, EMBEDDINGS, IMAGES, REJECTIONS, STAGE_STATS
from laion_spark.score.nsfw import nsfw_tag_source
from laion_spark.storage import read_table

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "laion_spark" / "demo" / "demo.yaml"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
SCRIPT_CAPTION = "<script>window.__pwned=1</script> a hostile caption"
ATTRIBUTE_CAPTION = '"><img src=x onerror="window.__pwned=1"> another hostile caption'
HOSTILE_URL = 'javascript:window.__pwned=1//"><img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def hostile_lake(spark, demo_lake, tmp_path_factory) -> tuple[str, list[str]]:
    """A copy of the demo lake whose three best pairs carry markup in their captions and URL, and whose best pair is
    tagged NSFW (the demo's own pairs are not tagged). Returns (lake, the changed uids, best first)."""
    lake = str(tmp_path_factory.mktemp("report") / "lake")
    shutil.copytree(demo_lake.lake, lake)
    best = [r.uid for r in read_table(spark, lake, DATASET).orderBy(F.desc("similarity"), "uid").limit(3).collect()]
    edits = {
        "pairs": [
            ("text", SCRIPT_CAPTION, best[0]),
            ("text", ATTRIBUTE_CAPTION, best[1]),
            ("url", HOSTILE_URL, best[2]),
        ],
        "dataset": [("text", SCRIPT_CAPTION, best[0]), ("nsfw", "NSFW", best[0])],
        "embeddings": [("nsfw", "NSFW", best[0])],
    }
    for table, changes in edits.items():
        for column, value, uid in changes:
            spark.sql(
                f"UPDATE delta.`{lake}/{table}` SET {column} = :value WHERE uid = :uid",
                args={"value": value, "uid": uid},
            )
    return lake, best


@pytest.fixture(scope="module")
def report(hostile_lake, tmp_path_factory) -> Path:
    """The report of the hostile lake, written by the command line as a user writes it (NSFW blurred)."""
    lake, _ = hostile_lake
    out = tmp_path_factory.mktemp("report-out") / "report.html"
    assert main(["report", "--lake", lake, "--out", str(out), "--config", str(DEMO_CONFIG)]) == 0
    return out


def _serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


# The probe page holds the report in a same-origin iframe and, once everything has loaded, writes what it finds
# into its own DOM, which Chromium's --dump-dom prints. The report itself runs no script (its CSP forbids any).
PROBE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<iframe id="report" src="report.html" style="width:1280px;height:20000px"></iframe>
<script>
window.addEventListener("load", function () {
  var frame = document.getElementById("report"), doc = frame.contentDocument, win = frame.contentWindow;
  var out = {title: doc.title, pwned: !!win.__pwned, scripts: doc.querySelectorAll("script").length,
             injected: doc.querySelectorAll('img[src="x"], [onerror]').length, metrics: {}};
  out.sections = Array.from(doc.querySelectorAll("section[data-section]")).map(function (s) {
    return {id: s.id, heading: s.querySelector("h2").textContent, height: s.getBoundingClientRect().height};
  });
  out.images = Array.from(doc.images).map(function (i) {
    return {alt: i.alt, complete: i.complete, width: i.naturalWidth, filter: win.getComputedStyle(i).filter};
  });
  doc.querySelectorAll("[data-metric]").forEach(function (e) { out.metrics[e.dataset.metric] = e.textContent.trim(); });
  out.pairs = Array.from(doc.querySelectorAll("figure.pair")).map(function (f) {
    var img = f.querySelector("img");
    return {uid: f.dataset.uid, nsfw: f.dataset.nsfw, caption: f.querySelector(".caption").textContent,
            url: f.querySelector(".url").textContent, filter: img ? win.getComputedStyle(img).filter : null};
  });
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body></html>"""


def _chromium(*args: str, timeout: float = 120) -> str:
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"report-test-chromium-{os.getpid()}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return done.stdout


def _browse(report: Path, screenshot: Path) -> dict:
    """Open the report in headless Chromium: a screenshot of it, and what the probe page read from it."""
    (report.parent / "probe.html").write_text(PROBE)
    server, base = _serve(report.parent)
    try:
        _chromium("--window-size=1280,2200", f"--screenshot={screenshot}", f"{base}/{report.name}")
        dom = _chromium("--virtual-time-budget=15000", "--dump-dom", f"{base}/probe.html")
    finally:
        server.shutdown()
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe found nothing; Chromium printed: {dom[:500]}"
    return json.loads(unescape(found.group(1)))


def _number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make browser` installs Debian's package")
def test_report_in_headless_browser_renders_every_section_and_image_runs_no_script(
    spark, hostile_lake, report, tmp_path
):
    lake, (best, second, third) = hostile_lake
    screenshot = tmp_path / "report.png"
    page = _browse(report, screenshot)
    assert screenshot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    if os.environ.get("REPORT_SCREENSHOT"):  # make report-screenshot: the README's picture
        shutil.copyfile(screenshot, os.environ["REPORT_SCREENSHOT"])

    # Every section rendered, with its heading and some height.
    assert [(s["id"], s["heading"]) for s in page["sections"]] == list(SECTIONS)
    assert all(s["height"] > 50 for s in page["sections"]), page["sections"]
    # Every image loaded: charts and thumbnails, none broken.
    assert len(page["images"]) >= 10
    broken = [i["alt"][:60] for i in page["images"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"broken images: {broken}"
    # No script ran, and the markup in captions and URLs is text: shown as written, never parsed.
    assert not page["pwned"] and page["scripts"] == 0 and page["injected"] == 0
    assert page["title"].startswith("laion_spark report")
    by_uid = {p["uid"]: p for p in page["pairs"]}
    assert by_uid[best]["caption"] == SCRIPT_CAPTION
    assert by_uid[second]["caption"] == ATTRIBUTE_CAPTION
    assert by_uid[third]["url"] == HOSTILE_URL
    # NSFW thumbnails are blurred; the rest are not, and untagged pairs say so.
    assert "blur" in by_uid[best]["filter"] and by_uid[best]["nsfw"] == "NSFW"
    assert by_uid[second]["filter"] == "none" and by_uid[second]["nsfw"] == NOT_TAGGED

    # The numbers shown are the tables' own.
    metrics = {key: _number(value) for key, value in page["metrics"].items() if key != "scored"}
    dataset = read_table(spark, lake, DATASET)
    scored = read_table(spark, lake, EMBEDDINGS).where(F.col("status") == "ok")
    for name in (CANDIDATES, IMAGES, EMBEDDINGS, DATASET):
        assert metrics[f"table:{name}"] == read_table(spark, lake, name).count()
    assert _number(page["metrics"]["scored"]) == scored.count()
    for cut in (0.26, 0.28, 0.30):
        assert metrics[f"cut:{cut:.2f}"] == scored.where(F.col("similarity") >= cut).count()
    # The demo cuts at clip.threshold 0.5: the configured cut keeps exactly dataset's rows.
    assert metrics["cut:clip.threshold 0.5 (the lake's last cut)"] == dataset.count()
    # stage_stats: a handful of rows per run; the demo lake has one run.
    for row in read_table(spark, lake, STAGE_STATS).where(~F.col("step").startswith("status:")).collect():
        assert metrics[f"funnel:{row.stage}.{row.step}:in"] == row.rows_in
        assert metrics[f"funnel:{row.stage}.{row.step}:out"] == row.rows_out
    for row in read_table(spark, lake, IMAGES).groupBy("status").count().collect():
        assert metrics[f"download:{row.status}"] == row["count"]
    for row in read_table(spark, lake, CANDIDATES).groupBy("language").count().collect():
        assert metrics[f"language:{row.language}:candidates"] == row["count"]
    for row in read_table(spark, lake, REJECTIONS).groupBy("stage", "step").count().collect():
        assert metrics[f"rejections:{row.stage}.{row.step}"] == row["count"]
    # The demo's tiny model makes no NSFW tag (clip.nsfw_tags: none): all but the one tagged here are "not tagged".
    assert metrics["nsfw:NSFW"] == 1
    assert metrics[f"nsfw:{NOT_TAGGED}"] == dataset.count() - 1 == dataset.where(F.col("nsfw").isNull()).count()


def test_show_nsfw_unblurs_tagged_thumbnails_and_captions_are_escaped():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(buffer, format="PNG")
    thumbnail = thumbnail_data_uri(buffer.getvalue())
    tagged = SampledPair("u1", text=SCRIPT_CAPTION, url=HOSTILE_URL, similarity=0.31, nsfw="NSFW", thumbnail=thumbnail)
    data = ReportData(lake="<lake>", generated_at="now", grids=[Grid("top", "Top", "the best", [tagged])])

    blurred, shown = render_report(data), render_report(data, show_nsfw=True)
    assert 'class="thumb nsfw-blur"' in blurred and 'nsfw-blur"' not in shown and 'class="thumb"' in shown
    for page in (blurred, shown):
        assert "<script>window" not in page and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
        assert 'src="x"' not in page and "<lake>" not in page


def test_bad_image_bytes_make_no_thumbnail_instead_of_failing():
    assert thumbnail_data_uri(b"not an image") is None and thumbnail_data_uri(None) is None


def test_the_cut_shown_is_the_lakes_last_even_when_the_report_is_given_another_config(spark, demo_lake, tmp_path):
    """A lake re-cut with `laion-spark dataset` at another threshold: the report, given the demo's config (0.5),
    marks the threshold the dataset table was cut at (recorded in runs), and that cut keeps dataset's rows."""
    import copy

    from laion_spark.report.data import CONFIGURED, LAKE_CUT, lake_cut_config, report_data
    from laion_spark.score import rebuild_dataset

    lake = str(tmp_path / "lake")
    shutil.copytree(demo_lake.lake, lake)
    recut = copy.deepcopy(demo_lake.config)
    recut.clip.threshold = 0.55
    rebuild_dataset(spark, recut, lake)
    recorded, source = lake_cut_config(spark, lake, demo_lake.config)
    assert source == LAKE_CUT and recorded.clip.threshold == 0.55 and demo_lake.config.clip.threshold == 0.5
    data = report_data(spark, demo_lake.config, lake)
    assert data.cut.label == f"clip.threshold 0.55 ({LAKE_CUT})"
    assert (
        data.cut.kept == read_table(spark, lake, DATASET).count() < read_table(spark, demo_lake.lake, DATASET).count()
    )
    # A lake without runs (written before the runs table): the config given is the cut shown.
    shutil.rmtree(Path(lake) / "runs")
    assert lake_cut_config(spark, lake, demo_lake.config) == (demo_lake.config, CONFIGURED)


def test_notebook_helpers_draw_the_histogram_and_a_grid(spark, demo_lake):
    figure = similarity_histogram(spark, demo_lake.lake, demo_lake.config)
    (axes,) = figure.axes
    scored = read_table(spark, demo_lake.lake, EMBEDDINGS).where(F.col("status") == "ok")
    assert sum(bar.get_height() for bar in axes.patches) == scored.count()
    grid = thumbnail_grid(spark, demo_lake.lake, "top", demo_lake.config, size=4)
    assert isinstance(grid, HtmlFragment) and grid._repr_html_() == str(grid)
    assert grid.count('<figure class="pair"') == 4 and grid.count("data:image/jpeg;base64,") == 4
    with pytest.raises(ValueError, match="which must be one of"):
        thumbnail_grid(spark, demo_lake.lake, "everything")


def test_nsfw_tags_auto_makes_none_for_random_weights_and_detector_needs_weights():
    clip = ClipConfig()
    assert nsfw_tag_source(clip.nsfw_tags, clip.pretrained, "") == "zero_shot"  # LAION's method for real weights
    assert nsfw_tag_source("auto", "", "") == "none"  # random weights: their tags would be noise
    assert nsfw_tag_source("none", clip.pretrained, "") == "none"
    with pytest.raises(ConfigError, match="nsfw_detector_path"):
        nsfw_tag_source("detector", clip.pretrained, "")
    with pytest.raises(ConfigError, match="clip.nsfw_tags"):
        nsfw_tag_source("sometimes", clip.pretrained, "")
