"""The ``images.status`` vocabulary: every URL ends with exactly one of these."""

from __future__ import annotations

SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"  # connection refused or reset, DNS failure, redirect loop, bad URL
HTTP_ERROR = "http_error"  # a final 4xx/5xx answer (``http_status`` says which)
TIMEOUT = "timeout"  # connect, read or total deadline passed
DISALLOWED = "disallowed"  # X-Robots-Tag opt-out (noai, noimageai, noindex, noimageindex)
BLOCKED_ADDRESS = "blocked_address"  # SSRF guard: private, loopback, link-local, multicast or reserved address
FAILED_TO_DECODE = "failed_to_decode"  # not an image Pillow can read, or a truncated one
TOO_SMALL = "too_small"  # fewer bytes than download.min_image_bytes, or a side below download.min_side
TOO_LARGE = "too_large"  # body above max_body_bytes, a side above max_side, or more pixels than max_pixels
BAD_ASPECT_RATIO = "bad_aspect_ratio"  # longer side / shorter side above download.max_aspect_ratio
NOT_IN_ARCHIVE = "not_in_archive"  # archive mode: no response record for the URL in download.archive_inputs

ALL = (
    SUCCESS,
    FAILED_TO_DOWNLOAD,
    HTTP_ERROR,
    TIMEOUT,
    DISALLOWED,
    BLOCKED_ADDRESS,
    FAILED_TO_DECODE,
    TOO_SMALL,
    TOO_LARGE,
    BAD_ASPECT_RATIO,
    NOT_IN_ARCHIVE,
)

# What ``--retry-failed`` fetches again: outcomes that another attempt (or a changed allow-list) can change.
# A verdict on the content itself (too small, too large, bad aspect ratio, an opt-out) stands.
FAILURES = (FAILED_TO_DOWNLOAD, HTTP_ERROR, TIMEOUT, FAILED_TO_DECODE, BLOCKED_ADDRESS, NOT_IN_ARCHIVE)
