"""The typed config: YAML files, --set overrides, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from laion_spark.config import Config, ConfigError, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_laion():
    config = load_config()
    assert config.extract.min_alt_chars == 5
    assert config.clip.threshold == pytest.approx(0.28)
    assert config.download.min_image_bytes == 5 * 1024
    assert config.download.ssrf_guard is True


@pytest.mark.parametrize(
    "path", ["conf/local.yaml", "conf/databricks.yaml", "conf/emr.yaml", "laion_spark/demo/demo.yaml"]
)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(PROJECT_ROOT / path), Config)


def test_yaml_values_override_defaults(tmp_path):
    config = load_config(write(tmp_path, "download:\n  threads: 7\n  allowed_hosts: ['127.0.0.1:80']\n"))
    assert config.download.threads == 7
    assert config.download.allowed_hosts == ["127.0.0.1:80"]
    assert config.download.read_timeout_s == 10.0  # untouched keys keep their defaults


def test_set_overrides_parse_values_as_yaml(tmp_path):
    config = load_config(
        write(tmp_path, "clip:\n  threshold: 0.25\n"),
        ["clip.threshold=0.3", "download.allowed_hosts=[a.example:8080, 10.0.0.0/8]", "candidates.dedup.mode=url"],
    )
    assert config.clip.threshold == pytest.approx(0.3)
    assert config.download.allowed_hosts == ["a.example:8080", "10.0.0.0/8"]
    assert config.candidates.dedup.mode == "url"


def test_int_is_accepted_where_float_expected(tmp_path):
    assert load_config(write(tmp_path, "clip:\n  threshold: 1\n")).clip.threshold == 1.0


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "download:\n  thread: 8\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "download.thread" in str(error.value) and str(path) in str(error.value)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "download:\n  threads: many\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "download.threads" in str(error.value) and str(path) in str(error.value)


def test_nested_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"candidates\.rules\.min_chars"):
        load_config(write(tmp_path, "candidates:\n  rules:\n    min_chars: 3\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="'downlaod'"):
        load_config(write(tmp_path, "downlaod: {}\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "spark: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_is_a_clear_error():
    with pytest.raises(ConfigError, match="download.nope"):
        load_config(None, ["download.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["download.threads"])
    with pytest.raises(ConfigError, match="download.threads"):
        load_config(None, ["download.threads=[1, 2]"])


def test_set_reaches_into_mappings_such_as_spark_conf():
    config = load_config(None, ["spark.conf.spark.driver.memory=6g", "spark.conf.spark.sql.shuffle.partitions=16"])
    assert config.spark.conf == {"spark.driver.memory": "6g", "spark.sql.shuffle.partitions": "16"}
