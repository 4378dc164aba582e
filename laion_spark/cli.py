"""The ``laion-spark`` command: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from laion_spark.config import Config, ConfigError, load_config

log = logging.getLogger("laion_spark")

COMMON_HELP = """
common options (every stage):
  --lake DIR        directory (or Hadoop URI: s3a://, abfss://, dbfs:/) holding the Delta tables
  --config FILE     YAML config (see conf/local.yaml for every key and its default)
  --set KEY=VALUE   override one config key, e.g. --set download.threads=128 (value parsed as YAML)
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", required=True, help="directory or Hadoop URI holding the Delta tables")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults, as in conf/local.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), value parsed as YAML: --set clip.threshold=0.3",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laion-spark",
        description="Build a LAION-style image-text dataset from Common Crawl archives on Apache Spark.\n"
        "Stages, in order: extract -> candidates -> download -> score.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=COMMON_HELP,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)

    extract = stages.add_parser(
        "extract",
        help="WAT/WARC/ARC archives -> 'pairs' table (image URL + alt text) and 'ingest_log'",
        description="Read web archives (one Spark task per file) and write image URL + alt-text pairs to the "
        "'pairs' Delta table. Each input file gets a row in 'ingest_log' (ok / partial / failed). Files already "
        "'ok' are skipped on rerun; partial or failed files are re-read and their rows replaced.",
    )
    _add_common(extract)
    extract.add_argument(
        "--input",
        dest="inputs",
        action="append",
        required=True,
        metavar="PATH|GLOB|MANIFEST",
        help="an archive, a glob, or a manifest (one path per line, plain or .gz, e.g. wat.paths.gz); "
        "any Hadoop URI works; repeatable",
    )
    extract.add_argument("--force", action="store_true", help="re-read files already logged as ok")
    extract.set_defaults(handler=_run_extract)

    candidates = stages.add_parser(
        "candidates",
        help="pairs -> 'candidates': text/URL rules, exact dedup (also against the lake), language",
        description="Apply the text and URL rules, deduplicate within the batch and against candidates already "
        "in the lake, detect the language, and append the new rows to 'candidates'.",
    )
    _add_common(candidates)
    candidates.set_defaults(handler=_run_candidates)

    download = stages.add_parser(
        "download",
        help="candidates -> 'images': fetch, check, resize (SSRF guard and opt-outs on by default)",
        description="Fetch every candidate URL that has no final status yet, check and resize the image, and "
        "write one row per URL to 'images'.",
    )
    _add_common(download)
    download.add_argument("--retry-failed", action="store_true", help="also retry URLs whose last attempt failed")
    download.set_defaults(handler=_run_download)

    score = stages.add_parser(
        "score",
        help="images + candidates -> 'embeddings' and 'dataset' (CLIP similarity, NSFW tags)",
        description="Embed images and alt texts with open_clip, keep pairs at or above clip.threshold, tag NSFW, "
        "and write 'embeddings' and 'dataset'.",
    )
    _add_common(score)
    score.set_defaults(handler=_run_score)

    funnel = stages.add_parser("funnel", help="print rows in and out of every stage's steps (latest run of each)")
    _add_common(funnel)
    funnel.set_defaults(handler=_run_funnel)
    return parser


def _run_extract(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.extract import run_extract

    result = run_extract(_spark(config), config, args.lake, args.inputs, force=args.force)
    print(result.summary())


def _run_candidates(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.candidates import run_candidates

    print(run_candidates(_spark(config), config, args.lake).summary())


def _run_download(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.download import run_download

    print(run_download(_spark(config), config, args.lake, retry_failed=args.retry_failed).summary())


def _run_score(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.score import run_score

    print(run_score(_spark(config), config, args.lake).summary())


def _run_funnel(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.report import format_funnel

    print(format_funnel(_spark(config), args.lake))


def _spark(config: Config):
    from laion_spark.session import get_spark

    return get_spark(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"laion-spark: config error: {exc}", file=sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace, Config], None] = args.handler
    try:
        handler(args, config)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"laion-spark {args.stage}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
