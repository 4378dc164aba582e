"""The takedown blocklist's joins: a kind with few values is broadcast to the tasks, a bulk list is joined by a
shuffle, and both drop the same rows."""

from __future__ import annotations

import pytest

from laion_spark.remove import blocklist as blocklists
from laion_spark.remove.blocklist import (
    MD5,
    UID,
    URL,
    BlockItem,
    blocked_rows,
    blocklist_of,
    drop_blocked_pairs,
    withhold_blocked_images,
)


@pytest.fixture(scope="module")
def pairs(spark):
    rows = [(f"u{i}", f"https://example.org/img/{i}.jpg", f"{i:032x}", "success", None, b"x") for i in range(40)]
    return spark.createDataFrame(rows, "uid string, url string, md5 string, status string, error string, image binary")


ITEMS = [
    BlockItem("https://example.org/img/3.jpg", URL),
    BlockItem("u7", UID),
    BlockItem("u9", UID),
    BlockItem(f"{11:032x}", MD5),
    BlockItem("https://example.org/nothing.jpg", URL),  # matches no row
]


def _uids(frame) -> list[str]:
    return sorted(row.uid for row in frame.select("uid").collect())


@pytest.mark.parametrize("broadcast_max", [blocklists.BROADCAST_MAX_VALUES, 1])
def test_few_values_are_broadcast_a_bulk_list_is_shuffled_and_both_drop_the_same_rows(
    spark, pairs, monkeypatch, broadcast_max
):
    monkeypatch.setattr(blocklists, "BROADCAST_MAX_VALUES", broadcast_max)
    blocklist = blocklist_of(spark, ITEMS)
    assert blocklist.sizes == {URL: 2, UID: 2, MD5: 1}
    # Over the limit (two URLs, two uids against a limit of one), a kind is not sent whole to every task.
    assert blocklist.broadcast(URL) is (broadcast_max > 1) and blocklist.broadcast(MD5)

    kept = drop_blocked_pairs(pairs, blocklist)
    assert _uids(kept) == sorted({f"u{i}" for i in range(40)} - {"u3", "u7", "u9"})
    assert _uids(blocked_rows(pairs, blocklist, (URL, UID))) == ["u3", "u7", "u9"]
    withheld = withhold_blocked_images(pairs, blocklist).where("status = 'removed'")
    assert [(row.uid, row.image, row.error) for row in withheld.collect()] == [
        ("u11", None, "its md5 is in the lake's removals")
    ]
