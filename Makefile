# Two commands on a fresh clone: `make demo` and `make test`. Each installs what it needs (a project-local
# virtualenv, the Python dependencies, Delta's jars cached in .cache/jars, the tiny CLIP test model).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
JARS_STAMP := .cache/jars/.fetched
MODEL := .cache/models/tiny-clip/tiny_clip.pt
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export PYTHONUNBUFFERED := 1

.PHONY: setup demo demo-reference test lint format bench clean browser report-screenshot

setup: $(STAMP) $(JARS_STAMP) $(MODEL)

# The exact, known-good versions (constraints.txt) of everything setup.cfg allows, every extra included.
$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[all,dev]'
	touch $@

# Delta, and the S3 connector (8.7 MB: s3a:// lakes and inputs, and tests/test_object_store.py).
$(JARS_STAMP): $(STAMP) laion_spark/jars.py
	$(PY) -m laion_spark.jars fetch --connector s3
	touch $@

$(MODEL): $(STAMP) laion_spark/testing/tiny_clip.py laion_spark/testing/synthetic.py
	$(PY) -m laion_spark.testing.tiny_clip --force --out $(MODEL)

demo: setup
	$(PY) -m laion_spark.demo --workdir .cache/demo

# After a deliberate change to the sample crawl or a stage's steps: rewrite the funnel the tests hold the demo to.
demo-reference: setup
	$(PY) -m laion_spark.demo --workdir .cache/demo > .cache/demo.log
	$(PY) tests/demo_reference.py < .cache/demo.log

lint: $(STAMP)
	$(VENV)/bin/ruff check laion_spark jobs tests bench scripts
	$(VENV)/bin/ruff format --check laion_spark jobs tests bench scripts

format: $(STAMP)
	$(VENV)/bin/ruff check --fix laion_spark jobs tests bench scripts
	$(VENV)/bin/ruff format laion_spark jobs tests bench scripts

test: setup lint browser
	$(PY) -m pytest -q tests

# Headless Chromium for tests/test_report.py (Debian's package; needs the Debian mirrors once). The test skips, and
# says why, where no chromium can be found after this.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends chromium \
		|| echo "make browser: could not install chromium; tests/test_report.py will skip"; }

# The README's screenshot of the report (docs/report.png), taken by the browser test from the demo lake.
report-screenshot: setup browser
	REPORT_SCREENSHOT=$(abspath docs/report.png) $(PY) -m pytest -q tests/test_report.py -k browser

bench: setup
	$(PY) bench/extract.py
	$(PY) bench/candidates.py
	$(PY) bench/download.py
	$(PY) bench/score.py
	$(PY) bench/index.py
	$(PY) bench/curation.py
	$(PY) bench/scale.py

clean:
	rm -rf .cache/demo spark-warehouse metastore_db derby.log .pytest_cache
