"""The peers' own tools (clip-retrieval, cc2dataset) installed from PyPI into virtual environments of their own.

laion_spark depends on none of them, and their pins contradict ours (clip-retrieval wants numpy<2 and pyarrow<16,
cc2dataset its own pyspark), so each gets its own environment and runs in a child process. The tests and benches
that use one skip or report cleanly when it cannot be installed (no index reachable).

A peer that needs torch reuses the project's torch and open_clip rather than downloading a second multi-GB CUDA
build: its environment sees the project's site-packages *after* its own (a ``.pth`` file), so its own numpy and
pyarrow win, and torch, torchvision and open_clip come from the project. Its own requirements are installed
before that file exists, so pip resolves them against the peer's environment alone; the packages that would pull
torch in are installed afterwards without their dependencies.
"""

from __future__ import annotations

import hashlib
import json
import site
import subprocess
import venv
from dataclasses import dataclass
from pathlib import Path

PROJECT_PACKAGES_PTH = "zz_laion_spark_project.pth"  # "zz": after everything the peer installed itself
READY_MARKER = "laion_spark_peer.json"


class PeerUnavailable(RuntimeError):
    """The peer could not be installed or run; the message says why."""


@dataclass(frozen=True)
class PeerEnv:
    name: str
    probe: str  # a statement that runs in the environment once it is complete
    requirements: tuple[str, ...]  # installed with their dependencies
    without_dependencies: tuple[str, ...] = ()  # installed with --no-deps: their dependencies would pull torch
    shares_project_packages: bool = False  # torch, open_clip and Pillow come from the project's environment

    def fingerprint(self) -> str:
        settings = [self.requirements, self.without_dependencies, self.shares_project_packages]
        return hashlib.sha256(json.dumps(settings).encode("utf-8")).hexdigest()[:16]


# clip-retrieval's `index` (autofaiss) and `back` (Flask) and its ClipClient. Its import pulls in every
# subcommand's modules (inference: wandb, sentence-transformers, img2dataset), hence the long list; the versions
# are those its 2.45.0 release declares.
CLIP_RETRIEVAL = PeerEnv(
    name="clip-retrieval",
    probe="import clip_retrieval.cli, clip_retrieval.clip_client, all_clip, autofaiss, torch, open_clip",
    requirements=(
        "autofaiss>=2.17,<3",
        "faiss-cpu>=1.7.2,<2",
        "numpy>=1.19.5,<2",
        "pandas>=1.1.5,<3",
        "pyarrow>=6.0.1,<16",
        "fire>=0.4,<0.6",
        "flask>=3,<4",
        "flask_restful>=0.3.9,<1",
        "flask_cors>=4,<5",
        "h5py>=3.1,<4",
        "prometheus-client>=0.13.1,<1",
        "fsspec",
        "tqdm>=4.62.3,<5",
        "requests>=2.28,<3",
        "aiohttp>=3.8.1,<4",
        "wandb>=0.17",
        "webdataset>=0.2,<0.3",
        "img2dataset>=1.46,<2",
        "ftfy",
        "regex",
        "transformers>=4.34,<5",
        "scikit-learn",
        "scipy>=1.11",
        "setuptools<81",  # clip-anytorch imports pkg_resources
    ),
    without_dependencies=(
        "clip-retrieval==2.45.0",
        "all_clip==1.3.0",
        "clip-anytorch>=2.5,<3",
        "sentence-transformers>=2.2,<3",
    ),
    shares_project_packages=True,
)

# img2dataset's own CLI (bench/download.py runs it on the same URLs as our download stage). It needs no torch: its
# environment is entirely its own (OpenCV for decode, resize and encode; its own pyarrow, pandas and fsspec).
IMG2DATASET = PeerEnv(name="img2dataset", probe="import img2dataset, cv2", requirements=("img2dataset==1.47.0",))


def peer_python(env: PeerEnv, directory: Path) -> Path:
    """The Python of ``env`` installed in ``directory`` (created and installed on first use, or when ``env``
    changed). Raises PeerUnavailable with pip's last line when it cannot be installed."""
    python = directory / "bin" / "python"
    marker = directory / READY_MARKER
    if python.exists() and marker.exists() and json.loads(marker.read_text()).get("fingerprint") == env.fingerprint():
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    _pip(python, list(env.requirements))
    if env.shares_project_packages:
        peer_site = Path(_run(python, ["-c", "import site; print(site.getsitepackages()[0])"]).strip())
        (peer_site / PROJECT_PACKAGES_PTH).write_text("\n".join(site.getsitepackages()) + "\n")
    if env.without_dependencies:
        _pip(python, ["--no-deps", *env.without_dependencies])
    _run(python, ["-c", env.probe], what=f"{env.name} does not import in {directory}")
    marker.write_text(json.dumps({"name": env.name, "fingerprint": env.fingerprint()}) + "\n")
    return python


def _pip(python: Path, arguments: list[str]) -> None:
    _run(python, ["-m", "pip", "install", "-q", "--disable-pip-version-check", *arguments], what="pip install")


def _run(python: Path, arguments: list[str], what: str = "") -> str:
    done = subprocess.run([str(python), *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if "WARNING" not in line]
        raise PeerUnavailable(f"{what or arguments[0]} failed: {(lines[-1:] or ['no output'])[0]}")
    return done.stdout
