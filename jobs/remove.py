"""spark-submit entry point for `laion-spark remove`: `spark-submit jobs/remove.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["remove", *sys.argv[1:]]))
