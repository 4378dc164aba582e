"""Settings a session on one machine gets that Spark and Delta size for clusters."""

from __future__ import annotations

import pytest

from laion_spark.session import local_defaults

DISCOVERY = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


@pytest.mark.parametrize(
    ("master", "snapshot_partitions", "discovery_tasks"),
    [("local", "1", "2"), ("local[2]", "2", "4"), ("local[16]", "4", "16"), ("local[64,3]", "4", "16")],
)
def test_local_sessions_get_few_snapshot_and_file_listing_tasks(master, snapshot_partitions, discovery_tasks):
    defaults = local_defaults(master)
    assert defaults.get("spark.databricks.delta.snapshotPartitions") == snapshot_partitions
    # VACUUM lists files in this many tasks: 10,000 by default, 20-30 s of a 2-core machine per small table.
    assert defaults.get(DISCOVERY) == discovery_tasks


def test_clusters_keep_spark_defaults():
    assert local_defaults("spark://127.0.0.1:7077") == {} and local_defaults("yarn") == {}


def test_the_test_session_lists_files_in_few_tasks(spark):
    assert spark.conf.get(DISCOVERY) == "4"
