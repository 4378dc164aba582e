"""Delta Lake's JVM jars, and the object-store connectors a local session may add: fetched once from Maven
Central, then read from a local cache.

Nothing at run time touches the network: ``make`` runs ``python -m laion_spark.jars fetch --connector s3``
during setup, and the session builder only looks in the cache. On Databricks (Delta built in), EMR (S3 built
in) or with ``--packages`` the cache is not needed and not consulted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import urllib.request
from pathlib import Path

DELTA_VERSION = "4.0.1"
SCALA_BINARY = "2.13"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"

# Maven paths; each jar's sha1 is checked against Maven Central's published .sha1 at fetch time.
DELTA_ARTIFACTS = [
    f"io/delta/delta-spark_{SCALA_BINARY}/{DELTA_VERSION}/delta-spark_{SCALA_BINARY}-{DELTA_VERSION}.jar",
    f"io/delta/delta-storage/{DELTA_VERSION}/delta-storage-{DELTA_VERSION}.jar",
]

# hadoop-aws must be the exact version of pyspark's own Hadoop (pyspark 4.0.1 ships hadoop-client-api-3.4.1.jar).
HADOOP_VERSION = "3.4.1"
# hadoop-aws 3.4.1 depends on the AWS SDK v2 `bundle` jar: 558 MB, every AWS service shaded in. S3A loads only
# the modules below (8.7 MB), resolved with `mvn dependency:copy-dependencies` over hadoop-aws with the bundle
# excluded and software.amazon.awssdk:s3-transfer-manager added; Netty, httpclient, httpcore, commons-codec and
# slf4j are left out because pyspark's jars already hold them. Hadoop 3.4.1 builds against SDK 2.24.6, whose
# s3-transfer-manager was never published on Maven Central; 2.24.8 is the nearest release that has every module,
# and tests/test_object_store.py runs extract and candidates with these jars against a real S3 API.
AWS_SDK_VERSION = "2.24.8"
_AWS_SDK_SHA1 = {
    "annotations": "c0e1fac7fa273e8c2f820a6324edae8c251f9f43",
    "apache-client": "cdd6a3193a2bc90737f77a9432873d26bcb5c4af",
    "arns": "19e376e8b6e390d8f753d39dd55d072793ef8e31",
    "auth": "ed214fae9d4b475afee6ebc6083745a4275a1752",
    "aws-core": "4f71c794ecd223f767bed5b04bffbe6ce115005f",
    "aws-query-protocol": "34c4ee0ccd2abcbcf33178a698c9496e9340c498",
    "aws-xml-protocol": "666f0921aade5dd0d727de06ad1d2ab84cc2cf4d",
    "checksums": "9c89200f5d991fabc41bd9f9b712f7702631e04e",
    "checksums-spi": "8dae09cf51314da61942d3fbf55352296eeb111e",
    "crt-core": "2d7c78919d105dcbfbb7a5ba37059b8fbe0e9ac9",
    "endpoints-spi": "d516a5533af722f6da3b0c6a4052b59105a77703",
    "http-auth": "8bba6c0e1c4c35d77e41fdf97dcc04c35732559d",
    "http-auth-aws": "c841dbbb1c29047195b29dfbdeb14848ac40e192",
    "http-auth-spi": "ae9c438555422b116e545646d0fa59462e368b0f",
    "http-client-spi": "a753050f2efe75a43adf652774fb4c392305723c",
    "identity-spi": "176bf6132bdda91952049630db79cded485ed549",
    "json-utils": "196d5cf5ac0c262e778039777599ec391c7f257d",
    "metrics-spi": "87755fe547b1b9cabd8aace32855ee8d45cff5ac",
    "netty-nio-client": "365b2b38043220207157da7216df942aa64518af",
    "profiles": "75f2a443a48dd1f23dfbb0bc2ee09a1a9cb7618f",
    "protocol-core": "935256d13cca38ca597fe7b15dbdfbe3d49968ba",
    "regions": "36fd503f7c001eccec5b3f01fbedbf1c2ac471b6",
    "s3": "e2fada00c3ad86acd78c92dd9c36449379e8c67d",
    "s3-transfer-manager": "3d31de77de31d9d623844410d46c07df1f9cfa6e",
    "sdk-core": "16bddae532ace198894d0db16a0d93db3b97e224",
    "third-party-jackson-core": "c1a07ad7ec6d46b4176cd5b9417cdaeae52bc3fa",
    "utils": "079dd7a31aa91cb61b516bb8393c5d704a9884cf",
}


def _maven_path(group: str, artifact: str, version: str) -> str:
    return f"{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.jar"


# Connector name (as in the config's `spark.object_stores`) -> [(maven path, pinned sha1)]. The pinned sha1 is
# the jar that was tested; Maven Central's published .sha1 is checked as well.
CONNECTOR_ARTIFACTS: dict[str, list[tuple[str, str]]] = {
    "s3": [
        (_maven_path("org.apache.hadoop", "hadoop-aws", HADOOP_VERSION), "641d8fe1d7683cdcc05cc3a794c0374553f6bd6a"),
        *((_maven_path("software.amazon.awssdk", name, AWS_SDK_VERSION), sha1) for name, sha1 in _AWS_SDK_SHA1.items()),
        (
            _maven_path("software.amazon.eventstream", "eventstream", "1.0.1"),
            "6ff8649dffc5190366ada897ba8525a836297784",
        ),
        (_maven_path("org.reactivestreams", "reactive-streams", "1.0.4"), "3864a1320d97d7b045f729a326e1e077661f31b7"),
    ],
}


def jars_dir() -> Path:
    """Where cached jars live: $LAION_SPARK_JARS_DIR, else ``.cache/jars`` in a project checkout, else the
    user's cache (``$XDG_CACHE_HOME/laion_spark/jars``) for an installed wheel."""
    override = os.environ.get("LAION_SPARK_JARS_DIR")
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file():
        return checkout / ".cache" / "jars"
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return user_cache / "laion_spark" / "jars"


