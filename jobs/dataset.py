"""spark-submit entry point for `laion-spark dataset`: re-cut 'dataset' through dataset.filters without rescoring
(`spark-submit jobs/dataset.py --lake DIR --set 'dataset.filters=[threshold,near_dup]'`, see --help)."""

import sys

from laion_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["dataset", *sys.argv[1:]]))
