"""Files that Spark tasks write outside Delta: export shards and kNN index shards.

They are opened by URI through pyarrow's filesystems, from the driver or from a Python worker alike (plain
paths, ``file://``, ``s3://`` / ``s3a://``, ``gs://``, ``hdfs://``, ``dbfs:/`` through its FUSE mount), and are
published atomically: a reader sees the whole file under its final name, or no file at all.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

# Hadoop spellings of object stores -> pyarrow's.
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
# Object stores publish a file when its upload completes: writing under the final name is already atomic, and a
# rename would be a copy.
_ATOMIC_PUT = {"s3", "gcs"}
TEMPORARY_PREFIX = ".tmp-"


@dataclass(frozen=True)
class OutputDir:
    """A directory that Python code writes files into; picklable (it holds the URI, not an open filesystem)."""

    uri: str

    @property
    def _resolved(self) -> tuple[Any, str]:
        return resolve(self.uri)

    @property
    def filesystem(self) -> Any:
        return self._resolved[0]

    @property
    def root(self) -> str:
        return self._resolved[1]

    def path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def uri_of(self, *names: str) -> str:
        return "/".join([self.uri.rstrip("/"), *names])

    def makedirs(self, *names: str) -> None:
        self.filesystem.create_dir(self.path(*names), recursive=True)

    def exists(self, *names: str) -> bool:
        from pyarrow import fs as pafs

        return self.filesystem.get_file_info(self.path(*names)).type != pafs.FileType.NotFound

    def list(self, *names: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly in ``names``, sorted; temporaries are left out."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.path(*names), allow_not_found=True)
        found = [
            info.base_name
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.endswith(suffix)
        ]
        return sorted(name for name in found if not name.startswith(TEMPORARY_PREFIX))

    def read_bytes(self, *names: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(*names)) as stream:
            return stream.read()

    def publish(self, name: str, write: Callable[[IO[bytes]], None]) -> None:
        """Write ``name`` (a path relative to this directory) with ``write(stream)``, atomically."""
        publish(self.filesystem, self.path(name), write, atomic_put=self._atomic_put)

    def publish_bytes(self, name: str, payload: bytes) -> None:
        self.publish(name, lambda stream: stream.write(payload))

    def delete(self, *names: str) -> None:
        from pyarrow import fs as pafs

        path = self.path(*names)
        info = self.filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            self.filesystem.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(path)

    def remove_temporaries(self, *names: str) -> int:
        """Delete the temporaries a killed writer left in ``names``; returns how many."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.path(*names), allow_not_found=True)
        stale = [
            info.path
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.startswith(TEMPORARY_PREFIX)
        ]
        for path in stale:
            self.filesystem.delete_file(path)
        return len(stale)

    @property
    def _atomic_put(self) -> bool:
        return _scheme(self.uri) in _ATOMIC_PUT

    def local_path(self) -> str | None:
        """The directory as a local path, when it is one (for libraries that only take paths)."""
        from pyarrow import fs as pafs

        return self.root if isinstance(self.filesystem, pafs.LocalFileSystem) else None


def resolve(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for ``uri``."""
    from pyarrow import fs as pafs

    scheme = _scheme(uri)
    if scheme in ("", "file"):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if scheme == "dbfs":  # Databricks mounts DBFS on every node at /dbfs
        return pafs.LocalFileSystem(), "/dbfs/" + uri.split(":", 1)[1].lstrip("/")
    canonical = _SCHEME_ALIASES.get(scheme, scheme) + uri[len(scheme) :]
    filesystem, path = pafs.FileSystem.from_uri(canonical)
    return filesystem, path


def publish(filesystem: Any, path: str, write: Callable[[IO[bytes]], None], atomic_put: bool = False) -> None:
    """Write ``path`` with ``write(stream)`` so that no reader ever sees it half-written.

    A temporary beside it (same directory, so the rename stays on one filesystem) is renamed over the final name
    once complete; on an object store the upload itself is atomic. A failed write leaves no file behind.
    """
    parent, _, name = path.rpartition("/")
    filesystem.create_dir(parent, recursive=True)
    if atomic_put:
        with filesystem.open_output_stream(path) as stream:
            write(stream)
        return
    temporary = f"{parent}/{TEMPORARY_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
    try:
        with filesystem.open_output_stream(temporary) as stream:
            write(stream)
        filesystem.move(temporary, path)
    except BaseException:
        try:
            filesystem.delete_file(temporary)
        except OSError:
            pass
        raise


def iter_chunks(stream: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    if sep and head.isalnum():
        return head.lower()
    if uri.startswith("dbfs:/"):
        return "dbfs"
    return ""
