# claude-proxy: `make run` and `make test` work on a fresh machine (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run demo test test-fast check bench bench-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# With a config file (or CLAUDE_PROXY__UPSTREAM_URL) this runs the proxy; without, the demo.
run: setup
	@if $(BIN)/python -m claude_proxy.discovery; then \
		exec $(BIN)/claude-proxy $(ARGS); \
	else \
		exec $(BIN)/claude-proxy demo $(ARGS); \
	fi

demo: setup
	$(BIN)/claude-proxy demo $(ARGS)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest tests/unit -q

check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# BASELINE=REF (a commit such as origin/main~3, or a checkout's path) also runs that code, A/B/A.
bench: setup
	sh bench/install-tools.sh
	$(BIN)/python -m bench $(if $(BASELINE),--baseline '$(BASELINE)') $(ARGS)

bench-smoke: setup
	sh bench/install-tools.sh
	$(BIN)/python -m bench --smoke $(if $(BASELINE),--baseline '$(BASELINE)')

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/results
