"""Curation beyond LAION's CLIP threshold: near-duplicate images by perceptual hash (phash, near_dup), semantic
deduplication of image embeddings (SemDeDup: kmeans, near_dup), evaluation-set decontamination and DataComp's
image-based clustering filter, and the chain (``dataset.filters``) that applies them to the scored pairs.

Each filter is usable on its own from a notebook: a function that returns the rows it would remove, with the
reason (``phash_duplicates``, ``semdedup_duplicates``, ``contaminated``, ``keep_reference_clusters``), and one that
drops them. The names load their module on first use, so importing the package imports neither faiss nor Pillow.
"""

from laion_spark.lazy import lazy_attributes

_LAZY = {
    "FILTERS": "laion_spark.curate.chain",
    "apply_filter_chain": "laion_spark.curate.chain",
    "effective_filters": "laion_spark.curate.chain",
    "validate_filters": "laion_spark.curate.chain",
    "phash": "laion_spark.curate.phash",
    "phash_hex": "laion_spark.curate.phash",
    "hamming": "laion_spark.curate.phash",
    "hamming_distance": "laion_spark.curate.phash",
    "phash_duplicates": "laion_spark.curate.near_dup",
    "semdedup_duplicates": "laion_spark.curate.near_dup",
    "drop_duplicates_found": "laion_spark.curate.near_dup",
    "train_kmeans": "laion_spark.curate.kmeans",
    "assign_clusters": "laion_spark.curate.kmeans",
    "read_image_sources": "laion_spark.curate.eval_sets",
    "image_signatures": "laion_spark.curate.eval_sets",
    "load_signatures": "laion_spark.curate.eval_sets",
    "contaminated": "laion_spark.curate.decontaminate",
    "drop_contaminated": "laion_spark.curate.decontaminate",
    "reference_clusters": "laion_spark.curate.image_cluster",
    "keep_reference_clusters": "laion_spark.curate.image_cluster",
    "drop_rejected": "laion_spark.curate.image_cluster",
}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
