"""``python -m laion_spark.demo``: the whole pipeline over the bundled sample (what ``make demo`` runs).

It starts a loopback image server, writes a small multilingual crawl (WAT + WARC) whose pages point at that
server, then runs the pipeline over it as ``laion-spark run`` does (the same library function,
``laion_spark.run.run_pipeline``): extract -> candidates -> download -> score in one Spark session, and prints the
funnel. The server is the only address the download stage is allowed to reach (download.allowed_hosts).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import laion_spark
from laion_spark.config import Config, apply_override, load_config

# Shipped inside the package, so that the demo runs from an installed wheel as well as from a checkout.
DEFAULT_CONFIG = resources.files("laion_spark.demo").joinpath("demo.yaml")
DEFAULT_MODELS_DIR = Path(".cache") / "models"
DEMO_QUERY = "a yellow star on a beige background"


@dataclass
class DemoResult:
    lake: str
    config: Config  # the effective config, the tiny model's absolute paths included
    run_id: str
    funnel: str


def run_demo(
    workdir: Path,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    models_dir: Path = DEFAULT_MODELS_DIR,
    outputs: bool = True,
) -> DemoResult:
    from pyspark.sql import functions as F

    from laion_spark.report.data import NOT_TAGGED
    from laion_spark.run import run_pipeline
    from laion_spark.schemas import DATASET
    from laion_spark.session import get_spark
    from laion_spark.storage import read_table
    from laion_spark.testing.sample_crawl import write_sample_crawl
    from laion_spark.testing.server import serve_synthetic_images
    from laion_spark.testing.tiny_clip import MODEL_NAME, ensure_tiny_clip

    lake = workdir / "lake"
    crawl = workdir / "crawl"
    for directory in (lake, crawl):
        shutil.rmtree(directory, ignore_errors=True)  # the demo is a fresh build every time
    crawl.mkdir(parents=True)

    print(f"laion_spark {laion_spark.__version__} from {Path(laion_spark.__file__).parent}")
    server, base_url = serve_synthetic_images(host="127.0.0.1", port=0)
    try:
        netloc = urlsplit(base_url).netloc
        with resources.as_file(DEFAULT_CONFIG) as default_config:
            config = load_config(config_path or default_config, [f"download.allowed_hosts=['{netloc}']"])
        if config.clip.model == MODEL_NAME and not config.clip.model_config:
            # Absolute paths: executors of a standalone cluster run in their own work directories.
            tiny = ensure_tiny_clip(Path(models_dir) / MODEL_NAME)
            config.clip.model_config, config.clip.pretrained = tiny["model_config"], tiny["pretrained"]
        for override in overrides or []:
            apply_override(config, override)
        archives = write_sample_crawl(crawl, base_url)
        print(f"sample crawl: {len(archives)} archives in {crawl}, images served from {base_url}")
        spark = get_spark(config)
        result = run_pipeline(spark, config, str(lake), [str(crawl / "*")])
        if not result.ok:
            raise RuntimeError(f"the demo run stopped: {result.failure}") from result.error
        run_id, funnel = result.run_id, result.funnel or ""
        print("\n== a sample of the dataset ==")
        dataset = read_table(spark, str(lake), DATASET)
        # A null tag is no tag: the demo's tiny model makes none (demo.yaml, clip.nsfw_tags: none).
        nsfw = F.coalesce("nsfw", F.lit(NOT_TAGGED)).alias("nsfw")
        dataset.orderBy("uid").select("text", "similarity", "language", nsfw, "width", "height").show(8, truncate=50)
    finally:
        server.shutdown()
    print(f"\n== funnel (run {run_id}) ==\n{funnel}")
    webdataset = workdir / "export" / "webdataset"
    if outputs:
        _export_index_and_search(spark, config, str(lake), str(webdataset))
    print(f"\nDelta tables are in {lake}; explore them with notebooks/explore_lake.ipynb")
    if outputs:
        print(f"WebDataset shards are in {webdataset}; the kNN index is in {lake}/_index")
        from laion_spark.report.html import write_report

        report = write_report(spark, config, str(lake), workdir / "report.html")
        print(f"The report (laion-spark report) is {report}: open it in a browser")
    return DemoResult(str(lake), config, run_id, funnel)


def _export_index_and_search(spark, config: Config, lake: str, webdataset: str) -> None:
    """What a user does with the lake next, as `laion-spark export / index / search` do it."""
    from laion_spark.export import run_export
    from laion_spark.index import run_index
    from laion_spark.index.search import format_matches, search_lake

    shutil.rmtree(webdataset, ignore_errors=True)
    print("\n== export --format webdataset ==")
    print(run_export(spark, config, lake, "webdataset", webdataset).summary())
    print("\n== index ==")
    print(run_index(spark, config, lake).summary())
    print(f'\n== search --text "{DEMO_QUERY}" -k 5 ==')
    print(format_matches(search_lake(config, lake, text=DEMO_QUERY, k=5)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m laion_spark.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=".cache/demo", help="where the sample crawl and the lake are written")
    parser.add_argument("--config", help="config file (default: the demo.yaml shipped in laion_spark/demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--models-dir",
        default=str(DEFAULT_MODELS_DIR),
        help="where the tiny CLIP model is, or is trained on first use (default: .cache/models)",
    )
    args = parser.parse_args(argv)
    config = Path(args.config) if args.config else None
    run_demo(Path(args.workdir).resolve(), config, args.overrides, Path(args.models_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
