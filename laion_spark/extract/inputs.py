"""Input listing on the driver (paths, globs, manifests; never file contents) and file opening in workers.

Local paths and ``file://`` URIs are listed with Python on a classic session; every other scheme, and every path
on Spark Connect (whose driver is a client that does not see the cluster's files), through Spark's own listing
(``storage.files``), so whatever the user's Spark can read (s3a://, abfss://, dbfs:/, hdfs://) lists unchanged.
Workers open local paths directly, ``dbfs:/x`` as ``/dbfs/x`` where that FUSE mount exists, and other schemes
with fsspec; files that Python cannot open are read through Spark's ``binaryFile`` source instead (see stage.py).
"""

from __future__ import annotations

import glob
import gzip
import os
from typing import BinaryIO
from urllib.parse import urlsplit

from pyspark.sql import SparkSession

from laion_spark.session import is_connect
from laion_spark.storage.files import glob_files

MANIFEST_SUFFIXES = (".paths", ".paths.gz", ".txt", ".txt.gz", ".lst", ".manifest", ".manifest.gz")
# Hadoop scheme -> fsspec protocol, where the names differ.
FSSPEC_PROTOCOLS = {"s3a": "s3", "s3n": "s3", "abfss": "abfs", "wasbs": "abfs", "gs": "gcs"}
# Schemes that fsspec may claim but whose Python clients rarely work outside the cluster's own JVM setup.
JVM_ONLY_SCHEMES = {"hdfs", "viewfs", "wasb"}
_GLOB_CHARS = set("*?[{")
_READ_BUFFER = 1 << 20


def scheme_of(path: str) -> str:
    scheme = urlsplit(path).scheme.lower()
    return "" if len(scheme) == 1 else scheme  # a Windows drive letter is not a scheme


def is_local(path: str) -> bool:
    return scheme_of(path) in ("", "file")


def local_path(path: str) -> str | None:
    """The local filesystem path Python can open for ``path``, if there is one."""
    scheme = scheme_of(path)
    if scheme == "":
        return path
    if scheme == "file":
        return urlsplit(path).path
    if scheme == "dbfs" and os.path.isdir("/dbfs"):
        return "/dbfs/" + urlsplit(path).path.lstrip("/")
    return None


def python_can_open(path: str) -> bool:
    """Whether a Python worker can stream ``path`` itself (else it goes through Spark's binaryFile source)."""
    if local_path(path) is not None:
        return True
    scheme = scheme_of(path)
    if scheme in JVM_ONLY_SCHEMES:
        return False
    try:
        import fsspec

        fsspec.get_filesystem_class(FSSPEC_PROTOCOLS.get(scheme, scheme))
    except (ImportError, ValueError):
        return False
    return True


def open_input(path: str) -> BinaryIO:
    """A buffered binary stream over ``path``; raises OSError (FileNotFoundError, PermissionError, ...)."""
    local = local_path(path)
    if local is not None:
        return open(local, "rb", buffering=_READ_BUFFER)  # the caller closes it
    import fsspec

    scheme = scheme_of(path)
    protocol = FSSPEC_PROTOCOLS.get(scheme, scheme)
    url = protocol + path[len(scheme) :] if protocol != scheme else path
    return fsspec.open(url, "rb", block_size=_READ_BUFFER).open()


def list_input_files(spark: SparkSession, inputs: list[str], manifest_prefix: str = "") -> list[str]:
    """Expand paths, globs, directories and manifests into a de-duplicated, ordered list of files.

    A literal path that does not exist is kept (it is logged as failed, like an unreadable file); a glob that
    matches nothing is an error, since it is almost always a typo.
    """
    files: list[str] = []
    for item in inputs:
        item = item.strip()
        if not item:
            continue
        if _is_manifest(item):
            files.extend(_read_manifest(spark, item, manifest_prefix))
        elif is_local(item) and not is_connect(spark):
            files.extend(_list_local(item))
        else:
            files.extend(_list_with_spark(spark, item))
    return list(dict.fromkeys(files))


def _is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_SUFFIXES)


def _has_glob(path: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in path)


def _list_local(item: str) -> list[str]:
    path = local_path(item) or item
    if _has_glob(path):
        matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"--input {item}: no files match this pattern")
        return [os.path.abspath(p) for p in matches]
    if os.path.isdir(path):
        return sorted(
            os.path.abspath(os.path.join(path, name)) for name in os.listdir(path) if not name.startswith(".")
        )
    return [os.path.abspath(path)]


def _list_with_spark(spark: SparkSession, item: str) -> list[str]:
    files = glob_files(spark, item)
    if not files:
        if _has_glob(item):
            raise FileNotFoundError(f"--input {item}: no files match this pattern")
        return [item]
    return files


def _read_manifest(spark: SparkSession, manifest: str, manifest_prefix: str) -> list[str]:
    # On Spark Connect the driver is a client whose files are not the cluster's: the server reads the manifest.
    local = None if is_connect(spark) else local_path(manifest)
    if local is not None:
        if not os.path.exists(local):
            raise FileNotFoundError(f"manifest {manifest} does not exist")
        with open(local, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8", "replace").splitlines()
        default_prefix = os.path.dirname(os.path.abspath(local))
    else:
        # A manifest is a listing, not archive content: reading its lines on the driver is expected.
        lines = [row.value for row in spark.read.text(manifest).collect()]
        default_prefix = manifest.rsplit("/", 1)[0]
    prefix = manifest_prefix or default_prefix
    files = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if scheme_of(entry) or entry.startswith("/"):
            files.append(os.path.abspath(entry) if is_local(entry) and not entry.startswith("file:") else entry)
        else:
            files.append(prefix.rstrip("/") + "/" + entry)
    return files
