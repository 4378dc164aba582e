"""DataComp's image-based filter (Gadre et al. 2023, "image-based filtering"): cluster the pool's image embeddings
with k-means, find the clusters that the reference images (ImageNet's training images in the paper) fall in, and
keep only the pool images in those clusters.

The centroids are trained on the pool (laion_spark.curate.kmeans), not on the reference images: the clusters
partition what the pool holds, and the reference set only votes for some of them. The functions split like every
dataset filter: :func:`keep_reference_clusters` names the rows to reject, with their cluster (the reason's
detail), and :func:`drop_rejected` removes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from laion_spark.curate.kmeans import COSINE_COLUMN, assign_clusters

CLUSTER = "cluster"


def image_cluster_count(rows: int, configured: int = 0) -> int:
    """``dataset.image_cluster.clusters``, or when 0 about one cluster per 1,000 pool images, at least 1
    (DataComp: 100,000 clusters for 128M images)."""
    return configured if configured > 0 else max(1, round(rows / 1000))


def reference_clusters(reference: DataFrame, centroids: np.ndarray, column: str = "image_embedding") -> DataFrame:
    """(cluster, references): each cluster that a reference image's embedding is nearest to, with how many are.

    Small (at most k rows). Reference rows without an embedding (images that did not decode) are left out.
    """
    present = reference.where(F.col(column).isNotNull()).select(column)
    assigned = assign_clusters(present, column, centroids, CLUSTER)
    return assigned.groupBy(CLUSTER).agg(F.count(F.lit(1)).alias("references"))


def keep_reference_clusters(
    pool: DataFrame,
    centroids: np.ndarray,
    clusters: DataFrame | Sequence[int],
    column: str = "image_embedding",
) -> DataFrame:
    """The pool rows this filter rejects: ``uid, cluster, cluster_cosine`` for each row whose nearest centroid is
    not among ``clusters`` (a :func:`reference_clusters` frame or a list of cluster ids).

    A row without an embedding has no cluster; it is not rejected here (the score stage's failed_to_decode step
    already accounts for it).
    """
    assigned = assign_clusters(
        pool.where(F.col(column).isNotNull()).select("uid", column), column, centroids, CLUSTER
    ).select("uid", CLUSTER, COSINE_COLUMN)
    if isinstance(clusters, DataFrame):
        # At most k rows: broadcast, so the pool is not shuffled for this join.
        kept = F.broadcast(clusters.select(CLUSTER).distinct())
        return assigned.join(kept, CLUSTER, "left_anti").select("uid", CLUSTER, COSINE_COLUMN)
    ids = sorted({int(cluster) for cluster in clusters})
    return assigned.where(~F.col(CLUSTER).isin(ids)) if ids else assigned


def drop_rejected(pool: DataFrame, rejected: DataFrame) -> DataFrame:
    """``pool`` without the uids :func:`keep_reference_clusters` rejected."""
    return pool.join(rejected.select("uid"), "uid", "left_anti")
