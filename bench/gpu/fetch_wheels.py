"""Download open_clip and what it imports, less what a stock torch + torchvision install already has, as wheels.

    .venv/bin/python bench/gpu/fetch_wheels.py                       # for CPython 3.10, 3.11 and 3.12
    .venv/bin/python bench/gpu/fetch_wheels.py --python 3.11

They land in bench/gpu/wheels/ (gitignored, a few MB: it travels to the device machine, capped at 64 MiB), where
score_gpu.py installs them with ``pip install --no-index --find-links``. The list is the dependency closure of
open_clip_torch and PyYAML (laion_spark.config) in this venv minus the closure of torch and torchvision, at the
versions this venv runs, so the device gets the same open_clip the tests use. Pure-Python wheels are fetched once;
compiled ones (regex, PyYAML, ...) once per Python version, since the device's Python is not known here.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from packaging.markers import Marker

WHEELS = Path(__file__).resolve().parent / "wheels"
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64"]


def closure(names: list[str]) -> set[str]:
    """Installed distributions ``names`` need, themselves included (markers evaluated for this machine)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue
        for requirement in requirements:
            if ";" in requirement and not Marker(requirement.split(";", 1)[1]).evaluate():
                continue
            todo.append(re.split(r"[<>=!~\[ ;(]", requirement, maxsplit=1)[0])
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", nargs="+", default=["3.10", "3.11", "3.12"], help="the device's Python versions")
    args = parser.parse_args(argv)
    needed = sorted(closure(["open_clip_torch", "pyyaml"]) - closure(["torch", "torchvision"]))
    pins = [f"{name}=={version(name)}" for name in needed]
    print("fetching", " ".join(pins))
    WHEELS.mkdir(exist_ok=True)
    for python in args.python:
        for pin in pins:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            command += ["--dest", str(WHEELS), "--python-version", python, "--implementation", "cp"]
            command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
            if subprocess.run([*command, pin], check=False).returncode != 0:
                # A pin this venv runs may have no wheel for an older Python; take the newest that has one.
                subprocess.run([*command, pin.split("==")[0]], check=True)
    size = sum(path.stat().st_size for path in WHEELS.glob("*.whl"))
    print(f"{len(list(WHEELS.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {WHEELS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
