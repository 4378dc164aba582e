"""``laion-spark run``: the stages in order over one lake, as one scheduled ETL run.

extract -> candidates -> download -> score, each as its own command runs it (incremental and idempotent: extract
skips files already ``ok``, candidates MERGEs, download fetches only URLs without a row, score only unscored uids),
under one run id, so the funnel of the run is one query. The run holds the lake's run lock (:mod:`.lock`) from the
first stage to the last, stops at the first stage that fails and reports it in one line; the rerun continues
where it stopped, because every stage skips the work already done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pyspark.sql import SparkSession

from laion_spark.config import STAGES, Config, ConfigError
from laion_spark.report import format_funnel
from laion_spark.run.lock import DEFAULT_LEASE_HOURS, LockHolder, LockLost, RunLock
from laion_spark.run.messages import format_duration, one_line
from laion_spark.run.progress import check_log_format, emit_event, emit_stage_summary
from laion_spark.storage import StageCounter, new_run_id
from laion_spark.storage.files import cleanup_afterwards
from laion_spark.storage.stats import OUTCOME_PREFIX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRun:
    """One stage that ran to its end: rows into its first step, rows out of its last, and how long it took."""

    stage: str
    seconds: float
    rows_in: int
    rows_out: int
    first_step: str
    last_step: str
    summary: str

    @classmethod
    def of(cls, stage: str, outcome: object, seconds: float) -> StageRun:
        """From what a stage function returns: a :class:`StageCounter`, or a result holding one (``.counter``)."""
        counter = outcome if isinstance(outcome, StageCounter) else getattr(outcome, "counter", None)
        # "status:<outcome>" rows break the step above down; the stage's output is its last real step.
        steps = [step for step in (counter.steps if counter else []) if not step[0].startswith(OUTCOME_PREFIX)]
        first, last = (steps[0], steps[-1]) if steps else (("-", 0, 0), ("-", 0, 0))
        summary = outcome.summary() if hasattr(outcome, "summary") else ""
        return cls(stage, seconds, first[1], last[2], first[0], last[0], summary)

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    def progress_line(self) -> str:
        return (
            f"{self.stage}: done in {format_duration(self.seconds)}, {self.rows_in:,} rows in ({self.first_step}) "
            f"-> {self.rows_out:,} rows out ({self.last_step}), {self.rows_per_s:,.1f} rows in/s"
        )


@dataclass
class PipelineResult:
    run_id: str
    lake: str
    stages: list[str]  # the stages asked for, in pipeline order
    done: list[StageRun] = field(default_factory=list)
    failed_stage: str | None = None
    failure: str | None = None  # one line: why the run stopped
    error: BaseException | None = None  # the exception behind ``failure`` (its traceback is in the log at DEBUG)
    taken_over_from: LockHolder | None = None  # the stale (or broken) holder of the lake this run replaced
    funnel: str | None = None  # laion_spark.report.format_funnel of this run, when every stage succeeded

    @property
    def ok(self) -> bool:
        return self.failure is None


def select_stages(stages: Iterable[str] | None = None, until: str | None = None) -> list[str]:
    """The stages to run, in pipeline order: ``stages`` (all by default), cut after ``until``."""
    chosen = list(STAGES) if stages is None else [name.strip() for name in stages if name.strip()]
    unknown = [name for name in [*chosen, *([until] if until else [])] if name not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {', '.join(map(repr, unknown))}: choose among {', '.join(STAGES)}")
    last = STAGES.index(until) if until else len(STAGES) - 1
    selected = [name for i, name in enumerate(STAGES) if name in chosen and i <= last]
    if not selected:
        raise ConfigError(f"no stage left to run: --stages {','.join(chosen)} are all after --until {until}")
    return selected


def run_pipeline(
    spark: SparkSession,
    config: Config,
    lake: str,
    inputs: Sequence[str] = (),
    stages: Iterable[str] | None = None,
    until: str | None = None,
    *,
    force: bool = False,
    retry_failed: bool = False,
    run_id: str | None = None,
    lock_lease_hours: float = DEFAULT_LEASE_HOURS,
    break_lock: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run the selected stages in order over ``lake`` under one run id, holding the lake's run lock.

    ``inputs`` feed extract (required when it runs); ``force`` goes to extract, ``retry_failed`` to download.
    ``progress`` gets one line when a stage starts and one when it ends (default: print them, or with
    ``run.log_format: json`` write each as a JSON object; a JSON summary of each stage follows its end line then).
    A stage that raises stops the run: the result then names the stage and the error in one line (``failure``),
    and the traceback is logged at DEBUG. Raises :class:`LakeLocked`, touching no table, when another live run
    holds the lake; ``break_lock`` takes the lake from it at once (for a run known to be dead).
    """
    report = progress or _reporter(config)
    selected = select_stages(stages, until)
    if "extract" in selected and not inputs:
        raise ConfigError("extract needs inputs (--input PATH|GLOB|MANIFEST), or leave it out with --stages")
    result = PipelineResult(run_id or new_run_id(), str(lake), selected)
    runners = _stage_runners(spark, config, result.lake, list(inputs), force, retry_failed, result.run_id)

    lock = RunLock(spark, result.lake, result.run_id, lease_hours=lock_lease_hours)
    result.taken_over_from = lock.acquire(break_lock=break_lock)
    with cleanup_afterwards(lock.release, f"the run lock of {result.lake}"), lock.kept_alive():
        report(f"run {result.run_id} on {result.lake}: {' -> '.join(selected)}")
        if result.taken_over_from is not None:
            why = "--break-lock" if break_lock else f"lease of {format_duration(lock.lease_s)} ran out"
            report(f"took the lake over from {result.taken_over_from.describe()} ({why})")
        for number, name in enumerate(selected, 1):
            step = f"[{number}/{len(selected)}]"
            report(f"{step} {name}: started")
            started = time.monotonic()
            try:
                outcome = runners[name]()
            except Exception as exc:  # noqa: BLE001 - any stage error stops the run, reported in one line
                log.debug("run %s: stage %s failed", result.run_id, name, exc_info=exc)
                report(f"{step} {name}: failed after {format_duration(time.monotonic() - started)}")
                result.failed_stage, result.error = name, exc
                result.failure = f"stage {name} failed: {one_line(exc)}"
                break
            done = StageRun.of(name, outcome, time.monotonic() - started)
            result.done.append(done)
            emit_stage_summary(config, name, outcome, done.seconds, result.run_id)
            log.debug("%s", done.summary)
            report(f"{step} {done.progress_line()}")
            if number < len(selected) and not _still_holds(lock, result):
                break
        if result.ok:
            result.funnel = _funnel(spark, result)
    return result


