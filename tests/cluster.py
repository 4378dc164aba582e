"""A real Spark standalone cluster on loopback: one master and one or more workers started with pyspark's own scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyspark


@dataclass
class StandaloneCluster:
    """A running cluster: where to submit (``master_url``), its daemons' logs, and each worker's RPC address."""

    master_url: str
    master_log: Path
    # spark://Worker@127.0.0.1:PORT, as the worker passes it to every executor it launches (--worker-url).
    worker_urls: list[str] = field(default_factory=list)
    worker_logs: list[Path] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Spark daemon exited early; see {log}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s; see {log}")


def _wait_for_worker(master_log: Path, count: int = 1, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if master_log.read_text(errors="replace").count("Registering worker") >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {count} worker(s) registered with the master; see {master_log}")


@contextmanager
def running_cluster(
    workdir: Path, workers: int = 1, worker_cores: int = 2, worker_memory: str = "2g"
) -> Iterator[StandaloneCluster]:
    """Yield a running standalone cluster of one master and ``workers`` workers; stop every daemon afterwards."""
    spark_home = Path(pyspark.__file__).parent
    spark_class = spark_home / "bin" / "spark-class"
    env = dict(os.environ, SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(workdir))
    master_port, master_ui = _free_port(), _free_port()
    master_log = workdir / "master.log"
    processes: list[subprocess.Popen] = []
    try:
        with master_log.open("w") as out:
            master = subprocess.Popen(
                [str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                 "--port", str(master_port), "--webui-port", str(master_ui)],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(master)
        _wait_for_port(master_port, master, master_log)
        cluster = StandaloneCluster(f"spark://127.0.0.1:{master_port}", master_log)
        # The first worker keeps the names a one-worker cluster always had (worker.log, work/).
        for n in range(workers):
            suffix = "" if n == 0 else f"-{n}"
            worker_port, worker_ui = _free_port(), _free_port()
            worker_log = workdir / f"worker{suffix}.log"
            with worker_log.open("w") as out:
                worker = subprocess.Popen(
                    [str(spark_class), "org.apache.spark.deploy.worker.Worker", cluster.master_url,
                     "--host", "127.0.0.1", "--port", str(worker_port), "--cores", str(worker_cores),
                     "--memory", worker_memory, "--webui-port", str(worker_ui),
                     "--work-dir", str(workdir / f"work{suffix}")],
                    env=env, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            processes.append(worker)
            cluster.worker_urls.append(f"spark://Worker@127.0.0.1:{worker_port}")
            cluster.worker_logs.append(worker_log)
        _wait_for_worker(master_log, count=workers)
        yield cluster
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@contextmanager
def standalone_cluster(workdir: Path, worker_cores: int = 2, worker_memory: str = "2g") -> Iterator[str]:
    """Yield the master URL of a running one-worker standalone cluster; stop both daemons afterwards."""
    with running_cluster(workdir, workers=1, worker_cores=worker_cores, worker_memory=worker_memory) as cluster:
        yield cluster.master_url
