"""The whole pipeline as one run (``laion-spark run``), and the lake's run lock that keeps two runs apart."""

from laion_spark.run.lock import DEFAULT_LEASE_HOURS, LakeLocked, LockHolder, LockLost, RunLock, is_commit_conflict
from laion_spark.run.messages import format_duration, one_line
from laion_spark.run.pipeline import STAGES, PipelineResult, StageRun, run_pipeline, select_stages

__all__ = [
    "DEFAULT_LEASE_HOURS",
    "STAGES",
    "LakeLocked",
    "LockHolder",
    "LockLost",
    "PipelineResult",
    "RunLock",
    "StageRun",
    "format_duration",
    "is_commit_conflict",
    "one_line",
    "run_pipeline",
    "select_stages",
]
