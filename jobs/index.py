"""spark-submit entry point for `laion-spark index`: `spark-submit jobs/index.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
