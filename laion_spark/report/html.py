"""``laion-spark report``: one self-contained HTML file that shows a lake to the people who cut a dataset from it.

The numbers come from :func:`~laion_spark.report.data.report_data` (Spark aggregations and small samples), the
charts from matplotlib (:mod:`laion_spark.report.plots`), the page from a Jinja2 template
(``templates/report.html.j2``) with autoescaping on: captions and URLs come from the open web, and some carry
markup. The page has no script of its own and forbids any (a Content-Security-Policy meta tag), and every image
is a data: URI, so it opens anywhere with no network.

Two helpers are for notebooks, one line each: :func:`similarity_histogram` (a matplotlib Figure) and
:func:`thumbnail_grid` (HTML that Jupyter displays as it is, or through ``IPython.display.HTML``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import functions as F

from laion_spark.config import Config
from laion_spark.report import plots
from laion_spark.report.data import (
    GRID_SIZE,
    GRIDS,
    ReportData,
    configured_cut,
    report_data,
    sample_grids,
    similarity_buckets,
    similarity_cuts,
)
from laion_spark.score.scoring import OK

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pyspark.sql import SparkSession

# Every section of the page, in order: (id, heading). The browser test checks that each one rendered.
SECTIONS = (
    ("funnel", "Funnel"),
    ("similarity", "Similarity and the cut"),
    ("languages", "Languages"),
    ("downloads", "Download outcomes"),
    ("image-sizes", "Image sizes and aspect ratios"),
    ("nsfw", "NSFW tags"),
    ("curation", "Near duplicates and decontamination"),
    ("samples", "What the pairs look like"),
)


class HtmlFragment(str):
    """A piece of HTML: a str that Jupyter renders as HTML (``_repr_html_``), also accepted by
    ``IPython.display.HTML``."""

    def _repr_html_(self) -> str:
        return str(self)


@functools.cache
def _templates() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape=True for every template: captions, URLs and rejection details are text from the open web.
    environment = Environment(
        loader=PackageLoader("laion_spark.report", "templates"), autoescape=True, undefined=StrictUndefined
    )
    environment.filters["thousands"] = lambda n: f"{n:,}" if n is not None else "-"
    environment.filters["percent"] = lambda part, whole: f"{100.0 * part / whole:.1f}%" if whole else "-"
    environment.filters["score"] = lambda s: "-" if s is None else f"{s:.4f}"
    return environment


def _charts(data: ReportData) -> dict[str, str]:
    """Chart name -> PNG data URI, for the sections that have data."""
    charts = {}

    def add(name: str, figure: Figure) -> None:
        charts[name] = plots.figure_data_uri(figure)

    steps = [step for step in data.funnel]
    if steps:
        add("funnel", plots.funnel_figure(steps))
    if data.similarity_buckets:
        add("similarity", plots.similarity_figure(data.similarity_buckets, data.cut, data.alternatives))
    if data.languages:
        labels = [lang for lang, _, _ in data.languages]
        series = [("candidates", [c for _, c, _ in data.languages]), ("dataset", [d for _, _, d in data.languages])]
        add("languages", plots.bar_figure(labels, series, "Languages (lingua)", rotate=len(labels) > 8))
    if data.download_statuses:
        labels = [status for status, _ in data.download_statuses]
        add("downloads", plots.bar_figure(labels, [("images", [n for _, n in data.download_statuses])],
                                          "Download outcomes", rotate=True))  # fmt: skip
    if data.failing_hosts:
        labels = [host for host, _, _ in data.failing_hosts]
        series = [("failed", [f for _, f, _ in data.failing_hosts]), ("fetched", [t for _, _, t in data.failing_hosts])]
        add("hosts", plots.bar_figure(labels, series, "Hosts with the most failed downloads", rotate=True))
    if data.side_buckets:
        labels = [f"{side}+" for side, _ in data.side_buckets]
        add("sides", plots.bar_figure(labels, [("images", [n for _, n in data.side_buckets])],
                                      "Longer side of the original image (px)", xlabel="pixels"))  # fmt: skip
    if data.aspect_buckets:
        labels = [f"{2**aspect:.2f}" for aspect, _ in data.aspect_buckets]
        add("aspects", plots.bar_figure(labels, [("images", [n for _, n in data.aspect_buckets])],
                                        "Aspect ratio (width / height), from", rotate=len(labels) > 10))  # fmt: skip
    if data.nsfw_tags:
        labels = [tag for tag, _ in data.nsfw_tags]
        add("nsfw", plots.bar_figure(labels, [("dataset", [n for _, n in data.nsfw_tags])], "NSFW tags in dataset"))
    if data.punsafe_buckets:
        labels = [f"{lower:.2f}" for lower, _ in data.punsafe_buckets]
        add("punsafe", plots.bar_figure(labels, [("dataset", [n for _, n in data.punsafe_buckets])],
                                        "punsafe (LAION's NSFW detector), from", rotate=True))  # fmt: skip
    return charts


def render_report(data: ReportData, show_nsfw: bool = False) -> str:
    """The report page for ``data``: one HTML document, charts and thumbnails embedded."""
    template = _templates().get_template("report.html.j2")
    return template.render(data=data, charts=_charts(data), sections=SECTIONS, show_nsfw=show_nsfw)


def write_report(spark: SparkSession, config: Config, lake: str, out: str | Path, show_nsfw: bool = False) -> Path:
    """Build the report of ``lake`` (cuts as ``config`` sets them) and write it to ``out``; returns its path."""
    html = render_report(report_data(spark, config, lake), show_nsfw=show_nsfw)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path.resolve()


def similarity_histogram(spark: SparkSession, lake: str, config: Config | None = None) -> Figure:
    """The similarity histogram of every scored pair, with the configured cut and the alternatives marked."""
    from laion_spark.schemas import EMBEDDINGS
    from laion_spark.storage import read_table

    pool = read_table(spark, lake, EMBEDDINGS).where(F.col("status") == OK).select("uid", "similarity")
    _, cut, alternatives = similarity_cuts(pool, config or Config())
    return plots.similarity_figure(similarity_buckets(pool), cut, alternatives)


def thumbnail_grid(
    spark: SparkSession,
    lake: str,
    which: str = "top",
    config: Config | None = None,
    size: int = GRID_SIZE,
    show_nsfw: bool = False,
) -> HtmlFragment:
    """Thumbnails with captions and scores: ``which`` is top (the highest similarity in dataset), above_cut,
    below_cut (around the configured cut) or rejected (a sample of each rejection reason)."""
    if which not in GRIDS:
        raise ValueError(f"thumbnail_grid: which must be one of {', '.join(GRIDS)}, got {which!r}")
    grids = sample_grids(spark, lake, config or Config(), (which,), size=size)
    template = _templates().get_template("grid.html.j2")
    return HtmlFragment(template.render(grids=grids, show_nsfw=show_nsfw, standalone=True))


__all__ = [
    "SECTIONS",
    "HtmlFragment",
    "configured_cut",
    "render_report",
    "similarity_buckets",
    "similarity_histogram",
    "thumbnail_grid",
    "write_report",
]
