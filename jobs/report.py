"""spark-submit entry point for `report`: `spark-submit jobs/report.py --lake DIR --out report.html ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
