"""spark-submit entry point for the `download` stage: `spark-submit jobs/download.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
