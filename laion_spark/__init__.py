"""laion_spark: the LAION-400M image-text pipeline on Apache Spark and Delta Lake."""

from laion_spark.config import Config, ConfigError, load_config

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "__version__", "load_config"]
