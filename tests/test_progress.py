"""Progress while a stage runs: a line at a steady interval (done/total, rate, ETA) and, with --log-format json, one
JSON object a line, stage summaries included.

The line's arithmetic is checked with a fake clock; the timer and the wiring into a stage with a real multi-slice
download (local Spark and Delta, a loopback image server, a lake of the test's own).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time

import pytest

from laion_spark.cli import main
from laion_spark.config import Config, ConfigError, RunConfig, load_config
from laion_spark.download import run_download
from laion_spark.extract.text import text_key
from laion_spark.run.progress import Progress, emit_stage_summary
from laion_spark.schemas import CANDIDATES, CANDIDATES_SCHEMA
from laion_spark.storage import StageCounter, append
from laion_spark.testing.server import serve_synthetic_images, synthetic_image_path
from laion_spark.testing.synthetic import all_kinds

PROGRESS_LINE = re.compile(
    r"^progress (\w+): ([\d,]+)/([\d,]+) (\w+) \(([\d.]+)%\), ([\d,.]+) \w+/s, (ETA .+|done in .+)$"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress(total: int | None, unit: str = "urls", **options) -> tuple[Progress, FakeClock, list[str]]:
    clock, lines = FakeClock(), []
    progress = Progress("download", total, unit, clock=clock, write=lines.append, **options)
    return progress, clock, lines


def test_progress_line_gives_done_of_total_the_rate_and_the_time_left() -> None:
    progress, clock, lines = _progress(200_000)
    clock.now += 32.4
    progress.advance(40_000)
    progress.report()
    assert lines == ["progress download: 40,000/200,000 urls (20.0%), 1,235 urls/s, ETA 2m10s"]


def test_progress_before_the_first_commit_has_no_eta_and_the_last_line_says_how_long_it_took() -> None:
    progress, clock, lines = _progress(3, unit="files")
    clock.now += 5
    progress.report()
    progress.advance(2)
    progress.advance(5)  # slice sizes are estimates: never past the total
    clock.now += 95
    progress.close()
    progress.close()  # once only
    assert lines == [
        "progress download: 0/3 files (0.0%), 0.0 files/s, ETA unknown",
        "progress download: 3/3 files (100.0%), 0.030 files/s, done in 1m40s",
    ]


def test_progress_without_a_known_total_counts_what_is_done() -> None:
    progress, clock, lines = _progress(None, unit="commits")
    clock.now += 2
    progress.advance(3)
    progress.report()
    progress.set_total(6)
    progress.report()
    assert lines == [
        "progress download: 3 commits, 1.5 commits/s",
        "progress download: 3/6 commits (50.0%), 1.5 commits/s, ETA 2.0s",
    ]


def test_progress_in_json_is_one_object_a_line() -> None:
    progress, clock, lines = _progress(1000, log_format="json", run_id="r1")
    clock.now += 10
    progress.advance(250)
    progress.report()
    event = json.loads(lines[0])
    assert event == {
        "event": "progress",
        "stage": "download",
        "run_id": "r1",
        "done": 250,
        "total": 1000,
        "unit": "urls",
        "rate": 25.0,
        "eta_s": 30.0,
        "elapsed_s": 10.0,
        "final": False,
    }


def test_the_timer_writes_at_a_steady_interval_and_stops_at_close() -> None:
    lines: list[str] = []
    with Progress("score", 10, "images", interval_s=0.05, write=lines.append) as progress:
        time.sleep(0.5)
        progress.advance(10)
    written = len(lines)
    time.sleep(0.2)
    assert len(lines) == written, "no line after close"
    assert 4 <= written <= 12, lines
    assert lines[-1].startswith("progress score: 10/10 images (100.0%)") and "done in" in lines[-1]
    assert not [t for t in threading.enumerate() if t.name == "progress-score"]


def test_bad_progress_settings_are_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="run.log_format"):
        Progress("score", 1, "images", log_format="yaml")
    with pytest.raises(ConfigError, match="run.progress_interval_s"):
        Progress("score", 1, "images", interval_s=0)


def test_stage_summary_in_json_holds_every_counter() -> None:
    counter = StageCounter("r2", "download")
    counter.add("to_fetch", 10, 8)
    counter.add("success", 8, 6)
    lines: list[str] = []
    assert not emit_stage_summary(Config(), "download", counter, 1.5, write=lines.append)  # text: nothing
    json_config = Config(run=RunConfig(log_format="json"))
    assert emit_stage_summary(json_config, "download", counter, 1.5, write=lines.append)
    assert [json.loads(line) for line in lines] == [
        {
            "event": "stage_summary",
            "stage": "download",
            "run_id": "r2",
            "counters": {"to_fetch": {"rows_in": 10, "rows_out": 8}, "success": {"rows_in": 8, "rows_out": 6}},
            "seconds": 1.5,
        }
    ]


def _write_candidates(spark, lake: str, base_url: str, count: int) -> None:
    kinds = all_kinds()
    rows = []
    for n in range(count):
        url = base_url + synthetic_image_path(kinds[n % len(kinds)], seed=n)
        text = f"a synthetic picture number {n}"
        uid = hashlib.sha1(f"{url}\t{text}".encode()).hexdigest()
        rows.append((uid, uid, url, text, text_key(text), None, "test.warc.gz", 0, None, "en", 0.99, None, None, None))
    append(spark.createDataFrame(rows, CANDIDATES_SCHEMA), lake, CANDIDATES)


@pytest.fixture(scope="module")
def image_server():
    server, base_url = serve_synthetic_images(host="127.0.0.1", port=0)
    yield base_url
    server.shutdown()


def _download_overrides(base_url: str) -> list[str]:
    host = base_url.removeprefix("http://")
    return [
        f"download.allowed_hosts=['{host}']",
        "download.urls_per_slice=8",
        "download.threads=8",
        "run.progress_interval_s=0.2",
    ]


@pytest.mark.slow
def test_a_multi_slice_download_writes_progress_lines_up_to_its_total(spark, tmp_path, image_server, capsys) -> None:
    lake = str(tmp_path / "lake")
    _write_candidates(spark, lake, image_server, 24)
    config = load_config(None, _download_overrides(image_server))
    capsys.readouterr()
    run_download(spark, config, lake, run_id="progress-test")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("progress download:")]
    parsed = [PROGRESS_LINE.match(line) for line in lines]
    assert all(parsed), lines
    done = [int(match.group(2).replace(",", "")) for match in parsed]
    assert {int(match.group(3).replace(",", "")) for match in parsed} == {24}, lines
    assert done == sorted(done), "done never goes back"
    assert any(0 < d < 24 for d in done), f"a line between two slice commits: {lines}"
    assert done[-1] == 24 and parsed[-1].group(7).startswith("done in")
    assert len(lines) >= 4, "one line every 0.2 s over three slices, and the last"


@pytest.mark.slow
def test_log_format_json_writes_progress_and_the_stage_summary_as_json_lines(
    spark, tmp_path, image_server, capsys
) -> None:
    lake = str(tmp_path / "lake")
    _write_candidates(spark, lake, image_server, 16)
    options = [option for override in _download_overrides(image_server) for option in ("--set", override)]
    capsys.readouterr()
    assert main(["--log-format", "json", "download", "--lake", lake, *options]) == 0
    out = capsys.readouterr().out
    events = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line is JSON
    progress = [event for event in events if event["event"] == "progress"]
    assert progress and {event["stage"] for event in progress} == {"download"}
    assert progress[-1]["final"] and progress[-1]["done"] == progress[-1]["total"] == 16
    assert [event["done"] for event in progress] == sorted(event["done"] for event in progress)
    (summary,) = [event for event in events if event["event"] == "stage_summary"]
    assert summary["stage"] == "download" and summary["seconds"] > 0
    assert summary["counters"]["success"] == {"rows_in": 16, "rows_out": 16}
    assert summary["run_id"] == progress[-1]["run_id"]
    # The option also goes after the subcommand, as every other option does.
    assert main(["download", "--lake", lake, "--log-format", "json", *options]) == 0
    assert all(json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip())
