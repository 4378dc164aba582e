"""spark-submit entry point for the `candidates` stage: `spark-submit jobs/candidates.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["candidates", *sys.argv[1:]]))
