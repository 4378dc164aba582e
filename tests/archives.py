"""Temporary shim while the layout moves: the writers live in laion_spark.testing.archives."""

from laion_spark.testing.archives import *  # noqa: F403
from laion_spark.testing.archives import CRAWL_DATE, HtmlPage, WatPage, html_page, truncate, wat_json  # noqa: F401
