"""Stage 1: web archives (WAT, WARC, ARC) -> ``pairs`` (image URL + alt text) and ``ingest_log``."""

from laion_spark.extract.archive import ArchiveRecord, DamagedArchive, NotAnArchive, iter_records, sniff_format
from laion_spark.extract.inputs import list_input_files, open_input, python_can_open
from laion_spark.extract.stage import (
    ExtractResult,
    extract_dataframe,
    ingest_log_from_output,
    pairs_from_output,
    run_extract,
)
from laion_spark.extract.text import clean_alt_text, normalize_text, text_key
from laion_spark.extract.urls import (
    PageUrlResolver,
    allowed_image_url,
    has_allowed_scheme,
    normalize_url,
    pair_uid,
    resolve_url,
)
from laion_spark.extract.warc_html import decode_html, parse_html_page
from laion_spark.extract.wat import parse_wat_record
from laion_spark.extract.worker import OUTPUT_SCHEMA, ExtractRules, FileStatus, extract_file, extract_pairs

__all__ = [
    "OUTPUT_SCHEMA",
    "PageUrlResolver",
    "ArchiveRecord",
    "DamagedArchive",
    "ExtractResult",
    "ExtractRules",
    "FileStatus",
    "NotAnArchive",
    "allowed_image_url",
    "clean_alt_text",
    "decode_html",
    "extract_dataframe",
    "extract_file",
    "extract_pairs",
    "has_allowed_scheme",
    "ingest_log_from_output",
    "iter_records",
    "list_input_files",
    "normalize_text",
    "normalize_url",
    "open_input",
    "pair_uid",
    "pairs_from_output",
    "parse_html_page",
    "parse_wat_record",
    "python_can_open",
    "resolve_url",
    "run_extract",
    "sniff_format",
    "text_key",
]
