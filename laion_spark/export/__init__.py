"""What users consume: the dataset as the files their tools read (``laion-spark export``).

- ``laion``: LAION-400M's released parquet (SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE, NSFW, similarity);
- ``laion5b``: LAION-5B's (laion2B-multi's columns, or laion2B-en's);
- ``webdataset``: img2dataset's shards (tar + parquet + stats), which OpenCLIP's loader reads;
- ``embeddings``: clip-retrieval's npy + metadata layout, which its ``index`` and ``back`` read.

Each run exports the rows OUT does not hold yet into new files (export/layout.py says how OUT records it).
"""

from laion_spark.export.stage import FORMATS, ExportResult, run_export

__all__ = ["FORMATS", "ExportResult", "run_export"]
