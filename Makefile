# dedup-assets: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# `cpu` = faiss-cpu (k-means/assignment on the CPU). On a machine with its own faiss GPU build use
# EXTRAS=gpu,dev (README, "GPU").
EXTRAS ?= cpu,dev,nsfw,hypernym
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
export DAGSTER_HOME := $(CURDIR)

.PHONY: venv system-deps demo test test-all dev bench gpu-smoke clean

# Create or update the virtualenv. pip here is capped at torch<=2.14.1 (see pyproject.toml).
venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# Set-up + the whole pipeline on the generated sample dataset, then a summary and how to open the UI.
demo: venv
	$(BIN)/dedup-assets demo

# Debian's chromium for the UI test (Playwright drives it; it never downloads a browser) and
# redis-server for the Celery scale-out test. Needs root or existing installs; without them those
# tests are skipped with a reason.
system-deps:
	@{ command -v chromium >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium redis-server >/dev/null) \
	  || echo "chromium/redis-server not installed: the browser and Celery tests will be skipped"; }

# Set-up + the test suite (what .ci/run calls): the default suite plus the browser test.
test: venv system-deps
	$(BIN)/python -m pytest -q -n 2 --durations=15 -m "not gpu and not slow"

# Also the opt-in slow tests.
test-all: venv system-deps
	$(BIN)/python -m pytest -q -n 2 -m "not gpu"

# The Dagster UI on http://127.0.0.1:3000 (DAGSTER_HOME = this folder, see dagster.yaml).
dev: venv
	$(BIN)/dedup-assets dev

bench: venv
	$(BIN)/python benchmarks/bench_offline_recall.py --quick
	$(BIN)/python benchmarks/bench_candidate_search.py --quick
	$(BIN)/python benchmarks/bench_embed_throughput.py --quick

# GPU-vs-CPU parity and throughput (benchmarks/gpu_smoke.py; "not measured" rows without a GPU).
gpu-smoke: venv
	$(BIN)/python benchmarks/gpu_smoke.py

clean:
	rm -rf data/sample data/generated data/warehouse.duckdb* data/warehouse_files data/dagster_home
