"""The ``laion-spark`` command: argument parsing only; every subcommand calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

# Only the config here: `laion-spark --help` must work where pyspark is not installed yet.
from laion_spark.config import DEFAULT_LEASE_HOURS, LOG_FORMATS, STAGES, Config, ConfigError, load_config

log = logging.getLogger("laion_spark")

COMMON_HELP = """
common options (every stage):
  --lake DIR        directory (or Hadoop URI: s3a://, abfss://, dbfs:/) holding the Delta tables
  --config FILE     YAML config (see conf/local.yaml for every key and its default)
  --set KEY=VALUE   override one config key, e.g. --set download.threads=128 (value parsed as YAML)
  --log-format text|json
                    progress lines, stage summaries and log records as text, or one JSON object a line
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
    # Also before the subcommand (laion-spark --log-format json run ...); SUPPRESS keeps that value when absent here.
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS, help=LOG_FORMAT_HELP)


LOG_FORMAT_HELP = (
    "text (default: run.log_format) or json: progress lines, stage summaries and log records as one JSON object a "
    "line, for schedulers and log search"
)


RUN_EXIT_CODES = """
exit status:
  0  every stage ran
  1  a stage failed (the reason on one line on stderr), or another run took the lake over meanwhile
  2  a usage or config error, or a stage failed on one (a missing table, a bad setting)
  3  another run holds the lake: nothing was run (the message names it and since when)
"""
EXIT_LAKE_HELD = 3


def _stage_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: name stages among {','.join(STAGES)}, separated by commas")
    return names


def _hours(text: str, allow_zero: bool) -> float | None:
    """``text`` as hours, or None when it is not a number in range (NaN included)."""
    try:
        hours = float(text)
    except ValueError:
        return None
    return hours if (hours >= 0 if allow_zero else hours > 0) else None


def _positive_hours(text: str) -> float:
    hours = _hours(text, allow_zero=False)
    if hours is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of hours, e.g. 6 or 0.5")
    return hours


OPTIMIZE_EXIT_CODES = """
exit status:
  0  every table was done (one line each on stdout)
  1  a table failed, or a run took the lake over meanwhile
  2  a usage error: an unknown table, a retention Delta would refuse, a lake with no table
  3  a run holds the lake: no table was touched (the message names it and since when)
"""


def _table_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: name tables separated by commas, e.g. pairs,candidates")
    return names


