"""Listing files on any URI Spark can read (local, s3a://, abfss://, dbfs:/, hdfs://): one place for it.

Listings go through Spark's ``binaryFile`` source with only its ``path`` and ``length`` columns selected, which
lists files without reading them: a DataFrame API, so it works on Spark Connect too (where the JVM's Hadoop
classes are out of reach). Spark's listing skips names that start with ``_`` or ``.`` (its hidden files).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


def listing(spark: SparkSession, paths: str | Sequence[str]) -> DataFrame:
    """(path, length) of every file that ``paths`` (files, directories or Hadoop globs) name; lazy."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return spark.read.format("binaryFile").load(paths).select("path", "length")


def glob_files(spark: SparkSession, pattern: str) -> list[str]:
    """The files ``pattern`` (a file, a directory's files, or a Hadoop glob) matches, sorted; [] for none."""
    try:
        # A listing of names, not data: collecting it is what the driver needs to plan one task per file.
        rows = listing(spark, pattern).select("path").collect()
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
            return []
        raise
    return sorted(local_spelling(row.path) for row in rows)


def existing_files(spark: SparkSession, paths: Sequence[str]) -> dict[str, str]:
    """``{path as given: path as Spark's readers name it}`` for each given path that is a file.

    One listing job for all of them; only when some path is missing does it look at them one by one. A
    directory is not a file: it maps to nothing.
    """
    if not paths:
        return {}
    try:
        rows = listing(spark, paths).collect()  # names and sizes only
    except AnalysisException as exc:
        if not _is_missing_path(exc):
            raise
        if len(paths) == 1:
            return {}
        found: dict[str, str] = {}
        for path in paths:
            found.update(existing_files(spark, [path]))
        return found
    given = {_file_key(path): path for path in paths}
    return {given[_file_key(row.path)]: row.path for row in rows if _file_key(row.path) in given}


def local_spelling(path: str) -> str:
    """``file:/a/b`` as ``/a/b``: one name per local file whoever listed it (Python on a classic driver, Spark's
    listing on Spark Connect), so that ``source_file`` and the ingest log agree across both."""
    if urlsplit(path).scheme.lower() == "file":
        return os.path.normpath(urlsplit(path).path)
    return path


def _is_missing_path(exc: AnalysisException) -> bool:
    return "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc).lower()


def _file_key(path: str) -> str:
    """One spelling per local file (``/a/b``, ``file:/a/b`` and ``file:///a/b`` agree); other URIs as they are."""
    scheme = urlsplit(path).scheme.lower()
    if scheme == "file":
        return os.path.normpath(urlsplit(path).path)
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter
        return os.path.normpath(os.path.abspath(path))
    return path


@contextlib.contextmanager
def cleanup_afterwards(cleanup: Callable[[], object], what: str) -> Iterator[None]:
    """Run ``cleanup`` when the block ends, however it ends. A cleanup that fails is logged, never raised: it
    must not replace the block's own exception (the real error), and a leftover is not worth failing a run for."""
    try:
        yield
    finally:
        try:
            cleanup()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("could not clean up %s: %s: %s", what, type(exc).__name__, exc)
