"""Reports over the lake: the funnel from archives to the final dataset."""

from laion_spark.report.funnel import format_funnel, funnel_rows

__all__ = ["format_funnel", "funnel_rows"]