def cached_delta_jars() -> list[Path]:
    """The cached Delta jars, or an empty list when any is missing."""
    return _cached(jars_dir(), DELTA_ARTIFACTS)


def fetch_delta_jars() -> list[Path]:
    """Download the Delta jars into the cache unless already there; verify each against Maven's sha1."""
    return _fetch(jars_dir(), [(artifact, None) for artifact in DELTA_ARTIFACTS])


def connector_dir(name: str) -> Path:
    """One folder per connector, so that two connectors' jars never collide on a name (utils-2.24.8.jar)."""
    return jars_dir() / name


def cached_connector_jars(name: str) -> list[Path]:
    """The cached jars of connector ``name`` (a key of CONNECTOR_ARTIFACTS), or an empty list when any is missing."""
    return _cached(connector_dir(name), [artifact for artifact, _ in CONNECTOR_ARTIFACTS[name]])


def fetch_connector_jars(name: str) -> list[Path]:
    """Download connector ``name``'s jars into the cache unless already there; verify each sha1."""
    return _fetch(connector_dir(name), CONNECTOR_ARTIFACTS[name])


def _cached(directory: Path, artifacts: list[str]) -> list[Path]:
    paths = [directory / Path(artifact).name for artifact in artifacts]
    return paths if all(p.is_file() and p.stat().st_size > 0 for p in paths) else []


def _fetch(directory: Path, artifacts: list[tuple[str, str | None]]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for artifact, pinned_sha1 in artifacts:
        target = directory / Path(artifact).name
        if not (target.is_file() and target.stat().st_size > 0):
            url = f"{MAVEN_CENTRAL}/{artifact}"
            with urllib.request.urlopen(url, timeout=120) as response:
                data = response.read()
            with urllib.request.urlopen(url + ".sha1", timeout=60) as response:
                published = response.read().decode().split()[0].strip()
            actual = hashlib.sha1(data).hexdigest()
            for expected, whose in ((published, "Maven Central's"), (pinned_sha1, "the pinned")):
                if expected is not None and actual != expected:
                    raise RuntimeError(f"{url}: sha1 {actual} does not match {whose} {expected}")
            tmp = target.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(target)
        paths.append(target)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m laion_spark.jars",
        description="Cache Delta's jars (and object-store connectors) from Maven Central.",
    )
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument(
        "--connector",
        action="append",
        default=[],
        choices=sorted(CONNECTOR_ARTIFACTS),
        help="also fetch this object-store connector (repeatable), for `spark.object_stores` in the config",
    )
    args = parser.parse_args(argv)
    for path in fetch_delta_jars():
        print(path)
    for name in args.connector:
        for path in fetch_connector_jars(name):
            print(path)


if __name__ == "__main__":
    main()
