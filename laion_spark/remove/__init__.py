"""Takedown (``laion-spark remove``): delete what a removal list names from every table and artefact, and keep the
list as a blocklist (the ``removals`` table) that every stage consults, so that nothing removed comes back.

The stage loads on first use: the stages import the blocklist transforms from here, and the stage imports them.
"""

from laion_spark.lazy import lazy_attributes

_LAZY = {
    "KINDS": "laion_spark.remove.blocklist",
    "BlockItem": "laion_spark.remove.blocklist",
    "Blocklist": "laion_spark.remove.blocklist",
    "ListFile": "laion_spark.remove.blocklist",
    "MalformedLine": "laion_spark.remove.blocklist",
    "blocked_rows": "laion_spark.remove.blocklist",
    "blocklist_of": "laion_spark.remove.blocklist",
    "drop_blocked_images": "laion_spark.remove.blocklist",
    "drop_blocked_pairs": "laion_spark.remove.blocklist",
    "normalize_item": "laion_spark.remove.blocklist",
    "parse_line": "laion_spark.remove.blocklist",
    "read_blocklist": "laion_spark.remove.blocklist",
    "read_list_file": "laion_spark.remove.blocklist",
    "withhold_blocked_images": "laion_spark.remove.blocklist",
    "RemoveResult": "laion_spark.remove.stage",
    "run_remove": "laion_spark.remove.stage",
}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = sorted(_LAZY)
