"""Object storage: extract and candidates on an s3a:// lake against a real S3 API (moto's server on loopback),
through a local session that loads the S3 connector from the jar cache; and, without it, one-line errors.

The S3 session runs in a subprocess: jars are fixed when a JVM starts, so it cannot be the shared ``spark`` fixture.
One subprocess runs every Spark step (the CLI four times, then the read-back) in one JVM, for a 2-core CI machine.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyspark
import pytest
from pyspark.sql import SparkSession

from laion_spark.config import ConfigError, SparkConfig
from laion_spark.extract import ExtractRules, FileStatus, extract_file
from laion_spark.jars import (
    AWS_SDK_VERSION,
    CONNECTOR_ARTIFACTS,
    HADOOP_VERSION,
    cached_delta_jars,
    fetch_connector_jars,
)
from laion_spark.session import add_object_store_connectors
from laion_spark.storage.object_store import check_object_store, explain_storage_error, object_store_of
from laion_spark.testing.archives import WatPage, write_wat

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "laion-test"
ACCESS_KEY, SECRET_KEY = "test-access-key", "test-secret-key"

# What the JVM said in real runs of pyspark 4.0.1 + hadoop-aws 3.4.1 (stack frames left out).
NO_CONNECTOR = (
    "An error occurred while calling o52.load.\n: java.lang.RuntimeException: java.lang.ClassNotFoundException: "
    "Class org.apache.hadoop.fs.s3a.S3AFileSystem not found\n\tat org.apache.hadoop.conf.Configuration.getClass("
    "Configuration.java:2737)"
)
NO_CREDENTIALS = (
    "An error occurred while calling o50.load.\n: java.nio.file.AccessDeniedException: s3a://bucket/in: "
    "org.apache.hadoop.fs.s3a.auth.NoAuthWithAWSException: No AWS Credentials provided by "
    "TemporaryAWSCredentialsProvider SimpleAWSCredentialsProvider EnvironmentVariableCredentialsProvider "
    "IAMInstanceCredentialsProvider : software.amazon.awssdk.core.exception.SdkClientException: Unable to load "
    "credentials from system settings."
)
UNKNOWN_KEY = (
    "An error occurred while calling o52.load.\n: java.nio.file.AccessDeniedException: s3a://bucket/in: "
    "listObjects() on s3a://bucket/in: software.amazon.awssdk.services.s3.model.S3Exception: The AWS Access Key Id "
    "you provided does not exist in our records. (Service: S3, Status Code: 403, Request ID: wfqx):InvalidAccessKeyId"
)
FORBIDDEN = (
    "An error occurred while calling z:io.delta.tables.DeltaTable.isDeltaTable.\n: "
    "java.nio.file.AccessDeniedException: s3a://bucket/lake/pairs/_delta_log: "
    "getFileStatus on s3a://bucket/lake/pairs/_delta_log: "
    "software.amazon.awssdk.services.s3.model.S3Exception: null (Service: S3, Status Code: 403, Request ID: X6Yi):null"
)
NO_BUCKET = (
    "An error occurred while calling o52.load.\n: org.apache.hadoop.fs.s3a.UnknownStoreException: `s3a://bucket/in': "
    "listObjects() on s3a://bucket/in: software.amazon.awssdk.services.s3.model.NoSuchBucketException: The specified "
    "bucket does not exist (Service: S3, Status Code: 404, Request ID: 9sHm):NoSuchBucket"
)
UNREACHABLE = (
    "An error occurred while calling o52.load.\n: java.net.ConnectException: listObjects() on s3a://bucket/in: "
    "software.amazon.awssdk.core.exception.SdkClientException: Unable to execute HTTP request: Connect to "
    "127.0.0.1:9 [/127.0.0.1] failed: Connection refused"
)
SDK_MISSING = (
    "An error occurred while calling o50.text.\n: java.lang.NoClassDefFoundError: "
    "software/amazon/awssdk/transfer/s3/model/ObjectTransfer\nCaused by: java.lang.ClassNotFoundException: "
    "software.amazon.awssdk.transfer.s3.model.ObjectTransfer"
)
NO_GS = (
    "An error occurred while calling o58.load.\n: org.apache.hadoop.fs.UnsupportedFileSystemException: "
    'No FileSystem for scheme "gs"'
)
NO_ABFSS = (
    "An error occurred while calling o61.load.\n: java.lang.RuntimeException: java.lang.ClassNotFoundException: "
    "Class org.apache.hadoop.fs.azurebfs.SecureAzureBlobFileSystem not found"
)


def explain(message: str, uris: list[str]) -> str | None:
    return explain_storage_error(RuntimeError(message), uris)


def test_missing_s3_connector_says_what_to_add_and_what_to_run():
    message = explain(NO_CONNECTOR, ["s3a://bucket/lake", "s3a://bucket/crawl/*.wat.gz"])
    assert message.startswith("s3a://bucket/lake: this Spark session has no S3 connector")
    assert "object_stores: [s3]" in message and "python -m laion_spark.jars fetch --connector s3" in message
    assert "\n" not in message


def test_missing_credentials_name_the_settings_to_add():
    message = explain(NO_CREDENTIALS, ["s3a://bucket/lake"])
    assert message.startswith("s3a://bucket/in: no AWS credentials found")
    assert "AWS_ACCESS_KEY_ID" in message and "spark.hadoop.fs.s3a.access.key" in message


def test_refused_credentials_are_access_denied_with_the_reason():
    assert "access denied (HTTP 403 InvalidAccessKeyId): the access key is unknown" in explain(UNKNOWN_KEY, [])
    assert explain(FORBIDDEN, []).startswith("s3a://bucket/lake/pairs/_delta_log: access denied (HTTP 403")


def test_missing_bucket_and_unreachable_endpoint_are_one_sentence_each():
    assert "bucket 'bucket' does not exist" in explain(NO_BUCKET, [])
    assert "cannot reach the S3 endpoint 127.0.0.1:9" in explain(UNREACHABLE, [])


def test_incomplete_connector_jars_say_to_fetch_again():
    message = explain(SDK_MISSING, ["s3a://bucket/lake"])
    assert "jars are incomplete" in message and "fetch --connector s3" in message


def test_other_object_stores_name_their_own_connector():
    assert "no Google Cloud Storage connector" in explain(NO_GS, ["gs://bucket/lake"])
    assert "hadoop-azure" in explain(NO_ABFSS, ["abfss://c@acct.dfs.core.windows.net/lake"])
    assert object_store_of("s3://commoncrawl/x") is object_store_of("s3a://b/x") is not None
    assert object_store_of("/tmp/lake") is None and object_store_of("dbfs:/lake") is None


def test_other_errors_are_left_alone():
    assert explain("java.lang.OutOfMemoryError: Java heap space", ["s3a://bucket/lake"]) is None
    assert explain_storage_error(ValueError("bad value"), []) is None


def test_s3_connector_is_the_small_set_for_pyspark_s_own_hadoop():
    (hadoop_api,) = glob.glob(str(Path(pyspark.__file__).parent / "jars" / "hadoop-client-api-*.jar"))
    assert Path(hadoop_api).name == f"hadoop-client-api-{HADOOP_VERSION}.jar"
    paths = [path for path, _ in CONNECTOR_ARTIFACTS["s3"]]
    assert f"org/apache/hadoop/hadoop-aws/{HADOOP_VERSION}/hadoop-aws-{HADOOP_VERSION}.jar" in paths
    sdk = [p for p in paths if p.startswith("software/amazon/awssdk/")]
    assert sdk and all(f"/{AWS_SDK_VERSION}/" in p for p in sdk)
    assert not any("/bundle/" in p for p in paths)  # the 558 MB SDK bundle


def test_fetch_keeps_no_jar_whose_sha1_is_not_the_tested_one(tmp_path, monkeypatch):
    served = b"a jar that Maven Central vouches for, but not the one that was tested"

    def maven_central(url: str, timeout: float):
        body = hashlib.sha1(served).hexdigest().encode() if url.endswith(".sha1") else served
        return contextlib.nullcontext(io.BytesIO(body))

    monkeypatch.setattr(urllib.request, "urlopen", maven_central)
    monkeypatch.setenv("LAION_SPARK_JARS_DIR", str(tmp_path))
    monkeypatch.setitem(CONNECTOR_ARTIFACTS, "s3", [("org/example/x/1.0/x-1.0.jar", "0" * 40)])
    with pytest.raises(RuntimeError, match="does not match the pinned 0000"):
        fetch_connector_jars("s3")
    assert list((tmp_path / "s3").iterdir()) == []


def test_session_refuses_an_uncached_or_unknown_connector_before_spark_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("LAION_SPARK_JARS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"not in .*; run `python -m laion_spark\.jars fetch --connector s3` once"):
        add_object_store_connectors(SparkSession.builder, SparkConfig(object_stores=["s3"]), [])
    with pytest.raises(ConfigError, match="unknown object store 'gcs' \\(known: s3\\)"):
        add_object_store_connectors(SparkSession.builder, SparkConfig(object_stores=["gcs"]), [])


@pytest.fixture
def about_to_build_a_local_session(monkeypatch):
    """No active session and no foreign JVM or classpath: the next session is the one laion_spark builds."""
    monkeypatch.setattr(SparkSession, "getActiveSession", classmethod(lambda cls: None))
    for name in ("SPARK_REMOTE", "PYSPARK_GATEWAY_PORT", "SPARK_DIST_CLASSPATH", "SPARK_CLASSPATH", "HADOOP_CLASSPATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SPARK_HOME", raising=False)
    return monkeypatch


def test_check_stops_an_s3a_run_without_the_connector_before_spark_starts(about_to_build_a_local_session):
    with pytest.raises(ConfigError, match=r"^s3a://b/lake: this Spark session has no S3 connector; add `object_stores"):
        check_object_store(SparkConfig(), ["/tmp/crawl/*.wat.gz", "s3a://b/lake"])
    with pytest.raises(ConfigError, match="^gs://b/x: this Spark session has no Google Cloud Storage connector"):
        check_object_store(SparkConfig(object_stores=["s3"]), ["s3a://b/lake", "gs://b/x"])


def test_check_passes_what_the_session_will_have_or_cannot_know(about_to_build_a_local_session, tmp_path):
    check_object_store(SparkConfig(object_stores=["s3"]), ["s3a://b/lake", "s3://commoncrawl/crawl-data/x.wat.gz"])
    check_object_store(SparkConfig(), ["/tmp/lake", "file:///tmp/crawl", "dbfs:/lake", "main.laion"])
    check_object_store(SparkConfig(conf={"spark.jars.packages": "org.apache.hadoop:hadoop-aws:3.4.1"}), ["s3a://b/l"])
    spark_home = tmp_path / "spark"
    (spark_home / "jars").mkdir(parents=True)
    (spark_home / "jars" / "hadoop-aws-3.4.1.jar").touch()
    about_to_build_a_local_session.setenv("SPARK_HOME", str(spark_home))
    check_object_store(SparkConfig(), ["s3a://b/lake"])  # a Spark distribution with hadoop-aws in its jars
    about_to_build_a_local_session.delenv("SPARK_HOME")
    about_to_build_a_local_session.setenv("PYSPARK_GATEWAY_PORT", "4242")
    check_object_store(SparkConfig(), ["s3a://b/lake"])  # spark-submit's JVM: EMR has its own S3 connector


# --- against a real S3 API ---------------------------------------------------------------------------------------

# Runs in the subprocess, in one JVM: the CLI twice over (extract, candidates), the tables read back after each
# round, then a real JVM error explained.
DRIVER = r"""
import json, sys
from pyspark.sql import SparkSession
from laion_spark.cli import main

