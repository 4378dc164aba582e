import sys

from laion_spark.cli import main

sys.exit(main())
