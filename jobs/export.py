"""spark-submit entry point for `laion-spark export`: `spark-submit jobs/export.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
