"""What a stage says while it runs: a progress line at a steady interval, and one summary when it ends.

A stage works in slices (README, "Crawl scale"), and knows before the first one how much it has to do: files for
extract, URLs for download, images for score, commits of ``pairs`` for candidates. So progress is counted here, on
the driver, from the slices it commits, not by polling tables or asking Spark's status tracker (which Spark
Connect does not offer): :class:`Progress` holds done and total, and a timer thread prints one line every
``run.progress_interval_s`` seconds, the rate and time left included, and a last one when the stage ends::

    progress download: 40,000/200,000 urls (20.0%), 1,234 urls/s, ETA 2m10s

Between two slice commits the line repeats the count and the rate falls, as it should: the rate is what was
committed per second since the stage started, and the time left follows from it.

With ``run.log_format: json`` (``laion-spark --log-format json``) every such line, and the summary of each stage,
is one JSON object on one line instead, for schedulers and log search: see :func:`progress_event` and
:func:`stage_summary_event`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from laion_spark.config import LOG_FORMATS, Config, ConfigError
from laion_spark.run.messages import format_duration

DEFAULT_INTERVAL_S = 30.0

# Lines from the timer threads and the stage's own thread must not interleave within a line.
_WRITE_LOCK = threading.Lock()


def check_log_format(log_format: str) -> str:
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"run.log_format = {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    return log_format


def write_line(line: str) -> None:
    """One line on standard output, where the run's other lines go (looked up at each call: tests capture it)."""
    with _WRITE_LOCK:
        print(line, file=sys.stdout, flush=True)


def emit_event(
    event: dict[str, Any], text: str | None, log_format: str, write: Callable[[str], None] | None = None
) -> None:
    """Write ``event`` as one JSON line in json format, else ``text`` (nothing when it is None)."""
    out = write or write_line
    if log_format == "json":
        out(json.dumps(event, separators=(", ", ": "), default=str))
    elif text is not None:
        out(text)


@dataclass(frozen=True)
class ProgressState:
    """What a progress line says, at one moment."""

    stage: str
    done: int
    total: int | None
    unit: str
    elapsed_s: float
    final: bool = False

    @property
    def rate(self) -> float:
        """Units committed per second since the stage started."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None before the first slice is committed or with no total."""
        if self.total is None:
            return None
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None

    def line(self) -> str:
        count = f"{self.done:,}/{self.total:,} {self.unit}" if self.total is not None else f"{self.done:,} {self.unit}"
        parts = [f"progress {self.stage}: {count}"]
        if self.total is not None:
            parts[0] += f" ({100.0 * self.done / self.total if self.total else 100.0:.1f}%)"
        parts.append(f"{_number(self.rate)} {self.unit}/s")
        if self.final:
            parts.append(f"done in {format_duration(self.elapsed_s)}")
        elif self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        elif self.total is not None:
            parts.append("ETA unknown")  # nothing committed yet: no rate to go by
        return ", ".join(parts)


def progress_event(state: ProgressState, run_id: str | None = None) -> dict[str, Any]:
    """The JSON form of a progress line."""
    eta = state.eta_s
    return {
        "event": "progress",
        "stage": state.stage,
        "run_id": run_id,
        "done": state.done,
        "total": state.total,
        "unit": state.unit,
        "rate": round(state.rate, 3),
        "eta_s": None if eta is None else round(eta, 1),
        "elapsed_s": round(state.elapsed_s, 3),
        "final": state.final,
    }


