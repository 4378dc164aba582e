"""Delta Lake's JVM jars: fetched once from Maven Central, then read from a local cache.

Nothing at run time touches the network: ``make`` runs ``python -m laion_spark.jars fetch`` during setup, and
the session builder only looks in the cache. On Databricks (Delta built in) or with ``--packages`` the cache is
not needed and not consulted.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

DELTA_VERSION = "4.0.1"
SCALA_BINARY = "2.13"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"

# (maven path, sha1) — the sha1 is checked against Maven's published .sha1 at fetch time.
DELTA_ARTIFACTS = [
    f"io/delta/delta-spark_{SCALA_BINARY}/{DELTA_VERSION}/delta-spark_{SCALA_BINARY}-{DELTA_VERSION}.jar",
    f"io/delta/delta-storage/{DELTA_VERSION}/delta-storage-{DELTA_VERSION}.jar",
]


def jars_dir() -> Path:
    """Where cached jars live: $LAION_SPARK_JARS_DIR, else ``.cache/jars`` in the project checkout."""
    override = os.environ.get("LAION_SPARK_JARS_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / ".cache" / "jars"


def cached_delta_jars() -> list[Path]:
    """The cached Delta jars, or an empty list when any is missing."""
    directory = jars_dir()
    paths = [directory / Path(artifact).name for artifact in DELTA_ARTIFACTS]
    return paths if all(p.is_file() and p.stat().st_size > 0 for p in paths) else []


def fetch_delta_jars() -> list[Path]:
    """Download the Delta jars into the cache unless already there; verify each against Maven's sha1."""
    directory = jars_dir()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for artifact in DELTA_ARTIFACTS:
        target = directory / Path(artifact).name
        if not (target.is_file() and target.stat().st_size > 0):
            url = f"{MAVEN_CENTRAL}/{artifact}"
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
            with urllib.request.urlopen(url + ".sha1", timeout=60) as response:
                expected = response.read().decode().split()[0].strip()
            actual = hashlib.sha1(data).hexdigest()
            if actual != expected:
                raise RuntimeError(f"{url}: sha1 {actual} does not match Maven Central's {expected}")
            tmp = target.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(target)
        paths.append(target)
    return paths


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m laion_spark.jars fetch")
    for path in fetch_delta_jars():
        print(path)
