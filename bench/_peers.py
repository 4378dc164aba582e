"""The peers' own extraction code, timed on the bench's input in an environment of their own.

cc2dataset (rom1504's Common Crawl -> image/text pairs tool) is installed from PyPI into ``bench/.venv-peers``, never
into the project's environment: it pins its own pyspark, fastwarc and simdjson, and laion_spark does not depend on
it. Its per-file function, ``cc2dataset.main.process_wat(path, "image")``, reads one WAT and yields its image links
with alt text; that is what runs here, in a child process of that environment, on the same file as ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from laion_spark.testing.peers import PeerEnv, PeerUnavailable, peer_python

PEERS_VENV = Path(__file__).resolve().parent / ".venv-peers"
CC2DATASET = PeerEnv(name="cc2dataset", probe="import cc2dataset.main", requirements=("cc2dataset",))

# Runs in the peers' environment. CPU seconds are the child's own (its threads included): the per-core figure,
# unmoved by whatever else shares the machine; wall seconds are printed beside them.
_CC2DATASET_RUN = """
import json, resource, sys, time
from loguru import logger
logger.remove()  # its per-file log lines are not part of the work
from cc2dataset.main import process_wat
wall, cpu = time.perf_counter(), time.process_time()
links = sum(1 for _ in process_wat(sys.argv[1], "image"))
print(json.dumps(dict(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu, pairs=links,
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""

__all__ = ["PeerUnavailable", "run_cc2dataset"]


def run_cc2dataset(path: Path) -> dict:
    """cc2dataset's ``process_wat`` over ``path``: wall_s, cpu_s, pairs, peak_rss_mb. Raises PeerUnavailable."""
    python = peer_python(CC2DATASET, PEERS_VENV)
    done = subprocess.run([str(python), "-c", _CC2DATASET_RUN, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise PeerUnavailable(f"cc2dataset's process_wat failed: {last[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(run_cc2dataset(Path(sys.argv[1])))