def _hours_or_zero(text: str) -> float:
    hours = _hours(text, allow_zero=True)
    if hours is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 or more hours, e.g. 168")
    return hours


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laion-spark",
        description="Build a LAION-style image-text dataset from Common Crawl archives on Apache Spark.\n"
        "Stages, in order: extract -> candidates -> download -> score; `run` runs them all.\n"
        "Then what users consume: export (LAION parquet, WebDataset, clip-retrieval embeddings), index (faiss kNN),\n"
        "search and serve (clip-retrieval's HTTP API).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=COMMON_HELP,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None, help=LOG_FORMAT_HELP)
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

    dataset = stages.add_parser(
        "dataset",
        help="re-cut 'dataset' from 'embeddings' through the filter chain (dataset.filters), without rescoring",
        description="Rebuild the 'dataset' table from every scored pair through dataset.filters, in order:\n"
        'threshold, top_k_percent, near_dup, semdedup, decontaminate, image_cluster (README, "5. dataset").\n'
        "Each step's rows in and out go to stage_stats, the pairs it removed (and why) to rejections.\n"
        "  laion-spark dataset --lake L --set 'dataset.filters=[threshold,near_dup]'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(dataset)
    dataset.set_defaults(handler=_run_dataset)

    run = stages.add_parser(
        "run",
        help="every stage in order (extract -> candidates -> download -> score): one scheduled ETL run",
        description="Run the stages in order over one lake under one run id, each as its own command runs it\n"
        "(incremental and idempotent); print a line when each stage starts and ends, and the run's funnel at the\n"
        "end. The run holds the lake's run lock (<lake>/_run_lock), so two scheduled runs never interleave.\n"
        "It stops at the first stage that fails, with a one-line reason (the traceback: laion-spark -v run ...);\n"
        "a rerun continues where it stopped: no file is extracted twice and no URL with a row is fetched again.",
        epilog=RUN_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(run)
    run.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="PATH|GLOB|MANIFEST",
        help="archives for extract, as in `extract --input` (repeatable); required when extract runs",
    )
    run.add_argument(
        "--stages",
        type=_stage_list,
        metavar="STAGE[,STAGE...]",
        help=f"run only these stages, in pipeline order ({','.join(STAGES)}; default: all)",
    )
    run.add_argument(
        "--until",
        choices=STAGES,
        metavar="STAGE",
        help="stop after this stage: --until download runs extract, candidates and download",
    )
    run.add_argument("--force", action="store_true", help="extract: re-read files already logged as ok")
    run.add_argument("--retry-failed", action="store_true", help="download: also retry URLs whose last attempt failed")
    run.add_argument(
        "--lock-lease-hours",
        type=_positive_hours,
        default=DEFAULT_LEASE_HOURS,
        metavar="HOURS",
        help="a run that holds the lake but has not heartbeaten for this long is taken to be dead, and the next "
        f"run takes the lake over (default: {DEFAULT_LEASE_HOURS:g}); a live run heartbeats all along",
    )
    run.add_argument(
        "--break-lock",
        action="store_true",
        help="take the lake at once even if another run holds it: only when that run is known to be dead",
    )
    run.set_defaults(handler=_run_pipeline)

    optimize = stages.add_parser(
        "optimize",
        help="lake upkeep: OPTIMIZE (compact, ZORDER) every table; with --vacuum, delete files no version needs",
        description="Compact every Delta table of the lake into few large files (OPTIMIZE, Z-ordered by the columns\n"
        "the later stages filter or join on), and with --vacuum delete the files that no version younger than\n"
        "--retain-hours reads (VACUUM): those OPTIMIZE replaced, rows MERGE rewrote, the emptied staging tables.\n"
        "Prints one line per table: files and size before -> after, what OPTIMIZE rewrote and VACUUM deleted. A\n"
        "second run rewrites nothing. Holds the lake's run lock, as `run` does, so it never overlaps a run.",
        epilog=OPTIMIZE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(optimize)
    optimize.add_argument(
        "--tables",
        type=_table_list,
        metavar="TABLE[,TABLE...]",
        help="only these tables (default: every table in the lake, the staging tables and the run lock included)",
    )
    optimize.add_argument(
        "--vacuum", action="store_true", help="also VACUUM: delete the files no version of the retention window reads"
    )
    optimize.add_argument(
        "--retain-hours",
        type=_hours_or_zero,
        metavar="HOURS",
        help="VACUUM keeps the files of the versions this recent, so time travel to them still works (default: "
        "168, Delta's own). Under 168 only where the session sets "
        "spark.databricks.delta.retentionDurationCheck.enabled=false (laion-spark's local sessions do)",
    )
    optimize.add_argument(
        "--set-auto-optimize",
        action="store_true",
        help="also set delta.autoOptimize.optimizeWrite and .autoCompact on the data tables (Databricks; "
        "open-source Delta 3.1+)",
    )
    optimize.add_argument(
        "--break-lock",
        action="store_true",
        help="take the lake at once even if a run holds it: only when that run is known to be dead",
    )
    optimize.set_defaults(handler=_run_optimize)

    funnel = stages.add_parser("funnel", help="print rows in and out of every stage's steps (latest run of each)")
    _add_common(funnel)
    funnel.set_defaults(handler=_run_funnel)

    report = stages.add_parser(
        "report",
        help="write one self-contained HTML report of the lake: funnel, similarity and cuts, languages, downloads, "
        "image sizes, NSFW tags, curation, thumbnails",
        description="Write an HTML file (images embedded, no network needed to open it) that shows the funnel, the\n"
        "similarity histogram with the configured cut (clip.threshold or clip.top_k_percent: give the config the\n"
        "lake was cut with) and what other cuts would keep, languages, download outcomes and failing hosts, image\n"
        "sizes, NSFW tags, near-duplicate and decontamination counts, and thumbnails of kept and rejected pairs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(report)
    report.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    report.add_argument(
        "--show-nsfw", action="store_true", help="do not blur the thumbnails tagged NSFW or UNSURE (default: blurred)"
    )
    report.set_defaults(handler=_run_report)

    explain = stages.add_parser(
        "explain",
        help="the story of one pair: where it came from, every decision about it, why it is or is not in dataset",
        description="Print what the lake knows about one pair (by uid) or every pair of one image URL: its archive\n"
        "record, the candidates rules and dedup, the download, the score, the dataset's filter chain, each with the\n"
        "run that decided and the hash of that run's config, and the verdict.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(explain)
    target = explain.add_mutually_exclusive_group(required=True)
    target.add_argument("--uid", help="the pair's uid (sha1 of url and alt text)")
    target.add_argument("--url", help="an image URL: every pair with it")
    explain.set_defaults(handler=_run_explain)

    remove = stages.add_parser(
        "remove",
        help="takedown: delete URLs, pairs or images from every table, the index and (next run) the exports",
        description="Delete what a takedown names from every table (pairs, candidates, images, embeddings, dataset,\n"
        "rejections) and from the kNN index, and record each item in the 'removals' table: a blocklist every stage\n"
        "consults, so that a removed URL, pair or image never comes back (re-extraction, a new crawl, the same image\n"
        "under another URL). The next `laion-spark export` rewrites only the export files that hold removed rows.\n"
        "Prints the rows removed from each table and artefact.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(remove)
    for flag, what in (
        ("--url", "an image URL (normalised as pairs stores it)"),
        ("--uid", "a pair's uid"),
        ("--sha256", "the sha256 hex of an image body as downloaded"),
        ("--md5", "the md5 hex of an image body as downloaded"),
        ("--phash", "an image's pHash: 16 hex digits, or the signed value of images.phash"),
    ):
        remove.add_argument(flag, action="append", default=[], metavar=flag[2:].upper(), help=f"{what} (repeatable)")
    remove.add_argument(
        "--list",
        dest="lists",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of items, one per line: KIND:VALUE (url, url_md5, url_sha256, uid, sha256, md5, phash) or a "
        "plain value of --list-kind; blank and # lines skipped, malformed lines counted and reported",
    )
    remove.add_argument(
        "--list-kind",
        choices=("url", "url_md5", "url_sha256", "uid", "sha256", "md5", "phash"),
        help="the kind of the plain values of --list files (default: told from each value's form where it can be)",
    )
    remove.add_argument("--reason", required=True, help="why (kept in the removals table with who and when)")
    remove.add_argument(
        "--vacuum",
        action="store_true",
        help="also VACUUM the touched tables with no retention: the removed rows' files leave storage, and time "
        "travel to earlier versions of those tables is lost",
    )
    remove.set_defaults(handler=_run_remove)

    export = stages.add_parser(
        "export",
        help="dataset -> files its consumers read: LAION parquet, WebDataset shards, clip-retrieval embeddings",
        description="Write the 'dataset' table in a format other tools read, incrementally: a rerun adds files for\n"
        "the rows that are new since the last export to OUT and leaves the files already there alone.\n"
        "  laion       LAION-400M's released parquet columns (SAMPLE_ID, URL, TEXT, LICENSE, NSFW, similarity, ...)\n"
        "  laion5b     LAION-5B's columns (URL, TEXT, WIDTH, HEIGHT, similarity, hash, punsafe, pwatermark, LANGUAGE)\n"
        "  webdataset  img2dataset's layout: {shard:05d}.tar with {key}.jpg/.txt/.json, a .parquet and _stats.json\n"
        "  embeddings  clip-retrieval's layout: img_emb/, text_emb/ (.npy) and metadata/ (.parquet), row-aligned",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(export)
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="what to write")
    export.add_argument("--out", required=True, metavar="URI", help="directory or object-store URI to write into")
    export.add_argument(
        "--rebuild", action="store_true", help="delete what OUT holds from earlier exports and write everything again"
    )
    export.set_defaults(handler=_run_export)

    index = stages.add_parser(
        "index",
        help="embeddings of the dataset -> a faiss kNN index (image and text), built on Spark, incremental",
        description="Build or update the kNN index of the dataset's image and text embeddings (index.path, default\n"
        "<lake>/_index). The first build trains the quantizer on a sample and adds the vectors in Spark tasks, one\n"
        "index shard each; later runs add the new rows as new shards and remove the rows that left the dataset.\n"
        "The index type is chosen from the row count and index.max_memory_gb; manifest.json records it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(index)
    index.add_argument("--rebuild", action="store_true", help="train and build the index again from scratch")
    index.set_defaults(handler=_run_index)

    search = stages.add_parser(
        "search",
        help="query the kNN index by text or image: top matches with similarity, url, caption and uid",
        description="Embed the query with the open_clip model the lake was scored with (recorded in the index)\n"
        "and print the nearest images. With --text and --image both, the two embeddings are averaged.",
    )
    _add_common(search)
    search.add_argument("--text", help="a caption to search for")
    search.add_argument("--image", metavar="PATH", help="an image file to search with")
    search.add_argument("-k", type=_positive_int, default=20, help="how many matches (default: 20)")
    search.add_argument(
        "--modality",
        choices=("image", "text"),
        default="image",
        help="search the image embeddings (default) or the caption embeddings",
    )
    search.set_defaults(handler=_run_search)

    serve = stages.add_parser(
        "serve",
        help="an HTTP back end speaking clip-retrieval's API (/knn-service, /metadata, /indices-list)",
        description="Serve the lake's kNN index over HTTP with clip-retrieval's back-end API, so that its front end\n"
        "and ClipClient can point at it. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    _add_common(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=1234, help="port (default: 1234; 0 picks a free one)")
    serve.add_argument(
        "--token",
        help="require 'Authorization: Bearer TOKEN' on every request (default: $LAION_SPARK_SERVE_TOKEN if set)",
    )
    serve.set_defaults(handler=_run_serve)
    return parser


EXPORT_FORMATS = ("laion", "laion5b", "webdataset", "embeddings")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive whole number")
    return value


def _run_extract(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.extract import run_extract

    started = time.monotonic()
    result = run_extract(_spark(config), config, args.lake, args.inputs, force=args.force)
    _summarize(config, "extract", result, started)


def _run_candidates(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.candidates import run_candidates

    started = time.monotonic()
    _summarize(config, "candidates", run_candidates(_spark(config), config, args.lake), started)


def _run_download(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.download import run_download

    started = time.monotonic()
    counter = run_download(_spark(config), config, args.lake, retry_failed=args.retry_failed)
    _summarize(config, "download", counter, started)


def _run_score(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.score import run_score

    started = time.monotonic()
    _summarize(config, "score", run_score(_spark(config), config, args.lake), started)


def _run_dataset(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.score import rebuild_dataset
    from laion_spark.storage import StageCounter, new_run_id

    started = time.monotonic()
    counter = StageCounter(new_run_id(), "score")
    kept, considered = rebuild_dataset(_spark(config), config, args.lake, counter=counter)
    counter.write(_spark(config), args.lake)
    if not _summarize(config, "dataset", counter, started):
        print(f"dataset: {kept:,} of {considered:,} scored pairs")


def _run_pipeline(args: argparse.Namespace, config: Config) -> int:
    from laion_spark.run import LakeLocked, run_pipeline

    try:
        result = run_pipeline(
            _spark(config),
            config,
            args.lake,
            args.inputs,
            stages=args.stages,
            until=args.until,
            force=args.force,
            retry_failed=args.retry_failed,
            lock_lease_hours=args.lock_lease_hours,
            break_lock=args.break_lock,
        )
    except LakeLocked as exc:
        print(f"laion-spark run: {exc}", file=sys.stderr)
        return EXIT_LAKE_HELD
    if not result.ok:
        print(f"laion-spark run: {result.failure}", file=sys.stderr)
        return 2 if isinstance(result.error, (ConfigError, FileNotFoundError)) else 1
    if config.run.log_format == "json":
        from laion_spark.run.progress import emit_event

        emit_event({"event": "funnel", "run_id": result.run_id, "funnel": result.funnel}, None, "json")
    else:
        print(f"\n== funnel (run {result.run_id}) ==\n{result.funnel}", flush=True)
    return 0


def _run_optimize(args: argparse.Namespace, config: Config) -> int:
    from laion_spark.run import LakeLocked, LockLost
    from laion_spark.storage import MaintenanceError, optimize_lake

    try:
        optimize_lake(
            _spark(config),
            args.lake,
            tables=args.tables,
            vacuum=args.vacuum,
            retain_hours=args.retain_hours,
            set_auto_optimize=args.set_auto_optimize,
            break_lock=args.break_lock,
            progress=lambda line: print(line, flush=True),
        )
    except LakeLocked as exc:
        print(f"laion-spark optimize: {exc}", file=sys.stderr)
        return EXIT_LAKE_HELD
    except MaintenanceError as exc:
        print(f"laion-spark optimize: {exc}", file=sys.stderr)
        return 2
    except LockLost as exc:
        print(f"laion-spark optimize: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_funnel(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.report import format_funnel

    print(format_funnel(_spark(config), args.lake))


def _run_report(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.report.html import write_report

    path = write_report(_spark(config), config, args.lake, args.out, show_nsfw=args.show_nsfw)
    print(f"report written to {path}")


def _run_explain(args: argparse.Namespace, config: Config) -> int:
    from laion_spark.report.explain import explain_pair, format_story

    stories = explain_pair(_spark(config), args.lake, uid=args.uid, url=args.url)
    if not stories:
        print(f"laion-spark explain: no pair with url {args.url} in {args.lake}", file=sys.stderr)
        return 1
    print("\n\n".join(format_story(story) for story in stories))
    return 0


def _run_remove(args: argparse.Namespace, config: Config) -> int:
    from laion_spark.remove import normalize_item, read_list_file, run_remove

    items, malformed, list_lines = [], [], 0
    try:
        for kind in ("url", "uid", "sha256", "md5", "phash"):
            items += [normalize_item(value, kind) for value in getattr(args, kind)]
        for path in args.lists:
            listed = read_list_file(path, args.list_kind)
            items += listed.items
            malformed += listed.malformed
            list_lines += listed.lines
    except (ValueError, OSError) as exc:
        print(f"laion-spark remove: {exc}", file=sys.stderr)
        return 2
    result = run_remove(
        _spark(config),
        config,
        args.lake,
        items,
        args.reason,
        vacuum=args.vacuum,
        malformed=malformed,
        list_lines=list_lines,
    )
    print(result.summary())
    return 0


def _run_export(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.export import run_export

    started = time.monotonic()
    result = run_export(_spark(config), config, args.lake, args.format, args.out, rebuild=args.rebuild)
    _summarize(config, "export", result, started)


def _run_index(args: argparse.Namespace, config: Config) -> None:
    from laion_spark.index import run_index

    started = time.monotonic()
    _summarize(config, "index", run_index(_spark(config), config, args.lake, rebuild=args.rebuild), started)


def _run_search(args: argparse.Namespace, config: Config) -> int:
    from laion_spark.index.search import format_matches, search_lake

    if not args.text and not args.image:
        print("laion-spark search: give --text, --image or both", file=sys.stderr)
        return 2
    matches = search_lake(config, args.lake, text=args.text, image_path=args.image, k=args.k, modality=args.modality)
    print(format_matches(matches))
    return 0


def _run_serve(args: argparse.Namespace, config: Config) -> None:
    import os

    from laion_spark.index.serve import serve_forever

    token = args.token if args.token is not None else os.environ.get("LAION_SPARK_SERVE_TOKEN") or None
    serve_forever(config, args.lake, host=args.host, port=args.port, token=token)


def _summarize(config: Config, stage: str, outcome, started: float) -> bool:
    """Print the stage's summary, or write it as one JSON line with --log-format json (then True)."""
    from laion_spark.run.progress import emit_stage_summary

    if emit_stage_summary(config, stage, outcome, time.monotonic() - started):
        return True
    print(outcome.summary())
    return False


def _spark(config: Config):
    from laion_spark.session import get_spark

    return get_spark(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.log_format:
            config.run.log_format = args.log_format
        from laion_spark.run.progress import check_log_format, configure_logging

        configure_logging(check_log_format(config.run.log_format), args.verbose)
    except ConfigError as exc:
        print(f"laion-spark: config error: {exc}", file=sys.stderr)
        return 2
    handler: Callable[[argparse.Namespace, Config], int | None] = args.handler
    uris = [args.lake, *(getattr(args, "inputs", None) or []), config.extract.manifest_prefix]
    # Imported here: the storage package needs pyspark, and `--help` must not.
    from laion_spark.storage.object_store import check_object_store, explain_storage_error

    try:
        check_object_store(config.spark, uris)  # one line, before any JVM starts
        code = handler(args, config)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"laion-spark {args.stage}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        explained = explain_storage_error(exc, uris)
        if explained is None:
            raise
        print(f"laion-spark {args.stage}: {explained}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
