"""spark-submit entry point for the whole pipeline: `spark-submit jobs/run.py --lake DIR --input ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
