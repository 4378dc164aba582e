"""One-line messages for the operator of a run: durations and errors, short enough for a scheduler's log line."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """``6h``, ``1h30m``, ``4m12s``, ``3.2s``: short enough for a one-line message."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    return f"{minutes}m{secs:02d}s"


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line, for a user-facing report; the traceback belongs in the log.

    Spark wraps errors: a Python worker's exception arrives as its whole traceback (its last line is the error),
    and a JVM error through Py4J starts with "An error occurred while calling ..." (the next line is the error).
    """
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    marker = "Traceback (most recent call last):"
    if marker in text:
        tail = text.rsplit(marker, 1)[1].split("JVM stacktrace:", 1)[0].splitlines()
        raised = [line for line in tail if line.strip() and not line[0].isspace()]
        lines = raised[-1:] or lines
    elif lines and lines[0].startswith("An error occurred while calling") and len(lines) > 1:
        lines = [lines[1].lstrip(": ")]
    message = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return message if len(message) <= limit else message[: limit - 3] + "..."
