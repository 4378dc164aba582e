"""spark-submit entry point for the `funnel` stage: `spark-submit jobs/funnel.py --lake DIR ...` (see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["funnel", *sys.argv[1:]]))