class Progress:
    """The progress of one stage: ``advance`` as slices commit; a timer thread reports every ``interval_s``.

    Use it as a context manager: the timer starts on entry, and on exit it stops and the last line is written
    (the count as it stands, even when the stage failed: the line then says how far it got).
    ``clock`` and ``write`` are the time source and the line's destination (standard output by default).
    """

    def __init__(
        self,
        stage: str,
        total: int | None = None,
        unit: str = "rows",
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        log_format: str = "text",
        run_id: str | None = None,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not interval_s > 0:
            raise ConfigError(f"run.progress_interval_s must be positive, got {interval_s}")
        self.stage, self.unit, self.run_id = stage, unit, run_id
        self.interval_s = float(interval_s)
        self.log_format = check_log_format(log_format)
        self._write = write
        self._clock = clock
        self._lock = threading.Lock()
        self._total = None if total is None else max(0, int(total))
        self._done = 0
        self._started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def set_total(self, total: int) -> None:
        with self._lock:
            self._total = max(0, int(total))

    def advance(self, n: int = 1) -> None:
        """``n`` more units done (a slice committed). Never past the total: slice sizes are estimates."""
        with self._lock:
            self._done += max(0, int(n))
            if self._total is not None:
                self._done = min(self._done, self._total)

    def state(self, final: bool = False) -> ProgressState:
        with self._lock:
            done, total = self._done, self._total
        return ProgressState(self.stage, done, total, self.unit, self._clock() - self._started, final)

    def report(self, final: bool = False) -> None:
        state = self.state(final)
        emit_event(progress_event(state, self.run_id), state.line(), self.log_format, self._write)

    def start(self) -> Progress:
        if self._thread is None:
            self._started = self._clock()
            self._thread = threading.Thread(target=self._tick, name=f"progress-{self.stage}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the timer and write the last line (once)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.report(final=True)

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.report()
            except Exception:  # noqa: BLE001 - a line that cannot be written must not stop the stage
                return


@contextmanager
def stage_progress(
    config: Config, stage: str, total: int | None, unit: str, run_id: str | None = None
) -> Iterator[Progress]:
    """A :class:`Progress` for ``stage``, with the interval and format of ``config.run``, running for the block."""
    with Progress(
        stage, total, unit, interval_s=config.run.progress_interval_s, log_format=config.run.log_format, run_id=run_id
    ) as progress:
        yield progress


def stage_summary_event(stage: str, run_id: str | None, outcome: object, seconds: float) -> dict[str, Any]:
    """The JSON summary of a stage that ran: its counters and how long it took.

    ``outcome`` is what the stage function returned: a ``StageCounter``, or a result holding one (``.counter``),
    whose steps become ``{step: {"rows_in", "rows_out"}}``; another result dataclass gives its whole-number fields.
    """
    counter = outcome if hasattr(outcome, "steps") else getattr(outcome, "counter", None)
    counters: dict[str, Any] = {}
    if counter is not None:
        for step, rows_in, rows_out in counter.steps:
            counters[step] = {"rows_in": rows_in, "rows_out": rows_out}
        run_id = run_id or getattr(counter, "run_id", None)
    elif is_dataclass(outcome):
        for item in fields(outcome):
            value = getattr(outcome, item.name)
            if isinstance(value, int) and not isinstance(value, bool):
                counters[item.name] = value
    run_id = run_id or getattr(outcome, "run_id", None)
    return {
        "event": "stage_summary",
        "stage": stage,
        "run_id": run_id,
        "counters": counters,
        "seconds": round(seconds, 3),
    }


def emit_stage_summary(
    config: Config,
    stage: str,
    outcome: object,
    seconds: float,
    run_id: str | None = None,
    write: Callable[[str], None] | None = None,
) -> bool:
    """Write the stage's summary as one JSON line when ``config.run.log_format`` is json; whether it did."""
    if check_log_format(config.run.log_format) != "json":
        return False
    emit_event(stage_summary_event(stage, run_id, outcome, seconds), None, "json", write)
    return True


class JsonLogFormatter(logging.Formatter):
    """Every log record as one JSON object on one line (``--log-format json``), for log search to index."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "event": "log",
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_format: str, verbose: bool = False) -> None:
    """Root logging for the command line: text lines, or one JSON object a line; on standard error either way.
    Like ``logging.basicConfig``, it leaves a root logger that already has handlers alone (a host application's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter() if check_log_format(log_format) == "json" else logging.Formatter(TEXT_LOG_FORMAT)
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    # A slow unit (a commit of pairs every minute) still shows a rate, not 0.0.
    return f"{value:.1f}" if value >= 0.1 or value == 0 else f"{value:.3f}"
