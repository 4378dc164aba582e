"""The kNN index over the dataset's embeddings: built on Spark (``laion-spark index``), searched by ``search`` and
``serve``.

The Spark side (run_index, build_index) and the on-disk layout load on first use, so that importing this package
imports no pyspark: search and serve run without a JVM.
"""

from laion_spark.index.choice import IndexChoice, IndexChoiceError, choose_index
from laion_spark.lazy import lazy_attributes

_LAZY = {
    "BuildReport": "laion_spark.index.build",
    "IndexRemoval": "laion_spark.index.build",
    "IndexResult": "laion_spark.index.build",
    "build_index": "laion_spark.index.build",
    "indexable_rows": "laion_spark.index.build",
    "locate_vectors": "laion_spark.index.located",
    "located_columns": "laion_spark.index.located",
    "remove_from_index": "laion_spark.index.build",
    "run_index": "laion_spark.index.build",
    "IndexMissing": "laion_spark.index.layout",
    "Manifest": "laion_spark.index.layout",
    "ModelRef": "laion_spark.index.layout",
    "Shard": "laion_spark.index.layout",
    "index_location": "laion_spark.index.layout",
    "read_manifest": "laion_spark.index.layout",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "BuildReport",
    "IndexChoice",
    "IndexChoiceError",
    "IndexMissing",
    "IndexRemoval",
    "IndexResult",
    "Manifest",
    "ModelRef",
    "Shard",
    "build_index",
    "choose_index",
    "index_location",
    "indexable_rows",
    "locate_vectors",
    "located_columns",
    "read_manifest",
    "remove_from_index",
    "run_index",
]
