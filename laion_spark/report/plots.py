"""The report's charts, drawn with matplotlib from :class:`~laion_spark.report.data.ReportData` (already small), and
embedded in the HTML as PNG data URIs so that the file opens with no network.

matplotlib is imported on first use, with the non-interactive Agg backend: a report is built on a driver or a
server, with no display.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from laion_spark.report.data import Cut, FunnelStep

KEPT_COLOR = "#2b6cb0"
DROPPED_COLOR = "#e2a03f"
CUT_COLOR = "#c53030"
ALTERNATIVE_COLOR = "#4a5568"
ALTERNATIVE_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # one per alternative cut, told apart in the legend
WIDTH_IN = 8.0


def _figure(height_in: float = 3.2) -> tuple[Figure, Any]:
    # Figure objects, not pyplot: no global state, nothing kept alive after the figure is saved.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, height_in), dpi=100, layout="constrained")
    return figure, figure.subplots()


def figure_data_uri(figure: Figure) -> str:
    """The figure as a PNG ``data:`` URI, for an ``<img src>`` in a self-contained page."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def funnel_figure(steps: Sequence[FunnelStep]) -> Figure:
    """Rows in and out of every step, first step at the top; the gap between the bars is what the step dropped."""
    figure, axes = _figure(max(2.0, 0.32 * len(steps) + 1.0))
    names = [step.name for step in steps]
    positions = list(range(len(steps)))[::-1]
    axes.barh(positions, [s.rows_in for s in steps], color=DROPPED_COLOR, label="rows in (dropped part)")
    axes.barh(positions, [s.rows_out for s in steps], color=KEPT_COLOR, label="rows out")
    axes.set_yticks(positions, names, fontsize=8)
    axes.set_xlabel("rows")
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Funnel: rows in and out of every step")
    return figure


def similarity_figure(buckets: Sequence[tuple[float, int]], cut: Cut | None, alternatives: Sequence[Cut]) -> Figure:
    """The similarity histogram, with the configured cut (solid) and the alternative cuts (dashed) marked."""
    from laion_spark.report.data import SIMILARITY_BUCKET

    figure, axes = _figure(3.4)
    axes.bar(
        [lower for lower, _ in buckets],
        [rows for _, rows in buckets],
        width=SIMILARITY_BUCKET,
        align="edge",
        color=KEPT_COLOR,
    )
    if cut is not None and cut.similarity is not None:
        axes.axvline(cut.similarity, color=CUT_COLOR, linewidth=2, label=f"{cut.label}: {cut.kept:,} kept")
    # The alternatives are named in the legend, not beside their lines: cuts 0.02 apart left their labels on top
    # of each other.
    for alternative, style in zip(alternatives, ALTERNATIVE_STYLES * len(alternatives), strict=False):
        if alternative.similarity is not None:
            axes.axvline(
                alternative.similarity,
                color=ALTERNATIVE_COLOR,
                linestyle=style,
                linewidth=1,
                label=f"{alternative.label}: {alternative.kept:,} kept",
            )
    if axes.get_legend_handles_labels()[0]:
        tallest = max((rows for _, rows in buckets), default=0)
        axes.set_ylim(top=max(1.0, tallest * 1.6))  # room above the bars for the legend
        axes.legend(loc="upper left", fontsize=7)
    axes.set_xlabel("CLIP similarity (image, alt text)")
    axes.set_ylabel("scored pairs")
    axes.set_title("Similarity of every scored pair")
    return figure


def bar_figure(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[int]]],
    title: str,
    xlabel: str = "",
    ylabel: str = "rows",
    rotate: bool = False,
) -> Figure:
    """Grouped bars: one group per label, one bar per (name, values) series."""
    figure, axes = _figure(3.0)
    count = max(1, len(series))
    width = 0.8 / count
    colors = [KEPT_COLOR, DROPPED_COLOR, ALTERNATIVE_COLOR]
    for i, (name, values) in enumerate(series):
        offsets = [x + (i - (count - 1) / 2) * width for x in range(len(labels))]
        axes.bar(offsets, values, width=width, label=name, color=colors[i % len(colors)])
    axes.set_xticks(range(len(labels)), labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    axes.tick_params(axis="x", labelsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if count > 1:
        axes.legend(fontsize=8)
    return figure


__all__ = ["bar_figure", "figure_data_uri", "funnel_figure", "similarity_figure"]
