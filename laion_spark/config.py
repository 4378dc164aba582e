"""One typed configuration for every stage.

Loaded from a YAML file (``conf/local.yaml`` and friends), then overridden from the command line with
``--set section.key=value`` where the value is parsed as YAML. Unknown keys and wrong types are errors that
name the key and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

# The pipeline's stages, in order: CLI commands, packages and (first) output tables of the same names.
STAGES = ("extract", "candidates", "download", "score")
# run.log_format: lines for people, or one JSON object a line (laion-spark --log-format).
LOG_FORMATS = ("text", "json")
# How long a run may go without a heartbeat before another run may take its lake over (laion-spark run).
DEFAULT_LEASE_HOURS = 6.0


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says where and what."""


@dataclass
class SparkConfig:
    """How to build a SparkSession when none is active (notebooks and spark-submit bring their own)."""

    master: str = "local[*]"
    app_name: str = "laion_spark"
    log_level: str = "WARN"
    shuffle_partitions: int = 8
    # Extra Spark settings, passed through verbatim (e.g. spark.driver.memory: 4g).
    conf: dict[str, str] = field(default_factory=dict)
    # Object-store connectors that a session laion_spark builds loads from the jar cache: s3 (hadoop-aws, for
    # s3a:// and s3://). Fetch them once with `python -m laion_spark.jars fetch --connector s3`; keys and endpoint
    # go in conf (spark.hadoop.fs.s3a.*). Leave it empty where the cluster has its own (EMR, Databricks).
    object_stores: list[str] = field(default_factory=list)


@dataclass
class ExtractConfig:
    """Archives -> pairs. Defaults follow LAION's extraction rules."""

    min_alt_chars: int = 5
    max_alt_chars: int = 4096  # longer alt text is cut to this length (the pair is kept)
    max_url_chars: int = 2048  # longer URLs are dropped (a cut URL points elsewhere)
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    # fastwarc is ~2x faster than warcio on WAT (see bench/extract.py); ARC files always go through warcio, and
    # "auto" re-reads a WARC with warcio when fastwarc stops on damage that warcio tolerates.
    reader: str = "auto"  # auto | fastwarc | warcio
    # How Python workers open input files: "auto" opens local/fsspec paths as streams and falls back to
    # Spark's binaryFile source for schemes only the JVM can read; "spark" forces that fallback.
    io: str = "auto"  # auto | spark
    # Entries of a manifest that are relative (Common Crawl's wat.paths.gz) are joined to this prefix;
    # empty means "relative to the manifest's own directory".
    manifest_prefix: str = ""
    rows_per_batch: int = 10000
    # Input files per slice: each slice is extracted and committed on its own, so a killed run loses at most the
    # slice in flight and its rerun starts after the last committed one. A Common Crawl WAT (~100 MB) takes a
    # core ~6 s; 16 files are about a minute of one machine's work.
    files_per_slice: int = 16
    # Decoding fallback for HTML pages that declare no charset and are not valid UTF-8.
    fallback_encoding: str = "cp1252"


@dataclass
class RulesConfig:
    """Text and URL rules applied to pairs (LAION defaults)."""

    min_text_chars: int = 5
    max_text_chars: int = 1000
    max_url_chars: int = 2048
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    # Regular expressions matched against the whole normalised alt text (case-insensitive).
    junk_text_patterns: list[str] = field(
        default_factory=lambda: [
            r"(img|image|dsc|dscn|pic|photo|screenshot)[-_ ]?\d+(\.\w{2,4})?",
            r"[\w\-. ]+\.(jpe?g|png|gif|webp|bmp|tiff?|svg)",
            r"(image|img|picture|photo|logo|icon|placeholder|banner|thumbnail|spacer|untitled|null|undefined|alt)s?",
        ]
    )
    require_image_extension: bool = False
    image_extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"]
    )


@dataclass
class DedupConfig:
    # url_text: LAION-400M's key (normalised URL + normalised text); url: LAION-5B's URL-only mode.
    # Keep one mode per lake: keys from the two modes never match each other.
    mode: str = "url_text"


@dataclass
class LanguageConfig:
    detector: str = "lingua"
    # Below this confidence the language is "none" (LAION-5B's English / other / no-language split).
    # lingua's confidences sum to 1 over the candidate languages, so the right threshold falls as the list
    # grows: on tests/data/language_phrases.tsv, 0.3 keeps 99% of real phrases with the 30 languages below
    # and 96% with all 75; 0.5 keeps 97% and 88%.
    min_confidence: float = 0.3
    # ISO 639-1 codes the detector chooses among; empty means every language lingua knows (about 1.3 GB of
    # models per Python worker once loaded, against about 0.75 GB for these 30).
    languages: list[str] = field(
        default_factory=lambda: [
            "en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "uk", "cs", "sv", "da", "nb", "fi",
            "hu", "ro", "bg", "el", "tr", "ar", "fa", "he", "hi", "th", "vi", "id", "ja", "zh", "ko",
        ]
    )  # fmt: skip
    low_accuracy_mode: bool = False
    # Only the first characters are looked at: enough for a language, and bounded work on huge texts.
    max_chars: int = 1000