lake, inputs, sets = json.loads(sys.argv[1])
common = ["--lake", lake, *[arg for item in sets for arg in ("--set", item)]]
rounds = []
for _ in range(2):
    assert main(["extract", *common, *[arg for item in inputs for arg in ("--input", item)]]) == 0
    assert main(["candidates", *common]) == 0
    spark = SparkSession.getActiveSession()
    table = lambda name: spark.read.format("delta").load(f"{lake}/{name}")
    log = table("ingest_log").collect()
    rounds.append({
        "pairs": table("pairs").count(),
        "distinct_pair_uids": table("pairs").select("uid").distinct().count(),
        "candidates": table("candidates").count(),
        "ingest_log": sorted([row.source_file, row.status, row.pairs_emitted] for row in log),
    })
from laion_spark.storage.object_store import explain_storage_error
try:
    spark.read.format("binaryFile").load("s3a://no-such-bucket/crawl/*.wat.gz").count()
    explained = None
except Exception as exc:
    explained = explain_storage_error(exc, [lake])
print("ROUNDS " + json.dumps(rounds))
print("EXPLAINED " + json.dumps(explained))
"""


def wat_pages(site: str, n: int) -> list[WatPage]:
    # Distinct, descriptive alt texts that pass every candidates rule, and one image without alt text (no pair).
    return [
        WatPage(
            f"http://{site}.example.org/{i}.html",
            [(f"/photos/{i}-{j}.jpg", f"a {site} photograph of harbour boats, number {i} {j}") for j in range(3)]
            + [(f"/photos/{i}-bare.jpg", None)],
        )
        for i in range(n)
    ]


def pairs_in(path: Path) -> int:
    return next(item for item in extract_file(str(path), ExtractRules()) if isinstance(item, FileStatus)).pairs_emitted


@pytest.fixture(scope="module")
def s3_connector() -> list[Path]:
    """The S3 connector's jars: cached by `make setup`, else fetched once from Maven Central (CI has it)."""
    return fetch_connector_jars("s3")


