"""spark-submit entry point for lake upkeep: `spark-submit jobs/optimize.py --lake DIR [--vacuum]` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["optimize", *sys.argv[1:]]))
