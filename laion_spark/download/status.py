"""The ``images.status`` vocabulary: every URL ends with exactly one of these."""

from __future__ import annotations

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"  # connection refused or reset, DNS failure, redirect loop, bad URL
HTTP_ERROR = "http_error"  # a final 4xx/5xx answer (``http_status`` says which)
TIMEOUT = "timeout"  # connect, read or total deadline passed
DISALLOWED = "disallowed"  # opt-out: X-Robots-Tag (noai, noml, noimageai, noindex, noimageindex), robots.txt, TDMRep
BLOCKED_ADDRESS = "blocked_address"  # SSRF guard: private, loopback, link-local, multicast or reserved address
HOST_GIVEN_UP = "host_given_up"  # the host failed download.host_failure_limit URLs in a row: no request made
FAILED_TO_DECODE = "failed_to_decode"  # not an image Pillow can read, or a truncated one
TOO_SMALL = "too_small"  # fewer bytes than download.min_image_bytes, or a side below download.min_side
TOO_LARGE = "too_large"  # body above max_body_bytes, a side above max_side, or more pixels than max_pixels
BAD_ASPECT_RATIO = "bad_aspect_ratio"  # longer side / shorter side above download.max_aspect_ratio
NOT_IN_ARCHIVE = "not_in_archive"  # archive mode: no response record for the URL in download.archive_inputs
REMOVED = "removed"  # the body's sha256, md5 or pHash is in the lake's takedown list (`removals`): no bytes kept

ALL = (
    SUCCESS,
    FAILED_TO_DOWNLOAD,
    HTTP_ERROR,
    TIMEOUT,
    DISALLOWED,
    BLOCKED_ADDRESS,
    HOST_GIVEN_UP,
    FAILED_TO_DECODE,
    TOO_SMALL,
    TOO_LARGE,
    BAD_ASPECT_RATIO,
    NOT_IN_ARCHIVE,
    REMOVED,
)

# What ``--retry-failed`` fetches again: outcomes that another attempt (or a changed allow-list) can change.
# A verdict on the content itself (too small, too large, bad aspect ratio, an opt-out) stands.
FAILURES = (FAILED_TO_DOWNLOAD, HTTP_ERROR, TIMEOUT, FAILED_TO_DECODE, BLOCKED_ADDRESS, HOST_GIVEN_UP, NOT_IN_ARCHIVE)
