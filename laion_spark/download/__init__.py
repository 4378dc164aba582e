"""Stage 3, download: candidates -> ``images``, one row per candidate, safe against hostile servers.

Fetching happens inside Spark's Python workers (``mapInPandas``), a thread pool per worker, with connect, read and
total timeouts, a body size limit, a per-host connection limit and retries with backoff for transient errors only.
Safety defaults, all on: the SSRF guard (never connect to private, loopback, link-local, multicast, reserved or
unspecified addresses, checked on the address actually connected to, after every redirect; ``allowed_hosts`` is the
only way around it) and X-Robots-Tag opt-outs (noai, noimageai, noindex, noimageindex). With ``source: archive``,
images are read from WARC response records instead of the network.
"""

from laion_spark.download import status
from laion_spark.download.archive import archive_responses, iter_image_responses, judge_archived_response
from laion_spark.download.fetch import Fetcher, FetchResult, FetchSettings, user_agent
from laion_spark.download.images import ImageSettings, ProcessedImage, process_image
from laion_spark.download.safety import (
    AllowedHost,
    address_kind,
    blocked_reason,
    parse_allow_list,
    parse_allowed_host,
    robots_disallows,
)
from laion_spark.download.stage import fetch_images, images_from_archive, mark_settled, run_download, urls_to_fetch

__all__ = [
    "AllowedHost",
    "FetchResult",
    "FetchSettings",
    "Fetcher",
    "ImageSettings",
    "ProcessedImage",
    "address_kind",
    "archive_responses",
    "blocked_reason",
    "fetch_images",
    "images_from_archive",
    "iter_image_responses",
    "judge_archived_response",
    "mark_settled",
    "parse_allow_list",
    "parse_allowed_host",
    "process_image",
    "robots_disallows",
    "run_download",
    "status",
    "urls_to_fetch",
    "user_agent",
]
