"""A real Spark Connect server on loopback, with Delta on its classpath, started from pyspark's own jars."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyspark

from laion_spark.jars import cached_delta_jars
from laion_spark.session import DELTA_CATALOG, DELTA_EXTENSION


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def connect_server(workdir: Path, python: str, master: str = "local[2]", timeout_s: float = 120) -> Iterator[str]:
    """Yield ``sc://127.0.0.1:PORT`` of a running Spark Connect server; stop it afterwards."""
    spark_home = Path(pyspark.__file__).parent
    port = _free_port()
    jars = ",".join(str(p) for p in cached_delta_jars())
    env = dict(os.environ, SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=python)
    env.pop("SPARK_REMOTE", None)
    log = workdir / "connect-server.log"
    command = [
        str(spark_home / "bin" / "spark-submit"), "--master", master, "--driver-memory", "2g",
        "--class", "org.apache.spark.sql.connect.service.SparkConnectServer", "--jars", jars,
        "--conf", f"spark.sql.extensions={DELTA_EXTENSION}",
        "--conf", f"spark.sql.catalog.spark_catalog={DELTA_CATALOG}",
        "--conf", "spark.sql.shuffle.partitions=2",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
        "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", f"spark.sql.warehouse.dir={workdir / 'warehouse'}",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the Spark Connect server exited early:\n{log.read_text()[-3000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Spark Connect server on port {port} after {timeout_s}s; see {log}")
            time.sleep(0.5)
        yield f"sc://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
