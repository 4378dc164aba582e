"""The demo's funnel as committed in tests/data/demo_funnel.tsv: every demo run in the tests must reproduce it."""

from __future__ import annotations

import re
from pathlib import Path

DEMO_FUNNEL = Path(__file__).resolve().parent / "data" / "demo_funnel.tsv"
# The CLIP cut depends on floating point in the tiny model; every step before it is exact on any machine.
DETERMINISTIC_STAGES = ("extract", "candidates", "download")


def funnel_steps(demo_output: str) -> dict[str, tuple[int, int]]:
    """``stage.step -> (rows in, rows out)`` from the funnel the demo prints last."""
    funnel = demo_output.rsplit("== funnel", 1)[1].split("\n== ", 1)[0]  # up to the next section (export, ...)
    steps = {}
    for line in funnel.splitlines():
        match = re.match(r"^(\w+\.[\w:]+)\s+([\d,]+)\s+([\d,]+)", line)
        if match:
            steps[match.group(1)] = (int(match.group(2).replace(",", "")), int(match.group(3).replace(",", "")))
        outcome = re.match(r"^\s+(status:\w+)\s+([\d,]+)\s*$", line)
        if outcome:
            steps[f"download.{outcome.group(1)}"] = (0, int(outcome.group(2).replace(",", "")))
    return steps


def expected_demo_funnel() -> dict[str, tuple[int, int]]:
    rows = [line.split("\t") for line in DEMO_FUNNEL.read_text().splitlines() if line and not line.startswith("#")]
    return {step: (int(rows_in), int(rows_out)) for step, rows_in, rows_out in rows}


def assert_demo_funnel_is_the_reference(demo_output: str) -> None:
    """Deterministic stages give exactly the committed funnel; scoring gives every step."""
    got = funnel_steps(demo_output)
    expected = expected_demo_funnel()
    exact = {k: v for k, v in expected.items() if k.split(".")[0] in DETERMINISTIC_STAGES}
    assert {k: v for k, v in got.items() if k.split(".")[0] in DETERMINISTIC_STAGES} == exact
    assert {k for k in got if k.startswith("score.")} == {k for k in expected if k.startswith("score.")}


def assert_demo_consumables(demo_output: str, workdir: Path) -> None:
    """What the demo makes after the pipeline: the WebDataset export, the kNN index, and the top 5 of its query."""
    shards = sorted((workdir / "export" / "webdataset").glob("*.tar"))
    assert shards and all(shard.with_suffix(".parquet").is_file() for shard in shards), shards
    assert (workdir / "lake" / "_index" / "manifest.json").is_file()
    search = demo_output.split("== search", 1)[1].split("\n\n", 1)[0].splitlines()
    header, *matches = search[1:]
    assert header.split() == ["rank", "similarity", "url", "caption", "uid"], header
    assert [line.split()[0] for line in matches] == ["1", "2", "3", "4", "5"], search
    # The tiny model knows the demo's shapes: its query "a yellow star on a beige background" finds one first.
    assert "yellow-star-beige" in matches[0], matches[0]
    # The HTML report (laion-spark report), written into the workdir, its path printed.
    assert (workdir / "report.html").is_file() and str(workdir / "report.html") in demo_output


def assert_demo_progress(demo_output: str) -> None:
    """Every stage of the run says how far it got: its progress lines, the last one at its total (README,
    "Progress and logs")."""
    for stage in (*DETERMINISTIC_STAGES, "score", "export", "index"):  # export and index: the demo's outputs
        finals = re.findall(rf"^progress {stage}: ([\d,]+)/([\d,]+) .*, done in ", demo_output, re.M)
        assert finals and finals[-1][0] == finals[-1][1], f"no final progress line of {stage} at its total"


HEADER = """\
# The funnel of `make demo` (laion_spark/demo): every demo run in the tests must reproduce the extract,
# candidates and download rows exactly (the sample crawl and its images are deterministic) and every score step.
# Regenerate with: make demo-reference
"""


def write_reference(demo_output: str) -> None:
    rows = [f"{step}\t{rows_in}\t{rows_out}" for step, (rows_in, rows_out) in funnel_steps(demo_output).items()]
    DEMO_FUNNEL.write_text(HEADER + "\n".join(rows) + "\n")


if __name__ == "__main__":
    import sys

    write_reference(sys.stdin.read())
    print(f"wrote {DEMO_FUNNEL}")