def _stage_runners(
    spark: SparkSession,
    config: Config,
    lake: str,
    inputs: list[str],
    force: bool,
    retry_failed: bool,
    run_id: str,
) -> dict[str, Callable[[], object]]:
    # Imported here: each stage pulls in its own dependencies, which `laion-spark --help` should not wait for.
    from laion_spark.candidates import run_candidates
    from laion_spark.download import run_download
    from laion_spark.extract import run_extract
    from laion_spark.score import run_score

    return {
        "extract": lambda: run_extract(spark, config, lake, inputs, force=force, run_id=run_id),
        "candidates": lambda: run_candidates(spark, config, lake, run_id=run_id),
        "download": lambda: run_download(spark, config, lake, run_id=run_id, retry_failed=retry_failed),
        "score": lambda: run_score(spark, config, lake, run_id=run_id),
    }


def _still_holds(lock: RunLock, result: PipelineResult) -> bool:
    """Heartbeat between two stages. A lost lock stops the run; a heartbeat that fails otherwise does not."""
    try:
        lock.heartbeat()
    except LockLost as exc:
        result.failure, result.error = str(exc), exc
        return False
    except Exception as exc:  # noqa: BLE001 - the lease outlasts one missed heartbeat
        log.warning("run %s could not heartbeat its run lock: %s", result.run_id, one_line(exc))
    return True


def _funnel(spark: SparkSession, result: PipelineResult) -> str | None:
    try:
        return format_funnel(spark, result.lake, result.run_id)
    except Exception as exc:  # noqa: BLE001 - the stages succeeded; a report that fails must not say otherwise
        log.warning("run %s: could not draw the funnel: %s", result.run_id, one_line(exc))
        return None


def _print(line: str) -> None:
    print(line, flush=True)


def _reporter(config: Config) -> Callable[[str], None]:
    """Where the run's own lines go: printed, or as JSON objects (``{"event": "run", ...}``) in json format."""
    if check_log_format(config.run.log_format) == "text":
        return _print
    return lambda line: emit_event({"event": "run", "message": line}, None, "json")
