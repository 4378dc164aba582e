"""Object stores (S3, Google Cloud Storage, Azure) on a locally built session, and what their JVM errors mean.

A local session reads ``s3a://`` only with hadoop-aws and the AWS SDK on its classpath. ``spark.object_stores:
[s3]`` in the config adds them from the jar cache (``python -m laion_spark.jars fetch --connector s3`` fills it);
clusters (EMR, Databricks, Dataproc) bring their own connectors. When a connector or the credentials are missing,
Hadoop answers with a Java stack trace. :func:`check_object_store` says so in one sentence before a local session
starts without the connector; :func:`explain_storage_error` turns the JVM's answers (no connector, no or refused
credentials, no bucket, no endpoint) into one sentence that says what to add, wherever the session came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from laion_spark.config import ConfigError, SparkConfig
from laion_spark.jars import CONNECTOR_ARTIFACTS, HADOOP_VERSION, cached_connector_jars, connector_dir


@dataclass(frozen=True)
class ObjectStore:
    label: str
    schemes: tuple[str, ...]
    filesystem_classes: tuple[str, ...]  # Hadoop FileSystem classes whose absence means "no connector"
    jar_prefixes: tuple[str, ...]  # a jar named so in Spark's own jars folder brings the connector
    connector: str | None  # its name in spark.object_stores, when laion_spark can load it
    how_to_add: str  # the end of the sentence that says what to add


S3 = ObjectStore(
    "S3",
    ("s3a", "s3"),
    ("org.apache.hadoop.fs.s3a.S3AFileSystem",),
    ("hadoop-aws-",),
    "s3",
    "add `object_stores: [s3]` to the config's spark section (or --set spark.object_stores=[s3]) after running "
    "`python -m laion_spark.jars fetch --connector s3` once, or put hadoop-aws on the cluster's classpath",
)
OBJECT_STORES = (
    S3,
    ObjectStore(
        "Google Cloud Storage",
        ("gs",),
        ("com.google.cloud.hadoop.fs.gcs.GoogleHadoopFileSystem",),
        ("gcs-connector",),
        None,
        "put Google's shaded gcs-connector jar in spark.conf.spark.jars (Dataproc has it built in)",
    ),
    ObjectStore(
        "Azure",
        ("abfss", "abfs", "wasbs", "wasb"),
        (
            "org.apache.hadoop.fs.azurebfs.SecureAzureBlobFileSystem",
            "org.apache.hadoop.fs.azurebfs.AzureBlobFileSystem",
            "org.apache.hadoop.fs.azure.NativeAzureFileSystem",
        ),
        ("hadoop-azure-",),
        None,
        f"add org.apache.hadoop:hadoop-azure:{HADOOP_VERSION} to spark.conf.spark.jars.packages (Databricks and "
        "HDInsight have it built in)",
    ),
)

# Spark settings each connector adds to a local session (the user's spark.conf is applied after, and wins).
CONNECTOR_SETTINGS: dict[str, dict[str, str]] = {
    "s3": {
        # s3:// is EMRFS's scheme on EMR, and the one Common Crawl's paths are written with: S3A serves it here.
        "spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        # Loading one path, Spark first looks for a streaming sink's _spark_metadata in it; S3A answers a glob
        # with FileNotFoundException, which Spark logs as a WARN with a stack trace at every input listing. The
        # pipeline never reads a streaming sink's output.
        "spark.sql.streaming.fileStreamSink.ignoreMetadata": "true",
    },
}

# Where the driver's classpath is not only Spark's jars and spark.jars: another JVM (spark-submit, Spark Connect)
# or a classpath the environment extends.
_FOREIGN_CLASSPATH_VARIABLES = (
    "SPARK_REMOTE",
    "PYSPARK_GATEWAY_PORT",
    "SPARK_DIST_CLASSPATH",
    "SPARK_CLASSPATH",
    "HADOOP_CLASSPATH",
)
_CLASSPATH_SETTINGS = ("spark.jars", "spark.jars.packages", "spark.driver.extraClassPath")
_URI = re.compile(r"\b(?:s3a?|gs|abfss?|wasbs?)://[^\s'\"`:;,)]+")
_NO_FILESYSTEM = re.compile(r'No FileSystem for scheme "([^"]*)"')
# Hadoop words it "ClassNotFoundException: Class X not found"; the JVM "ClassNotFoundException: X".
_CLASS_NOT_FOUND = re.compile(
    r"(?:Class (\S+) not found|ClassNotFoundException: (?!Class )(\S+)|NoClassDefFoundError: (\S+))"
)
_S3_ERROR_CODE = re.compile(r"Status Code: 403[^)]*\):\s*(\w+)")
_UNREACHABLE = re.compile(r"(?:Unable to execute HTTP request: Connect to (\S+)|UnknownHostException: (\S+))")
_FORBIDDEN_REASONS = {
    "InvalidAccessKeyId": "the access key is unknown to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
}


def connector_jars_and_settings(names: Iterable[str]) -> tuple[list[Path], dict[str, str]]:
    """The cached jars and the Spark settings of the connectors ``names`` (``spark.object_stores``).

    Raises ConfigError for a name laion_spark does not know, or a connector whose jars are not cached: the
    session never fetches anything.
    """
    jars: list[Path] = []
    settings: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name not in CONNECTOR_ARTIFACTS:
            known = ", ".join(sorted(CONNECTOR_ARTIFACTS))
            raise ConfigError(
                f"spark.object_stores: unknown object store '{name}' (known: {known}); for another store put its "
                "connector jars in spark.conf.spark.jars"
            )
        cached = cached_connector_jars(name)
        if not cached:
            raise ConfigError(
                f"spark.object_stores: the {name} connector's jars are not in {connector_dir(name)}; run "
                f"`python -m laion_spark.jars fetch --connector {name}` once (needs Maven Central)"
            )
        jars.extend(cached)
        settings.update(CONNECTOR_SETTINGS.get(name, {}))
    return jars, settings


def object_store_of(uri: str) -> ObjectStore | None:
    """The object store a URI lives in (s3a://, s3://, gs://, abfss://, ...), or None for any other path."""
    scheme = urlsplit(uri).scheme.lower()
    return next((store for store in OBJECT_STORES if scheme in store.schemes), None)


def check_object_store(spark_config: SparkConfig, uris: Iterable[str]) -> None:
    """Before the session is built: a ConfigError (one sentence) when a URI lives in an object store whose
    connector the local session that laion_spark is about to start will not have.

    It says nothing wherever the classpath is not laion_spark's to know: a session already active, Spark Connect
    (SPARK_REMOTE), spark-submit's own JVM (PYSPARK_GATEWAY_PORT), jars added through spark.conf or the
    environment. Whatever it cannot tell, :func:`explain_storage_error` translates once the JVM has answered.
    """
    if not _builds_its_own_jvm(spark_config):
        return
    for uri in uris:
        store = object_store_of(uri)
        if store is None or store.connector in spark_config.object_stores or _spark_jars_bring(store):
            continue
        raise ConfigError(_no_connector(uri, store))


def explain_storage_error(exc: BaseException, uris: Iterable[str] = ()) -> str | None:
    """One sentence that says what to add, for an error from a missing object-store connector, missing or
    refused credentials, a missing bucket or an unreachable endpoint; None for any other error.

    ``uris`` are the paths the command was given (the lake, the inputs): the sentence names the one the JVM
    complained about, or the first of them in the store concerned. Works on the text of the exception and its
    causes, so it reads classic (py4j) and Spark Connect errors alike.
    """
    text = _error_text(exc)
    uris = [u for u in uris if u]

    def uri_in(store: ObjectStore | None) -> str:
        """The path the JVM named, else the first given path in ``store``, else a description of one."""
        mentioned = _URI.search(text)
        if mentioned and (store is None or object_store_of(mentioned.group(0)) is store):
            return mentioned.group(0)
        if store is None:
            return uris[0] if uris else "a path"
        return next((u for u in uris if object_store_of(u) is store), f"a path in {store.label}")

    missing_store, missing_class = _missing_connector(text)
    if missing_store is not None:
        return _no_connector(uri_in(missing_store), missing_store)
    scheme = _NO_FILESYSTEM.search(text)
    if scheme:
        return f"{uri_in(None)}: this Spark session has no Hadoop FileSystem for '{scheme.group(1)}://'; check the URI."
    if missing_class and missing_class.replace("/", ".").startswith(
        ("software.amazon.awssdk.", "org.apache.hadoop.fs.s3a.")
    ):
        return (
            f"{uri_in(S3)}: the S3 connector's jars are incomplete ({missing_class.replace('/', '.')} is missing); run "
            "`python -m laion_spark.jars fetch --connector s3` again, or give the cluster the AWS SDK that its "
            "hadoop-aws was built with."
        )
    if "NoAuthWithAWSException" in text or "No AWS Credentials provided" in text:
        return (
            f"{uri_in(S3)}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "spark.hadoop.fs.s3a.access.key and spark.hadoop.fs.s3a.secret.key under the config's spark.conf "
            "(for a public bucket: spark.hadoop.fs.s3a.aws.credentials.provider: "
            "org.apache.hadoop.fs.s3a.AnonymousAWSCredentialsProvider)."
        )
    if "Status Code: 403" in text or ("AccessDeniedException" in text and _URI.search(text)):
        match = _S3_ERROR_CODE.search(text)
        code = match.group(1) if match and match.group(1) != "null" else ""  # a HEAD's 403 has no body, no code
        reason = _FORBIDDEN_REASONS.get(code, "the credentials in use may not do this there")
        status = f"HTTP 403 {code}".strip()
        return (
            f"{uri_in(S3)}: access denied ({status}): {reason}; check the keys in spark.hadoop.fs.s3a.* (or the "
            "AWS_* environment) and the bucket's policy."
        )
    if "NoSuchBucket" in text or "UnknownStoreException" in text:
        uri = uri_in(S3)
        bucket = urlsplit(uri).netloc or "the bucket"
        return (
            f"{uri}: bucket '{bucket}' does not exist; check its name (and spark.hadoop.fs.s3a.endpoint when the "
            "store is not AWS)."
        )
    unreachable = _UNREACHABLE.search(text)
    if unreachable and ("awssdk" in text or "s3a" in text):
        host = unreachable.group(1) or unreachable.group(2)
        return f"{uri_in(S3)}: cannot reach the S3 endpoint {host}; check spark.hadoop.fs.s3a.endpoint and the network."
    return None


def _no_connector(uri: str, store: ObjectStore) -> str:
    return f"{uri}: this Spark session has no {store.label} connector; {store.how_to_add}."


def _builds_its_own_jvm(spark_config: SparkConfig) -> bool:
    """Whether the next session is a local one whose JVM starts from Spark's jars and the jar cache only."""
    from pyspark.sql import SparkSession  # here: the CLI imports this module before it needs Spark

    if SparkSession.getActiveSession() is not None:
        return False
    if any(os.environ.get(name) for name in _FOREIGN_CLASSPATH_VARIABLES):
        return False
    return not any(key in spark_config.conf for key in _CLASSPATH_SETTINGS)


def _spark_jars_bring(store: ObjectStore) -> bool:
    """Whether Spark's own jars folder (pyspark's, or $SPARK_HOME's) holds the store's connector."""
    import pyspark

    home = os.environ.get("SPARK_HOME")
    folder = Path(home) / "jars" if home else Path(pyspark.__file__).parent / "jars"
    if not folder.is_dir():
        return True  # a layout we do not know: let the JVM answer
    return any(jar.name.startswith(store.jar_prefixes) for jar in folder.iterdir())


def _missing_connector(text: str) -> tuple[ObjectStore | None, str | None]:
    """(the store whose FileSystem class or scheme is missing, the first missing class named in ``text``)."""
    scheme = _NO_FILESYSTEM.search(text)
    if scheme:
        store = next((s for s in OBJECT_STORES if scheme.group(1).lower() in s.schemes), None)
        if store is not None:
            return store, None
    first_missing = None
    for match in _CLASS_NOT_FOUND.finditer(text):
        name = next(group for group in match.groups() if group)
        first_missing = first_missing or name
        store = next((s for s in OBJECT_STORES if name.replace("/", ".") in s.filesystem_classes), None)
        if store is not None:
            return store, name
    return None, first_missing


def _error_text(exc: BaseException) -> str:
    """The messages of ``exc`` and of its causes; a py4j error's text holds the Java exception and its causes."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            parts.append(f"{type(current).__name__}: {current}")
        except Exception:  # noqa: BLE001 - a py4j error whose JVM is gone cannot render itself
            parts.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


__all__ = [
    "CONNECTOR_SETTINGS",
    "OBJECT_STORES",
    "ObjectStore",
    "check_object_store",
    "connector_jars_and_settings",
    "explain_storage_error",
    "object_store_of",
]