@pytest.fixture
def s3_endpoint():
    """A real S3 API on 127.0.0.1 (moto's server mode) with one empty bucket: (endpoint URL, boto3 client)."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # a line per request would bury a failure's output
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()
    werkzeug_log.setLevel(level)


def s3_settings(endpoint: str) -> list[str]:
    fs = "spark.conf.spark.hadoop.fs.s3a"
    return [
        "spark.object_stores=[s3]",
        f"{fs}.endpoint={endpoint}",
        f"{fs}.endpoint.region=us-east-1",
        f"{fs}.path.style.access='true'",
        f"{fs}.connection.ssl.enabled='false'",
        f"{fs}.access.key={ACCESS_KEY}",
        f"{fs}.secret.key={SECRET_KEY}",
    ]


def small_session_settings() -> list[str]:
    return [
        "spark.master=local[2]",
        "spark.shuffle_partitions=2",
        "spark.conf.spark.ui.enabled='false'",
        "spark.conf.spark.ui.showConsoleProgress='false'",
        "spark.conf.spark.databricks.delta.snapshotPartitions=2",  # as tests/conftest.py: not 50 tasks a snapshot
        "extract.io=spark",  # no s3fs here: Python workers get the files through Spark's binaryFile source
        "candidates.language.languages=[en, de]",  # a small lingua model per Python worker
    ]


def run_python(args: list[str], timeout: int, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, AWS_EC2_METADATA_DISABLED="true")
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_extract_and_candidates_on_an_s3a_lake_are_idempotent(s3_connector, s3_endpoint, tmp_path):
    endpoint, client = s3_endpoint
    first = write_wat(tmp_path / "first.wat.gz", wat_pages("north", 4))
    # The second file repeats one of the first file's pages: its pairs are pairs, but not new candidates.
    second = write_wat(tmp_path / "second.wat.gz", [*wat_pages("south", 3), wat_pages("north", 1)[0]])
    client.upload_file(str(first), BUCKET, "crawl/a/first.wat.gz")
    client.upload_file(str(second), BUCKET, "crawl/b/second.wat.gz")
    expected_pairs = pairs_in(first) + pairs_in(second)
    assert expected_pairs == (4 + 4) * 3
    lake = f"s3a://{BUCKET}/lake"
    # s3:// (EMR's and Common Crawl's spelling) goes through the same connector.
    inputs = [f"s3a://{BUCKET}/crawl/a/*.wat.gz", f"s3://{BUCKET}/crawl/b/second.wat.gz"]

    result = run_python(
        ["-c", DRIVER, json.dumps([lake, inputs, s3_settings(endpoint) + small_session_settings()])], timeout=420
    )

    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("ROUNDS ")]
    first_round, second_round = json.loads(line.removeprefix("ROUNDS "))
    assert first_round["pairs"] == expected_pairs
    # The repeated page's three pairs have the uids of the first file's: three keys fewer, three candidates fewer.
    assert first_round["distinct_pair_uids"] == first_round["candidates"] == expected_pairs - 3
    assert first_round["ingest_log"] == sorted(
        [
            [f"s3a://{BUCKET}/crawl/a/first.wat.gz", "ok", pairs_in(first)],
            [f"s3://{BUCKET}/crawl/b/second.wat.gz", "ok", pairs_in(second)],
        ]
    )
    assert second_round == first_round  # nothing read twice, nothing written twice
    (explained,) = [json.loads(line[10:]) for line in result.stdout.splitlines() if line.startswith("EXPLAINED ")]
    assert explained.startswith("s3a://no-such-bucket/crawl: bucket 'no-such-bucket' does not exist")
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix="lake/")
    assert any(o["Key"].startswith("lake/pairs/_delta_log/") for o in objects.get("Contents", []))


def test_uncached_connector_is_a_one_line_error_before_spark_starts(tmp_path):
    delta_jars = cached_delta_jars()
    if not delta_jars:
        pytest.skip("Delta's jars are not cached (make setup)")
    jars = tmp_path / "jars"  # Delta's jars as cached, and no S3 connector
    jars.mkdir()
    for jar in delta_jars:
        (jars / jar.name).symlink_to(jar)
    command = ["-m", "laion_spark", "extract", "--lake", f"s3a://{BUCKET}/lake", "--input", f"s3a://{BUCKET}/x"]

    result = run_python([*command, "--set", "spark.object_stores=[s3]"], timeout=120, LAION_SPARK_JARS_DIR=str(jars))

    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"laion-spark extract: spark.object_stores: the s3 connector's jars are not in {jars / 's3'}; run "
        "`python -m laion_spark.jars fetch --connector s3` once (needs Maven Central)"
    )


def test_extract_without_the_connector_is_a_one_line_error():
    settings = [arg for item in small_session_settings() for arg in ("--set", item)]
    lake, pattern = f"s3a://{BUCKET}/lake", f"s3a://{BUCKET}/crawl/*.wat.gz"

    result = run_python(["-m", "laion_spark", "extract", "--lake", lake, "--input", pattern, *settings], timeout=180)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "\tat " not in result.stderr and "Py4J" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("laion-spark extract: ")]
    assert "has no S3 connector" in line and "object_stores: [s3]" in line