@dataclass
class CandidatesConfig:
    rules: RulesConfig = field(default_factory=RulesConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    # Read only the pairs added since the last run (the change data feed of pairs, from a bookmark in the lake).
    # false reads all of pairs, e.g. once after loosening a rule, so that the pairs it dropped are read again.
    incremental: bool = True
    # New pairs per slice: commits of pairs are read in groups of about this many inserted rows (never splitting
    # a commit), each group MERGEd into candidates and then bookmarked on its own.
    pairs_per_slice: int = 2_000_000


@dataclass
class DownloadConfig:
    """Candidates -> images. Safety defaults are on; see README "Download safety"."""

    source: str = "http"  # http | archive (resolve images from WARC response records, no network)
    archive_inputs: list[str] = field(default_factory=list)
    threads: int = 64
    # At most this many connections at once to one host, per Python worker.
    per_host_connections: int = 8
    # At most this many requests a second to one host, per Python worker (robots.txt and retries included; 0: no
    # limit). A busy host's URLs wait in the scheduler, not in the threads, which take other hosts' URLs meanwhile.
    per_host_requests_per_s: float = 10.0
    # A 429 or 503 pauses the host for its Retry-After (seconds or an HTTP date), and retries back off exponentially
    # from backoff_s; both are capped at this many seconds.
    max_retry_after_s: float = 60.0
    # After this many URLs in a row of one host fail (DNS, connection, TLS, timeout, 429, 5xx), the host's other URLs
    # in the task get status host_given_up without a request (0: never give up).
    host_failure_limit: int = 10
    # Deadline of one DNS lookup (getaddrinfo has none); answers and failures are cached per worker.
    dns_timeout_s: float = 5.0
    # Host names whose DNS answer each worker keeps.
    dns_cache_hosts: int = 10_000
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_body_bytes: int = 20 * 1024 * 1024
    retries: int = 2
    backoff_s: float = 0.5
    max_redirects: int = 5
    user_agent_token: str = ""
    # Fetch each host's robots.txt (RFC 9309) once per worker, and give URLs it disallows for our user agent (or
    # for *, when no group names us) status disallowed. 401/403, 429 and 5xx answers disallow the whole host.
    respect_robots_txt: bool = True
    # W3C TDMRep: a tdm-reservation: 1 header, or a matching rule of the host's /.well-known/tdmrep.json, means
    # disallowed.
    respect_tdmrep: bool = True
    # Hosts whose robots.txt and tdmrep.json each worker keeps, and for how many seconds.
    robots_cache_hosts: int = 10_000
    robots_cache_ttl_s: float = 3600.0
    honour_x_robots_tag: bool = True
    disallowed_robots_values: list[str] = field(
        default_factory=lambda: ["noai", "noml", "noimageai", "noindex", "noimageindex"]
    )
    ssrf_guard: bool = True
    # Hosts or CIDRs, each with an optional port ("127.0.0.1:8080", "10.0.0.0/8"): the only way past the guard.
    allowed_hosts: list[str] = field(default_factory=list)
    # A PEM file of CA certificates that HTTPS servers are checked against, instead of the system store.
    ca_bundle: str = ""
    # An HTTP proxy (http://[user:password@]host:port) for every request; empty: HTTPS_PROXY, HTTP_PROXY and
    # NO_PROXY from the workers' environment. The SSRF guard still judges the target, which the proxy is asked to
    # CONNECT to by its checked IP address.
    proxy: str = ""
    min_image_bytes: int = 5 * 1024
    min_side: int = 10
    max_side: int = 20000
    max_aspect_ratio: float = 10.0
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    resize_mode: str = "border"  # border | keep_ratio | center_crop | no
    image_size: int = 256
    encode_format: str = "jpg"  # jpg | png | webp
    encode_quality: int = 95
    partitions: int = 0  # 0: one per core
    # URLs per slice: each slice is fetched and appended to images on its own (one commit, a partition of images
    # named by its fetch_batch), so a killed run refetches at most one slice.
    urls_per_slice: int = 20_000


@dataclass
class ClipConfig:
    model: str = "ViT-B-32"
    # A pretrained tag (laion2b_s34b_b79k), a local checkpoint path, or empty for random weights.
    pretrained: str = "laion2b_s34b_b79k"
    # A local open_clip model-config JSON, for architectures that open_clip does not know by name.
    model_config: str = ""
    threshold: float = 0.28
    # Keep the top k percent by similarity instead of a fixed threshold (0 disables).
    top_k_percent: float = 0.0
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16/fp16 autocast on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    embedding_dtype: str = "float16"  # float16 | float32
    nsfw_prompts: list[str] = field(
        default_factory=lambda: ["porn", "nudity", "sexual content", "explicit nude photo", "hentai"]
    )
    safe_prompts: list[str] = field(
        default_factory=lambda: ["a photo", "a landscape", "a product photo", "a drawing", "text document"]
    )
    nsfw_detector_path: str = ""
    # Where the NSFW tag (embeddings.nsfw, dataset.nsfw) comes from: zero_shot (LAION-400M's rule over nsfw_prompts
    # and safe_prompts), detector (punsafe from nsfw_detector_path: NSFW at 0.5 or more, else UNLIKELY), none (no
    # tag: null, shown as "not tagged"), or auto: zero_shot, but none for random weights (empty pretrained), whose
    # tags would be noise. Say none for a model that never saw the prompt words (the demo's tiny model): a tag from a
    # model that cannot make it is worse than no tag.
    nsfw_tags: str = "auto"  # auto | zero_shot | detector | none
    # Repartition the pairs to score into this many tasks (0 keeps the input's partitioning).
    partitions: int = 0
    # Images per slice: each slice is scored and appended to embeddings on its own.
    images_per_slice: int = 4096
    # Diagnostics: when set, every model load in a Python worker leaves a marker file here (<pid>-<n>.json).
    load_log_dir: str = ""


@dataclass
class ExportConfig:
    # Samples per WebDataset shard (img2dataset's number_sample_per_shard): every shard of a run but its last holds
    # exactly this many.
    samples_per_shard: int = 10_000
    # Rows per file of the laion / laion5b parquet exports.
    rows_per_file: int = 1_000_000
    # Rows per img_emb / text_emb / metadata triple of the embeddings export (clip-retrieval's layout).
    embeddings_per_file: int = 1_000_000
    # Columns of the laion5b export: multi (laion2B-multi's, with LANGUAGE) or en (laion2B-en's, without it).
    laion5b_columns: str = "multi"


@dataclass
class IndexConfig:
    # Where the kNN index lives: empty means <lake>/_index (a catalog lake needs a directory or URI here).
    path: str = ""
    # Memory the served index may take, in GB, the image and the text index together: with the row count it picks
    # the index type (Flat, IVF-HNSW with flat vectors, IVF with 8-bit scalar quantization, IVF-PQ).
    max_memory_gb: float = 16.0
    # Up to this many vectors the index is exact (Flat).
    flat_max_rows: int = 100_000
    # At most this many vectors (a random sample of embeddings) train the IVF quantizer.
    train_sample: int = 200_000
    # Vectors per index shard, at most: the rows are planned into ceil(rows / this) tasks (runs of the embeddings'
    # files; with read_vectors spark, the input partitions grouped without a shuffle), and a task with more rows
    # cuts them into several shards.
    vectors_per_shard: int = 1_000_000
    # IVF lists probed per query (0: the smallest power of two reaching target_recall, measured at build time on a
    # held-out part of the training sample against exact search; recorded beside the index).
    nprobe: int = 0
    # Recall@10 (against exact search) that the chosen nprobe must reach on the held-out sample.
    target_recall: float = 0.95
    # How the tasks get the embeddings: auto reads the embeddings table's parquet files with pyarrow (each row found
    # by its file, Spark's _metadata.file_path, and its uid) when the driver can open them, else Spark hands the
    # vectors over; files insists on the first (an error if impossible), spark on the second.
    read_vectors: str = "auto"


@dataclass
class ServeConfig:
    # Largest num_images a query may ask for.
    max_results: int = 1000
    # Largest request body, in bytes.
    max_body_bytes: int = 8 * 1024 * 1024
    # Whether POST /knn-service may fetch an image_url (through the download stage's SSRF guard).
    allow_image_url: bool = False
    # deduplicate drops a result whose embedding has at least this cosine similarity with a better one.
    dedup_similarity: float = 0.98
    # The index's name in GET /indices-list and the indice_name requests give (empty: the lake's directory name).
    index_name: str = ""
    # A running server reads manifest.json again at most this often, in seconds, and loads a changed index.
    reload_interval_s: float = 5.0
    # A client that sends nothing for this many seconds in the middle of a request is disconnected.
    client_timeout_s: float = 30.0


@dataclass
class NearDupConfig:
    """Near-duplicate images and eval-set decontamination (laion_spark/curate), used by the dataset.filters steps
    near_dup, semdedup and decontaminate."""

    # near_dup: two images whose 64-bit pHashes differ in at most this many bits are near duplicates (a banded
    # join: the hash is split into phash_distance + 1 bands, so that any such pair shares a band).
    phash_distance: int = 4
    # semdedup: k-means clusters of the image embeddings (0: about sqrt(rows), at most 50,000).
    semdedup_clusters: int = 0
    # semdedup: within a cluster, two images whose embeddings have cosine >= 1 - this are duplicates.
    semdedup_epsilon: float = 0.05
    # k-means (semdedup, image_cluster) trains on a random sample of at most this many embeddings.
    kmeans_sample: int = 200_000
    # decontaminate: evaluation images: folders of image files, parquet files with an image column, or WebDataset
    # .tar shards. A rejection names the eval set by the path given here.
    eval_sets: list[str] = field(default_factory=list)
    # decontaminate: a pool image within this many pHash bits of an eval image is dropped.
    eval_phash_distance: int = 4
    # decontaminate: a pool image whose image embedding has at least this cosine with an eval image's is dropped.
    eval_min_cosine: float = 0.95


@dataclass
class ImageClusterConfig:
    """DataComp's image-based filter: k-means of the pool's image embeddings; keep the clusters that reference images
    fall in."""

    # k-means clusters (DataComp: 100,000 on ViT-L/14 for 128M samples; 0: about rows / 1,000, at least 1).
    clusters: int = 0
    # Reference images (e.g. ImageNet train): folders of image files, parquet files with an image column, or
    # WebDataset .tar shards.
    reference: list[str] = field(default_factory=list)


@dataclass
class DatasetConfig:
    # The filter chain that cuts dataset from the scored pairs, in order: threshold (clip.threshold), top_k_percent
    # (clip.top_k_percent of all scored pairs), near_dup (pHash), semdedup (image embeddings), decontaminate
    # (dedup.eval_sets), image_cluster (dataset.image_cluster). threshold and top_k_percent are cut over all scored
    # pairs, so together they intersect; the dedup steps keep one survivor among the rows still in.
    filters: list[str] = field(default_factory=lambda: ["threshold"])
    image_cluster: ImageClusterConfig = field(default_factory=ImageClusterConfig)
    # The rejections table (one row per pair a step removed, with the reason). Off: counts only, for very large runs.
    rejections: bool = True


@dataclass
class RunConfig:
    """What a running stage tells its operator (README "Progress and logs")."""

    # Every stage that works in slices writes a progress line this often, in seconds: done / total, rate, ETA.
    progress_interval_s: float = 30.0
    # text: lines for people; json: one JSON object a line (progress, stage summaries, log records) for schedulers
    # and log search. `laion-spark --log-format` overrides it.
    log_format: str = "text"


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    dedup: NearDupConfig = field(default_factory=NearDupConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (YAML) over the defaults, then apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    config = _build(Config, raw, prefix="", source=source)
    for override in overrides or []:
        apply_override(config, override)
    return config


def apply_override(config: Config, override: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML) to ``config`` in place."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, _, value_text = override.partition("=")
    dotted = dotted.strip()
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: value is not valid YAML: {exc}") from None
    parts = dotted.split(".")
    target: Any = config
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or part not in _field_names(type(target)):
            raise ConfigError(f"--set: unknown key '{'.'.join(parts[: i + 1])}'")
        if isinstance(getattr(target, part), dict):
            # A mapping such as spark.conf: the rest of the dotted name is one key (spark.driver.memory).
            hint = typing.get_type_hints(type(target))[part]
            merged = {**getattr(target, part), ".".join(parts[i + 1 :]): value}
            setattr(target, part, _coerce(hint, merged, ".".join(parts[: i + 1]), "--set"))
            return
        target = getattr(target, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(target) or leaf not in _field_names(type(target)):
        raise ConfigError(f"--set: unknown key '{dotted}'")
    hint = typing.get_type_hints(type(target))[leaf]
    setattr(target, leaf, _coerce(hint, value, dotted, "--set"))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = _field_names(cls)
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known keys here: {', '.join(known)})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(hint, value, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against ``hint``; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", source)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{key}' must be {hint}, got {value!r}")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(item_hint, item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return {
            _coerce(key_hint, k, key, source): _coerce(value_hint, v, f"{key}.{k}", source) for k, v in value.items()
        }
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float, bool)) and "conf" in key:
        # Spark settings such as spark.sql.shuffle.partitions: 8 or fs.s3a.path.style.access: true, as Spark spells them
        return str(value).lower() if isinstance(value, bool) else str(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {value!r}")
    return value


__all__ = [
    "ClipConfig",
    "Config",
    "ConfigError",
    "DedupConfig",
    "DownloadConfig",
    "ExtractConfig",
    "LanguageConfig",
    "RulesConfig",
    "RunConfig",
    "SparkConfig",
    "CandidatesConfig",
    "apply_override",
    "load_config",
    "to_dict",
]
