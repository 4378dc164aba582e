"""spark-submit entry point for the `extract` stage: `spark-submit jobs/extract.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
