"""The run lock: one row in the Delta table ``<lake>/_run_lock`` keeps two pipeline runs off one lake at once.

Scheduled runs overlap when one of them runs long. Each stage is idempotent on its own, but two runs interleaving
would fetch and score the same rows twice, share the staging tables and mix their counters. So ``laion-spark run``
holds the lake while it runs:

- acquire is a compare-and-set done by Delta: one ``MERGE`` takes the row only when it is free, stale (its heartbeat
  is older than the lease) or broken on purpose. Of two concurrent MERGEs Delta's optimistic concurrency lets at
  most one commit; the other fails with a conflict, read here as "held by another run". Reading the row back then
  says who holds it.
- the holder heartbeats while it runs (between stages, and from a background thread during a long one), so a
  live run is never taken over; a run that died without releasing is taken over once its lease has run out, or at
  once with ``break_lock``.
- release frees the row, whether the run succeeded or failed.

The lock is as strong as Delta's guarantee for concurrent writers: on S3 that needs a log store with put-if-absent
(S3's conditional writes or the DynamoDB log store), as every multi-writer Delta table does. Only SQL is used, so it
also runs on Spark Connect.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pyspark.sql import SparkSession

from laion_spark.config import DEFAULT_LEASE_HOURS
from laion_spark.run.messages import format_duration, one_line
from laion_spark.schemas import RUN_LOCK, RUN_LOCK_SCHEMA
from laion_spark.storage import ensure_table, table_exists, table_ref

log = logging.getLogger(__name__)

LOCK_KEY = "lake"  # the table holds this one row
# A commit conflict means another run changed the row meanwhile: try again, then read who holds it.
_ATTEMPTS = 3
# Markers of Delta's commit conflicts, as classic PySpark (a Py4J error naming the Java class) and Spark Connect
# (the error class) report them.
_CONFLICT_MARKERS = (
    "DELTA_CONCURRENT",
    "DELTA_METADATA_CHANGED",
    "DELTA_PROTOCOL_CHANGED",
    "ConcurrentModificationException",
    "ConcurrentAppendException",
    "ConcurrentDeleteReadException",
    "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException",
    "MetadataChangedException",
    "ProtocolChangedException",
)


def is_commit_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is Delta refusing a commit because a concurrent one won."""
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _CONFLICT_MARKERS)


@dataclass(frozen=True)
class LockHolder:
    """The run that holds the lake, as the lock row says; times are UTC, ``now`` is the Spark driver's clock."""

    run_id: str
    host: str | None
    pid: int | None
    started_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    now: dt.datetime

    @property
    def heartbeat_age_s(self) -> float:
        return (self.now - (self.heartbeat_at or self.started_at or self.now)).total_seconds()

    def is_stale(self, lease_s: float) -> bool:
        return self.heartbeat_age_s > lease_s

    def describe(self) -> str:
        started = f" since {_utc(self.started_at)}" if self.started_at else ""
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}){started}, "
            f"last heartbeat {format_duration(self.heartbeat_age_s)} ago"
        )


class LakeLocked(RuntimeError):
    """Another run holds the lake (nothing was run, no table was touched)."""

    def __init__(self, lake: str, holder: LockHolder | None, lease_s: float):
        self.lake, self.holder, self.lease_s = lake, holder, lease_s
        if holder is None:
            message = f"could not take the run lock of {lake}: concurrent runs kept changing it; try again"
        else:
            expires = holder.now + dt.timedelta(seconds=max(0.0, lease_s - holder.heartbeat_age_s))
            message = (
                f"the lake {lake} is held by {holder.describe()}; a run that died is taken over once its heartbeat "
                f"is {format_duration(lease_s)} old (lease, at {_utc(expires)}), or at once with --break-lock"
            )
        super().__init__(message)


class LockLost(RuntimeError):
    """Another run took the lake over while this one held it (its lease ran out, or the lock was broken)."""


