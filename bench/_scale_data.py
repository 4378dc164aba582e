"""The scale benchmark's input: WAT files whose image URLs point at a loopback image server on a fixed port.

Every file has the same shape, so that k files are k times the work of one at every stage:

* ``images_per_file`` image URLs of their own (``/pool/{n}.jpg``, ``n`` unique across all files), each on two
  pages of the file with the same caption: two pairs that dedup to one candidate, one download and one score;
* the rest of the file's pairs carry junk alt text (file names, "thumbnail", ...) that the candidates rules
  drop, so that most pairs end at the rules, as in a real crawl, and the image stages stay at
  ``images_per_file`` rows per file.

Captions describe the image they point at (the synthetic shape in ``pool[n % len(pool)]``), in ten languages,
so language detection and the tiny CLIP model do real work. The URLs hold the server's port, so the files are
generated for one port and cached per (shape, port) under ``bench/data/scale/``; :func:`serve_pool` starts the
server on that port in a process of its own (neither the driver nor the workers share its GIL).
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from laion_spark.testing.archives import WatPage, write_wat
from laion_spark.testing.sample_crawl import LANGUAGES, caption_in
from laion_spark.testing.server import serve_synthetic_images
from laion_spark.testing.synthetic import all_kinds, draw, encode

DATA_DIR = Path(__file__).resolve().parent / "data" / "scale"
FORMAT_VERSION = 1
IMAGES_PER_PAGE = 25
# Alt texts of at least extraction's 5 characters that the default junk_text rule drops.
JUNK_ALTS = [
    "IMG_2034.jpg",
    "DSC01234",
    "thumbnail",
    "banner",
    "untitled",
    "placeholder",
    "spacer.gif",
    "screenshot 12",
    "photo_0042.png",
    "image",
]
WARM_UP_FIRST_URL = 10**9  # the warm-up file's URLs, far from every measured file's


@dataclass(frozen=True)
class Shape:
    pairs_per_file: int
    images_per_file: int
    files: int  # measured files (the largest scale's), plus one incremental and one warm-up file
    port: int

    def __post_init__(self) -> None:
        if self.pairs_per_file < 2 * self.images_per_file:
            raise ValueError("--pairs-per-file must be at least twice the images per file (each URL is on 2 pages)")

    @property
    def directory(self) -> Path:
        return DATA_DIR / f"v{FORMAT_VERSION}-{self.pairs_per_file}p-{self.images_per_file}i-port{self.port}"


@dataclass
class Inputs:
    measured: list[Path]  # file i belongs to every scale s with s * base_files > i
    incremental: Path
    warm_up: Path


def ensure_inputs(shape: Shape) -> Inputs:
    """The files for ``shape``, generating the missing ones (a manifest records the shape they were made for)."""
    directory = shape.directory
    directory.mkdir(parents=True, exist_ok=True)
    inputs = Inputs(
        measured=[directory / f"crawl-{i:05d}.wat.gz" for i in range(shape.files)],
        incremental=directory / "incremental.wat.gz",
        warm_up=directory / "warm-up.wat.gz",
    )
    manifest = directory / "manifest.json"
    expected = {**asdict(shape), "files": None, "version": FORMAT_VERSION}
    if manifest.exists() and json.loads(manifest.read_text()) != expected:
        raise RuntimeError(f"{manifest} was written for another shape: delete {directory} and run again")
    manifest.write_text(json.dumps(expected))
    started, made = time.perf_counter(), 0
    base = f"http://127.0.0.1:{shape.port}"
    jobs = [(path, i * shape.images_per_file) for i, path in enumerate(inputs.measured)]
    jobs.append((inputs.incremental, shape.files * shape.images_per_file))
    for path, first_url in jobs:
        if not path.exists():
            _write_file(path, base, first_url, shape.pairs_per_file, shape.images_per_file)
            made += 1
    if not inputs.warm_up.exists():
        _write_file(inputs.warm_up, base, WARM_UP_FIRST_URL, 500, 50)
    if made:
        print(f"generated {made} WAT file(s) in {directory} in {time.perf_counter() - started:.0f}s")
    return inputs


def _write_file(path: Path, base: str, first_url: int, pairs: int, images: int) -> None:
    rng = random.Random(f"{path.name}-{first_url}")
    kinds = all_kinds()
    links: list[tuple[str, str]] = []
    for n in range(first_url, first_url + images):
        language = LANGUAGES[n % len(LANGUAGES)]
        caption = caption_in(language, kinds[n % len(kinds)], rng)
        # Absolute and host-relative sources: both resolve to the same URL against the page.
        links += [(f"{base}/pool/{n}.jpg", caption), (f"/pool/{n}.jpg", caption)]
    for k in range(pairs - 2 * images):
        links.append((f"/assets/{first_url}-{k}.jpg", rng.choice(JUNK_ALTS)))
    rng.shuffle(links)
    pages = [
        WatPage(f"{base}/site/{first_url}/page-{p}.html", links[start : start + IMAGES_PER_PAGE])
        for p, start in enumerate(range(0, len(links), IMAGES_PER_PAGE))
    ]
    partial = path.with_suffix(".partial")
    write_wat(partial, pages, gzip_members=True)
    partial.rename(path)


def image_pool() -> list[bytes]:
    """One JPEG per synthetic kind, twice over: ``/pool/{n}.jpg`` is the kind ``n % len(kinds)`` captions name.

    Quality 95: at 90 some flat shapes weigh less than the download stage's 5 KB minimum (7-20 KB here).
    """
    kinds = all_kinds()
    return [encode(draw(kinds[i % len(kinds)], size=320, seed=1000 + i), quality=95) for i in range(2 * len(kinds))]


def _serve(port: int, ready) -> None:
    server, _ = serve_synthetic_images(port=port, pool=image_pool())
    ready.put(server.server_port)
    while True:
        time.sleep(3600)


def serve_pool(port: int) -> multiprocessing.Process:
    """Start the image server on 127.0.0.1:``port`` in its own process; ``terminate()`` it when done."""
    ready = multiprocessing.Queue()
    process = multiprocessing.Process(target=_serve, args=(port, ready), daemon=True)
    process.start()
    try:
        ready.get(timeout=120)
    except Exception:
        process.terminate()
        raise RuntimeError(
            f"the image server did not start on 127.0.0.1:{port}: is the port taken? Use --port"
        ) from None
    return process
