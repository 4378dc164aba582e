"""spark-submit entry point for the `score` stage: `spark-submit jobs/score.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