class RunLock:
    """The lake's run lock, held by ``run_id``. ``acquire`` first; ``release`` in a ``finally``."""

    def __init__(
        self,
        spark: SparkSession,
        lake: str,
        run_id: str,
        lease_hours: float = DEFAULT_LEASE_HOURS,
        host: str | None = None,
        pid: int | None = None,
    ):
        if lease_hours <= 0:
            raise ValueError(f"the lock lease must be positive, got {lease_hours} hours")
        self.spark, self.lake, self.run_id = spark, str(lake), run_id
        self.lease_s = lease_hours * 3600.0
        self.host = host if host is not None else socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self.table = table_ref(self.lake, RUN_LOCK)

    def acquire(self, break_lock: bool = False) -> LockHolder | None:
        """Take the lake, or raise :class:`LakeLocked`. Returns the run taken over (stale or broken), else None."""
        self._ensure_table()
        before = self.holder()
        if before is not None and before.run_id != self.run_id and not break_lock and not before.is_stale(self.lease_s):
            raise LakeLocked(self.lake, before, self.lease_s)  # held: no commit needed to know it
        takeable = f"held.run_id IS NULL OR held.run_id = me.run_id OR {self._stale('held')}"
        me = (
            f"SELECT {_literal(LOCK_KEY)} AS lock_key, {_literal(self.run_id)} AS run_id, "
            f"{_literal(self.host)} AS host, CAST({int(self.pid)} AS BIGINT) AS pid"
        )
        self._with_retries(
            f"MERGE INTO {self.table} AS held USING ({me}) AS me ON held.lock_key = me.lock_key "
            f"WHEN MATCHED AND ({'TRUE' if break_lock else takeable}) THEN UPDATE SET run_id = me.run_id, "
            "host = me.host, pid = me.pid, heartbeat_at = current_timestamp(), "
            "started_at = CASE WHEN held.run_id <=> me.run_id THEN held.started_at ELSE current_timestamp() END "
            "WHEN NOT MATCHED THEN INSERT (lock_key, run_id, host, pid, started_at, heartbeat_at) "
            "VALUES (me.lock_key, me.run_id, me.host, me.pid, current_timestamp(), current_timestamp())",
            on_conflict="taking the lock",
        )
        now = self.holder()  # the compare-and-set's verdict: whoever the row names holds the lake
        if now is None or now.run_id != self.run_id:
            raise LakeLocked(self.lake, now, self.lease_s)
        if before is not None and before.run_id != self.run_id:
            log.info("run %s took the lake %s over from %s", self.run_id, self.lake, before.describe())
            return before
        return None

    def heartbeat(self) -> None:
        """Mark the lock as alive; raise :class:`LockLost` when another run holds it now."""
        updated = self._with_retries(
            f"UPDATE {self.table} SET heartbeat_at = current_timestamp() WHERE {self._mine()}",
            on_conflict="heartbeating",
        )
        if updated:
            return  # the row named this run when the update committed: it still holds the lake
        holder = self.holder()
        if holder is None or holder.run_id != self.run_id:
            taker = holder.describe() if holder else "no run (the lock row was freed)"
            raise LockLost(
                f"run {self.run_id} lost the run lock of {self.lake} to {taker}: its lease "
                f"({format_duration(self.lease_s)}) ran out or the lock was broken; stopping so that the two runs "
                "do not interleave"
            )

    def release(self) -> None:
        """Free the lake, if this run still holds it (a run taken over leaves the new holder alone)."""
        released = self._with_retries(
            f"UPDATE {self.table} SET run_id = NULL, host = NULL, pid = NULL, started_at = NULL, "
            f"heartbeat_at = current_timestamp() WHERE {self._mine()}",
            on_conflict="releasing",
        )
        if not released:
            log.info("run %s released nothing: it did not hold the run lock of %s any more", self.run_id, self.lake)

    def holder(self) -> LockHolder | None:
        """The run holding the lake now, or None when it is free."""
        if not table_exists(self.spark, self.lake, RUN_LOCK):
            return None
        rows = self.spark.sql(
            "SELECT run_id, host, pid, unix_micros(started_at) AS started_us, "
            "unix_micros(heartbeat_at) AS heartbeat_us, unix_micros(current_timestamp()) AS now_us "
            f"FROM {self.table} WHERE lock_key = {_literal(LOCK_KEY)} AND run_id IS NOT NULL"
        ).collect()  # at most one row
        if not rows:
            return None
        row = rows[0]
        return LockHolder(
            row.run_id, row.host, row.pid, _instant(row.started_us), _instant(row.heartbeat_us), _instant(row.now_us)
        )

    @contextlib.contextmanager
    def kept_alive(self, interval_s: float | None = None) -> Iterator[None]:
        """Heartbeat from a background thread while the block runs, so that a stage longer than the lease does not
        let a second run take over a live one. A lost lock is reported by the next :meth:`heartbeat` call."""
        interval = interval_s if interval_s is not None else self.lease_s / 4
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.heartbeat()
                except LockLost:
                    return
                except Exception as exc:  # noqa: BLE001 - a missed heartbeat is not worth failing the run for
                    log.warning("run %s could not heartbeat its run lock: %s", self.run_id, one_line(exc))

        thread = threading.Thread(target=beat, name=f"run-lock-heartbeat-{self.run_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=120)  # a heartbeat that outlives this only updates a row this run holds

    def _ensure_table(self) -> None:
        try:
            ensure_table(self.spark, self.lake, RUN_LOCK, RUN_LOCK_SCHEMA)
        except Exception:
            # Two first runs creating it at once: one of the two creations fails, and the table is there.
            if not table_exists(self.spark, self.lake, RUN_LOCK):
                raise

    def _mine(self) -> str:
        return f"lock_key = {_literal(LOCK_KEY)} AND run_id = {_literal(self.run_id)}"

    def _stale(self, alias: str) -> str:
        lease_us = int(self.lease_s * 1_000_000)
        return f"unix_micros({alias}.heartbeat_at) < unix_micros(current_timestamp()) - {lease_us}"

    def _with_retries(self, statement: str, on_conflict: str) -> int:
        """Run ``statement`` (an UPDATE or a MERGE), again when a concurrent commit wins; the rows it changed, 0
        when every attempt lost (the caller reads the row back to know where it stands)."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                # Delta's DML returns one row of counts; num_affected_rows is the rows it changed.
                counts = self.spark.sql(statement).first()
            except Exception as exc:
                if not is_commit_conflict(exc):
                    raise
                log.debug("run %s: a concurrent commit won while %s (attempt %d)", self.run_id, on_conflict, attempt)
                continue
            return int(counts["num_affected_rows"]) if counts is not None else 0
        return 0


def _literal(value: str) -> str:
    """A Spark SQL string literal (the default parser reads backslash escapes)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _instant(micros: int | None) -> dt.datetime | None:
    if micros is None:
        return None
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=int(micros))


def _utc(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
