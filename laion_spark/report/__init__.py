"""Reports over the lake: the funnel from archives to the final dataset, and the HTML report (``laion-spark report``)
with the notebook helpers ``similarity_histogram`` and ``thumbnail_grid``."""

from laion_spark.lazy import lazy_attributes
from laion_spark.report.funnel import format_funnel, funnel_rows

# The HTML report loads on first use: it brings Jinja2 and matplotlib (the `report` extra), which the funnel needs not.
_LAZY = {
    "HtmlFragment": "laion_spark.report.html",
    "render_report": "laion_spark.report.html",
    "similarity_histogram": "laion_spark.report.html",
    "thumbnail_grid": "laion_spark.report.html",
    "write_report": "laion_spark.report.html",
    "ReportData": "laion_spark.report.data",
    "report_data": "laion_spark.report.data",
}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "HtmlFragment",
    "ReportData",
    "format_funnel",
    "funnel_rows",
    "render_report",
    "report_data",
    "similarity_histogram",
    "thumbnail_grid",
    "write_report",
]
