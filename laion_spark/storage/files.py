"""Filesystem operations on any URI Spark can read (local, s3a://, abfss://, dbfs:/, hdfs://): one place for them.

Listing, existence and deletion go through the JVM's Hadoop FileSystem here, so whatever the user's Spark can
read works without code changes. That needs a classic SparkSession (``sparkContext``); everything else in the
library uses DataFrame/SQL APIs only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    path: str  # fully qualified URI, as Spark's readers name the file
    is_dir: bool


def _hadoop_fs(spark: SparkSession, uri: str):
    """(Hadoop Path, FileSystem) for ``uri``: the one classic-only entry point into the JVM."""
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(uri)
    return hadoop_path, hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def glob_files(spark: SparkSession, pattern: str) -> list[FileEntry]:
    """What ``pattern`` (a path or a Hadoop glob) matches; an empty list when nothing does."""
    hadoop_path, fs = _hadoop_fs(spark, pattern)
    statuses = fs.globStatus(hadoop_path)
    return [FileEntry(str(s.getPath().toString()), bool(s.isDirectory())) for s in statuses or []]


def list_directory(spark: SparkSession, directory: str) -> list[str]:
    """The files (not sub-directories) directly inside ``directory``, sorted."""
    hadoop_path, fs = _hadoop_fs(spark, directory)
    return sorted(str(child.getPath().toString()) for child in fs.listStatus(hadoop_path) if child.isFile())


def qualified_file(spark: SparkSession, path: str) -> str | None:
    """``path`` fully qualified as Spark's readers report it, or None when no file is there."""
    hadoop_path, fs = _hadoop_fs(spark, path)
    if not fs.exists(hadoop_path):
        return None
    return str(fs.makeQualified(hadoop_path).toString())


def delete_path(spark: SparkSession, path: str) -> None:
    """Remove ``path`` recursively; a path that is already gone is fine."""
    hadoop_path, fs = _hadoop_fs(spark, path)
    fs.delete(hadoop_path, True)


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


def deleted_afterwards(spark: SparkSession, path: str) -> contextlib.AbstractContextManager[None]:
    """Delete ``path`` (a staging folder) when the block ends, without ever hiding the block's exception."""
    return cleanup_afterwards(lambda: delete_path(spark, path), path)
