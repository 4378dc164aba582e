"""Rows/s per core of the candidates transforms (rules, dedup, language) at two sizes, against a scan floor.

Rows are generated inside Spark (spark.range + expressions): the driver never builds them. Each step's
output goes to Spark's ``noop`` sink, so the time is the transform's and not a writer's. The floor is the same
generated frame written to ``noop`` untransformed, measured in the same run; a step's ratio is its time over
the floor's. Linear growth shows as a per-row cost ratio (large size / small size) near 1.

    python bench/candidates.py                       # 1M and 4M rows, all three steps
    python bench/candidates.py --sizes 200000 800000 --steps rules dedup
"""

from __future__ import annotations

import argparse
import os
import time

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from laion_spark.candidates import add_dedup_key, apply_rules, detect_language, keep_first_per_key
from laion_spark.config import LanguageConfig, RulesConfig, SparkConfig
from laion_spark.session import build_local_session

PHRASES = [
    "Red leather handbag with a gold chain strap",
    "Rote Lederhandtasche mit goldener Kette",
    "Sac à main en cuir rouge avec chaîne dorée",
    "Bolso de cuero rojo con cadena dorada",
    "Borsa in pelle rossa con catena dorata",
    "Красная кожаная сумка с золотой цепочкой",
    "金色のチェーンが付いた赤い革のハンドバッグ",
    "带金色链条的红色皮革手提包",
    "IMG_2034.jpg",
    "ok",
]


def generated_pairs(spark: SparkSession, rows: int) -> DataFrame:
    """Pairs-shaped rows; about one in five repeats an earlier (url, text) so dedup has work to do."""
    phrases = F.array(*[F.lit(p) for p in PHRASES])
    key = F.col("id") % F.lit(max(1, rows * 4 // 5))
    return spark.range(rows).select(
        F.sha1(F.col("id").cast("string")).alias("uid"),
        F.concat(
            F.lit("https://img"), (key % 997).cast("string"), F.lit(".example/p/"), key.cast("string"), F.lit(".jpg")
        ).alias("url"),
        F.concat(
            F.element_at(phrases, (key % len(PHRASES) + 1).cast("int")), F.lit(" "), (key % 50).cast("string")
        ).alias("text"),
        F.lit("https://site.example/").alias("page_url"),
        F.concat(F.lit("crawl-"), (F.col("id") % 64).cast("string"), F.lit(".wat.gz")).alias("source_file"),
        F.col("id").alias("record_offset"),
        F.timestamp_seconds(F.lit(1_700_000_000) + F.col("id") % 86_400).alias("crawl_date"),
        F.lit("wat").alias("source_format"),
    )


def timed(frame: DataFrame) -> float:
    start = time.perf_counter()
    frame.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 4_000_000])
    parser.add_argument("--steps", nargs="+", default=["rules", "dedup", "language"])
    parser.add_argument("--master", default="local[*]")
    args = parser.parse_args()

    spark = build_local_session(
        SparkConfig(
            master=args.master,
            app_name="bench-transforms",
            # Spark's 1g default driver heap makes the 4M-row dedup sort spill, which is a setting, not the cost.
            conf={"spark.ui.showConsoleProgress": "false", "spark.driver.memory": "4g"},
        )
    )
    cores = spark.sparkContext.defaultParallelism
    steps = {
        "rules": lambda df: df.transform(apply_rules, RulesConfig()),
        "dedup": lambda df: df.transform(add_dedup_key).transform(keep_first_per_key),
        "language": lambda df: df.transform(detect_language, LanguageConfig()),
    }
    timed(generated_pairs(spark, 100_000))  # warm the JVM and the code paths before measuring
    print(f"cores: {cores}  (machine: {os.cpu_count()} CPUs)")
    print(f"{'step':<10}{'rows':>12}{'seconds':>10}{'rows/s/core':>14}{'x floor':>10}")
    per_row: dict[str, list[float]] = {}
    for rows in args.sizes:
        pairs = generated_pairs(spark, rows)
        floor = timed(pairs)
        print(f"{'floor':<10}{rows:>12,}{floor:>10.1f}{rows / floor / cores:>14,.0f}{1.0:>10.1f}")
        for name in args.steps:
            seconds = timed(steps[name](pairs))
            per_row.setdefault(name, []).append(seconds / rows)
            print(f"{name:<10}{rows:>12,}{seconds:>10.1f}{rows / seconds / cores:>14,.0f}{seconds / floor:>10.1f}")
    small, large = args.sizes
    print(f"\nper-row cost at {large:,} / at {small:,} rows (1.0 = linear):")
    for name, costs in per_row.items():
        print(f"  {name:<10}{costs[1] / costs[0]:.2f}")
    spark.stop()


if __name__ == "__main__":
    main()
