"""The integer id of a pair: LAION's SAMPLE_ID / hash column, the kNN index's vector id, the search API's id.

A pair's uid is the SHA-1 of its URL and alt text (hex). Its id is the uid's first 63 bits as a non-negative
int64: stable across reruns and lakes (the same pair always gets the same id), derivable from the uid alone on the
driver, in SQL and in a Python worker. Two different pairs share an id with probability about n^2 / 2^64 (about
5% for a billion pairs); exports and the index count such collisions and say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_id(uid: str) -> int:
    return int(uid[:16], 16) >> 1


def sample_ids(uids: Sequence[str]) -> np.ndarray:
    """int64 ids of ``uids``, vectorised (a worker's batch)."""
    if len(uids) == 0:
        return np.zeros(0, dtype=np.int64)
    prefixes = np.array([uid[:16] for uid in uids], dtype="S16")
    return (np.frombuffer(bytes.fromhex(b"".join(prefixes).decode("ascii")), dtype=">u8") >> 1).astype(np.int64)


def sample_id_column(uid_column: str = "uid"):
    """The same id as a Spark column expression (no Python UDF): the first 15 hex digits shifted left by 3 bits,
    plus the top 3 bits of the 16th digit."""
    from pyspark.sql import functions as F

    high = F.conv(F.substring(F.col(uid_column), 1, 15), 16, 10).cast("long")
    low = F.conv(F.substring(F.col(uid_column), 16, 1), 16, 10).cast("long")
    return F.shiftleft(high, 3) + F.shiftright(low, 1)
