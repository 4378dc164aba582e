#!/bin/bash
# EMR bootstrap action: install laion_spark into the Python that Spark runs (every node, before YARN starts).
#
#   Args: WHEEL_URI [EXTRAS] [CONSTRAINTS_URI]
#     WHEEL_URI        s3://.../laion_spark-<version>-py3-none-any.whl (built with `pip wheel --no-deps -w dist .`)
#     EXTRAS           default "clip" (torch, torchvision, open_clip_torch: the score stage needs them on every
#                      executor); "" for a cluster that never runs score
#     CONSTRAINTS_URI  optional s3://.../constraints.txt: the exact versions the test suite ran with
#
# pyspark is not installed: the cluster's own Spark (/usr/lib/spark/python) is the one to use, and the wheel's
# core requirements leave it alone. Delta comes from the steps' --packages.
set -euo pipefail

# Must match spark.pyspark.python in steps.json. EMR's Spark 4 release ships Python 3.11 to 3.13; the package
# needs 3.10 or later.
PYTHON=/usr/bin/python3.11

WHEEL_URI="${1:?usage: bootstrap.sh s3://.../laion_spark-VERSION-py3-none-any.whl [EXTRAS] [s3://.../constraints.txt]}"
EXTRAS="${2-clip}"
CONSTRAINTS_URI="${3-}"

workdir="$(mktemp -d)"
aws s3 cp --only-show-errors "$WHEEL_URI" "$workdir/"
wheel="$workdir/$(basename "$WHEEL_URI")"

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    sudo dnf install -y -q "$(basename "$PYTHON")-pip"
fi

args=(install --quiet --no-warn-script-location)
if [ -n "$CONSTRAINTS_URI" ]; then
    aws s3 cp --only-show-errors "$CONSTRAINTS_URI" "$workdir/constraints.txt"
    args+=(-c "$workdir/constraints.txt")
fi
if [ -n "$EXTRAS" ]; then
    args+=("${wheel}[${EXTRAS}]")
else
    args+=("$wheel")
fi
sudo "$PYTHON" -m pip "${args[@]}"

# Fail the bootstrap (and so the cluster) here rather than in the first step.
"$PYTHON" -c "import laion_spark, yaml; print('laion_spark', laion_spark.__version__, 'installed')"
