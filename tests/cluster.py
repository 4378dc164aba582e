"""A real Spark standalone cluster on loopback: one master and one worker started with pyspark's own scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyspark


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


def _wait_for_worker(master_log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "Registering worker" in master_log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no worker registered with the master; see {master_log}")


@contextmanager
def standalone_cluster(workdir: Path, worker_cores: int = 2, worker_memory: str = "2g") -> Iterator[str]:
    """Yield the master URL of a running standalone cluster; stop both daemons afterwards."""
    spark_home = Path(pyspark.__file__).parent
    spark_class = spark_home / "bin" / "spark-class"
    env = dict(os.environ, SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(workdir))
    master_port, master_ui, worker_ui = _free_port(), _free_port(), _free_port()
    master_log, worker_log = workdir / "master.log", workdir / "worker.log"
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
        master_url = f"spark://127.0.0.1:{master_port}"
        with worker_log.open("w") as out:
            worker = subprocess.Popen(
                [str(spark_class), "org.apache.spark.deploy.worker.Worker", master_url, "--host", "127.0.0.1",
                 "--cores", str(worker_cores), "--memory", worker_memory, "--webui-port", str(worker_ui),
                 "--work-dir", str(workdir / "work")],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(worker)
        _wait_for_worker(master_log)
        yield master_url
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
